"""A device session over TCP after the TLS 1.3 handshake: our record layer
(:class:`~otacore.records.tls13.Tls13RecordLayer`) over a plain ``trio.SocketStream``.

OpenSSL ran the handshake and was freed (:mod:`server.transport.tls_handshake`); what the
session keeps is the suite, one traffic secret, its key and IV and one sequence number per
direction. The AEAD objects (about 2.5 KiB each) are dropped once the session has been quiet
for a while (:class:`~server.transport.tls_idle.IdleSweeper`) and rebuilt from the kept keys
on its next record.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import TypeVar

import trio

from otacore.chunk_framing import seal_window
from otacore.errors import PeerAlertError, RecordError
from otacore.records.tls13 import ApplicationData, Tls13RecordLayer
from otacore.records.tls13_protocol import MAX_CIPHERTEXT
from server.transport.limits import TokenBucket
from server.transport.session import (
    CloseReason,
    DeviceSession,
    SessionClosed,
    SessionHandler,
    logger,
)
from server.transport.session_host import SessionHost
from server.transport.tls_idle import IdleSweeper

_T = TypeVar("_T")

#: Bytes asked of the socket per read: one whole record of the largest size (RFC 8446 5.2).
_READ_SIZE = 5 + MAX_CIPHERTEXT


class TlsSession(DeviceSession):
    """A device session over TLS 1.3; ``receive()`` returns chunks of the plaintext stream
    (at most ``limits.max_message_size`` bytes each, never empty), as the CoAP-over-TCP
    link expects (RFC 8323: it frames messages itself)."""

    __slots__ = (
        "_bucket",
        "_ciphers_held",
        "_last_sealed",
        "_plain",
        "_send_waiters",
        "_sending",
        "_sweeper",
        "_unread",
        "_unsent",
        "layer",
        "stream",
    )

    transport = "tcp"

    def __init__(
        self,
        stream: trio.SocketStream,
        layer: Tls13RecordLayer,
        device_id: str,
        peer: tuple[str, int],
        host: SessionHost,
        *,
        resumed: bool,
        unread: bytes = b"",
        unsent: bytes = b"",
        sweeper: IdleSweeper | None = None,
    ) -> None:
        super().__init__(device_id, peer, host.limits, resumed)
        self.stream = stream
        #: The session's record protection (keys, sequence numbers, alerts, KeyUpdate).
        self.layer = layer
        # Ciphertext that arrived with the handshake's last record, not yet opened.
        self._unread = unread
        # Records sealed before the layer's (the handshake's tickets): the first write's.
        self._unsent = unsent
        # Plaintext opened but not yet returned by receive() (beyond max_message_size).
        self._plain = b""
        # True while the layer holds AEAD objects (derived on the first record).
        self._ciphers_held = False
        # trio time of the session's last send: the ciphers are in use both ways (see
        # quiet_for), while only the device's traffic pushes the idle deadline.
        self._last_sealed = self.started_at
        # Drops the ciphers once the session is quiet (None: they are kept).
        self._sweeper = sweeper
        self._bucket: TokenBucket | None = None
        # Serializes sends from several tasks (records must reach the wire in the order of
        # their sequence numbers); the parking lot exists only once two tasks competed.
        self._sending = False
        self._send_waiters: trio.lowlevel.ParkingLot | None = None

    # --- receiving ---------------------------------------------------------------------

    async def receive(self) -> bytes:
        """Up to ``limits.max_message_size`` bytes of the device's plaintext stream;
        SessionClosed at its end (close_notify: PEER; a broken connection or a record
        error, whose alert goes out as the session closes: TRANSPORT_ERROR).

        Reading slows down to ``limits.bytes_per_second`` (TCP backpressure on the device).
        One coroutine frame waits on the socket itself (an idle session's task holds no
        more frames than it must: memory per session).
        """
        if self.close_reason is not None:
            raise SessionClosed(self.close_reason)
        plain = self._plain
        while not plain:
            if self.layer.alert_received is not None:  # close_notify came with the last data
                raise self._ended(CloseReason.PEER)
            data = self._unread
            if data:
                self._unread = b""
            else:
                sock = self.stream.socket
                try:
                    await trio.lowlevel.wait_readable(sock)
                    data = os.read(sock.fileno(), _READ_SIZE)
                except BlockingIOError:
                    continue
                except (OSError, trio.ClosedResourceError):
                    raise self._ended(CloseReason.TRANSPORT_ERROR) from None
                if not data:
                    # EOF without close_notify (RFC 8446 6.1: a truncated session).
                    raise self._ended(CloseReason.TRANSPORT_ERROR)
            plain = self._open(data)
            if not self._sending:
                # A KeyUpdate answer (RFC 8446 4.6.3), close_notify's reply: out now if no
                # send is under way, else the next send carries it before its own records.
                queued = self.layer.data_to_send()
                if queued:
                    await self._transmit(queued)
        limit = self.limits.max_message_size
        chunk, self._plain = (plain, b"") if len(plain) <= limit else (plain[:limit], plain[limit:])
        self._touch()
        now = trio.current_time()
        if self._bucket is None:
            self._bucket = TokenBucket(
                self.limits.bytes_per_second, self.limits.byte_burst, now - 1.0
            )
        delay = self._bucket.take(len(chunk), now)
        if delay > 0:
            await trio.sleep(delay)
        return chunk

    def quiet_for(self, now: float) -> float:
        """Seconds since the session's last traffic in either direction (its ciphers'
        last use; the idle deadline counts from the device's alone)."""
        return now - max(self._last_traffic, self._last_sealed)

    def _sealed(self) -> None:
        """The server sent: its ciphers are in use (the idle deadline stays: see
        :meth:`DeviceSession._touch`)."""
        self._last_sealed = trio.current_time()

    def rest(self) -> bool:
        """The session is quiet: drop the AEAD objects (rebuilt from the kept keys for the
        next record) and a full rate bucket (a new one starts full). False, keeping
        them, while a send is under way."""
        if self._sending:
            return False
        self.layer.release_ciphers()
        self._ciphers_held = False
        bucket = self._bucket
        if bucket is not None and bucket.tokens(trio.current_time()) >= self.limits.byte_burst:
            self._bucket = None
        return True

    def _using_ciphers(self) -> None:
        """The layer derived (or holds) its AEAD objects: the sweeper drops them later."""
        self._ciphers_held = True
        if self._sweeper is not None:
            self._sweeper.busy(self)

    def _open(self, data: bytes) -> bytes:
        """Open the records completed by ``data``; their plaintext, maybe empty (a partial
        record, a KeyUpdate, close_notify)."""
        try:
            events = self.layer.receive_data(data)
        except PeerAlertError as error:
            logger.debug("device %s ended its TLS session: %s", self.device_id, error)
            raise self._ended(CloseReason.TRANSPORT_ERROR) from None
        except RecordError as error:
            # The layer queued the matching alert; it goes out as the session closes.
            logger.info("TLS session of device %s failed: %s", self.device_id, error,
                        extra={"event": "tls_failed", "device_id": self.device_id,
                               "transport": "tcp", "reason": str(error)})
            raise self._ended(CloseReason.TRANSPORT_ERROR) from None
        if not self._ciphers_held:
            self._using_ciphers()
        if len(events) == 1:
            event = events[0]
            return event.data if isinstance(event, ApplicationData) else b""
        return b"".join(event.data for event in events if isinstance(event, ApplicationData))

    # --- sending -----------------------------------------------------------------------

    async def send(self, data: bytes) -> None:
        """Seal ``data`` and send it. Sends from several tasks are serialized.

        The write is shielded from cancellation (a half-written record would break the
        stream) but bounded by ``limits.send_timeout``: a device that stops reading is
        closed as too slow.
        """
        await self._seal_and_send(self.layer.send_application_data, data)

    async def send_window(self, messages: Sequence[bytes]) -> None:
        """Seal a window of CoAP-over-TCP frames in one batch and send it in one write:
        the frames as one stream, cut into records of at most 2^14 bytes (RFC 8446 5.1)
        and sealed by the chunk framing kernel (:func:`otacore.chunk_framing.seal_window`);
        the bytes on the wire are those :meth:`send` of the joined frames gives. Serialized,
        shielded and bounded as :meth:`send` is."""
        if messages:
            await self._seal_and_send(self._seal_window, messages)

    async def send_reply(self, messages: Sequence[bytes]) -> None:
        """:meth:`send_window` for the reader's answers: when the socket takes the whole
        write at once there is no checkpoint (the reader yields at its next receive
        anyway), so a keep-alive costs one trip through trio's scheduler, not two."""
        if messages:
            await self._seal_and_send(self._seal_window, messages, checkpoint=False)

    def try_send_window(self, messages: Sequence[bytes]) -> bool:
        """:meth:`send_window` for a caller that must not wait (the OTA sender run by the
        reader, issue 14 item 5). False, sealing nothing, when a send is under way or an
        earlier write's rest is held; else the window is sealed and written, and True. What
        the socket's buffer does not take is held (:attr:`holds_unsent`) and goes out
        first with the next send (:meth:`send_unsent` sends it alone): at most one
        window, never a queue."""
        self._check_can_send()
        if self._sending or self._unsent:
            return False
        self._sealed()
        try:
            wire = self._seal_window(messages)
        except RecordError:  # the device closed, or a record error, meanwhile
            closed_by_peer = self.layer.alert_received is not None
            raise self._ended(CloseReason.PEER if closed_by_peer
                              else CloseReason.TRANSPORT_ERROR) from None
        if not self._ciphers_held:
            self._using_ciphers()
        try:
            sent = os.write(self.stream.socket.fileno(), wire)
        except BlockingIOError:
            sent = 0
        except OSError:  # reset, broken pipe, closed
            raise self._ended(CloseReason.TRANSPORT_ERROR) from None
        if sent < len(wire):
            self._unsent = wire[sent:]  # records in sequence order: sent before any other
        return True

    @property
    def holds_unsent(self) -> bool:
        """True while sealed bytes wait for room in the socket's buffer."""
        return bool(self._unsent)

    async def send_unsent(self) -> None:
        """Send the held bytes (see :meth:`try_send_window`), waiting for room; serialized,
        shielded and bounded as :meth:`send` is."""
        self._check_can_send()
        await self._take_send_turn()
        try:
            await self._send_shielded(b"")  # the held bytes go first (see _send_shielded)
        finally:
            self._give_send_turn()
        self._sealed()

    def _seal_window(self, messages: Sequence[bytes]) -> bytes:
        return seal_window(messages, self.layer)

    async def _seal_and_send(self, seal: Callable[[_T], bytes], plaintext: _T, *,
                             checkpoint: bool = True) -> None:
        """``seal(plaintext)`` under the send turn (records leave in the order of their
        sequence numbers), then the write (``checkpoint``: yield after a whole write)."""
        self._check_can_send()
        await self._take_send_turn()
        try:
            self._sealed()
            try:
                wire = seal(plaintext)
            except RecordError:  # the device closed, or a record error, meanwhile
                closed_by_peer = self.layer.alert_received is not None
                reason = CloseReason.PEER if closed_by_peer else CloseReason.TRANSPORT_ERROR
                raise self._ended(reason) from None
            if not self._ciphers_held:
                self._using_ciphers()
            await self._send_shielded(wire, checkpoint=checkpoint)
        finally:
            self._give_send_turn()
        self._sealed()

    async def _take_send_turn(self) -> None:
        while self._sending:
            if self._send_waiters is None:
                self._send_waiters = trio.lowlevel.ParkingLot()
            await self._send_waiters.park()
            self._check_can_send()
        self._sending = True

    def _give_send_turn(self) -> None:
        self._sending = False
        if self._send_waiters is not None:
            self._send_waiters.unpark()

    async def _transmit(self, wire: bytes) -> None:
        """Send bytes the layer queued (taken while no send was under way)."""
        self._sending = True
        try:
            await self._send_shielded(wire)
        finally:
            self._give_send_turn()

    async def _send_shielded(self, wire: bytes, *, checkpoint: bool = True) -> None:
        if self._unsent:  # the tickets, sealed before anything of the layer (RFC 8446 5.3)
            wire = self._unsent + wire
            self._unsent = b""
        # The usual case: the socket buffer takes the whole write at once. Then no cancel
        # scope, deadline or trio socket machinery is needed (they cost more than the write).
        try:
            sent = os.write(self.stream.socket.fileno(), wire)
        except BlockingIOError:
            sent = 0
        except OSError:  # reset, broken pipe, closed (Python ignores SIGPIPE)
            raise self._ended(CloseReason.TRANSPORT_ERROR) from None
        if sent == len(wire):
            if checkpoint:
                await trio.lowlevel.cancel_shielded_checkpoint()  # let other tasks run
            return
        await self._send_rest_shielded(memoryview(wire)[sent:])

    async def _send_rest_shielded(self, wire: bytes | memoryview) -> None:
        """Send what the socket buffer did not take: shielded from cancellation (a
        half-written record would break the stream), bounded by ``limits.send_timeout``."""
        now = trio.current_time()
        outer_deadline = trio.current_effective_deadline()
        if outer_deadline == -math.inf:  # the session is closing: finish this record quickly
            outer_deadline = now + self.limits.farewell_timeout
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = min(now + self.limits.send_timeout, outer_deadline)
            try:
                await self.stream.send_all(wire)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                raise self._ended(CloseReason.TRANSPORT_ERROR) from None
        if scope.cancelled_caught:
            self.close(CloseReason.SEND_TIMEOUT)
            raise SessionClosed(CloseReason.SEND_TIMEOUT)

    # --- closing -----------------------------------------------------------------------

    async def _farewell_then_close(self, handler: SessionHandler) -> None:
        # Shielded: the session's own scope is already cancelled; bounded by the timeout.
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.limits.farewell_timeout
            await self._farewell(handler)
            await self._say_goodbye()
        self._close_now()

    async def _say_goodbye(self) -> None:
        """close_notify (RFC 8446 6.1; after a record error: its alert), then the socket."""
        self._in_farewell = True  # the turn may be taken although the session has closed
        try:
            await self._take_send_turn()
            try:
                wire = self._unsent + self.layer.close()
                self._unsent = b""
                if wire:
                    await self.stream.send_all(wire)
            finally:
                self._give_send_turn()
        except (trio.BrokenResourceError, trio.ClosedResourceError, SessionClosed):
            pass
        finally:
            self._in_farewell = False

    def _close_now(self) -> None:
        """Close the TCP socket without a TLS goodbye (the device may be unreachable)."""
        self.stream.socket.close()
        self.layer.release_ciphers()
        self._ciphers_held = False
        if self._sweeper is not None:
            self._sweeper.forget(self)
