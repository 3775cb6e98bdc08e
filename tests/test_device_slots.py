"""Device slots: download acceptance, staging, boot decisions, rollback, crash safety."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otacore.device import (
    NO_SLOT,
    BootRecord,
    BootRecordFormatError,
    ModuleKey,
    OutcomeStatus,
    PendingActivation,
    RollbackGuard,
    SlotState,
    TrialState,
    UpdateOutcome,
    acknowledge_outcome,
    make_test_marker,
    read_test_behaviour,
    slot_state_of,
)
from otacore.device.slots import (
    BootEventKind,
    RejectReason,
    Verdict,
    accept_download,
    decide_boot,
    on_selftest_result,
    plan_download,
    stage_update,
)
from otacore.module import ModuleDependency, build_module, parse_module
from otacore.signing import (
    SigningKey,
    TrustStore,
    manifest_for_module,
    sign_manifest,
)

PRODUCT = 777
PLATFORM = 13  # Boron
KEY = SigningKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = SigningKey.from_private_bytes(bytes(range(5, 37)))
STORE = TrustStore.initial(PRODUCT, [KEY.public_key])
SYSTEM = (4, 1)
USER = (5, 1)


def system_part(version: int, platform: int = PLATFORM) -> bytes:
    return build_module(b"S" * 3000, platform_id=platform, function=4, version=version, index=1)


def user_part(
    version: int,
    *,
    needs_system: int = 5000,
    marker: bytes = b"",
    platform: int = PLATFORM,
    filler: bytes = b"U",
) -> bytes:
    payload = filler * 1500 + marker + filler * 500
    return build_module(
        payload,
        platform_id=platform,
        function=5,
        version=version,
        product_id=PRODUCT,
        product_version=version,
        dependencies=[ModuleDependency(4, 1, needs_system)],
    )


def signed(image: bytes, key: SigningKey = KEY, **changes: object) -> bytes:
    product_version = parse_module(image).product_version or 0  # system parts carry none
    manifest = manifest_for_module(image, product_id=PRODUCT, product_version=product_version)
    return sign_manifest(key, replace(manifest, **changes)).to_bytes()  # type: ignore[arg-type]


SYS_5000 = system_part(5000)
USER_6 = user_part(6)
USER_7 = user_part(7)
INSTALLED = [(4, 1, 5000), (5, 1, 6)]
BASE_RECORD = BootRecord(active=((4, 1, 0), (5, 1, 0)))


def accept(
    image: bytes, manifest: bytes, installed: list[tuple[int, int, int]] = INSTALLED
) -> Verdict:
    return accept_download(image, manifest, STORE, platform_id=PLATFORM, installed=installed)


# --- acceptance ---------------------------------------------------------------------------


def test_accepts_a_good_update() -> None:
    verdict = accept(USER_7, signed(USER_7))
    assert verdict.accepted, verdict.detail
    assert verdict.manifest is not None and verdict.manifest.module_version == 7
    assert verdict.info is not None and verdict.info.module_function == 5


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda: (USER_7[:100] + b"\xff" + USER_7[101:], signed(USER_7)), RejectReason.INTEGRITY),
        (lambda: (USER_7, b"garbage"), RejectReason.MANIFEST_FORMAT),
        (lambda: (USER_7, signed(USER_7, OTHER_KEY)), RejectReason.UNKNOWN_KEY),
        (lambda: (USER_7, signed(USER_7)[:-1] + b"\0"), RejectReason.BAD_SIGNATURE),
        (lambda: (USER_7, signed(USER_7, product_id=1)), RejectReason.WRONG_PRODUCT),
        (lambda: (user_part(8), signed(USER_7)), RejectReason.IMAGE_MISMATCH),
        (lambda: (USER_7, signed(USER_7, module_version=9)), RejectReason.METADATA_MISMATCH),
        (lambda: (USER_7, signed(USER_7, dependencies=())), RejectReason.METADATA_MISMATCH),
        (
            lambda: (user_part(7, platform=12), signed(user_part(7, platform=12))),
            RejectReason.WRONG_PLATFORM,
        ),
        (
            lambda: (user_part(7, needs_system=6000), signed(user_part(7, needs_system=6000))),
            RejectReason.DEPENDENCY_UNMET,
        ),
        (lambda: (system_part(4999), signed(system_part(4999))), RejectReason.DOWNGRADE),
    ],
)
def test_refuses_with_the_specific_reason(
    make: Callable[[], tuple[bytes, bytes]], reason: RejectReason
) -> None:
    image, manifest = make()
    verdict = accept(image, manifest)
    assert verdict.reason is reason, verdict.detail
    assert not verdict.accepted and verdict.detail


def test_user_part_downgrade_and_system_upgrade_are_allowed() -> None:
    assert accept(user_part(2), signed(user_part(2))).accepted
    newer = system_part(5100)
    assert accept(newer, signed(newer)).accepted
    same = system_part(5000)
    assert accept(same, signed(same)).accepted
    # Dependencies are checked against the *other* modules, not the one being replaced.
    assert accept(USER_7, signed(USER_7), installed=[(5, 1, 6)]).reason is (
        RejectReason.DEPENDENCY_UNMET
    )


def test_plan_download_checks_before_any_data() -> None:
    plan = plan_download(
        BASE_RECORD, signed(USER_7), STORE, platform_id=PLATFORM, installed=INSTALLED
    )
    assert plan.verdict.accepted and plan.slot == 1 and not plan.changed
    bad = plan_download(
        BASE_RECORD, signed(USER_7, OTHER_KEY), STORE, platform_id=PLATFORM, installed=INSTALLED
    )
    assert bad.verdict.reason is RejectReason.UNKNOWN_KEY and bad.slot is None
    trial = replace(BASE_RECORD, trial=TrialState(4, 1, 1, 1, 5100, 5000))
    busy = plan_download(trial, signed(USER_7), STORE, platform_id=PLATFORM, installed=INSTALLED)
    assert busy.verdict.reason is RejectReason.TRIAL_IN_PROGRESS
    pending_sys = replace(BASE_RECORD, pending=PendingActivation(4, 1, 1, 5100, bytes(32)))
    other = plan_download(
        pending_sys, signed(USER_7), STORE, platform_id=PLATFORM, installed=INSTALLED
    )
    assert other.verdict.reason is RejectReason.OTHER_UPDATE_PENDING
    pending_user = replace(BASE_RECORD, pending=PendingActivation(5, 1, 1, 7, bytes(32)))
    same = plan_download(
        pending_user, signed(USER_7), STORE, platform_id=PLATFORM, installed=INSTALLED
    )
    assert same.verdict.accepted and same.changed and same.record.pending is None


def test_stage_update_refuses_a_refused_verdict() -> None:
    with pytest.raises(ValueError, match="refused"):
        stage_update(BASE_RECORD, accept(USER_7, b"garbage"))
    staged = stage_update(BASE_RECORD, accept(USER_7, signed(USER_7)))
    assert staged.pending == PendingActivation(5, 1, 1, 7, slot_state_of(USER_7).sha256 or b"")


# --- boot decisions -----------------------------------------------------------------------


def states(**slots: tuple[bytes | None, bytes | None]) -> dict[ModuleKey, tuple[SlotState, ...]]:
    keys = {"system": SYSTEM, "user": USER}
    return {
        keys[name]: tuple(slot_state_of(image) for image in pair) for name, pair in slots.items()
    }


GOOD_SLOTS = states(system=(SYS_5000, None), user=(USER_6, USER_7))


def staged_record() -> BootRecord:
    return stage_update(BASE_RECORD, accept(USER_7, signed(USER_7)))


def test_activation_trial_and_commit() -> None:
    boot = decide_boot(staged_record(), GOOD_SLOTS)
    assert boot.changed and boot.boot_slots[USER] == 1 and boot.trial is not None
    assert [e.kind for e in boot.events] == [BootEventKind.ACTIVATED, BootEventKind.TRIAL_BOOT]
    assert boot.record.pending is None and boot.record.trial.attempts == 1  # type: ignore[union-attr]
    result = on_selftest_result(boot.record, True, GOOD_SLOTS)
    assert result.changed and not result.reset_required
    assert result.outcome == UpdateOutcome(5, 1, 7, 6, OutcomeStatus.COMMITTED)
    assert result.record.trial is None and result.record.active_slot(USER) == 1
    again = decide_boot(result.record, GOOD_SLOTS)
    assert not again.changed and again.boot_slots == {SYSTEM: 0, USER: 1} and not again.safe_mode
    assert acknowledge_outcome(result.record).outcome is None


def test_selftest_failure_rolls_back() -> None:
    boot = decide_boot(staged_record(), GOOD_SLOTS)
    result = on_selftest_result(boot.record, False, GOOD_SLOTS)
    assert result.reset_required
    assert result.outcome is not None and result.outcome.status is OutcomeStatus.SELFTEST_FAILED
    assert not result.outcome.succeeded
    assert decide_boot(result.record, GOOD_SLOTS).boot_slots[USER] == 0


@pytest.mark.parametrize("max_boots", [1, 3])
def test_crash_looping_trial_rolls_back_after_max_boots(max_boots: int) -> None:
    record = staged_record()
    for boot_number in range(1, max_boots + 1):
        decision = decide_boot(record, GOOD_SLOTS, max_trial_boots=max_boots)
        assert decision.trial is not None and decision.trial.attempts == boot_number
        assert decision.boot_slots[USER] == 1
        record = decision.record  # ... and the image crashes before its self-test
    final = decide_boot(record, GOOD_SLOTS, max_trial_boots=max_boots)
    assert final.boot_slots[USER] == 0 and final.trial is None
    assert final.record.outcome == UpdateOutcome(5, 1, 7, 6, OutcomeStatus.TOO_MANY_RESETS)
    assert BootEventKind.ROLLED_BACK in [e.kind for e in final.events]


def test_pending_slot_that_changed_is_dropped() -> None:
    corrupted = states(system=(SYS_5000, None), user=(USER_6, USER_7[:-1] + b"\0"))
    decision = decide_boot(staged_record(), corrupted)
    assert decision.boot_slots[USER] == 0 and decision.record.pending is None
    assert decision.record.outcome is not None
    assert decision.record.outcome.status is OutcomeStatus.IMAGE_INVALID
    other_image = states(system=(SYS_5000, None), user=(USER_6, user_part(7, filler=b"V")))
    assert decide_boot(staged_record(), other_image).boot_slots[USER] == 0


def test_new_module_without_fallback_is_kept() -> None:
    record = BootRecord(active=((4, 1, 0),))
    slots = states(system=(SYS_5000, None), user=(USER_6, None))
    staged = stage_update(record, accept(USER_6, signed(USER_6), installed=[(4, 1, 5000)]))
    boot = decide_boot(staged, slots)
    assert boot.trial is not None and boot.trial.previous_slot == NO_SLOT
    result = on_selftest_result(boot.record, False, slots)
    assert not result.reset_required and result.record.active_slot(USER) == 0
    assert result.outcome is not None
    assert result.outcome.status is OutcomeStatus.NO_ROLLBACK_TARGET


def test_invalid_active_slot_falls_back_and_missing_module_means_safe_mode() -> None:
    record = replace(BASE_RECORD, active=((4, 1, 0), (5, 1, 1)))
    broken = states(system=(SYS_5000, None), user=(USER_6, b"\0" * 100))
    decision = decide_boot(record, broken)
    assert decision.boot_slots[USER] == 0 and decision.changed
    assert decision.events[0].kind is BootEventKind.FELL_BACK
    nothing = states(system=(SYS_5000, None), user=(None, None))
    assert decide_boot(record, nothing).missing == (USER,)
    assert decide_boot(record, nothing).safe_mode


def test_unmet_dependency_means_safe_mode() -> None:
    slots = states(system=(system_part(4000), None), user=(USER_6, None))
    decision = decide_boot(BASE_RECORD, slots)
    assert decision.safe_mode and decision.unmet == ((USER, ModuleDependency(4, 1, 5000)),)


def test_decide_boot_is_idempotent_on_its_own_output() -> None:
    first = decide_boot(BASE_RECORD, GOOD_SLOTS)
    # A record from before rollback protection gets its floor from the running application.
    assert first.changed and first.record == replace(BASE_RECORD, rollback=RollbackGuard(6))
    boot = decide_boot(first.record, GOOD_SLOTS)
    assert not boot.changed and boot.record == first.record


# --- the boot record encoding -------------------------------------------------------------

u8, u16 = st.integers(0, 255), st.integers(0, 0xFFFF)
records = st.builds(
    BootRecord,
    active=st.lists(
        st.tuples(u8, u8, st.integers(0, 1)), max_size=6, unique_by=lambda e: (e[0], e[1])
    ).map(tuple),
    pending=st.none()
    | st.builds(
        PendingActivation, u8, u8, st.integers(0, 1), u16, st.binary(min_size=32, max_size=32)
    ),
    trial=st.none() | st.builds(TrialState, u8, u8, st.sampled_from([0, 1, NO_SLOT]), u8, u16, u16),
    outcome=st.none() | st.builds(UpdateOutcome, u8, u8, u16, u16, st.sampled_from(OutcomeStatus)),
    generation=st.integers(0, 2**32 - 1),
    rollback=st.none()
    | st.builds(RollbackGuard, st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1)),
)


@settings(max_examples=150, deadline=None)
@given(records)
def test_boot_record_round_trip(record: BootRecord) -> None:
    assert BootRecord.from_bytes(record.to_bytes()) == record


@settings(max_examples=200, deadline=None)
@given(records, st.data())
def test_boot_record_decoder_rejects_damage(record: BootRecord, data: st.DataObject) -> None:
    raw = record.to_bytes()
    position = data.draw(st.integers(0, len(raw) - 1))
    damaged = raw[:position] + bytes([raw[position] ^ data.draw(st.integers(1, 255))])
    damaged += raw[position + 1 :]
    with pytest.raises(BootRecordFormatError):
        BootRecord.from_bytes(damaged)
    with pytest.raises(BootRecordFormatError):
        BootRecord.from_bytes(raw[: data.draw(st.integers(0, len(raw) - 1))])


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=200))
def test_boot_record_decoder_on_garbage(data: bytes) -> None:
    with pytest.raises(BootRecordFormatError):
        BootRecord.from_bytes(data)


def test_test_markers() -> None:
    assert read_test_behaviour(USER_7).normal
    failing = user_part(8, marker=make_test_marker(selftest_fail_after=2.5))
    assert read_test_behaviour(failing).selftest_fail_after == 2.5
    crashing = user_part(8, marker=make_test_marker(crash_on_boot=True))
    assert read_test_behaviour(crashing).crash_on_boot
    both = make_test_marker(selftest_fail_after=0, crash_on_boot=True)
    behaviour = read_test_behaviour(b"xx" + both + b"yy")
    assert behaviour.crash_on_boot and behaviour.selftest_fail_after == 0
    assert read_test_behaviour(b"\0OTA-TEST:selftest-fail=abc;").normal
    with pytest.raises(ValueError):
        make_test_marker()


# --- crash safety: a crash between any two persistent writes ------------------------------


class Crash(Exception):
    """The emulated device lost power."""


@dataclass
class MemFlash:
    """What survives a crash, with the flash layer's guarantees: slot writes land in place and
    may be torn (a crash can leave half a chunk); record writes are atomic."""

    record: BootRecord
    slots: dict[tuple[int, int, int], bytes]
    crash_at: frozenset[int] = frozenset()
    steps: int = 0
    boots: list[tuple[int, int]] = field(default_factory=list)  # (user version, slot) booted

    def _step(self) -> bool:
        self.steps += 1
        return self.steps in self.crash_at

    def write_record(self, record: BootRecord) -> None:
        if self._step():
            raise Crash
        self.record = record

    def erase_slot(self, key: ModuleKey, slot: int) -> None:
        if self._step():
            raise Crash
        self.slots[(*key, slot)] = b""

    def write_slot(self, key: ModuleKey, slot: int, offset: int, data: bytes) -> None:
        torn = self._step()
        current = bytearray(self.slots.get((*key, slot), b""))
        chunk = data[: len(data) // 2] if torn else data
        current[offset : offset + len(chunk)] = chunk
        self.slots[(*key, slot)] = bytes(current)
        if torn:
            raise Crash

    def states(self) -> dict[ModuleKey, tuple[SlotState, SlotState]]:
        keys = {(f, i) for f, i, _ in self.slots}
        return {
            k: (slot_state_of(self.slots.get((*k, 0))), slot_state_of(self.slots.get((*k, 1))))
            for k in keys
        }


def device_life(flash: MemFlash, image: bytes, manifest: bytes, max_boots: int = 2) -> None:
    """Boot, run, update from scratch when no update has ended yet; return once one ended.

    Every boot checks that the device runs a valid image of a known version."""
    for _ in range(50):
        decision = decide_boot(flash.record, flash.states(), max_trial_boots=max_boots)
        if decision.changed:
            flash.write_record(decision.record)
        assert not decision.missing and not decision.unmet, decision
        booted = flash.slots[(*USER, decision.boot_slots[USER])]
        assert slot_state_of(booted).valid
        version = slot_state_of(booted).module_version
        assert version in (6, 7, 8)
        flash.boots.append((version or 0, decision.boot_slots[USER]))
        if decision.trial is not None:
            behaviour = read_test_behaviour(booted)
            if behaviour.crash_on_boot:
                continue  # resets before reaching the cloud
            result = on_selftest_result(flash.record, behaviour.normal, flash.states())
            flash.write_record(result.record)
            if result.reset_required:
                continue
        if flash.record.outcome is not None:
            return
        # The cloud (re)sends the update from the start.
        installed = [(4, 1, 5000), (5, 1, version or 0)]
        plan = plan_download(
            flash.record, manifest, STORE, platform_id=PLATFORM, installed=installed
        )
        assert plan.verdict.accepted and plan.slot is not None, plan.verdict.detail
        if plan.changed:
            flash.write_record(plan.record)
        flash.erase_slot(USER, plan.slot)
        for offset in range(0, len(image), 512):
            flash.write_slot(USER, plan.slot, offset, image[offset : offset + 512])
        verdict = accept_download(
            flash.slots[(*USER, plan.slot)],
            manifest,
            STORE,
            platform_id=PLATFORM,
            installed=installed,
        )
        assert verdict.accepted, verdict.detail
        flash.write_record(stage_update(flash.record, verdict))
        # ... and the device resets to apply it.
    raise AssertionError("the device never finished the update")


def run_with_crashes(image: bytes, crash_at: frozenset[int], max_boots: int = 2) -> MemFlash:
    flash = MemFlash(BASE_RECORD, {(*SYSTEM, 0): SYS_5000, (*USER, 0): USER_6}, crash_at)
    manifest = signed(image)
    for _ in range(len(crash_at) + 1):
        try:
            device_life(flash, image, manifest, max_boots)
            return flash
        except Crash:
            continue
    raise AssertionError("more crashes than scheduled")


GOOD_7 = USER_7
FAILING_7 = user_part(7, marker=make_test_marker(selftest_fail_after=1))
CRASHING_7 = user_part(7, marker=make_test_marker(crash_on_boot=True))
EXPECTED = {
    "good": (GOOD_7, 7, OutcomeStatus.COMMITTED),
    "selftest-fail": (FAILING_7, 6, OutcomeStatus.SELFTEST_FAILED),
    "crash-loop": (CRASHING_7, 6, OutcomeStatus.TOO_MANY_RESETS),
}


@pytest.mark.parametrize("case", sorted(EXPECTED))
def test_single_crash_between_every_pair_of_steps(case: str) -> None:
    image, final_version, status = EXPECTED[case]
    clean = run_with_crashes(image, frozenset())
    assert clean.record.outcome is not None and clean.record.outcome.status is status
    total = clean.steps
    assert total > len(image) // 512  # the enumeration covers every chunk write
    for crash_point in range(1, total + 1):
        flash = run_with_crashes(image, frozenset({crash_point}))
        outcome = flash.record.outcome
        assert outcome is not None and outcome.status is status, crash_point
        active = flash.slots[(*USER, flash.record.active_slot(USER) or 0)]
        assert slot_state_of(active).module_version == final_version
        assert flash.record.trial is None and flash.record.pending is None


def test_two_crashes_anywhere() -> None:
    image, final_version, status = EXPECTED["good"]
    total = run_with_crashes(image, frozenset()).steps
    # Pairs of crash points, the second one possibly during the recovery of the first. With
    # three trial boots allowed, two crashes can never exhaust the trial: it must commit.
    for first in range(1, total + 1, 2):
        for second in range(first + 1, first + 12):
            flash = run_with_crashes(image, frozenset({first, second}), max_boots=3)
            assert flash.record.outcome is not None
            assert flash.record.outcome.status is status
            active = flash.slots[(*USER, flash.record.active_slot(USER) or 0)]
            assert slot_state_of(active).module_version == final_version


def test_crash_while_replacing_a_pending_update() -> None:
    """The reset is held with 7 staged, and the cloud sends 8 into the same slot."""
    user_8 = user_part(8)
    manifest_8 = signed(user_8)

    def replace_download(flash: MemFlash) -> None:
        plan = plan_download(
            flash.record, manifest_8, STORE, platform_id=PLATFORM, installed=INSTALLED
        )
        assert plan.verdict.accepted and plan.slot == 1
        if plan.changed:
            flash.write_record(plan.record)  # the stale pending activation goes first
        flash.erase_slot(USER, plan.slot)
        for offset in range(0, len(user_8), 512):
            flash.write_slot(USER, plan.slot, offset, user_8[offset : offset + 512])
        verdict = accept_download(
            flash.slots[(*USER, 1)], manifest_8, STORE, platform_id=PLATFORM, installed=INSTALLED
        )
        flash.write_record(stage_update(flash.record, verdict))

    def fresh(crash_at: frozenset[int]) -> MemFlash:
        slots = {(*SYSTEM, 0): SYS_5000, (*USER, 0): USER_6, (*USER, 1): USER_7}
        return MemFlash(staged_record(), slots, crash_at)

    clean = fresh(frozenset())
    replace_download(clean)
    assert clean.record.pending is not None and clean.record.pending.version == 8
    for crash_point in range(1, clean.steps + 1):
        flash = fresh(frozenset({crash_point}))
        with pytest.raises(Crash):
            replace_download(flash)
        device_life(flash, user_8, manifest_8)
        outcome = flash.record.outcome
        # A crash before the pending activation was dropped may still apply 7; after it, the
        # torn slot must never be activated, and 8 is downloaded again.
        assert outcome is not None and outcome.status is OutcomeStatus.COMMITTED, crash_point
        active = flash.slots[(*USER, flash.record.active_slot(USER) or 0)]
        assert slot_state_of(active).module_version == outcome.version in (7, 8)
