"""The embedding store's byte budget (what the service's ``--memory-budget`` rests on): bytes are
counted through dataclasses, tuples and dicts of numpy arrays and torch tensors; the least recently
used slices go first; the ``max_volumes`` limit still works for existing callers."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from sss_lib.embedding_cache import EmbeddingKey, EmbeddingStore, nbytes_of


@dataclasses.dataclass
class Emb:
    features: tuple
    shape: tuple[int, int]
    extra: dict


def key(name: str) -> EmbeddingKey:
    return EmbeddingKey(name, "bb", "pre", 2)


def test_nbytes_counts_nested_arrays_and_tensors():
    emb = Emb((torch.zeros(1, 4, 8, 8), torch.zeros(2, 3, dtype=torch.float16)), (8, 8),
              {"a": np.zeros(10, np.float64), "b": [np.zeros(3, np.uint8)], "name": "x"})
    assert nbytes_of(emb) == 4 * 64 * 4 + 6 * 2 + 80 + 3


def test_byte_budget_drops_least_recently_used_slices_first():
    one = 1000  # bytes per embedding
    store = EmbeddingStore(max_volumes=None, max_bytes=3 * one)
    make = lambda: np.zeros(one, np.uint8)  # noqa: E731
    for s in range(3):
        store.get_or_compute(key("a"), s, make)
    assert store.bytes_used == 3 * one and store.computed == 3
    store.get_or_compute(key("a"), 0, make)  # slice 0 used again: slice 1 is now the oldest
    assert store.computed == 3
    store.get_or_compute(key("b"), 0, make)
    assert store.cached_slices(key("a")) == {0, 2} and store.cached_slices(key("b")) == {0}
    assert store.bytes_used == 3 * one and store.evicted == 1
    # A dropped slice is computed again when asked for.
    store.get_or_compute(key("a"), 1, make)
    assert store.computed == 5 and 1 in store.cached_slices(key("a")) and store.bytes_used <= 3 * one


def test_an_embedding_larger_than_the_budget_is_returned_but_not_kept():
    store = EmbeddingStore(max_volumes=None, max_bytes=10)
    value = store.get_or_compute(key("a"), 0, lambda: np.zeros(100, np.uint8))
    assert value.shape == (100,) and store.slice_count == 0 and store.bytes_used == 0


def test_max_volumes_still_limits_whole_volumes():
    store = EmbeddingStore(max_volumes=2)
    for name in "abc":
        for s in range(2):
            store.get_or_compute(key(name), s, lambda: np.zeros(4))
    assert store.cached_slices(key("a")) == set()
    assert store.cached_slices(key("b")) == {0, 1} and store.cached_slices(key("c")) == {0, 1}


# -- on a real service: one budget for every session -------------------------------------------------
def test_lru_eviction_under_a_tiny_budget_then_a_run_recomputes(tight_server):
    from server_helpers import open_session, prompts_doc, run_to_end, two_squares, upload

    with tight_server.client() as c:
        budget = c.get("/info").json()["memory_budget_bytes"]
        # The budget holds fewer slice embeddings than two volumes have (two in float32, five in float16).
        first = open_session(c, upload(c, two_squares(n_slices=3, seed=40))["volume_id"], backbone="litemedsam")
        _, (_, _, meta_a) = run_to_end(c, first["session_id"], prompts=prompts_doc())
        assert meta_a["embeddings_computed"] >= 3  # more when a slice was dropped and needed again
        second = open_session(c, upload(c, two_squares(n_slices=3, seed=41))["volume_id"], backbone="litemedsam")
        _, (_, _, meta_b) = run_to_end(c, second["session_id"], prompts=prompts_doc())
        assert meta_b["embeddings_computed"] >= 3
        memory = c.get("/info").json()["memory"]
        assert 0 < memory["used_bytes"] <= budget and memory["evicted"] > 0  # the oldest embeddings went first
        # The first session's embeddings were dropped: a run that needs them recomputes them and succeeds.
        _, (_, _, meta_a2) = run_to_end(c, first["session_id"], prompts=prompts_doc(box2=(27, 28, 40, 41)))
        assert meta_a2["recomputed"] == [2] and meta_a2["embeddings_computed"] > 0
        assert c.get("/info").json()["memory"]["used_bytes"] <= budget

