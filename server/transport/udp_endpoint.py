"""The server's UDP endpoint: one socket, one reader task, DTLS 1.2 peers by address.

The reader task reads every datagram and hands it on by the peer's address:

- a stranger (no state): the stateless cookie exchange (``otacore.records.dtls12_cookie``,
  RFC 6347 4.2.1) answers, drops, or admits it; only an admitted ClientHello costs memory,
  and then only after the admission checks (``SessionHost.has_room``, ``enter_pending``);
- a peer handshaking: its bounded queue, read by that peer's task, which takes a DTLS
  handshake slot (``SessionHost.gate``), runs :class:`DtlsServerHandshake` (OpenSSL on
  memory BIOs) under ``limits.handshake_timeout``, takes the record layer over, frees the
  OpenSSL object, authorizes the device, then runs the session (``SessionHost.run``);
  a handler that can run as calls (``EventedHandler``: the device plane's) is started,
  and the session is then detached: the task ends and the session lives on as a record;
- an established peer: its :class:`DtlsLink`, which opens the datagram with our record
  layer right away; records that fail to open are dropped and counted in :attr:`stats`.
  A detached session's handler gets the plaintext in the same call (``on_data``) and
  answers at once (non-blocking sends); its idle deadline is in the process's timer heap,
  and once it closes its end runs in a task started then (:meth:`UdpEndpoint.end_session`).

On graceful shutdown (:meth:`UdpEndpoint.start_saving`) established sessions whose handler
can carry its state over are saved instead of closed (``udp_saved``); the next process
puts them back in the table before its first read (:meth:`UdpEndpoint.serve`), authorizes
each device again, and serves it without a handshake (``udp_restart``: the endpoint's base).

Sends go straight to the non-blocking socket; only when its buffer is full does a sender
wait (one at a time) for room. Every queue is bounded: a full one drops, as UDP may.
"""

from __future__ import annotations

import math
import socket
from collections import Counter, deque
from typing import Final

import trio
from OpenSSL import SSL

from otacore.errors import RecordHandoverError
from otacore.records.dtls12 import RecordDiscarded
from otacore.records.dtls12_cookie import Admit, Challenge, CookieExchange, Drop
from otacore.records.dtls12_handshake import DEFAULT_MTU, INITIAL_TIMEOUT
from otacore.records.dtls12_server import DtlsHandover, DtlsServerHandshake
from server.transport.admission import NotAdmitted
from server.transport.session import CloseReason, EventedHandler, SessionHandler, logger
from server.transport.session_host import RefuseReason, SessionHost
from server.transport.udp_restart import GracefulRestart
from server.transport.udp_saved import SavedDtlsSession
from server.transport.udp_session import Address, DtlsLink, DtlsSession

__all__ = ["UdpEndpoint", "UdpStats"]

_TRANSPORT: Final = "udp"
#: The largest datagram read: a whole DTLS record of 2^14 + 2048 bytes and its header
#: (RFC 5246 6.2.3); anything longer could not be a valid record anyway.
_MAX_DATAGRAM: Final = (1 << 14) + 2048 + 13
#: Datagrams read per wake-up before letting other tasks run.
_READ_BATCH: Final = 64


def _starts_with_client_hello(datagram: bytes) -> bool:
    """A handshake record of epoch 0 whose message is a ClientHello (RFC 6347 4.1, 4.2.2)."""
    return datagram[:1] == b"\x16" and datagram[3:5] == b"\x00\x00" and datagram[13:14] == b"\x01"


class UdpStats:
    """Counters of the UDP endpoint (for tests and monitoring); keys are reason names."""

    __slots__ = ("datagrams_lost", "discarded", "dropped", "handshake_queue_overflows",
                 "not_restored", "replaced_handshakes", "restored", "saved")  # fmt: skip

    def __init__(self) -> None:
        #: Datagrams from strangers dropped without reply, by ``DropReason`` name.
        self.dropped: Counter[str] = Counter()
        #: Records of established sessions discarded (RFC 6347 4.1.2.7), by
        #: ``DiscardReason`` name.
        self.discarded: Counter[str] = Counter()
        #: Datagrams dropped because a handshaking peer's queue was full.
        self.handshake_queue_overflows = 0
        #: Handshakes or sessions given up for a newer ClientHello from the same address.
        self.replaced_handshakes = 0
        #: Datagrams the kernel refused to send (other than for a full buffer).
        self.datagrams_lost = 0
        #: Sessions saved at graceful shutdown, and restored from the previous process
        #: (authorized again; no handshake).
        self.saved = 0
        self.restored = 0
        #: Saved sessions not restored, by reason (a RefuseReason value or one of ours).
        self.not_restored: Counter[str] = Counter()


class _Handshaking:
    """A peer admitted by the cookie exchange whose session has not started yet."""

    __slots__ = ("_waiter", "address", "failure", "handshake", "hello", "inbox", "peer",
                 "random", "scope", "source")  # fmt: skip

    def __init__(self, address: Address, peer: tuple[str, int], hello: bytes, random: bytes,
                 source: tuple[str, ...]) -> None:  # fmt: skip
        self.address = address
        self.peer = peer
        #: The ClientHello datagram with the valid cookie, until OpenSSL has it.
        self.hello = hello
        self.random = random
        self.source = source
        self.inbox: deque[bytes] = deque()
        self.handshake: DtlsServerHandshake | None = None
        self.failure: str | None = None
        self.scope = trio.CancelScope()
        self._waiter: trio.Event | None = None

    def deliver(self, datagram: bytes, limit: int) -> bool:
        if len(self.inbox) >= limit:
            return False
        self.inbox.append(datagram)
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None
        return True

    async def wait(self) -> None:
        if self._waiter is None:
            self._waiter = trio.Event()
        await self._waiter.wait()


class UdpEndpoint(GracefulRestart):
    """Serves DTLS 1.2 devices on one bound, non-blocking UDP socket (see module doc).

    ``queue_size``: datagrams kept per peer that its task has not read yet (the rest are
    dropped). ``mtu``: bytes per datagram of our handshake flights.
    """

    #: First retransmission timer of a handshake flight (RFC 6347 4.2.4.1: 1 s).
    initial_retransmit_timeout: float = INITIAL_TIMEOUT

    def __init__(
        self,
        sock: socket.socket,
        context: SSL.Context,
        host: SessionHost,
        *,
        queue_size: int = 10,
        mtu: int = DEFAULT_MTU,
        cookie_rotation: float = 30.0,
    ) -> None:
        if queue_size < 1:
            raise ValueError(f"queue_size must be at least 1, got {queue_size}")
        sock.setblocking(False)
        self.socket = sock
        self.context = context
        self.host = host
        self.queue_size = queue_size
        self.mtu = mtu
        self.cookie_rotation = cookie_rotation
        self.stats = UdpStats()
        #: Handshaking and established peers by socket address.
        self.peers: dict[Address, _Handshaking | DtlsLink] = {}
        self._cookies: CookieExchange | None = None
        self._nursery: trio.Nursery | None = None
        self._send_lock = trio.Lock()
        #: Sessions to restore when serving starts (see :meth:`serve`).
        self.to_restore: list[SavedDtlsSession] = []
        #: Sessions saved since :meth:`start_saving`; None while not saving.
        self.saving: list[SavedDtlsSession] | None = None
        #: The live sessions among them, with their handlers (see :meth:`saving_failed`).
        self._kept: list[tuple[DtlsSession, SessionHandler]] = []
        self._told_unsuspendable = False

    # --- serving ------------------------------------------------------------------------

    async def serve(
        self, *, task_status: trio.TaskStatus[UdpEndpoint] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Serve until cancelled. Never returns otherwise."""
        self._cookies = CookieExchange(trio.current_time(), rotate_after=self.cookie_rotation)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            # In the table before the first datagram is read: the device's next record
            # is opened by its restored layer, not taken for a stranger's.
            self._restore(self.to_restore)
            self.to_restore = []
            task_status.started(self)
            try:
                await self._read_forever()
            finally:
                # Torn down (cancelled): sessions with no task end as a task's would, in
                # tasks of this (cancelled) nursery: their shielded records are written
                # (the device offline), then the socket is dropped without a goodbye.
                self._close_detached(CloseReason.SERVER)

    async def _read_forever(self) -> None:
        sock = self.socket
        recvfrom = sock.recvfrom
        while True:
            await trio.lowlevel.wait_readable(sock)
            for _ in range(_READ_BATCH):
                try:
                    datagram, address = recvfrom(_MAX_DATAGRAM)
                except BlockingIOError:
                    break
                except OSError as exc:  # e.g. an ICMP error reported on the socket
                    logger.debug("UDP receive error: %s", exc)
                    continue
                try:
                    self._dispatch(datagram, address)
                except Exception:  # one peer's bug must not stop every device
                    logger.exception("datagram from %s could not be handled", address)

    def _dispatch(self, datagram: bytes, address: Address) -> None:
        peer = self.peers.get(address)
        if peer is None:
            self._on_stranger(datagram, address)
        elif type(peer) is DtlsLink:
            if peer.layer.closed and _starts_with_client_hello(datagram):
                # The session at this address is over, but it holds the address until its
                # end has run (the handler's last store writes: seconds on a busy store).
                # This ClientHello is a new connection from a port the kernel gave out
                # again (RFC 6347 4.2.8): the cookie exchange decides, as for an open
                # session, instead of the closed layer dropping it.
                self._on_new_hello(peer, datagram, address)
            elif peer.on_datagram(datagram):
                self._on_new_hello(peer, datagram, address)
        else:
            assert isinstance(peer, _Handshaking)
            if _starts_with_client_hello(datagram) and self._replaces(peer, datagram, address):
                return
            if not peer.deliver(datagram, self.queue_size):
                self.stats.handshake_queue_overflows += 1

    def _examine(self, datagram: bytes, address: Address) -> Drop | Challenge | Admit:
        assert self._cookies is not None
        verdict = self._cookies.examine(datagram, address, trio.current_time())
        if isinstance(verdict, Drop):
            self.stats.dropped[verdict.reason.name] += 1
        elif isinstance(verdict, Challenge):
            self.send_now(verdict.reply, address)  # as small as the hello: no amplification
        return verdict

    def _on_stranger(self, datagram: bytes, address: Address) -> None:
        verdict = self._examine(datagram, address)
        if isinstance(verdict, Admit):
            self._admit(datagram, address, verdict.hello.random)

    def _replaces(self, peer: _Handshaking, datagram: bytes, address: Address) -> bool:
        """A ClientHello reached a handshaking peer: the same one again goes to its
        handshake (a retransmission); a new one with a valid cookie replaces it (the device
        restarted, RFC 6347 4.2.8); one without gets a HelloVerifyRequest. True if handled."""
        assert self._cookies is not None
        verdict = self._cookies.examine(datagram, address, trio.current_time())
        if isinstance(verdict, Drop) or (
            isinstance(verdict, Admit) and verdict.hello.random == peer.random
        ):
            return False  # for the handshake, which drops what it cannot use
        if isinstance(verdict, Challenge):
            self.send_now(verdict.reply, address)
            return True
        # A new ClientHello that passed the cookie exchange: the device restarted.
        self.stats.replaced_handshakes += 1
        peer.scope.cancel()
        del self.peers[address]
        self._admit(datagram, address, verdict.hello.random)
        return True

    def _on_new_hello(self, link: DtlsLink, datagram: bytes, address: Address) -> None:
        """A ClientHello in epoch 0 reached an established session (RFC 6347 4.2.8): the
        session ends only once the new handshake has passed the cookie exchange."""
        verdict = self._examine(datagram, address)
        if isinstance(verdict, Admit):
            self.stats.replaced_handshakes += 1
            link.ended = link.ended or CloseReason.PEER  # the device restarted: no close_notify
            link.wake()
            self.forget(link)
            self._admit(datagram, address, verdict.hello.random)

    def _admit(self, datagram: bytes, address: Address, random: bytes) -> None:
        host = self.host
        # recvfrom's IPv4 address is already (host, port): share it with the session.
        peer = address if len(address) == 2 else (str(address[0]), int(address[1]))
        if not host.has_room(_TRANSPORT):
            host.refuse(_TRANSPORT, RefuseReason.SERVER_FULL, peer)
            return
        # The cookie exchange proved the peer receives at its address, but one address may
        # hold any number of source ports: bound them per address too.
        source = host.enter_pending(_TRANSPORT, peer)
        if source is None:
            return
        host.connection_started(_TRANSPORT)
        handshaking = _Handshaking(address, peer, datagram, random, source)
        self.peers[address] = handshaking
        assert self._nursery is not None
        self._nursery.start_soon(self._serve_peer, handshaking)

    # --- one peer -----------------------------------------------------------------------

    async def _serve_peer(self, peer: _Handshaking) -> None:
        """One admitted peer from its handshake slot to the end of its session. Never
        raises (except Cancelled)."""
        address, who = peer.address, peer.peer
        established = None
        detached = False
        try:
            try:
                with peer.scope:  # cancelled if a newer ClientHello replaces the handshake
                    established = await self._handshake_phase(peer)
            finally:
                if self.peers.get(address) is peer:
                    del self.peers[address]
                if peer.handshake is not None:
                    peer.handshake.abort()  # frees OpenSSL's object if still held
                    peer.handshake = None
            del peer  # the session's frame keeps nothing of the handshake
            if established is not None:
                link, device_id, resumed = established
                del established
                try:  # inline, not a coroutine of its own: a frame less per idle session
                    if device_id is not None:
                        session = DtlsSession(link, device_id, who, self.host, resumed)
                        # An evented handler's session lives on with no task: its end
                        # (forget, connection_ended) runs in _end_session.
                        detached = await self.host.run(session, detach=session.detach)
                    elif not link.layer.closed:  # refused after the handshake: tell the device
                        with trio.move_on_after(self.host.limits.farewell_timeout):
                            await self.send(link.layer.close(), link.address)
                finally:
                    if not detached:
                        self.forget(link)
        except Exception:
            logger.exception("DTLS session with %s failed", who)
        finally:
            if not detached:
                self.host.connection_ended(_TRANSPORT)

    async def _handshake_phase(
        self, peer: _Handshaking
    ) -> tuple[DtlsLink, str | None, bool] | None:
        """Take a handshake slot, handshake, authorize: (link, device id or None if
        refused after the handshake, resumed), or None if refused before a session."""
        host = self.host
        link: DtlsLink | None = None
        turn = host.gate.turn(_TRANSPORT, peer.source)
        try:
            # A bounded number of handshakes at once; the rest wait or go (the peer's next
            # ClientHello retransmission, RFC 6347 4.2.4, queues again).
            try:
                await turn.take()
            except NotAdmitted as exc:
                host.refuse_unadmitted(_TRANSPORT, peer.peer, exc)
                return None
            device_id: str | None = None
            resumed = False
            with trio.move_on_after(host.limits.handshake_timeout) as deadline:
                handover = await self._handshake(peer)
                if handover is not None:
                    link = self._establish(peer, handover)
                    resumed = handover.resumed
                    der = handover.peer_certificate_der
                    del handover
                    device_id = await host.authorize(_TRANSPORT, der, peer.peer)
                    if device_id is not None and der is not None:
                        link.certificate = host.id_cache.certificate(der)  # cached
        except BaseException:
            if link is not None:
                self.forget(link)
            raise
        finally:
            turn.give_back()
            host.leave_pending(peer.source)
        if deadline.cancelled_caught:
            if link is not None:
                self.forget(link)
            host.refuse(_TRANSPORT, RefuseReason.HANDSHAKE_TIMEOUT, peer.peer)
            return None
        if link is None:
            host.refuse(_TRANSPORT, RefuseReason.HANDSHAKE_FAILED, peer.peer, peer.failure or "")
            return None
        return link, device_id, resumed

    async def _handshake(self, peer: _Handshaking) -> DtlsHandover | None:
        """Run the handshake to completion; None (``peer.failure`` says why) if it fails."""
        try:
            handshake = DtlsServerHandshake(
                self.context, peer.hello, now=trio.current_time(), mtu=self.mtu,
                initial_timeout=self.initial_retransmit_timeout,
            )  # fmt: skip
        except RecordHandoverError as exc:
            peer.failure = str(exc)
            return None
        peer.handshake = handshake
        peer.hello = b""
        # Queued while waiting for a slot, before we answered: only repeats of the
        # ClientHello OpenSSL now has (the peer has nothing else to send yet).
        peer.inbox.clear()
        while True:
            for datagram in handshake.datagrams_to_send():
                await self.send(datagram, peer.address)
            if handshake.failure is not None:
                peer.failure = handshake.failure
                return None
            if handshake.complete:
                peer.handshake = None
                return handshake.take_over()
            if not peer.inbox:
                deadline = handshake.next_timeout()
                with trio.move_on_at(deadline if deadline is not None else math.inf):
                    await peer.wait()
            now = trio.current_time()
            while peer.inbox and not handshake.complete and handshake.failure is None:
                handshake.receive_datagram(peer.inbox.popleft(), now)
            handshake.handle_timeout(now)

    def _establish(self, peer: _Handshaking, handover: DtlsHandover) -> DtlsLink:
        """Replace the handshaking peer by its link; what came after the handshake (in the
        completing datagram, or queued since) is opened now."""
        link = DtlsLink(peer.address, handover.layer, self, self.queue_size, self.host.limits)
        if self.peers.get(peer.address) is peer:
            self.peers[peer.address] = link
        if handover.unprocessed:
            link.on_datagram(handover.unprocessed)
        while peer.inbox:
            link.on_datagram(peer.inbox.popleft())
        return link

    # --- shared by the peers ------------------------------------------------------------

    def _close_detached(self, reason: str) -> None:
        """Close every session that runs with no task (each starts its end)."""
        for peer in list(self.peers.values()):
            if type(peer) is DtlsLink and peer.session is not None:
                peer.session.close(reason)

    def end_session(self, session: DtlsSession, handler: EventedHandler) -> None:
        """A detached session closed: its end runs in a task of the endpoint's nursery."""
        assert self._nursery is not None
        self._nursery.start_soon(self._end_session, session, handler)

    async def _end_session(self, session: DtlsSession, handler: EventedHandler) -> None:
        try:
            await self.host.end_detached(session, handler)
        except Exception:
            logger.exception("DTLS session with %s failed to end", session.peer)
        finally:
            self.forget(session.link)
            self.host.connection_ended(_TRANSPORT)

    def spawn_sender(self, session: DtlsSession) -> None:
        """Start a task sending ``session``'s backlog (the socket's buffer was full)."""
        assert self._nursery is not None
        self._nursery.start_soon(self._send_backlog, session)

    async def _send_backlog(self, session: DtlsSession) -> None:
        try:
            await session.send_backlog()
        except Exception:
            logger.exception("sending to %s failed", session.peer)

    def forget(self, link: DtlsLink) -> None:
        """Drop ``link`` from the demultiplexer (no-op if a newer peer took its address)."""
        if self.peers.get(link.address) is link:
            del self.peers[link.address]

    def note_discarded(self, event: RecordDiscarded) -> None:
        """Count a record an established session discarded (RFC 6347 4.1.2.7)."""
        self.stats.discarded[event.reason.name] += 1

    def send_now(self, datagram: bytes, address: Address) -> bool:
        """Send without waiting; False if the socket buffer is full (nothing was sent)."""
        try:
            self.socket.sendto(datagram, address)
        except BlockingIOError:
            return False
        except OSError as exc:  # e.g. ENOBUFS, or the socket is closing: lost, as UDP may
            self.stats.datagrams_lost += 1
            logger.debug("datagram to %s lost: %s", address, exc)
        return True

    async def send(self, datagram: bytes, address: Address) -> None:
        """Send one datagram; waits (one sender at a time) while the socket buffer is full."""
        if self.send_now(datagram, address):
            await trio.lowlevel.checkpoint()
            return
        async with self._send_lock:
            while True:
                await trio.lowlevel.wait_writable(self.socket)
                if self.send_now(datagram, address):
                    return

    def close(self) -> None:
        """Close the socket (after :meth:`serve` has returned)."""
        trio.lowlevel.notify_closing(self.socket)
        self.socket.close()
