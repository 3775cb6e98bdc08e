"""Tls13Handshake on the device side, as the load generator's records stack drives it
against a server that sends its NewSessionTickets with its first reply (ours does): the
device's first data sealed by OpenSSL before the take-over, the tickets absorbed, the
reply opened by our layer, then resumption with ``session=`` and an identity set per
handshake on a context that has none (one context shared by many devices)."""

from __future__ import annotations

import contextlib

import pytest
from OpenSSL import SSL, crypto

from otacore.errors import RecordHandoverError
from otacore.records.tls13 import ApplicationData, Tls13RecordLayer
from otacore.records.tls13_handover import Tls13Handshake, enable_record_export
from tests.tls13_peers import context, drain, pki, recv_all, step


def shared_device_context() -> SSL.Context:
    """A TLS 1.3 client context with the CA only: identities come per handshake."""
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    store = ctx.get_cert_store()
    assert store is not None
    store.add_cert(crypto.X509.from_cryptography(pki().ca))
    ctx.set_verify(SSL.VERIFY_PEER)
    enable_record_export(ctx)
    return ctx


def handshake_to_completion(ours: Tls13Handshake, server: SSL.Connection) -> int:
    """Run the handshake until our side completes (our Finished delivered); the number of
    records in the server's first flight."""
    to_server = ours.data_to_send()
    first_flight_records = 0
    while not ours.complete:
        server.bio_write(to_server)
        flight = step(server)
        first_flight_records = first_flight_records or flight.count(b"\x17\x03\x03")
        ours.receive_data(flight)
        to_server = ours.data_to_send()
    server.bio_write(to_server)  # our Finished
    with contextlib.suppress(SSL.WantReadError):
        server.do_handshake()
    return first_flight_records


def test_first_data_before_the_take_over_then_tickets_then_resumption() -> None:
    server_context = context(server=True)
    server_context.set_session_id(b"otacloud-test")
    device_context = shared_device_context()
    installation = pki()
    certificate, private_key = installation.device_cert, installation.device_key

    server = SSL.Connection(server_context, None)
    server.set_accept_state()
    ours = Tls13Handshake(
        device_context, is_server=False, absorb_tickets=True,
        certificate=certificate, private_key=private_key,
    )  # fmt: skip
    full_flight = handshake_to_completion(ours, server)
    assert server.get_peer_certificate(as_cryptography=True) == installation.device_cert
    # The device speaks first; OpenSSL seals it: the handshake is not taken over yet.
    ours.send_application_data(b"CSM + Hello")
    assert recv_all(server, ours.data_to_send()) == b"CSM + Hello"
    # The server's reply comes behind its tickets (OpenSSL queued them at completion).
    server.send(b"2.05 Content")
    ours.receive_data(drain(server))
    assert not ours.absorb_tickets  # the data record stopped the absorbing
    handover = ours.take_over()
    assert handover.read_seq == 2 and handover.write_seq == 1  # 2 tickets; our 1 record
    layer: Tls13RecordLayer = handover.record_layer()
    events = layer.receive_data(handover.unprocessed)
    assert b"".join(e.data for e in events if isinstance(e, ApplicationData)) == b"2.05 Content"
    assert recv_all(server, layer.send_application_data(b"more")) == b"more"
    assert handover.session is not None

    resumed_server = SSL.Connection(server_context, None)
    resumed_server.set_accept_state()
    again = Tls13Handshake(
        device_context, is_server=False, absorb_tickets=True, session=handover.session,
        certificate=certificate, private_key=private_key,
    )  # fmt: skip
    records = handshake_to_completion(again, resumed_server)
    # No CertificateRequest, Certificate, CertificateVerify (RFC 8446 2.2).
    assert records == full_flight - 3
    assert resumed_server.get_peer_certificate(as_cryptography=True) == installation.device_cert


def test_data_before_completion_or_on_the_server_side_is_refused() -> None:
    client = Tls13Handshake(context(server=False, export=True), is_server=False)
    with pytest.raises(RecordHandoverError, match="complete"):
        client.send_application_data(b"too early")
    server = Tls13Handshake(context(server=True, export=True), is_server=True)
    with pytest.raises(RecordHandoverError, match="client"):
        server.send_application_data(b"not for servers")
