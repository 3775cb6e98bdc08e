"""Device side of the firmware transfer: a sans-IO state machine (no storage, no clock).

The receiver never holds the file. Each accepted chunk comes out as a :class:`WriteChunk`
event (write these bytes at this offset of the inactive slot); the device layer gives the
receiver read access to that slot (``read_stored``) for the two moments it must look at stored
data: checking a partial download before resuming, and validating the whole file at the end.

Persistent state (:class:`ReceiverState`, 54 bytes, versioned, with its own CRC) is handed out
in :class:`SaveState` events, always *before* the ack that reports the same progress, so the
device never acknowledges a chunk it could forget in a reboot: after any interruption the
server re-sends at most one window.

Resume check: the state keeps a *chain of per-chunk CRC-32s* (CRC-32 over the u32 LE CRCs of
chunks 1..count, see bitmap.chain_crcs) rather than a SHA-256 of the prefix: a hashlib state
cannot be serialised, and a SHA-256 of the prefix would have to be recomputed over the whole
prefix at every save (quadratic) or on every reboot anyway. The chain costs one 4-byte CRC step
per chunk, fits in 4 bytes, and is checked on resume with one batch CRC pass over the stored
prefix. It guards against storage faults, not attackers: the whole file's SHA-256 is checked at
the end, and the transport (DTLS/TLS) authenticates every byte. (The record itself is
:class:`~otacore.transfer.receiver_state.ReceiverState`.)

Finish: once the whole file passes validation the device answers UpdateFinish with
FinishReply(OK) and applies the file only at the server's FinishAck (the server records the
completion durably before it sends one). It repeats the FinishReply ``finish_retries`` times,
doubling from ``finish_retry`` seconds, then stops waiting (TransferFailed, TIMEOUT) so it
never hangs in an update; but the transfer *lapses* rather than ends: a FinishAck of exactly
that transfer that still comes in the session (an overloaded store took longer than the
retries) applies the file, after validating it again, and a repeated UpdateFinish gets the
same FinishReply. While lapsed it asks again, slowly: a FinishReply ``finish_reask`` seconds
after giving up, doubling up to every ``finish_reask_max`` seconds, so that a FinishAck lost
after the repeats were used up (over DTLS each copy is one NON datagram) is made up within the
session. A new UpdateStart, a Cancel or :meth:`TransferReceiver.cancel` ends the lapse; any
other FinishAck is stale and ignored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum

from otacore._types import Buffer
from otacore.errors import ModuleFormatError, ValidationError
from otacore.integrity import crc32
from otacore.module import validate_module
from otacore.transfer.bitmap import ReceiveBook, stored_prefix_chain
from otacore.transfer.messages import (
    MAX_WINDOW,
    Cancel,
    Chunk,
    ChunkAck,
    Event,
    FinishAck,
    FinishReply,
    Message,
    ReceiverStats,
    StartReply,
    TransferFailed,
    TransferStatus,
    UpdateFinish,
    UpdateStart,
)
from otacore.transfer.receiver_state import ReceiverState


class TransferRejectedError(ValidationError):
    """Raised by a device-layer hook to refuse an update; carries the status to report."""

    def __init__(self, message: str, status: TransferStatus = TransferStatus.REJECTED) -> None:
        super().__init__(message)
        self.status = status


# --- events -----------------------------------------------------------------------------


@dataclass(slots=True)
class WriteChunk(Event):
    """Write ``data`` at ``offset`` of the inactive slot (before acting on later outputs).

    One per chunk, so not frozen (half the construction cost): treat as read-only.
    """

    offset: int
    data: Buffer


@dataclass(slots=True)
class SaveState(Event):
    """Persist ``state`` (its to_bytes()); None means erase the saved state."""

    state: ReceiverState | None


@dataclass(slots=True, frozen=True)
class TransferStarted(Event):
    """A transfer began (or resumed at ``resume_offset`` chunks)."""

    start: UpdateStart
    resume_offset: int


@dataclass(slots=True, frozen=True)
class PartialDiscarded(Event):
    """Partial data of an earlier download was dropped; ``reason`` says why."""

    reason: str


@dataclass(slots=True, frozen=True)
class ReadyToApply(Event):
    """The file is validated and the server confirmed: the device may apply it now."""

    start: UpdateStart
    stats: ReceiverStats


ReceiverOutput = Message | Event
ReadStored = Callable[[int, int], Buffer]
StartCheck = Callable[[UpdateStart], None]
FileCheck = Callable[[UpdateStart, memoryview], None]


class ReceiverPhase(Enum):
    """Where the receiver is in the exchange."""

    IDLE = "idle"
    RECEIVING = "receiving"
    VALIDATED = "validated"  # FinishReply(OK) sent, waiting for FinishAck
    DONE = "done"


class TransferReceiver:
    """Receive one file at a time into the inactive slot; resume across sessions and reboots."""

    def __init__(
        self,
        state: ReceiverState | None = None,
        *,
        read_stored: ReadStored,
        window_bytes: int = 128 * 1024,
        ack_every: int = 2,
        ack_delay: float = 0.2,
        idle_timeout: float = 300.0,
        max_file_size: int = 4 * 1024 * 1024,
        check_start: StartCheck | None = None,
        check_file: FileCheck | None = None,
        finish_retry: float = 2.0,
        finish_retries: int = 4,
        finish_reask: float = 64.0,
        finish_reask_max: float = 600.0,
    ) -> None:
        """Create a receiver, resuming from ``state`` when the device saved one.

        ``read_stored(offset, length)`` returns the slot's bytes (a memoryview is best).
        ``window_bytes`` sets the announced window (Device OS: 128 KiB / chunk size).
        ``max_file_size`` is the slot size (bookkeeping costs 4 bytes per chunk). The
        hooks may raise TransferRejectedError: ``check_start`` before accepting an
        UpdateStart (updates disabled, delta base not installed, ...), ``check_file`` after
        the SHA-256 and module checks pass (e.g. the manifest signature). The FinishReply
        is repeated ``finish_retries`` times from ``finish_retry`` s (doubling), then, once
        lapsed, from ``finish_reask`` s doubling up to ``finish_reask_max`` s.
        """
        self._read_stored = read_stored
        self._window_bytes = window_bytes
        self._ack_every = ack_every
        self._ack_delay = ack_delay
        self._idle_timeout = idle_timeout
        self._max_file_size = max_file_size
        self._check_start = check_start
        self._check_file = check_file
        self._finish_retry = finish_retry
        self._finish_retries = finish_retries
        self._finish_reask = finish_reask
        self._finish_reask_max = finish_reask_max
        #: The gap before the lapsed transfer's next FinishReply (see poll).
        self._reask_gap = finish_reask
        self._persist = state
        self.phase = ReceiverPhase.IDLE
        self._tid = -1
        self._start: UpdateStart | None = None
        self._chunk_size = 0
        self._last_chunk_size = 0
        self._book = ReceiveBook(0, 1)
        self._start_reply: StartReply | None = None
        self._finish_reply: FinishReply | None = None
        self._saved_count = state.count if state else 0
        self._ack_deadline: float | None = None
        self._finish_deadline: float | None = None
        self._finish_attempts = 0
        #: The validated transfer (``_tid``) whose FinishAck this receiver gave up waiting
        #: for, and still honours when it comes late (see _on_late_ack).
        self._lapsed = False
        self._unacked = 0
        self._last_chunk_at = 0.0
        self._started_at = 0.0
        self._rejected: tuple[int, float] = (-1, float("-inf"))
        self._reset_counters(0)

    # --- public API -----------------------------------------------------------------------

    @property
    def transfer_id(self) -> int | None:
        """Id of the transfer being received or awaiting its FinishAck, else None."""
        return None if self.phase is ReceiverPhase.IDLE else self._tid

    @property
    def lapsed_transfer_id(self) -> int | None:
        """Id of the validated transfer whose FinishAck the receiver gave up waiting for
        (it went IDLE, "resumes as complete") and would still apply if that FinishAck came
        late; None once anything else happened (a new UpdateStart, a Cancel, the late ack)."""
        return self._tid if self._lapsed else None

    @property
    def state(self) -> ReceiverState | None:
        """The persistent state as last handed out in SaveState."""
        return self._persist

    def handle(self, message: Message, now: float) -> list[ReceiverOutput]:
        """Process one message from the server; returns messages to send and events."""
        if isinstance(message, Chunk):
            return self._on_chunk(message, now)
        if isinstance(message, UpdateStart):
            return self._on_start(message, now)
        if isinstance(message, UpdateFinish):
            return self._on_finish(message, now)
        if isinstance(message, FinishAck):
            if message.transfer_id != self._tid:
                return []  # another transfer's: stale
            if self.phase is ReceiverPhase.VALIDATED:
                assert self._start is not None and self._finish_reply is not None
                self.phase = ReceiverPhase.DONE
                self._finish_deadline = None
                return [ReadyToApply(self._start, self._finish_reply.stats)]
            if self._lapsed:
                return self._on_late_ack()
            return []
        if isinstance(message, Cancel):
            if self._lapsed and message.transfer_id == self._tid:
                self._lapsed = False  # the server withdrew it: a later FinishAck is stale
                return []
            active = (ReceiverPhase.RECEIVING, ReceiverPhase.VALIDATED)
            if self.phase in active and message.transfer_id == self._tid:
                out = self._flush_state([])
                self._go_idle()
                detail = f": {message.reason}" if message.reason else ""
                out.append(
                    TransferFailed(f"the server cancelled the transfer{detail}", message.status)
                )
                return out
            return []
        return []  # device-bound kinds only

    def poll(self, now: float) -> list[ReceiverOutput]:
        """Run the timers (delayed ack, idle timeout, FinishReply retransmission)."""
        out: list[ReceiverOutput] = []
        if self.phase is ReceiverPhase.RECEIVING:
            if now - self._last_chunk_at >= self._idle_timeout:
                self._flush_state(out)
                self._go_idle()
                reason = f"no chunk for {self._idle_timeout:g} s; the partial download is kept"
                out.append(TransferFailed(reason, TransferStatus.TIMEOUT))
            elif self._ack_deadline is not None and now >= self._ack_deadline:
                self._emit_ack(out)
        elif self.phase is ReceiverPhase.VALIDATED:
            assert self._finish_deadline is not None and self._finish_reply is not None
            if now >= self._finish_deadline:
                if self._finish_attempts >= self._finish_retries:
                    # The server writes the completion durably before its FinishAck leaves
                    # (server.devices.transfer_run); an overloaded store can take longer
                    # than these retries. Stop waiting (the device must not hang in an
                    # update), but keep the transfer: its FinishAck, if it still comes in
                    # this session, applies the file (see _on_late_ack).
                    self._go_idle()
                    self._lapsed = True
                    self._reask_gap = self._finish_reask
                    self._finish_deadline = now + self._finish_reask  # asks again, slowly
                    reason = (
                        "the server never confirmed the validated file; it resumes as "
                        "complete (and is applied if the confirmation still comes)"
                    )
                    out.append(TransferFailed(reason, TransferStatus.TIMEOUT))
                else:
                    self._finish_attempts += 1
                    self._finish_deadline = now + self._finish_retry * 2**self._finish_attempts
                    out.append(self._finish_reply)
        elif self._lapsed:
            assert self._finish_deadline is not None and self._finish_reply is not None
            if now >= self._finish_deadline:
                # A FinishAck lost after the repeats (one NON datagram over DTLS) would
                # leave the file unapplied until the next session: ask again, backing off
                # (the server answers from memory, without touching its store).
                self._reask_gap = min(2 * self._reask_gap, self._finish_reask_max)
                self._finish_deadline = now + self._reask_gap
                out.append(self._finish_reply)
        return out

    def next_deadline(self) -> float | None:
        """When poll() next has work to do, or None."""
        if self.phase is ReceiverPhase.RECEIVING:
            idle = self._last_chunk_at + self._idle_timeout
            ack = self._ack_deadline
            return idle if ack is None or idle < ack else ack
        if self.phase is ReceiverPhase.VALIDATED or self._lapsed:
            return self._finish_deadline
        return None

    def cancel(self, now: float, reason: str = "cancelled by the device") -> list[ReceiverOutput]:
        """Abandon the active transfer (partial data stays resumable), or forget a lapsed
        one (its late FinishAck is then ignored)."""
        self._lapsed = False
        if self.phase not in (ReceiverPhase.RECEIVING, ReceiverPhase.VALIDATED):
            return []
        out = self._flush_state([])
        out.append(Cancel(self._tid, TransferStatus.CANCELLED, reason))
        self._go_idle()
        out.append(TransferFailed(reason, TransferStatus.CANCELLED))
        return out

    # --- chunks -----------------------------------------------------------------------------

    def _on_chunk(self, chunk: Chunk, now: float) -> list[ReceiverOutput]:
        if chunk.transfer_id != self._tid or self.phase is not ReceiverPhase.RECEIVING:
            if chunk.transfer_id == self._tid and self.phase is not ReceiverPhase.IDLE:
                return []  # a late copy after the finish: nothing to do
            return self._unknown_transfer(chunk.transfer_id, now)
        self._last_chunk_at = now
        book = self._book
        number = chunk.index
        last = book.chunk_count
        if number > last:
            self._dropped += 1
            return []
        step = self._chunk_size
        data = chunk.data
        expected = step if number < last else self._last_chunk_size
        if len(data) != expected or crc32(data) != chunk.crc32:
            self._corrupt += 1  # treated as missing: the server re-sends it
            return []
        kind = book.accept(number, chunk.crc32)
        out: list[ReceiverOutput]
        if kind <= 1:  # DUPLICATE or OUT_OF_WINDOW: the server's picture is stale, tell it now
            if kind == ReceiveBook.DUPLICATE:
                self._duplicate += 1
            else:
                self._dropped += 1
            out = []
            self._emit_ack(out)
            return out
        self._received += 1
        out = [WriteChunk((number - 1) * step, data)]
        self._unacked += 1
        if kind == ReceiveBook.IN_ORDER:
            if self._unacked >= self._ack_every or book.count >= last:
                self._emit_ack(out)
            elif self._ack_deadline is None:
                self._ack_deadline = now + self._ack_delay
            return out
        if kind != ReceiveBook.FILLED_GAP:
            self._out_of_order += 1
        # Ack at once on a new gap and when a gap fills; otherwise every ack_every chunks.
        if kind != ReceiveBook.OUT_OF_ORDER or self._unacked >= self._ack_every:
            self._emit_ack(out)
        elif self._ack_deadline is None:
            self._ack_deadline = now + self._ack_delay
        return out

    def _emit_ack(self, out: list[ReceiverOutput]) -> None:
        book = self._book
        if book.count != self._saved_count:
            self._flush_state(out)
        out.append(ChunkAck(self._tid, book.count, book.held >> (book.count + 1)))
        self._acks_sent += 1
        self._unacked = 0
        self._ack_deadline = None

    def _flush_state(self, out: list[ReceiverOutput]) -> list[ReceiverOutput]:
        """Append a SaveState when the in-order count moved since the last one."""
        book = self._book
        if self.phase is ReceiverPhase.RECEIVING and book.count != self._saved_count:
            saved = self._persist
            assert saved is not None
            self._persist = ReceiverState(
                saved.file_sha256, saved.file_size, saved.chunk_size, book.count, book.chain
            )
            self._saved_count = book.count
            out.append(SaveState(self._persist))
        return out

    def _unknown_transfer(self, transfer_id: int, now: float) -> list[ReceiverOutput]:
        # Answer stray messages (e.g. after a reboot) with one Cancel per transfer per second,
        # so an old session stops quickly without a Cancel for every chunk of its window.
        last_tid, last_at = self._rejected
        if transfer_id == last_tid and now - last_at < 1.0:
            return []
        self._rejected = (transfer_id, now)
        return [
            Cancel(
                transfer_id,
                TransferStatus.UNKNOWN_TRANSFER,
                "no such transfer on this device; send UpdateStart",
            )
        ]

    # --- start ------------------------------------------------------------------------------

    def _on_start(self, start: UpdateStart, now: float) -> list[ReceiverOutput]:
        if start == self._start and self.phase is not ReceiverPhase.IDLE:
            assert self._start_reply is not None
            return [self._start_reply]  # a retransmitted UpdateStart: same answer
        self._lapsed = False  # a new transfer: the old one's FinishAck is stale from now on
        out: list[ReceiverOutput] = []
        self._flush_state(out)  # a new session replaces the active one
        self._go_idle()
        refusal = self._refusal(start)
        if refusal is not None:
            status, reason = refusal
            out.append(StartReply(start.transfer_id, status, 0, 0))
            out.append(TransferFailed(f"refused the update: {reason}", status))
            return out
        offset, chain = self._resume_point(start, out)
        state = ReceiverState(start.file_sha256, start.file_size, start.chunk_size, offset, chain)
        if state != self._persist:
            self._persist = state
            out.append(SaveState(state))
        self._saved_count = offset
        window = min(MAX_WINDOW, max(1, self._window_bytes // start.chunk_size))
        self._tid = start.transfer_id
        self._start = start
        self._chunk_size = start.chunk_size
        self._last_chunk_size = start.file_size - (start.chunk_count - 1) * start.chunk_size
        self._book = ReceiveBook(start.chunk_count, window, offset, chain)
        self._start_reply = StartReply(start.transfer_id, TransferStatus.OK, window, offset)
        self._finish_reply = None
        self._reset_counters(offset)
        self._started_at = now
        self._last_chunk_at = now
        self.phase = ReceiverPhase.RECEIVING
        out.append(TransferStarted(start, offset))
        out.append(self._start_reply)
        return out

    def _refusal(self, start: UpdateStart) -> tuple[TransferStatus, str] | None:
        if start.file_size > self._max_file_size:
            return TransferStatus.TOO_LARGE, (
                f"{start.file_size}-byte file exceeds this device's {self._max_file_size} bytes"
            )
        if self._check_start is not None:
            try:
                self._check_start(start)
            except TransferRejectedError as exc:
                return exc.status, str(exc)
        return None

    def _resume_point(self, start: UpdateStart, out: list[ReceiverOutput]) -> tuple[int, int]:
        """(chunks held, chain) to resume ``start`` from, after checking the stored prefix."""
        saved = self._persist
        if saved is None or saved.count == 0:
            return 0, 0
        if saved.file_sha256 != start.file_sha256 or saved.file_size != start.file_size:
            out.append(PartialDiscarded("a different file is offered"))
            return 0, 0
        if start.discard_partial:
            out.append(PartialDiscarded("the server asked to discard partial data"))
            return 0, 0
        prefix = saved.prefix_bytes
        try:
            stored = memoryview(self._read_stored(0, prefix)).cast("B")
        except OSError as exc:
            out.append(PartialDiscarded(f"reading the partial download failed: {exc}"))
            return 0, 0
        if len(stored) != prefix or (
            stored_prefix_chain(stored, saved.chunk_size, saved.count) != saved.chain
        ):
            out.append(PartialDiscarded("the stored partial data no longer matches its chain"))
            return 0, 0
        if saved.chunk_size == start.chunk_size:
            return saved.count, saved.chain
        # Another transport, another chunk size: keep the whole chunks of the new size.
        count = start.chunk_count if prefix == start.file_size else prefix // start.chunk_size
        return count, stored_prefix_chain(stored, start.chunk_size, count)

    # --- finish -----------------------------------------------------------------------------

    def _on_finish(self, finish: UpdateFinish, now: float) -> list[ReceiverOutput]:
        if self._lapsed and finish.transfer_id == self._tid:
            # The server never heard our FinishReply and asks again after we stopped
            # waiting: answer as before (an UNKNOWN_TRANSFER Cancel would fail an update
            # whose file is validated). Its FinishAck then finds the transfer lapsed.
            assert self._finish_reply is not None
            return [self._finish_reply]
        if finish.transfer_id != self._tid or self.phase is ReceiverPhase.IDLE:
            return self._unknown_transfer(finish.transfer_id, now)
        if self.phase is not ReceiverPhase.RECEIVING:
            assert self._finish_reply is not None
            return [self._finish_reply]  # the server missed our reply: repeat it
        out: list[ReceiverOutput] = []
        self._flush_state(out)
        if not self._book.complete:
            status = TransferStatus.INCOMPLETE
            reason = f"finish with {self._book.count} of {self._book.chunk_count} chunks in order"
        else:
            status, reason = self._validate()
        self._finish_reply = FinishReply(self._tid, status, self._stats(now))
        if status is not TransferStatus.OK:
            if status is not TransferStatus.INCOMPLETE:
                self._persist = None  # the stored bytes are wrong: never resume from them
                out.append(SaveState(None))
            out.append(self._finish_reply)
            self._go_idle()
            out.append(TransferFailed(reason, status))
            return out
        assert self._persist is not None
        self._persist = replace(self._persist, validated=True)
        out.append(SaveState(self._persist))
        out.append(self._finish_reply)
        self.phase = ReceiverPhase.VALIDATED
        self._finish_attempts = 0
        self._finish_deadline = now + self._finish_retry
        return out

    def _on_late_ack(self) -> list[ReceiverOutput]:
        """The FinishAck of the lapsed transfer came after the receiver stopped waiting.

        Safe to apply: the device validated this very file (same transfer id) and the
        server recorded the completion before sending the ack. The slot is validated again
        first, so a file is never applied that is not the validated one: nothing writes the
        slot without a new UpdateStart (which ends the lapse), but the check costs one pass
        over the file and the device applies it only once.
        """
        self._lapsed = False
        assert self._start is not None and self._finish_reply is not None
        status, reason = self._validate()
        if status is not TransferStatus.OK:
            self._persist = None  # the stored bytes are no longer the validated file
            return [SaveState(None), TransferFailed(f"late confirmation refused: {reason}",
                                                    status)]
        self.phase = ReceiverPhase.DONE
        return [ReadyToApply(self._start, self._finish_reply.stats)]

    def _validate(self) -> tuple[TransferStatus, str]:
        """Check the assembled file: SHA-256, module image (full images), device hook."""
        start = self._start
        assert start is not None
        try:
            view = memoryview(self._read_stored(0, start.file_size)).cast("B")
        except OSError as exc:
            return TransferStatus.STORAGE_ERROR, f"reading the stored file failed: {exc}"
        if len(view) != start.file_size:
            return TransferStatus.STORAGE_ERROR, (
                f"the slot returned {len(view)} of {start.file_size} bytes"
            )
        digest = hashlib.sha256(view).digest()
        if digest != start.file_sha256:
            return TransferStatus.SHA256_MISMATCH, (
                f"assembled file has SHA-256 {digest.hex()}, expected {start.file_sha256.hex()}"
            )
        if start.is_image:  # a delta or compressed file is checked once rebuilt (check_file)
            try:
                info = validate_module(view)
            except ModuleFormatError as exc:
                return TransferStatus.INVALID_MODULE, f"not a valid module image: {exc}"
            announced = (start.module_function, start.module_index, start.module_version)
            found = (info.module_function, info.module_index, info.module_version)
            if start.module_function and announced != found:
                return TransferStatus.INVALID_MODULE, (
                    f"module is function/index/version {found}, UpdateStart announced {announced}"
                )
        if self._check_file is not None:
            try:
                self._check_file(start, view)
            except TransferRejectedError as exc:
                return exc.status, f"the device refused the file: {exc}"
        return TransferStatus.OK, ""

    # --- bookkeeping ------------------------------------------------------------------------

    def _go_idle(self) -> None:
        self.phase = ReceiverPhase.IDLE
        self._ack_deadline = None
        self._finish_deadline = None

    def _reset_counters(self, resumed: int) -> None:
        self._resumed = resumed
        self._received = 0
        self._duplicate = 0
        self._out_of_order = 0
        self._corrupt = 0
        self._dropped = 0
        self._acks_sent = 0

    def _stats(self, now: float) -> ReceiverStats:
        elapsed_ms = max(0, round((now - self._started_at) * 1000))
        counters = (self._received, self._duplicate, self._out_of_order, self._corrupt)
        return ReceiverStats(self._resumed, *counters, self._dropped, self._acks_sent, elapsed_ms)
