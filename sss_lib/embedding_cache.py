"""Per-slice image embeddings, computed once and reused by every re-run.

Keys are :class:`EmbeddingKey`: the volume's content hash, the backbone's cache key (name, input
size, weights hash), the preprocessing and the slice axis. Anything that changes an embedding
changes the key, so a stale embedding can never be served.

The store has two limits, both least-recently-used: ``max_volumes`` keys (whole volumes), and
optionally ``max_bytes`` of embeddings (single slices are dropped, oldest use first). A dropped
embedding is simply computed again when asked for, so a limit never makes a caller fail.

Optionally it also has a **disk tier** (``ram_bytes``): past that many bytes of embeddings in
memory, the least recently used slices are written to an anonymous spool file (:class:`_Spool`)
instead of being kept in RAM, and read back (into fresh arrays, with plain reads, no mmap, so the
page cache is not counted in the process's resident memory) when asked for again. A 512x512x300 CT
holds 2.3 GB of SAM-2 embeddings at 1024 px even in float16; with a RAM budget of 512 MB the rest
costs one 8 MB file read per slice. Only CPU-resident numpy arrays and torch tensors (also inside
dataclasses, dicts, lists and tuples) are spilled; a value holding anything else (a CUDA tensor, a
tensor that requires grad, an object array) stays in RAM.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np

log = logging.getLogger(__name__)

#: Environment variable: the RAM budget of the engine's embedding store in MiB before slices go to
#: the disk tier (``off``: no disk tier); see :func:`default_ram_bytes`.
RAM_BUDGET_ENV = "SSS_EMBEDDING_RAM_MB"
#: Default RAM budget of an engine's own embedding store when its backbone runs on the CPU: 64
#: slices of SAM-2 at 1024 px in float16. Reading a slice back takes milliseconds; decoding it on a
#: CPU takes seconds.
DEFAULT_RAM_BYTES = 512 << 20


@dataclasses.dataclass(frozen=True)
class EmbeddingKey:
    volume_hash: str
    backbone: str
    preprocessing: str
    slice_axis: int


def nbytes_of(value: Any) -> int:
    """Bytes held by the arrays in ``value``: numpy arrays and torch tensors, also inside
    dataclasses, dicts, lists and tuples (other leaves count 0). torch is not imported."""
    if value is None or isinstance(value, (str, bytes, int, float, bool)):
        return 0
    nbytes = getattr(value, "nbytes", None)
    if isinstance(nbytes, int) and hasattr(value, "dtype"):  # numpy array
        return nbytes
    if _is_tensor(value):
        return int(value.element_size()) * int(value.nelement())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return sum(nbytes_of(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, dict):
        return sum(nbytes_of(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes_of(v) for v in value)
    return 0


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "element_size") and hasattr(value, "nelement")


def default_ram_bytes(device_type: str = "cpu") -> int | None:
    """The RAM budget an engine gives its own store: ``$SSS_EMBEDDING_RAM_MB`` MiB when set
    (``off``/``none``: no disk tier), else :data:`DEFAULT_RAM_BYTES` for a CPU backbone and None
    (no disk tier) for one on a GPU, whose embeddings live in device memory.

    Raises:
        ValueError: the variable is neither a number of MiB nor ``off``.
    """
    text = os.environ.get(RAM_BUDGET_ENV, "").strip().lower()
    if text in ("off", "none"):
        return None
    if text:
        try:
            mib = float(text)
        except ValueError:
            raise ValueError(f"${RAM_BUDGET_ENV} must be a number of MiB or 'off', got {text!r}") from None
        if mib < 0:
            raise ValueError(f"${RAM_BUDGET_ENV} must be >= 0, got {text!r}")
        return int(mib * 2**20)
    return DEFAULT_RAM_BYTES if device_type == "cpu" else None


class EmbeddingStore:
    """In-memory store of slice embeddings for the most recent volumes, with an optional disk tier.
    Thread-safe.

    Args:
        max_volumes: how many (volume, backbone, preprocessing) entries to keep (None: no count
            limit); the least recently used is dropped first. Embeddings of one 48-slice volume at
            1024 take about 0.5-1 GB.
        max_bytes: a budget for all embeddings together (in RAM and on disk), counted by
            :func:`nbytes_of` (None: no budget); the least recently used slices are dropped first.
            An embedding larger than the whole budget is returned but not kept.
        ram_bytes: the most bytes of spillable embeddings (see the module docstring) kept in RAM
            (None: no disk tier); past it the least recently used go to the spool file, and come
            back into RAM when asked for. 0 keeps none in RAM.
        spill_dir: the folder of the spool file (default ``<sss_home>/spool``, created on the first
            spill). The file has no name there on POSIX (it is unlinked as soon as it is opened) and
            is deleted on close on Windows, so it never outlives the store or the process.
    """

    def __init__(self, max_volumes: int | None = 2, *, max_bytes: int | None = None,
                 ram_bytes: int | None = None, spill_dir: str | os.PathLike[str] | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        if ram_bytes is not None and ram_bytes < 0:
            raise ValueError(f"ram_bytes must be >= 0, got {ram_bytes}")
        self.max_volumes = max_volumes
        self.max_bytes = max_bytes
        self.ram_bytes = ram_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self._entries: "collections.OrderedDict[EmbeddingKey, dict[int, Any]]" = collections.OrderedDict()
        # Slice-level use order and sizes, for the byte budget.
        self._order: "collections.OrderedDict[tuple[EmbeddingKey, int], int]" = collections.OrderedDict()
        # Spillable slices held in RAM, in use order, and their sizes (for ``ram_bytes``).
        self._in_ram: "collections.OrderedDict[tuple[EmbeddingKey, int], int]" = collections.OrderedDict()
        # Slices with a copy in the spool (a slice read back keeps it, so spilling it again is free).
        self._on_disk: dict[tuple[EmbeddingKey, int], _Spilled] = {}
        self._spool: _Spool | None = None
        self._spill_failed = False
        self._lock = threading.Lock()
        self.bytes_used = 0
        self.ram_bytes_used = 0  # spillable embeddings held in RAM
        self.computed = 0  # number of embeddings computed (not served from the store)
        self.evicted = 0  # number of slice embeddings dropped to respect a limit
        self.spilled = 0  # number of slice embeddings written to the spool
        self.reloaded = 0  # number of slice embeddings read back from the spool

    def get(self, key: EmbeddingKey, slice_index: int) -> Any | None:
        """The stored embedding (marking it used), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            self._entries.move_to_end(key)
            if slice_index not in entry:
                return None
            ks = (key, slice_index)
            self._order.move_to_end(ks)
            value = entry[slice_index]
            if isinstance(value, _Spilled):
                try:
                    value = self._reload(value)
                except OSError as error:
                    log.warning("could not read embedding of slice %d back from the spool (%s); "
                                "computing it again", slice_index, error)
                    self._drop_slice(key, slice_index)
                    self.evicted += 1
                    return None
                self.reloaded += 1
                entry[slice_index] = value
                self._in_ram[ks] = self._order[ks]
                self.ram_bytes_used += self._order[ks]
                self._apply_ram_budget(keep=ks)
            elif ks in self._in_ram:
                self._in_ram.move_to_end(ks)
            return value

    def get_or_compute(self, key: EmbeddingKey, slice_index: int, compute: Callable[[], Any]) -> Any:
        """The embedding of ``slice_index`` under ``key``, computing it with ``compute()`` on a miss."""
        value = self.get(key, slice_index)
        if value is not None:
            return value
        value = compute()
        self.put(key, slice_index, value, computed=True)
        return value

    def put(self, key: EmbeddingKey, slice_index: int, value: Any, *, computed: bool = False) -> None:
        """Store ``value``; ``computed`` counts it in :attr:`computed`. Applies every limit."""
        size = nbytes_of(value)
        spillable = self.ram_bytes is not None and _flatten(value, []) is not None
        with self._lock:
            if computed:
                self.computed += 1
            self._drop_slice(key, slice_index)
            entry = self._entries.setdefault(key, {})
            self._entries.move_to_end(key)
            entry[slice_index] = value
            self._order[(key, slice_index)] = size
            self.bytes_used += size
            if spillable:
                self._in_ram[(key, slice_index)] = size
                self.ram_bytes_used += size
            while self.max_volumes is not None and len(self._entries) > self.max_volumes:
                dropped = next(iter(self._entries))
                for s in list(self._entries[dropped]):
                    self._drop_slice(dropped, s)
                self._entries.pop(dropped, None)
                log.debug("embedding store full: dropped %s", dropped)
            while self.max_bytes is not None and self.bytes_used > self.max_bytes and self._order:
                (old_key, old_slice), _ = next(iter(self._order.items()))
                self._drop_slice(old_key, old_slice)
                self.evicted += 1
                log.debug("embedding budget of %d bytes reached: dropped slice %d of %s",
                          self.max_bytes, old_slice, old_key)
            self._apply_ram_budget()

    def _apply_ram_budget(self, keep: tuple[EmbeddingKey, int] | None = None) -> None:
        """Spill the least recently used slices in RAM until within ``ram_bytes`` (lock held).
        ``keep`` (the slice being returned) is spilled last."""
        if self.ram_bytes is None:
            return
        while self.ram_bytes_used > self.ram_bytes and self._in_ram:
            ks = next(iter(self._in_ram))
            if ks == keep and len(self._in_ram) > 1:
                self._in_ram.move_to_end(ks)
                continue
            self._spill(ks)
            if ks == keep:
                return

    def _spill(self, ks: tuple[EmbeddingKey, int]) -> None:
        """Move one slice from RAM to the spool (lock held); dropped if the write fails."""
        key, slice_index = ks
        size = self._in_ram.pop(ks)
        self.ram_bytes_used -= size
        record = self._on_disk.get(ks)
        if record is None:
            value = self._entries[key][slice_index]
            arrays: list[np.ndarray] = []
            skeleton = _flatten(value, arrays)
            try:
                if self._spool is None:
                    self._spool = _Spool(self.spill_dir)
                record = _Spilled(skeleton, self._spool.write(arrays), size)
            except OSError as error:
                # Once per store: a full or read-only disk would otherwise log every slice.
                (log.debug if self._spill_failed else log.warning)(
                    "could not write an embedding to the spool in %s (%s); dropping it instead (it is "
                    "computed again when needed)", self.spill_dir or "the SSS cache", error)
                self._spill_failed = True
                self._drop_slice(key, slice_index)
                self.evicted += 1
                return
            self._on_disk[ks] = record
            self.spilled += 1
        self._entries[key][slice_index] = record

    def _reload(self, record: "_Spilled") -> Any:
        assert self._spool is not None
        return _unflatten(record.skeleton, self._spool.read(record.extents))

    def _drop_slice(self, key: EmbeddingKey, slice_index: int) -> None:
        """Forget one slice (lock held)."""
        size = self._order.pop((key, slice_index), None)
        if size is None:
            return
        self.bytes_used -= size
        ram = self._in_ram.pop((key, slice_index), None)
        if ram is not None:
            self.ram_bytes_used -= ram
        record = self._on_disk.pop((key, slice_index), None)
        if record is not None and self._spool is not None:
            self._spool.free(record.extents)
        entry = self._entries.get(key)
        if entry is not None:
            entry.pop(slice_index, None)
            if not entry:
                del self._entries[key]

    def cached_slices(self, key: EmbeddingKey) -> set[int]:
        with self._lock:
            return set(self._entries.get(key, {}))

    @property
    def slice_count(self) -> int:
        """Number of slice embeddings held. (Not ``__len__``: callers write ``store or EmbeddingStore()``.)"""
        with self._lock:
            return len(self._order)

    @property
    def disk_bytes(self) -> int:
        """Bytes of embeddings held only in the spool (not in RAM)."""
        with self._lock:
            return sum(size for (key, s), size in self._order.items()
                       if isinstance(self._entries[key][s], _Spilled))

    def discard(self, key: EmbeddingKey) -> None:
        """Forget every embedding under ``key``."""
        with self._lock:
            for s in list(self._entries.get(key, {})):
                self._drop_slice(key, s)
            self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget every embedding (the spool file is emptied)."""
        with self._lock:
            self._entries.clear()
            self._order.clear()
            self._in_ram.clear()
            self._on_disk.clear()
            self.bytes_used = 0
            self.ram_bytes_used = 0
            if self._spool is not None:
                self._spool.close()
                self._spool = None

    def close(self) -> None:
        """Forget every embedding and delete the spool file (also done when the store is collected)."""
        self.clear()


@dataclasses.dataclass(frozen=True)
class _Spilled:
    """A slice in the spool: its structure (arrays replaced by their index), where its arrays are,
    and its size in bytes."""

    skeleton: Any
    extents: list[tuple[int, int]]
    size: int


class _Spool:
    """An anonymous file holding arrays at offsets; freed extents are reused.

    Created with :func:`tempfile.TemporaryFile`: on POSIX it is unlinked at once (its space is
    freed when it is closed, collected, or the process dies), on Windows it is deleted on close.
    Reads and writes are plain unbuffered ``readinto``/``write`` calls on the caller's buffers.
    """

    def __init__(self, folder: Path | None) -> None:
        if folder is None:
            from .weights import sss_home

            folder = sss_home() / "spool"
        folder.mkdir(parents=True, exist_ok=True)
        self._file = tempfile.TemporaryFile(prefix="sss-embeddings-", dir=folder, buffering=0)
        self._end = 0
        self._free: dict[int, list[int]] = {}  # size -> offsets of free extents of that size
        log.debug("embedding spool opened in %s", folder)

    def write(self, arrays: list[np.ndarray]) -> list[tuple[int, int]]:
        """Write contiguous ``arrays``; returns their ``(offset, nbytes)``. All or nothing: on an
        error every extent taken is freed again and the error is raised."""
        extents: list[tuple[int, int]] = []
        try:
            for a in arrays:
                offset = self._take(a.nbytes)
                extents.append((offset, a.nbytes))
                self._file.seek(offset)
                view = memoryview(a).cast("B") if a.nbytes else memoryview(b"")
                while view:
                    n = self._file.write(view)
                    view = view[n:]
        except BaseException:
            self.free(extents)
            raise
        return extents

    def read(self, extents: list[tuple[int, int]]) -> list[np.ndarray]:
        """Fresh uint8 arrays with the bytes at ``extents``."""
        out = []
        for offset, size in extents:
            buf = np.empty(size, dtype=np.uint8)
            view = memoryview(buf)
            self._file.seek(offset)
            while view:
                n = self._file.readinto(view)
                if not n:
                    raise OSError(f"embedding spool ended at offset {offset}: the file was truncated")
                view = view[n:]
            out.append(buf)
        return out

    def _take(self, size: int) -> int:
        offsets = self._free.get(size)
        if offsets:
            return offsets.pop()
        offset = self._end
        self._end += size
        return offset

    def free(self, extents: list[tuple[int, int]]) -> None:
        for offset, size in extents:
            self._free.setdefault(size, []).append(offset)

    def close(self) -> None:
        self._file.close()


# -- flattening values into arrays and back ----------------------------------------------------------
# A skeleton mirrors a value with its arrays replaced by ("np" or "torch", index, dtype, shape as
# written, permutation back to the original axes); containers are ("dc", class, names, children),
# ("dict", items), ("list", children), ("tuple", children); anything else is ("leaf", value), kept.


def _flatten(value: Any, arrays: list[np.ndarray]) -> Any | None:
    """The skeleton of ``value``, appending its arrays (contiguous) to ``arrays``; None when the
    value cannot be spilled (see the module docstring) or holds no array."""
    count = len(arrays)
    skeleton = _flatten_node(value, arrays)
    return skeleton if skeleton is not None and len(arrays) > count else None


def _flatten_node(value: Any, arrays: list[np.ndarray]) -> Any | None:
    if type(value) is np.ndarray:
        if value.dtype.hasobject:
            return None
        order = _axis_order(value.strides)
        dense = value.transpose(order)
        dense = dense if dense.flags.c_contiguous else dense.copy(order="C")  # (ascontiguousarray: 0-d -> 1-d)
        arrays.append(dense.reshape(-1).view(np.uint8))
        return ("np", len(arrays) - 1, value.dtype, dense.shape, _inverse(order))
    if isinstance(value, np.ndarray):  # a subclass (memmap, masked array ...): not ours to copy
        return None
    if _is_tensor(value):
        if value.device.type != "cpu" or value.requires_grad or value.is_sparse or value.is_quantized:
            return None
        import torch

        order = _axis_order(value.stride())
        dense = value.detach().permute(order).contiguous()
        flat = dense.reshape(-1)
        raw = flat.view(torch.uint8) if flat.numel() else torch.empty(0, dtype=torch.uint8)
        arrays.append(raw.numpy())
        return ("torch", len(arrays) - 1, value.dtype, tuple(dense.shape), _inverse(order))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        names = [f.name for f in dataclasses.fields(value)]
        children = [_flatten_node(getattr(value, n), arrays) for n in names]
        return None if None in children else ("dc", type(value), names, children)
    if type(value) is dict:
        items = [(k, _flatten_node(v, arrays)) for k, v in value.items()]
        return None if any(c is None for _, c in items) else ("dict", items)
    if type(value) in (list, tuple):
        children = [_flatten_node(v, arrays) for v in value]
        return None if None in children else (type(value).__name__, children)
    if isinstance(value, (dict, list, tuple)):  # subclasses (namedtuples ...) may hold arrays
        return None if nbytes_of(value) else ("leaf", value)
    return ("leaf", value)


def _axis_order(strides: Any) -> list[int]:
    """Axes from the largest stride to the smallest: the order in which an array's memory is laid
    out. Arrays are written in that order and viewed back through the inverse permutation, so a
    channels-last tensor comes back channels-last (its strides choose the kernels that compute on it,
    and with them the last bits of the results)."""
    return sorted(range(len(strides)), key=lambda d: (-strides[d], d))


def _inverse(order: list[int]) -> tuple[int, ...]:
    inverse = [0] * len(order)
    for position, axis in enumerate(order):
        inverse[axis] = position
    return tuple(inverse)


def _unflatten(skeleton: Any, raw: list[np.ndarray]) -> Any:
    """The value of ``skeleton`` with its arrays made from ``raw`` (uint8 buffers, owned here)."""
    kind = skeleton[0]
    if kind == "np":
        _, i, dtype, shape, inverse = skeleton
        return raw[i].view(dtype).reshape(shape).transpose(inverse)
    if kind == "torch":
        import torch

        _, i, dtype, shape, inverse = skeleton
        if raw[i].size == 0:
            return torch.empty(shape, dtype=dtype).permute(inverse)
        return torch.from_numpy(raw[i]).view(dtype).reshape(shape).permute(inverse)
    if kind == "dc":
        _, cls, names, children = skeleton
        obj = cls.__new__(cls)
        for name, child in zip(names, children):
            # object.__setattr__: frozen dataclasses too; no __init__/__post_init__ re-run.
            object.__setattr__(obj, name, _unflatten(child, raw))
        return obj
    if kind == "dict":
        return {k: _unflatten(c, raw) for k, c in skeleton[1]}
    if kind == "list":
        return [_unflatten(c, raw) for c in skeleton[1]]
    if kind == "tuple":
        return tuple(_unflatten(c, raw) for c in skeleton[1])
    return skeleton[1]
