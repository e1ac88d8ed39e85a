"""Tests for dscl.models.queue.LabelledQueue: FIFO order, wrap-around, mask, checkpointing."""

from __future__ import annotations

import pytest
import torch

from dscl.models.queue import LabelledQueue


def _rows(start: int, count: int, dim: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows whose features and label encode their global enqueue index."""
    index = torch.arange(start, start + count)
    return index[:, None].float().expand(count, dim) + torch.arange(dim) / 10, index


def _oldest_to_newest(queue: LabelledQueue) -> tuple[torch.Tensor, torch.Tensor]:
    """Valid entries read from ptr onwards (the documented order)."""
    order = (int(queue.ptr) + torch.arange(queue.size)) % queue.size
    order = order[queue.valid[order]]
    return queue.features[order], queue.labels[order]


def test_hand_computed_order_and_wrap_around() -> None:
    queue = LabelledQueue(4, 3)
    queue.enqueue(*_rows(0, 3))
    assert queue.labels.tolist() == [0, 1, 2, 0]
    assert queue.valid.tolist() == [True, True, True, False]
    assert int(queue.ptr) == 3
    queue.enqueue(*_rows(3, 2))  # slot 3 <- 3, wraps: slot 0 <- 4
    assert queue.labels.tolist() == [4, 1, 2, 3]
    assert queue.valid.all() and int(queue.ptr) == 1
    queue.enqueue(*_rows(5, 6))  # larger than K: keeps 7, 8, 9, 10 at slots 1, 2, 3, 0
    assert queue.labels.tolist() == [10, 7, 8, 9]
    assert int(queue.ptr) == 1
    features, _ = _rows(7, 4)
    torch.testing.assert_close(queue.features[[1, 2, 3, 0]], features, rtol=0, atol=0)
    queue.enqueue(*_rows(11, 4))  # exactly K: replaces everything, pointer unchanged
    assert queue.labels.tolist() == [14, 11, 12, 13]
    assert int(queue.ptr) == 1


@pytest.mark.parametrize("size", [1, 5, 7])
def test_matches_reference_fifo_for_many_batch_sizes(size: int) -> None:
    queue = LabelledQueue(size, 3)
    history_features, history_labels = [], []
    start = 0
    for batch in [3, 5, 1, 0, 7, 12, 2, 5, 14, 1]:
        features, labels = _rows(start, batch)
        start += batch
        queue.enqueue(features, labels)
        history_features.append(features)
        history_labels.append(labels)
        kept = min(start, size)
        expected_features = torch.cat(history_features)[start - kept :]
        expected_labels = torch.cat(history_labels)[start - kept :]
        got_features, got_labels = _oldest_to_newest(queue)
        torch.testing.assert_close(got_features, expected_features, rtol=0, atol=0)
        assert torch.equal(got_labels, expected_labels)
        assert queue.num_valid == kept


def test_never_written_entries_are_invalid_and_zero() -> None:
    queue = LabelledQueue(6, 2)
    assert queue.size == 6 and queue.num_valid == 0
    assert not queue.valid.any()
    queue.enqueue(torch.ones(2, 2), torch.tensor([3, 4]))
    assert queue.valid.tolist() == [True, True, False, False, False, False]
    assert torch.count_nonzero(queue.features[~queue.valid]) == 0
    assert torch.count_nonzero(queue.labels[~queue.valid]) == 0


def test_buffer_dtypes_and_input_conversion() -> None:
    queue = LabelledQueue(3, 2)
    assert queue.features.dtype == torch.float32 and queue.labels.dtype == torch.int64
    assert (
        queue.valid.dtype == torch.bool and queue.ptr.shape == () and queue.ptr.dtype == torch.int64
    )
    source = torch.ones(2, 2, dtype=torch.float16, requires_grad=True)
    queue.enqueue(source, torch.tensor([1, 2], dtype=torch.int32))
    assert queue.features.dtype == torch.float32 and not queue.features.requires_grad
    assert queue.labels.dtype == torch.int64 and queue.labels[:2].tolist() == [1, 2]


def test_state_dict_round_trip_is_exact() -> None:
    torch.manual_seed(0)
    queue = LabelledQueue(5, 4)
    queue.enqueue(torch.randn(3, 4), torch.tensor([1, 2, 3]))
    queue.enqueue(torch.randn(4, 4), torch.tensor([4, 5, 6, 7]))
    state = queue.state_dict()
    assert set(state) == {"features", "labels", "valid", "ptr"}
    restored = LabelledQueue(5, 4)
    restored.load_state_dict(state)
    for name in state:
        assert torch.equal(getattr(restored, name), getattr(queue, name))
    batch = torch.randn(2, 4), torch.tensor([8, 9])
    queue.enqueue(*batch)
    restored.enqueue(*batch)  # the pointer was restored too: both continue identically
    for name in state:
        assert torch.equal(getattr(restored, name), getattr(queue, name))


def test_partially_filled_state_round_trip_keeps_mask() -> None:
    queue = LabelledQueue(4, 2)
    queue.enqueue(torch.ones(1, 2), torch.tensor([5]))
    restored = LabelledQueue(4, 2)
    restored.load_state_dict(queue.state_dict())
    assert restored.valid.tolist() == [True, False, False, False] and int(restored.ptr) == 1


def test_size_zero_is_a_no_op() -> None:
    queue = LabelledQueue(0, 3)
    queue.enqueue(torch.randn(4, 3), torch.arange(4))
    assert queue.size == 0 and queue.num_valid == 0 and int(queue.ptr) == 0
    assert queue.features.shape == (0, 3)
    restored = LabelledQueue(0, 3)
    restored.load_state_dict(queue.state_dict())
    assert restored.size == 0


def test_reset_empties_the_queue() -> None:
    queue = LabelledQueue(3, 2)
    queue.enqueue(torch.ones(5, 2), torch.arange(5))
    queue.reset()
    assert not queue.valid.any() and int(queue.ptr) == 0
    assert torch.count_nonzero(queue.features) == 0 and torch.count_nonzero(queue.labels) == 0


def test_invalid_arguments_raise() -> None:
    with pytest.raises(ValueError, match="size"):
        LabelledQueue(-1, 3)
    with pytest.raises(ValueError, match="dim"):
        LabelledQueue(3, 0)
    queue = LabelledQueue(3, 2)
    with pytest.raises(ValueError, match="features"):
        queue.enqueue(torch.ones(2, 3), torch.arange(2))
    with pytest.raises(ValueError, match="labels"):
        queue.enqueue(torch.ones(2, 2), torch.arange(3))
    with pytest.raises(ValueError, match="integer"):
        queue.enqueue(torch.ones(2, 2), torch.ones(2))
