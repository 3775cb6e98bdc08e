"""A CoAP link to one peer, the same API over UDP (RFC 7252) and TCP (RFC 8323).

Sans-IO in the h11/aioquic manner: feed received bytes with :meth:`CoapLink.receive`,
drain what to send with :meth:`CoapLink.take_outgoing` (datagrams for UDP, stream bytes for
TCP), and call :meth:`CoapLink.poll` at :meth:`CoapLink.next_deadline`. Requests we send get
a fresh token; their responses come back as :class:`ResponseReceived` with that token.
Nothing here reads a clock: every call takes ``now``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

from otacore.coap import (
    DEFAULT_MAX_FRAME_SIZE,
    Code,
    Message,
    MessageType,
    TcpFrameReader,
    encode_tcp,
    encode_uint,
)
from otacore.coap_reliability import (
    Acknowledged,
    GaveUp,
    Malformed,
    PingReceived,
    Received,
    Rejected,
    ReliableLayer,
    Transmit,
)
from otacore.errors import ProtocolError

Transport = Literal["tcp", "udp"]

# RFC 8323 section 5.3.1/5.3.2: CSM option numbers.
CSM_MAX_MESSAGE_SIZE = 2
CSM_BLOCK_WISE_TRANSFER = 4
# RFC 8323 section 5.5: Release option Hold-Off (seconds before reconnecting).
RELEASE_HOLD_OFF = 4


@dataclass(frozen=True, slots=True)
class RequestReceived:
    """The peer sent a request; answer it with :meth:`CoapLink.respond`."""

    message: Message


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """The peer answered the request we sent with ``token``."""

    token: bytes
    message: Message


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """Our request with ``token`` will never be answered (reset, or retransmissions ran out)."""

    token: bytes
    reason: str


@dataclass(frozen=True, slots=True)
class PeerPinged:
    """The peer sent a keep-alive (UDP Empty CON, TCP 7.02 Ping); the answer is queued."""


@dataclass(frozen=True, slots=True)
class PeerReleased:
    """The peer is closing the connection (RFC 8323 7.04 Release or 7.05 Abort)."""

    abort: bool


@dataclass(frozen=True, slots=True)
class FrameRejected:
    """A malformed frame; over TCP the stream cannot be resynchronised and must close."""

    error: ProtocolError
    fatal: bool


LinkEvent = (
    RequestReceived | ResponseReceived | RequestFailed | PeerPinged | PeerReleased
    | FrameRejected
)


class CoapLink:
    """Common part of the UDP and TCP links: token allocation and the outbox."""

    transport: Transport

    # One per session, most of them idle (issue 14 item 4): slots, and nothing made before
    # it holds something (the outbox is None while empty).
    __slots__ = ("_awaiting", "_next_token", "_outgoing")

    def __init__(self) -> None:
        self._outgoing: list[bytes] | None = None
        self._next_token = 1
        #: Tokens of our requests awaiting their response (None while there are none: an
        #: empty set costs 216 bytes per idle session).
        self._awaiting: set[bytes] | None = None

    def new_token(self) -> bytes:
        """A token unique on this link (4 bytes, RFC 7252 5.3.1 allows 0-8)."""
        token = self._next_token
        self._next_token = token + 1
        return (token & 0xFFFFFFFF).to_bytes(4, "big")

    def _queue(self, datagram: bytes) -> None:
        """Queue ``datagram`` (or a stream frame) for :meth:`take_outgoing`."""
        outgoing = self._outgoing
        if outgoing is None:
            self._outgoing = [datagram]
        else:
            outgoing.append(datagram)

    def _await(self, token: bytes) -> None:
        """Await a response carrying ``token``."""
        awaiting = self._awaiting
        if awaiting is None:
            self._awaiting = {token}
        else:
            awaiting.add(token)

    def _settle(self, token: bytes) -> bool:
        """Stop awaiting ``token``; True if it was awaited."""
        awaiting = self._awaiting
        if awaiting is None or token not in awaiting:
            return False
        awaiting.discard(token)
        if not awaiting:
            self._awaiting = None
        return True

    def take_outgoing(self) -> list[bytes]:
        """Everything queued for sending since the last call, in order."""
        out = self._outgoing
        if out is None:
            return []
        self._outgoing = None
        return out

    # Overridden by both links.
    def receive(self, data: bytes, now: float) -> list[LinkEvent]:  # pragma: no cover
        raise NotImplementedError

    def request(self, message: Message, now: float, *, reliable: bool = True) -> bytes:
        raise NotImplementedError  # pragma: no cover

    def respond(self, request: Message, response: Message, now: float) -> None:
        raise NotImplementedError  # pragma: no cover

    def notify(self, message: Message, now: float) -> None:
        """Send a request that expects no answer (NON over UDP)."""
        raise NotImplementedError  # pragma: no cover

    def poll(self, now: float) -> list[LinkEvent]:
        """Handle timers due at ``now``."""
        return []

    def next_deadline(self) -> float | None:
        """When :meth:`poll` next has work, or None."""
        return None

    def release(self, hold_off_seconds: int) -> None:
        """Tell the peer we are going away and when to come back (graceful shutdown)."""


class UdpLink(CoapLink):
    """RFC 7252 over DTLS: CON/NON with retransmission and duplicate detection (section 4)."""

    transport: Transport = "udp"

    __slots__ = ("_layer",)

    def __init__(self, reliability: ReliableLayer | None = None) -> None:
        super().__init__()
        # Device OS answers pings with an empty ACK; so do we.
        self._layer = reliability or ReliableLayer(answer_pings_with_ack=True)

    def receive(self, data: bytes, now: float) -> list[LinkEvent]:
        """Process one datagram."""
        return self._translate(self._layer.receive(data, now), now)

    def _translate(self, events: Sequence[object], now: float) -> list[LinkEvent]:
        out: list[LinkEvent] = []
        for event in events:
            if isinstance(event, Transmit):
                self._queue(event.datagram)
            elif isinstance(event, Received):
                message = event.message
                if message.is_request:
                    out.append(RequestReceived(message))
                elif self._settle(message.token):
                    out.append(ResponseReceived(message.token, message))
                    if message.type is MessageType.CON:
                        # A separate response (section 5.2.2) must itself be acknowledged.
                        self._queue(self._layer.respond(message, None, now).datagram)
                elif message.type is MessageType.CON:
                    self._queue(self._layer.reject(message, now).datagram)
            elif isinstance(event, (Rejected, GaveUp)):
                if self._settle(event.token):
                    reason = "reset by peer" if isinstance(event, Rejected) else "no answer"
                    out.append(RequestFailed(event.token, reason))
            elif isinstance(event, Malformed):
                out.append(FrameRejected(event.error, fatal=False))
            elif isinstance(event, PingReceived):
                out.append(PeerPinged())  # the reply is already queued as a Transmit
            elif isinstance(event, Acknowledged):
                continue  # an empty ACK: the response comes separately
            # DuplicateReceived: already answered from the cache, nothing to pass on.
        return out

    def request(self, message: Message, now: float, *, reliable: bool = True) -> bytes:
        """Send a request as CON (reliable) or NON; returns the token its answer will carry."""
        token = message.token or self.new_token()
        msg_type = MessageType.CON if reliable else MessageType.NON
        transmit = self._layer.send(replace(message, type=msg_type, token=token), now)
        self._queue(transmit.datagram)
        self._await(token)
        return token

    def notify(self, message: Message, now: float) -> None:
        """Send a NON that expects no answer (e.g. a firmware chunk)."""
        transmit = self._layer.send(replace(message, type=MessageType.NON), now)
        self._queue(transmit.datagram)

    def respond(self, request: Message, response: Message, now: float) -> None:
        """Answer a request: piggybacked on the ACK of a CON, or as a NON to a NON."""
        if request.type is MessageType.CON:
            self._queue(self._layer.respond(request, response, now).datagram)
        else:
            reply = replace(response, type=MessageType.NON, token=request.token)
            self._queue(self._layer.send(reply, now).datagram)

    def poll(self, now: float) -> list[LinkEvent]:
        """Retransmit or give up on CONs whose timers ran out."""
        return self._translate(self._layer.handle_timer(now), now)

    def next_deadline(self) -> float | None:
        """The next retransmission deadline."""
        return self._layer.next_timer()

    def reserve_message_ids(self, count: int) -> list[int]:
        """Message ids for ``count`` NONs the caller encodes itself (a window of chunks
        framed by ``otacore.chunk_framing``), as :meth:`notify` would give them: they skip
        the ids of CONs awaiting their ACK (RFC 7252 4.4). Such a NON expects no answer,
        so a Reset of it is not reported (nor is one of a chunk sent by :meth:`notify`:
        only requests awaiting a response are)."""
        return self._layer.next_message_ids(count)

    def ping(self, now: float) -> None:
        """Send a CoAP ping (Empty CON, section 4.3) to keep NAT bindings open."""
        transmit = self._layer.send(Message(MessageType.CON, Code.EMPTY), now)
        self._queue(transmit.datagram)


class TcpLink(CoapLink):
    """RFC 8323 over TLS: framed stream, CSM first, Ping/Pong and Release signals."""

    transport: Transport = "tcp"

    __slots__ = ("_broken", "_max_frame_size", "_reader")

    def __init__(self, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> None:
        super().__init__()
        self._reader = TcpFrameReader(max_frame_size)
        self._max_frame_size = max_frame_size
        self._broken = False
        # Section 5.3: "each endpoint MUST send a CSM as its first message".
        csm = Message(MessageType.CON, Code.CSM)
        csm.add_option(CSM_MAX_MESSAGE_SIZE, encode_uint(max_frame_size))
        csm.add_option(CSM_BLOCK_WISE_TRANSFER, b"")
        self._queue(encode_tcp(csm))

    def receive(self, data: bytes, now: float) -> list[LinkEvent]:
        """Process stream bytes; a malformed frame is fatal (the stream cannot resync)."""
        if self._broken:
            return []
        try:
            messages = self._reader.feed(data)
        except ProtocolError as exc:
            self._broken = True
            return [FrameRejected(exc, fatal=True)]
        out: list[LinkEvent] = []
        for message in messages:
            code = message.code
            if code == Code.CSM:
                continue  # peer capabilities: we only send what fits our own limits
            if code == Code.PING:
                # Section 5.4: answer a Ping with a Pong echoing its token.
                self._queue(encode_tcp(Message(MessageType.CON, Code.PONG,
                                                         token=message.token)))
                out.append(PeerPinged())
            elif code == Code.PONG:
                continue
            elif code in (Code.RELEASE, Code.ABORT):
                out.append(PeerReleased(abort=code == Code.ABORT))
            elif message.is_request:
                out.append(RequestReceived(message))
            elif self._settle(message.token):
                out.append(ResponseReceived(message.token, message))
        return out

    def request(self, message: Message, now: float, *, reliable: bool = True) -> bytes:
        """Send a request (TCP is reliable either way); returns its token."""
        token = message.token or self.new_token()
        self._queue(encode_tcp(replace(message, token=token)))
        self._await(token)
        return token

    def notify(self, message: Message, now: float) -> None:
        """Send a request that expects no answer."""
        self._queue(encode_tcp(message))

    def respond(self, request: Message, response: Message, now: float) -> None:
        """Answer a request; the response echoes its token (RFC 8323 3.2)."""
        self._queue(encode_tcp(replace(response, token=request.token)))

    def ping(self, now: float) -> None:
        """Send a 7.02 Ping."""
        self._queue(encode_tcp(Message(MessageType.CON, Code.PING,
                                                 token=self.new_token())))

    def release(self, hold_off_seconds: int) -> None:
        """Send 7.04 Release with Hold-Off (RFC 8323 5.5): come back after that long."""
        message = Message(MessageType.CON, Code.RELEASE)
        message.add_option(RELEASE_HOLD_OFF, encode_uint(hold_off_seconds))
        self._queue(encode_tcp(message))


def make_link(transport: Transport, max_frame_size: int = DEFAULT_MAX_FRAME_SIZE) -> CoapLink:
    """A link for ``transport``."""
    return TcpLink(max_frame_size) if transport == "tcp" else UdpLink()
