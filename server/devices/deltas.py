"""Delta delivery: which devices get a binary patch instead of the full image, and the cache
of patches shared by every device on the same base.

A device runs a known base when its Describe reports the SHA-256 of the installed module with
the target's function and index, and the server stores an image with that SHA-256 (product
firmware or a Device OS module of its platform). The patch from that base to the target is
computed once per (base, target) pair outside the event loop (a worker thread behind a
dedicated limiter, so a release to a large fleet computes few patches at a time), stored, and
reused; concurrent requests for the same pair wait for the one computation. The patch is
sent only when it is smaller than the full image by a margin (``max_ratio``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import trio

from otacore.delta import NEWEST_VERSION, make_patch, read_header
from otacore.delta_codec import codecs_named
from otacore.delta_maker import DEFAULT_WORKERS
from otacore.delta_strategy import DEFAULT_EFFORT
from otacore.errors import DeltaError, OtaError
from server.devices.once_cache import OnceCache

if TYPE_CHECKING:
    from server.fleet import DeviceTarget, Fleet
    from server.fleet.deltas import StoredDelta

log = logging.getLogger("ota.deltas")

#: (base, target, newest format version made, codec set name): the last two are part of the
#: key because an operator may change them while the server runs.
_Pair = tuple[str, str, int, str]


@dataclass(frozen=True)
class DeltaOffer:
    """A patch to send instead of a full image."""

    base_sha256: str
    patch: bytes
    patch_sha256: str


class DeltaCache:
    """Patches per (base, target) pair: in memory, then the store, else computed once."""

    def __init__(
        self,
        fleet: Fleet,
        *,
        threads: int = 1,
        max_ratio: float = 0.8,
        memory_entries: int = 32,
        effort: int = DEFAULT_EFFORT,
        codec: str = "auto",
        workers: int = DEFAULT_WORKERS,
        format_version: int = NEWEST_VERSION,
    ) -> None:
        self.fleet = fleet
        #: Strategies made in full per patch, the smallest kept (otacore.delta_strategy).
        self.effort = effort
        #: Payload codec set by name (otacore.delta_codec.CODEC_CHOICES).
        self.codec = codec
        #: Threads one patch's making uses (otacore.delta_maker.DEFAULT_WORKERS).
        self.workers = workers
        #: Newest patch format made (otacore.delta; 2 for appliers without version 3).
        self.format_version = format_version
        #: Worker threads computing patches at once (make_patch is CPU bound).
        self.limiter = trio.CapacityLimiter(threads)
        #: Send a patch only when it is at most this fraction of the full image.
        self.max_ratio = max_ratio
        #: Patches this process computed (the others came from memory or the store).
        self.computed = 0
        #: Pair and format -> stored patch and its bytes, or None when no patch can be made.
        self._results: OnceCache[_Pair, tuple[StoredDelta, bytes] | None] = OnceCache(
            memory_entries
        )
        #: (device, base, target) offers a device refused: it gets the full image instead.
        self.refused: set[tuple[str, str, str]] = set()

    async def patch_for(
        self,
        base_sha256: str,
        base_image: bytes,
        target_sha256: str,
        target_image: bytes,
        format_version: int | None = None,
    ) -> tuple[StoredDelta, bytes] | None:
        """The patch from base to target (None if the maker refuses the images), made for
        ``format_version`` (None: the cache's ``format_version``; a device's applier may read
        fewer: otacore.messages.Hello.delta_format)."""
        version = self.format_version if format_version is None else format_version
        codec = self.codec

        async def find_or_compute() -> tuple[StoredDelta, bytes] | None:
            found = await self.fleet.find_delta(base_sha256, target_sha256, version)
            if found is None:
                return await self._compute(
                    base_sha256, base_image, target_sha256, target_image, version, codec
                )
            header = read_header(found[1])
            if header.version <= version and header.codec in codecs_named(codec):
                return found
            # Made while the server made a newer format or another codec than it is held to
            # now (an operator changed delta_format_version or delta_codec for devices that
            # cannot read the stored one): made again, and stored in its place.
            return await self._compute(
                base_sha256, base_image, target_sha256, target_image, version, codec,
                replace=True,
            )

        return await self._results.get(
            (base_sha256, target_sha256, version, codec), find_or_compute
        )

    async def _compute(
        self,
        base_sha256: str,
        base_image: bytes,
        target_sha256: str,
        target_image: bytes,
        format_version: int,
        codec: str,
        *,
        replace: bool = False,
    ) -> tuple[StoredDelta, bytes] | None:
        try:
            # Not cancellable once started: the thread finishes and its result is kept.
            patch = await trio.to_thread.run_sync(
                partial(
                    make_patch,
                    base_image,
                    target_image,
                    effort=self.effort,
                    codecs=codecs_named(codec),
                    workers=self.workers,
                    format_version=format_version,
                ),
                limiter=self.limiter,
            )
        except DeltaError as exc:
            log.warning("no delta from %s to %s: %s", base_sha256, target_sha256, exc)
            return None
        self.computed += 1
        stored = await self.fleet.save_delta(
            base_sha256, target_sha256, format_version, patch, len(target_image), replace=replace
        )
        log.info(
            "delta %s -> %s: %d bytes for a %d-byte image (format %d)",
            base_sha256[:12],
            target_sha256[:12],
            len(patch),
            len(target_image),
            format_version,
        )
        return stored, patch

    async def choose(
        self,
        view: DeviceTarget,
        function: int,
        index: int,
        target_sha256: str,
        target_image: bytes,
        format_version: int | None = None,
    ) -> DeltaOffer | None:
        """The patch to offer the device for this module, or None for the full image;
        ``format_version`` is the newest patch format the device may get (None: the
        cache's)."""
        device = view.device
        installed = {
            (int(m["function"]), int(m["index"])): str(m.get("sha256") or "").lower()
            for m in (device.modules or [])
        }
        base_sha256 = installed.get((function, index), "")
        if len(base_sha256) != 64 or base_sha256 == target_sha256:
            return None
        if (device.id, base_sha256, target_sha256) in self.refused:
            return None
        platform = device.platform_id or view.product.platform_id
        try:
            base_image = await self.fleet.blob_for_product(view.product.id, platform, base_sha256)
        except OtaError as exc:
            log.warning("base %s of %s is unreadable: %s", base_sha256, device.id, exc)
            return None
        if base_image is None:  # blobs are verified against their SHA-256 on read
            return None  # the server does not know the device's base
        found = await self.patch_for(
            base_sha256, base_image, target_sha256, target_image, format_version
        )
        if found is None:
            return None
        stored, patch = found
        if stored.patch_size > self.max_ratio * len(target_image):
            return None  # not worth it: the patch saves too little over the full image
        return DeltaOffer(base_sha256, patch, stored.patch_sha256)
