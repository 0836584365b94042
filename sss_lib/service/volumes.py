"""Uploaded volumes, keyed by content: the same volume uploaded twice is one volume.

``volume_id`` is :meth:`sss_lib.volume.Volume.content_hash` (voxels, dtype, shape and geometry),
which is also the volume part of the embedding cache's key, so a re-upload reuses every embedding
already computed for it. Volumes no session uses are dropped after the session TTL.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

from ..errors import InputError
from ..volume import Volume
from . import protocol
from .http_errors import ApiError, not_found

log = logging.getLogger(__name__)


@dataclasses.dataclass
class StoredVolume:
    volume_id: str
    volume: Volume
    last_used: float

    @property
    def shape_kji(self) -> list[int]:
        return [int(v) for v in self.volume.voxels.shape]


class VolumeStore:
    """The uploaded volumes (thread-safe)."""

    def __init__(self) -> None:
        self._volumes: dict[str, StoredVolume] = {}
        self._lock = threading.Lock()

    def add_npz(self, data: bytes) -> tuple[StoredVolume, bool]:
        """Decode an uploaded npz (see :func:`protocol.decode_volume`); ``(volume, reused)``.

        Raises:
            ApiError: 400 ``bad_volume`` when the bytes are not a valid volume.
        """
        try:
            arrays = protocol.decode_volume(data)
            volume = Volume(arrays["voxels"], arrays["spacing"], arrays["origin"], arrays["direction"], "upload")
        except (protocol.ProtocolError, InputError) as e:
            raise ApiError(400, "bad_volume", f"the uploaded volume is unusable: {e}") from None
        volume_id = volume.content_hash()
        with self._lock:
            known = self._volumes.get(volume_id)
            if known is not None:
                known.last_used = time.monotonic()
                return known, True
            stored = self._volumes[volume_id] = StoredVolume(volume_id, volume, time.monotonic())
        log.info("volume %s uploaded: %s %s", volume_id[:12], volume.voxels.dtype, list(volume.voxels.shape))
        return stored, False

    def get(self, volume_id: str) -> StoredVolume:
        """Raises: ApiError 404 ``unknown_volume``."""
        with self._lock:
            stored = self._volumes.get(volume_id)
            if stored is None:
                raise not_found("volume", volume_id, "it was never uploaded or was dropped after the "
                                "session TTL; upload it again (POST /v1/volumes)")
            stored.last_used = time.monotonic()
            return stored

    def drop_unused(self, in_use: set[str], idle_s: float) -> list[str]:
        """Forget volumes not in ``in_use`` and idle longer than ``idle_s``; the dropped ids."""
        now = time.monotonic()
        with self._lock:
            gone = [vid for vid, v in self._volumes.items() if vid not in in_use and now - v.last_used > idle_s]
            for vid in gone:
                del self._volumes[vid]
        return gone

    def __len__(self) -> int:
        with self._lock:
            return len(self._volumes)
