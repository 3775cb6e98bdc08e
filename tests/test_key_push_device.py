"""The emulated device's side of a key push (``POST k``, ota_wire point 5), sans-IO against
the scripted cloud of tests/test_emulated_device.py, and its wire format: statements of a
rotation made during the session are applied in order and saved before the answer that
names the new sequence; a statement that does not follow stops the piece (the answer says
where the store is); a forged one is refused with a diagnostic; firmware without key push
has no such resource."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import msgpack
import pytest

from otacore.coap import Code
from otacore.device.emulated import DeviceConfig
from otacore.errors import PayloadSchemaError
from otacore.messages import Hello
from otacore.protocol.link import Transport
from otacore.protocol.ota_wire import (
    KeyPage,
    is_key_push,
    is_key_request,
    key_push_answer,
    key_push_request,
    parse_hello_answer,
    parse_key_push_answer,
)
from otacore.signing import SigningKey, introduce_key, withdraw_key
from server.devices.keys import trusted_key_ids
from server.emulator.flash import Flash
from tests.test_emulated_device import (
    DEVICE_ID,
    KEY,
    OTHER_KEY,
    PLATFORM,
    PRODUCT,
    TRANSPORTS,
    V2,
    Harness,
    Offer,
)

NEW_KEY = SigningKey.from_private_bytes(bytes(range(100, 132)))
#: Statement 1 introduces NEW_KEY (signed by the provisioned KEY), 2 withdraws KEY.
INTRODUCE = introduce_key(KEY, NEW_KEY.public_key, product_id=PRODUCT, sequence=1).to_bytes()
WITHDRAW = withdraw_key(NEW_KEY, KEY.key_id, product_id=PRODUCT, sequence=2).to_bytes()


def _online(tmp_path: Path, transport: Transport, **config: object) -> Harness:
    h = Harness(tmp_path, transport,
                config=DeviceConfig(DEVICE_ID, PLATFORM, **config))  # type: ignore[arg-type]
    h.run_until(lambda: h.device.online)
    return h


def _push(h: Harness, *statements: bytes) -> None:
    assert h.cloud is not None
    answers = len(h.log.responses)
    h.cloud.push_keys(KeyPage(statements))
    h.run_until(lambda: len(h.log.responses) > answers)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_pushed_statements_are_saved_before_the_answer_and_take_effect_at_once(
    tmp_path: Path, transport: Transport
) -> None:
    h = _online(tmp_path, transport)
    assert h.log.hellos[0].key_push is True and h.log.hellos[0].key_sequence == 0
    assert h.cloud is not None
    h.cloud.push_keys(KeyPage((INTRODUCE, WITHDRAW)))
    # Deliver the push to the device, and look at its flash the moment its answer is
    # queued (before the cloud has it): the store is already saved.
    for data in h.cloud.take_outgoing():
        h.device.receive(data, h.now)
    answer = h.device.take_outgoing()
    assert answer
    saved = Flash.open(tmp_path, fsync=False).load_trust_store()
    assert saved is not None and saved.sequence == 2
    assert saved.key_ids == (NEW_KEY.key_id,)
    for data in answer:
        h.cloud.receive(data, h.now)
    assert parse_key_push_answer(h.log.responses[-1].payload) == 2
    # In this session, without a reconnect: the withdrawn key's offer is refused, the new
    # key's taken.
    sessions = len(h.log.hellos)
    h.cloud.offer(Offer.of(V2, KEY))
    h.run_until(lambda: bool(h.log.offer_answers))
    assert h.log.offer_answers[0].code == Code.FORBIDDEN
    assert bytes(h.log.offer_answers[0].payload).startswith(b"UNKNOWN_KEY")
    h.cloud.offer(Offer.of(V2, NEW_KEY))
    h.run_until(lambda: len(h.log.offer_answers) == 2)
    assert h.log.offer_answers[1].code == Code.CHANGED
    assert len(h.log.hellos) == sessions


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_push_answers_the_sequence_reached(tmp_path: Path, transport: Transport) -> None:
    h = _online(tmp_path, transport)
    _push(h, INTRODUCE)
    answer = h.log.responses[-1]
    assert answer.code == Code.CHANGED and parse_key_push_answer(answer.payload) == 1
    # The same statement again (a retransmitted or repeated piece): nothing to apply.
    _push(h, INTRODUCE, WITHDRAW)
    assert parse_key_push_answer(h.log.responses[-1].payload) == 2
    _push(h, INTRODUCE, WITHDRAW)
    answer = h.log.responses[-1]
    assert answer.code == Code.CHANGED and bytes(answer.payload) == key_push_answer(2)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_piece_that_does_not_follow_says_where_the_store_is(
    tmp_path: Path, transport: Transport
) -> None:
    """The server believed the device further than it is: the device applies nothing
    and answers its own sequence, so the server sends the gap next."""
    h = _online(tmp_path, transport)
    _push(h, WITHDRAW)
    answer = h.log.responses[-1]
    assert answer.code == Code.CHANGED and parse_key_push_answer(answer.payload) == 0
    assert h.device.last_error == ""
    trust = h.flash.load_trust_store()
    assert trust is not None and trust.sequence == 0 and trust.key_ids == (KEY.key_id,)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_forged_statement_is_refused_and_keeps_what_applied(
    tmp_path: Path, transport: Transport
) -> None:
    h = _online(tmp_path, transport)
    forged = introduce_key(OTHER_KEY, OTHER_KEY.public_key, product_id=PRODUCT,
                           sequence=2).to_bytes()
    _push(h, INTRODUCE, forged)
    answer = h.log.responses[-1]
    assert answer.code == Code.FORBIDDEN
    diagnostic = bytes(answer.payload).decode()
    assert diagnostic.startswith("UnknownKeyError: ") and "\n" not in diagnostic
    trust = Flash.open(tmp_path, fsync=False).load_trust_store()
    assert trust is not None and trust.sequence == 1  # statement 1 applied and saved
    assert OTHER_KEY.key_id not in trust.key_ids
    # Malformed: 4.00 with the reason, nothing changed.
    assert h.cloud is not None
    bad = key_push_request(KeyPage((INTRODUCE,)))
    bad.payload = msgpack.packb({"statements": "no"})
    answers = len(h.log.responses)
    h.cloud._requests.add(h.cloud.link.request(bad, h.now))
    h.run_until(lambda: len(h.log.responses) > answers)
    assert h.log.responses[-1].code == Code.BAD_REQUEST


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_older_firmware_has_no_key_push(tmp_path: Path, transport: Transport) -> None:
    h = _online(tmp_path, transport, key_push=False)
    assert h.log.hellos[0].key_push is False
    assert "key_push" not in h.log.hellos[0].to_map()  # the Hello older firmware sent
    _push(h, INTRODUCE)
    assert h.log.responses[-1].code == Code.NOT_FOUND
    trust = h.flash.load_trust_store()
    assert trust is not None and trust.sequence == 0


# --- the wire format -------------------------------------------------------------------------


def test_key_push_wire_format() -> None:
    request = key_push_request(KeyPage((INTRODUCE, WITHDRAW), more=True))
    assert request.code == Code.POST and request.uri_path == ["k"]
    assert is_key_push(request) and not is_key_request(request)
    assert parse_hello_answer(request.payload) == KeyPage((INTRODUCE, WITHDRAW), more=True)
    with pytest.raises(ValueError, match="at least one statement"):
        key_push_request(KeyPage())
    for sequence in (0, 1, 2**64 - 1):
        assert parse_key_push_answer(key_push_answer(sequence)) == sequence
    for bad in (b"", b"\xc1", msgpack.packb({"sequence": -1}), msgpack.packb({"sequence": 1.5}),
                msgpack.packb({"sequence": True}), msgpack.packb({"seq": 1}),
                msgpack.packb({"sequence": 1, "more": False}), msgpack.packb([1]),
                msgpack.packb({"sequence": 1}) + b"\x00"):
        with pytest.raises(PayloadSchemaError):
            parse_key_push_answer(bad)


def test_hello_key_push_round_trips_and_older_hellos_parse() -> None:
    hello = Hello(DEVICE_ID, PLATFORM, PRODUCT, 1, 5000, True, True, False, 1024,
                  key_sequence=3, key_push=True)
    assert Hello.from_payload(hello.to_payload()) == hello
    older = replace(hello, key_push=False)
    assert "key_push" not in older.to_map()
    assert Hello.from_payload(older.to_payload()).key_push is False
    with pytest.raises(PayloadSchemaError, match="key_push must be a bool"):
        Hello.from_map({**hello.to_map(), "key_push": 1})


def test_keys_a_device_trusts_after_some_statements() -> None:
    statements = [INTRODUCE, WITHDRAW]
    assert trusted_key_ids(statements, NEW_KEY, 0) == [KEY.key_id]
    assert trusted_key_ids(statements, NEW_KEY, 1) == [KEY.key_id, NEW_KEY.key_id]
    assert trusted_key_ids(statements, NEW_KEY, 2) == [NEW_KEY.key_id]
    assert trusted_key_ids(statements, NEW_KEY) == [NEW_KEY.key_id]
    assert trusted_key_ids([], NEW_KEY, 0) == [NEW_KEY.key_id]
