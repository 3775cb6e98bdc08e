"""Deterministic simulations: TransferSender and TransferReceiver over a seeded lossy link.

The harness (Link, Device, Simulation) is also used by bench/test_bench_transfer.py. Every
message crosses the link in its binary form (encode_message/decode_message), so the codec is
exercised too. Sessions end on success, failure or a link cut; the next session starts a new
sender with a new transfer id, as the session layer would after a reconnect.
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore.module import build_module
from otacore.transfer import (
    Chunk,
    ChunkAck,
    Message,
    PreparedFile,
    ReadyToApply,
    ReceiverPhase,
    ReceiverState,
    ReceiverStats,
    RetransmitPolicy,
    SaveState,
    StartReply,
    TransferCompleted,
    TransferFailed,
    TransferReceiver,
    TransferSender,
    TransferStatus,
    WriteChunk,
    decode_message,
    encode_message,
)
from otacore.transfer.messages import MessageKind

_CHUNK_DATA_OFFSET = 1 + 12  # kind tag + Chunk header in encode_message's form


@dataclass
class LinkConfig:
    """Impairments applied independently to every message, in both directions."""

    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0  # probability that a message takes a slower path and is overtaken
    corrupt: float = 0.0  # probability of flipping one byte of a chunk's data
    latency: float = 0.02
    jitter: float = 0.0  # random extra latency; messages on the main path stay in order
    #: A bottleneck toward the device (a cell, a congested server): messages per second it
    #: forwards (0: none) and how many may wait in its drop-tail queue.
    bottleneck_rate: float = 0.0
    queue_limit: int = 0


class Device:
    """An emulated device: an inactive slot, a saved-state record and a receiver."""

    def __init__(self, slot_size: int, **receiver_options: object) -> None:
        self.slot = bytearray(slot_size)
        self.saved: bytes | None = None
        self.options = receiver_options
        self.ready: list[ReadyToApply] = []
        self.failures: list[TransferFailed] = []
        self.saves = 0
        self.receiver = self._boot()

    def _read(self, offset: int, length: int) -> memoryview:
        return memoryview(self.slot)[offset : offset + length]

    def _boot(self) -> TransferReceiver:
        state = ReceiverState.from_bytes(self.saved) if self.saved is not None else None
        return TransferReceiver(state, read_stored=self._read, **self.options)  # type: ignore[arg-type]

    def reboot(self) -> None:
        """Lose everything in memory; keep the slot and the saved record."""
        self.receiver = self._boot()

    def apply(self, outputs: Sequence[object]) -> list[Message]:
        """Carry out the receiver's outputs in order; return the messages to send."""
        messages: list[Message] = []
        for item in outputs:
            if isinstance(item, Message):
                messages.append(item)
            elif isinstance(item, WriteChunk):
                data = memoryview(item.data).cast("B")
                self.slot[item.offset : item.offset + len(data)] = data
            elif isinstance(item, SaveState):
                self.saved = None if item.state is None else item.state.to_bytes()
                self.saves += 1
            elif isinstance(item, ReadyToApply):
                self.ready.append(item)
            elif isinstance(item, TransferFailed):
                self.failures.append(item)
        return messages


@dataclass
class SessionRecord:
    """What one session did, as seen from outside both state machines."""

    transfer_id: int
    sent_chunks: set[int] = field(default_factory=set)
    chunk_sends: int = 0
    bytes_sent: int = 0
    outcome: object = None
    resume_offset: int = 0
    # Chunk deliveries the receiver processed while receiving this transfer.
    delivered_chunks: int = 0
    delivered_corrupt: int = 0
    acks_emitted: int = 0
    window: int = 0
    peak_cwnd: float = 0.0


class Simulation:
    """Run transfer sessions between a server and a Device over a simulated link."""

    def __init__(
        self,
        image: bytes,
        *,
        seed: int = 0,
        link: LinkConfig | None = None,
        chunk_size: int = 512,
        window_limit: int = 256,
        policy: RetransmitPolicy | None = None,
        device: Device | None = None,
        codec: bool = True,
        first_transfer_id: int = 1,
        **receiver_options: object,
    ) -> None:
        self.image = image
        self.prepared = PreparedFile(image, chunk_size)
        self.rng = random.Random(seed)
        self.link = link or LinkConfig()
        self.chunk_size = chunk_size
        self.window_limit = window_limit
        self.policy = policy or RetransmitPolicy(max_rounds=12)
        self.device = device or Device(len(image) + 4096, **receiver_options)
        self.codec = codec
        self.first_transfer_id = first_transfer_id
        self.now = 0.0
        self.sessions: list[SessionRecord] = []
        self.deliveries = 0
        self._order = 0
        self._fifo = {True: 0.0, False: 0.0}  # last in-order delivery time per direction
        self._bottleneck_free_at = 0.0
        self.bottleneck_drops = 0

    # --- link -------------------------------------------------------------------------------

    def _transmit(
        self,
        queue: list[tuple[float, int, bool, object, bool]],
        to_device: bool,
        messages: list[Message],
    ) -> None:
        link = self.link
        rng = self.rng
        for message in messages:
            service = 0.0
            if to_device and link.bottleneck_rate:
                # Drop-tail: the queue holds what arrived and is not forwarded yet.
                backlog = max(0.0, self._bottleneck_free_at - self.now) * link.bottleneck_rate
                if backlog >= link.queue_limit:
                    self.bottleneck_drops += 1
                    continue
                start = max(self._bottleneck_free_at, self.now)
                self._bottleneck_free_at = start + 1 / link.bottleneck_rate
                service = self._bottleneck_free_at - self.now
            copies = 0 if rng.random() < link.loss else 1
            if copies and rng.random() < link.duplicate:
                copies = 2
            for _ in range(copies):
                payload: object = encode_message(message) if self.codec else message
                corrupted = False
                if (
                    isinstance(payload, bytes)
                    and payload[0] == MessageKind.CHUNK
                    and rng.random() < link.corrupt
                ):
                    spot = rng.randrange(_CHUNK_DATA_OFFSET, len(payload))
                    mutable = bytearray(payload)
                    mutable[spot] ^= rng.randrange(1, 256)
                    payload = bytes(mutable)
                    corrupted = True
                # Jitter delays the queue as a whole (delivery stays in order, as on one path);
                # a reordered message takes a slower path and is overtaken.
                at = self.now + service + link.latency + rng.random() * link.jitter
                if rng.random() < link.reorder:
                    at += link.latency * 3
                else:
                    at = max(at, self._fifo[to_device])
                    self._fifo[to_device] = at
                self._order += 1
                heapq.heappush(queue, (at, self._order, to_device, payload, corrupted))

    # --- sessions ---------------------------------------------------------------------------

    def run_session(
        self,
        *,
        cut_after: int | None = None,
        reboot_after: int | None = None,
        keep_link: bool = False,
        max_time: float = 3600.0,
    ) -> SessionRecord:
        """One session: a new sender, until it ends or the link is cut.

        ``cut_after``/``reboot_after`` count deliveries within this session: after that many,
        the link drops everything in flight (and the device reboots, for ``reboot_after``).
        With ``keep_link`` a reboot leaves the link up: the old session's messages reach the
        rebooted device, which must turn them away.
        """
        tid = self.first_transfer_id + len(self.sessions)
        record = SessionRecord(tid)
        self.sessions.append(record)
        sender = TransferSender(
            self.prepared,
            self.chunk_size,
            self.window_limit,
            tid,
            module_function=5,
            module_index=1,
            module_version=7,
            policy=self.policy,
            progress_step=0,
        )
        device = self.device
        queue: list[tuple[float, int, bool, object, bool]] = []
        deadline = self.now + max_time
        delivered = 0

        def from_sender(outputs: Sequence[object]) -> None:
            messages = []
            for item in outputs:
                if isinstance(item, Message):
                    messages.append(item)
                    if isinstance(item, Chunk):
                        # Flow control: nothing beyond the window past the acknowledged count.
                        assert item.index <= sender.book.base + sender.window
                        record.sent_chunks.add(item.index)
                        record.chunk_sends += 1
                        record.bytes_sent += len(item.data)
                elif isinstance(item, (TransferCompleted, TransferFailed)):
                    record.outcome = item
            record.peak_cwnd = max(record.peak_cwnd, sender.cwnd)
            self._transmit(queue, True, messages)

        def from_device(outputs: Sequence[object]) -> None:
            messages = device.apply(outputs)
            for m in messages:
                if isinstance(m, ChunkAck) and m.transfer_id == tid:
                    record.acks_emitted += 1
                elif isinstance(m, StartReply) and m.transfer_id == tid and not record.window:
                    record.resume_offset = m.resume_offset
                    record.window = m.window
            self._transmit(queue, False, messages)

        from_sender(sender.start(self.now))
        while True:
            rx = device.receiver
            times = [t for t in (sender.next_deadline(), rx.next_deadline()) if t is not None]
            if queue:
                times.append(queue[0][0])
            if sender.finished and not queue and rx.phase is not ReceiverPhase.VALIDATED:
                break
            if not times or min(times) > deadline:
                break
            self.now = max(self.now, min(times))
            if queue and queue[0][0] <= self.now:
                _, _, to_device, payload, corrupted = heapq.heappop(queue)
                message = decode_message(payload) if isinstance(payload, bytes) else payload
                assert isinstance(message, Message)
                delivered += 1
                self.deliveries += 1
                if to_device:
                    if (
                        isinstance(message, Chunk)
                        and message.transfer_id == tid
                        and rx.phase is ReceiverPhase.RECEIVING
                        and rx.transfer_id == tid
                    ):
                        record.delivered_chunks += 1
                        record.delivered_corrupt += corrupted
                    from_device(rx.handle(message, self.now))
                else:
                    from_sender(sender.handle(message, self.now))
                if reboot_after is not None and delivered == reboot_after:
                    device.reboot()
                    if not keep_link:
                        queue.clear()
                        break
                if cut_after is not None and delivered == cut_after:
                    queue.clear()
                    break
            from_sender(sender.poll(self.now))
            from_device(device.receiver.poll(self.now))
        if record.outcome is None:
            record.outcome = "cut"
        return record

    def run_until_ready(self, max_sessions: int = 20, gap: float = 1.0, **cuts: object) -> int:
        """Run sessions (the first with ``cuts``) until the device may apply; return count."""
        for number in range(max_sessions):
            self.run_session(**(cuts if number == 0 else {}))  # type: ignore[arg-type]
            if self.device.ready:
                return number + 1
            self.now += gap
        raise AssertionError(f"no success after {max_sessions} sessions: {self.sessions}")


def make_image(size: int, seed: int = 1) -> bytes:
    """A valid user-part module image of exactly ``size`` bytes."""
    payload = random.Random(seed).randbytes(size - 68)
    return build_module(payload, platform_id=32, function=5, version=7)


def assert_delivered(sim: Simulation) -> None:
    """The slot holds the image and the statistics agree with what the link delivered."""
    image = sim.image
    assert bytes(sim.device.slot[: len(image)]) == image
    assert len(sim.device.ready) == 1
    last = sim.sessions[-1]
    assert isinstance(last.outcome, TransferCompleted)
    stats: ReceiverStats = last.outcome.stats
    n = sim.prepared.chunk_count
    assert stats.resumed_chunks + stats.received == n
    assert stats.corrupt == last.delivered_corrupt
    assert stats.received + stats.duplicate + stats.corrupt + stats.dropped == (
        last.delivered_chunks
    )
    assert stats.out_of_order <= stats.received
    assert stats.acks_sent == last.acks_emitted
    assert sim.device.ready[0].stats == stats


# --- tests ----------------------------------------------------------------------------------

IMAGE_128K = make_image(128 * 1024)


def test_perfect_link_delivers_with_no_waste() -> None:
    sim = Simulation(IMAGE_128K, seed=1)
    assert sim.run_until_ready() == 1
    assert_delivered(sim)
    outcome = sim.sessions[0].outcome
    assert isinstance(outcome, TransferCompleted)
    assert outcome.stats.duplicate == outcome.stats.out_of_order == outcome.stats.corrupt == 0
    assert outcome.sender is not None and outcome.sender.chunks_retransmitted == 0
    assert sim.sessions[0].chunk_sends == sim.prepared.chunk_count
    assert outcome.stats.acks_sent == sim.prepared.chunk_count // 2


@pytest.mark.parametrize(
    "link",
    [
        LinkConfig(loss=0.05),
        LinkConfig(loss=0.2),
        LinkConfig(duplicate=0.2),
        LinkConfig(reorder=0.3, jitter=0.01),
        LinkConfig(corrupt=0.1),
        LinkConfig(loss=0.1, duplicate=0.05, reorder=0.1, corrupt=0.05, jitter=0.01),
    ],
    ids=["loss5", "loss20", "dup20", "reorder30", "corrupt10", "everything"],
)
@pytest.mark.parametrize("chunk_size", [512, 1024, 4096, 16384])
def test_lossy_links_deliver_identical_bytes(link: LinkConfig, chunk_size: int) -> None:
    window = max(1, 128 * 1024 // chunk_size)
    sim = Simulation(IMAGE_128K, seed=7, link=link, chunk_size=chunk_size, window_limit=window)
    sim.run_until_ready()
    assert_delivered(sim)
    if link.corrupt:
        assert any(s.delivered_corrupt for s in sim.sessions)


def test_heavy_loss_still_respects_the_window() -> None:
    sim = Simulation(make_image(64 * 1024), seed=3, link=LinkConfig(loss=0.3), window_limit=16)
    sim.run_until_ready(max_sessions=40)
    assert_delivered(sim)


def _overlaps(sim: Simulation) -> list[int]:
    """Bytes each later session sent again that an earlier session had already sent."""
    seen: set[int] = set()
    overlaps = []
    size, step = sim.prepared.size, sim.chunk_size
    for record in sim.sessions:
        again = record.sent_chunks & seen
        overlaps.append(sum(min(step, size - (k - 1) * step) for k in again))
        seen |= record.sent_chunks
    return overlaps[1:]


@pytest.mark.parametrize("reboot", [False, True], ids=["link-cut", "reboot"])
@pytest.mark.parametrize("seed", range(6))
def test_interruption_resends_at_most_one_window(reboot: bool, seed: int) -> None:
    rng = random.Random(seed)
    window = 32
    sim = Simulation(IMAGE_128K, seed=seed, window_limit=window, link=LinkConfig(loss=0.02))
    point = rng.randrange(1, 350)  # a full session is about 390 deliveries
    sessions = sim.run_until_ready(**({"reboot_after": point} if reboot else {"cut_after": point}))
    assert sessions >= 2
    assert_delivered(sim)
    resent = _overlaps(sim)
    assert resent and all(again <= window * sim.chunk_size for again in resent)
    # The second session started where the device's saved state said.
    assert sim.sessions[1].resume_offset > 0 or point < 10


@pytest.mark.parametrize("keep_link", [False, True], ids=["link-lost", "link-kept"])
def test_reboot_between_any_two_messages(keep_link: bool) -> None:
    image = make_image(6 * 512 + 100)  # 7 chunks, the last one short
    baseline = Simulation(image, seed=0, window_limit=4)
    baseline.run_until_ready()
    total = baseline.deliveries
    assert total > 10
    for point in range(1, total + 1):
        sim = Simulation(image, seed=0, window_limit=4)
        sim.run_until_ready(reboot_after=point, keep_link=keep_link)
        assert_delivered(sim)
        assert len(sim.sessions) >= 2 or point == total, point
        assert all(again <= 4 * 512 for again in _overlaps(sim)), point
        if keep_link and len(sim.sessions) >= 2:
            # The first session learnt of the reboot from the device, not from a timeout.
            first = sim.sessions[0].outcome
            if isinstance(first, TransferFailed):
                assert first.status is TransferStatus.UNKNOWN_TRANSFER, point
            else:  # rebooted between FinishReply and FinishAck: the next session finishes
                assert isinstance(first, TransferCompleted), point


def test_many_interruptions_in_a_row() -> None:
    sim = Simulation(IMAGE_128K, seed=11, window_limit=64, link=LinkConfig(loss=0.05))
    rng = random.Random(5)
    for _ in range(6):
        point = rng.randrange(5, 120)
        if rng.random() < 0.5:
            sim.run_session(cut_after=point)
        else:
            sim.run_session(reboot_after=point)
        if sim.device.ready:
            break  # this one got through before its cut
        sim.now += 5.0
    if not sim.device.ready:
        sim.run_until_ready()
    assert_delivered(sim)
    assert all(again <= 64 * 512 for again in _overlaps(sim))
    total_sent = sum(record.chunk_sends for record in sim.sessions)
    assert total_sent < 3 * sim.prepared.chunk_count


def test_chunk_size_change_between_sessions_resumes_in_bytes() -> None:
    image = make_image(40 * 1024)
    device = Device(len(image))
    first = Simulation(image, device=device, chunk_size=512, window_limit=16)
    first.run_session(cut_after=60)
    held_bytes = device.receiver.state.prefix_bytes  # type: ignore[union-attr]
    assert held_bytes > 0
    second = Simulation(
        image, device=device, chunk_size=2048, window_limit=16, first_transfer_id=100
    )
    second.now = first.now + 1
    second.run_until_ready()
    assert_delivered(second)
    assert second.sessions[0].resume_offset == held_bytes // 2048


def test_without_codec_the_same_transfer_completes() -> None:
    sim = Simulation(IMAGE_128K, seed=2, codec=False, link=LinkConfig(loss=0.05))
    sim.run_until_ready()
    assert bytes(sim.device.slot[: len(IMAGE_128K)]) == IMAGE_128K


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(
    seed=st.integers(0, 2**32 - 1),
    loss=st.floats(0, 0.25),
    duplicate=st.floats(0, 0.1),
    reorder=st.floats(0, 0.3),
    corrupt=st.floats(0, 0.1),
    window=st.integers(1, 48),
    size=st.integers(300, 64 * 1024),
    interruption=st.one_of(
        st.none(),
        st.tuples(st.sampled_from(["cut_after", "reboot_after"]), st.integers(1, 200)),
    ),
)
def test_random_link_patterns(
    seed: int,
    loss: float,
    duplicate: float,
    reorder: float,
    corrupt: float,
    window: int,
    size: int,
    interruption: tuple[str, int] | None,
) -> None:
    link = LinkConfig(loss, duplicate, reorder, corrupt, jitter=0.01)
    sim = Simulation(make_image(size, seed), seed=seed, link=link, window_limit=window)
    cuts = {interruption[0]: interruption[1]} if interruption else {}
    sim.run_until_ready(max_sessions=60, **cuts)
    assert_delivered(sim)
    if interruption:
        assert all(again <= window * 512 for again in _overlaps(sim))


def test_random_bytes_image_is_reproducible() -> None:
    # Same seed, same link: the simulation is deterministic down to the statistics.
    runs = []
    for _ in range(2):
        sim = Simulation(IMAGE_128K, seed=42, link=LinkConfig(loss=0.1, reorder=0.1, jitter=0.01))
        sim.run_until_ready()
        runs.append((sim.now, [r.chunk_sends for r in sim.sessions], sim.sessions[-1].outcome))
    assert runs[0] == runs[1]


def test_congestion_control_spares_a_bottleneck() -> None:
    """Behind a bottleneck (1,000 chunks/s, a 16-chunk queue) a sender that fills the
    device's whole window loses most of it and sends it again; with congestion control
    (RFC 5681) far fewer chunks are lost and re-sent, and the transfer is not slower."""
    bottleneck = LinkConfig(bottleneck_rate=1000.0, queue_limit=16, latency=0.02)
    outcomes = {}
    for controlled in (False, True):
        policy = RetransmitPolicy(max_rounds=12, congestion_control=controlled)
        sim = Simulation(IMAGE_128K, seed=3, link=bottleneck, policy=policy)
        sim.run_until_ready()
        assert_delivered(sim)
        sends = sum(record.chunk_sends for record in sim.sessions)
        outcomes[controlled] = (sends - sim.prepared.chunk_count, sim.bottleneck_drops, sim.now)
    (blind_resent, blind_drops, blind_time), (resent, drops, took) = (
        outcomes[False], outcomes[True])
    assert blind_resent > 100 and blind_drops > 100  # the bottleneck really bites
    assert resent * 5 < blind_resent and drops * 5 < blind_drops
    assert took <= blind_time


def test_congestion_window_opens_to_the_device_window_on_a_clean_link() -> None:
    """On a link without losses slow start opens the congestion window up to the device's
    window: flow control, not congestion control, is what limits a healthy transfer."""
    sim = Simulation(IMAGE_128K, seed=1, window_limit=64)
    assert sim.run_until_ready() == 1
    record = sim.sessions[0]
    assert record.peak_cwnd == 64
    assert record.chunk_sends == sim.prepared.chunk_count  # nothing sent twice
