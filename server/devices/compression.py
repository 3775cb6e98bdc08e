"""zstd-compressed full images for devices that announce compressed OTA (Hello flag 0x40).

When no delta applies, a device whose Hello set ``compressed_ota`` gets the image as one zstd
frame (:mod:`otacore.zstd_image`) if that is smaller than the image by a margin. Each image is
compressed once, in a worker thread behind a dedicated limiter (level 19 takes ~0.1-0.5 s for
128-656 KB), and kept in a bounded in-memory cache shared by every session of the process;
concurrent requests for the same image wait for the one computation.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass

import trio

from otacore.zstd_image import compress_image
from server.devices.once_cache import OnceCache

log = logging.getLogger("ota.compression")


@dataclass(frozen=True)
class CompressedImage:
    """An image as one zstd frame, and the frame's SHA-256 (what the transfer checks)."""

    image_sha256: str
    frame: bytes
    frame_sha256: str


class CompressedImageCache:
    """Compressed frames per image SHA-256: in memory, else computed once."""

    def __init__(self, *, threads: int = 1, max_ratio: float = 0.95, entries: int = 16) -> None:
        #: Worker threads compressing at once (CPU bound).
        self.limiter = trio.CapacityLimiter(threads)
        #: Send the frame only when it is at most this fraction of the image.
        self.max_ratio = max_ratio
        #: Images this process compressed.
        self.computed = 0
        self._frames: OnceCache[str, CompressedImage] = OnceCache(entries)
        #: (device, image) pairs a device refused compressed: it gets the raw image instead.
        self.refused: set[tuple[str, str]] = set()

    async def frame_for(self, image_sha256: str, image: bytes) -> CompressedImage:
        """The zstd frame of ``image`` (computed once per image)."""

        async def compress() -> CompressedImage:
            # Not cancellable once started: the thread finishes and its result is kept.
            frame = await trio.to_thread.run_sync(compress_image, image, limiter=self.limiter)
            self.computed += 1
            log.info("image %s: %d bytes compressed to %d", image_sha256[:12], len(image),
                     len(frame))
            return CompressedImage(image_sha256, frame, hashlib.sha256(frame).hexdigest())

        return await self._frames.get(image_sha256, compress)

    async def choose(self, device_id: str, image_sha256: str,
                     image: bytes) -> CompressedImage | None:
        """The frame to send this device, or None when the raw image is as good."""
        if (device_id, image_sha256) in self.refused:
            return None
        compressed = await self.frame_for(image_sha256, image)
        if len(compressed.frame) > self.max_ratio * len(image):
            return None  # incompressible (encrypted or already compressed) image
        return compressed
