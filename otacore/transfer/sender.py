"""Server side of the firmware transfer: a sans-IO state machine (no sockets, no clock).

Feed it the device's messages with :meth:`TransferSender.handle` and call
:meth:`TransferSender.poll` at :meth:`TransferSender.next_deadline`; both return the messages to
send (instances of :class:`~otacore.transfer.messages.Message`) interleaved with events
(:class:`~otacore.transfer.messages.Event`), in the order they happened.

Flow control: the device announces a window (chunks it buffers beyond its in-order count, Device
OS uses 128 KiB / chunk size); the sender never sends chunk ``base + window + 1`` before chunk
``base + 1`` is acknowledged, so a slow device is never flooded and at most one window is sent
twice after an interruption. Retransmission: holes revealed by the ack bitmap are re-sent at
once (RACK-style, see bitmap.SendBook); a retransmission timer (RFC 6298: SRTT/RTTVAR, floor,
exponential back-off) re-sends the lowest missing chunk as a probe, and the transfer fails after
``max_rounds`` consecutive expiries without any progress.

Congestion control (RFC 5681, counted in chunks): the window is what the device can hold, not
what the path can carry. Chunks in flight, new or re-sent, are also capped by a congestion
window (RFC 6675's pipe against cwnd) that starts at ``initial_cwnd`` (RFC 6928), grows by
one chunk per chunk acknowledged in slow start and by one chunk per window in congestion
avoidance, halves once per window of data when a loss is detected (RFC 6582's recovery
point), and drops to one chunk after a timeout. A tail-loss probe, a timeout and entering
recovery always send one chunk. A congested cell or an overloaded server then sees fewer
chunks lost and sent twice: cellular data is paid for, and every retransmission is paid
twice.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import Enum

import numpy as np

from otacore._types import Buffer
from otacore.errors import ValidationError
from otacore.integrity import crc32_batch
from otacore.transfer.bitmap import SendBook
from otacore.transfer.messages import (
    MAX_CHUNK_SIZE,
    MAX_WINDOW,
    MIN_CHUNK_SIZE,
    Cancel,
    Chunk,
    ChunkAck,
    Event,
    FinishAck,
    FinishReply,
    Message,
    SenderStats,
    StartReply,
    TransferCompleted,
    TransferFailed,
    TransferProgress,
    TransferStatus,
    UpdateFinish,
    UpdateStart,
)

#: What handle/poll/start return: messages to send and events, in order.
Output = Message | Event


class PreparedFile:
    """A file cut into chunks once: zero-copy view, SHA-256 and every chunk's CRC-32.

    Build one per (file, chunk size) and share it between all the senders pushing that file:
    10,000 devices then cost one SHA-256 and one batch CRC pass, not 10,000. ``data`` may be
    any buffer, including an ``mmap`` of the stored blob (which makes it a lazy reader).
    """

    __slots__ = ("chunk_count", "chunk_crcs", "chunk_size", "sha256", "size", "view")

    def __init__(self, data: Buffer, chunk_size: int) -> None:
        if chunk_size % 4 or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise ValueError(
                f"chunk size {chunk_size} must be a multiple of 4 within "
                f"{MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
            )
        view = memoryview(data).cast("B")
        if not len(view):
            raise ValueError("cannot transfer an empty file")
        if len(view) > 0xFFFFFFFF:
            raise ValueError(f"file of {len(view)} bytes exceeds the 4 GiB protocol limit")
        self.view = view
        self.size = len(view)
        self.chunk_size = chunk_size
        self.chunk_count = -(-self.size // chunk_size)
        self.sha256 = hashlib.sha256(view).digest()
        ends = np.minimum(np.arange(self.chunk_count + 1, dtype=np.int64) * chunk_size, self.size)
        #: CRC-32 of each chunk; a list of ints so indexing costs no conversion per chunk.
        self.chunk_crcs: list[int] = crc32_batch(view, ends).tolist()


class SenderPhase(Enum):
    """Where the sender is in the exchange."""

    NEW = "new"
    STARTING = "starting"  # UpdateStart sent, waiting for StartReply
    SENDING = "sending"
    FINISHING = "finishing"  # UpdateFinish sent, waiting for FinishReply
    DONE = "done"
    FAILED = "failed"


@dataclass(slots=True, frozen=True)
class RetransmitPolicy:
    """Retransmission timer settings (RFC 6298 sections 2 and 5)."""

    initial_rto: float = 1.0  # before the first RTT sample (section 2.1)
    min_rto: float = 0.5  # floor; above the device's 200 ms delayed-ack timer
    max_rto: float = 30.0  # cap of the exponential back-off (section 5.5)
    max_rounds: int = 8  # consecutive expiries without progress before giving up
    max_ack_delay: float = 0.2  # the device's delayed-ack timer, added to the probe timeout
    initial_cwnd: int = 10  # congestion window before any ack, in chunks (RFC 6928)
    congestion_control: bool = True  # False: only the device's window limits the flight

    def __post_init__(self) -> None:
        for name in ("initial_rto", "min_rto", "max_rto"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValidationError(f"{name} must be a positive number of seconds, not "
                                      f"{value!r}")
        if not self.min_rto <= self.max_rto:
            raise ValidationError(f"min_rto ({self.min_rto}) must not exceed max_rto "
                                  f"({self.max_rto})")
        if not (math.isfinite(self.max_ack_delay) and self.max_ack_delay >= 0):
            raise ValidationError(f"max_ack_delay must be 0 or more seconds, not "
                                  f"{self.max_ack_delay!r}")
        if self.max_rounds < 1:
            raise ValidationError(f"max_rounds must be at least 1, not {self.max_rounds}")
        if not 1 <= self.initial_cwnd <= MAX_WINDOW:
            raise ValidationError(f"initial_cwnd must be 1 to {MAX_WINDOW} chunks, not "
                                  f"{self.initial_cwnd}")


class TransferSender:
    """Push one file to one device: UpdateStart, windowed chunks, UpdateFinish, FinishAck."""

    def __init__(
        self,
        file: Buffer | PreparedFile,
        chunk_size: int,
        window_limit: int,
        transfer_id: int,
        *,
        module_function: int = 0,
        module_index: int = 0,
        module_version: int = 0,
        base_sha256: bytes | None = None,
        compressed: bool = False,
        discard_partial: bool = False,
        policy: RetransmitPolicy | None = None,
        progress_step: int = 16384,
    ) -> None:
        """Prepare a transfer of ``file`` in ``chunk_size`` chunks.

        ``window_limit`` caps the device's window (chunks in flight beyond the acknowledged
        in-order count). ``base_sha256`` makes it a delta transfer, ``compressed`` a transfer of
        the image as one zstd frame. ``progress_step`` (bytes) throttles TransferProgress events
        (one per that many newly acknowledged bytes, and one at the end); 0 reports every ack
        that makes progress.
        """
        if isinstance(file, PreparedFile):
            if file.chunk_size != chunk_size:
                raise ValueError(
                    f"the prepared file is cut in {file.chunk_size}-byte chunks, not {chunk_size}"
                )
            prepared = file
        else:
            prepared = PreparedFile(file, chunk_size)
        if not 1 <= window_limit <= MAX_WINDOW:
            raise ValueError(f"window limit {window_limit} is outside 1..{MAX_WINDOW}")
        if not 0 <= transfer_id <= 0xFFFFFFFF:
            raise ValueError(f"transfer id {transfer_id} does not fit in 32 bits")
        self.file = prepared
        self.transfer_id = transfer_id
        self.window_limit = window_limit
        self.policy = policy or RetransmitPolicy()
        self.start_message = UpdateStart(
            transfer_id,
            prepared.size,
            chunk_size,
            prepared.sha256,
            module_function,
            module_index,
            module_version,
            base_sha256,
            discard_partial,
            compressed,
        )
        self.phase = SenderPhase.NEW
        self.book = SendBook(prepared.chunk_count)
        #: Effective window once the device answered: min(window_limit, device window).
        self.window = 0
        self.resume_offset = 0
        self._progress_step = progress_step
        self._reported_bytes = -1
        self._srtt: float | None = None
        self._rttvar = 0.0
        self._reorder_time = 0.001
        self._rto = self.policy.initial_rto
        self._deadline: float | None = None
        self._probe_pending = False
        self._probes = 0
        self._rounds = 0
        self._control_sent_at = 0.0
        self._control_retried = False
        self._chunks_sent = 0
        self._retransmitted = 0
        self._bytes_sent = 0
        self._bytes_retransmitted = 0
        self._timeouts = 0
        #: Congestion window and slow-start threshold, in chunks (RFC 5681 section 3.1).
        self.cwnd = float(self.policy.initial_cwnd)
        self._ssthresh = float("inf")
        #: In loss recovery until chunks up to this number are acknowledged (RFC 6582).
        self._recovery_until = 0
        #: Fast recovery (a detected loss, not a timeout): the window does not grow in it.
        self._fast_recovery = False

    # --- public API -----------------------------------------------------------------------

    def start(self, now: float) -> list[Output]:
        """Begin: return the UpdateStart to send."""
        if self.phase is not SenderPhase.NEW:
            raise RuntimeError(f"start() called twice (phase {self.phase.value})")
        self.phase = SenderPhase.STARTING
        return [self._send_control(self.start_message, now, retry=False)]

    def handle(self, message: Message, now: float) -> list[Output]:
        """Process one message from the device; messages of other transfers are ignored."""
        if message.transfer_id != self.transfer_id:
            return []
        if isinstance(message, ChunkAck):
            return self._on_ack(message, now)
        if isinstance(message, StartReply):
            return self._on_start_reply(message, now)
        if isinstance(message, FinishReply):
            return self._on_finish_reply(message, now)
        if isinstance(message, Cancel):
            if self.phase in (SenderPhase.DONE, SenderPhase.FAILED):
                return []
            detail = f": {message.reason}" if message.reason else ""
            return self._fail(f"the device cancelled the transfer{detail}", message.status)
        return []  # server-bound kinds only; anything else is not for us

    def poll(self, now: float) -> list[Output]:
        """Run the retransmission timer; call at (or after) next_deadline()."""
        if self._deadline is None or now < self._deadline:
            return []
        if self._probe_pending:
            # Tail loss probe (RFC 8985 section 7): before a full timeout, re-send the highest
            # outstanding chunk; its ack reveals every hole below it. No back-off yet.
            self._probe_pending = False
            self._probes += 1
            self.book.mark_highest_lost()
            out: list[Output] = []
            self._send_chunks(now, out, at_least=1)
            self._deadline = now + self._rto
            return out
        self._timeouts += 1
        self._rounds += 1
        if self._rounds > self.policy.max_rounds:
            waited = {
                SenderPhase.STARTING: "a reply to UpdateStart",
                SenderPhase.SENDING: "chunk acknowledgements",
                SenderPhase.FINISHING: "a reply to UpdateFinish",
            }.get(self.phase, "the device")
            return self._fail(
                f"gave up after {self.policy.max_rounds} retransmission rounds without "
                f"{waited}; the device or the link is down",
                TransferStatus.TIMEOUT,
            )
        # RFC 6298 section 5.5: back off the timer on each expiry.
        self._rto = min(self._rto * 2, self.policy.max_rto)
        if self.phase is SenderPhase.STARTING:
            return [self._send_control(self.start_message, now, retry=True)]
        if self.phase is SenderPhase.FINISHING:
            return [self._send_control(UpdateFinish(self.transfer_id), now, retry=True)]
        if self.policy.congestion_control:
            self._on_congestion(timeout=True)
        # RFC 6298 section 5.4: re-send the earliest unacknowledged chunk only. Marking the
        # whole flight lost (go-back-N) re-sent every chunk a busy server's late acks had
        # not yet confirmed: in a 10,000-device run, 17% of the bytes instead of 4%.
        self.book.mark_lowest_lost()
        out = []
        self._send_chunks(now, out, at_least=1)
        self._deadline = now + self._rto
        return out

    def next_deadline(self) -> float | None:
        """When poll() next has work to do, or None."""
        return self._deadline

    def cancel(self, now: float, reason: str = "cancelled by the server") -> list[Output]:
        """Abandon the transfer: a Cancel for the device, then TransferFailed."""
        if self.phase in (SenderPhase.DONE, SenderPhase.FAILED):
            return []
        out: list[Output] = [Cancel(self.transfer_id, TransferStatus.CANCELLED, reason)]
        out.extend(self._fail(reason, TransferStatus.CANCELLED))
        return out

    @property
    def finished(self) -> bool:
        """True once the transfer succeeded or failed."""
        return self.phase in (SenderPhase.DONE, SenderPhase.FAILED)

    def stats(self) -> SenderStats:
        """Counters of this session so far."""
        return SenderStats(
            self._chunks_sent,
            self._retransmitted,
            self._bytes_sent,
            self._timeouts,
            self._probes,
            self._srtt or 0.0,
            self._bytes_retransmitted,
        )

    # --- message handlers -------------------------------------------------------------------

    def _on_start_reply(self, reply: StartReply, now: float) -> list[Output]:
        if self.phase is not SenderPhase.STARTING:
            return []  # a duplicate reply to a retransmitted UpdateStart
        if reply.status is not TransferStatus.OK:
            return self._fail(f"the device refused the update ({reply.status.name})", reply.status)
        n = self.file.chunk_count
        if reply.resume_offset > n:
            return self._fail(
                f"the device resumes at chunk {reply.resume_offset} of a {n}-chunk file",
                TransferStatus.BAD_PARAMETERS,
            )
        self._sample_control_rtt(now)
        self.window = min(self.window_limit, reply.window)
        self.cwnd = float(min(self.window, self.policy.initial_cwnd))
        self.resume_offset = reply.resume_offset
        self.book = SendBook(n, reply.resume_offset)
        self._rounds = 0
        self.phase = SenderPhase.SENDING
        out: list[Output] = []
        if self.book.complete:
            out.append(self._begin_finish(now))
            return out
        self._send_chunks(now, out)
        self._arm_timer(now)
        return out

    def _on_ack(self, ack: ChunkAck, now: float) -> list[Output]:
        if self.phase is not SenderPhase.SENDING:
            return []
        book = self.book
        if ack.in_order >= book.next_new:
            return []  # claims chunks this session never sent: a stale or bogus ack
        newly, sample_at = book.apply_ack(ack.in_order, ack.bitmap)
        out: list[Output] = []
        if newly:
            self._grow_cwnd(newly)
            if sample_at is not None:
                self._update_rtt(now - sample_at)
            else:
                self._rto = self._base_rto()  # progress ends any back-off
            self._rounds = 0
            self._report_progress(out)
            if book.base >= book.chunk_count:
                out.append(self._begin_finish(now))
                return out
        # Chunks held past a gap: look for losses. Entering recovery re-sends the first
        # lost chunk at once whatever the window (fast retransmit, RFC 6675 section 5 step 4).
        entered_recovery = False
        if book.acked >> (book.base + 1) and book.detect_losses(self._reorder_time):
            entered_recovery = self._on_congestion(timeout=False)
        self._send_chunks(now, out, at_least=1 if entered_recovery else 0)
        if newly:
            # RFC 6298 section 5.3: restart the timer when new data is acknowledged.
            if book.outstanding():
                self._arm_timer(now)
            else:
                self._deadline = None
        return out

    def _on_finish_reply(self, reply: FinishReply, now: float) -> list[Output]:
        if self.phase is SenderPhase.DONE:
            # Our FinishAck was lost and the device asks again: confirm again.
            return [FinishAck(self.transfer_id)] if reply.status is TransferStatus.OK else []
        if self.phase is not SenderPhase.FINISHING:
            return []
        self._deadline = None
        if reply.status is not TransferStatus.OK:
            return self._fail(
                f"the device rejected the assembled file ({reply.status.name})", reply.status
            )
        self._sample_control_rtt(now)
        self.phase = SenderPhase.DONE
        return [FinishAck(self.transfer_id), TransferCompleted(reply.stats, self.stats())]

    # --- helpers ----------------------------------------------------------------------------

    def _in_flight(self) -> int:
        """Chunks sent and neither acknowledged nor judged lost (RFC 6675's pipe)."""
        book = self.book
        return (book.outstanding() & ~book.lost).bit_count()

    def _grow_cwnd(self, newly: int) -> None:
        """RFC 5681 section 3.1: slow start below ssthresh, congestion avoidance above;
        no growth in fast recovery from a loss (RFC 6582)."""
        if self._fast_recovery:
            if self.book.base < self._recovery_until:
                return
            self._fast_recovery = False
        if self.cwnd < self._ssthresh:
            self.cwnd += newly
        else:
            self.cwnd += newly / self.cwnd
        if self.cwnd > self.window:
            self.cwnd = float(self.window)

    def _on_congestion(self, *, timeout: bool) -> bool:
        """A loss: halve the window once per window of data (RFC 6582's recovery point);
        after a timeout, restart from one chunk (RFC 5681 section 3.1, equation 4). False
        when the loss belongs to a window already reduced for."""
        book = self.book
        if not timeout and book.base < self._recovery_until:
            return False  # the same window's losses: one reduction
        if not timeout or self._rounds <= 1:
            # Half the congestion window (as Linux's Reno does; RFC 5681's FlightSize is
            # near it while a transfer streams, and an ack that revealed the loss may have
            # emptied the flight), never below two chunks; a timeout repeated without
            # progress keeps the first one's threshold (RFC 5681 section 3.1).
            self._ssthresh = max(self.cwnd / 2, 2.0)
        self.cwnd = 1.0 if timeout else self._ssthresh
        self._fast_recovery = not timeout
        self._recovery_until = book.next_new - 1
        return True

    def _send_chunks(self, now: float, out: list[Output], at_least: int = 0) -> None:
        budget = None
        if self.policy.congestion_control:
            budget = max(at_least, int(self.cwnd) - self._in_flight())
        numbers, retransmissions = self.book.schedule(self.window, now, budget)
        if not numbers:
            return
        view = self.file.view
        crcs = self.file.chunk_crcs
        size = self.file.size
        step = self.file.chunk_size
        tid = self.transfer_id
        sent_bytes = 0
        for number in numbers:
            offset = (number - 1) * step
            end = offset + step if offset + step < size else size
            sent_bytes += end - offset
            out.append(Chunk(tid, number, crcs[number - 1], view[offset:end]))
        self._chunks_sent += len(numbers)
        self._bytes_sent += sent_bytes
        if retransmissions:  # the lost chunks come first (TransferBook.schedule)
            self._retransmitted += retransmissions
            self._bytes_retransmitted += sum(
                min(step, size - (number - 1) * step) for number in numbers[:retransmissions])
        if self._deadline is None:
            self._arm_timer(now)

    def _arm_timer(self, now: float) -> None:
        """Start the timer: a tail-loss probe first when an RTT is known, else the RTO."""
        if self._srtt is None:
            self._deadline = now + self._rto
            self._probe_pending = False
            return
        # RFC 8985 section 7.2: PTO = 2 * SRTT, plus the peer's delayed-ack allowance.
        probe = 2 * self._srtt + self.policy.max_ack_delay
        self._probe_pending = probe < self._rto
        self._deadline = now + min(probe, self._rto)

    def _send_control(
        self, message: UpdateStart | UpdateFinish, now: float, retry: bool
    ) -> Message:
        self._control_sent_at = now
        self._control_retried = retry
        self._probe_pending = False
        self._deadline = now + self._rto
        return message

    def _begin_finish(self, now: float) -> Message:
        self.phase = SenderPhase.FINISHING
        self._rounds = 0
        return self._send_control(UpdateFinish(self.transfer_id), now, retry=False)

    def _sample_control_rtt(self, now: float) -> None:
        if not self._control_retried:  # Karn's rule: no sample from a retransmitted request
            self._update_rtt(now - self._control_sent_at)
        self._rto = self._base_rto()

    def _update_rtt(self, rtt: float) -> None:
        # RFC 6298 sections 2.2 and 2.3, alpha = 1/8, beta = 1/4.
        if self._srtt is None:
            srtt = rtt
            self._rttvar = rtt / 2
        else:
            self._rttvar = 0.75 * self._rttvar + 0.25 * abs(self._srtt - rtt)
            srtt = 0.875 * self._srtt + 0.125 * rtt
        self._srtt = srtt
        # RACK reordering window: a quarter of the round trip (RFC 8985 section 6.2).
        self._reorder_time = srtt / 4 if srtt > 0.004 else 0.001
        self._rto = self._base_rto()

    def _base_rto(self) -> float:
        if self._srtt is None:
            return self.policy.initial_rto
        rto = self._srtt + max(0.001, 4 * self._rttvar)  # section 2.3, G = 1 ms
        policy = self.policy
        return policy.min_rto if rto < policy.min_rto else min(rto, policy.max_rto)

    def _report_progress(self, out: list[Output]) -> None:
        step = self.file.chunk_size
        acked = self.book.acked.bit_count() * step
        if self.book.acked >> (self.file.chunk_count - 1):  # the last chunk may be short
            acked -= self.file.chunk_count * step - self.file.size
        if acked - self._reported_bytes >= self._progress_step or acked == self.file.size:
            self._reported_bytes = acked
            out.append(TransferProgress(acked, self.file.size))

    def _fail(self, reason: str, status: TransferStatus) -> list[Output]:
        self.phase = SenderPhase.FAILED
        self._deadline = None
        return [TransferFailed(reason, status)]
