"""Host round trips of a training step, counted on any device (a CPU included).

On a GPU the host must run ahead of the device: it queues step N+1 while the device computes
step N. Three kinds of operation make the host wait for the device, and this audit counts each as
it is dispatched, so a CPU run shows what a GPU run would wait for:

- ``readback``: a value read back to Python (``.item()``, ``bool(t)``, ``float(t)``: the aten op
  ``_local_scalar_dense``; ``.tolist()`` and ``.numpy()``, which a CPU tensor answers without
  dispatching, are counted by wrapping them while the audit runs);
- ``data_dependent``: an op whose output size depends on the values (``nonzero``, boolean-mask
  indexing, ``masked_select``, ``unique``, ``bincount``, ``repeat_interleave`` without
  ``output_size``): the host needs the size to allocate the result;
- ``from_host``: a tensor built from Python data (``torch.tensor(list)``, ``x.new_tensor(...)``:
  the aten op ``lift_fresh``), a blocking copy from the host on a GPU.

Use it as a context manager around the code to audit::

    with HostSyncAudit() as audit:
        ...one training step...
    audit.counts  # {"readback": 0, "data_dependent": 0, "from_host": 0}
    audit.where   # the first ops seen of each kind, with the Python line that issued them

On a GPU, ``torch.cuda.set_sync_debug_mode("warn")`` reports the synchronisations themselves
(``benchmarks/gpu_check.sh`` runs the same steps under it).
"""

from __future__ import annotations

import traceback
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["KINDS", "HostSyncAudit"]

KINDS = ("readback", "data_dependent", "from_host")
aten = torch.ops.aten

_READBACK = {aten._local_scalar_dense.default}
_FROM_HOST = {aten.lift_fresh.default, aten.lift_fresh_copy.default}
# ops whose output shape depends on the data (their packet names: every overload counts)
_DATA_DEPENDENT = {
    "nonzero",
    "nonzero_static",
    "masked_select",
    "bincount",
    "unique",
    "_unique",
    "_unique2",
    "unique_dim",
    "unique_consecutive",
    "histc",
}
# repeat_interleave with a tensor of repeats and no output_size reads the repeats' sum
_REPEATS_FROM_DATA = {aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor}
# where the first ops of each kind came from: lines of this many
_KEEP_WHERE = 8


def _bool_index(args) -> bool:
    """``aten.index`` / ``index_put`` with a boolean mask among its indices (a ``nonzero``)."""
    indices = args[1] if len(args) > 1 else ()
    return any(
        isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ()
    )


class HostSyncAudit(TorchDispatchMode):
    """Counts the operations of a block that make a GPU's host wait (see the module docstring).

    Attributes:
        counts: ``{kind: number}`` for every kind of :data:`KINDS`.
        ops: ``Counter`` of ``(kind, op name)``.
        where: ``{kind: [source line, ...]}``, the first few places each kind was issued from.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts = dict.fromkeys(KINDS, 0)
        self.ops: Counter = Counter()
        self.where: dict[str, list[str]] = {kind: [] for kind in KINDS}
        self._saved: dict[str, object] = {}

    def _record(self, kind: str, name: str) -> None:
        self.counts[kind] += 1
        self.ops[(kind, name)] += 1
        if len(self.where[kind]) < _KEEP_WHERE:
            frames = [
                f"{f.filename}:{f.lineno} {f.name}"
                for f in traceback.extract_stack()[:-3]
                if "/dscl/" in f.filename and "host_sync" not in f.filename
            ]
            self.where[kind].append(f"{name} at {frames[-1] if frames else '?'}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket.__name__
        if func in _READBACK:
            self._record("readback", packet)
        elif func in _FROM_HOST:
            self._record("from_host", packet)
        elif packet in _DATA_DEPENDENT:
            self._record("data_dependent", packet)
        elif packet in ("index", "index_put", "index_put_", "_index_put_impl_") and _bool_index(
            args
        ):
            self._record("data_dependent", f"{packet} (boolean mask)")
        elif func in _REPEATS_FROM_DATA and kwargs.get("output_size") is None:
            self._record("data_dependent", packet)
        return func(*args, **kwargs)

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self._record("readback", _name)
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
