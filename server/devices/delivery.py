"""What the OTA engine delivers: its settings, the modules it plans to send, and the file that
travels for one (the image, a delta patch or a zstd frame). The delivery policy itself (and
the record of a delivery whose boot result is still to come) is the sans-IO planner's,
:mod:`otacore.transfer.planner`. Shared by :mod:`server.devices.ota` (the engine) and
:mod:`server.devices.updater` (one session's updates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from otacore.delta import NEWEST_VERSION
from otacore.delta_codec import CODEC_CHOICES
from otacore.delta_maker import DEFAULT_WORKERS, MAKEABLE_VERSIONS, MAX_WORKERS
from otacore.delta_strategy import DEFAULT_EFFORT, MAX_EFFORT
from otacore.errors import ValidationError
from otacore.module import ModuleInfo
from otacore.transfer import RetransmitPolicy
from otacore.transfer.messages import MAX_CHUNK_SIZE, MAX_WINDOW, MIN_CHUNK_SIZE
from otacore.transfer.planner import (  # noqa: F401 - Delivery is re-exported
    Delivery,
    DeliveryPolicy,
    DowngradePolicy,
)


@dataclass(frozen=True)
class OtaConfig:
    """How updates are delivered."""

    #: Transfers running at once in one server process; more devices wait their turn.
    max_concurrent_transfers: int = 512
    #: Firmware bytes per chunk over DTLS (a chunk and its headers fit one datagram).
    udp_chunk_size: int = 1024
    #: Firmware bytes per chunk over TLS.
    tcp_chunk_size: int = 8192
    #: Chunks in flight beyond the acknowledged ones (the device may ask for fewer).
    window_limit: int = 64
    #: Seconds a device may take to answer an update offer (UpdateStart).
    offer_timeout: float = 30.0
    #: Persist transfer progress every this many bytes (not per chunk).
    progress_step: int = 32 * 1024
    #: ... and at most once per this many seconds per transfer (the final bytes are
    #: recorded with the "applying" state, not as progress).
    progress_interval: float = 1.0
    #: Prepared files (chunk CRCs) kept for reuse across devices.
    prepared_cache: int = 16
    #: Stored images kept in memory, parsed, for planning (the least recently used go
    #: first; 32 Device OS parts of 656 KB are 21 MB).
    image_cache: int = 32
    #: After a Hello, wait this long for the session's Describe; without one recorded the
    #: engine does not plan (the Describe kicks it when it arrives).
    describe_wait: float = 5.0
    #: In the first session after a delivered image, wait this long for the device to
    #: report how it booted (UPDATE_RESULT_EVENT) before planning again, so an image it
    #: rolled back from is not re-offered.
    result_wait: float = 5.0
    #: Send a delta patch only when it is at most this fraction of the full image.
    delta_max_ratio: float = 0.8
    #: Worker threads computing delta patches at once (CPU bound; bounded so a release to a
    #: large fleet does not starve the event loop's store threads).
    delta_threads: int = 1
    #: Threads one delta patch's making uses (otacore.delta_maker.DEFAULT_WORKERS): its
    #: codec passes overlap each other and the next strategy's making; the patch does not
    #: depend on it. delta_threads x this is the most threads deltas take at once.
    delta_threads_per_patch: int = DEFAULT_WORKERS
    #: Newest delta patch format the server makes (otacore.delta): 5, 4 for a fleet whose
    #: devices' applier reads no version 5 (sparse columns), 3 for one that reads no version
    #: 4 (control entries in columns), 2 for one that reads no version 3 (exact copies,
    #: literal branch conversion).
    delta_format_version: int = NEWEST_VERSION
    #: Strategies (filter sets) the server makes in full for each delta patch, keeping the
    #: smallest (otacore.delta_strategy): make time grows about linearly with it; images
    #: under 128 KiB get more within the same budget; 1 is the family detector's choice alone.
    delta_effort: int = DEFAULT_EFFORT
    #: Payload codec of the delta patches the server makes (otacore.delta_codec): "auto"
    #: (the smaller of zstd and LZMA2, same apply window), "zstd" (for devices whose
    #: applier has no LZMA2 decoder) or "lzma2".
    delta_codec: str = "auto"
    #: Longest a device's reported update result may take to record after its session ends.
    record_timeout: float = 30.0
    #: The transfer's retransmission timers (RFC 6298 style; see otacore.transfer.sender).
    transfer_policy: RetransmitPolicy = field(default_factory=RetransmitPolicy)
    #: Transfers of one module tried per session when the device stops acknowledging
    #: (TIMEOUT) while its session stays up; each retry resumes where the last one stopped.
    transfer_attempts: int = 3
    #: Pause before the first retry (doubling after each).
    retry_pause: float = 2.0
    #: When every attempt timed out while the session lives (keep-alives answered), offer
    #: again in the same session after this long (doubling, up to retry_later_max), rather
    #: than leave the device mid-download until it reconnects.
    retry_later: float = 30.0
    retry_later_max: float = 300.0
    #: Send a full image zstd-compressed (to devices announcing compressed OTA) only when
    #: the frame is at most this fraction of the image.
    compressed_max_ratio: float = 0.95
    #: Which targets older than what a device runs the server authorises
    #: (``ota server --downgrades``); devices refuse any other older application.
    downgrades: DowngradePolicy = DowngradePolicy.TARGETED
    #: Seconds a downgrade authorisation (otacore.downgrade) stays valid: signed afresh for
    #: each offer, so it only has to outlive one session's transfer; shorter bounds how long
    #: a copy of it could be replayed (``ota server --downgrade-lifetime``).
    downgrade_lifetime: float = 3600.0

    def __post_init__(self) -> None:
        for name in ("max_concurrent_transfers", "progress_step", "prepared_cache",
                     "image_cache", "delta_threads", "transfer_attempts"):
            if getattr(self, name) < 1:
                raise ValidationError(f"{name} must be at least 1, not {getattr(self, name)}")
        for name in ("offer_timeout", "progress_interval", "describe_wait", "result_wait",
                     "record_timeout", "retry_pause", "retry_later", "retry_later_max"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValidationError(f"{name} must be a positive number of seconds, not "
                                      f"{value!r}")
        if self.delta_threads > 256:  # threads, each computing a patch
            raise ValidationError(f"delta_threads must be at most 256, not {self.delta_threads}")
        if isinstance(self.delta_effort, bool) or not (
            isinstance(self.delta_effort, int) and 1 <= self.delta_effort <= MAX_EFFORT
        ):
            raise ValidationError(f"delta_effort must be a whole number of strategies from 1 to "
                                  f"{MAX_EFFORT}, not {self.delta_effort!r}")
        if isinstance(self.delta_threads_per_patch, bool) or not (
            isinstance(self.delta_threads_per_patch, int)
            and 1 <= self.delta_threads_per_patch <= MAX_WORKERS
        ):
            raise ValidationError(f"delta_threads_per_patch must be a whole number of threads "
                                  f"from 1 to {MAX_WORKERS}, not "
                                  f"{self.delta_threads_per_patch!r}")
        if isinstance(self.delta_format_version, bool) or (
            self.delta_format_version not in MAKEABLE_VERSIONS
        ):
            raise ValidationError(f"delta_format_version must be one of "
                                  f"{', '.join(map(str, MAKEABLE_VERSIONS))}, not "
                                  f"{self.delta_format_version!r}")
        if self.delta_codec not in CODEC_CHOICES:
            raise ValidationError(f"delta_codec must be one of {', '.join(CODEC_CHOICES)}, "
                                  f"not {self.delta_codec!r}")
        if self.retry_later_max < self.retry_later:
            raise ValidationError(f"retry_later_max ({self.retry_later_max}) must be at least "
                                  f"retry_later ({self.retry_later})")
        for name in ("udp_chunk_size", "tcp_chunk_size"):
            size = getattr(self, name)
            if size % 4 or not MIN_CHUNK_SIZE <= size <= MAX_CHUNK_SIZE:
                raise ValidationError(f"{name} must be a multiple of 4 from {MIN_CHUNK_SIZE} "
                                      f"to {MAX_CHUNK_SIZE} bytes, not {size}")
        if not 1 <= self.window_limit <= MAX_WINDOW:  # the transfer header's limit
            raise ValidationError(f"window_limit must be 1 to {MAX_WINDOW} chunks, not "
                                  f"{self.window_limit}")
        for name in ("delta_max_ratio", "compressed_max_ratio"):
            ratio = getattr(self, name)
            if not 0 < ratio <= 1:
                raise ValidationError(f"{name} must be above 0 and at most 1, not {ratio!r}")
        if not 1.0 <= self.downgrade_lifetime <= 365 * 86400:
            raise ValidationError(
                f"the downgrade authorisation lifetime must be 1 s to 365 days, not "
                f"{self.downgrade_lifetime!r} s"
            )
        object.__setattr__(self, "downgrades", DowngradePolicy.parse(self.downgrades))

    @property
    def delivery_policy(self) -> DeliveryPolicy:
        """The settings the delivery planner (otacore.transfer.planner) applies."""
        return DeliveryPolicy(
            transfer_attempts=self.transfer_attempts, retry_pause=self.retry_pause,
            retry_later=self.retry_later, retry_later_max=self.retry_later_max,
            tcp_chunk_size=self.tcp_chunk_size, udp_chunk_size=self.udp_chunk_size,
            downgrades=self.downgrades, progress_interval=self.progress_interval,
        )


@dataclass(frozen=True)
class SentFile:
    """What travels for one module: the image itself, a delta patch, or a zstd frame."""

    #: "full", "delta" or "zstd" (the device_updates / release counters' names).
    transfer: str
    data: bytes
    sha256: str
    delta_base_sha256: str | None = None


@dataclass(frozen=True)
class PlannedModule:
    """One module to deliver."""

    image: bytes
    sha256: str
    info: ModuleInfo
