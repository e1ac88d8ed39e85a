"""This project's BCL and PaCo losses against the authors' implementations, on random inputs.

The authors' code stays outside this repository: ``--bcl`` is a checkout of
github.com/FlamieZhu/Balanced-Contrastive-Learning (``loss/contrastive.py`` ``BalSCL``,
``loss/logitadjust.py`` ``LogitAdjust``), ``--paco`` one of
github.com/dvlab-research/Parametric-Contrastive-Learning (``PaCo/LT/losses.py`` ``PaCoLoss``).
Their modules are imported from there by file path and patched AT RUN TIME (module attributes
replaced from here; nothing of theirs is copied or edited). Every patch is listed in ``PATCHES``
with its reason and printed after the table.

For several seeds, sizes, settings and two dtypes, both sides get the same inputs: embeddings
L2-normalised (keys and second views close to their queries / first views, as in training),
classifier logits, prototypes and class counts drawn at random. The table gives, per loss, the
worst relative difference of the value, |ours - theirs| / |theirs|, and of the gradients with
respect to every tensor input, max |g_ours - g_theirs| / max |g_theirs|.

- BCL: ``BalancedContrastiveLoss`` vs ``BalSCL``; ``LogitAdjustedCrossEntropy`` vs
  ``LogitAdjust``; ``BCLLoss`` vs ``args.alpha * ce + args.beta * scl`` as their ``main.py``
  combines the two.
- PaCo: ``PaCoLoss`` vs their ``PaCoLoss`` over [q | k | queue]. Theirs has no mask of
  never-written queue entries; it is given the written entries only (their K = that count),
  ours the whole queue, garbage rows included, with ``queue_valid``. K = 0 is included.

    python benchmarks/peers_side_by_side.py --bcl /path/to/BCL --paco /path/to/PaCo

Measured (5 seeds, one thread, torch 2.14.1, CPU; BCL at f72d070, PaCo at fe56535), worst
relative difference of value / gradients: float64 - balanced contrastive 2.3e-16 / 8.9e-16,
logit-adjusted CE 0 / 0, BCL total 1.7e-16; PaCo 9.3e-14 / 9.5e-13 with alpha 0.25, beta 0.5,
and 1.5e-7 / 2.3e-7 with the scripts' alpha 0.05 / 0.01 (their float32 masks, see NOTES).
float32 - every loss within 2.3e-7 (value) and 9.3e-7 (gradients).
"""

from __future__ import annotations

import argparse
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from authors_side_by_side import authors_revision, load_module  # a script beside this one

from dscl.losses import BalancedContrastiveLoss, BCLLoss, LogitAdjustedCrossEntropy, PaCoLoss

PATCHES: list[str] = []  # one line per run-time patch, filled as they are applied

# (B, C, D): batch, classes, embedding dim. Their BalSCL fails for C = 1 (see NOTES).
BCL_SIZES = [(5, 7, 3), (8, 3, 4), (32, 10, 128), (128, 100, 128), (64, 1000, 1024)]
# temperature, tau, ce weight (their --alpha), scl weight (their --beta): main.py's defaults
BCL_SETTINGS = [(0.07, 1.0, 1.0, 0.35), (0.1, 1.0, 2.0, 0.6), (0.5, 0.5, 1.0, 1.0)]
# (B, C, D, K, written): K queue slots of which `written` have been written
PACO_SIZES = [
    (5, 7, 3, 0, 0),
    (5, 7, 3, 11, 6),
    (16, 10, 32, 64, 64),
    (64, 100, 128, 1024, 700),
    (128, 1000, 128, 8192, 8192),
]
# temperature (--moco-t), alpha, beta, gamma: ImageNet-LT R50, X50 and CIFAR-100-LT scripts,
# then one with α exactly representable in float32 and γ != 1
PACO_SETTINGS = [
    (0.2, 0.05, 1.0, 1.0),
    (0.07, 0.05, 1.0, 1.0),
    (0.05, 0.01, 1.0, 1.0),
    (0.5, 0.25, 0.5, 2.0),
]
NOTES = [
    "BalSCL: with C = 1 class torch.eye(1)[targets].sum(0).squeeze() is 0-d and the per-sample "
    "indexing fails, so C = 1 is left out of the sizes here (ours accepts it).",
    "PaCoLoss: its masks are float32 (torch.eq(...).float(), one_hot(...).to(torch.float32)), so "
    "alpha is rounded to float32 and the total positive weight mask.sum(1) = beta + alpha*|P| is "
    "a float32 sum (float32 spacing near 1 is 1.2e-7): in the float64 rows that alone gives "
    "relative differences up to ~1e-7 for alpha 0.05/0.01. The row with alpha 0.25, beta 0.5 "
    "(sums exact in float32) shows the float64 agreement without it.",
    "PaCoLoss: log(sum + 1e-12) is taken after subtracting a row max that includes the masked-out "
    "self-similarity 1/tau; when every other logit is far below 1/tau the 1e-12 is not negligible "
    "(measured separately: keys unrelated to their queries, tau 0.05, D 128, K 0: 2.5e-6 "
    "relative; with keys near their queries, as here and in training, it vanishes).",
]


def _patched(line: str) -> None:
    if line not in PATCHES:
        PATCHES.append(line)


def _load(name: str, path: Path) -> types.ModuleType:
    if not path.is_file():
        raise SystemExit(f"missing {path}")
    return load_module(name, path)


def _torch_proxy(label: str, **replaced: object) -> types.ModuleType:
    """A module holding torch's namespace with some names replaced (set as a module's
    ``torch`` global, it changes only what that module sees)."""
    proxy = types.ModuleType(f"torch (patched for {label})")
    proxy.__dict__.update(torch.__dict__)
    proxy.__dict__.update(replaced)
    return proxy


class Dtype:
    """The comparison dtype, read by the patches when the authors' objects are built."""

    value = torch.float64


def import_bcl(path: Path) -> types.SimpleNamespace:
    contrastive = _load("authors_bcl_contrastive", path / "loss" / "contrastive.py")
    logitadjust = _load("authors_bcl_logitadjust", path / "loss" / "logitadjust.py")

    def float_tensor(data):  # what torch.cuda.FloatTensor(list) builds, on the CPU
        return torch.tensor(data, dtype=Dtype.value)

    logitadjust.torch = _torch_proxy(
        "logitadjust", cuda=types.SimpleNamespace(FloatTensor=float_tensor)
    )
    _patched(
        "BCL loss/logitadjust.py: torch.cuda.FloatTensor(cls_num_list) -> a CPU tensor of the "
        "comparison dtype (their LogitAdjust builds its prior on CUDA unconditionally; float32 "
        "as theirs in the float32 rows, float64 in the float64 rows)"
    )
    return types.SimpleNamespace(BalSCL=contrastive.BalSCL, LogitAdjust=logitadjust.LogitAdjust)


def import_paco(path: Path) -> types.SimpleNamespace:
    losses = _load("authors_paco_losses", path / "PaCo" / "LT" / "losses.py")
    real_device = torch.device

    def device(spec, *args):
        return real_device("cpu") if spec == "cuda" else real_device(spec, *args)

    def tensor(data):  # torch.Tensor(list) in cal_weight_for_classes
        return torch.tensor(data, dtype=Dtype.value)

    losses.torch = _torch_proxy("PaCo losses", device=device, Tensor=tensor)
    _patched(
        "PaCo PaCo/LT/losses.py: torch.device('cuda') -> cpu (cal_weight_for_classes moves the "
        "prior to CUDA unconditionally)"
    )
    _patched(
        "PaCo PaCo/LT/losses.py: torch.Tensor(cls_num_list) -> a tensor of the comparison dtype "
        "(float32 as theirs in the float32 rows; float64 in the float64 rows so that the prior "
        "is not rounded to float32 there)"
    )
    return types.SimpleNamespace(PaCoLoss=losses.PaCoLoss)


# ------------------------------------------------------------------------------ comparisons


def _unit(gen, *shape, dtype):
    return F.normalize(torch.randn(*shape, generator=gen, dtype=torch.float64), dim=-1).to(dtype)


def _near(gen, base, spread, dtype):
    """Unit vectors near ``base`` (a positive pair)."""
    noise = torch.randn(base.shape, generator=gen, dtype=torch.float64) * spread
    return F.normalize(base.double() + noise, dim=-1).to(dtype)


def _rel(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    ours, theirs = ours.detach().double(), theirs.detach().double()
    scale = theirs.abs().max().item()
    return (
        (ours - theirs).abs().max().item() / scale
        if scale > 0
        else (ours - theirs).abs().max().item()
    )


def _grads(value: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, leaves))


class Worst:
    """Worst value and gradient differences per row label."""

    def __init__(self) -> None:
        self.rows: dict[str, list[float]] = {}

    def add(self, label: str, value: float, grad: float) -> None:
        row = self.rows.setdefault(label, [0.0, 0.0, 0])
        row[0], row[1], row[2] = max(row[0], value), max(row[1], grad), row[2] + 1


def compare_bcl(theirs, seeds: int, dtype: torch.dtype, worst: Worst) -> None:
    name = {torch.float64: "float64", torch.float32: "float32"}[dtype]
    for batch, classes, dim in BCL_SIZES:
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            view1 = _unit(gen, batch, dim, dtype=dtype)
            view2 = _near(gen, view1, 0.5, dtype)
            labels = torch.randint(classes, (batch,), generator=gen)
            prototypes = _unit(gen, classes, dim, dtype=dtype)
            logits = (5 * torch.randn(batch, classes, generator=gen, dtype=torch.float64)).to(dtype)
            counts = torch.randint(1, 1000, (classes,), generator=gen).tolist()
            for temperature, tau, ce_weight, scl_weight in BCL_SETTINGS:
                leaves = [t.clone().requires_grad_(True) for t in (view1, view2, prototypes)]
                ours = BalancedContrastiveLoss(temperature)(leaves[0], leaves[1], labels, leaves[2])
                ours_g = _grads(ours, leaves)
                leaves_t = [t.clone().requires_grad_(True) for t in (view1, view2, prototypes)]
                features = torch.stack([leaves_t[0], leaves_t[1]], dim=1)  # (B, 2, D)
                theirs_scl = theirs.BalSCL(counts, temperature)(leaves_t[2], features, labels)
                theirs_g = _grads(theirs_scl, leaves_t)
                worst.add(
                    f"BCL balanced contrastive ({name})",
                    _rel(ours, theirs_scl),
                    max(_rel(a, b) for a, b in zip(ours_g, theirs_g, strict=True)),
                )

                lg = logits.clone().requires_grad_(True)
                ours_ce = LogitAdjustedCrossEntropy(counts, tau)(lg, labels)
                ours_ce_g = _grads(ours_ce, [lg])
                lg_t = logits.clone().requires_grad_(True)
                theirs_ce = theirs.LogitAdjust(counts, tau=tau)(lg_t, labels)
                theirs_ce_g = _grads(theirs_ce, [lg_t])
                worst.add(
                    f"BCL logit-adjusted CE ({name})",
                    _rel(ours_ce, theirs_ce),
                    _rel(ours_ce_g[0], theirs_ce_g[0]),
                )

                total = BCLLoss(counts, temperature, tau, ce_weight, scl_weight)(
                    logits, view1, view2, labels, prototypes
                ).loss
                # their main.py: loss = args.alpha * ce_loss + args.beta * scl_loss
                theirs_total = ce_weight * theirs_ce + scl_weight * theirs_scl
                worst.add(f"BCL total alpha*CE+beta*SCL ({name})", _rel(total, theirs_total), 0.0)


def compare_paco(theirs, seeds: int, dtype: torch.dtype, worst: Worst) -> None:
    name = {torch.float64: "float64", torch.float32: "float32"}[dtype]
    for batch, classes, dim, slots, written in PACO_SIZES:
        for seed in range(seeds):
            gen = torch.Generator().manual_seed(seed)
            query = _unit(gen, batch, dim, dtype=dtype)
            key = _near(gen, query, 0.5, dtype)
            labels = torch.randint(classes, (batch,), generator=gen)
            queue = _unit(gen, slots, dim, dtype=dtype)
            queue_labels = torch.randint(classes, (slots,), generator=gen)
            valid = torch.zeros(slots, dtype=torch.bool)
            valid[torch.randperm(slots, generator=gen)[:written]] = True
            sup = (3 * torch.randn(batch, classes, generator=gen, dtype=torch.float64)).to(dtype)
            counts = torch.randint(1, 1000, (classes,), generator=gen).tolist()
            for temperature, alpha, beta, gamma in PACO_SETTINGS:
                leaves = [t.clone().requires_grad_(True) for t in (query, key, sup)]
                ours = PaCoLoss(counts, temperature, alpha, beta, gamma)(
                    leaves[0], leaves[1], labels, queue, queue_labels, leaves[2], valid
                )
                ours_g = _grads(ours, leaves)

                leaves_t = [t.clone().requires_grad_(True) for t in (query, key, sup)]
                criterion = theirs.PaCoLoss(
                    alpha=alpha,
                    beta=beta,
                    gamma=gamma,
                    temperature=temperature,
                    K=written,
                    num_classes=classes,
                )
                criterion.cal_weight_for_classes(counts)
                # moco/builder.py: features = cat(q, k, queue), target = cat(y, y, queue labels)
                features = torch.cat([leaves_t[0], leaves_t[1], queue[valid]], dim=0)
                target = torch.cat([labels, labels, queue_labels[valid]], dim=0)
                theirs_loss = criterion(features, target, leaves_t[2])
                theirs_g = _grads(theirs_loss, leaves_t)
                worst.add(
                    f"PaCo tau={temperature} a={alpha} b={beta} g={gamma} ({name})",
                    _rel(ours, theirs_loss),
                    max(_rel(a, b) for a, b in zip(ours_g, theirs_g, strict=True)),
                )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--bcl", type=Path, help="checkout of FlamieZhu/Balanced-Contrastive-Learning"
    )
    parser.add_argument(
        "--paco", type=Path, help="checkout of dvlab-research/Parametric-Contrastive-Learning"
    )
    parser.add_argument("--seeds", type=int, default=5, help="seeds per size (default 5)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args()
    if args.bcl is None and args.paco is None:
        parser.error("give --bcl and/or --paco")
    torch.set_num_threads(args.threads)
    bcl = import_bcl(args.bcl.resolve()) if args.bcl else None
    paco = import_paco(args.paco.resolve()) if args.paco else None

    worst = Worst()
    for dtype in (torch.float64, torch.float32):
        Dtype.value = dtype
        if bcl is not None:
            compare_bcl(bcl, args.seeds, dtype, worst)
        if paco is not None:
            compare_paco(paco, args.seeds, dtype, worst)

    for label, path in (("BCL", args.bcl), ("PaCo", args.paco)):
        if path is not None:
            print(f"{label}: authors' code at {path} ({authors_revision(path)})")
    print(f"{args.seeds} seeds per size; BCL sizes (B, C, D) {BCL_SIZES}")
    print(f"PaCo sizes (B, C, D, K slots, written) {PACO_SIZES}")
    print(f"\n{'loss':<52} {'cases':>5} {'worst rel. diff value':>22} {'gradients':>10}")
    for label, (value, grad, cases) in worst.rows.items():
        grad_text = f"{grad:.2e}" if "total" not in label else "-"
        print(f"{label:<52} {cases:>5} {value:>22.2e} {grad_text:>10}")
    print("\npatched at run time to run the authors' code here:")
    for line in PATCHES:
        print(f"- {line}")
    print("\nnotes on the authors' code:")
    for line in NOTES:
        print(f"- {line}")


if __name__ == "__main__":
    main()
