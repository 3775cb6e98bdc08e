"""Sans-IO CoAP message layer over UDP/DTLS (RFC 7252 section 4), for one peer.

It owns message ids, retransmits Confirmable messages with exponential back-off, matches
ACK/RST to them, drops duplicates and answers duplicate CONs with the cached reply. It never
reads a clock, opens a socket or draws randomness on its own: time arrives as ``now``
(seconds, any monotonic origin) and the random factor comes from an injected source.

Driving it::

    layer = ReliableLayer(rng=random.Random(seed).random)
    sent = layer.send(message, now)              # -> Transmit; put sent.datagram on the wire
    events = layer.receive(datagram, now)        # -> [Received | Acknowledged | Transmit | ...]
    deadline = layer.next_timer()                # -> float | None; sleep until then
    events = layer.handle_timer(now)             # -> [Transmit | GaveUp]

NSTART (section 4.7) is left to the caller: this layer sends whatever it is given.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, replace

from otacore.coap import (
    CoapFormatError,
    Message,
    MessageType,
    UnsupportedVersionError,
    decode_udp,
    encode_udp,
)
from otacore.errors import ProtocolError

_SYSTEM_RANDOM = random.SystemRandom()


class MessageIdExhaustedError(ProtocolError):
    """Every one of the 65536 message ids is waiting for an acknowledgement."""


@dataclass(frozen=True, slots=True)
class TransmissionParameters:
    """RFC 7252 section 4.8 parameters and the derived times of section 4.8.2 (seconds)."""

    ack_timeout: float = 2.0
    ack_random_factor: float = 1.5
    max_retransmit: int = 4
    max_latency: float = 100.0
    processing_delay: float = 2.0

    def __post_init__(self) -> None:
        if self.ack_timeout <= 0:
            raise ValueError(f"ack_timeout must be positive, got {self.ack_timeout}")
        # Section 4.8: ACK_RANDOM_FACTOR MUST NOT be below 1.0.
        if self.ack_random_factor < 1.0:
            raise ValueError(
                f"ack_random_factor must be at least 1.0, got {self.ack_random_factor}"
            )
        if self.max_retransmit < 0:
            raise ValueError(f"max_retransmit must be >= 0, got {self.max_retransmit}")

    @property
    def max_transmit_span(self) -> float:
        """Time from the first to the last transmission of a CON (45 s by default)."""
        return self.ack_timeout * (2**self.max_retransmit - 1) * self.ack_random_factor

    @property
    def max_transmit_wait(self) -> float:
        """Time from the first transmission of a CON until the sender gives up (93 s)."""
        return self.ack_timeout * (2 ** (self.max_retransmit + 1) - 1) * self.ack_random_factor

    @property
    def exchange_lifetime(self) -> float:
        """How long a CON's message id stays in use and a duplicate is recognised (247 s)."""
        return self.max_transmit_span + 2 * self.max_latency + self.processing_delay

    @property
    def non_lifetime(self) -> float:
        """How long a NON's message id stays in use (145 s)."""
        return self.max_transmit_span + self.max_latency


#: Section 4.8's defaults, shared by every layer not given others (one per process, not
#: one per session).
DEFAULT_PARAMETERS = TransmissionParameters()


# --- what the layer hands back ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Transmit:
    """Send ``datagram`` to the peer (a new message, a retransmission or a reply)."""

    datagram: bytes
    message_id: int


@dataclass(frozen=True, slots=True)
class Received:
    """A message for the application: new CON/NON, or the response piggybacked on an ACK."""

    message: Message


@dataclass(frozen=True, slots=True)
class Acknowledged:
    """The peer acknowledged our CON ``message_id``."""

    message_id: int
    token: bytes


@dataclass(frozen=True, slots=True)
class Rejected:
    """The peer answered our CON or recent NON with a Reset (section 4.2/4.3)."""

    message_id: int
    token: bytes


@dataclass(frozen=True, slots=True)
class GaveUp:
    """MAX_RETRANSMIT retransmissions went unacknowledged (section 4.2)."""

    message_id: int
    token: bytes


@dataclass(frozen=True, slots=True)
class PingReceived:
    """The peer sent a CoAP ping (an Empty CON, section 4.3); the reply is already queued."""

    message_id: int


@dataclass(frozen=True, slots=True)
class DuplicateReceived:
    """A CON/NON repeated a message id still in its lifetime; it was not passed on again."""

    message_id: int
    replied: bool


@dataclass(frozen=True, slots=True)
class Malformed:
    """A datagram was dropped because it is not a valid message here."""

    error: CoapFormatError


Event = (
    Transmit
    | Received
    | Acknowledged
    | Rejected
    | GaveUp
    | PingReceived
    | DuplicateReceived
    | Malformed
)


@dataclass(slots=True)
class _Pending:
    """A CON we sent that is waiting for its ACK/RST."""

    datagram: bytes
    token: bytes
    timeout: float
    deadline: float
    retransmissions: int = 0


@dataclass(slots=True)
class _Seen:
    """A received message id: when it stops being a duplicate, and the reply to repeat."""

    expires: float
    reply: bytes | None = None


class ReliableLayer:
    """RFC 7252 section 4 message layer towards one peer (one DTLS session).

    ``rng`` returns floats uniform in [0, 1); it draws the initial timeout between
    ACK_TIMEOUT and ACK_TIMEOUT * ACK_RANDOM_FACTOR (section 4.2) and, unless
    ``first_message_id`` is given, the first message id (section 4.4 asks for a random one).

    One per idle session (issue 14 item 4), so it keeps nothing an idle peer does not need:
    its three tables exist only while they hold an entry (made by the first, dropped when
    the last is acknowledged or expires), and pings are not remembered in the duplicate
    table (see :meth:`_on_ping`).
    """

    __slots__ = ("_last_ping", "_last_ping_expires", "_next_id", "_pending", "_ping_reply",
                 "_rng", "_seen", "_sent_non", "params")  # fmt: skip

    def __init__(
        self,
        *,
        rng: Callable[[], float] = _SYSTEM_RANDOM.random,
        params: TransmissionParameters | None = None,
        first_message_id: int | None = None,
        answer_pings_with_ack: bool = False,
    ) -> None:
        self.params = params or DEFAULT_PARAMETERS
        self._rng = rng
        if first_message_id is None:
            first_message_id = int(rng() * 0x10000) & 0xFFFF
        if not 0 <= first_message_id <= 0xFFFF:
            raise ValueError(f"first_message_id {first_message_id} is outside 0..65535")
        self._next_id = first_message_id
        # Device OS answers a ping with an empty ACK; RFC 7252 4.3 says RST. Either completes
        # the peer's exchange, so the choice is the caller's.
        self._ping_reply = MessageType.ACK if answer_pings_with_ack else MessageType.RST
        #: CONs awaiting their ACK, by message id (None while there are none).
        self._pending: dict[int, _Pending] | None = None
        # The two tables below are kept in expiry order and pruned from the front (each is
        # None while empty). They are OrderedDicts, not dicts: a dict leaves a hole at the
        # front for every entry deleted there, and finding its first live entry steps over
        # all of them until the dict is next resized. Once the 16-bit ids wrap within the
        # NON lifetime (65,536 messages in 145 s), every send deletes the front entry, and
        # a send cost 10-50 us instead of 3 (bench/test_bench_coap.py measures both tables
        # after the wrap).
        self._sent_non: OrderedDict[int, tuple[float, bytes]] | None = None
        self._seen: OrderedDict[int, _Seen] | None = None
        #: The message id of the peer's last ping (-1: none yet) and when it stops being
        #: a duplicate (see _on_ping).
        self._last_ping = -1
        self._last_ping_expires = 0.0

    # -- sending ------------------------------------------------------------------------------

    def next_message_id(self) -> int:
        """A fresh message id, skipping ids of CONs still awaiting their ACK (section 4.4)."""
        pending = self._pending
        if pending is None:
            candidate = self._next_id
            self._next_id = (candidate + 1) & 0xFFFF
            return candidate
        for _ in range(0x10000):
            candidate = self._next_id
            self._next_id = (candidate + 1) & 0xFFFF
            if candidate not in pending:
                return candidate
        raise MessageIdExhaustedError("all 65536 message ids are waiting for acknowledgements")

    def next_message_ids(self, count: int) -> list[int]:
        """``count`` fresh message ids, in order, each as :meth:`next_message_id` gives it:
        for NON messages the caller encodes itself (a window of firmware chunks framed by
        ``otacore.chunk_framing``). Unlike :meth:`send`, the ids are not remembered for a
        Reset: such a message awaits no answer, so a Reset of it reports nothing."""
        if count < 0:
            raise ValueError(f"count must be >= 0, not {count}")
        next_id = self.next_message_id
        return [next_id() for _ in range(count)]

    def send(self, message: Message, now: float) -> Transmit:
        """Send a new CON or NON: assign a message id, encode, and arm retransmission for a CON.

        Replies to the peer's CONs go through :meth:`respond` / :meth:`reject` instead.
        """
        if message.type not in (MessageType.CON, MessageType.NON):
            raise ValueError(f"send() takes CON or NON messages, not {message.type.name}")
        if message.code == 0 and message.type is MessageType.NON:
            raise ValueError("a NON message must carry a request or response (RFC 7252 4.3)")
        message_id = self.next_message_id()
        datagram = encode_udp(replace(message, message_id=message_id))
        if message.type is MessageType.CON:
            # Section 4.2: initial timeout random in [ACK_TIMEOUT, ACK_TIMEOUT * FACTOR].
            spread = self.params.ack_random_factor - 1.0
            timeout = self.params.ack_timeout * (1.0 + self._rng() * spread)
            if self._pending is None:
                self._pending = {}
            self._pending[message_id] = _Pending(datagram, message.token, timeout, now + timeout)
        else:
            self._prune_non(now)
            sent_non = self._sent_non
            if sent_non is None:
                sent_non = self._sent_non = OrderedDict()
            sent_non[message_id] = (now + self.params.non_lifetime, message.token)
            sent_non.move_to_end(message_id)  # a reused id: keep the table in expiry order
        return Transmit(datagram, message_id)

    def _take_pending(self, message_id: int) -> _Pending | None:
        """Stop tracking CON ``message_id``; its record, or None if it was not pending."""
        pending = self._pending
        if pending is None:
            return None
        taken = pending.pop(message_id, None)
        if not pending:
            self._pending = None
        return taken

    def cancel(self, message_id: int) -> bool:
        """Stop retransmitting CON ``message_id`` (e.g. its response came separately)."""
        return self._take_pending(message_id) is not None

    @property
    def outstanding(self) -> int:
        """CONs waiting for an ACK or RST."""
        return len(self._pending) if self._pending is not None else 0

    def respond(self, request: Message, response: Message | None, now: float) -> Transmit:
        """ACK the peer's CON ``request``, piggybacking ``response`` when given (section 5.2.1).

        The ACK echoes the request's message id and token; it is cached so a duplicate of
        the request gets the very same bytes (section 4.5).
        """
        if request.type is not MessageType.CON:
            raise ValueError(f"only a CON is acknowledged, not a {request.type.name}")
        if response is None:
            ack = Message(MessageType.ACK, 0, request.message_id)
        else:
            ack = replace(
                response,
                type=MessageType.ACK,
                message_id=request.message_id,
                token=request.token,  # section 5.3.2: the response echoes the token
            )
        return self._reply(request.message_id, encode_udp(ack), now)

    def reject(self, request: Message, now: float) -> Transmit:
        """Answer the peer's CON or NON with a Reset (sections 4.2, 4.3)."""
        if request.type not in (MessageType.CON, MessageType.NON):
            raise ValueError(f"only a CON or NON is rejected, not a {request.type.name}")
        rst = encode_udp(Message(MessageType.RST, 0, request.message_id))
        return self._reply(request.message_id, rst, now)

    def _reply(self, message_id: int, datagram: bytes, now: float) -> Transmit:
        seen = self._seen.get(message_id) if self._seen is not None else None
        if seen is not None and seen.expires > now:
            seen.reply = datagram
        else:
            self._remember(message_id, now + self.params.exchange_lifetime, datagram)
        return Transmit(datagram, message_id)

    # -- receiving ----------------------------------------------------------------------------

    def receive(self, datagram: bytes, now: float) -> list[Event]:
        """Process one datagram from the peer; return what to send and what happened."""
        self._prune_seen(now)
        try:
            message = decode_udp(datagram)
        except UnsupportedVersionError as exc:
            return [Malformed(exc)]  # section 3: silently ignored
        except CoapFormatError as exc:
            return self._malformed(datagram, exc, now)
        if message.type is MessageType.ACK:
            if message.is_request:
                # Section 4.3 table: an ACK is Empty or carries a response, never a request.
                return [Malformed(CoapFormatError("ACK carries a request code (RFC 7252 4.3)"))]
            return self._on_ack(message)
        if message.type is MessageType.RST:
            if not message.is_empty:
                # Section 4.3 table: a Reset is always an Empty message.
                return [Malformed(CoapFormatError("Reset message is not Empty (RFC 7252 4.3)"))]
            return self._on_rst(message, now)
        return self._on_request_or_response(message, now)

    def _malformed(self, datagram: bytes, exc: CoapFormatError, now: float) -> list[Event]:
        # Section 4.2: a CON with a format error is rejected with a matching RST (if its
        # message id can be read); other malformed messages are silently ignored (4.3).
        if len(datagram) >= 4 and datagram[0] >> 4 == 0x4:  # version 1, type CON
            message_id = datagram[2] << 8 | datagram[3]
            rst = encode_udp(Message(MessageType.RST, 0, message_id))
            return [Malformed(exc), Transmit(rst, message_id)]
        return [Malformed(exc)]

    def _on_ack(self, message: Message) -> list[Event]:
        pending = self._take_pending(message.message_id)
        if pending is None:
            return []  # a late or duplicate ACK: the exchange is already over
        events: list[Event] = [Acknowledged(message.message_id, pending.token)]
        if not message.is_empty:
            events.append(Received(message))  # piggybacked response (section 5.2.1)
        return events

    def _on_rst(self, message: Message, now: float) -> list[Event]:
        pending = self._take_pending(message.message_id)
        if pending is not None:
            return [Rejected(message.message_id, pending.token)]
        table = self._sent_non
        sent_non = table.pop(message.message_id, None) if table is not None else None
        if table is not None and not table:
            self._sent_non = None
        if sent_non is not None and sent_non[0] > now:
            return [Rejected(message.message_id, sent_non[1])]
        return []

    def _on_request_or_response(self, message: Message, now: float) -> list[Event]:
        is_con = message.type is MessageType.CON
        message_id = message.message_id
        seen = self._seen.get(message_id) if self._seen is not None else None
        if seen is not None and seen.expires > now:
            # Section 4.5: repeat the same ACK/RST for a duplicate CON, process it only once.
            if is_con and seen.reply is not None:
                return [
                    DuplicateReceived(message_id, replied=True),
                    Transmit(seen.reply, message_id),
                ]
            return [DuplicateReceived(message_id, replied=False)]
        if message_id == self._last_ping and self._last_ping_expires > now:
            # A repeat of the last ping (or a message reusing its id within its lifetime,
            # section 4.4): the same reply again, processed once (section 4.5).
            return [DuplicateReceived(message_id, replied=is_con),
                    *([Transmit(self._ping_answer(message_id), message_id)] if is_con else [])]
        if message.is_empty:
            if not is_con:
                # Section 4.3: a NON always carries a request or response.
                error = CoapFormatError("empty NON message (RFC 7252 4.3)")
                return [Malformed(error)]
            return self._on_ping(message_id, now)
        lifetime = self.params.exchange_lifetime if is_con else self.params.non_lifetime
        self._remember(message_id, now + lifetime, None)
        return [Received(message)]

    def _ping_answer(self, message_id: int) -> bytes:
        return encode_udp(Message(self._ping_reply, 0, message_id))

    def _on_ping(self, message_id: int, now: float) -> list[Event]:
        # Section 4.3: a ping (an Empty CON) is answered with an Empty ACK or RST. Its reply
        # is a function of its message id, and there is nothing in it to process: a repeat
        # gets the very bytes a cached reply would hold (section 4.5), so pings stay out of
        # the duplicate table (a keep-alive would otherwise keep an entry, and the table,
        # alive per idle session for EXCHANGE_LIFETIME). Only the last ping's id is kept, so
        # that its retransmission is still reported as a duplicate.
        self._last_ping = message_id
        self._last_ping_expires = now + self.params.exchange_lifetime
        return [PingReceived(message_id), Transmit(self._ping_answer(message_id), message_id)]

    # -- timers -------------------------------------------------------------------------------

    def next_timer(self) -> float | None:
        """When :meth:`handle_timer` next has work (a retransmission or give-up), or None."""
        if self._pending is None:
            return None
        return min(pending.deadline for pending in self._pending.values())

    def handle_timer(self, now: float) -> list[Event]:
        """Retransmit or give up on every CON whose timeout has passed at ``now``."""
        events: list[Event] = []
        table = self._pending
        if table is not None:
            expired = [mid for mid, pending in table.items() if pending.deadline <= now]
            for message_id in expired:
                pending = table[message_id]
                if pending.retransmissions >= self.params.max_retransmit:
                    del table[message_id]
                    events.append(GaveUp(message_id, pending.token))
                    continue
                # Section 4.2: retransmit, increment the counter and double the timeout.
                pending.retransmissions += 1
                pending.timeout *= 2
                pending.deadline = now + pending.timeout
                events.append(Transmit(pending.datagram, message_id))
            if not table:
                self._pending = None
        self._prune_seen(now)
        return events

    # -- duplicate table --------------------------------------------------------------------

    def _remember(self, message_id: int, expires: float, reply: bytes | None) -> None:
        seen_table = self._seen
        if seen_table is None:
            seen_table = self._seen = OrderedDict()
        # Moved to the end so the table stays ordered by insertion time for pruning.
        seen_table[message_id] = _Seen(expires, reply)
        seen_table.move_to_end(message_id)

    def _prune_seen(self, now: float) -> None:
        # Entries were inserted in time order; CON and NON lifetimes differ, so an expired
        # entry can hide behind a live one: lookups check expiry too. The table never holds
        # more than 65536 ids; it is dropped once empty (section 4.5: nothing is a
        # duplicate after EXCHANGE_LIFETIME).
        seen_table = self._seen
        if seen_table is None:
            return
        while seen_table:
            message_id, seen = next(iter(seen_table.items()))
            if seen.expires > now:
                return
            del seen_table[message_id]
        self._seen = None

    def _prune_non(self, now: float) -> None:
        sent_non = self._sent_non
        if sent_non is None:
            return
        while sent_non:
            message_id, (expires, _) = next(iter(sent_non.items()))
            if expires > now:
                return
            del sent_non[message_id]
        self._sent_non = None

    @property
    def remembered(self) -> int:
        """Received message ids currently held for duplicate detection (pings aside:
        only the last one is kept, see :meth:`_on_ping`)."""
        return len(self._seen) if self._seen is not None else 0

    @property
    def remembered_non(self) -> int:
        """Sent NON message ids currently held to report a Reset of them (pruned as NONs
        are sent: the expired ones before the first live one)."""
        return len(self._sent_non) if self._sent_non is not None else 0
