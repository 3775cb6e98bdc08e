"""The sans-IO DTLS 1.2 client handshake (OpenSSL on memory BIOs) against a plain OpenSSL
server (its own HelloVerifyRequest cookie round) and against our server side (the stateless
cookie exchange, then DtlsServerHandshake): the hand-over to our client record layer,
records both ways, a lost flight resent by our timer, and resumption."""

from __future__ import annotations

import hashlib
from contextlib import suppress
from typing import cast

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from OpenSSL import SSL

from otacore.errors import RecordHandoverError
from otacore.records.dtls12 import (
    RECORD_HEADER,
    ApplicationData,
    DtlsRecordLayer,
    PeerRepeatedFlight,
)
from otacore.records.dtls12_client import (
    DtlsClientHandover,
    DtlsClientHandshake,
    prepare_client_context,
)
from otacore.records.dtls12_cookie import Admit, Challenge, CookieExchange
from otacore.records.dtls12_handshake import record_bounds
from otacore.records.dtls12_server import DtlsServerHandshake
from otacore.records.openssl_memory import drain_output
from server.transport.client import DeviceCredentials
from server.transport.dtls import make_dtls_server_context
from tests.test_transport_tls import DeviceKit, make_device_kit

ADDRESS = ("198.51.100.4", 5000)


def cleartext_and_numbers(flight: list[bytes]) -> tuple[list[bytes], list[tuple[int, int]]]:
    """A flight's epoch-0 records as sent, and the (epoch, seq) of its protected ones."""
    cleartext, numbers = [], []
    for datagram in flight:
        for start, stop in record_bounds(datagram):
            epoch_seq = RECORD_HEADER.unpack_from(datagram, start)[2]
            if epoch_seq >> 48 == 0:
                cleartext.append(datagram[start:stop])
            else:
                numbers.append((epoch_seq >> 48, epoch_seq & (2**48 - 1)))
    return cleartext, numbers


def assert_resent_with_a_new_finished(resent: list[bytes], sent: list[bytes]) -> None:
    """``resent`` repeats ``sent``: the cleartext records as they were, our Finished under a
    later sequence number (RFC 6347 4.1; see dtls12_handshake)."""
    again, new_numbers = cleartext_and_numbers(resent)
    first, old_numbers = cleartext_and_numbers(sent)
    assert again == first
    assert len(new_numbers) == len(old_numbers) == 1
    assert new_numbers[0][0] == old_numbers[0][0] and new_numbers[0][1] > old_numbers[0][1]


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("dtls-client-handshake"))


def device_context(credentials: DeviceCredentials) -> SSL.Context:
    context = credentials.dtls_context()
    prepare_client_context(context)
    return context


def openssl_server_context(kit: DeviceKit) -> SSL.Context:
    """A plain OpenSSL DTLS server that asks for a cookie (RFC 6347 4.2.1) itself."""
    context = make_dtls_server_context(kit.pki)
    context.set_options(cast(int, SSL.OP_COOKIE_EXCHANGE))  # typed Optional
    context.set_options(SSL.OP_NO_QUERY_MTU)
    secret = b"test cookie secret"
    context.set_cookie_generate_callback(lambda _conn: hashlib.sha256(secret).digest()[:16])
    context.set_cookie_verify_callback(
        lambda _conn, cookie: cookie == hashlib.sha256(secret).digest()[:16]
    )
    return context


class OpenSslServer:
    """OpenSSL's DTLS server on memory BIOs, one datagram at a time."""

    def __init__(self, context: SSL.Context) -> None:
        self.connection = SSL.Connection(context, None)
        self.connection.set_accept_state()
        self.connection.set_ciphertext_mtu(1400)
        self.listening = True
        self.failure: SSL.Error | None = None

    def feed(self, datagrams: list[bytes]) -> list[bytes]:
        out = []
        for datagram in datagrams:
            self.connection.bio_write(datagram)
            if self.listening:
                try:
                    self.connection.DTLSv1_listen()  # HelloVerifyRequest until the cookie
                    self.listening = False
                except SSL.WantReadError:
                    pass
            if not self.listening:
                with suppress(SSL.WantReadError):
                    try:
                        self.connection.do_handshake()
                    except SSL.Error as error:  # e.g. our alert
                        self.failure = error
            output = drain_output(self.connection)
            if output:
                out.append(output)
        return out


def run_against(server: OpenSslServer, handshake: DtlsClientHandshake, now: float = 0.0) -> int:
    """Exchange flights until our side completes; how many server flights it took."""
    flights = 0
    for _ in range(10):
        answers = server.feed(handshake.datagrams_to_send())
        for answer in answers:
            handshake.receive_datagram(answer, now)
        flights += bool(answers)
        if handshake.complete or handshake.failure is not None:
            return flights
    raise AssertionError("the handshake made no progress")


def finish(handshake: DtlsClientHandshake, server: OpenSslServer) -> DtlsClientHandover:
    final = handshake.datagrams_to_send()
    handover = handshake.take_over()
    server.feed(final)
    assert server.connection.get_state_string() == b"SSL negotiation finished successfully"
    return handover


def exchange_with_openssl(layer: DtlsRecordLayer, server: SSL.Connection) -> None:
    server.bio_write(layer.seal(b"ping"))
    assert server.recv(100) == b"ping"
    server.send(b"pong")
    assert layer.open_datagram(drain_output(server)) == [ApplicationData(b"pong")]


def test_full_then_resumed_handshake_with_an_openssl_server(kit: DeviceKit) -> None:
    server_context = openssl_server_context(kit)
    context = device_context(kit.good)
    server = OpenSslServer(server_context)
    handshake = DtlsClientHandshake(context, now=0.0)
    assert handshake.next_timeout() == 1.0  # RFC 6347 4.2.4.1
    # HelloVerifyRequest; the server's flight; its final flight (NewSessionTicket..Finished).
    assert run_against(server, handshake) == 3
    handover = finish(handshake, server)
    assert not handover.resumed and handover.session is not None
    server_der = kit.pki.server_cert.public_bytes(Encoding.DER)
    assert handover.peer_certificate_der == server_der
    assert not handover.layer.holds_last_flight  # the server sent the final flight
    exchange_with_openssl(handover.layer, server.connection)

    again = OpenSslServer(server_context)
    resumed_handshake = DtlsClientHandshake(context, now=5.0, session=handover.session)
    run_against(again, resumed_handshake, now=5.0)
    resumed = finish(resumed_handshake, again)
    assert resumed.resumed
    assert resumed.layer.holds_last_flight  # ours is the final flight (RFC 5246 7.3)
    exchange_with_openssl(resumed.layer, again.connection)
    assert not resumed.layer.holds_last_flight  # the server's data proves it has it


def test_lost_flight_is_resent_when_the_timer_expires(kit: DeviceKit) -> None:
    server = OpenSslServer(openssl_server_context(kit))
    handshake = DtlsClientHandshake(device_context(kit.good), now=100.0)
    lost = handshake.datagrams_to_send()  # the first ClientHello never arrives
    handshake.handle_timeout(100.9)
    assert handshake.datagrams_to_send() == []
    handshake.handle_timeout(101.0)
    resent = handshake.datagrams_to_send()
    assert resent == lost and handshake.retransmissions == 1
    assert handshake.next_timeout() == 103.0  # doubled (RFC 6347 4.2.4.1)
    # Now the certificate flight is lost too: the timer resends it, the server finishes.
    for answer in server.feed(resent):
        handshake.receive_datagram(answer, 101.5)  # HelloVerifyRequest
    for answer in server.feed(handshake.datagrams_to_send()):
        handshake.receive_datagram(answer, 101.6)  # ServerHello..ServerHelloDone
    certificate_flight = handshake.datagrams_to_send()
    assert certificate_flight and handshake.next_timeout() is not None
    due = handshake.next_timeout()
    assert due is not None
    handshake.handle_timeout(due)
    resent_flight = handshake.datagrams_to_send()
    assert_resent_with_a_new_finished(resent_flight, certificate_flight)
    for answer in server.feed(resent_flight):
        handshake.receive_datagram(answer, due)
    assert handshake.complete
    exchange_with_openssl(finish(handshake, server).layer, server.connection)


def test_a_server_repeating_its_flight_gets_ours_again(kit: DeviceKit) -> None:
    """The server's timer resent ServerHello..ServerHelloDone: our certificate flight was
    lost, resend it at once (RFC 6347 4.2.4) rather than wait for our timer."""
    server = OpenSslServer(openssl_server_context(kit))
    handshake = DtlsClientHandshake(device_context(kit.good), now=0.0)
    for answer in server.feed(handshake.datagrams_to_send()):
        handshake.receive_datagram(answer, 0.0)
    server_flight = server.feed(handshake.datagrams_to_send())
    for answer in server_flight:
        handshake.receive_datagram(answer, 0.1)
    ours = handshake.datagrams_to_send()
    for answer in server_flight:  # the same flight again
        handshake.receive_datagram(answer, 0.2)
    resent = handshake.datagrams_to_send()
    assert_resent_with_a_new_finished(resent, ours)
    assert handshake.retransmissions == 1
    for answer in server.feed(resent):
        handshake.receive_datagram(answer, 0.3)
    assert handshake.complete


def our_server_round(
    server_context: SSL.Context, handshake: DtlsClientHandshake, exchange: CookieExchange
) -> DtlsServerHandshake:
    """Our server side: the stateless cookie round, then DtlsServerHandshake, run until
    both sides are complete."""
    (hello,) = handshake.datagrams_to_send()
    challenge = exchange.examine(hello, ADDRESS, 0.0)
    assert isinstance(challenge, Challenge)
    handshake.receive_datagram(challenge.reply, 0.0)
    (second_hello,) = handshake.datagrams_to_send()
    assert isinstance(exchange.examine(second_hello, ADDRESS, 0.0), Admit)
    server = DtlsServerHandshake(server_context, second_hello, now=0.0)
    for _ in range(10):
        for datagram in server.datagrams_to_send():
            handshake.receive_datagram(datagram, 0.0)
        for datagram in handshake.datagrams_to_send():
            server.receive_datagram(datagram, 0.0)
        if server.complete and handshake.complete:
            return server
    raise AssertionError("the handshake made no progress")


def test_against_our_server_full_and_resumed_with_our_layers_both_sides(kit: DeviceKit) -> None:
    server_context = make_dtls_server_context(kit.pki)
    context = device_context(kit.good)
    exchange = CookieExchange(0.0)
    client = DtlsClientHandshake(context, now=0.0)
    server = our_server_round(server_context, client, exchange)
    server_side = server.take_over()
    final = server.datagrams_to_send()  # empty: its flight went out in the loop
    device = client.take_over()
    assert not device.resumed and not server_side.resumed and final == []
    device_der = x509.load_pem_x509_certificate(
        kit.good.cert_path.read_bytes()
    ).public_bytes(Encoding.DER)
    assert server_side.peer_certificate_der == device_der
    assert server_side.layer.open_datagram(device.layer.seal(b"hello")) == [
        ApplicationData(b"hello")
    ]
    assert device.layer.open_datagram(server_side.layer.seal(b"2.05")) == [
        ApplicationData(b"2.05")
    ]

    again = DtlsClientHandshake(context, now=1.0, session=device.session)
    server = our_server_round(server_context, again, exchange)
    server_side = server.take_over()
    device = again.take_over()
    assert device.resumed and server_side.resumed
    assert server_side.peer_certificate_der == device_der  # the ticket keeps it
    # Our final flight (resumed: the client's) is kept until the server proves it has it:
    # a server repeating its Finished gets it again from the record layer.
    assert device.layer.holds_last_flight
    replay = server_side.layer.open_datagram(device.layer.seal(b"after resumption"))
    assert replay == [ApplicationData(b"after resumption")]
    assert device.layer.open_datagram(server_side.layer.seal(b"ok")) == [ApplicationData(b"ok")]
    assert not device.layer.holds_last_flight


def test_resumed_client_resends_its_final_flight_when_our_server_repeats(
    kit: DeviceKit,
) -> None:
    """A resumed handshake ends with the client's flight (RFC 5246 7.3). It is lost; our
    server's timer resends its flight with its Finished re-sealed under a new sequence
    number; the device's record layer takes that as the repeated flight it is
    (PeerRepeatedFlight, RFC 6347 4.2.4) and answers with its final flight again, and the
    server completes."""
    server_context = make_dtls_server_context(kit.pki)
    context = device_context(kit.good)
    exchange = CookieExchange(0.0)
    first = DtlsClientHandshake(context, now=0.0)
    our_server_round(server_context, first, exchange).take_over()
    session = first.take_over().session

    handshake = DtlsClientHandshake(context, now=1.0, session=session)
    (hello,) = handshake.datagrams_to_send()
    challenge = exchange.examine(hello, ADDRESS, 1.0)
    assert isinstance(challenge, Challenge)
    handshake.receive_datagram(challenge.reply, 1.0)
    (second_hello,) = handshake.datagrams_to_send()
    server = DtlsServerHandshake(server_context, second_hello, now=1.0)
    for datagram in server.datagrams_to_send():
        handshake.receive_datagram(datagram, 1.0)
    assert handshake.complete
    handshake.datagrams_to_send()  # our CCS + Finished: lost
    device = handshake.take_over()
    assert device.resumed and device.layer.holds_last_flight
    due = server.next_timeout()
    assert due is not None
    server.handle_timeout(due)
    replies: list[bytes] = []
    for datagram in server.datagrams_to_send():
        for event in device.layer.open_datagram(datagram):
            if isinstance(event, PeerRepeatedFlight):
                replies += event.replies
    assert replies
    for reply in replies:
        server.receive_datagram(reply, due)
    assert server.complete
    server_side = server.take_over()
    assert server_side.resumed
    assert server_side.layer.open_datagram(device.layer.seal(b"data")) == [
        ApplicationData(b"data")
    ]
    # The server's first data proves it has our flight: the device forgets it.
    assert device.layer.open_datagram(server_side.layer.seal(b"ok")) == [ApplicationData(b"ok")]
    assert not device.layer.holds_last_flight


def test_a_refused_device_fails_with_the_servers_alert(kit: DeviceKit) -> None:
    """A device certificate of another installation's CA: the server's alert ends it."""
    server = OpenSslServer(openssl_server_context(kit))
    handshake = DtlsClientHandshake(device_context(kit.foreign), now=0.0)
    run_against(server, handshake)
    assert handshake.failure is not None and "unknown ca" in handshake.failure
    assert handshake.next_timeout() is None
    with pytest.raises(RecordHandoverError, match="not complete"):
        handshake.take_over()


def test_a_session_of_another_context_is_refused(kit: DeviceKit) -> None:
    server = OpenSslServer(openssl_server_context(kit))
    first = DtlsClientHandshake(device_context(kit.good), now=0.0)
    run_against(server, first)
    session = finish(first, server).session
    assert session is not None
    with pytest.raises(ValueError, match="same Context"):
        DtlsClientHandshake(device_context(kit.good), now=0.0, session=session)


def test_garbage_and_late_datagrams_never_raise(kit: DeviceKit) -> None:
    handshake = DtlsClientHandshake(device_context(kit.good), now=0.0)
    junk_datagrams = (b"\x16\xfe\xfd" + bytes(5), b"\xff" * 40, b"\x17\xfe\xfd\x00\x01" + bytes(20))
    for junk in junk_datagrams:
        handshake.receive_datagram(junk, 0.1)
    handshake.abort()
    handshake.receive_datagram(b"\x16\xfe\xfd", 0.2)  # after abort: ignored
    assert handshake.datagrams_to_send() == []
