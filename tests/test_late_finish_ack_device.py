"""The emulated device (otacore.device.download) with a FinishAck later than its patience.

The cloud of tests/test_emulated_device.py (a real CoAP link end and a real TransferSender,
on a virtual clock, so the device's Device OS-like FinishReply budget of 2 + 4 + 8 + 16 + 32 s
costs nothing) holds its FinishAck back, as the server does while it writes the completion,
until the device has stopped waiting. The device must then stage the file and reset into it,
in the same session; and must not when its lapsed transfer was ended meanwhile (a new offer,
a lost link).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from otacore.coap import Code, Message
from otacore.device.emulated import DeviceConfig, DevicePhase
from otacore.errors import ValidationError
from otacore.protocol.link import Transport
from otacore.protocol.ota_wire import is_transfer, parse_transfer, transfer_request
from otacore.transfer import FinishAck, FinishReply, TransferCompleted
from tests.test_emulated_device import (
    DEVICE_ID,
    PLATFORM,
    V2,
    CloudLog,
    Harness,
    Offer,
    ScriptedCloud,
    offer_when_behind,
    results,
)


class SlowCompletionCloud(ScriptedCloud):
    """A cloud whose completion write is slow: every FinishAck waits until :meth:`confirm`
    (the server's answers to FinishReply repeats wait behind that write too)."""

    def __init__(self, transport: Transport, log: CloudLog, offer: Offer) -> None:
        super().__init__(transport, log, policy=offer_when_behind(offer, 2))
        self.writing = True
        self.held: list[FinishAck] = []
        self.completed = False
        #: When (virtual clock) each FinishReply of the device arrived.
        self.finish_replies: list[float] = []

    def _on_request(self, message: Message) -> None:
        if is_transfer(message) and isinstance(parse_transfer(message), FinishReply):
            self.finish_replies.append(self.now)
        super()._on_request(message)

    def _send(self, outputs: Sequence[object]) -> None:
        self.completed |= any(isinstance(out, TransferCompleted) for out in outputs)
        if self.writing:
            self.held += [out for out in outputs if isinstance(out, FinishAck)]
            outputs = [out for out in outputs if not isinstance(out, FinishAck)]
        super()._send(outputs)

    def confirm(self) -> None:
        """The write is done: the FinishAck leaves (once; the device ignores duplicates)."""
        self.writing = False
        if self.held:
            self.link.notify(transfer_request(self.held[0]), self.now)
        self.held.clear()

    def lose(self) -> None:
        """The write is done but every FinishAck sent so far was lost (over DTLS each is one
        NON datagram): the cloud answers what the device asks from now on."""
        self.writing = False
        self.held.clear()


def harness(tmp_path: Path, transport: Transport, config: DeviceConfig | None = None) -> Harness:
    offer = Offer.of(V2)
    return Harness(tmp_path, transport, config=config,
                   make_cloud=lambda t, log: SlowCompletionCloud(t, log, offer))


def given_up(h: Harness) -> SlowCompletionCloud:
    """Run until the device stopped waiting for the held FinishAck."""
    h.run_until(lambda: "never confirmed" in h.device.last_error)
    cloud = h.cloud
    assert isinstance(cloud, SlowCompletionCloud) and cloud.completed and cloud.held
    assert h.device.phase is DevicePhase.ONLINE  # not stuck in an update
    assert h.running_version() == 1 and h.reboots == []
    assert h.flash.load_transfer_state() is not None  # validated: it resumes as complete
    return cloud


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_late_finish_ack_stages_and_resets_in_the_same_session(
    tmp_path: Path, transport: Transport
) -> None:
    h = harness(tmp_path, transport)
    cloud = given_up(h)
    h.run_for(30.0)  # a long write: the device waits for nothing meanwhile
    assert h.cloud is cloud and h.running_version() == 1
    cloud.confirm()
    h.run_until(lambda: bool(results(h.log)))
    assert results(h.log) == ["committed"] and h.running_version() == 2
    assert h.reboots == ["firmware update"]
    assert len(h.log.hellos) == 2  # the session it updated in, and the one after
    assert [a.code for a in h.log.offer_answers] == [Code.CHANGED]  # offered once
    assert h.flash.read_active(5, 1) == V2
    assert h.flash.load_transfer_state() is None


def test_a_late_finish_ack_after_the_link_dropped_is_not_applied(tmp_path: Path) -> None:
    h = harness(tmp_path, "udp")
    given_up(h)
    h.drop_link()  # the session is over: so is the lapsed transfer
    # The next session's cloud offers again: the device resumes as complete, validates the
    # file again and applies it on that transfer's own FinishAck.
    h.run_until(lambda: isinstance(h.cloud, SlowCompletionCloud) and h.cloud.completed)
    assert isinstance(h.cloud, SlowCompletionCloud)
    assert h.log.start_replies[-1].resume_offset == -(-len(V2) // 512)
    h.cloud.confirm()
    h.run_until(lambda: bool(results(h.log)))
    assert results(h.log) == ["committed"] and h.running_version() == 2


def test_a_new_offer_ends_the_lapse_even_when_refused(tmp_path: Path) -> None:
    """A refused offer replaces no receiver: the lapsed transfer must still end, or its late
    FinishAck would find no offer to stage."""
    h = harness(tmp_path, "udp")
    cloud = given_up(h)
    h.device.disable_updates()
    cloud.offer(Offer.of(V2))
    h.run_until(lambda: len(h.log.offer_answers) == 2)
    assert h.log.offer_answers[-1].code == Code.SERVICE_UNAVAILABLE
    cloud.confirm()  # the old transfer's FinishAck: stale now
    h.run_for(5.0)
    assert h.running_version() == 1 and h.reboots == []
    assert h.flash.boot_record().pending is None


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_finish_ack_lost_after_the_repeats_is_made_up_by_a_reask(
    tmp_path: Path, transport: Transport
) -> None:
    """Every FinishAck copy is lost (the completion's and the answers to the repeats): the
    lapsed device asks again 64 s after giving up (Device OS-like budget: 2 + 4 + 8 + 16 +
    32 s, then the doubling goes on), and the answer stages it in the same session."""
    h = harness(tmp_path, transport)
    cloud = given_up(h)
    lapsed_at = h.now
    first = cloud.finish_replies[0]
    assert [round(t - first, 3) for t in cloud.finish_replies] == [0, 2, 6, 14, 30]
    assert lapsed_at == pytest.approx(first + 62, abs=0.01)
    cloud.lose()
    h.run_until(lambda: bool(results(h.log)))
    assert cloud.finish_replies[5] == pytest.approx(lapsed_at + 64, abs=0.01)
    assert results(h.log) == ["committed"] and h.running_version() == 2
    assert h.reboots == ["firmware update"]
    assert len(h.log.hellos) == 2  # staged in the session it lapsed in
    assert [a.code for a in h.log.offer_answers] == [Code.CHANGED]  # offered once


def test_the_finish_reply_budget_and_reask_cadence_are_the_devices_config(
    tmp_path: Path,
) -> None:
    config = DeviceConfig(DEVICE_ID, PLATFORM, finish_retry=0.5, finish_retries=1,
                          finish_reask=3.0, finish_reask_max=4.0)
    h = harness(tmp_path, "udp", config)
    cloud = given_up(h)
    h.run_for(20.0)  # the write goes on: each re-ask's FinishAck waits behind it too
    first = cloud.finish_replies[0]
    gaps = [round(b - a, 3) for a, b in zip(cloud.finish_replies, cloud.finish_replies[1:],
                                            strict=False)]
    # A repeat 0.5 s after the first; it gives up 1 s later, asks again 3 s after that,
    # then every 4 s (6 s doubled, capped).
    assert gaps[:3] == [0.5, 4.0, 4.0] and set(gaps[2:]) == {4.0}, (first, gaps)
    cloud.confirm()
    h.run_until(lambda: bool(results(h.log)))
    assert results(h.log) == ["committed"] and h.running_version() == 2


@pytest.mark.parametrize("settings", [
    {"finish_retry": 0.0}, {"finish_retries": -1}, {"finish_reask": 0.0},
    {"finish_reask": 10.0, "finish_reask_max": 5.0},
])
def test_impossible_finish_reply_settings_are_refused(settings: dict[str, float]) -> None:
    with pytest.raises(ValidationError, match="finish_re"):
        DeviceConfig(DEVICE_ID, PLATFORM, **settings)  # type: ignore[arg-type]
