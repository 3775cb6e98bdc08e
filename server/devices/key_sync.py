"""Before an offer, the session's device trusts the key that signs it (ota_wire point 5).

A key rotation (``ota product rotate-key`` / ``withdraw-key``, from any process) may happen
while a device's session lives. The session knows the rotation sequence its device reached
(:attr:`DeviceSessionHandler.key_sequence`: its Hello, the ``GET k`` pages it fetched, the
key pushes it acknowledged). Before each offer, :func:`offer_signing_key` reads the
product's signing key, then its statements (a rotation writes the statements before it makes
the new key current, so they always introduce the key read), and:

* a device whose Hello set ``key_push`` is sent every statement it lacks (``POST k``, a piece
  per message that fits its transport, one at a time), each piece applied and saved by the
  device before its 2.04 names the sequence it reached: withdrawals reach it too, so a
  withdrawn key stops being trusted by the online fleet at its next offer;
* older firmware (no ``key_push``) that does not trust the key is asked to reconnect (its
  session is closed) when a new Hello's answer would bring it further, and is offered
  nothing in this session; its next session continues the update;
* a key withdrawn since it was read (a rotation retired it) is never used: the key is read
  again.

Nothing is offered when the device still lacks the key for another reason (it refused a
statement, or did not answer), except to a device no Hello can bring further (one that
predates paging and has every statement its Hello's answer can carry): that one is offered
as before and refuses what it cannot verify (UNKNOWN_KEY, recorded as the update's
failure).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from otacore.coap import Code
from otacore.errors import PayloadSchemaError
from otacore.protocol.ota_wire import (
    key_page_for,
    key_push_request,
    parse_key_push_answer,
)
from otacore.signing import SigningKey

if TYPE_CHECKING:
    from server.devices.session import DeviceSessionHandler

log = logging.getLogger("ota.engine")

#: Why the session of a device without key push is closed before an offer.
RECONNECT_FOR_KEYS = "reconnect to learn rotated signing keys (its firmware takes no key push)"
#: Reads of the signing key and statements before giving up on this offer, when rotations
#: keep changing them (each push to the device is followed by a new read).
_KEY_READS = 3


async def offer_signing_key(handler: DeviceSessionHandler, product_id: int,
                            timeout: float) -> SigningKey | None:
    """The product key to sign this session's next offer with, once the device trusts it
    (sending it the statements it lacks); None when nothing may be offered now (see the
    module docstring). ``timeout`` bounds each key push's answer (DeviceUnreachableError
    when the device does not answer)."""
    plane = handler.plane
    for _ in range(_KEY_READS):
        # The process's key cache (server.devices.key_cache): key and statements of one
        # read, kept current by the event relay; no store access per device.
        snapshot = await plane.keys.snapshot(product_id)
        key, statements = snapshot.key, snapshot.statements
        if key.key_id not in plane.keys_trusted_at(product_id, len(statements), key):
            # Retired and withdrawn by a rotation since it was read: read it again now.
            await plane.keys.refresh(product_id)
            continue
        hello = handler.hello
        if hello is not None and hello.key_push and handler.key_sequence < len(statements):
            if not await push_key_statements(handler, statements, timeout):
                return None
            continue  # read both again: a rotation may have happened meanwhile
        if key.key_id in plane.keys_trusted_at(product_id, handler.key_sequence, key):
            return key
        # Older firmware: a new Hello's answer carries what it lacks (all of it, paged; or,
        # before paging, the first page only), so a reconnect helps when it brings more.
        reachable = len(statements)
        if hello is not None and hello.key_sequence is None:
            reachable = len(key_page_for(statements, 0, handler.statement_budget()).statements)
        if reachable > handler.key_sequence:
            log.info("device %s lacks key statements %d..%d and takes no key push: asking it "
                     "to reconnect before the offer", handler.device_id,
                     handler.key_sequence + 1, reachable)
            handler.session.close(RECONNECT_FOR_KEYS)
            return None
        return key  # no Hello brings it further: the device judges the offer
    log.warning("product %s: its keys kept changing (rotations) while %s was brought up to "
                "date; nothing offered now, its next check tries again", product_id,
                handler.device_id)
    return None


async def push_key_statements(handler: DeviceSessionHandler, statements: list[bytes],
                              timeout: float) -> bool:
    """Send the device the statements after the sequence it reached (``POST k``, a piece
    per message, one at a time: RFC 7252 4.7 NSTART 1), until it has them all; False when
    it refused one, answered something else, or stopped making progress."""
    budget = handler.statement_budget()
    previous: int | None = None
    while handler.key_sequence < len(statements):
        after = handler.key_sequence
        page = key_page_for(statements, after, budget)
        answer = await handler.request(key_push_request(page), timeout)
        if answer.code != Code.CHANGED:
            detail = bytes(answer.payload).decode(errors="replace")[:200]
            log.warning("device %s refused key statements %d..%d (%d.%02d): %s",
                        handler.device_id, after + 1, after + len(page.statements),
                        answer.code >> 5, answer.code & 0x1F, detail)
            return False
        try:
            reached = parse_key_push_answer(answer.payload)
        except PayloadSchemaError as exc:
            log.warning("device %s: %s", handler.device_id, exc)
            return False
        # The device says where its trust store is: behind what the server believed when
        # its store lost statements (the next piece starts there), never stuck.
        if reached == after or (previous is not None and reached <= previous):
            log.warning("device %s applies no key statement after %d", handler.device_id,
                        reached)
            handler.key_sequence = reached
            return False
        previous = handler.key_sequence = reached
    return True
