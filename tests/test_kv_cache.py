"""The paged KV cache: page accounting, shared prefixes, copy-on-write, and running out of pages."""

from __future__ import annotations

import pytest
import torch

from tandem.models.config import TextConfig
from tandem.runtime.kv_cache import CacheFullError, PagePool, Sequence

CONFIG = TextConfig(vocab_size=10, hidden_size=8, intermediate_size=8, num_layers=2, num_heads=2, num_kv_heads=1,
                    head_dim=4, rms_norm_eps=1e-6, rope_theta=1e4, mrope_section=(1, 0, 1), max_position_embeddings=64)


def make_pool(pages: int = 8, page_size: int = 4) -> PagePool:
    return PagePool(CONFIG, pages, page_size, torch.device("cpu"), torch.float32)


def test_slots_follow_the_block_table():
    pool = make_pool()
    seq = Sequence(pool)
    slots = seq.append_slots(6).tolist()
    p0, p1 = seq.pages
    assert slots == [p0 * 4 + i for i in range(4)] + [p1 * 4, p1 * 4 + 1]
    assert seq.append_slots(1).tolist() == [p1 * 4 + 2]
    assert pool.pages_in_use == 2


def test_fork_shares_pages_and_copies_a_partly_filled_last_page_on_write():
    pool = make_pool()
    parent = Sequence(pool)
    parent.append_slots(6)
    pool.kv[:, :, parent.pages[1]] = torch.arange(2.0)[:, None, None, None, None]
    child = Sequence(pool)
    child.fork_from(parent)
    assert child.pages == parent.pages and pool.pages_in_use == 2
    child.append_slots(1)  # writes into the shared, partly filled second page: it must be copied first
    assert child.pages[0] == parent.pages[0] and child.pages[1] != parent.pages[1]
    assert torch.equal(pool.kv[:, :, child.pages[1]], pool.kv[:, :, parent.pages[1]])
    parent.release()
    assert pool.pages_in_use == 2  # the shared first page and the child's copy
    child.release()
    assert pool.pages_in_use == 0


def test_fork_at_a_page_boundary_copies_nothing():
    pool = make_pool()
    parent = Sequence(pool)
    parent.append_slots(4)
    child = Sequence(pool)
    child.fork_from(parent)
    child.append_slots(1)
    assert child.pages[0] == parent.pages[0] and pool.pages_in_use == 2


def test_running_out_of_pages_is_an_error_that_names_the_shortfall():
    pool = make_pool(pages=2)
    seq = Sequence(pool)
    with pytest.raises(CacheFullError, match=r"3 more page\(s\) of 4 tokens needed, 2 free of 2"):
        seq.append_slots(9)
    assert pool.pages_in_use == 0
