"""The stateless DTLS cookie exchange (RFC 6347 4.2.1) against a real OpenSSL client, and
its ClientHello parser under malformed and fuzzed input (hypothesis: a fixed database-less
set of examples per run; ``--hypothesis-seed`` changes them, a failure prints its example)."""

from __future__ import annotations

from contextlib import suppress
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from otacore.records.dtls12 import RECORD_HEADER
from otacore.records.dtls12_cookie import (
    COOKIE_SIZE,
    Admit,
    Challenge,
    ClientHelloError,
    CookieExchange,
    Drop,
    DropReason,
    parse_client_hello,
)
from otacore.records.openssl_memory import drain_output
from server.identity import ProvisionedDevice
from server.transport.dtls import make_dtls_client_context
from tests.test_record_dtls12 import make_dtls_pki

ADDRESS = ("192.0.2.7", 40001)


@pytest.fixture(scope="module")
def device(tmp_path_factory: pytest.TempPathFactory) -> ProvisionedDevice:
    return make_dtls_pki(tmp_path_factory.mktemp("dtls-cookie"))[1]


def openssl_client(device: ProvisionedDevice) -> SSL.Connection:
    context = make_dtls_client_context(
        Path(device.ca_path), Path(device.cert_path), Path(device.key_path)
    )
    context.set_options(SSL.OP_NO_QUERY_MTU)
    client = SSL.Connection(context)
    client.set_connect_state()
    client.set_ciphertext_mtu(1400)
    return client


def next_flight(client: SSL.Connection) -> bytes:
    with suppress(SSL.WantReadError):
        client.do_handshake()
    return drain_output(client)


@pytest.fixture(scope="module")
def first_hello(device: ProvisionedDevice) -> bytes:
    """A real OpenSSL DTLS 1.2 ClientHello datagram (no cookie)."""
    return next_flight(openssl_client(device))


def test_openssl_client_passes_the_exchange(device: ProvisionedDevice) -> None:
    client = openssl_client(device)
    exchange = CookieExchange(0.0)
    hello = next_flight(client)
    verdict = exchange.examine(hello, ADDRESS, 0.0)
    assert isinstance(verdict, Challenge)
    assert verdict.hello.cookie == b"" and len(verdict.hello.random) == 32
    # RFC 6347 4.2.1: the HelloVerifyRequest's record sequence number is the ClientHello's.
    assert RECORD_HEADER.unpack_from(verdict.reply)[2] == RECORD_HEADER.unpack_from(hello)[2]
    assert len(verdict.reply) <= len(hello)  # no amplification
    client.bio_write(verdict.reply)
    second = next_flight(client)
    admitted = exchange.examine(second, ADDRESS, 1.0)
    assert isinstance(admitted, Admit)
    assert len(admitted.hello.cookie) == COOKIE_SIZE
    assert admitted.hello.random == verdict.hello.random
    assert admitted.hello.message_seq == 1  # RFC 6347 4.2.2
    # The cookie is bound to the address: another one is challenged again.
    assert isinstance(exchange.examine(second, ("192.0.2.8", 40001), 1.0), Challenge)
    assert isinstance(exchange.examine(second, (ADDRESS[0], 40002), 1.0), Challenge)
    assert exchange.challenges == 3


def test_cookie_survives_one_rotation_not_two(device: ProvisionedDevice) -> None:
    client = openssl_client(device)
    exchange = CookieExchange(0.0, rotate_after=30.0)
    challenge = exchange.examine(next_flight(client), ADDRESS, 29.0)
    assert isinstance(challenge, Challenge)
    client.bio_write(challenge.reply)
    second = next_flight(client)
    assert isinstance(exchange.examine(second, ADDRESS, 31.0), Admit)  # previous secret
    assert isinstance(exchange.examine(second, ADDRESS, 59.0), Admit)
    assert isinstance(exchange.examine(second, ADDRESS, 61.0), Challenge)  # two rotations


def test_cookie_is_bound_to_the_hello_fields(first_hello: bytes) -> None:
    exchange = CookieExchange(0.0, secret=b"k" * 32)
    hello = parse_client_hello(first_hello)
    cookie = exchange.cookie_for(ADDRESS, hello, 0.0)
    other = parse_client_hello(first_hello[:40] + bytes([first_hello[40] ^ 1]) + first_hello[41:])
    assert other.random != hello.random
    assert exchange.cookie_for(ADDRESS, other, 0.0) != cookie
    assert CookieExchange(0.0, secret=b"k" * 32).cookie_for(ADDRESS, hello, 0.0) == cookie
    assert CookieExchange(0.0, secret=b"j" * 32).cookie_for(ADDRESS, hello, 0.0) != cookie


def _with_handshake_length(hello: bytes, delta: int) -> bytes:
    """The hello with its record and handshake lengths changed by ``delta`` (body cut)."""
    record_length = int.from_bytes(hello[11:13], "big") + delta
    message_length = int.from_bytes(hello[14:17], "big") + delta
    body = hello[13 + 12 : 13 + 12 + message_length]
    return (
        hello[:11] + record_length.to_bytes(2, "big") + hello[13:14]
        + message_length.to_bytes(3, "big") + hello[17:22] + message_length.to_bytes(3, "big")
        + body
    )  # fmt: skip


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda h: h[:10], DropReason.TRUNCATED),
        (lambda h: h[:-1], DropReason.TRUNCATED),
        (lambda h: b"\x17" + h[1:], DropReason.NOT_HANDSHAKE),  # application data
        (lambda h: h[:3] + b"\x00\x01" + h[5:], DropReason.NOT_HANDSHAKE),  # epoch 1
        (lambda h: h[:1] + b"\x03\x03" + h[3:], DropReason.NOT_HANDSHAKE),  # TLS 1.2 version
        (lambda h: h[:13] + b"\x02" + h[14:], DropReason.NOT_CLIENT_HELLO),
        (lambda h: h[:19] + b"\x00\x00\x01" + h[22:], DropReason.FRAGMENTED),
        (lambda h: h[:25] + b"\x03\x03" + h[27:], DropReason.BAD_VERSION),  # TLS, not DTLS
        (lambda h: h[:25] + b"\xfe\xfc" + h[27:], DropReason.BAD_VERSION),  # DTLS 1.3
        (lambda h: h[:59] + b"\x21" + h[60:], DropReason.MALFORMED),  # session_id of 33
        (lambda h: _with_handshake_length(h, -1), DropReason.MALFORMED),  # extensions cut
        (lambda h: _with_handshake_length(h, 2 + 32 + 2 - len(h) + 25), DropReason.MALFORMED),
        (lambda h: b"", DropReason.TRUNCATED),
    ],
)
def test_malformed_hellos_are_dropped_with_a_reason(
    first_hello: bytes, mutate: object, reason: DropReason
) -> None:
    datagram = mutate(first_hello)  # type: ignore[operator]
    with pytest.raises(ClientHelloError) as caught:
        parse_client_hello(datagram)
    assert caught.value.reason == reason
    assert reason.name.lower() in str(caught.value)
    verdict = CookieExchange(0.0).examine(datagram, ADDRESS, 0.0)
    assert verdict == Drop(reason)


@settings(max_examples=400, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(data=st.binary(max_size=400))
def test_random_datagrams_never_raise(data: bytes) -> None:
    verdict = CookieExchange(0.0).examine(data, ADDRESS, 0.0)
    assert isinstance(verdict, Drop | Challenge)  # random bytes carry no valid cookie


@settings(max_examples=600, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(edits=st.lists(st.tuples(st.integers(0, 400), st.integers(0, 255)), max_size=6),
       cut=st.integers(0, 400), extra=st.binary(max_size=8))  # fmt: skip
def test_mutated_openssl_hellos_never_raise(
    first_hello: bytes, edits: list[tuple[int, int]], cut: int, extra: bytes
) -> None:
    datagram = bytearray(first_hello)
    for position, value in edits:
        if position < len(datagram):
            datagram[position] = value
    mutated = bytes(datagram[: max(cut, len(datagram) - cut)]) + extra
    try:
        parse_client_hello(mutated)
    except ClientHelloError as error:
        assert isinstance(error.reason, DropReason)
    verdict = CookieExchange(0.0).examine(mutated, ADDRESS, 0.0)
    assert isinstance(verdict, Drop | Challenge)
    if isinstance(verdict, Challenge):  # a well-formed hello: the reply is a whole record
        reply = verdict.reply
        assert RECORD_HEADER.unpack_from(reply)[3] == len(reply) - 13


def test_rotation_interval_must_be_positive() -> None:
    with pytest.raises(ValueError, match="rotate_after"):
        CookieExchange(0.0, rotate_after=0)
