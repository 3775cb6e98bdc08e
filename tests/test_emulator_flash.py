"""The emulator's persistent flash: API, guards, crash recovery, SIGKILL safety."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import struct
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest

from otacore.device import BootRecord, OutcomeStatus, acknowledge_outcome, slot_state_of
from otacore.device.slots import accept_download, decide_boot, plan_download, stage_update
from otacore.module import ModuleDependency, build_module
from otacore.signing import SigningKey, TrustStore, manifest_for_module, sign_manifest
from server.emulator.flash import (
    BOOT_RECORD_FILE,
    TRUST_STORE_FILE,
    Flash,
    FlashCorruptError,
    FlashError,
    SlotInUseError,
)

REPO = Path(__file__).resolve().parents[1]
PRODUCT = 555
PLATFORM = 13
KEY = SigningKey.from_private_bytes(bytes(range(32)))
STORE = TrustStore.initial(PRODUCT, [KEY.public_key])
SYS = build_module(b"S" * 4000, platform_id=PLATFORM, function=4, version=5000)
USER_VERSIONS = {
    v: build_module(
        bytes([v]) * 3000,
        platform_id=PLATFORM,
        function=5,
        version=v,
        product_id=PLATFORM,
        product_version=v,
        dependencies=[ModuleDependency(4, 1, 5000)],
    )
    for v in (1, 2, 3)
}
SIGNED = {
    v: sign_manifest(KEY, manifest_for_module(image, product_id=PRODUCT)).to_bytes()
    for v, image in USER_VERSIONS.items()
}


def provisioned(path: Path, *, fsync: bool = False) -> Flash:
    flash = Flash.open(path, fsync=fsync)
    flash.provision([SYS, USER_VERSIONS[1]], STORE)
    return flash


def download(flash: Flash, version: int, chunk: int = 1024) -> None:
    """Plan, write, accept and stage ``version`` of the user part."""
    plan = plan_download(
        flash.boot_record(),
        SIGNED[version],
        STORE,
        platform_id=PLATFORM,
        installed=flash.installed_modules(),
    )
    assert plan.verdict.accepted, plan.verdict.detail
    if plan.changed:
        flash.commit_boot_record(plan.record)
    flash.begin_inactive(5, 1)
    image = USER_VERSIONS[version]
    for offset in range(0, len(image), chunk):
        flash.write_inactive(5, 1, offset, image[offset : offset + chunk])
    verdict = accept_download(
        flash.read_inactive(5, 1),
        SIGNED[version],
        STORE,
        platform_id=PLATFORM,
        installed=flash.installed_modules(),
    )
    assert verdict.accepted, verdict.detail
    flash.commit_boot_record(stage_update(flash.boot_record(), verdict))


def test_fresh_flash_is_empty(tmp_path: Path) -> None:
    flash = Flash.open(tmp_path / "dev")
    assert flash.boot_record() == BootRecord()
    assert flash.load_trust_store() is None and flash.load_transfer_state() is None
    assert flash.installed_modules() == [] and flash.slot_states() == {}


def test_provision_and_reopen(tmp_path: Path) -> None:
    flash = provisioned(tmp_path)
    assert sorted(flash.installed_modules()) == [(4, 1, 5000), (5, 1, 1)]
    assert flash.read_active(5, 1) == USER_VERSIONS[1] and flash.read_active(6, 1) is None
    again = Flash.open(tmp_path)
    assert again.boot_record() == flash.boot_record() and again.boot_record().generation == 1
    assert again.load_trust_store() == STORE
    assert again.slot_states()[(5, 1)][0].module_version == 1
    with pytest.raises(FlashError, match="invalid module"):
        flash.provision([b"not a module"], STORE)


def test_full_update_cycle_persists(tmp_path: Path) -> None:
    flash = provisioned(tmp_path)
    download(flash, 2)
    assert Flash.open(tmp_path).boot_record().pending is not None
    decision = flash.boot()
    assert decision.trial is not None and decision.boot_slots[(5, 1)] == 1
    result = flash.record_selftest(True)
    assert result.outcome is not None and result.outcome.status is OutcomeStatus.COMMITTED
    reopened = Flash.open(tmp_path)
    assert sorted(reopened.installed_modules()) == [(4, 1, 5000), (5, 1, 2)]
    assert reopened.boot_record().outcome == result.outcome
    # Generation counts the record writes: provision, stage, boot, commit.
    assert reopened.boot_record().generation == 4
    reopened.commit_boot_record(acknowledge_outcome(reopened.boot_record()))
    assert Flash.open(tmp_path).boot_record().outcome is None


def test_transfer_state_and_begin(tmp_path: Path) -> None:
    flash = provisioned(tmp_path)
    flash.write_inactive(5, 1, 4, b"abcd")
    assert flash.read_inactive(5, 1) == b"\0\0\0\0abcd" and flash.slot_size(5, 1, 1) == 8
    flash.save_transfer_state(b"state-1")
    assert Flash.open(tmp_path).load_transfer_state() == b"state-1"
    assert flash.begin_inactive(5, 1) == 1
    assert flash.read_inactive(5, 1) == b"" and flash.load_transfer_state() is None
    assert flash.read_slot(5, 1, 1, offset=2, length=2) == b""
    with pytest.raises(ValueError):
        flash.write_inactive(5, 1, -1, b"x")
    with pytest.raises(ValueError):
        flash.slot_path(5, 1, 2)


def test_slots_in_use_are_protected(tmp_path: Path) -> None:
    flash = provisioned(tmp_path)
    download(flash, 2)
    with pytest.raises(SlotInUseError, match="pending activation"):
        flash.write_inactive(5, 1, 0, b"x")
    flash.boot()
    with pytest.raises(SlotInUseError, match="rollback target"):
        flash.begin_inactive(5, 1)
    flash.record_selftest(False)  # rolled back to slot 0; slot 1 is free again
    assert flash.inactive_slot(5, 1) == 1
    flash.write_inactive(5, 1, 0, b"x")
    # Another module's inactive slot is never blocked by this trial.
    flash.write_inactive(6, 1, 0, b"y")


def test_record_write_torn_at_any_byte_keeps_the_previous_record(tmp_path: Path) -> None:
    flash = provisioned(tmp_path)  # boot record generation 1, in copy 0
    flash.commit_boot_record(flash.boot_record())  # generation 2, copy 1
    copy0 = tmp_path / f"{BOOT_RECORD_FILE}.0"
    before = copy0.read_bytes()
    flash.commit_boot_record(replace(flash.boot_record(), active=((4, 1, 0), (5, 1, 1))))
    after = copy0.read_bytes()  # generation 3 overwrote copy 0 in place
    assert Flash.open(tmp_path).boot_record().generation == 3
    for cut in range(len(after)):
        copy0.write_bytes(after[:cut] + before[cut:])  # the write stopped after `cut` bytes
        record = Flash.open(tmp_path).boot_record()
        assert record.generation == 2 and record.active == ((4, 1, 0), (5, 1, 0)), cut


def test_recovery_removes_stray_temp_files_and_detects_corruption(tmp_path: Path) -> None:
    flash = provisioned(tmp_path)
    (tmp_path / "slots" / "f5-i1-s0.bin.tmp").write_bytes(b"half a factory image")
    assert Flash.open(tmp_path).boot_record().generation == 1
    assert not list(tmp_path.glob("**/*.tmp"))
    flash.save_trust_store(STORE)  # now both copies exist
    for which in (0, 1):
        path = tmp_path / f"{TRUST_STORE_FILE}.{which}"
        raw = bytearray(path.read_bytes())
        raw[-3] ^= 1
        path.write_bytes(bytes(raw))
    with pytest.raises(FlashCorruptError, match="both copies"):
        Flash.open(tmp_path).load_trust_store()
    flash.commit_boot_record(flash.boot_record())
    for which in (0, 1):
        (tmp_path / f"{BOOT_RECORD_FILE}.{which}").write_bytes(b"OTAR garbage garbage garbage")
    with pytest.raises(FlashCorruptError, match=BOOT_RECORD_FILE):
        Flash.open(tmp_path)


def test_fsync_is_configurable_and_no_descriptor_stays_open(tmp_path: Path) -> None:
    fds_before = len(os.listdir("/proc/self/fd"))
    quiet = provisioned(tmp_path / "quiet", fsync=False)
    download(quiet, 2)
    assert quiet.fsync_count == 0
    durable = provisioned(tmp_path / "durable", fsync=True)
    start = durable.fsync_count
    assert start > 0
    # Slot data is made durable before the record that describes it: slot file (+ slots
    # directory when the file is new), then the record copy (+ state directory when new).
    expected = [4, 3, 2, 2]
    for round_number, cost in enumerate(expected):
        before = durable.fsync_count
        durable.write_inactive(5, 1, round_number, b"abc")
        durable.save_transfer_state(bytes([round_number]))
        assert durable.fsync_count - before == cost, round_number
    before = durable.fsync_count
    durable.begin_inactive(5, 1)  # clears the transfer state: one record copy
    assert durable.fsync_count - before == 1
    durable.clear_transfer_state()  # already clear: nothing to write
    assert durable.fsync_count - before == 1
    assert len(os.listdir("/proc/self/fd")) == fds_before


# --- a crash between any two writes, on the real flash ----------------------------------


def _recover_and_finish(path: Path, target: int) -> Flash:
    """Restart after a crash: boot (checking every boot) until the update to ``target`` ended,
    resending it from the start when nothing is pending."""
    for _ in range(10):
        flash = Flash.open(path, fsync=False)
        _check_transfer_state(flash)
        decision = flash.boot()
        assert not decision.missing and not decision.unmet
        booted = flash.read_slot(5, 1, decision.boot_slots[(5, 1)])
        assert slot_state_of(booted).valid and slot_state_of(booted).module_version in (1, target)
        if decision.trial is not None:
            flash.record_selftest(True)
        if flash.boot_record().outcome is not None:
            return flash
        download(flash, target)
    raise AssertionError("update never finished")


Step = tuple[Callable[[Flash], object], Callable[[Flash], object] | None]


def _write(offset: int, data: bytes) -> Callable[[Flash], object]:
    def run(flash: Flash) -> None:
        flash.write_inactive(5, 1, offset, data)

    return run


def _save_state(image: bytes, received: int) -> Callable[[Flash], object]:
    def run(flash: Flash) -> None:
        partial = hashlib.sha256(image[:received]).digest()
        flash.save_transfer_state(struct.pack(">I32s", received, partial))

    return run


def _check_transfer_state(flash: Flash) -> None:
    """Saved receiver state always describes the data in the inactive slot."""
    saved = flash.load_transfer_state()
    if saved is not None:
        received, partial = struct.unpack(">I32s", saved)
        assert hashlib.sha256(flash.read_inactive(5, 1)[:received]).digest() == partial


def _update_steps() -> list[Step]:
    """The writes of one update, each with what a crash in its middle leaves (chunk writes
    may be torn; record writes are atomic). An abandoned transfer of version 3 comes first."""
    abandoned = USER_VERSIONS[3]
    steps: list[Step] = [
        (_write(0, abandoned[:1024]), None),
        (_save_state(abandoned, 1024), None),
        (lambda f: f.begin_inactive(5, 1), None),
    ]
    image = USER_VERSIONS[2]
    for offset in range(0, len(image), 1024):
        chunk = image[offset : offset + 1024]
        steps.append((_write(offset, chunk), _write(offset, chunk[: len(chunk) // 2])))
        steps.append((_save_state(image, offset + len(chunk)), None))
    steps.append((_stage, None))
    steps.append((lambda f: f.clear_transfer_state(), None))
    steps.append((lambda f: f.boot(), None))
    steps.append((lambda f: f.record_selftest(True), None))
    return steps


def _stage(flash: Flash) -> None:
    verdict = accept_download(
        flash.read_inactive(5, 1),
        SIGNED[2],
        STORE,
        platform_id=PLATFORM,
        installed=flash.installed_modules(),
    )
    assert verdict.accepted
    flash.commit_boot_record(stage_update(flash.boot_record(), verdict))


def test_crash_between_every_pair_of_steps_on_real_flash(tmp_path: Path) -> None:
    steps = _update_steps()
    for crash_before in range(len(steps) + 1):
        for torn in (False, True):
            if torn and (crash_before == len(steps) or steps[crash_before][1] is None):
                continue
            path = tmp_path / f"dev-{crash_before}-{torn}"
            flash = provisioned(path)
            for step, _ in steps[:crash_before]:
                step(flash)
            if torn:
                half = steps[crash_before][1]
                assert half is not None
                half(flash)
            del flash  # power off
            final = _recover_and_finish(path, 2)
            outcome = final.boot_record().outcome
            assert outcome is not None and outcome.status is OutcomeStatus.COMMITTED
            assert sorted(final.installed_modules()) == [(4, 1, 5000), (5, 1, 2)]


# --- SIGKILL at random moments, real subprocess -----------------------------------------

CHILD = textwrap.dedent(
    """
    import hashlib, struct, sys, time
    from otacore.device import acknowledge_outcome
    from otacore.device.slots import (RollbackContext, accept_download, app_floor,
                                      plan_download, stage_update)
    from otacore.downgrade import authorize_downgrade
    from otacore.module import ModuleDependency, build_module
    from otacore.signing import (SigningKey, TrustStore, introduce_key, manifest_for_module,
                                 sign_manifest, withdraw_key)
    from server.emulator.flash import Flash

    state_dir, key_hex, other_hex = sys.argv[1:4]
    key = SigningKey.from_private_bytes(bytes.fromhex(key_hex))
    other = SigningKey.from_private_bytes(bytes.fromhex(other_hex))
    PRODUCT, CHUNK, DEVICE = 555, 1024, "0123456789abcdef01234567"
    def image(v):
        return build_module(bytes([v]) * 20000, platform_id=13, function=5, version=v,
                            product_id=13, product_version=v,
                            dependencies=[ModuleDependency(4, 1, 5000)])
    flash = Flash.open(state_dir)
    flash.boot()
    if flash.boot_record().trial is not None:
        flash.record_selftest(True)
    print("ready", flush=True)
    while True:
        if flash.boot_record().outcome is not None:
            flash.commit_boot_record(acknowledge_outcome(flash.boot_record()))
        store = flash.load_trust_store()
        seq = store.sequence + 1  # odd statements introduce the other key, even withdraw it
        statement = (introduce_key(key, other.public_key, product_id=PRODUCT, sequence=seq)
                     if seq % 2 else withdraw_key(key, other.key_id, product_id=PRODUCT,
                                                  sequence=seq))
        store = store.apply(statement)
        flash.save_trust_store(store)
        current = dict(((f, i), v) for f, i, v in flash.installed_modules())[(5, 1)]
        version = current % 4 + 1
        img = image(version)
        manifest = sign_manifest(key, manifest_for_module(img, product_id=PRODUCT))
        signed = manifest.to_bytes()
        rollback = None
        floor = app_floor(flash.boot_record())
        if version < floor:  # 4 -> 1 wraps around: a downgrade, authorised for this device
            grant = authorize_downgrade(key, manifest.manifest, device_id=DEVICE,
                                        from_version=floor,
                                        issued_at_ms=time.time_ns() // 1_000_000,
                                        lifetime_ms=60_000)
            rollback = RollbackContext(DEVICE, grant.to_bytes(), time.time())
        plan = plan_download(flash.boot_record(), signed, store, platform_id=13,
                             installed=flash.installed_modules(), rollback=rollback)
        assert plan.verdict.accepted, plan.verdict.detail
        if plan.changed:
            flash.commit_boot_record(plan.record)
        offset = 0
        saved = flash.load_transfer_state()
        if saved is not None:
            v, received, partial = struct.unpack(">HI32s", saved)
            data = flash.read_inactive(5, 1)[:received]
            if v == version and hashlib.sha256(data).digest() == partial:
                offset = received  # resume
        if offset == 0:
            flash.begin_inactive(5, 1)
        while offset < len(img):
            flash.write_inactive(5, 1, offset, img[offset:offset + CHUNK])
            offset = min(offset + CHUNK, len(img))
            partial = hashlib.sha256(img[:offset]).digest()
            flash.save_transfer_state(struct.pack(">HI32s", version, offset, partial))
        verdict = accept_download(flash.read_inactive(5, 1), signed, store, platform_id=13,
                                  installed=flash.installed_modules(),
                                  record=flash.boot_record(), rollback=rollback)
        assert verdict.accepted, verdict.detail
        flash.commit_boot_record(stage_update(flash.boot_record(), verdict))
        flash.clear_transfer_state()
        flash.boot()  # reset into the new image
        flash.record_selftest(True)
        print("installed", flush=True)
    """
)


def _check_after_kill(path: Path, other: SigningKey) -> int:
    """The state a killed device restarts from is consistent; returns the record generation."""
    flash = Flash.open(path, fsync=False)
    record = flash.boot_record()
    decision = decide_boot(record, flash.slot_states())
    assert not decision.missing and not decision.unmet, decision
    booted = flash.read_slot(5, 1, decision.boot_slots[(5, 1)])
    state = slot_state_of(booted)
    assert state.valid and state.module_version in (1, 2, 3, 4)
    store = flash.load_trust_store()
    assert store is not None and KEY.key_id in store
    assert (other.key_id in store) == (store.sequence % 2 == 1)
    # The anti-rollback floor is the version of a committed application, whatever was killed.
    guard = decision.record.rollback
    assert guard is not None and guard.floor in (1, 2, 3, 4)
    saved = flash.load_transfer_state()
    if saved is not None:
        _version, received, partial = struct.unpack(">HI32s", saved)
        data = flash.read_inactive(5, 1)
        assert len(data) >= received and hashlib.sha256(data[:received]).digest() == partial
    return record.generation


#: Children killed: each at a random moment of its run (fixed seed), the last one after it
#: installed an update.
KILLS = 12


def test_sigkill_at_random_moments(tmp_path: Path) -> None:
    other = SigningKey.from_private_bytes(bytes(range(9, 41)))
    path = tmp_path / "device"
    provisioned(path, fsync=True)
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rng = random.Random(1234)
    kills = 0
    first_generation = last_generation = 1
    while kills < KILLS:
        child = subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(path),
                KEY.private_bytes().hex(),
                other.private_bytes().hex(),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            cwd=REPO,
        )
        try:
            assert child.stdout is not None
            ready = child.stdout.readline()
            if ready != b"ready\n":
                child.wait(timeout=10)
                error = child.stderr.read().decode() if child.stderr else ""
                pytest.fail(f"child failed to start: {error}")
            if kills == KILLS - 1:
                # The last child first installs an update: progress between kills does
                # not depend on how fast the machine is.
                assert child.stdout.readline() == b"installed\n"
            time.sleep(rng.uniform(0.0, 0.4))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=10)
        finally:
            if child.poll() is None:
                child.kill()
                child.wait()
            stderr = child.stderr.read().decode() if child.stderr else ""
            for stream in (child.stdout, child.stderr):
                if stream is not None:
                    stream.close()
        assert child.returncode == -signal.SIGKILL, f"child exited on its own: {stderr}"
        kills += 1
        last_generation = _check_after_kill(path, other)
    assert last_generation > first_generation  # the child made progress between kills
