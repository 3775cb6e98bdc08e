"""What one session does with each request its device sends: Hello, Describe, Event,
Goodbye, ``GET k`` (key rotation statements) and ``/.well-known/core``.

The device's messages, as the CoAP resources that answer them; separate from
:mod:`server.devices.session`, the Trio shell that feeds the link, queues the requests and
sends the answers: its request worker calls :func:`serve_request` for each request in turn.
What a request changes lives on the session's :class:`DeviceSessionHandler` (its Hello,
product, key sequence, Describe), which stays their one owner.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import trio

from otacore.coap import Code, Message
from otacore.errors import OtaError, PayloadSchemaError, ProtocolError
from otacore.messages import (
    Describe,
    Direction,
    Event,
    Goodbye,
    Hello,
    UnknownMessageError,
    from_message,
)
from otacore.platforms import platform_name
from otacore.protocol.ota_wire import (
    UPDATE_RESULT_EVENT,
    hello_answer_payload,
    is_key_request,
    key_page_for,
    key_page_payload,
    parse_key_request,
)
from server.events import device_may_publish
from server.fleet.errors import WrongPlatformError
from server.store.errors import StoreUnavailableError
from server.transport.session import CloseReason

if TYPE_CHECKING:
    from server.devices.session import DeviceSessionHandler

#: Seconds a device is asked to wait before it tries again when the store is unavailable
#: (the Max-Age of its 5.03; the API's 503 says 2 with Retry-After).
STORE_RETRY_AFTER = 2

log = logging.getLogger("ota.devices")

#: RFC 6690 link-format, the Content-Format of /.well-known/core (RFC 7252 12.3: 40).
LINK_FORMAT = 40
WELL_KNOWN_CORE = (
    b'</h>;rt="ota.hello",</d>;rt="ota.describe",</e>;rt="ota.event",'
    b'</g>;rt="ota.goodbye",</k>;rt="ota.keys",</fw>;rt="ota.firmware";ct=42'
)


async def serve_request(handler: DeviceSessionHandler, message: Message) -> None:
    """Answer one request of ``handler``'s device (its request worker calls this for each
    request in turn, in the order they arrived)."""
    path = message.uri_path
    if path == [".well-known", "core"] and message.code == Code.GET:
        handler._respond(message, Code.CONTENT, WELL_KNOWN_CORE, LINK_FORMAT)
        return
    if is_key_request(message):
        _on_key_request(handler, message)
        return
    for route in handler.extra_routes:
        if await route(message):
            return
    try:
        payload = from_message(message, Direction.TO_CLOUD)
    except UnknownMessageError as exc:
        handler._respond(message, Code.NOT_FOUND, str(exc).encode()[:200])
        return
    except (PayloadSchemaError, ProtocolError) as exc:
        handler._respond(message, Code.BAD_REQUEST, str(exc).encode()[:200])
        handler._violation(str(exc))
        return
    try:
        if isinstance(payload, Hello):
            await _on_hello(handler, message, payload)
        elif isinstance(payload, Describe):
            await _on_describe(handler, message, payload)
        elif isinstance(payload, Event):
            await _on_event(handler, message, payload)
        elif isinstance(payload, Goodbye):
            handler._respond(message, Code.CHANGED)
            await handler.flush()
            handler.session.close(CloseReason.PEER)
    except StoreUnavailableError as exc:
        # The database is away for now (a restart, a cut): not the device's fault, so not a
        # refusal. RFC 7252 section 5.9.3.4: 5.03 Service Unavailable, whose Max-Age says
        # after how many seconds to try again (the API's 503 says it with Retry-After).
        handler._respond(message, Code.SERVICE_UNAVAILABLE, str(exc).encode()[:200],
                         max_age=STORE_RETRY_AFTER)
        await handler.flush()
        handler.session.close(CloseReason.STORE_UNAVAILABLE)
    except OtaError as exc:
        # The device was removed from its product (or the store refused it): tell it, end.
        handler._respond(message, Code.FORBIDDEN, str(exc).encode()[:200])
        await handler.flush()
        handler.session.close("refused by the fleet")


async def _on_hello(handler: DeviceSessionHandler, message: Message, hello: Hello) -> None:
    if hello.device_id != handler.device_id:
        # The session is bound to the certificate's device id for its whole life.
        handler._respond(message, Code.FORBIDDEN, b"device id differs from the certificate")
        await handler.flush()
        handler.session.close("impersonation attempt")
        return
    # One store write: the platform is bound to the device's product, not taken from
    # the Hello (a device naming another platform would be offered, and could GET fw/,
    # that platform's Device OS modules); checked in the Hello's own transaction before
    # anything of it is recorded, with what it says of updates and a held reset.
    try:
        view = await handler.plane.fleet.record_device_hello(
            handler.device_id, platform_id=hello.platform_id,
            product_version=hello.product_version or None,
            system_version=hello.system_version or None, ip=ip_of(handler.session.peer),
            session=handler.presence, updates_enabled=hello.updates_enabled,
            reset_pending=hello.reset_pending, bound_platform=True,
        )
    except WrongPlatformError as exc:
        platform = exc.product_platform
        refusal = (f"this device belongs to a {platform_name(platform)} product (platform "
                   f"{platform}); its Hello names platform {hello.platform_id}")
        log.warning("device %s refused: %s", handler.device_id, refusal,
                    extra={"event": "session_refused", "device_id": handler.device_id,
                           "transport": handler.session.transport,
                           "reason": "wrong platform", "platform_id": hello.platform_id})
        handler._respond(message, Code.FORBIDDEN, refusal.encode()[:200])
        await handler.flush()
        handler.session.close("wrong platform")
        return
    handler.product_id = view.product.id
    handler.hello = hello
    log.debug("device %s of product %s says Hello: version %s, Device OS %s",
              handler.device_id, view.product.id, hello.product_version,
              hello.system_version,
              extra={"event": "device_hello", "device_id": handler.device_id,
                     "product_id": view.product.id, "version": hello.product_version,
                     "system_version": hello.system_version,
                     "platform_id": hello.platform_id})
    # Key rotation statements ride on the Hello answer (the ones the device lacks, as
    # many as fit; it asks for the rest with GET k), so they are applied before any offer
    # signed with a new key can arrive (ota_wire, point 5).
    statements = handler.plane.key_statements(view.product.id)
    after = hello.key_sequence or 0
    page = key_page_for(statements, after, handler.statement_budget())
    if hello.key_sequence is None:  # a device that predates paging: the legacy array
        payload = hello_answer_payload(page.statements)
    else:
        payload = key_page_payload(page)
    handler.key_sequence = after + len(page.statements)
    handler._respond(message, Code.CHANGED, payload)
    for hook in handler.on_hello:
        hook(None, None)


def _on_key_request(handler: DeviceSessionHandler, message: Message) -> None:
    """``GET k?after=N``: the next key rotation statements after N (ota_wire point 5)."""
    if handler.product_id is None or handler.hello is None:
        handler._respond(message, Code.FORBIDDEN, b"send Hello before asking for keys")
        return
    try:
        after = parse_key_request(message)
    except PayloadSchemaError as exc:
        handler._respond(message, Code.BAD_REQUEST, str(exc).encode()[:200])
        handler._violation(str(exc))
        return
    statements = handler.plane.key_statements(handler.product_id)
    page = key_page_for(statements, after, handler.statement_budget())
    handler.key_sequence = after + len(page.statements)  # the device says it is at after
    handler._respond(message, Code.CONTENT, key_page_payload(page))


async def _on_describe(handler: DeviceSessionHandler, message: Message,
                       describe: Describe) -> None:
    modules = [
        {"function": m.function, "index": m.index, "version": m.version, "store": m.store,
         "size": m.size, "sha256": m.sha256.hex(),
         "dependencies": [{"function": d.function, "index": d.index, "version": d.version}
                          for d in m.dependencies]}
        for m in describe.modules
    ]
    # The fleet emits "spark/device/describe" when the modules changed.
    read_at = trio.current_time()
    view = await handler.plane.fleet.record_describe(handler.device_id, modules)
    handler.product_id = view.product.id
    handler.described_at = trio.current_time()
    handler.described.set()
    handler._respond(message, Code.CHANGED)
    for hook in handler.on_hello:
        hook(view, read_at)


async def _on_event(handler: DeviceSessionHandler, message: Message, event: Event) -> None:
    refusal = device_may_publish(event.name)
    if refusal is not None:
        # Reserved names are the cloud's (Particle: "particle", "spark"; ours: "ota/"):
        # refused, not published, and the session goes on (an application's mistake is
        # no protocol violation).
        handler._respond(message, Code.FORBIDDEN, refusal.encode()[:200])
        return
    if event.name != UPDATE_RESULT_EVENT:
        handler._respond(message, Code.CHANGED)
        handler.publish(event.name, event.data, event.ttl)
        await handler.plane.on_device_event(handler, event)
        return
    # An update result is acknowledged only once recorded: the device keeps it (in its
    # boot record) until acknowledged, and reports it again in its next session.
    handler.publish(event.name, event.data, event.ttl)
    if await handler.plane.on_device_event(handler, event):
        handler._respond(message, Code.CHANGED)
    else:
        handler._respond(message, Code.SERVICE_UNAVAILABLE, b"not recorded yet: report it again")


def ip_of(peer: Any) -> str | None:
    """The address of a session's peer ((address, port)), None if it has none."""
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return None
