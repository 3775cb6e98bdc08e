"""Reading the stored event history (``server.event_history`` writes it): a product's or
one of its devices' events, newest first, paged by id; what the console's device page and
events page show and ``GET .../events/history`` returns.

Every event of the product is shown to its readers, private ones too: reading needs the
``events:get`` scope on the product, the live stream's rule (Particle's private events are
the product's). Anyone else learns nothing: not a member of the product, it looks absent.
"""

from __future__ import annotations

from dataclasses import dataclass

from otacore.errors import ValidationError
from server.fleet.base import FleetBase
from server.fleet.errors import UnknownProductError
from server.fleet.roles import Actor
from server.store.tx_event_history import StoredEvent, read_history

#: The most events one page holds, and the default.
MAX_EVENT_PAGE = 200
EVENT_PAGE = 50
#: The longest name prefix a reader may filter by (the longest name the history holds).
MAX_PREFIX = 200
#: The scope reading needs, as the live stream does.
EVENTS_SCOPE = "events:get"


@dataclass(frozen=True)
class EventHistoryPage:
    """One page of stored events (newest first) and the id to page on from (``before``),
    None on the last page."""

    events: tuple[StoredEvent, ...]
    next_before: int | None


def _page_size(value: object) -> int:
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_EVENT_PAGE:
        raise ValidationError(f"limit must be an integer 1..{MAX_EVENT_PAGE}")
    return value


def _before(value: object) -> int | None:
    if value is None or value == "":
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 18:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise ValidationError("before must be a positive event id (the next_before of the "
                              "previous page)")
    return value


def _prefix(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_PREFIX or not value.isprintable():
        raise ValidationError(f"the event name prefix must be printable text of at most "
                              f"{MAX_PREFIX} characters")
    return value


class EventHistoryService(FleetBase):
    """Read the stored event history."""

    async def event_history(
        self,
        actor: Actor,
        product_ref: int | str,
        *,
        device_id: str | None = None,
        prefix: object = None,
        before: object = None,
        limit: object = EVENT_PAGE,
    ) -> EventHistoryPage:
        """A page of the product's stored events (or of one of its devices when
        ``device_id``), newest first: ids below ``before``, names starting with ``prefix``.
        UnknownProductError unless the actor belongs to the product, PermissionDeniedError
        without ``events:get`` on it, UnknownDeviceError unless the device is the
        product's, ValidationError for a bad page, cursor or prefix."""
        size = _page_size(limit)
        before_id = _before(before)
        name_prefix = _prefix(prefix)

        def work() -> EventHistoryPage:
            with self.store.read() as tx:
                product = self._product(tx, product_ref)
                if not actor.belongs_to(product.id):  # not its product: look absent
                    raise UnknownProductError(
                        f"product {str(product_ref)[:80]!r} not found (give its id or slug)")
                actor.require_scope(EVENTS_SCOPE, product.id, "read events", product.slug)
                device = None if device_id is None else self._device_in(tx, product, device_id)
                rows = read_history(
                    tx.conn, product_id=product.id,
                    device_id=None if device is None else device.id,
                    name_prefix=name_prefix, before_id=before_id, limit=size + 1)
            more = len(rows) > size
            events = tuple(rows[:size])
            return EventHistoryPage(events, events[-1].id if more and events else None)

        return await self._read(work)
