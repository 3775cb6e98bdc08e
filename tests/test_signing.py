"""Signed manifests, firmware checks and key rotation (otacore.signing)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from otacore.errors import ModuleFormatError, OtaError
from otacore.module import ModuleDependency, build_module
from otacore.signing import (
    FirmwareMismatchError,
    KeyRotationError,
    LastKeyError,
    Manifest,
    ManifestFormatError,
    ReplayedStatementError,
    SelfWithdrawalError,
    SignatureError,
    SigningKey,
    StatementFormatError,
    StatementOutOfOrderError,
    TrustStore,
    TrustStoreFormatError,
    UnknownKeyError,
    WrongProductError,
    generate_signing_key,
    introduce_key,
    key_id_of,
    manifest_for_module,
    parse_signed_manifest,
    parse_statement,
    sign_manifest,
    verify_firmware,
    verify_manifest,
    withdraw_key,
)

PRODUCT = 4242
KEY_A = SigningKey.from_private_bytes(bytes(range(32)))
KEY_B = SigningKey.from_private_bytes(bytes(range(1, 33)))
KEY_C = SigningKey.from_private_bytes(bytes(range(2, 34)))


def _image(version: int = 7, payload: bytes = b"app" * 500) -> bytes:
    return build_module(
        payload,
        platform_id=13,
        function=5,
        version=version,
        product_id=13,
        product_version=version,
        dependencies=[ModuleDependency(4, 1, 5302)],
    )


@pytest.fixture(scope="module")
def image() -> bytes:
    return _image()


@pytest.fixture(scope="module")
def store_a() -> TrustStore:
    return TrustStore.initial(PRODUCT, [KEY_A.public_key])


def _signed(key: SigningKey, image: bytes, product: int = PRODUCT) -> bytes:
    return sign_manifest(key, manifest_for_module(image, product_id=product)).to_bytes()


def test_key_id_is_sha256_prefix_of_raw_public_key() -> None:
    assert KEY_A.key_id == hashlib.sha256(KEY_A.public_key).digest()[:8].hex()
    assert len(KEY_A.key_id) == 16
    reloaded = SigningKey.from_private_bytes(KEY_A.private_bytes())
    assert reloaded.public_key == KEY_A.public_key
    fresh = generate_signing_key()
    assert fresh.key_id == key_id_of(fresh.public_key) != KEY_A.key_id


def test_manifest_describes_the_module(image: bytes) -> None:
    manifest = manifest_for_module(image, product_id=PRODUCT)
    assert manifest.sha256 == hashlib.sha256(image).digest()
    assert manifest.size == len(image)
    assert (manifest.platform_id, manifest.module_function, manifest.module_index) == (13, 5, 1)
    assert manifest.module_version == 7 and manifest.product_version == 7
    assert manifest.dependencies == (ModuleDependency(4, 1, 5302),)
    with pytest.raises(ManifestFormatError, match="product firmware version 7"):
        manifest_for_module(image, product_id=PRODUCT, product_version=8)


def test_sign_and_verify_round_trip_is_reproducible(image: bytes, store_a: TrustStore) -> None:
    signed = _signed(KEY_A, image)
    assert signed == _signed(KEY_A, image)  # canonical encoding + deterministic Ed25519
    manifest = verify_manifest(signed, store_a)
    assert manifest.key_id == KEY_A.key_id
    assert manifest == parse_signed_manifest(signed).manifest
    # The signature is a real Ed25519 signature over context + body, checkable independently.
    body = manifest.encode()
    Ed25519PublicKey.from_public_bytes(KEY_A.public_key).verify(
        signed[-64:], b"otacloud firmware manifest v1\x00" + body
    )
    verify_firmware(image, manifest)


def test_every_tampered_byte_is_refused(image: bytes, store_a: TrustStore) -> None:
    signed = bytearray(_signed(KEY_A, image))
    for position in range(len(signed)):
        tampered = bytearray(signed)
        tampered[position] ^= 0x01
        with pytest.raises((ManifestFormatError, SignatureError)):
            verify_manifest(bytes(tampered), store_a)


def test_tampered_field_fails_the_signature(image: bytes, store_a: TrustStore) -> None:
    signed = sign_manifest(KEY_A, manifest_for_module(image, product_id=PRODUCT))
    forged = replace(signed, manifest=replace(signed.manifest, module_version=9999))
    with pytest.raises(SignatureError, match="does not verify"):
        verify_manifest(forged.to_bytes(), store_a)


def test_tampered_image_is_refused(image: bytes, store_a: TrustStore) -> None:
    manifest = verify_manifest(_signed(KEY_A, image), store_a)
    flipped = bytearray(image)
    flipped[100] ^= 0xFF
    with pytest.raises(FirmwareMismatchError, match="SHA-256"):
        verify_firmware(bytes(flipped), manifest)
    with pytest.raises(FirmwareMismatchError, match="bytes but its manifest says"):
        verify_firmware(image + b"\0", manifest)
    other = _image(version=8)
    with pytest.raises(FirmwareMismatchError):
        verify_firmware(other, manifest)


def test_unknown_key_and_other_product_are_refused(image: bytes, store_a: TrustStore) -> None:
    with pytest.raises(UnknownKeyError, match=KEY_B.key_id):
        verify_manifest(_signed(KEY_B, image), store_a)
    with pytest.raises(WrongProductError, match="product 7"):
        verify_manifest(_signed(KEY_A, image, product=7), store_a)


def test_signature_from_another_key_under_trusted_key_id(image: bytes, store_a: TrustStore) -> None:
    # A forger writes the trusted key id into the manifest but signs with their own key.
    manifest = replace(manifest_for_module(image, product_id=PRODUCT), key_id=KEY_A.key_id)
    forged_signature = KEY_B.sign(b"otacloud firmware manifest v1\x00" + manifest.encode())
    forged = replace(sign_manifest(KEY_A, manifest), signature=forged_signature)
    with pytest.raises(SignatureError):
        verify_manifest(forged.to_bytes(), store_a)


def test_rotation_chain_then_withdrawal(image: bytes, store_a: TrustStore) -> None:
    s1 = introduce_key(KEY_A, KEY_B.public_key, product_id=PRODUCT, sequence=1)
    s2 = introduce_key(KEY_B, KEY_C.public_key, product_id=PRODUCT, sequence=2)
    s3 = withdraw_key(KEY_C, KEY_A.key_id, product_id=PRODUCT, sequence=3)
    store = store_a.apply(s1.to_bytes()).apply(s2.to_bytes())
    assert set(store.key_ids) == {KEY_A.key_id, KEY_B.key_id, KEY_C.key_id}
    store = store.apply(s3.to_bytes())
    assert set(store.key_ids) == {KEY_B.key_id, KEY_C.key_id} and store.sequence == 3
    with pytest.raises(UnknownKeyError):
        verify_manifest(_signed(KEY_A, image), store)  # withdrawn key
    assert verify_manifest(_signed(KEY_C, image), store).key_id == KEY_C.key_id
    for old in (s1, s2, s3):
        with pytest.raises(ReplayedStatementError):
            store.apply(old.to_bytes())
    # Persisted and reloaded, the store is the same.
    assert TrustStore.from_bytes(store.to_bytes()) == store
    # A device that was offline catches up from the whole chain, in any order.
    assert store_a.catch_up([s3.to_bytes(), s1, s2.to_bytes()]) == store
    assert store.catch_up([s1, s2, s3]) == store


def test_statement_order_and_authority(store_a: TrustStore) -> None:
    s2 = introduce_key(KEY_A, KEY_B.public_key, product_id=PRODUCT, sequence=2)
    with pytest.raises(StatementOutOfOrderError, match="apply statement 1 first"):
        store_a.apply(s2)
    untrusted = introduce_key(KEY_B, KEY_C.public_key, product_id=PRODUCT, sequence=1)
    with pytest.raises(UnknownKeyError):
        store_a.apply(untrusted)
    other_product = introduce_key(KEY_A, KEY_B.public_key, product_id=PRODUCT + 1, sequence=1)
    with pytest.raises(WrongProductError):
        store_a.apply(other_product)
    good = introduce_key(KEY_A, KEY_B.public_key, product_id=PRODUCT, sequence=1).to_bytes()
    bad_signature = good[:-1] + bytes([good[-1] ^ 1])
    with pytest.raises(SignatureError):
        store_a.apply(bad_signature)
    swapped_subject = introduce_key(KEY_A, KEY_C.public_key, product_id=PRODUCT, sequence=1)
    spliced = swapped_subject.signed_part() + good[-64:]
    with pytest.raises(SignatureError):
        store_a.apply(spliced)


def test_withdrawal_limits(store_a: TrustStore) -> None:
    with pytest.raises(LastKeyError, match="only trusted key"):
        store_a.apply(withdraw_key(KEY_A, KEY_A.key_id, product_id=PRODUCT, sequence=1))
    store = store_a.apply(introduce_key(KEY_A, KEY_B.public_key, product_id=PRODUCT, sequence=1))
    with pytest.raises(SelfWithdrawalError):
        store.apply(withdraw_key(KEY_A, KEY_A.key_id, product_id=PRODUCT, sequence=2))
    # Withdrawing a key that is not trusted, or re-introducing one, only advances the sequence.
    after = store.apply(withdraw_key(KEY_B, KEY_C.key_id, product_id=PRODUCT, sequence=2))
    assert after.keys == store.keys and after.sequence == 2
    again = after.apply(introduce_key(KEY_A, KEY_B.public_key, product_id=PRODUCT, sequence=3))
    assert again.keys == store.keys and again.sequence == 3
    with pytest.raises(ValueError):
        introduce_key(KEY_A, KEY_B.public_key, product_id=PRODUCT, sequence=0)


def test_manifest_signature_does_not_pass_as_statement(store_a: TrustStore) -> None:
    # Even a signature over the very same bytes, made in the manifest context, is refused.
    statement = introduce_key(KEY_A, KEY_B.public_key, product_id=PRODUCT, sequence=1)
    manifest_context_signature = KEY_A.sign(
        b"otacloud firmware manifest v1\x00" + statement.signed_part()
    )
    with pytest.raises(SignatureError):
        store_a.apply(statement.signed_part() + manifest_context_signature)
    assert store_a.apply(statement).sequence == 1


def test_trust_store_validation_and_corruption(store_a: TrustStore) -> None:
    with pytest.raises(TrustStoreFormatError, match="at least one key"):
        TrustStore(PRODUCT, {})
    with pytest.raises(TrustStoreFormatError, match="does not match"):
        TrustStore(PRODUCT, {KEY_B.key_id: KEY_A.public_key})
    raw = bytearray(store_a.to_bytes())
    raw[20] ^= 1
    with pytest.raises(TrustStoreFormatError, match="CRC-32"):
        TrustStore.from_bytes(bytes(raw))
    two = TrustStore.initial(PRODUCT, [KEY_A.public_key, KEY_B.public_key]).to_bytes()
    with pytest.raises(TrustStoreFormatError):
        TrustStore.from_bytes(two[:-5])


def test_manifest_field_ranges() -> None:
    base = Manifest(bytes(32), 10, 13, 5, 1, 3, PRODUCT, 3)
    with pytest.raises(ManifestFormatError, match="16-bit"):
        replace(base, platform_id=1 << 16)
    with pytest.raises(ManifestFormatError, match="function 0"):
        replace(base, dependencies=(ModuleDependency(0, 0, 0),))
    with pytest.raises(ManifestFormatError, match="32 bytes"):
        replace(base, sha256=b"short")
    with pytest.raises(ManifestFormatError, match="unsigned manifest"):
        base.encode()


# --- hypothesis: decoders never crash, encodings round-trip --------------------------------

FORMAT_ERRORS = (ManifestFormatError, SignatureError)
u8, u16, u32 = (st.integers(0, (1 << b) - 1) for b in (8, 16, 32))


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    deps = draw(st.lists(st.builds(ModuleDependency, st.integers(1, 255), u8, u16), max_size=8))
    return Manifest(
        draw(st.binary(min_size=32, max_size=32)),
        draw(u32),
        draw(u16),
        draw(u8),
        draw(u8),
        draw(u16),
        draw(u32),
        draw(u32),
        tuple(deps),
    )


@settings(max_examples=60, deadline=None)
@given(manifests())
def test_manifest_round_trip(manifest: Manifest) -> None:
    signed = sign_manifest(KEY_A, manifest)
    data = signed.to_bytes()
    assert parse_signed_manifest(data) == signed
    store = TrustStore.initial(manifest.product_id, [KEY_A.public_key])
    assert verify_manifest(data, store) == replace(manifest, key_id=KEY_A.key_id)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_reject_garbage_with_specific_errors(data: bytes) -> None:
    store = TrustStore.initial(PRODUCT, [KEY_A.public_key])
    with pytest.raises(FORMAT_ERRORS):
        verify_manifest(data, store)
    with pytest.raises(StatementFormatError):
        parse_statement(data)
    with pytest.raises((StatementFormatError, SignatureError, KeyRotationError)):
        store.apply(data)
    with pytest.raises(TrustStoreFormatError):
        TrustStore.from_bytes(data)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_mutated_valid_encodings_never_verify(data: st.DataObject) -> None:
    store = TrustStore.initial(PRODUCT, [KEY_A.public_key])
    originals = [
        _signed(KEY_A, _image(version=3, payload=b"p" * 64)),
        introduce_key(KEY_A, KEY_B.public_key, product_id=PRODUCT, sequence=1).to_bytes(),
        withdraw_key(KEY_A, KEY_B.key_id, product_id=PRODUCT, sequence=1).to_bytes(),
        store.to_bytes(),
    ]
    which = data.draw(st.integers(0, len(originals) - 1))
    original = originals[which]
    cut = data.draw(st.integers(0, len(original)))
    insert = data.draw(st.binary(max_size=4))
    drop = data.draw(st.integers(0, 4))
    mutated = original[:cut] + insert + original[cut + drop :]
    if mutated == original:
        return
    errors: tuple[type[OtaError], ...]
    call: Callable[[], object]
    if which == 0:
        errors = FORMAT_ERRORS
        call = lambda: verify_manifest(mutated, store)  # noqa: E731
    elif which in (1, 2):
        errors = (StatementFormatError, SignatureError, KeyRotationError)
        call = lambda: store.apply(mutated)  # noqa: E731
    else:
        errors = (TrustStoreFormatError,)
        call = lambda: TrustStore.from_bytes(mutated)  # noqa: E731
    with pytest.raises(errors):
        call()


def test_format_errors_are_module_format_errors() -> None:
    error: type[Exception]
    for error in (
        ManifestFormatError,
        StatementFormatError,
        TrustStoreFormatError,
        FirmwareMismatchError,
    ):
        assert issubclass(error, ModuleFormatError)
    for error in (UnknownKeyError, WrongProductError):
        assert issubclass(error, SignatureError)
