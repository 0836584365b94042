"""The embedding store's disk tier: exact round trips, the RAM budget, the spool's cleanup, and
dropped or spilled slices asked for again; and an engine run that gives the same result with every
embedding on disk."""

from __future__ import annotations

import dataclasses
import gc
import threading
import weakref

import numpy as np
import pytest

from sss_lib.embedding_cache import (
    DEFAULT_RAM_BYTES,
    RAM_BUDGET_ENV,
    EmbeddingKey,
    EmbeddingStore,
    default_ram_bytes,
    nbytes_of,
)

torch = pytest.importorskip("torch")

KEY = EmbeddingKey("volume", "backbone", "pre", 0)
OTHER = EmbeddingKey("volume2", "backbone", "pre", 0)


@dataclasses.dataclass(frozen=True)
class Frozen:
    """Shaped like SAM-2's embedding: a tuple of tensors and a size."""

    features: tuple
    image_size: int


@dataclasses.dataclass
class Geometry:
    """Shaped like LiteMedSAM's embedding: one tensor and its slice geometry."""

    features: object
    slice_shape: tuple[int, int]
    scale: float
    extra: dict


def slice_value(i: int, n: int = 1000) -> Frozen:
    """A float16 embedding of ``2 * n`` bytes whose values depend on ``i``."""
    return Frozen((torch.arange(n, dtype=torch.float16) + i,), 64)


def assert_same(a, b) -> None:
    """Equal structure, types, dtypes, shapes and bytes."""
    assert type(a) is type(b)
    if isinstance(a, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert a.tobytes() == b.tobytes()
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and a.device == b.device
        assert torch.equal(a.view(torch.uint8) if a.dtype == torch.bool else a,
                           b.view(torch.uint8) if b.dtype == torch.bool else b)
    elif dataclasses.is_dataclass(a):
        for f in dataclasses.fields(a):
            assert_same(getattr(a, f.name), getattr(b, f.name))
    elif isinstance(a, dict):
        assert list(a) == list(b)
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            assert_same(x, y)
    else:
        assert a == b


def test_spilled_values_come_back_exactly(tmp_path):
    rng = np.random.default_rng(0)
    values = {
        0: Frozen((torch.randn(1, 4, 8, 8).half(), torch.randn(1, 2, 4, 4).to(torch.bfloat16),
                   torch.randn(1, 3, 2, 2)), 64),
        1: Geometry(torch.randn(1, 8, 4, 4), (48, 40), 0.25, {"ids": torch.arange(5), "flag": torch.tensor(True),
                                                            "scalar": torch.tensor(3.5, dtype=torch.float64)}),
        2: {"a": rng.normal(size=(3, 5)).astype(np.float32),
            "b": [np.arange(7, dtype=np.int16), (np.zeros((0, 3), np.uint8), "text", None)],
            "c": rng.normal(size=(6, 4))[::2, ::-1],  # not contiguous
            "d": np.float64(2.5), "e": np.array(7, dtype=np.int64), "f": np.ones(4, dtype=">f4")},
        3: torch.randn(5, 6).t(),  # a non-contiguous tensor on its own
        4: [torch.empty(0, 3), np.array([True, False])],
        5: (torch.randn(1, 6, 3, 3).to(memory_format=torch.channels_last), np.asfortranarray(np.ones((3, 4)))),
    }
    originals = {s: v for s, v in values.items()}
    store = EmbeddingStore(ram_bytes=0, spill_dir=tmp_path)
    for s, v in values.items():
        store.put(KEY, s, v)
    assert store.spilled == len(values) and store.ram_bytes_used == 0
    assert store.disk_bytes == sum(nbytes_of(v) for v in values.values())
    for s, v in originals.items():
        back = store.get(KEY, s)
        assert back is not v  # read from the spool, not the object put in
        assert_same(back, v)
    assert store.reloaded == len(values)
    # A reloaded array is its own memory, writable, and changing it changes neither the original
    # nor the next read.
    # Memory layouts come back as they were (they choose the kernels that compute on them).
    channels_last, fortran = store.get(KEY, 5)
    assert channels_last.stride() == values[5][0].stride() and fortran.strides == values[5][1].strides
    assert store.get(KEY, 3).stride() == values[3].stride()
    back = store.get(KEY, 2)
    back["a"][0, 0] = 1e6
    assert values[2]["a"][0, 0] != 1e6 and store.get(KEY, 2)["a"][0, 0] != 1e6
    store.close()


def test_values_that_cannot_be_spilled_stay_in_ram(tmp_path):
    store = EmbeddingStore(ram_bytes=0, spill_dir=tmp_path)
    needs_grad = torch.ones(4, requires_grad=True)
    objects = np.array([object(), object()])
    masked = np.ma.masked_array(np.arange(4), mask=[0, 1, 0, 0])
    for s, v in enumerate([needs_grad, objects, masked, "no arrays"]):
        store.put(KEY, s, v)
        assert store.get(KEY, s) is v
    assert store.spilled == 0 and store.disk_bytes == 0


def test_ram_budget_is_respected_and_least_recently_used_spill_first(tmp_path):
    one = nbytes_of(slice_value(0))
    store = EmbeddingStore(max_volumes=None, ram_bytes=3 * one, spill_dir=tmp_path)
    for s in range(10):
        store.put(KEY, s, slice_value(s))
        assert store.ram_bytes_used <= 3 * one
    assert store.ram_bytes_used == 3 * one and store.disk_bytes == 7 * one
    assert store.bytes_used == 10 * one and store.cached_slices(KEY) == set(range(10))
    assert store.spilled == 7
    # Slices 7, 8, 9 are in RAM: served without reading the spool.
    for s in (7, 8, 9):
        assert_same(store.get(KEY, s), slice_value(s))
    assert store.reloaded == 0
    # Slice 0 comes back into RAM and the least recently used in RAM (7) goes to disk; 0 had never
    # changed, so spilling it again costs no write.
    assert_same(store.get(KEY, 0), slice_value(0))
    assert store.reloaded == 1 and store.ram_bytes_used == 3 * one
    spilled = store.spilled
    store.get(KEY, 1), store.get(KEY, 2), store.get(KEY, 3)  # pushes 0 out of RAM again
    assert store.spilled == spilled + 2  # 8 and 9 written; 0 already had its copy on disk
    assert_same(store.get(KEY, 0), slice_value(0))
    for s in range(10):
        assert_same(store.get(KEY, s), slice_value(s))
        assert store.ram_bytes_used <= 3 * one
    store.close()


def test_spool_space_is_reused_and_freed(tmp_path):
    import os

    one = nbytes_of(slice_value(0))
    store = EmbeddingStore(max_volumes=1, ram_bytes=0, spill_dir=tmp_path)
    for s in range(4):
        store.put(KEY, s, slice_value(s))
    size = os.fstat(store._spool._file.fileno()).st_size
    assert size == 4 * one
    for round_ in range(3):  # replacing and discarding slices reuses their space
        for s in range(4):
            store.put(KEY, s, slice_value(s + 10 * round_))
        store.discard(KEY)
        for s in range(4):
            store.put(OTHER, s, slice_value(s))  # max_volumes=1: drops KEY entirely
    assert os.fstat(store._spool._file.fileno()).st_size == size
    assert_same(store.get(OTHER, 3), slice_value(3))
    assert store.get(KEY, 3) is None


def test_spool_file_never_outlives_the_store(tmp_path):
    store = EmbeddingStore(ram_bytes=0, spill_dir=tmp_path / "spool")
    store.put(KEY, 0, slice_value(0))
    spool_file = weakref.ref(store._spool._file)
    assert spool_file() is not None and not spool_file().closed
    # The folder shows no file (POSIX: unlinked when opened; Windows: deleted when closed).
    import sys

    if sys.platform != "win32":
        assert list((tmp_path / "spool").iterdir()) == []
    store.close()
    assert spool_file() is None or spool_file().closed
    assert store.get(KEY, 0) is None and store.bytes_used == 0
    store.put(KEY, 1, slice_value(1))  # a closed store opens a new spool when it spills again
    assert_same(store.get(KEY, 1), slice_value(1))

    dropped = EmbeddingStore(ram_bytes=0, spill_dir=tmp_path / "spool")
    dropped.put(KEY, 0, slice_value(0))
    spool_file = weakref.ref(dropped._spool._file)
    del dropped
    gc.collect()
    assert spool_file() is None or spool_file().closed
    assert list((tmp_path / "spool").iterdir()) == []


def test_dropped_and_spilled_slices_asked_again(tmp_path):
    one = nbytes_of(slice_value(0))
    store = EmbeddingStore(max_volumes=None, max_bytes=4 * one, ram_bytes=2 * one, spill_dir=tmp_path)
    computed = []

    def compute(s):
        def run():
            computed.append(s)
            return slice_value(s)
        return run

    for s in range(6):
        store.get_or_compute(KEY, s, compute(s))
    assert store.evicted == 2 and store.bytes_used == 4 * one  # 0 and 1 dropped: over max_bytes
    assert store.ram_bytes_used == 2 * one and store.disk_bytes == 2 * one  # 2, 3 on disk
    assert_same(store.get_or_compute(KEY, 2, compute(2)), slice_value(2))  # from the spool
    assert_same(store.get_or_compute(KEY, 0, compute(0)), slice_value(0))  # computed again
    assert computed == [0, 1, 2, 3, 4, 5, 0] and store.computed == 7


def test_a_spool_that_cannot_be_written_drops_the_slice(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    store = EmbeddingStore(ram_bytes=0, spill_dir=blocker)
    calls = []
    value = store.get_or_compute(KEY, 0, lambda: calls.append(1) or slice_value(0))
    assert_same(value, slice_value(0))  # the caller still gets its embedding
    assert store.evicted == 1 and store.get(KEY, 0) is None
    assert_same(store.get_or_compute(KEY, 0, lambda: calls.append(1) or slice_value(0)), slice_value(0))
    assert len(calls) == 2
    assert sum("could not write an embedding" in r.getMessage() for r in caplog.records
               if r.levelname == "WARNING") == 1


def test_threads_share_a_spilling_store(tmp_path):
    one = nbytes_of(slice_value(0))
    store = EmbeddingStore(max_volumes=None, ram_bytes=3 * one, spill_dir=tmp_path)
    errors = []

    def worker(offset):
        try:
            for n in range(60):
                s = (n * 7 + offset) % 20
                assert_same(store.get_or_compute(KEY, s, lambda: slice_value(s)), slice_value(s))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert store.ram_bytes_used <= 3 * one and store.spilled > 0 and store.reloaded > 0


def test_default_ram_budget(monkeypatch):
    monkeypatch.delenv(RAM_BUDGET_ENV, raising=False)
    assert default_ram_bytes("cpu") == DEFAULT_RAM_BYTES
    assert default_ram_bytes("cuda") is None
    monkeypatch.setenv(RAM_BUDGET_ENV, "256")
    assert default_ram_bytes("cpu") == 256 * 2**20 and default_ram_bytes("cuda") == 256 * 2**20
    monkeypatch.setenv(RAM_BUDGET_ENV, "off")
    assert default_ram_bytes("cpu") is None
    monkeypatch.setenv(RAM_BUDGET_ENV, "lots")
    with pytest.raises(ValueError, match=RAM_BUDGET_ENV):
        default_ram_bytes("cpu")


def test_engine_result_is_the_same_with_every_embedding_on_disk(sam2_to_span_edge, bright_box_volume, tmp_path,
                                                              monkeypatch):
    from sss_lib.engine import SegmentationSession
    from sss_lib.prompts import ClassPrompts, PromptSet, SlicePrompt
    from sss_lib.volume import SliceAxis

    import sss_lib.engine

    volume = bright_box_volume(6, 48, 3)
    prompts = PromptSet(SliceAxis(2), [ClassPrompts(1, "box", [SlicePrompt(2, box=(14, 12, 33, 29))]),
                                       ClassPrompts(2, "overlap", [SlicePrompt(3, box=(20, 16, 40, 36))])])
    in_ram = SegmentationSession(volume, sam2_to_span_edge, store=EmbeddingStore())
    expected = in_ram.segment(prompts)
    store = EmbeddingStore(ram_bytes=0, spill_dir=tmp_path)
    on_disk = SegmentationSession(volume, sam2_to_span_edge, store=store)
    # The label map composed one slice at a time (as a large CT is) equals the whole-stack one.
    monkeypatch.setattr(sss_lib.engine, "_COMPOSE_VOXELS", 1)
    result = on_disk.segment(prompts)
    assert store.spilled == 6 and store.ram_bytes_used == 0 and store.reloaded >= 6
    for lbl in (1, 2):
        np.testing.assert_array_equal(on_disk.class_logits(lbl), in_ram.class_logits(lbl))
    np.testing.assert_array_equal(result.labels.voxels, expected.labels.voxels)
    assert result.slices_per_class == expected.slices_per_class
    # ... and both are the overlap rule: highest logit wins, background where none is above 0.
    logits = np.stack([in_ram.class_logits(lbl).astype(np.float32) for lbl in (1, 2)])
    rule = np.where(logits.max(axis=0) > 0, logits.argmax(axis=0) + 1, 0)
    np.testing.assert_array_equal(in_ram.slice_axis.to_stack(result.labels.voxels), rule)
    assert len(np.unique(rule)) == 3  # both classes and background appear

    # The engine's own store gets the default RAM budget on a CPU (or $SSS_EMBEDDING_RAM_MB's).
    monkeypatch.setenv(RAM_BUDGET_ENV, "1")
    assert SegmentationSession(volume, sam2_to_span_edge).store.ram_bytes == 2**20


def test_half_embeddings_keep_float32_beyond_float16_range():
    from sss_lib.backbones.sam2_backbone import Sam2Embedding, _to_half

    small = Sam2Embedding((torch.randn(1, 4, 8, 8), torch.randn(1, 2, 4, 4).to(torch.bfloat16)), 64)
    half = _to_half(small)
    assert half.features[0].dtype == torch.float16 and torch.equal(half.features[0], small.features[0].half())
    assert half.features[1] is small.features[1]  # only float32 is converted
    for big in (70000.0, -70000.0):
        f = torch.zeros(1, 4, 8, 8)
        f[0, 1, 2, 3] = big
        emb = Sam2Embedding((torch.randn(1, 2, 4, 4), f), 64)
        assert _to_half(emb) is emb  # one value beyond float16's range keeps the slice float32


def test_bytes_are_counted_without_any_limit():
    store = EmbeddingStore()
    for s in range(3):
        store.put(KEY, s, slice_value(s))
    assert store.bytes_used == 3 * nbytes_of(slice_value(0)) and store.ram_bytes_used == 0
