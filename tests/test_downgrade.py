"""Application rollback protection, sans-IO (issue 13, finding 13): the downgrade
authorisation format, the device's anti-rollback floor, and every reason a device refuses an
older application (replayed manifest, another device's authorisation, expiry, reuse)."""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import replace

import pytest

from otacore.device import (
    BootRecord,
    BootRecordFormatError,
    OutcomeStatus,
    RollbackGuard,
    TrialState,
    slot_state_of,
)
from otacore.device.slots import (
    RejectReason,
    RollbackContext,
    accept_download,
    app_floor,
    decide_boot,
    on_selftest_result,
    plan_download,
    stage_update,
)
from otacore.downgrade import (
    SIZE,
    DowngradeFormatError,
    authorize_downgrade,
    parse_downgrade,
    verify_downgrade,
)
from otacore.errors import PayloadSchemaError
from otacore.module import ModuleDependency, build_module, parse_module
from otacore.protocol.ota_wire import offer_request, split_offer
from otacore.signing import (
    SignatureError,
    SignedManifest,
    SigningKey,
    TrustStore,
    UnknownKeyError,
    WrongProductError,
    manifest_for_module,
    sign_manifest,
)

PRODUCT = 777
PLATFORM = 13
KEY = SigningKey.from_private_bytes(bytes(range(32)))
OTHER_KEY = SigningKey.from_private_bytes(bytes(range(5, 37)))
STORE = TrustStore.initial(PRODUCT, [KEY.public_key])
DEVICE_A = "0123456789abcdef01234567"
DEVICE_B = "76543210fedcba9876543210"
INSTALLED = [(4, 1, 5000), (5, 1, 6)]
NOW = 1_800_000_000.0  # the device's wall clock, Unix seconds
NOW_MS = int(NOW * 1000)
HOUR_MS = 3_600_000


def app(version: int, *, product_version: int | None = -1) -> bytes:
    """A user part whose product firmware version is ``version`` (module version 6)."""
    embedded = version if product_version == -1 else product_version
    return build_module(
        bytes([version]) * 2000, platform_id=PLATFORM, function=5, version=6,
        product_id=None if embedded is None else PRODUCT, product_version=embedded,
        dependencies=[ModuleDependency(4, 1, 5000)],
    )


def sign(image: bytes, key: SigningKey = KEY) -> SignedManifest:
    """The image's signed manifest (version 0 for a binary without product data, as the
    server signs it)."""
    product_version = None if parse_module(image).product_version is not None else 0
    manifest = manifest_for_module(image, product_id=PRODUCT, product_version=product_version)
    return sign_manifest(key, manifest)


def signed(image: bytes, key: SigningKey = KEY) -> bytes:
    return sign(image, key).to_bytes()


def grant(image: bytes, *, device: str = DEVICE_A, from_version: int = 5,
          issued_at_ms: int = NOW_MS - 1000, lifetime_ms: int = HOUR_MS,
          key: SigningKey = KEY) -> bytes:
    """A downgrade authorisation for ``image``, signed by ``key``."""
    return authorize_downgrade(key, sign(image).manifest, device_id=device,
                               from_version=from_version, issued_at_ms=issued_at_ms,
                               lifetime_ms=lifetime_ms).to_bytes()


#: A device that committed product version 5: its floor.
RUNNING_5 = BootRecord(active=((4, 1, 0), (5, 1, 0)), rollback=RollbackGuard(5))


def plan(image: bytes, authorization: bytes | None = None, *, device: str = DEVICE_A,
         now: float | None = NOW, record: BootRecord = RUNNING_5) -> RejectReason | None:
    """The reason plan_download and accept_download give (they must agree)."""
    context = RollbackContext(device, authorization, now)
    planned = plan_download(record, signed(image), STORE, platform_id=PLATFORM,
                            installed=INSTALLED, rollback=context)
    accepted = accept_download(image, signed(image), STORE, platform_id=PLATFORM,
                               installed=INSTALLED, record=record, rollback=context)
    assert planned.verdict.reason is accepted.reason, (planned.verdict, accepted)
    return accepted.reason


# --- the format -----------------------------------------------------------------------------


def test_authorisation_round_trips_and_has_a_fixed_size() -> None:
    raw = grant(app(3))
    assert len(raw) == SIZE
    parsed = parse_downgrade(raw)
    assert parsed.to_bytes() == raw
    authorization = verify_downgrade(raw, STORE)
    assert (authorization.device_id, authorization.from_version, authorization.to_version) == (
        DEVICE_A, 5, 3)
    assert authorization.expires_at_ms - authorization.issued_at_ms == HOUR_MS


@pytest.mark.parametrize(
    ("damage", "error"),
    [
        (lambda raw: raw[:-1], DowngradeFormatError),
        (lambda raw: raw + b"\0", DowngradeFormatError),
        (lambda raw: b"OTAM" + raw[4:], DowngradeFormatError),
        (lambda raw: raw[:4] + b"\x02" + raw[5:], DowngradeFormatError),
        (lambda raw: raw[:-1] + bytes([raw[-1] ^ 1]), SignatureError),  # the signature
        (lambda raw: raw[:60] + bytes([raw[60] ^ 1]) + raw[61:], SignatureError),  # a field
    ],
    ids=["truncated", "trailing", "magic", "format", "signature", "tampered-field"],
)
def test_damaged_authorisations_are_refused(
    damage: Callable[[bytes], bytes], error: type[Exception]
) -> None:
    with pytest.raises(error):
        verify_downgrade(damage(grant(app(3))), STORE)


def test_authorisation_needs_a_trusted_key_of_the_product() -> None:
    with pytest.raises(UnknownKeyError):
        verify_downgrade(grant(app(3), key=OTHER_KEY), STORE)
    with pytest.raises(WrongProductError):
        verify_downgrade(grant(app(3)), TrustStore.initial(PRODUCT + 1, [KEY.public_key]))


def test_signatures_are_domain_separated() -> None:
    """The same key signs manifests and authorisations: neither signature passes for the
    other, even over the very same bytes."""
    raw = grant(app(3))
    body = raw[: SIZE - 64]
    manifest_context = b"otacloud firmware manifest v1\x00"
    forged = body + KEY.sign(manifest_context + body)
    with pytest.raises(SignatureError):
        verify_downgrade(forged, STORE)
    with pytest.raises(SignatureError):
        verify_downgrade(body + KEY.sign(body), STORE)


def test_an_authorisation_must_be_a_downgrade_that_expires() -> None:
    base = parse_downgrade(grant(app(3))).authorization
    with pytest.raises(DowngradeFormatError, match="no downgrade"):
        replace(base, to_version=5)
    with pytest.raises(DowngradeFormatError, match="expire after"):
        replace(base, expires_at_ms=base.issued_at_ms)
    with pytest.raises(DowngradeFormatError, match="device id"):
        replace(base, device_id="0123456789abcdef0123456\n")
    with pytest.raises(ValueError, match="at least 1 ms"):
        authorize_downgrade(KEY, sign(app(3)).manifest, device_id=DEVICE_A, from_version=5,
                            issued_at_ms=NOW_MS, lifetime_ms=0)


def test_offer_carries_the_authorisation_after_the_manifest() -> None:
    manifest, authorization = signed(app(3)), grant(app(3))
    message = offer_request(manifest, authorization=authorization)
    assert split_offer(message.payload) == (manifest, authorization)
    assert split_offer(offer_request(manifest).payload) == (manifest, None)
    with pytest.raises(PayloadSchemaError, match="downgrade authorisation is"):
        split_offer(manifest + authorization[:-3])
    assert split_offer(b"short") == (b"short", None)  # the manifest parser refuses it later


# --- the device's rule ----------------------------------------------------------------------


def test_a_replayed_older_manifest_is_refused() -> None:
    assert plan(app(3)) is RejectReason.DOWNGRADE
    # Same version (a re-flash) and newer ones need nothing.
    assert plan(app(5)) is None
    assert plan(app(6)) is None


def test_an_authorised_downgrade_is_accepted_by_its_device_only() -> None:
    authorization = grant(app(3))
    assert plan(app(3), authorization) is None
    assert plan(app(3), authorization, device=DEVICE_B) is RejectReason.DOWNGRADE


@pytest.mark.parametrize(
    ("authorization", "image", "why"),
    [
        (lambda: grant(app(3), issued_at_ms=NOW_MS - 2 * HOUR_MS), app(3), "expired"),
        (lambda: grant(app(2)), app(3), "names version 2"),
        (lambda: grant(app(3), from_version=4), app(3), "since run version 5"),
        (lambda: grant(app(3), key=OTHER_KEY), app(3), "does not trust"),
        (lambda: grant(app(3))[:-1] + b"\0", app(3), "does not verify"),
    ],
    ids=["expired", "other-image", "issued-for-an-older-floor", "untrusted-key", "forged"],
)
def test_authorisations_that_do_not_cover_the_install_are_refused(
    authorization: Callable[[], bytes], image: bytes, why: str
) -> None:
    context = RollbackContext(DEVICE_A, authorization(), NOW)
    verdict = accept_download(image, signed(image), STORE, platform_id=PLATFORM,
                              installed=INSTALLED, record=RUNNING_5, rollback=context)
    assert verdict.reason is RejectReason.DOWNGRADE and why in verdict.detail, verdict.detail


def test_an_authorisation_is_used_once() -> None:
    authorization = grant(app(3))
    context = RollbackContext(DEVICE_A, authorization, NOW)
    verdict = accept_download(app(3), signed(app(3)), STORE, platform_id=PLATFORM,
                              installed=INSTALLED, record=RUNNING_5, rollback=context)
    staged = stage_update(RUNNING_5, verdict)
    assert staged.rollback == RollbackGuard(5, authorised_at=NOW_MS - 1000)
    # The staged image is dropped (say, replaced): the same authorisation cannot come back.
    again = replace(staged, pending=None)
    assert plan(app(3), authorization, record=again) is RejectReason.DOWNGRADE
    assert plan(app(3), grant(app(3), issued_at_ms=NOW_MS), record=again) is None


def test_a_device_without_a_clock_uses_the_newest_signed_time_it_has_seen() -> None:
    used = replace(RUNNING_5, rollback=RollbackGuard(5, authorised_at=NOW_MS))
    # Issued later, still valid at the last signed time seen: accepted without a clock.
    assert plan(app(3), grant(app(3), issued_at_ms=NOW_MS + 1), now=None, record=used) is None
    # One that expired before a time the device has seen is refused even without a clock...
    stale = grant(app(3), issued_at_ms=NOW_MS - HOUR_MS, lifetime_ms=HOUR_MS // 2)
    assert plan(app(3), stale, now=None, record=used) is RejectReason.DOWNGRADE
    # ... and so is anything not newer than the last one used.
    assert plan(app(3), grant(app(3), issued_at_ms=NOW_MS), now=None,
                record=used) is RejectReason.DOWNGRADE


def test_device_os_modules_are_outside_the_application_floor() -> None:
    system = build_module(b"S" * 3000, platform_id=PLATFORM, function=4, version=5100, index=1)
    manifest = sign_manifest(KEY, manifest_for_module(system, product_id=PRODUCT,
                                                      product_version=0)).to_bytes()
    verdict = accept_download(system, manifest, STORE, platform_id=PLATFORM,
                              installed=INSTALLED, record=RUNNING_5)
    assert verdict.accepted, verdict.detail


def test_a_development_binary_without_product_data_needs_an_authorisation() -> None:
    binary = app(9, product_version=None)
    assert plan(binary) is RejectReason.DOWNGRADE  # version 0 < 5
    assert plan(binary, grant(binary)) is None


# --- the floor: set by commits, kept by the bootloader's own rollbacks ------------------------


def test_commit_sets_the_floor_and_a_failed_trial_keeps_it() -> None:
    old, new = app(5), app(7)
    slots = {(4, 1): (slot_state_of(build_module(b"S" * 3000, platform_id=PLATFORM,
                                                   function=4, version=5000, index=1)),
                      slot_state_of(None)),
             (5, 1): (slot_state_of(old), slot_state_of(new))}
    trial = replace(RUNNING_5, active=((4, 1, 0), (5, 1, 1)),
                    trial=TrialState(5, 1, 0, 1, 6, 6))
    committed = on_selftest_result(trial, True, slots)
    assert committed.record.rollback == RollbackGuard(7)
    rolled_back = on_selftest_result(trial, False, slots)
    assert rolled_back.record.rollback == RollbackGuard(5)
    assert rolled_back.outcome is not None
    assert rolled_back.outcome.status is OutcomeStatus.SELFTEST_FAILED
    # A later fall-back to the other slot (the active one went bad) keeps the floor too.
    broken = {**slots, (5, 1): (slot_state_of(old), slot_state_of(None))}
    boot = decide_boot(committed.record, broken)
    assert boot.boot_slots[(5, 1)] == 0 and boot.record.rollback == RollbackGuard(7)
    assert app_floor(boot.record) == 7


def test_format_1_boot_records_are_read_and_get_a_floor_at_boot() -> None:
    record = BootRecord(active=((4, 1, 0), (5, 1, 0)), generation=9)
    raw = bytearray(record.to_bytes())
    # The same record as format 1 wrote it: no rollback section (13 bytes) before the CRC.
    body = bytes(raw[:4]) + b"\x01" + bytes(raw[5:-4 - 13])
    legacy = body + struct.pack(">I", zlib.crc32(body))
    parsed = BootRecord.from_bytes(legacy)
    assert parsed == record and parsed.rollback is None
    with pytest.raises(BootRecordFormatError):
        BootRecord.from_bytes(bytes(raw[:4]) + b"\x03" + bytes(raw[5:]))
    slots = {(4, 1): (slot_state_of(None), slot_state_of(None)),
             (5, 1): (slot_state_of(app(4)), slot_state_of(None))}
    assert decide_boot(parsed, slots).record.rollback == RollbackGuard(4)

