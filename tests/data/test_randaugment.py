"""Batched RandAugment (``dscl.data.randaugment``) against torchvision's ``v2.RandAugment``.

What must hold:
- the op space, its order, which ops are signed and every magnitude are torchvision's;
- each op alone, at either sign, gives torchvision's functional op image by image: exactly for
  the geometric ops, posterize, solarize, autocontrast and equalize, to 2 float32 roundings for
  the four blends (brightness, colour, contrast, sharpness);
- a whole RandAugment equals torchvision's ops applied image by image in the drawn order;
- a batch gives each image what it gets alone (the per-sample and the batched paths agree);
- the draws are SplitMix64 of the seeds, and over 20,000 images the frequencies of the ops and
  signs agree with uniform 1/14 and 1/2 and with torchvision's own draws, the ops of one image
  independent of each other;
- nothing is read back to the host, and torch's RNG is not used.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torchvision.transforms import v2

from dscl.data.randaugment import (
    OPS,
    SIGNED,
    apply_ops,
    draw_ops,
    magnitudes,
    randaugment,
    splitmix64,
)

SPACE = v2.RandAugment._AUGMENTATION_SPACE
# the blends multiply by per-image tensors where torchvision multiplies by a Python float and
# fuses a multiply-add: 2 roundings of a value in [0, 1] (measured: at most 1.8e-7)
BLEND_TOLERANCE = 2 * 2**-23
BLENDS = ("Brightness", "Color", "Contrast", "Sharpness")


def _torchvision_op(image, name: str, negative: bool, magnitude: int):
    """torchvision's RandAugment step ``name`` on one (3, H, W) image at the given sign."""
    transform = v2.RandAugment(num_ops=1, magnitude=magnitude)
    bins, signed = SPACE[name]
    values = bins(transform.num_magnitude_bins, image.shape[-2], image.shape[-1])
    value = 0.0 if values is None else float(values[magnitude])
    if signed and negative:
        value = -value
    return transform._apply_image_or_video_transform(
        image, name, value, interpolation=transform.interpolation, fill=transform._fill
    )


def _test_images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """n images in [0, 1]: random, then every third one with a constant channel and every third
    one on 4 levels (the flat and few-level cases of autocontrast and equalize)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, size, size, generator=g)
    x[1::3, 1] = 0.4
    x[2::3] = (x[2::3] * 4).floor() / 4
    return x


def test_op_space_and_magnitudes_are_torchvisions():
    assert OPS == tuple(SPACE)
    assert SIGNED == {name for name, (_, signed) in SPACE.items() if signed}
    for magnitude in (0, 9, 10, 30):
        for height, width in ((32, 32), (24, 40)):
            mine = magnitudes(magnitude, height, width)
            for name, (bins, _) in SPACE.items():
                values = bins(31, height, width)
                assert (name in mine) == (values is not None), name
                if values is not None:
                    assert mine[name] == float(values[magnitude]), (name, magnitude)


@pytest.mark.parametrize(
    ("size", "magnitude"), [(32, 10), (33, 30), (20, 12), (16, 0), (3, 20), (64, 5)]
)
def test_each_op_alone_is_torchvisions_image_by_image(size, magnitude):
    """One batch: image i takes op (i // 6) with sign (i // 3) % 2 on three kinds of image, so
    this also shows that each image gets its own op."""
    x = _test_images(6 * len(OPS), size)
    i = torch.arange(x.shape[0])
    ops, negative = i // 6, (i // 3) % 2 == 1
    out = apply_ops(x, ops[:, None], negative[:, None], magnitude)
    for k in range(x.shape[0]):
        name = OPS[int(ops[k])]
        ref = _torchvision_op(x[k], name, bool(negative[k]), magnitude)
        if name in BLENDS:
            diff = float((out[k] - ref).abs().max())
            assert diff <= BLEND_TOLERANCE, (name, k, diff)
        else:
            # the geometric ops sample through torchvision's float32 matrices and grid, computed
            # as it computes them: nearest sampling picks the same pixels (measured: 0 of 11
            # million at 16 sizes from 3 to 224 px, magnitudes 0, 3, ..., 30), so no allowance
            # for border or half-way pixels is needed
            assert torch.equal(out[k], ref), (name, k)


def test_randaugment_is_torchvisions_ops_in_the_drawn_order():
    """Three ops per image: the batched chain against torchvision's functional ops applied image
    by image in the order and with the signs the seeds drew. Only the blends' roundings can
    differ, and a later posterize, solarize or equalize can move such a pixel across a level:
    at most 0.1% of the values may differ by more than the blends' tolerance (measured: none;
    the largest difference 1.8e-7)."""
    x = _test_images(120, 20, seed=1)
    seeds = torch.randint(0, 2**62, (120,), generator=torch.Generator().manual_seed(2))
    out = randaugment(x, seeds, 3, 12)
    ops, negative = draw_ops(seeds, 3)
    far = 0
    for k in range(x.shape[0]):
        ref = x[k]
        for j in range(3):
            ref = _torchvision_op(ref, OPS[int(ops[k, j])], bool(negative[k, j]), 12)
        far += int(((out[k] - ref).abs() > 3 * BLEND_TOLERANCE).sum())
    assert far <= 1e-3 * x.numel(), far


def test_a_batch_gives_each_image_what_it_gets_alone():
    """The per-sample path runs batches of one, the batched paths whole batches: the same views
    up to the blends' roundings (the contrast mean and sums over a batch; measured: equal)."""
    x = _test_images(40, 24, seed=3)
    seeds = torch.randint(0, 2**62, (40,), generator=torch.Generator().manual_seed(4))
    out = randaugment(x, seeds, 2, 10)
    for k in range(x.shape[0]):
        alone = randaugment(x[k : k + 1], seeds[k : k + 1], 2, 10)
        assert (out[k] - alone[0]).abs().max() <= 3 * BLEND_TOLERANCE, k


def test_the_seeds_alone_choose_and_torchs_rng_is_left_alone():
    x = _test_images(6, 12)
    seeds = torch.tensor([5, 7, 5, 2**62 - 1, 0, 123456789])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    out = randaugment(x, seeds, 2, 9)
    assert torch.equal(torch.get_rng_state(), before)
    assert torch.equal(out, randaugment(x, seeds, 2, 9))
    other = randaugment(x, seeds + 1, 2, 9)
    assert not torch.equal(other, out)
    assert torch.equal(randaugment(x, seeds, 0, 9), x)  # no op: the images as they were


def _splitmix64(state: int, j: int) -> int:
    """SplitMix64's output j for ``state``, in Python integers (the reference)."""
    mask = 2**64 - 1
    z = (state + (j + 1) * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_the_draws_are_splitmix64_of_the_seeds():
    seeds = torch.tensor([0, 1, 5, 2**31, 2**62 - 1, 987654321987654321])
    ops, negative = draw_ops(seeds, 4)
    for i, seed in enumerate(seeds.tolist()):
        for j in range(4):
            h = _splitmix64(seed, j)
            assert int(splitmix64(seeds, j)[i]) % 2**64 == h
            assert int(ops[i, j]) == ((h >> 32) * 14) >> 32
            assert bool(negative[i, j]) == bool((h >> 31) & 1)


def _chi2_bound(df: int, z: float = 3.719) -> float:
    """The chi-square quantile of ``df`` degrees of freedom at the normal quantile ``z``
    (Wilson-Hilferty, within 1% here; 3.719: one-sided p = 1e-4)."""
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def _chi2(observed: list[list[int]]) -> float:
    """Pearson's chi-square of a contingency table (rows: samples, columns: categories)."""
    rows = [sum(r) for r in observed]
    cols = [sum(c) for c in zip(*observed, strict=True)]
    total = sum(rows)
    return sum(
        (observed[i][j] - rows[i] * cols[j] / total) ** 2 / (rows[i] * cols[j] / total)
        for i in range(len(rows))
        for j in range(len(cols))
        if cols[j]
    )


def _torchvision_draws(n: int, num_ops: int, magnitude: int) -> list[tuple[str, bool]]:
    """(op, negative) of each step torchvision's RandAugment takes on n images."""
    transform = v2.RandAugment(num_ops=num_ops, magnitude=magnitude)
    seen = []

    def record(image, name, value, interpolation, fill):
        seen.append((name, value < 0))
        return image

    transform._apply_image_or_video_transform = record
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        image = torch.zeros(3, 4, 4)
        for _ in range(n):
            transform(image)
    return seen


def test_ops_and_signs_are_distributed_as_torchvisions():
    """20,000 images × 2 ops from seeds drawn as ``named_views.draw_named`` draws them: each op
    1/14, each signed op's sign 1/2, the two ops of an image independent, and the same
    frequencies as 20,000 images × 2 ops of torchvision's RandAugment (each at p = 1e-4)."""
    n = 20_000
    seeds = torch.randint(0, 2**62, (n,), generator=torch.Generator().manual_seed(5))
    ops, negative = draw_ops(seeds, 2)
    mine = Counter(ops.flatten().tolist())
    expected = ops.numel() / len(OPS)
    chi2 = sum((mine[k] - expected) ** 2 / expected for k in range(len(OPS)))
    assert chi2 < _chi2_bound(len(OPS) - 1), chi2
    signed = torch.tensor([OPS[k] in SIGNED for k in range(len(OPS))])[ops]
    minus, total = int(negative[signed].sum()), int(signed.sum())
    assert abs(minus - total / 2) < 3.719 * math.sqrt(total / 4), (minus, total)
    for k in range(len(OPS)):  # and per op
        at = ops == k
        if OPS[k] in SIGNED:
            m, t = int(negative[at].sum()), int(at.sum())
            assert abs(m - t / 2) < 3.719 * math.sqrt(t / 4), (OPS[k], m, t)
    pairs = [[0] * len(OPS) for _ in OPS]
    for a, b in ops.tolist():
        pairs[a][b] += 1
    assert _chi2(pairs) < _chi2_bound((len(OPS) - 1) ** 2), _chi2(pairs)

    theirs = _torchvision_draws(n, 2, 10)
    their_ops = Counter(name for name, _ in theirs)
    table = [[mine[k] for k in range(len(OPS))], [their_ops[name] for name in OPS]]
    assert _chi2(table) < _chi2_bound(len(OPS) - 1), _chi2(table)
    their_minus = sum(1 for name, neg in theirs if name in SIGNED and neg)
    their_total = sum(1 for name, _ in theirs if name in SIGNED)
    signs = [[minus, total - minus], [their_minus, their_total - their_minus]]
    assert _chi2(signs) < _chi2_bound(1), signs


class _NoHostReads(TorchDispatchMode):
    """Fails on what reads a device value back to the host: ``.item()``/``.tolist()``
    (``_local_scalar_dense``), ``nonzero``, a boolean-mask index, and ``torch.tensor(data)``
    (``lift_fresh``: a copy from the host)."""

    BANNED = {
        torch.ops.aten._local_scalar_dense.default,
        torch.ops.aten.nonzero.default,
        torch.ops.aten.lift_fresh.default,
    }

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in self.BANNED:
            raise AssertionError(f"host read: {func}")
        if func.overloadpacket is torch.ops.aten.index:
            masks = [i for i in args[1] if i is not None and i.dtype == torch.bool]
            assert not masks, f"boolean-mask index: {func}"
        return func(*args, **(kwargs or {}))


def test_nothing_is_read_back_to_the_host():
    x = _test_images(16, 16)
    seeds = torch.randint(0, 2**62, (16,), generator=torch.Generator().manual_seed(6))
    expected = randaugment(x, seeds, 2, 10)  # makes the per-device constants once
    with _NoHostReads():
        out = randaugment(x, seeds, 2, 10)
    assert torch.equal(out, expected)
    # the mode does catch each kind (``.tolist()`` itself is not dispatched: it is not caught)
    for read in (
        lambda: seeds[0].item(),
        lambda: x[x > 0.5],
        lambda: seeds.nonzero(),
        lambda: torch.tensor([1.0, 2.0]),
    ):
        with pytest.raises(AssertionError, match="host read|boolean-mask"), _NoHostReads():
            read()


@pytest.mark.cuda
def test_on_a_gpu_the_same_ops_nothing_read_back_and_nearly_the_same_pixels():
    """On CUDA: the draws are the CPU's bit for bit (int64 arithmetic), nothing is read back,
    and the views are the CPU's up to float rounding, which a nearest sample half-way between
    pixels or a later posterize/equalize level can turn into a visible difference: at most 1%
    of the values may differ by more than 1e-5 (a bound set without a GPU measurement)."""
    cuda = torch.device("cuda")
    x = _test_images(64, 32, seed=7)
    seeds = torch.randint(0, 2**62, (64,), generator=torch.Generator().manual_seed(8))
    ops, negative = draw_ops(seeds, 3)
    ops_gpu, negative_gpu = draw_ops(seeds.to(cuda), 3)
    assert torch.equal(ops_gpu.cpu(), ops) and torch.equal(negative_gpu.cpu(), negative)
    xg, sg = x.to(cuda), seeds.to(cuda)
    expected = randaugment(xg, sg, 3, 10)  # makes the per-device constants once
    with _NoHostReads():
        out = randaugment(xg, sg, 3, 10)
    assert torch.equal(out, expected)
    far = int(((out.cpu() - randaugment(x, seeds, 3, 10)).abs() > 1e-5).sum())
    assert far <= 0.01 * x.numel(), far
