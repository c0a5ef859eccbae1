"""StateArena: views of one buffer, first-fit with coalescing, compaction, clear errors."""

import pytest
import torch

from misa_kernels import ArenaFull, StateArena
from misa_kernels.arena import ALIGN_ELEMENTS


def test_views_share_one_buffer_and_are_aligned():
    arena = StateArena(10_000)
    a = arena.acquire("a", (10, 7))
    b = arena.acquire("b", 127)
    assert a.shape == (10, 7) and b.shape == (127,)
    for t in (a, b):
        assert t.untyped_storage().data_ptr() == arena.buffer.untyped_storage().data_ptr()
        assert (t.data_ptr() - arena.buffer.data_ptr()) % (ALIGN_ELEMENTS * 4) == 0
    a.fill_(1.0)
    b.fill_(2.0)
    assert torch.all(arena.view("a") == 1.0) and torch.all(arena.view("b") == 2.0)


def test_release_coalesces_and_reuses_space():
    arena = StateArena(4 * ALIGN_ELEMENTS)
    for k in "abcd":
        arena.acquire(k, ALIGN_ELEMENTS)
    with pytest.raises(ArenaFull, match="no room"):
        arena.acquire("e", 1)
    arena.release("b")
    arena.release("c")
    assert arena.stats()["largest_free_block"] == 2 * ALIGN_ELEMENTS  # b and c merged
    arena.acquire("bc", 2 * ALIGN_ELEMENTS)
    assert arena.stats()["used"] == arena.capacity


def test_compaction_keeps_contents_when_fragmented():
    arena = StateArena(4 * ALIGN_ELEMENTS)
    for k in "abcd":
        arena.acquire(k, ALIGN_ELEMENTS).fill_(float(ord(k)))
    arena.release("a")
    arena.release("c")
    assert arena.stats()["fragmentation"] == 0.5
    big = arena.acquire("big", 2 * ALIGN_ELEMENTS)  # fits only after compaction
    assert arena.generation == 1
    assert torch.all(arena.view("b") == ord("b")) and torch.all(arena.view("d") == ord("d"))
    assert big.numel() == 2 * ALIGN_ELEMENTS


def test_no_allocation_after_construction():
    arena = StateArena(1 << 16)
    ptr = arena.buffer.data_ptr()
    for round_ in range(50):
        keys = [(round_, i) for i in range(5)]
        for i, k in enumerate(keys):
            arena.acquire(k, 1000 + 37 * i + round_)
        for k in keys:
            arena.release(k)
    assert arena.buffer.data_ptr() == ptr
    stats = arena.stats()
    assert stats["used"] == 0 and stats["peak"] <= arena.capacity and stats["fragmentation"] == 0.0


def test_errors_name_the_problem():
    arena = StateArena(100)
    arena.acquire("x", 10)
    with pytest.raises(KeyError, match="already holds"):
        arena.acquire("x", 10)
    with pytest.raises(ValueError, match="capacity_numel"):
        StateArena(-1)
    with pytest.raises(ArenaFull, match="capacity"):
        arena.acquire("y", 10_000)
    arena.reset()
    assert len(arena) == 0 and arena.stats()["used"] == 0


def test_required_numel_matches_acquisitions():
    sizes = [1, 63, 64, 65, 1000]
    arena = StateArena(StateArena.required_numel(sizes))
    for i, n in enumerate(sizes):
        arena.acquire(i, n)
    assert arena.stats()["free"] == 0
