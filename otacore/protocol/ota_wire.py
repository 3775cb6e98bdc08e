"""How the firmware update travels over the CoAP link: the one contract both ends follow.

The device protocol (``otacore.messages.ROUTES``) covers hello, describe, events, goodbye and
the server's describe request. On top of it, an update is:

1. **Offer** -- server -> device, ``POST m`` (a request that gets a response): the payload
   is the signed manifest (``otacore.signing.SignedManifest.to_bytes()``) of the *image* the
   device will end up with, followed, when that image is an application older than the one
   the device has run, by a downgrade authorisation for that device
   (``otacore.downgrade.SignedDowngrade.to_bytes()``; see :func:`split_offer`), plus
   optional Uri-Query ``delta=<base sha256 hex>`` (the file is a patch against that base, in
   a format no newer than the Hello's ``delta_format``, or version 4 for a device that named
   none) or ``enc=zstd`` (the file is the image compressed as one zstd frame,
   ``otacore.zstd_image``; only to devices whose Hello set ``compressed_ota``). The device
   answers 2.04 Changed when it will take it; 5.03 Service Unavailable when updates are
   disabled and not forced (the server then marks the update pending); 4.03 Forbidden with a
   one-line reason (``RejectReason`` name, ": ", detail) when the manifest or image metadata
   is refused (signature, platform, dependencies, downgrade...).
2. **Transfer** -- both directions, ``POST u`` sent non-confirmable: the payload is
   ``otacore.transfer.encode_message(msg)``; the transfer protocol has its own windowing,
   acknowledgements and retransmissions (``otacore.transfer``), so CoAP reliability is not
   layered under it. Chunks carry their CRC-32 inside the transfer message.
3. **After Finish** -- the device stages the image (A/B slots) and either resets at once,
   or, when the application holds resets, publishes ``RESET_PENDING_EVENT``. After the reset
   it reconnects with a new Hello/Describe. When the new image passes its self-test (it
   reached the cloud) or was rolled back, the device publishes ``UPDATE_RESULT_EVENT`` with
   a JSON object (see :func:`update_result_payload`).
4. **Availability** -- the device publishes ``UPDATES_ENABLED_EVENT`` ("true"/"false") when
   its application enables or disables updates; the server sends ``UPDATES_PENDING_EVENT``
   and ``UPDATES_FORCED_EVENT`` as server events ("true"/"false").
5. **Key rotation** -- the Hello names the rotation sequence the device's trust store is at
   (``key_sequence``; a device that omits it is taken to be at 0). The answer carries the
   key rotation statements (``otacore.signing``) after it, in sequence order, as many as fit
   one message to that device (:func:`statement_budget`): a msgpack map ``{"statements":
   [bin, ...], "more": bool}``. While ``more`` is true the device asks for the rest with
   ``GET k?after=<its sequence>`` (2.05 Content, the same map), and it applies every
   statement before it sends its Describe, so no offer can arrive before it trusts the key
   that signed it. To a device that sent no ``key_sequence`` (an older one) the answer is
   the legacy msgpack array of the first statements that fit, without ``more``.
   A rotation made while a session lives reaches its device before any offer signed with
   the new key: to a device whose Hello set ``key_push``, the server sends ``POST k``
   (server -> device, CON; RFC 7252 5.8.2: the device's trust store processes it) carrying
   the statements after the sequence the device is known to have reached, in the same map
   and pieces of the same size as the answers above, one request at a time (RFC 7252 4.7,
   NSTART 1). The device applies them in order, saves its trust store, and only then
   answers 2.04 Changed (RFC 7252 5.9.1.4) with ``{"sequence": <its sequence now>}``
   (:func:`key_push_answer`); a statement that does not follow its sequence stops the
   piece there (the answer's sequence says where it is, and the server goes on from it).
   A forged or otherwise refused statement gets 4.03 Forbidden with a one-line diagnostic
   (RFC 7252 5.5.2), and the server offers nothing that needs the statement. Each piece
   stands alone (verified and saved on arrival), rather than one Block1 body (RFC 7959
   2.5), which the device would have to buffer whole before applying any of it. A device
   without ``key_push`` (older firmware) answers 4.04 to ``POST k``; the server then asks
   it to reconnect (its Hello's answer brings it up to date) instead of offering firmware
   it cannot verify.
6. **Stock clients** -- ``GET fw/<sha256 hex>`` with Block2 (RFC 7959) returns any firmware
   the device's product may run, byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgpack

from otacore.coap import Code, Message, MessageType
from otacore.device.availability import (  # noqa: F401 - re-exported: part of the contract
    RESET_PENDING_EVENT,
    UPDATES_ENABLED_EVENT,
    UPDATES_FORCED_EVENT,
    UPDATES_PENDING_EVENT,
)
from otacore.downgrade import SIZE as DOWNGRADE_SIZE
from otacore.errors import PayloadSchemaError
from otacore.signing import SIGNATURE_SIZE, SIGNED_HEADER
from otacore.transfer import TransferMessage, decode_message, encode_message

PATH_OFFER = "m"
PATH_TRANSFER = "u"
PATH_FIRMWARE = "fw"
PATH_KEYS = "k"
DELTA_QUERY = "delta="
AFTER_QUERY = "after="
ENCODING_QUERY = "enc="
#: The one file encoding an offer may name (besides a delta).
ZSTD_ENCODING = "zstd"

UPDATE_RESULT_EVENT = "ota/device/update/result"

#: Answers to an offer.
OFFER_ACCEPTED = Code.CHANGED
OFFER_UNAVAILABLE = Code.SERVICE_UNAVAILABLE
OFFER_REFUSED = Code.FORBIDDEN

#: Key rotation statements one answer may carry (each well under 256 bytes); the message
#: size a device accepts bounds it far lower (see statement_budget).
MAX_KEY_STATEMENTS = 64
#: RFC 7252 4.6: without a known path MTU a CoAP message over UDP should stay within
#: 1152 bytes (1280-byte IPv6 minimum MTU less IP, UDP and DTLS overheads).
UDP_MAX_MESSAGE = 1152
#: Room kept for the CoAP header, an 8-byte token, options and the payload marker
#: (RFC 7252 3, RFC 8323 3.2: a TCP frame's length header is at most 6 bytes).
RESPONSE_OVERHEAD = 40
#: The map around the statements: fixmap, two keys, array header, bool.
_PAGE_OVERHEAD = 24
#: A statement in the page: bin 8 header (2 bytes) plus the statement.
_STATEMENT_OVERHEAD = 2

UPDATE_RESULT_STATUSES = frozenset({"committed", "rolled_back", "failed"})


def offer_request(
    signed_manifest: bytes,
    delta_base_sha256: bytes | None = None,
    *,
    compressed: bool = False,
    authorization: bytes | None = None,
) -> Message:
    """The ``POST m`` request offering an image (for a delta, naming its base; ``compressed``:
    the file will be the image as one zstd frame; ``authorization``: a downgrade
    authorisation for this device, after the manifest)."""
    if compressed and delta_base_sha256 is not None:
        raise ValueError("an offer is a delta or a compressed image, not both")
    payload = bytes(signed_manifest) + (bytes(authorization) if authorization else b"")
    message = Message(MessageType.CON, Code.POST, payload=payload)
    message.set_uri_path(PATH_OFFER)
    if delta_base_sha256 is not None:
        message.add_uri_query(DELTA_QUERY + delta_base_sha256.hex())
    if compressed:
        message.add_uri_query(ENCODING_QUERY + ZSTD_ENCODING)
    return message


def split_offer(payload: bytes) -> tuple[bytes, bytes | None]:
    """(signed manifest, downgrade authorisation or None) of an offer's payload.

    The manifest envelope states its own length (``otacore.signing.SIGNED_HEADER``); what
    follows it, if anything, must be exactly one downgrade authorisation. PayloadSchemaError
    otherwise (the signatures are checked later, by the device's acceptance checks).
    """
    payload = bytes(payload)
    if len(payload) < SIGNED_HEADER.size:
        return payload, None  # too short for a manifest: the manifest parser says why
    (body_length,) = SIGNED_HEADER.unpack_from(payload)[2:]
    end = SIGNED_HEADER.size + body_length + SIGNATURE_SIZE
    if len(payload) <= end:
        return payload, None
    rest = payload[end:]
    if len(rest) != DOWNGRADE_SIZE:
        raise PayloadSchemaError(
            f"offer: {len(rest)} bytes follow the manifest; a downgrade authorisation is "
            f"{DOWNGRADE_SIZE}"
        )
    return payload[:end], rest


def offer_compressed(message: Message) -> bool:
    """True when an offer announces a zstd-compressed image; PayloadSchemaError for an
    encoding this protocol does not know, or one combined with a delta."""
    encodings = [
        q[len(ENCODING_QUERY) :] for q in message.uri_query if q.startswith(ENCODING_QUERY)
    ]
    if not encodings:
        return False
    if encodings != [ZSTD_ENCODING]:
        raise PayloadSchemaError(f"offer: unknown file encoding {', '.join(encodings)!r}")
    if any(q.startswith(DELTA_QUERY) for q in message.uri_query):
        raise PayloadSchemaError("offer: a delta cannot also be a compressed image")
    return True


def offer_delta_base(message: Message) -> bytes | None:
    """The delta base SHA-256 an offer names, or None for a full image."""
    for query in message.uri_query:
        if query.startswith(DELTA_QUERY):
            try:
                base = bytes.fromhex(query[len(DELTA_QUERY) :])
            except ValueError as exc:
                raise PayloadSchemaError(f"offer: bad delta base {query!r}") from exc
            if len(base) != 32:
                raise PayloadSchemaError("offer: the delta base must be a SHA-256 (64 hex)")
            return base
    return None


def transfer_request(message: TransferMessage) -> Message:
    """A transfer protocol message as a non-confirmable ``POST u``."""
    coap = Message(MessageType.NON, Code.POST, payload=encode_message(message))
    coap.set_uri_path(PATH_TRANSFER)
    return coap


def is_transfer(message: Message) -> bool:
    """True for a ``POST u`` carrying a transfer message."""
    return message.code == Code.POST and message.uri_path == [PATH_TRANSFER]


def is_offer(message: Message) -> bool:
    """True for a ``POST m`` offer."""
    return message.code == Code.POST and message.uri_path == [PATH_OFFER]


def parse_transfer(message: Message) -> TransferMessage:
    """Decode the transfer message a ``POST u`` carries (TransferProtocolError if bad)."""
    return decode_message(message.payload)


@dataclass(frozen=True)
class UpdateResult:
    """What a device reports after booting (or rolling back from) a new image."""

    function: int
    index: int
    version: int
    status: str
    detail: str = ""


def update_result_payload(result: UpdateResult) -> str:
    """The event data of ``UPDATE_RESULT_EVENT`` (compact JSON, under 1024 bytes)."""
    return json.dumps(
        {
            "function": result.function,
            "index": result.index,
            "version": result.version,
            "status": result.status,
            "detail": result.detail[:200],
        },
        separators=(",", ":"),
    )


def parse_update_result(data: str) -> UpdateResult:
    """Parse ``UPDATE_RESULT_EVENT`` data; PayloadSchemaError when it is malformed."""
    try:
        obj: Any = json.loads(data)
    except ValueError as exc:
        raise PayloadSchemaError(f"update result is not JSON: {exc}") from exc
    if not isinstance(obj, dict):
        raise PayloadSchemaError("update result must be a JSON object")
    fields = {}
    for name in ("function", "index", "version"):
        value = obj.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= 0xFFFF:
            raise PayloadSchemaError(f"update result: {name} must be an integer 0..65535")
        fields[name] = value
    status = obj.get("status")
    if status not in UPDATE_RESULT_STATUSES:
        raise PayloadSchemaError(
            f"update result: status must be one of {sorted(UPDATE_RESULT_STATUSES)}"
        )
    detail = obj.get("detail", "")
    if not isinstance(detail, str):
        raise PayloadSchemaError("update result: detail must be a string")
    return UpdateResult(fields["function"], fields["index"], fields["version"], status, detail)


@dataclass(frozen=True)
class KeyPage:
    """Key rotation statements in one answer (a Hello's or a ``GET k``'s), in sequence
    order, and whether more follow (ask with :func:`key_request`)."""

    statements: tuple[bytes, ...] = ()
    more: bool = False


def statement_budget(transport: str, max_message_size: int) -> int:
    """Payload bytes one message to a device (an answer, or a key push) may carry: its
    Hello's ``max_message_size``, over UDP at most one unfragmented CoAP message (RFC 7252
    4.6), less the message's own header, token and options."""
    limit = max_message_size if transport == "tcp" else min(max_message_size, UDP_MAX_MESSAGE)
    return limit - RESPONSE_OVERHEAD


def key_page_for(statements: Sequence[bytes], after: int, budget: int) -> KeyPage:
    """The statements after sequence ``after`` (``statements[i]`` has sequence i + 1) that
    fit ``budget`` payload bytes; at least one when any is missing, so a device always
    makes progress (one statement is ~124 bytes, under any message a device can take)."""
    missing = statements[max(after, 0):]
    room = budget - _PAGE_OVERHEAD
    chosen: list[bytes] = []
    for statement in missing[:MAX_KEY_STATEMENTS]:
        cost = len(statement) + _STATEMENT_OVERHEAD
        if chosen and cost > room:
            break
        chosen.append(bytes(statement))
        room -= cost
    return KeyPage(tuple(chosen), more=len(chosen) < len(missing))


def key_page_payload(page: KeyPage) -> bytes:
    """The payload of an answer carrying ``page`` (empty when there is nothing to say)."""
    if not page.statements and not page.more:
        return b""
    packed: bytes = msgpack.packb(
        {"statements": list(page.statements), "more": page.more}, use_bin_type=True
    )
    return packed


def hello_answer_payload(statements: Sequence[bytes]) -> bytes:
    """The legacy answer to a Hello without ``key_sequence``: a msgpack array of the first
    key rotation statements (at most MAX_KEY_STATEMENTS; pass only what fits the device)."""
    if not statements:
        return b""
    if len(statements) > MAX_KEY_STATEMENTS:
        raise ValueError(f"at most {MAX_KEY_STATEMENTS} key statements fit a Hello answer")
    return msgpack.packb([bytes(s) for s in statements])


def parse_hello_answer(payload: bytes) -> KeyPage:
    """Key rotation statements of a Hello (or ``GET k``) answer: the map, or the legacy
    array (no ``more``); PayloadSchemaError when malformed."""
    if not payload:
        return KeyPage()
    try:
        value = msgpack.unpackb(
            bytes(payload),
            raw=False,
            max_array_len=MAX_KEY_STATEMENTS,
            max_bin_len=1024,
            max_str_len=16,
            max_map_len=2,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PayloadSchemaError(f"key statements answer is not valid msgpack: {exc}") from exc
    more: object = False
    if isinstance(value, dict):
        if set(value) != {"statements", "more"}:
            raise PayloadSchemaError(
                "key statements answer must be a map of exactly 'statements' and 'more'"
            )
        value, more = value["statements"], value["more"]
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise PayloadSchemaError("key statements must be an array of byte strings")
    if not isinstance(more, bool):
        raise PayloadSchemaError("key statements answer: 'more' must be a bool")
    return KeyPage(tuple(value), more)


def key_push_request(page: KeyPage) -> Message:
    """The server's ``POST k`` carrying key rotation statements the device lacks (point 5);
    build ``page`` with :func:`key_page_for` from the sequence the device has reached."""
    if not page.statements:
        raise ValueError("a key push carries at least one statement")
    message = Message(MessageType.CON, Code.POST, payload=key_page_payload(page))
    message.set_uri_path(PATH_KEYS)
    return message


def is_key_push(message: Message) -> bool:
    """True for the server's ``POST k`` (key rotation statements for the device)."""
    return message.code == Code.POST and message.uri_path == [PATH_KEYS]


def key_push_answer(sequence: int) -> bytes:
    """The payload of the device's 2.04 to a key push: the sequence its (saved) trust store
    is at now."""
    packed: bytes = msgpack.packb({"sequence": sequence})
    return packed


def parse_key_push_answer(payload: bytes) -> int:
    """The sequence a device's answer to a key push names; PayloadSchemaError when the
    payload is not ``{"sequence": <0..2**64-1>}``."""
    try:
        value = msgpack.unpackb(bytes(payload), raw=False, max_map_len=1, max_str_len=16,
                                max_bin_len=0, max_array_len=0)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PayloadSchemaError(f"key push answer is not valid msgpack: {exc}") from exc
    if not isinstance(value, dict) or set(value) != {"sequence"}:
        raise PayloadSchemaError('key push answer must be a map of exactly "sequence"')
    sequence = value["sequence"]
    if isinstance(sequence, bool) or not isinstance(sequence, int) or not 0 <= sequence < 1 << 64:
        raise PayloadSchemaError("key push answer: sequence must be an integer 0..2**64-1")
    return sequence


def key_request(after: int) -> Message:
    """The device's ``GET k?after=<sequence>``: the key rotation statements after that."""
    message = Message(MessageType.CON, Code.GET)
    message.set_uri_path(PATH_KEYS)
    message.add_uri_query(f"{AFTER_QUERY}{after}")
    return message


def is_key_request(message: Message) -> bool:
    """True for a ``GET k``."""
    return message.code == Code.GET and message.uri_path == [PATH_KEYS]


def parse_key_request(message: Message) -> int:
    """The sequence a ``GET k`` asks to continue after; PayloadSchemaError when absent or
    not a decimal number in 0..2**64-1."""
    values = [q[len(AFTER_QUERY):] for q in message.uri_query if q.startswith(AFTER_QUERY)]
    if len(values) != 1:
        raise PayloadSchemaError("GET k needs exactly one Uri-Query after=<sequence>")
    text = values[0]
    if not (text.isascii() and text.isdigit()) or len(text) > 20 or int(text) >= 1 << 64:
        raise PayloadSchemaError(f"GET k: after={text[:24]!r} is not a sequence number")
    return int(text)
