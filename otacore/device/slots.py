"""A/B firmware slots and the bootloader's decisions, sans-IO.

Every module (function, index) has two slots, 0 and 1: the *active* one runs, the *inactive*
one receives downloads. All decisions live in one small **boot record** that the flash layer
writes atomically (write a temporary file, fsync, rename), so every transition below is a
single write and a crash before or after it leaves a consistent state:

1. ``plan_download``: before the first chunk, the signed manifest is checked and the target
   (the inactive slot) chosen; a stale pending activation of the same module is dropped first
   (a record write), because its slot is about to be overwritten.
2. The image is written into the inactive slot (not atomic, and it need not be: no record
   points at that slot yet).
3. ``accept_download`` checks the whole image: CRC-32 and SHA-256 of the module format
   (otacore.module.validate_module), the manifest signature (otacore.signing), the file hash
   and size against the manifest, the module metadata against the manifest, the platform, the
   dependencies against the other installed modules, that a system part is no downgrade, and
   that an application is not older than the record's anti-rollback floor unless a downgrade
   authorisation for this device allows it (otacore.downgrade; ``plan_download`` checks the
   same before the first chunk). ``stage_update`` then marks it *pending activation* (a
   record write, which also uses up the authorisation; the flash layer makes the slot data
   durable before it).
4. At reset ``decide_boot`` switches the module's active slot to the pending one and starts a
   *trial* (a record write: active slot + trial flag + attempt counter, all at once). Every
   trial boot increments the attempt counter before the image starts.
5. ``on_selftest_result``: reaching the cloud commits the trial (for an application, the
   same write sets the anti-rollback floor to its product version); failing rolls back to the
   previous slot, floor untouched. A trial image that has been started ``max_trial_boots``
   times without a commit (it crashed or reset each time) is rolled back by ``decide_boot``.
   Either way the record keeps an :class:`UpdateOutcome` until the session layer has reported
   it.

One update is in flight at a time: a new download is refused while another module awaits
activation or while a trial runs (the trial's rollback target is the inactive slot).

The boot record, slot states and test firmware markers are defined in :mod:`otacore.device`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import astuple, dataclass, replace
from enum import IntEnum

from otacore.device import (
    EMPTY_SLOT,
    NO_SLOT,
    BootRecord,
    ModuleKey,
    OutcomeStatus,
    PendingActivation,
    RollbackGuard,
    SlotState,
    TrialState,
    UpdateOutcome,
    inactive_slot,
)
from otacore.downgrade import (
    DowngradeAuthorization,
    DowngradeFormatError,
    DowngradeRefusedError,
    check_downgrade,
    verify_downgrade,
)
from otacore.errors import ModuleFormatError
from otacore.module import ModuleDependency, ModuleInfo, dependency_met, validate_module
from otacore.platforms import ModuleFunction
from otacore.signing import (
    FirmwareMismatchError,
    Manifest,
    ManifestFormatError,
    SignatureError,
    TrustStore,
    UnknownKeyError,
    WrongProductError,
    verify_firmware,
    verify_manifest,
)

DEFAULT_MAX_TRIAL_BOOTS = 3
#: (function, index, version) of a running module, as otacore.module.dependency_met takes.
Installed = Iterable[tuple[int, int, int]]


# --- accepting a download -------------------------------------------------------------------


class RejectReason(IntEnum):
    """Why a device refuses an update (codes the session layer can report)."""

    INTEGRITY = 1  # module format, CRC-32, SHA-256 or size limit
    MANIFEST_FORMAT = 2
    UNKNOWN_KEY = 3
    BAD_SIGNATURE = 4
    WRONG_PRODUCT = 5
    IMAGE_MISMATCH = 6  # file size or SHA-256 differs from the manifest
    METADATA_MISMATCH = 7  # module prefix differs from the manifest
    WRONG_PLATFORM = 8
    DEPENDENCY_UNMET = 9
    DOWNGRADE = 10
    TRIAL_IN_PROGRESS = 11
    OTHER_UPDATE_PENDING = 12


@dataclass(frozen=True)
class Verdict:
    """The device's answer to an update: accepted (``reason`` None) or why not."""

    reason: RejectReason | None
    detail: str
    manifest: Manifest | None = None
    info: ModuleInfo | None = None
    #: The downgrade authorisation that let an older application in (None: no downgrade).
    authorization: DowngradeAuthorization | None = None

    @property
    def accepted(self) -> bool:
        """True when every check passed."""
        return self.reason is None


def _refuse(reason: RejectReason, detail: str, manifest: Manifest | None = None) -> Verdict:
    return Verdict(reason, detail, manifest)


def _check_manifest(signed_manifest: bytes, trust_store: TrustStore) -> Verdict:
    try:
        manifest = verify_manifest(signed_manifest, trust_store)
    except ManifestFormatError as exc:
        return _refuse(RejectReason.MANIFEST_FORMAT, str(exc))
    except UnknownKeyError as exc:
        return _refuse(RejectReason.UNKNOWN_KEY, str(exc))
    except WrongProductError as exc:
        return _refuse(RejectReason.WRONG_PRODUCT, str(exc))
    except SignatureError as exc:
        return _refuse(RejectReason.BAD_SIGNATURE, str(exc))
    return Verdict(None, "manifest signature verified", manifest)


def _busy_reason(record: BootRecord, key: ModuleKey) -> tuple[RejectReason, str] | None:
    """Refuse a second update while one is on trial or another module awaits activation."""
    if record.trial is not None:
        trial = record.trial
        return RejectReason.TRIAL_IN_PROGRESS, (
            f"module function {trial.function} index {trial.index} is on trial; it must be "
            "committed or rolled back before another update"
        )
    pending = record.pending
    if pending is not None and (pending.function, pending.index) != key:
        return RejectReason.OTHER_UPDATE_PENDING, (
            f"module function {pending.function} index {pending.index} awaits activation; "
            "reset the device first"
        )
    return None


def _check_compatibility(
    manifest: Manifest, platform_id: int, installed: Sequence[tuple[int, int, int]]
) -> Verdict:
    """Platform, no system part downgrade, dependencies met by the other modules."""
    if manifest.platform_id != platform_id:
        return _refuse(
            RejectReason.WRONG_PLATFORM,
            f"firmware is for platform {manifest.platform_id}, this device is "
            f"platform {platform_id}",
            manifest,
        )
    key = manifest.module_key
    current = [v for f, i, v in installed if (f, i) == key]
    if (
        manifest.module_function == ModuleFunction.SYSTEM_PART
        and current
        and manifest.module_version < max(current)
    ):
        return _refuse(
            RejectReason.DOWNGRADE,
            f"system part {manifest.module_index} version {manifest.module_version} "
            f"would downgrade the installed version {max(current)}",
            manifest,
        )
    others = [(f, i, v) for f, i, v in installed if (f, i) != key]
    for dep in manifest.dependencies:
        if not dependency_met(dep, others):
            have = [v for f, i, v in others if (f, i) == (dep.function, dep.index)]
            return _refuse(
                RejectReason.DEPENDENCY_UNMET,
                f"firmware needs module function {dep.function} index {dep.index} "
                f"version >= {dep.version}; installed: "
                f"{have[0] if have else 'none'}",
                manifest,
            )
    return Verdict(None, "compatible", manifest)


@dataclass(frozen=True)
class RollbackContext:
    """What the anti-rollback check needs besides the boot record: who the device is, the
    downgrade authorisation the offer carried, and the wall-clock time (Unix seconds; None
    for a device without a clock, see :mod:`otacore.downgrade`)."""

    device_id: str = ""
    authorization: bytes | None = None
    now: float | None = None


def app_floor(record: BootRecord) -> int:
    """The version an application offer must reach without a downgrade authorisation."""
    return record.rollback.floor if record.rollback is not None else 0


def _check_rollback(
    manifest: Manifest, record: BootRecord, trust_store: TrustStore, context: RollbackContext
) -> Verdict:
    """An application older than the floor needs a valid downgrade authorisation for this
    device (Device OS modules are checked by _check_compatibility: never a downgrade)."""
    if manifest.module_function != ModuleFunction.USER_PART:
        return Verdict(None, "not an application", manifest)
    floor = app_floor(record)
    if manifest.product_version >= floor:
        return Verdict(None, "no downgrade", manifest)
    if context.authorization is None:
        return _refuse(
            RejectReason.DOWNGRADE,
            f"application version {manifest.product_version} is older than version {floor} "
            "this device has run, and the offer carries no downgrade authorisation for it "
            "(lock or flash the device to the older version to authorise one)",
            manifest,
        )
    guard = record.rollback or RollbackGuard(floor)
    try:
        authorization = verify_downgrade(context.authorization, trust_store)
        check_downgrade(
            authorization, manifest, device_id=context.device_id, floor=floor,
            last_issued_at_ms=guard.authorised_at, now=context.now,
        )
    except (DowngradeFormatError, SignatureError, DowngradeRefusedError) as exc:
        return _refuse(RejectReason.DOWNGRADE, f"downgrade refused: {exc}", manifest)
    return Verdict(None, "downgrade authorised", manifest, authorization=authorization)


@dataclass(frozen=True)
class DownloadPlan:
    """Where a download goes, and the record to write before its first chunk."""

    verdict: Verdict
    slot: int | None
    record: BootRecord
    changed: bool  # write ``record`` before the first chunk


def plan_download(
    record: BootRecord,
    signed_manifest: bytes,
    trust_store: TrustStore,
    *,
    platform_id: int,
    installed: Installed,
    rollback: RollbackContext | None = None,
) -> DownloadPlan:
    """Decide whether to start downloading the firmware ``signed_manifest`` names.

    Nothing is downloaded unless the manifest verifies, the firmware suits this device, it
    is no application older than the anti-rollback floor (unless ``rollback`` carries a
    downgrade authorisation for it), no trial runs and no other module awaits activation. A
    pending activation of the same module is dropped (its slot is about to be overwritten):
    write ``plan.record`` first.
    """
    verdict = _check_manifest(signed_manifest, trust_store)
    if verdict.manifest is None:
        return DownloadPlan(verdict, None, record, False)
    manifest = verdict.manifest
    busy = _busy_reason(record, manifest.module_key)
    if busy is not None:
        return DownloadPlan(_refuse(*busy, manifest), None, record, False)
    pending = record.pending
    verdict = _check_compatibility(manifest, platform_id, list(installed))
    if not verdict.accepted:
        return DownloadPlan(verdict, None, record, False)
    verdict = _check_rollback(manifest, record, trust_store, rollback or RollbackContext())
    if not verdict.accepted:
        return DownloadPlan(verdict, None, record, False)
    new_record = replace(record, pending=None) if pending is not None else record
    return DownloadPlan(
        verdict, inactive_slot(record, manifest.module_key), new_record, pending is not None
    )


def accept_download(
    image: bytes,
    signed_manifest: bytes,
    trust_store: TrustStore,
    *,
    platform_id: int,
    installed: Installed,
    record: BootRecord | None = None,
    rollback: RollbackContext | None = None,
) -> Verdict:
    """Check a completely downloaded image before it may be staged (an application last
    of all against the anti-rollback floor of ``record``, with the downgrade authorisation
    in ``rollback`` if any).

    In order: module integrity (format, CRC-32, SHA-256, size limit), manifest signature,
    file size and SHA-256 against the manifest, module metadata against the manifest, the
    product the module names (if any) against the manifest's, platform, system part
    downgrade, dependencies against the other ``installed`` modules ((function, index,
    version) of the running images).
    """
    try:
        info = validate_module(image)
    except ModuleFormatError as exc:
        return _refuse(RejectReason.INTEGRITY, f"downloaded image is not valid: {exc}")
    verdict = _check_manifest(signed_manifest, trust_store)
    if verdict.manifest is None:
        return verdict
    manifest = verdict.manifest
    try:
        verify_firmware(image, manifest)
    except FirmwareMismatchError as exc:
        return _refuse(RejectReason.IMAGE_MISMATCH, str(exc), manifest)
    described = (*astuple(manifest)[2:6], manifest.dependencies)  # platform .. version
    actual = (info.platform_id, info.module_function, info.module_index, info.module_version)
    if described != (*actual, info.dependencies):
        detail = f"module says {(*actual, info.dependencies)}, signed manifest says {described}"
        return _refuse(
            RejectReason.METADATA_MISMATCH,
            f"(platform, function, index, version, dependencies) differ: {detail}",
            manifest,
        )
    named = info.named_product_id
    if named is not None and named != manifest.product_id:
        # The manifest is this device's product's (checked above); the image inside must
        # not be another product's firmware (a product id equal to the platform's names none).
        return _refuse(
            RejectReason.WRONG_PRODUCT,
            f"the image is built for product {named}, the signed manifest is for product "
            f"{manifest.product_id}",
            manifest,
        )
    verdict = _check_compatibility(manifest, platform_id, list(installed))
    if not verdict.accepted:
        return verdict
    verdict = _check_rollback(
        manifest, record or BootRecord(), trust_store, rollback or RollbackContext()
    )
    if not verdict.accepted:
        return verdict
    return Verdict(None, "accepted", manifest, info, verdict.authorization)


def stage_update(record: BootRecord, verdict: Verdict) -> BootRecord:
    """The record marking an accepted download *pending activation* at the next reset."""
    if not verdict.accepted or verdict.manifest is None:
        raise ValueError(f"cannot stage a refused update: {verdict.detail}")
    manifest = verdict.manifest
    key = manifest.module_key
    busy = _busy_reason(record, key)
    if busy is not None:
        raise ValueError(f"cannot stage the update: {busy[1]}")
    pending = PendingActivation(
        key[0], key[1], inactive_slot(record, key), manifest.module_version, manifest.sha256
    )
    authorization = verdict.authorization
    if authorization is not None:
        # Used up in the same write that stages it: it never lets anything in again.
        guard = record.rollback or RollbackGuard(0)
        record = replace(record, rollback=replace(guard, authorised_at=authorization.issued_at_ms))
    return replace(record, pending=pending)


# --- the bootloader -------------------------------------------------------------------------


class BootEventKind(IntEnum):
    """What the bootloader did."""

    ACTIVATED = 1  # a pending image became active, on trial
    TRIAL_BOOT = 2  # the trial image starts (again)
    ROLLED_BACK = 3
    PENDING_DROPPED = 4  # the pending slot no longer holds the accepted image
    FELL_BACK = 5  # the active slot was invalid; the other slot is used
    KEPT_WITHOUT_FALLBACK = 6  # trial failed but there is no previous image to return to


@dataclass(frozen=True)
class BootEvent:
    """One thing the bootloader did, for logs and tests."""

    kind: BootEventKind
    function: int
    index: int
    detail: str = ""


@dataclass(frozen=True)
class BootDecision:
    """The bootloader's choice: write ``record`` (when ``changed``), then run ``boot_slots``."""

    record: BootRecord
    changed: bool
    boot_slots: Mapping[ModuleKey, int]
    trial: TrialState | None  # the booted image must pass its self-test to be committed
    missing: tuple[ModuleKey, ...]  # installed modules with no valid image in either slot
    unmet: tuple[tuple[ModuleKey, ModuleDependency], ...]
    events: tuple[BootEvent, ...]

    @property
    def safe_mode(self) -> bool:
        """True when a module is missing or a dependency unmet (Device OS safe mode)."""
        return bool(self.missing or self.unmet)


def _slot(slots: Mapping[ModuleKey, Sequence[SlotState]], key: ModuleKey, slot: int) -> SlotState:
    pair = slots.get(key)
    if pair is None or not 0 <= slot < len(pair):
        return EMPTY_SLOT
    return pair[slot]


def _end_trial(
    record: BootRecord,
    slots: Mapping[ModuleKey, Sequence[SlotState]],
    status: OutcomeStatus,
    events: list[BootEvent],
) -> tuple[BootRecord, bool]:
    """Roll the trial module back; returns the record and whether the active slot changed."""
    trial = record.trial
    assert trial is not None
    key = (trial.function, trial.index)
    record = replace(record, trial=None)
    if trial.previous_slot != NO_SLOT and _slot(slots, key, trial.previous_slot).valid:
        events.append(BootEvent(BootEventKind.ROLLED_BACK, *key, status.name.lower()))
        outcome = UpdateOutcome(*key, trial.version, trial.previous_version, status)
        return replace(record.with_active(key, trial.previous_slot), outcome=outcome), True
    events.append(BootEvent(BootEventKind.KEPT_WITHOUT_FALLBACK, *key, status.name.lower()))
    outcome = UpdateOutcome(
        *key, trial.version, trial.previous_version, OutcomeStatus.NO_ROLLBACK_TARGET
    )
    return replace(record, outcome=outcome), False


def decide_boot(
    record: BootRecord,
    slots: Mapping[ModuleKey, Sequence[SlotState]],
    *,
    max_trial_boots: int = DEFAULT_MAX_TRIAL_BOOTS,
) -> BootDecision:
    """What the bootloader does at reset, given the record and what each slot holds.

    Activates a pending image (starting its trial), counts trial boots and rolls back a trial
    that has used ``max_trial_boots`` boots, and falls back to the other slot if the active one
    is invalid. The caller writes ``decision.record`` (atomically) before starting anything:
    the decision is idempotent, so a crash before that write just repeats it.
    """
    if max_trial_boots < 1:
        raise ValueError("max_trial_boots must be at least 1")
    events: list[BootEvent] = []
    new = record
    # 1. Activate a pending image: the one write that switches slots and starts the trial.
    pending = new.pending
    if pending is not None:
        key = (pending.function, pending.index)
        new = replace(new, pending=None)
        target = _slot(slots, key, pending.slot)
        current = new.active_slot(key)
        if new.trial is not None:
            events.append(BootEvent(BootEventKind.PENDING_DROPPED, *key, "a trial is running"))
        elif target.valid and target.sha256 == pending.sha256:
            prev_state = _slot(slots, key, current) if current is not None else EMPTY_SLOT
            trial = TrialState(
                key[0],
                key[1],
                NO_SLOT if current is None else current,
                0,
                pending.version,
                prev_state.module_version or 0,
            )
            new = replace(new.with_active(key, pending.slot), trial=trial)
            events.append(BootEvent(BootEventKind.ACTIVATED, *key, f"version {pending.version}"))
        else:
            now = _slot(slots, key, current) if current is not None else EMPTY_SLOT
            outcome = UpdateOutcome(
                *key, pending.version, now.module_version or 0, OutcomeStatus.IMAGE_INVALID
            )
            new = replace(new, outcome=outcome)
            events.append(
                BootEvent(
                    BootEventKind.PENDING_DROPPED,
                    *key,
                    "the pending slot does not hold the accepted image",
                )
            )
    # 2. Count the trial boot, or end a trial that keeps failing.
    if new.trial is not None:
        trial = new.trial
        key = (trial.function, trial.index)
        active = new.active_slot(key)
        if active is None or not _slot(slots, key, active).valid:
            new, _ = _end_trial(new, slots, OutcomeStatus.IMAGE_INVALID, events)
        elif trial.attempts >= max_trial_boots:
            new, _ = _end_trial(new, slots, OutcomeStatus.TOO_MANY_RESETS, events)
        else:
            new = replace(new, trial=replace(trial, attempts=min(trial.attempts + 1, 0xFF)))
            events.append(
                BootEvent(
                    BootEventKind.TRIAL_BOOT,
                    *key,
                    f"boot {trial.attempts + 1} of {max_trial_boots}",
                )
            )
    # 3. Every installed module boots from a valid slot if it has one.
    boot_slots: dict[ModuleKey, int] = {}
    missing: list[ModuleKey] = []
    for function, index, slot in new.active:
        key = (function, index)
        if _slot(slots, key, slot).valid:
            boot_slots[key] = slot
        elif _slot(slots, key, 1 - slot).valid:
            new = new.with_active(key, 1 - slot)
            boot_slots[key] = 1 - slot
            events.append(BootEvent(BootEventKind.FELL_BACK, *key, f"slot {slot} invalid"))
        else:
            missing.append(key)
    # 4. Safe mode when a running module's dependency is not met (Device OS does the same).
    running = [
        (f, i, _slot(slots, (f, i), s).module_version or 0) for (f, i), s in boot_slots.items()
    ]
    unmet = tuple(
        (key, dep)
        for key, slot in boot_slots.items()
        for dep in _slot(slots, key, slot).dependencies
        if not dependency_met(dep, running)
    )
    # 5. A record from before rollback protection: the running application sets the floor.
    if new.rollback is None:
        new = replace(new, rollback=RollbackGuard(_running_app_version(new, slots)))
    changed = new != record
    return BootDecision(new, changed, boot_slots, new.trial, tuple(missing), unmet, tuple(events))


def _running_app_version(record: BootRecord, slots: Mapping[ModuleKey, Sequence[SlotState]]) -> int:
    """Highest product version of the applications the record runs (0 when none has one);
    a trial image is not counted: it has not passed its self-test."""
    trial = record.trial
    versions = [
        _slot(slots, (function, index), slot).product_version or 0
        for function, index, slot in record.active
        if function == ModuleFunction.USER_PART
        and (trial is None or (trial.function, trial.index) != (function, index))
    ]
    return max(versions, default=0)


@dataclass(frozen=True)
class SelfTestDecision:
    """After the trial image's self-test: the record to write and whether to reset."""

    record: BootRecord
    changed: bool
    reset_required: bool  # a rollback happened: reset into the previous image
    outcome: UpdateOutcome | None


def on_selftest_result(
    record: BootRecord, passed: bool, slots: Mapping[ModuleKey, Sequence[SlotState]]
) -> SelfTestDecision:
    """Commit the trial image when it reached the cloud, roll it back when it did not."""
    trial = record.trial
    if trial is None:
        return SelfTestDecision(record, False, False, None)
    if passed:
        outcome = UpdateOutcome(
            trial.function,
            trial.index,
            trial.version,
            trial.previous_version,
            OutcomeStatus.COMMITTED,
        )
        new = replace(record, trial=None, outcome=outcome)
        if trial.function == ModuleFunction.USER_PART:
            # The committed application sets the anti-rollback floor, in the same write.
            key = (trial.function, trial.index)
            active = record.active_slot(key)
            state = _slot(slots, key, active) if active is not None else EMPTY_SLOT
            guard = record.rollback or RollbackGuard(0)
            new = replace(new, rollback=replace(guard, floor=state.product_version or 0))
        return SelfTestDecision(new, True, False, outcome)
    events: list[BootEvent] = []
    new, switched = _end_trial(record, slots, OutcomeStatus.SELFTEST_FAILED, events)
    return SelfTestDecision(new, True, switched, new.outcome)
