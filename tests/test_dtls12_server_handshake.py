"""The sans-IO DTLS 1.2 server handshake (OpenSSL on memory BIOs) against a real OpenSSL
client: cookie exchange first, then the handshake, the hand-over to our record layer, and
records both ways; resumption, lost flights, a rejected certificate, data right after the
client's Finished."""

from __future__ import annotations

import gc
from contextlib import suppress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from OpenSSL import SSL

from otacore.errors import RecordHandoverError
from otacore.records.dtls12 import RECORD_HEADER, ApplicationData, DtlsRecordLayer
from otacore.records.dtls12_cookie import Admit, Challenge, CookieExchange
from otacore.records.dtls12_handshake import split_datagrams
from otacore.records.dtls12_server import DtlsHandover, DtlsServerHandshake
from otacore.records.openssl_memory import drain_output
from server.transport.client import DeviceCredentials
from server.transport.dtls import make_dtls_server_context
from tests.test_transport_tls import DeviceKit, make_device_kit

ADDRESS = ("198.51.100.4", 5000)


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("dtls-server-handshake"))


@pytest.fixture(scope="module")
def server_context(kit: DeviceKit) -> SSL.Context:
    return make_dtls_server_context(kit.pki)


def client_context(credentials: DeviceCredentials) -> SSL.Context:
    context = credentials.dtls_context()
    context.set_options(SSL.OP_NO_QUERY_MTU)
    return context


def new_client(context: SSL.Context, session: SSL.Session | None = None) -> SSL.Connection:
    client = SSL.Connection(context)
    client.set_connect_state()
    client.set_ciphertext_mtu(1400)
    if session is not None:
        client.set_session(session)
    return client


def step(client: SSL.Connection) -> bytes:
    with suppress(SSL.WantReadError):
        client.do_handshake()
    return drain_output(client)


def start(server_context: SSL.Context, client: SSL.Connection, now: float = 0.0
          ) -> DtlsServerHandshake:  # fmt: skip
    """Cookie exchange, then a handshake object holding the client's second ClientHello."""
    exchange = CookieExchange(now)
    challenge = exchange.examine(step(client), ADDRESS, now)
    assert isinstance(challenge, Challenge)
    client.bio_write(challenge.reply)
    hello = step(client)
    assert isinstance(exchange.examine(hello, ADDRESS, now), Admit)
    return DtlsServerHandshake(server_context, hello, now=now)


def to_client(client: SSL.Connection, datagrams: list[bytes]) -> bytes:
    """Give the client each datagram (one at a time, as a socket would); its answer."""
    answer = b""
    for datagram in datagrams:
        client.bio_write(datagram)
        answer += step(client)
    return answer


def run(handshake: DtlsServerHandshake, client: SSL.Connection, now: float = 0.0) -> None:
    """Exchange flights until the server's side is complete or failed."""
    for _ in range(10):
        answer = to_client(client, handshake.datagrams_to_send())
        if answer:
            handshake.receive_datagram(answer, now)
        if handshake.complete or handshake.failure is not None:
            return
    raise AssertionError("the handshake made no progress")


def finish(handshake: DtlsServerHandshake, client: SSL.Connection) -> DtlsHandover:
    final = handshake.datagrams_to_send()
    handover = handshake.take_over()
    to_client(client, final)
    return handover


def exchange_data(layer: DtlsRecordLayer, client: SSL.Connection) -> None:
    client.send(b"ping")
    assert layer.open_datagram(drain_output(client)) == [ApplicationData(b"ping")]
    client.bio_write(layer.seal(b"pong"))
    assert client.recv(100) == b"pong"


def server_connections(context: SSL.Context) -> int:
    gc.collect()
    return sum(
        1 for obj in gc.get_objects()
        if isinstance(obj, SSL.Connection) and obj.get_context() is context
    )  # fmt: skip


def test_full_handshake_hands_over_and_frees_openssl(kit: DeviceKit) -> None:
    context = make_dtls_server_context(kit.pki)  # this test's own, to count its objects
    client = new_client(client_context(kit.good))
    handshake = start(context, client)
    assert handshake.next_timeout() == 1.0  # RFC 6347 4.2.4.1: 1 s initial timer
    run(handshake, client)
    assert handshake.complete and handshake.failure is None
    handover = finish(handshake, client)
    assert client.get_state_string() == b"SSL negotiation finished successfully"
    assert not handover.resumed
    device_der = x509.load_pem_x509_certificate(
        Path(kit.good.cert_path).read_bytes()
    ).public_bytes(Encoding.DER)
    assert handover.peer_certificate_der == device_der
    del handshake
    assert server_connections(context) == 0  # the OpenSSL object is gone
    layer = handover.layer
    assert layer.holds_last_flight  # our final flight, until the client proves it has it
    exchange_data(layer, client)
    assert not layer.holds_last_flight


def test_take_over_needs_a_complete_handshake(server_context: SSL.Context, kit: DeviceKit
                                              ) -> None:  # fmt: skip
    handshake = start(server_context, new_client(client_context(kit.good)))
    with pytest.raises(RecordHandoverError, match="not complete"):
        handshake.take_over()
    handshake.abort()
    assert handshake.next_timeout() is None
    assert handshake.datagrams_to_send() == []


def test_resumed_handshake_is_reported_and_keeps_the_certificate(
    server_context: SSL.Context, kit: DeviceKit
) -> None:
    context = client_context(kit.good)
    client = new_client(context)
    handshake = start(server_context, client)
    run(handshake, client)
    first = finish(handshake, client)
    exchange_data(first.layer, client)
    session = client.get_session()
    assert session is not None
    again = new_client(context, session)
    handshake = start(server_context, again)
    run(handshake, again)
    resumed = finish(handshake, again)
    assert resumed.resumed
    assert resumed.peer_certificate_der == first.peer_certificate_der
    assert not resumed.layer.holds_last_flight  # the client sent the final flight
    exchange_data(resumed.layer, again)


def test_lost_flight_is_resent_when_the_timer_expires(
    server_context: SSL.Context, kit: DeviceKit
) -> None:
    client = new_client(client_context(kit.good))
    handshake = start(server_context, client, now=100.0)
    lost = handshake.datagrams_to_send()
    assert lost and handshake.next_timeout() == 101.0
    handshake.handle_timeout(100.9)
    assert handshake.datagrams_to_send() == []
    handshake.handle_timeout(101.0)
    resent = handshake.datagrams_to_send()
    assert resent == lost  # as OpenSSL wrote it
    assert handshake.next_timeout() == 103.0  # doubled (RFC 6347 4.2.4.1)
    assert handshake.retransmissions == 1
    handshake.receive_datagram(to_client(client, resent), 101.5)
    run(handshake, client, now=101.5)
    assert handshake.complete
    exchange_data(finish(handshake, client).layer, client)


def test_timer_backs_off_up_to_its_cap(server_context: SSL.Context, kit: DeviceKit) -> None:
    handshake = start(server_context, new_client(client_context(kit.good)))
    handshake.max_timeout = 8.0
    deadlines = []
    for _ in range(6):
        due = handshake.next_timeout()
        assert due is not None
        handshake.handle_timeout(due)
        deadlines.append(handshake.next_timeout())
    assert deadlines == [3.0, 7.0, 15.0, 23.0, 31.0, 39.0]
    handshake.abort()


def test_repeated_client_hello_resends_our_flight(
    server_context: SSL.Context, kit: DeviceKit
) -> None:
    client = new_client(client_context(kit.good))
    exchange = CookieExchange(0.0)
    challenge = exchange.examine(step(client), ADDRESS, 0.0)
    assert isinstance(challenge, Challenge)
    client.bio_write(challenge.reply)
    hello = step(client)
    handshake = DtlsServerHandshake(server_context, hello, now=0.0)
    first = handshake.datagrams_to_send()
    handshake.receive_datagram(hello, 0.2)  # the client's retransmission: ours was lost
    resent = handshake.datagrams_to_send()
    assert resent == first
    assert handshake.retransmissions == 1 and handshake.next_timeout() == 2.2
    handshake.receive_datagram(to_client(client, resent), 0.3)
    run(handshake, client, now=0.3)
    assert handshake.complete


@pytest.mark.parametrize(
    ("which", "reason"),
    [("foreign", "unable to get local issuer certificate"),
     ("expired", "certificate has expired"),
     ("server_as_client", "unsuitable certificate purpose")],
)  # fmt: skip
def test_rejected_certificate_fails_at_once_with_its_reason(
    server_context: SSL.Context, kit: DeviceKit, which: str, reason: str
) -> None:
    client = new_client(client_context(getattr(kit, which)))
    handshake = start(server_context, client)
    run(handshake, client)
    assert handshake.failure is not None and reason in handshake.failure
    assert handshake.verify_error is not None and reason in handshake.verify_error
    assert handshake.next_timeout() is None  # nothing to wait for
    alert = handshake.datagrams_to_send()
    assert alert and RECORD_HEADER.unpack_from(alert[0])[0] == 21  # OpenSSL's fatal alert
    client.bio_write(alert[0])
    with pytest.raises(SSL.Error):
        client.do_handshake()
    with pytest.raises(RecordHandoverError):
        handshake.take_over()


def test_data_after_the_clients_finished_reaches_the_record_layer(
    server_context: SSL.Context, kit: DeviceKit
) -> None:
    """A resumed handshake ends with the client's flight; a client may put its first
    application record in the same datagram: it must not vanish into OpenSSL."""
    context = client_context(kit.good)
    client = new_client(context)
    handshake = start(server_context, client)
    run(handshake, client)
    exchange_data(finish(handshake, client).layer, client)
    again = new_client(context, client.get_session())
    handshake = start(server_context, again)
    final_flight = to_client(again, handshake.datagrams_to_send())
    again.send(b"early")
    handshake.receive_datagram(final_flight + drain_output(again), 0.0)
    handover = handshake.take_over()
    assert handover.resumed and handover.unprocessed
    assert handover.layer.open_datagram(handover.unprocessed) == [ApplicationData(b"early")]


def test_openssl_refusing_the_hello_is_an_error(server_context: SSL.Context) -> None:
    with pytest.raises(RecordHandoverError, match="refused the ClientHello"):
        DtlsServerHandshake(server_context, b"\x16\xfe\xfd" + bytes(10), now=0.0)


def test_split_datagrams_keeps_records_whole() -> None:
    records = [RECORD_HEADER.pack(22, 0xFEFD, n, size) + bytes(size)
               for n, size in enumerate((500, 500, 300, 1200, 10))]  # fmt: skip
    datagrams = split_datagrams(b"".join(records), 1100)
    assert datagrams == [records[0] + records[1], records[2], records[3], records[4]]
    assert split_datagrams(b"", 1100) == []


@settings(max_examples=150, derandomize=True, database=None, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])  # fmt: skip
@given(noise=st.lists(st.binary(max_size=120), min_size=1, max_size=4),
       header=st.sampled_from([b"", b"\x16\xfe\xfd\x00\x00", b"\x16\xfe\xfd\x00\x01",
                               b"\x14\xfe\xfd\x00\x00", b"\x15\xfe\xfd\x00\x00"]))  # fmt: skip
def test_garbage_between_flights_never_raises(
    server_context: SSL.Context, kit: DeviceKit, noise: list[bytes], header: bytes
) -> None:
    """Datagrams anyone can spoof from the peer's address, mid-handshake: dropped by OpenSSL
    or failing the handshake with a reason; never an exception out of the object."""
    handshake = start(server_context, new_client(client_context(kit.good)))
    for datagram in noise:
        handshake.receive_datagram(header + datagram, 0.5)
        handshake.handle_timeout(0.6)
    assert handshake.failure is None or handshake.failure.startswith("DTLS handshake failed")
    handshake.abort()


def test_resumed_flight_resent_makes_the_client_resend_its_lost_final_flight(
    server_context: SSL.Context, kit: DeviceKit
) -> None:
    """A resumed handshake (RFC 5246 7.3): our flight ends with our Finished, the client's
    final flight (ChangeCipherSpec, Finished) is lost. Our timer resends our flight; the
    client, done already, resends its final flight only if it sees our Finished again
    (RFC 6347 4.2.4), so that Finished must come under a new sequence number: the same one
    would be dropped by the client's replay window (4.1.2.6). A plain OpenSSL client."""
    context = client_context(kit.good)
    client = new_client(context)
    handshake = start(server_context, client)
    run(handshake, client)
    exchange_data(finish(handshake, client).layer, client)
    session = client.get_session()
    assert session is not None
    again = new_client(context, session)
    handshake = start(server_context, again, now=10.0)
    flight = handshake.datagrams_to_send()
    lost_final_flight = to_client(again, flight)
    assert lost_final_flight  # the client's ChangeCipherSpec and Finished, never delivered
    assert again.get_state_string() == b"SSL negotiation finished successfully"
    due = handshake.next_timeout()
    assert due is not None and not handshake.complete
    handshake.handle_timeout(due)
    resent = handshake.datagrams_to_send()
    assert resent and resent != flight  # our Finished under a new sequence number
    final_again = b""
    for datagram in resent:  # the client is done: records reach OpenSSL through SSL_read
        again.bio_write(datagram)
        with suppress(SSL.WantReadError):
            again.recv(100)
        final_again += drain_output(again)
    assert final_again, "the client did not take our resent Finished as a retransmission"
    handshake.receive_datagram(final_again, due)
    assert handshake.complete and handshake.failure is None
    handover = finish(handshake, again)
    assert handover.resumed
    # The layer seals after the re-sealed Finished's number: the client opens our records.
    exchange_data(handover.layer, again)
