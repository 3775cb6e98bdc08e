"""The UDP endpoint's graceful restart (issue 14 item 6): its established DTLS sessions are
saved as the shutdown closes them and restored by the next process, which authorizes each
device again before serving it, without a handshake.

:class:`GracefulRestart` is a part of :class:`~server.transport.udp_endpoint.UdpEndpoint`
(its base), kept apart so that each module holds one concept: saving (:meth:`keep`, called
by ``DtlsSession.close`` for a shutdown, before the handler's end; :meth:`saving_failed` if
the sealed file cannot be written) and restoring (:meth:`_restore`, before the endpoint's
first read; the devices authorized in one call when the directory can, e.g. the device
plane's ``authorize_restored``). The sealed file itself is ``udp_saved``'s.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Final, cast

import trio

from otacore.errors import RecordStateFormatError
from otacore.records.dtls12 import DtlsRecordLayer
from server.authorization import ClientCertificate
from server.store.errors import StoreUnavailableError
from server.transport.session import CloseReason, SessionHandler, logger
from server.transport.session_host import RefuseReason, SessionHost
from server.transport.udp_saved import SavedDtlsSession
from server.transport.udp_session import Address, DatagramSender, DtlsLink, DtlsSession

if TYPE_CHECKING:
    from server.transport.udp_endpoint import UdpStats

__all__ = ["GracefulRestart"]

_TRANSPORT: Final = "udp"
#: The session could not be restored after a restart (see UdpStats.not_restored).
_NOT_RESTORED_STATE = "record state unreadable"
_NOT_RESTORED_FULL = "too many sessions"


class GracefulRestart:
    """Saving and restoring the endpoint's DTLS sessions (see the module docstring)."""

    # Set by UdpEndpoint.__init__.
    host: SessionHost
    stats: UdpStats
    peers: dict[Address, Any]
    queue_size: int
    _nursery: trio.Nursery | None
    saving: list[SavedDtlsSession] | None
    _kept: list[tuple[DtlsSession, SessionHandler]]
    _told_unsuspendable: bool

    if TYPE_CHECKING:  # UdpEndpoint's

        async def send(self, datagram: bytes, address: Address) -> None: ...

        def forget(self, link: DtlsLink) -> None: ...

    def start_saving(self) -> None:
        """Graceful shutdown begins: from now on sessions closed for shutdown are saved
        (:meth:`keep`) instead of closed; :attr:`saving` collects them."""
        if self.saving is None:
            self.saving = []

    async def saving_failed(self) -> None:
        """The saved sessions could not be written (the server logged why): they are over
        after all. Each handler that can (``SuspendableHandler.not_saved``) ends its
        session as a closed one's end would (the device plane marks the device offline)."""
        kept, self._kept = self._kept, []
        async with trio.open_nursery() as nursery:
            for session, handler in kept:
                not_saved = getattr(handler, "not_saved", None)
                if not_saved is not None:
                    nursery.start_soon(self._not_saved, not_saved, session)

    @staticmethod
    async def _not_saved(not_saved: Any, session: DtlsSession) -> None:
        try:
            await not_saved(session)
        except Exception:
            logger.exception("the end of the unsaved session of %s failed", session.device_id)

    def keep(self, session: DtlsSession, handler: SessionHandler) -> bool:
        """Save ``session`` for the next process if saving; False (close it) otherwise.
        Its record layer must not seal again in this process: the caller stops it."""
        link = session.link
        if self.saving is None or link.certificate is None:
            return False
        # Only a handler that can carry its own state over (SuspendableHandler) is saved:
        # one restored without it would serve the device as if it had never said Hello.
        suspend = getattr(handler, "suspend", None)
        if suspend is None:
            if not self._told_unsuspendable:
                self._told_unsuspendable = True
                logger.info("the DTLS session handler %s cannot be suspended: its sessions "
                            "are closed, not saved", type(handler).__name__)  # fmt: skip
            return False
        try:
            handler_state = bytes(suspend(session))
        except Exception:
            logger.exception("could not save the handler state of %s", session.device_id)
            return False
        idle_for = trio.current_time() - session.idle_since
        self.saving.append(
            SavedDtlsSession(
                address=tuple(link.address),
                certificate=link.certificate,
                resumed=session.resumed,
                record_state=link.layer.to_bytes(),
                last_activity=time.time() - max(0.0, idle_for),
                handler_state=handler_state,
            )
        )
        self._kept.append((session, handler))
        self.stats.saved += 1
        return True

    def _restore(self, saved: list[SavedDtlsSession]) -> None:
        """Put each saved session back in the table, then authorize their devices again
        (in one task, all at once if the directory can) and start each one's task."""
        host = self.host
        assert self._nursery is not None
        endpoint = cast("DatagramSender", self)  # the UdpEndpoint this is part of
        restored: list[tuple[DtlsLink, SavedDtlsSession]] = []
        for entry in saved:
            if not host.has_room(_TRANSPORT):
                self.stats.not_restored[_NOT_RESTORED_FULL] += 1
                continue
            try:
                layer = DtlsRecordLayer.from_bytes(entry.record_state)
            except RecordStateFormatError as exc:
                logger.warning("saved DTLS session of %s not restored: %s", entry.device_id, exc)
                self.stats.not_restored[_NOT_RESTORED_STATE] += 1
                continue
            address = entry.address
            link = DtlsLink(address, layer, endpoint, self.queue_size, host.limits)
            link.certificate = entry.certificate
            older = self.peers.get(address)
            if isinstance(older, DtlsLink):
                older.ended = CloseReason.REPLACED
                older.wake()
            self.peers[address] = link
            host.connection_started(_TRANSPORT)
            restored.append((link, entry))
        if not restored:
            return
        authorize_all = getattr(host.directory, "authorize_restored", None)
        if authorize_all is None:  # each session's task asks the directory itself
            for link, entry in restored:
                self._nursery.start_soon(self._serve_restored, link, entry)
        else:
            self._nursery.start_soon(self._serve_all_restored, restored, authorize_all)

    async def _serve_all_restored(
        self,
        restored: list[tuple[DtlsLink, SavedDtlsSession]],
        authorize_all: Callable[[list[ClientCertificate]], Awaitable[list[bool | None]]],
    ) -> None:
        """Authorize the restored sessions' devices in one call (the directory's
        ``authorize_restored``: the device plane's reads them all at once), then start
        each session's task. Until then a session's datagrams wait in its link's queue."""
        assert self._nursery is not None
        verdicts: list[bool | None] = [None] * len(restored)
        asked_at = trio.current_time()
        try:
            if self.host.accepting:
                verdicts = list(await authorize_all([entry.certificate for _, entry in restored]))
                if len(verdicts) != len(restored):
                    raise ValueError(f"{len(verdicts)} verdicts for {len(restored)} sessions")
        except Exception:  # each is asked alone instead, as at a handshake
            logger.exception("the device directory failed to authorize the restored sessions")
            verdicts = [None] * len(restored)
        finally:
            # Started even if this task is cancelled: each ends its connection's count.
            for (link, entry), allowed in zip(restored, verdicts, strict=True):
                self._nursery.start_soon(self._serve_restored, link, entry, allowed, asked_at)

    async def _serve_restored(self, link: DtlsLink, entry: SavedDtlsSession,
                              allowed: bool | None = None, asked_at: float = 0.0) -> None:
        """Authorize a restored session's device again (unless ``allowed`` says already,
        from ``asked_at``), then serve it (no handshake). A device revoked or removed while
        the server was down gets a close_notify (it will handshake, and be refused)."""
        host = self.host
        address = link.address
        peer = address if len(address) == 2 else (str(address[0]), int(address[1]))
        detached = False
        try:
            refusal = await self._authorize_restored(entry, allowed, asked_at)
            if refusal == RefuseReason.SHUTTING_DOWN and self._save_again(link, entry):
                return
            if refusal is not None:
                self.stats.not_restored[refusal] += 1
                host.refuse(_TRANSPORT, refusal, peer, f"{entry.device_id} (restored session)")
                if not link.layer.closed and link.ended is None:
                    with trio.move_on_after(host.limits.farewell_timeout):
                        await self.send(link.layer.close(), address)
                return
            self.stats.restored += 1
            session = DtlsSession(
                link, entry.device_id, peer, host, entry.resumed,
                restored_state=entry.handler_state,
                idle_for=max(0.0, time.time() - entry.last_activity),
            )  # fmt: skip
            # SessionHost.run counts a handshake per session it runs; a restored session
            # had none: take that count back first (no checkpoint in between).
            counter = host.stats.resumed_handshakes if entry.resumed else host.stats.full_handshakes
            counter[_TRANSPORT] -= 1
            detached = await host.run(session, detach=session.detach)
        except Exception:
            logger.exception("restored DTLS session with %s failed", peer)
        finally:
            if not detached:
                self.forget(link)
                host.connection_ended(_TRANSPORT)

    def _save_again(self, link: DtlsLink, entry: SavedDtlsSession) -> bool:
        """A graceful shutdown came before a restored session was authorized again: it
        is saved again as it was (its handler never ran), with its record layer's state
        now (its replay window may have moved). False if not saving."""
        if self.saving is None or link.ended is not None or link.layer.closed:
            return False
        self.saving.append(replace(entry, record_state=link.layer.to_bytes()))
        link.ended = CloseReason.SHUTDOWN  # never opens or seals again in this process
        self.stats.saved += 1
        return True

    async def _authorize_restored(self, entry: SavedDtlsSession, allowed: bool | None,
                                  asked_at: float) -> str | None:  # fmt: skip
        """None if the device may go on, else the RefuseReason (as at a handshake: the
        directory decides, and a revocation seen meanwhile wins). ``allowed``: the
        directory's answer asked at ``asked_at`` for all restored sessions at once (None:
        ask it now for this one)."""
        host = self.host
        if not host.accepting:
            return RefuseReason.SHUTTING_DOWN
        if allowed is None:
            asked_at = trio.current_time()
            try:
                allowed = await host.directory.authorize(entry.certificate)
            except StoreUnavailableError:
                return RefuseReason.STORE_UNAVAILABLE
            except Exception:
                logger.exception("the device directory failed to authorize %s", entry.device_id)
                return RefuseReason.DIRECTORY_ERROR
        if allowed and host.registry.revoked_since(entry.device_id, asked_at):
            allowed = False
        if not allowed:
            return RefuseReason.NOT_AUTHORIZED
        if not host.accepting:
            return RefuseReason.SHUTTING_DOWN
        return None
