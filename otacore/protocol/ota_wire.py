"""How the firmware update travels over the CoAP link: the one contract both ends follow.

The device protocol (``otacore.messages.ROUTES``) covers hello, describe, events, goodbye and
the server's describe request. On top of it, an update is:

1. **Offer** -- server -> device, ``POST m`` (a request that gets a response): the payload
   is the signed manifest (``otacore.signing.SignedManifest.to_bytes()``) of the *image*
   the device will end up with, plus optional Uri-Query ``delta=<base sha256 hex>`` (the
   file is a patch against that base) or ``enc=zstd`` (the file is the image compressed as
   one zstd frame, ``otacore.zstd_image``; only to devices whose Hello set
   ``compressed_ota``). The
   device answers 2.04 Changed when it will take it; 5.03 Service Unavailable when updates
   are disabled and not forced (the server then marks the update pending); 4.03 Forbidden
   with a one-line reason (``RejectReason`` name, ": ", detail) when the manifest or image
   metadata is refused (signature, platform, dependencies, downgrade...).
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
5. **Key rotation** -- the answer to a Hello carries, when the product's signing keys were
   ever rotated, the product's key rotation statements (``otacore.signing``) as a msgpack
   array of byte strings, in sequence order; the device applies those it has not applied
   yet before anything else, so an offer signed with a new key always finds it trusted.
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
from otacore.errors import PayloadSchemaError
from otacore.transfer import TransferMessage, decode_message, encode_message

PATH_OFFER = "m"
PATH_TRANSFER = "u"
PATH_FIRMWARE = "fw"
DELTA_QUERY = "delta="
ENCODING_QUERY = "enc="
#: The one file encoding an offer may name (besides a delta).
ZSTD_ENCODING = "zstd"

UPDATE_RESULT_EVENT = "ota/device/update/result"

#: Answers to an offer.
OFFER_ACCEPTED = Code.CHANGED
OFFER_UNAVAILABLE = Code.SERVICE_UNAVAILABLE
OFFER_REFUSED = Code.FORBIDDEN

#: Key rotation statements one Hello answer may carry (each well under 256 bytes).
MAX_KEY_STATEMENTS = 64

UPDATE_RESULT_STATUSES = frozenset({"committed", "rolled_back", "failed"})


def offer_request(
    signed_manifest: bytes, delta_base_sha256: bytes | None = None, *, compressed: bool = False
) -> Message:
    """The ``POST m`` request offering an image (for a delta, naming its base; ``compressed``:
    the file will be the image as one zstd frame)."""
    if compressed and delta_base_sha256 is not None:
        raise ValueError("an offer is a delta or a compressed image, not both")
    message = Message(MessageType.CON, Code.POST, payload=signed_manifest)
    message.set_uri_path(PATH_OFFER)
    if delta_base_sha256 is not None:
        message.add_uri_query(DELTA_QUERY + delta_base_sha256.hex())
    if compressed:
        message.add_uri_query(ENCODING_QUERY + ZSTD_ENCODING)
    return message


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


def hello_answer_payload(statements: Sequence[bytes]) -> bytes:
    """The payload of the answer to a Hello: the product's key rotation statements."""
    if not statements:
        return b""
    if len(statements) > MAX_KEY_STATEMENTS:
        raise ValueError(f"at most {MAX_KEY_STATEMENTS} key statements fit a Hello answer")
    return msgpack.packb([bytes(s) for s in statements])


def parse_hello_answer(payload: bytes) -> list[bytes]:
    """Key rotation statements from a Hello answer; PayloadSchemaError when malformed."""
    if not payload:
        return []
    try:
        value = msgpack.unpackb(
            bytes(payload),
            raw=False,
            max_array_len=MAX_KEY_STATEMENTS,
            max_bin_len=1024,
            max_str_len=0,
            max_map_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as exc:
        raise PayloadSchemaError(f"hello answer is not a msgpack array: {exc}") from exc
    if not isinstance(value, list) or not all(isinstance(v, bytes) for v in value):
        raise PayloadSchemaError("hello answer must be an array of key statements (bytes)")
    return value
