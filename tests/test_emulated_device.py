"""The emulated device's protocol machine against a scripted cloud built from real parts.

The counterpart (:class:`ScriptedCloud`) is a real CoAP link of the other kind's end, a real
:class:`TransferSender`, real Ed25519-signed manifests and real module images; time is
virtual (:class:`Harness` jumps to the next deadline when nothing is in flight), so minutes of
device time run in milliseconds. ``ScriptedCloud`` is also the server half of the socket tests
in tests/test_emulator_fleet.py.
"""

from __future__ import annotations

import hashlib
import itertools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from otacore.coap import Code, Message, MessageType
from otacore.device import OutcomeStatus, make_test_marker
from otacore.device.availability import (
    RESET_PENDING_EVENT,
    UPDATES_ENABLED_EVENT,
    UPDATES_FORCED_EVENT,
)
from otacore.device.emulated import (
    DeviceConfig,
    DevicePhase,
    DeviceStatus,
    Disconnect,
    EmulatedDevice,
    Reboot,
)
from otacore.messages import (
    Describe,
    DescribeRequest,
    Direction,
    Event,
    Goodbye,
    Hello,
    ServerEvent,
    from_message,
    to_message,
)
from otacore.module import ModuleDependency, build_module, parse_module
from otacore.protocol.link import (
    RequestReceived,
    ResponseReceived,
    TcpLink,
    Transport,
    UdpLink,
)
from otacore.protocol.ota_wire import (
    UPDATE_RESULT_EVENT,
    KeyPage,
    is_transfer,
    key_push_request,
    offer_request,
    parse_transfer,
    parse_update_result,
    transfer_request,
)
from otacore.signing import SigningKey, TrustStore, manifest_for_module, sign_manifest
from otacore.transfer import (
    StartReply,
    TransferCompleted,
    TransferFailed,
    TransferSender,
    TransferStatus,
)
from otacore.transfer.messages import Chunk
from otacore.transfer.messages import Message as TransferMessage
from server.emulator.flash import Flash

PRODUCT = 4242
PLATFORM = 13  # Boron
KEY = SigningKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = SigningKey.from_private_bytes(bytes(range(3, 35)))
STORE = TrustStore.initial(PRODUCT, [KEY.public_key])
DEVICE_ID = "e00fce68" + "0123456789abcdef"
TRANSPORTS = ["tcp", "udp"]


def system_part(version: int, platform: int = PLATFORM) -> bytes:
    payload = hashlib.shake_256(f"system {version}".encode()).digest(6000)
    return build_module(payload, platform_id=platform, function=4, version=version, index=1)


def user_part(
    version: int,
    *,
    needs_system: int = 5000,
    marker: bytes = b"",
    platform: int = PLATFORM,
    size: int = 12000,
) -> bytes:
    body = hashlib.shake_256(f"app {version}".encode()).digest(size)
    return build_module(
        body[: size // 2] + marker + body[size // 2 :],
        platform_id=platform,
        function=5,
        version=version,
        product_id=platform,
        product_version=version,
        dependencies=[ModuleDependency(4, 1, needs_system)],
    )


def signed(image: bytes, key: SigningKey = KEY, **changes: object) -> bytes:
    version = parse_module(image).product_version or 0  # system parts carry none
    manifest = manifest_for_module(image, product_id=PRODUCT, product_version=version)
    if changes:
        manifest = replace(manifest, **changes)  # type: ignore[arg-type]
    return sign_manifest(key, manifest).to_bytes()


SYSTEM = system_part(5000)
V1, V2 = user_part(1), user_part(2)


# --- the scripted cloud ---------------------------------------------------------------------


@dataclass
class Offer:
    """What the cloud offers: the signed manifest, the file it sends, a delta base."""

    manifest: bytes
    file: bytes
    delta_base: bytes | None = None
    module: tuple[int, int, int] = (0, 0, 0)

    @classmethod
    def of(cls, image: bytes, key: SigningKey = KEY) -> Offer:
        info = parse_module(image)
        module = (info.module_function, info.module_index, info.module_version)
        return cls(signed(image, key), image, None, module)


@dataclass
class CloudLog:
    """What every session of the cloud saw (kept across sessions and reboots)."""

    hellos: list[Hello] = field(default_factory=list)
    describes: list[Describe] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    goodbyes: list[Goodbye] = field(default_factory=list)
    offer_answers: list[Message] = field(default_factory=list)
    start_replies: list[StartReply] = field(default_factory=list)
    results: list[TransferCompleted | TransferFailed] = field(default_factory=list)
    responses: list[Message] = field(default_factory=list)
    chunks_sent: int = 0

    def named(self, name: str) -> list[str]:
        return [event.data for event in self.events if event.name == name]


class ScriptedCloud:
    """One server session: answers Hello/Describe/events, offers images, pushes transfers.

    ``policy(cloud, hello)`` runs when a Hello arrives and may call :meth:`offer`.
    """

    transfer_ids = itertools.count(1)

    def __init__(
        self,
        transport: Transport,
        log: CloudLog,
        *,
        policy: Callable[[ScriptedCloud, Hello], None] | None = None,
        on_event: Callable[[ScriptedCloud, Event], None] | None = None,
        chunk_size: int = 512,
        window: int = 32,
        answer_hello: bool = True,
    ) -> None:
        self.link: UdpLink | TcpLink = TcpLink() if transport == "tcp" else UdpLink()
        self.log = log
        self.policy = policy
        self.on_event = on_event
        self.chunk_size = chunk_size
        self.window = window
        self.answer_hello = answer_hello
        self.sender: TransferSender | None = None
        self.now = 0.0
        self._offers: dict[bytes, Offer] = {}
        self._requests: set[bytes] = set()

    # driving
    def receive(self, data: bytes, now: float) -> None:
        self.now = now
        for event in self.link.receive(data, now):
            if isinstance(event, RequestReceived):
                self._on_request(event.message)
            elif isinstance(event, ResponseReceived):
                self._on_response(event.token, event.message)

    def poll(self, now: float) -> None:
        self.now = now
        for event in self.link.poll(now):
            if isinstance(event, ResponseReceived):  # pragma: no cover - poll never answers
                self._on_response(event.token, event.message)
        if self.sender is not None:
            self._send(self.sender.poll(now))

    def next_deadline(self) -> float | None:
        times = [self.link.next_deadline(), self.sender.next_deadline() if self.sender else None]
        present = [t for t in times if t is not None]
        return min(present) if present else None

    def take_outgoing(self) -> list[bytes]:
        return self.link.take_outgoing()

    # what the cloud sends
    def offer(self, offer: Offer) -> None:
        token = self.link.request(offer_request(offer.manifest, offer.delta_base), self.now)
        self._offers[token] = offer

    def send_event(self, name: str, data: str) -> None:
        message = to_message(ServerEvent(name, data, 60), Direction.TO_DEVICE)
        self._requests.add(self.link.request(message, self.now))

    def describe_request(self) -> None:
        message = to_message(DescribeRequest(), Direction.TO_DEVICE)
        self._requests.add(self.link.request(message, self.now))

    def push_keys(self, page: KeyPage) -> None:
        """``POST k``: key rotation statements for the device (its answer is logged)."""
        self._requests.add(self.link.request(key_push_request(page), self.now))

    # handlers
    def _on_request(self, message: Message) -> None:
        if is_transfer(message):
            transfer = parse_transfer(message)
            if isinstance(transfer, StartReply):
                self.log.start_replies.append(transfer)
            if self.sender is not None:
                self._send(self.sender.handle(transfer, self.now))
            return
        payload = from_message(message, Direction.TO_CLOUD)
        if isinstance(payload, Goodbye):
            self.log.goodbyes.append(payload)
            return
        if isinstance(payload, Hello) and not self.answer_hello:
            self.log.hellos.append(payload)
            return
        self.link.respond(message, Message(MessageType.ACK, Code.CHANGED), self.now)
        if isinstance(payload, Hello):
            self.log.hellos.append(payload)
            if self.policy is not None:
                self.policy(self, payload)
        elif isinstance(payload, Describe):
            self.log.describes.append(payload)
        elif isinstance(payload, Event):
            self.log.events.append(payload)
            if self.on_event is not None:
                self.on_event(self, payload)

    def _on_response(self, token: bytes, message: Message) -> None:
        offer = self._offers.pop(token, None)
        if offer is None:
            if token in self._requests:
                self.log.responses.append(message)
            return
        self.log.offer_answers.append(message)
        if message.code != Code.CHANGED:
            return
        function, index, version = offer.module
        self.sender = TransferSender(
            offer.file,
            self.chunk_size,
            self.window,
            next(self.transfer_ids),
            module_function=function,
            module_index=index,
            module_version=version,
            base_sha256=offer.delta_base,
        )
        self._send(self.sender.start(self.now))

    def _send(self, outputs: Sequence[object]) -> None:
        for out in outputs:
            if isinstance(out, TransferMessage):
                if isinstance(out, Chunk):
                    self.log.chunks_sent += 1
                self.link.notify(transfer_request(out), self.now)  # type: ignore[arg-type]
            elif isinstance(out, TransferCompleted | TransferFailed):
                self.log.results.append(out)


def offer_when_behind(offer: Offer, version: int) -> Callable[[ScriptedCloud, Hello], None]:
    """A cloud policy: offer ``offer`` to a device not yet running product ``version``."""

    def policy(cloud: ScriptedCloud, hello: Hello) -> None:
        if hello.product_version != version:
            cloud.offer(offer)

    return policy


# --- the harness: device + cloud on a virtual clock ------------------------------------------


class Harness:
    """One emulated device on its flash, connected to a new ScriptedCloud per session."""

    def __init__(
        self,
        state_dir: Path,
        transport: Transport,
        *,
        images: tuple[bytes, ...] = (SYSTEM, V1),
        store: TrustStore = STORE,
        make_cloud: Callable[[Transport, CloudLog], ScriptedCloud] | None = None,
        config: DeviceConfig | None = None,
        seed: int = 0,
    ) -> None:
        self.state_dir = state_dir
        self.transport = transport
        self.log = CloudLog()
        self.make_cloud = make_cloud or (lambda t, log: ScriptedCloud(t, log))
        self.config = config or DeviceConfig(DEVICE_ID, PLATFORM)
        self.rng = random.Random(seed)
        self.now = 0.0
        self.reboots: list[str] = []
        self.disconnects: list[str] = []
        self.hold_offs: list[float] = []
        self.statuses: list[DeviceStatus] = []
        self.reset_pending_calls = 0
        self.update_pending_calls = 0
        self.auto_connect = True
        self.drop_to_device: Callable[[bytes], bool] | None = None
        #: Pieces delivered per direction and step (None: everything queued).
        self.burst: int | None = None
        self._to_cloud: list[bytes] = []
        self._to_device: list[bytes] = []
        flash = Flash.open(state_dir, fsync=False)
        if flash.load_trust_store() is None:
            flash.provision(images, store)
        self.device = self._new_device(flash)
        self.cloud: ScriptedCloud | None = None

    def _new_device(self, flash: Flash) -> EmulatedDevice:
        device = EmulatedDevice(
            self.config,
            flash,
            on_status=self.statuses.append,
            on_reset_pending=self._count_reset_pending,
            on_update_pending=self._count_update_pending,
        )
        device.boot(self.now)
        return device

    def _count_reset_pending(self) -> None:
        self.reset_pending_calls += 1

    def _count_update_pending(self) -> None:
        self.update_pending_calls += 1

    def kill(self) -> None:
        """SIGKILL between two steps: drop every object, re-open the flash from disk."""
        self._forget_session()
        self.device = self._new_device(Flash.open(self.state_dir, fsync=False))

    def connect(self) -> ScriptedCloud:
        self.cloud = self.make_cloud(self.transport, self.log)
        self.cloud.now = self.now
        self.device.connected(self.transport, self.now)
        return self.cloud

    def drop_link(self, reason: str = "the link dropped") -> None:
        self._forget_session()
        self.device.disconnected(self.now, reason)

    def _pieces(self, out: list[bytes]) -> list[bytes]:
        if self.transport != "tcp" or not out:
            return out
        stream = b"".join(out)  # a stream: cut it at random points
        cuts = sorted(self.rng.sample(range(1, len(stream)), min(3, len(stream) - 1)))
        return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]

    def _deliver(self, queue: list[bytes], receive: Callable[[bytes, float], None]) -> bool:
        """Deliver up to ``burst`` queued pieces (all when burst is None)."""
        count = len(queue) if self.burst is None else min(self.burst, len(queue))
        for data in queue[:count]:
            receive(data, self.now)
        del queue[:count]
        return count > 0

    def step(self) -> bool:
        """Exchange what is queued, obey actions, or advance the clock. False when stuck."""
        device = self.device
        if self.cloud is None and self.auto_connect and device.wants_link:
            self.connect()
        cloud = self.cloud
        moved = False
        if cloud is not None:
            self._to_cloud += self._pieces(device.take_outgoing())
            to_device = self._pieces(cloud.take_outgoing())
            if self.drop_to_device is not None:
                to_device = [d for d in to_device if not self.drop_to_device(d)]
            self._to_device += to_device
            moved |= self._deliver(self._to_cloud, cloud.receive)
            moved |= self._deliver(self._to_device, device.receive)
        for action in device.take_actions():
            moved = True
            if cloud is not None:  # the last words (a Goodbye) still reach the cloud
                self._to_cloud += self._pieces(device.take_outgoing())
                for data in self._to_cloud:
                    cloud.receive(data, self.now)
            self._forget_session()
            if isinstance(action, Reboot):
                self.reboots.append(action.reason)
                device.boot(self.now)
            elif isinstance(action, Disconnect):
                self.disconnects.append(action.reason)
                self.hold_offs.append(action.hold_off)
                device.disconnected(self.now, action.reason)
        if moved:
            return True
        deadlines = [device.next_deadline(), cloud.next_deadline() if cloud else None]
        present = [d for d in deadlines if d is not None]
        if not present:
            return False
        self.now = max(self.now, min(present))
        device.poll(self.now)
        if self.cloud is not None:
            self.cloud.poll(self.now)
        return True

    def _forget_session(self) -> None:
        self.cloud = None
        self._to_cloud.clear()
        self._to_device.clear()

    def run_until(self, condition: Callable[[], bool], *, max_time: float = 3600.0) -> None:
        start = self.now
        while not condition():
            assert self.step(), "nothing left to do and the condition never held"
            assert self.now - start <= max_time, "the condition did not hold in time"

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self.now < end:
            if not self.step():
                self.now = end
                break
            if self.device.next_deadline() is None and self.cloud is None:
                self.now = end

    @property
    def flash(self) -> Flash:
        return self.device.flash  # type: ignore[return-value]

    def running_version(self) -> int:
        return self.device.status().product_version


def results(log: CloudLog) -> list[str]:
    return [parse_update_result(data).status for data in log.named(UPDATE_RESULT_EVENT)]


# --- tests: the update flow -----------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_full_update_flow(tmp_path: Path, transport: Transport) -> None:
    offer = Offer.of(V2)
    h = Harness(
        tmp_path,
        transport,
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
    )
    h.run_until(lambda: bool(results(h.log)) and h.flash.boot_record().outcome is None)
    first, second = h.log.hellos[0], h.log.hellos[-1]
    assert (first.device_id, first.platform_id, first.product_id) == (DEVICE_ID, PLATFORM, PRODUCT)
    assert (first.product_version, first.system_version) == (1, 5000)
    assert first.updates_enabled and first.supports_immediate_updates and not first.ota_succeeded
    assert second.product_version == 2 and second.ota_succeeded
    assert [a.code for a in h.log.offer_answers] == [Code.CHANGED]
    assert isinstance(h.log.results[0], TransferCompleted)
    assert h.reboots == ["firmware update"] and h.log.goodbyes == [Goodbye("update")]
    result = parse_update_result(h.log.named(UPDATE_RESULT_EVENT)[0])
    assert (result.function, result.index, result.version, result.status) == (5, 1, 2, "committed")
    described = {(m.function, m.index): m for m in h.log.describes[-1].modules}
    assert described[(5, 1)].version == 2
    assert described[(5, 1)].sha256 == hashlib.sha256(V2).digest()
    assert described[(5, 1)].size == len(V2)
    assert described[(4, 1)].dependencies == ()
    assert h.flash.read_active(5, 1) == V2 and h.flash.read_inactive(5, 1) == V1
    assert h.flash.load_transfer_state() is None
    status = h.device.status()
    assert status.phase is DevicePhase.ONLINE and status.product_version == 2
    assert status.last_result is not None and status.last_result.status == "committed"
    downloading = [s for s in h.statuses if s.phase is DevicePhase.DOWNLOADING]
    assert downloading and downloading[0].bytes_total == len(V2)
    phases = [s.phase for s in h.statuses]
    for phase in (DevicePhase.DOWNLOADING, DevicePhase.REBOOTING, DevicePhase.ONLINE):
        assert phase in phases


@pytest.mark.parametrize(
    ("image", "key", "reason"),
    [
        (V2, OTHER_KEY, "UNKNOWN_KEY"),
        (user_part(2, platform=12), KEY, "WRONG_PLATFORM"),
        (system_part(4000), KEY, "DOWNGRADE"),
        (user_part(2, needs_system=6000), KEY, "DEPENDENCY_UNMET"),
    ],
    ids=["unknown-key", "wrong-platform", "system-downgrade", "unmet-dependency"],
)
def test_refused_offers_say_why_and_change_nothing(
    tmp_path: Path, image: bytes, key: SigningKey, reason: str
) -> None:
    h = Harness(tmp_path, "udp")
    h.run_until(lambda: h.device.online)
    record = h.flash.boot_record()
    assert h.cloud is not None
    h.cloud.offer(Offer.of(image, key))
    h.run_until(lambda: bool(h.log.offer_answers))
    (answer,) = h.log.offer_answers
    assert answer.code == Code.FORBIDDEN
    assert answer.payload.decode().startswith(reason + ": ")
    assert "\n" not in answer.payload.decode()
    assert h.cloud.sender is None and h.flash.boot_record() == record
    assert h.device.phase is DevicePhase.ONLINE and reason in h.device.last_error


def test_bad_signature_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, "tcp")
    h.run_until(lambda: h.device.online)
    manifest = bytearray(signed(V2))
    manifest[-1] ^= 0x01  # a bit of the Ed25519 signature
    assert h.cloud is not None
    h.cloud.offer(Offer(bytes(manifest), V2, None, (5, 1, 2)))
    h.run_until(lambda: bool(h.log.offer_answers))
    assert h.log.offer_answers[0].code == Code.FORBIDDEN
    assert h.log.offer_answers[0].payload.startswith(b"BAD_SIGNATURE: ")


def test_a_file_other_than_the_signed_one_is_refused_at_start(tmp_path: Path) -> None:
    h = Harness(tmp_path, "udp")
    h.run_until(lambda: h.device.online)
    assert h.cloud is not None
    h.cloud.offer(Offer(signed(V2), user_part(3), None, (0, 0, 0)))
    h.run_until(lambda: bool(h.log.results))
    assert [reply.status for reply in h.log.start_replies] == [TransferStatus.REJECTED]
    assert isinstance(h.log.results[0], TransferFailed)
    assert h.log.results[0].status is TransferStatus.REJECTED
    assert h.flash.boot_record().pending is None and h.flash.load_transfer_state() is None
    assert h.device.phase is DevicePhase.ONLINE


def test_switch_only_after_every_check_of_the_whole_image(tmp_path: Path) -> None:
    # The manifest verifies and names V2's bytes, but not its dependencies: only the check of
    # the complete image (accept_download) can see it. Nothing may be staged.
    h = Harness(tmp_path, "tcp")
    h.run_until(lambda: h.device.online)
    lying = signed(V2, dependencies=())
    assert h.cloud is not None
    h.cloud.offer(Offer(lying, V2, None, (5, 1, 2)))
    h.run_until(lambda: bool(h.log.results))
    (failed,) = h.log.results
    assert isinstance(failed, TransferFailed) and failed.status is TransferStatus.REJECTED
    assert "METADATA_MISMATCH" in h.device.last_error
    record = h.flash.boot_record()
    assert record.pending is None and record.active_slot((5, 1)) == 0
    assert h.flash.load_transfer_state() is None and h.reboots == []


# --- availability -----------------------------------------------------------------------------


def test_updates_disabled_then_enabled(tmp_path: Path) -> None:
    offer = Offer.of(V2)

    def on_event(cloud: ScriptedCloud, event: Event) -> None:
        if event.name == UPDATES_ENABLED_EVENT and event.data == "true":
            cloud.offer(offer)  # the cloud starts a pending update at once

    h = Harness(
        tmp_path,
        "udp",
        make_cloud=lambda t, log: ScriptedCloud(
            t, log, policy=offer_when_behind(offer, 2), on_event=on_event
        ),
    )
    h.device.disable_updates()
    h.run_until(lambda: bool(h.log.offer_answers))
    assert not h.log.hellos[0].updates_enabled
    assert h.log.offer_answers[0].code == Code.SERVICE_UNAVAILABLE
    assert h.device.updates_pending and h.update_pending_calls == 1
    h.run_until(lambda: bool(h.log.named(UPDATES_ENABLED_EVENT)))
    assert h.log.named(UPDATES_ENABLED_EVENT) == ["false"]  # reported at connect
    h.device.enable_updates()
    h.run_until(lambda: bool(results(h.log)))
    assert h.log.named(UPDATES_ENABLED_EVENT) == ["false", "true"]
    assert [a.code for a in h.log.offer_answers] == [Code.SERVICE_UNAVAILABLE, Code.CHANGED]
    assert results(h.log) == ["committed"] and h.running_version() == 2


def test_forced_updates_override_disabled(tmp_path: Path) -> None:
    h = Harness(tmp_path, "tcp")
    h.device.disable_updates()
    h.run_until(lambda: h.device.online)
    assert h.cloud is not None
    h.cloud.send_event(UPDATES_FORCED_EVENT, "true")
    h.run_until(lambda: h.device.updates_forced)
    h.cloud.offer(Offer.of(V2))
    h.run_until(lambda: h.reboots != [])
    assert h.log.offer_answers[0].code == Code.CHANGED


def test_reset_held_until_the_application_allows_it(tmp_path: Path) -> None:
    offer = Offer.of(V2)
    h = Harness(
        tmp_path,
        "udp",
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
    )
    h.device.disable_reset()
    h.run_until(lambda: bool(h.log.named(RESET_PENDING_EVENT)))
    assert h.device.reset_pending and h.reset_pending_calls == 1 and h.reboots == []
    assert h.device.phase is DevicePhase.APPLYING
    assert h.flash.boot_record().pending is not None
    h.run_for(120.0)  # nothing happens while the reset is held; keep-alives keep it online
    assert h.reboots == [] and h.device.online and h.disconnects == []
    h.device.enable_reset()
    h.run_until(lambda: bool(results(h.log)))
    assert h.reboots == ["firmware update"] and results(h.log) == ["committed"]


def test_reset_pending_hook_may_allow_the_reset(tmp_path: Path) -> None:
    offer = Offer.of(V2)
    h = Harness(
        tmp_path,
        "tcp",
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
    )
    h.device.disable_reset()
    h.device.on_reset_pending = h.device.enable_reset  # the app says "now is fine"
    h.run_until(lambda: bool(results(h.log)))
    assert h.reboots == ["firmware update"] and h.running_version() == 2


def test_describe_request_and_server_events(tmp_path: Path) -> None:
    seen: list[tuple[str, str]] = []
    h = Harness(tmp_path, "udp")
    h.device.on_server_event = lambda name, data: seen.append((name, data))
    h.run_until(lambda: h.device.online)
    assert h.cloud is not None
    h.cloud.describe_request()
    h.cloud.send_event("app/hello", "42")
    h.run_until(lambda: len(h.log.responses) == 2)
    content, changed = h.log.responses
    assert content.code == Code.CONTENT and changed.code == Code.CHANGED
    modules = Describe.from_payload(content.payload).modules
    assert {(m.function, m.index, m.version, m.store) for m in modules} == {
        (4, 1, 5000, 0),
        (5, 1, 1, 0),
    }
    assert seen == [("app/hello", "42")]


def test_heartbeats_and_keepalive(tmp_path: Path) -> None:
    config = DeviceConfig(
        DEVICE_ID, PLATFORM, heartbeat_interval=10.0, keepalive_interval=4.0, keepalive_timeout=3.0
    )
    h = Harness(tmp_path, "udp", config=config)
    h.run_until(lambda: h.device.online)
    h.run_for(35.0)
    assert h.log.named("ota/device/heartbeat") == ["1", "2", "3"]
    assert h.disconnects == []
    # The cloud goes silent: the unanswered keep-alive ping ends the session.
    h.drop_to_device = lambda datagram: True
    h.auto_connect = False
    h.run_until(lambda: h.disconnects != [], max_time=60.0)
    assert "keep-alive" in h.disconnects[0]
    assert h.device.phase is DevicePhase.CONNECTING


@pytest.mark.parametrize(
    ("data", "hold_off"), [('{"hold_off": 30}', 30.0), ('{"hold_off": 1e9}', 3600.0), ("x", 0.0)]
)
def test_server_going_away_sets_the_hold_off(tmp_path: Path, data: str, hold_off: float) -> None:
    h = Harness(tmp_path, "udp")
    h.auto_connect = False
    h.connect()
    h.run_until(lambda: h.device.online)
    assert h.cloud is not None
    h.cloud.send_event("ota/server/going-away", data)
    h.run_until(lambda: h.disconnects != [])
    assert h.disconnects == ["the server is shutting down"] and h.hold_offs == [hold_off]
    assert h.device.phase is DevicePhase.CONNECTING


def test_unanswered_hello_disconnects(tmp_path: Path) -> None:
    h = Harness(
        tmp_path, "tcp", make_cloud=lambda t, log: ScriptedCloud(t, log, answer_hello=False)
    )
    h.auto_connect = False
    h.connect()
    h.run_until(lambda: h.disconnects != [], max_time=60.0)
    assert "Hello" in h.disconnects[0] and not h.device.online


# --- interruptions -----------------------------------------------------------------------------


BIG = user_part(2, size=60000)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_dropped_link_resumes_with_a_fresh_sender(tmp_path: Path, transport: Transport) -> None:
    offer = Offer.of(BIG)
    h = Harness(
        tmp_path,
        transport,
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
    )
    h.run_until(lambda: h.device.bytes_received > len(BIG) // 2)
    assert h.device.phase is DevicePhase.DOWNLOADING
    first_session = h.log.chunks_sent
    h.drop_link()
    assert h.device.phase is DevicePhase.CONNECTING
    assert h.flash.load_transfer_state() is not None
    h.run_until(lambda: bool(results(h.log)))
    assert results(h.log) == ["committed"] and h.running_version() == 2
    # The second sender did not start over: it sent well under the whole file again.
    total_chunks = -(-len(BIG) // 512)
    assert h.log.chunks_sent - first_session < total_chunks * 0.75
    assert h.log.start_replies[-1].resume_offset > total_chunks // 2 - 32
    assert h.flash.read_active(5, 1) == BIG


def test_reboot_mid_transfer_resumes(tmp_path: Path) -> None:
    offer = Offer.of(BIG)
    h = Harness(
        tmp_path,
        "udp",
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
    )
    h.run_until(lambda: h.device.bytes_received > len(BIG) // 3)
    h.device.reset()
    sent_before = h.log.chunks_sent
    h.run_until(lambda: bool(results(h.log)))
    assert h.reboots[0] == "the application reset the device"
    assert h.log.chunks_sent - sent_before < -(-len(BIG) // 512)
    assert results(h.log) == ["committed"]


@pytest.mark.parametrize("seed", range(6))
def test_killed_at_random_points_ends_on_a_valid_image(tmp_path: Path, seed: int) -> None:
    offer = Offer.of(BIG)
    h = Harness(
        tmp_path,
        "tcp" if seed % 2 else "udp",
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
        seed=seed,
    )
    h.burst = 1  # one datagram or stream piece per step: kills land anywhere
    rng = random.Random(seed)
    killed_while = set()
    for _ in range(6):
        for _ in range(rng.randrange(1, 150)):
            assert h.step()
        killed_while.add(h.device.phase)
        h.kill()
        # Whatever the instant, the device boots a valid image of each module.
        for function, index, slot in h.flash.boot_record().active:
            assert h.flash.slot_state(function, index, slot).valid
    h.run_until(lambda: h.running_version() == 2 and h.flash.boot_record().outcome is None)
    record = h.flash.boot_record()
    assert record.trial is None and record.pending is None
    assert h.flash.read_active(5, 1) == BIG
    assert "committed" in results(h.log)
    assert DevicePhase.DOWNLOADING in killed_while
    if any(reply.resume_offset for reply in h.log.start_replies):
        assert h.log.chunks_sent < 3 * -(-len(BIG) // 512)  # resumed, not restarted each time


# --- self-test and rollback ---------------------------------------------------------------


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_failing_selftest_rolls_back_and_reports(tmp_path: Path, transport: Transport) -> None:
    bad = user_part(2, marker=make_test_marker(selftest_fail_after=20))
    offer = Offer.of(bad)
    h = Harness(
        tmp_path,
        transport,
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
    )
    h.run_until(lambda: h.reboots != [])
    rebooted_at = h.now
    assert not h.device.wants_link  # the bad image never reaches the cloud
    hellos = len(h.log.hellos)
    h.run_until(lambda: len(h.reboots) == 2)
    assert h.now - rebooted_at == pytest.approx(20.0)
    assert len(h.log.hellos) == hellos
    h.run_until(lambda: bool(results(h.log)))
    result = parse_update_result(h.log.named(UPDATE_RESULT_EVENT)[0])
    assert (result.version, result.status) == (2, "rolled_back")
    assert "running version 1" in result.detail
    assert h.log.hellos[-1].product_version == 1
    assert h.flash.read_active(5, 1) == V1
    h.run_until(lambda: h.flash.boot_record().outcome is None)


def test_crash_on_boot_rolls_back_after_max_trial_boots(tmp_path: Path) -> None:
    bad = user_part(2, marker=make_test_marker(crash_on_boot=True))
    offer = Offer.of(bad)
    h = Harness(
        tmp_path,
        "udp",
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
    )
    h.run_until(lambda: bool(results(h.log)))
    assert h.reboots.count("the new firmware crashed on boot") == 3
    assert results(h.log) == ["rolled_back"]
    last = h.device.last_result
    assert last is not None and OutcomeStatus.TOO_MANY_RESETS.name.lower() in last.detail


def test_delta_update(tmp_path: Path) -> None:
    delta = pytest.importorskip("otacore.delta")
    patch = delta.make_patch(V1, V2)
    offer = Offer(signed(V2), patch, hashlib.sha256(V1).digest(), (5, 1, 2))
    h = Harness(
        tmp_path,
        "tcp",
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
    )
    h.run_until(lambda: bool(results(h.log)))
    assert results(h.log) == ["committed"] and h.flash.read_active(5, 1) == V2


def test_delta_against_another_base_is_refused(tmp_path: Path) -> None:
    h = Harness(tmp_path, "udp")
    h.run_until(lambda: h.device.online)
    assert h.cloud is not None
    h.cloud.offer(Offer(signed(V2), b"x" * 100, hashlib.sha256(b"other").digest(), (5, 1, 2)))
    h.run_until(lambda: bool(h.log.offer_answers))
    assert h.log.offer_answers[0].code == Code.FORBIDDEN
    assert h.log.offer_answers[0].payload.startswith(b"BAD_BASE: ")


def test_config_is_checked() -> None:
    from otacore.errors import ValidationError

    with pytest.raises(ValidationError, match="24 lowercase hex"):
        DeviceConfig("E00FCE68", PLATFORM)
    with pytest.raises(ValidationError, match="heartbeat"):
        DeviceConfig(DEVICE_ID, PLATFORM, heartbeat_interval=0)


def test_kills_during_the_trial_count_as_failed_boots(tmp_path: Path) -> None:
    offer = Offer.of(V2)
    h = Harness(
        tmp_path,
        "udp",
        make_cloud=lambda t, log: ScriptedCloud(t, log, policy=offer_when_behind(offer, 2)),
    )
    h.run_until(lambda: h.reboots != [])
    for attempt in (1, 2):  # killed before the trial image reaches the cloud, twice
        trial = h.flash.boot_record().trial
        assert trial is not None and trial.attempts == attempt
        h.kill()
    trial = h.flash.boot_record().trial
    assert trial is not None and trial.attempts == 3
    h.kill()  # the third failed boot: the bootloader rolls back
    assert h.flash.boot_record().trial is None and h.flash.read_active(5, 1) == V1
    h.run_until(lambda: "committed" in results(h.log))
    assert results(h.log) == ["rolled_back", "committed"]
    assert h.flash.read_active(5, 1) == V2
