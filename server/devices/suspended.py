"""What a device session carries over a graceful restart of ``ota server`` (issue 14, item 6).

On a graceful shutdown the UDP endpoint saves each established DTLS session (its record
state, sealed at rest: ``server.transport.udp_saved``) together with the bytes its handler's
``suspend`` gives; the next process restores the session without a handshake and hands those
bytes back (``DtlsSession.restored_state``). For the device plane they are a
:class:`SuspendedSession`: what the device told this session and what the server told it,
so the next process serves the device as if no restart had happened:

* the Hello (the device does not say it again: its DTLS session never ended), hence its
  platform, chunk size, message size and flags;
* the product, and the key rotation sequence the device has reached (statements it was sent);
* whether its Describe was recorded in this session (the updater plans only after it);
* the CoAP message layer's next message id: RFC 7252 4.4 forbids reusing an id within
  EXCHANGE_LIFETIME, and the device's duplicate detection would take a new request with a
  recent id for a retransmission of an old one.

A transfer in flight is not saved: the next process's updater checks the device's target
as after a Hello and offers the image again, and the device resumes the transfer from the
chunks it already holds (``otacore.transfer``: resumable by design).
"""

from __future__ import annotations

from dataclasses import dataclass

import msgpack

from otacore.errors import OtaError, PayloadSchemaError, ProtocolError
from otacore.messages import Hello

#: Format of the saved state; a restored session with another format is closed (the
#: device then handshakes and says Hello again).
FORMAT = 1
#: A state larger than this is refused before it is parsed (a real one is ~200 bytes).
MAX_STATE_BYTES = 2048


class SuspendedStateError(OtaError):
    """Saved session state that cannot be restored (damaged, or from another version)."""


@dataclass(frozen=True, slots=True)
class SuspendedSession:
    """A device session's state between two server processes (see the module docstring)."""

    hello: Hello | None
    product_id: int | None
    key_sequence: int
    described: bool
    next_message_id: int

    def to_bytes(self) -> bytes:
        """The state as saved (msgpack; the endpoint seals it with the session)."""
        return msgpack.packb([
            FORMAT,
            None if self.hello is None else self.hello.to_payload(),
            self.product_id,
            self.key_sequence,
            self.described,
            self.next_message_id,
        ])

    @classmethod
    def from_bytes(cls, data: bytes) -> SuspendedSession:
        """Parse saved state; SuspendedStateError says what is wrong with it."""
        if len(data) > MAX_STATE_BYTES:
            raise SuspendedStateError(f"saved session state of {len(data)} bytes is larger "
                                      f"than {MAX_STATE_BYTES}")
        try:
            fields = msgpack.unpackb(data, use_list=True, strict_map_key=True)
        except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError,
                msgpack.StackError) as exc:
            raise SuspendedStateError(f"saved session state is not msgpack: {exc}") from None
        if not isinstance(fields, list) or not fields or fields[0] != FORMAT:
            found = fields[0] if isinstance(fields, list) and fields else fields
            raise SuspendedStateError(f"saved session state has format {found!r}, "
                                      f"this server reads format {FORMAT}")
        if len(fields) != 6:
            raise SuspendedStateError(f"saved session state has {len(fields)} fields, not 6")
        _, hello_bytes, product_id, key_sequence, described, next_message_id = fields
        if not (product_id is None or _is_int(product_id)) or not _is_int(key_sequence) \
                or key_sequence < 0 or type(described) is not bool \
                or not _is_int(next_message_id) or not 0 <= next_message_id <= 0xFFFF:
            raise SuspendedStateError("saved session state has a field of the wrong type "
                                      "or out of range")
        hello: Hello | None = None
        if hello_bytes is not None:
            if not isinstance(hello_bytes, bytes):
                raise SuspendedStateError("saved session state's Hello is not bytes")
            try:
                hello = Hello.from_payload(hello_bytes)
            except (PayloadSchemaError, ProtocolError) as exc:
                raise SuspendedStateError(f"saved session state's Hello: {exc}") from None
        return cls(hello, product_id, key_sequence, described, next_message_id)


def _is_int(value: object) -> bool:
    return type(value) is int
