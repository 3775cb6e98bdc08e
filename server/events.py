"""In-process event bus: Particle-style events fanned out to bounded subscribers.

Publishing never blocks and never queues without bound: each subscriber owns a trio memory
channel of fixed capacity, and a subscriber whose channel is full (it reads slower than
events arrive, e.g. a slow SSE client) is dropped: its channel is closed, it drains what it
already holds and then sees the end of the stream. Memory per subscriber is therefore capped
at ``buffer`` events.

Call :meth:`EventBus.publish` from the trio thread (memory channels are not thread-safe);
code in worker threads returns its events to the caller, which publishes them.

When several server processes share one store, :attr:`EventBus.tap` hands every event
published here to the store relay (``server.relay``), which appends it for the other
processes; events the relay brings in are published with ``relayed=True`` and never tapped,
so nothing echoes back.
"""

from __future__ import annotations

import enum
import itertools
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import trio

from otacore.errors import OtaError
from otacore.protocol.ota_wire import (
    RESET_PENDING_EVENT,
    UPDATE_RESULT_EVENT,
    UPDATES_ENABLED_EVENT,
)

#: ``coreid`` of events the cloud itself emits (Particle uses the same value).
CLOUD_COREID = "particle-internal"
#: ``coreid`` of events published through the REST API.
API_COREID = "api"
DEFAULT_TTL = 60

# Event names (Particle's where Particle has one; see particle-facts.md).
STATUS = "spark/status"  # data "online" / "offline"
FLASH_STATUS = "spark/flash/status"  # data "started " / "success " / "failed "
UPDATES_PENDING = "particle/device/updates/pending"  # data "true" / "false"
UPDATES_FORCED = "particle/device/updates/forced"  # data "true" / "false"
FIRMWARE_CREATED = "particle/product/firmware/created"  # data JSON {version, title, ...}
FIRMWARE_RELEASED = "particle/product/firmware/released"  # data JSON {version, immediate, ...}
FLASH_REQUESTED = "ota/device/flash/requested"  # data "lock" / "binary": push it now
DEVICE_REVOKED = "ota/device/revoked"  # data "true": the device's certificates were revoked
#: A product's signing keys changed (created, rotated, withdrawn); data JSON {product_id,
#: key_id, statements}: every process re-reads its cached keys (server.devices.key_cache).
PRODUCT_KEYS_CHANGED = "ota/product/keys/changed"

#: Event name prefixes only the cloud may publish, compared case-insensitively: Particle
#: reserves "particle" and "spark" ("A device may not publish events beginning with a
#: case-insensitive match for 'particle' or 'spark'", Device OS API, Particle.publish), and
#: this server names its own events "ota/...". Every name above starts with one of them, as
#: do ``spark/device/describe`` (server.fleet.sessions) and ``ota/release/bytes``
#: (server.fleet.deltas).
RESERVED_PREFIXES = ("particle", "spark", "ota/")
#: Reserved names a device may still publish: the system events of the device protocol
#: (otacore.protocol.ota_wire), which the device's session consumes directly, and the
#: emulated device's heartbeat. They reach the bus marked as the device's own.
DEVICE_SYSTEM_EVENTS = frozenset({
    UPDATES_ENABLED_EVENT,  # particle/device/updates/enabled
    RESET_PENDING_EVENT,  # ota/device/reset/pending
    UPDATE_RESULT_EVENT,  # ota/device/update/result
    "ota/device/heartbeat",  # the emulated device's (otacore.device.emulated_api)
})


class EventSource(enum.Enum):
    """Who published an event. Only the cloud's own events (the fleet service, the OTA
    engine) carry meaning for the server's listeners; a device's or an API client's event
    is data for subscribers, whatever its name."""

    CLOUD = "cloud"
    DEVICE = "device"
    API = "api"


def reserved_prefix(name: str) -> str | None:
    """The reserved prefix ``name`` starts with (case-insensitively), or None."""
    folded = name.casefold()
    for prefix in RESERVED_PREFIXES:
        if folded.startswith(prefix):
            return prefix
    return None


def device_may_publish(name: str) -> str | None:
    """None when a device may publish an event called ``name``; else why not (a reason
    for the device's error response)."""
    prefix = reserved_prefix(name)
    if prefix is None or name in DEVICE_SYSTEM_EVENTS:
        return None
    return (f"event name {name!r} is reserved: names starting with "
            f"{' / '.join(repr(p) for p in RESERVED_PREFIXES)} (any case) come from the cloud")


class TooManySubscribersError(OtaError):
    """The bus already serves its maximum number of subscribers."""


def iso_ms(epoch_ms: int) -> str:
    """ISO-8601 UTC with milliseconds and a Z, as Particle writes ``published_at``."""
    moment = datetime.fromtimestamp(epoch_ms / 1000, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{epoch_ms % 1000:03d}Z"


@dataclass(frozen=True)
class Event:
    """One event. ``product_id``/``device_id`` route it; ``coreid`` is what clients see."""

    name: str
    data: str | None
    product_id: int | None = None
    device_id: str | None = None
    coreid: str = CLOUD_COREID
    ttl: int = DEFAULT_TTL
    public: bool = False
    published_at: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    #: Who published it: the server's listeners act on CLOUD events only.
    source: EventSource = EventSource.CLOUD

    @property
    def from_cloud(self) -> bool:
        """True for an event the server itself published (never a device's or a client's)."""
        return self.source is EventSource.CLOUD

    def sse_payload(self) -> dict[str, Any]:
        """The JSON object of the SSE ``data:`` line, in Particle's shape."""
        return {
            "data": self.data,
            "ttl": self.ttl,
            "published_at": iso_ms(self.published_at),
            "coreid": self.coreid,
        }


@dataclass
class Subscription:
    """A subscriber's filter and its receiving channel."""

    id: int
    product_id: int | None
    device_id: str | None
    name_prefix: str
    receive: trio.MemoryReceiveChannel[Event]
    send: trio.MemorySendChannel[Event]
    dropped: bool = False
    #: Only the cloud's own events (see :class:`EventSource`).
    cloud_only: bool = False

    def matches(self, event: Event) -> bool:
        """True when the event passes this subscriber's filter."""
        if self.cloud_only and event.source is not EventSource.CLOUD:
            return False
        if self.product_id is not None and event.product_id != self.product_id:
            return False
        if self.device_id is not None and event.device_id != self.device_id:
            return False
        return event.name.startswith(self.name_prefix)


class EventBus:
    """Fan-out of events to filtered, bounded subscribers (trio thread only)."""

    def __init__(self, *, buffer: int = 256, max_subscribers: int = 10_000) -> None:
        if buffer < 1:
            raise ValueError("a subscriber buffer holds at least one event")
        self.buffer = buffer
        self.max_subscribers = max_subscribers
        self._subscribers: dict[int, Subscription] = {}
        self._ids = itertools.count(1)
        self.published = 0
        self.dropped_subscribers = 0
        #: Called (synchronously, must not block) with every event published here except
        #: relayed ones; None (the single-process server) costs one attribute check.
        self.tap: Callable[[Event], None] | None = None
        #: Called (synchronously, must not block) with every event published here except
        #: relayed ones: the stored history's writer (server.event_history), so that each
        #: event is stored once, by the process where it was published.
        self.recorder: Callable[[Event], None] | None = None

    @property
    def subscriber_count(self) -> int:
        """How many subscribers are attached."""
        return len(self._subscribers)

    def publish(self, event: Event, *, relayed: bool = False) -> int:
        """Deliver ``event`` to every matching subscriber; return how many received it.

        Never blocks: a subscriber whose buffer is full is dropped instead. ``relayed``
        marks an event another process published (it is not handed to :attr:`tap`).
        """
        self.published += 1
        if not relayed:
            if self.tap is not None:
                self.tap(event)
            if self.recorder is not None:
                self.recorder(event)
        delivered = 0
        for sub in list(self._subscribers.values()):
            if not sub.matches(event):
                continue
            try:
                sub.send.send_nowait(event)
            except trio.WouldBlock:
                self._drop(sub)
            except (trio.ClosedResourceError, trio.BrokenResourceError):
                self._subscribers.pop(sub.id, None)
            else:
                delivered += 1
        return delivered

    def _drop(self, sub: Subscription) -> None:
        sub.dropped = True
        self.dropped_subscribers += 1
        self._subscribers.pop(sub.id, None)
        sub.send.close()  # the reader drains its buffer, then sees EndOfChannel

    @contextmanager
    def subscribe(
        self,
        *,
        product_id: int | None = None,
        device_id: str | None = None,
        name_prefix: str = "",
        buffer: int | None = None,
        cloud_only: bool = False,
    ) -> Iterator[Subscription]:
        """Attach a subscriber for the ``with`` block; events arrive on ``.receive``.

        ``cloud_only``: only events the server itself published, never a device's or an
        API client's (every listener that acts on an event name wants this).
        """
        if len(self._subscribers) >= self.max_subscribers:
            raise TooManySubscribersError(
                f"the event bus already serves {self.max_subscribers} subscribers; try later"
            )
        size = self.buffer if buffer is None else buffer
        if size < 1 or math.isinf(size):
            raise ValueError("a subscriber buffer must be a positive, finite number of events")
        send, receive = trio.open_memory_channel[Event](size)
        sub = Subscription(next(self._ids), product_id, device_id, name_prefix, receive, send,
                           cloud_only=cloud_only)
        self._subscribers[sub.id] = sub
        try:
            yield sub
        finally:
            self._subscribers.pop(sub.id, None)
            send.close()
            receive.close()
