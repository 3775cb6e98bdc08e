"""DTLS 1.2 record layer: lost final flights (RFC 6347 4.2.4), renegotiation attempts
(RFC 5246 7.2.2), resumed handshakes, and saving / restoring a session mid-stream."""

from __future__ import annotations

import time

import pytest
from OpenSSL import SSL

from otacore.errors import RecordStateFormatError
from otacore.records.dtls12 import (
    DiscardReason,
    DtlsRecordLayer,
    NewHandshakeRequested,
    PeerRepeatedFlight,
    RecordDiscarded,
    RenegotiationRefused,
    SessionClosed,
)
from otacore.records.dtls12_handover import layer_from_connection
from server.identity import ProvisionedDevice
from tests.test_record_dtls12 import (
    SUITE_NAMES,
    Peer,
    assert_no_nonce_reuse,
    client_reads,
    established,
    handshake,
    make_dtls_pki,
    make_peers,
    opened_data,
    records_of,
)

FINISHED = "SSL negotiation finished successfully"
#: OpenSSL's first DTLS retransmission timer is 1 s; allow for a loaded machine.
TIMER_PATIENCE = 30.0


@pytest.fixture(scope="module")
def dtls_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, ProvisionedDevice]:
    return make_dtls_pki(tmp_path_factory.mktemp("dtls12-flight"))


def wait_for_retransmission(peer: Peer) -> bytes:
    """Let ``peer``'s DTLS timer run out (OpenSSL's clock is the wall clock; this waits for
    the condition, it does not assert on elapsed time) and return what it retransmits."""
    deadline = time.monotonic() + TIMER_PATIENCE
    while True:
        remaining = peer.conn.DTLSv1_get_timeout()
        assert remaining is not None, "no DTLS timer is running"
        if remaining <= 0 and peer.conn.DTLSv1_handle_timeout():
            return peer.drain()
        assert time.monotonic() < deadline, "the DTLS timer never fired"
        time.sleep(min(max(remaining, 0.01), 0.2))


def state(peer: Peer) -> str:
    return peer.conn.get_state_string().decode()


@pytest.mark.parametrize("suite_name", SUITE_NAMES[:3])
def test_lost_final_flight_is_retransmitted_by_the_layer(
    dtls_pki: tuple[object, ProvisionedDevice], suite_name: str
) -> None:
    """The server's NewSessionTicket+CCS+Finished are lost; the server is handed over at
    once. The client's timer repeats its flight; our layer answers with our flight (the
    Finished re-sealed under a fresh seq), the client finishes, data flows both ways."""
    server, client = make_peers(dtls_pki, suite_name)
    handshake(server, client, drop_server_final=True)
    assert state(server) == FINISHED and state(client) != FINISHED
    layer = layer_from_connection(server.conn, server.tracker, is_server=True)
    assert layer.holds_last_flight
    repeated = wait_for_retransmission(client)
    events = layer.open_datagram(repeated)
    discards = [e.reason for e in events if isinstance(e, RecordDiscarded)]
    assert discards and set(discards) == {DiscardReason.WRONG_EPOCH}  # its epoch-0 part
    (flight_event,) = [e for e in events if isinstance(e, PeerRepeatedFlight)]
    assert len(flight_event.replies) == 1
    reply_records = list(records_of(flight_event.replies[0]))
    assert [(t, epoch) for t, epoch, _seq in reply_records] == [(22, 0), (20, 0), (22, 1)]
    assert reply_records[-1][2] == 1  # OpenSSL's Finished was seq 0: ours is new
    server.wire.extend(flight_event.replies)
    client.deliver(flight_event.replies[0])
    client.step()
    assert state(client) == FINISHED
    datagram = layer.seal(b"after the flight")
    server.wire.append(datagram)
    assert client_reads(client, datagram) == b"after the flight"
    assert layer.holds_last_flight  # no proof yet that the client has it ...
    client.conn.send(b"proof")
    assert opened_data(layer.open_datagram(client.drain())) == [b"proof"]
    assert not layer.holds_last_flight  # ... now there is, so the flight is dropped
    assert assert_no_nonce_reuse(server.wire) == 3


def test_openssl_retransmission_before_handover_moves_the_sequence(
    dtls_pki: tuple[object, ProvisionedDevice],
) -> None:
    """If OpenSSL itself retransmitted its final flight before the hand-over, its Finished
    took epoch-1 seq 1 too; the tracker sees it and our first record is seq 2."""
    server, client = make_peers(dtls_pki, SUITE_NAMES[0])
    handshake(server, client, drop_server_final=True)
    server.deliver(wait_for_retransmission(client))
    with pytest.raises(SSL.WantReadError):
        server.conn.recv(100)  # OpenSSL answers the repeated flight with its own
    again = server.drain()
    assert [(t, e, s) for t, e, s in records_of(again) if e] == [(22, 1, 1)]
    client.deliver(again)
    client.step()
    assert state(client) == FINISHED
    layer = layer_from_connection(server.conn, server.tracker, is_server=True)
    assert (layer.write_epoch, layer.write_seq) == (1, 2)
    # The kept flight is the newest copy, once: NewSessionTicket, CCS, Finished.
    replies = layer.retransmit_last_flight()
    assert [(t, e) for t, e, _s in records_of(replies[0])] == [(22, 0), (20, 0), (22, 1)]
    server.wire.extend(replies)
    datagram = layer.seal(b"data")
    server.wire.append(datagram)
    client.deliver(replies[0])  # a duplicate flight the client ignores
    assert client_reads(client, datagram) == b"data"
    assert assert_no_nonce_reuse(server.wire) == 4


def test_resumed_handshake_client_holds_the_final_flight(
    dtls_pki: tuple[object, ProvisionedDevice],
) -> None:
    """In an abbreviated handshake the client sends the final flight (RFC 5246 7.3): our
    layer as the client keeps it and answers the server's repeated flight."""
    server, client = make_peers(dtls_pki, SUITE_NAMES[0])
    handshake(server, client)
    client.conn.send(b"x")  # let the ticket settle
    server.deliver(client.drain())
    assert server.conn.recv(10) == b"x"
    session = client.conn.get_session()
    assert session is not None
    server2, client2 = make_peers(
        dtls_pki,
        SUITE_NAMES[0],
        session=session,
        client_context=client.conn.get_context(),
        server_context=server.conn.get_context(),
    )
    # Run the resumed handshake, losing the client's final flight (CCS + Finished).
    client2.step()
    server2.deliver(client2.drain())
    server2.step()
    client2.deliver(server2.drain())
    client2.step()
    lost = client2.drain()
    client2.step()  # OpenSSL completes the resumed handshake on the next call
    assert state(client2) == FINISHED
    assert [(t, e) for t, e, _s in records_of(lost)] == [(20, 0), (22, 1)]
    layer = layer_from_connection(client2.conn, client2.tracker, is_server=False)
    assert layer.holds_last_flight
    events = layer.open_datagram(wait_for_retransmission(server2))
    (flight_event,) = [e for e in events if isinstance(e, PeerRepeatedFlight)]
    server2.deliver(flight_event.replies[0])
    server2.step()
    assert state(server2) == FINISHED
    server2.deliver(layer.seal(b"resumed"))
    assert server2.conn.recv(100) == b"resumed"


def test_renegotiation_is_refused_with_a_warning(
    dtls_pki: tuple[object, ProvisionedDevice],
) -> None:
    """RFC 5246 7.2.2: no_renegotiation is always a warning; the requester decides. OpenSSL's
    client then aborts with a fatal handshake_failure, which closes only this session."""
    _server, client, layer = established(dtls_pki, SUITE_NAMES[0])
    assert client.conn.renegotiate()
    client.step()
    (event,) = layer.open_datagram(client.drain())  # a ClientHello in epoch 1
    assert isinstance(event, RenegotiationRefused) and not layer.closed
    client.deliver(event.reply)
    with pytest.raises(SSL.Error, match="no renegotiation"):
        client.conn.do_handshake()
    (closed,) = layer.open_datagram(client.drain())
    assert closed == SessionClosed(alert=40, fatal=True, by_peer=True, reply=b"")


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_save_and_restore_mid_stream(dtls_pki: tuple[object, ProvisionedDevice],
                                     suite_name: str) -> None:  # fmt: skip
    """A restored layer goes on where the saved one stopped: sequence numbers, replay window
    (an old record is still refused), the kept flight, the counters."""
    _server, client, layer = established(dtls_pki, suite_name)
    for index in range(5):
        assert client_reads(client, layer.seal(b"%d" % index)) == b"%d" % index
    client.conn.send(b"before")
    before = client.drain()
    assert opened_data(layer.open_datagram(before)) == [b"before"]
    saved = layer.to_bytes()
    restored = DtlsRecordLayer.from_bytes(saved)
    assert restored.to_bytes() == saved
    assert (restored.write_seq, restored.read_epoch) == (layer.write_seq, layer.read_epoch)
    assert [type(e) for e in restored.open_datagram(before)] == [RecordDiscarded]  # replay
    assert client_reads(client, restored.seal(b"after")) == b"after"
    client.conn.send(b"to the restored layer")
    assert opened_data(restored.open_datagram(client.drain())) == [b"to the restored layer"]
    assert restored.discarded == 1
    # An idle session drops its AEAD objects; the next seal and open rebuild them.
    restored.release_aeads()
    assert client_reads(client, restored.seal(b"after idling")) == b"after idling"
    restored.release_aeads()
    client.conn.send(b"wakes it up")
    assert opened_data(restored.open_datagram(client.drain())) == [b"wakes it up"]
    # Once the flight is forgotten, an idle session saves in a couple of hundred bytes.
    assert not restored.holds_last_flight
    assert len(restored.to_bytes()) <= 160


def test_restore_refuses_bad_state() -> None:
    with pytest.raises(RecordStateFormatError, match="shorter than its header"):
        DtlsRecordLayer.from_bytes(b"D12")
    with pytest.raises(RecordStateFormatError, match=r"not a saved DTLS 1\.2 record state"):
        DtlsRecordLayer.from_bytes(bytes(200))


def test_client_hello_in_epoch_zero_asks_for_a_new_handshake(
    dtls_pki: tuple[object, ProvisionedDevice],
) -> None:
    """A device that restarted sends a fresh ClientHello to the same address (RFC 6347
    4.2.8): the layer says so, and the session itself goes on until a new one replaces it."""
    _server, client, layer = established(dtls_pki, SUITE_NAMES[0])
    _unused, restarted = make_peers(dtls_pki, SUITE_NAMES[0])
    restarted.step()
    hello = restarted.drain()
    assert [(t, e) for t, e, _s in records_of(hello)] == [(22, 0)]
    assert layer.open_datagram(hello) == [NewHandshakeRequested()]
    assert layer.discarded == 0 and not layer.closed
    client.conn.send(b"old session still works")
    assert opened_data(layer.open_datagram(client.drain())) == [b"old session still works"]


def test_hello_request_to_the_client_layer_is_refused(
    dtls_pki: tuple[object, ProvisionedDevice],
) -> None:
    """Our layer as the device: a server's HelloRequest (RFC 5246 7.4.1.1) gets the same
    warning no_renegotiation; OpenSSL's server then gives up on the session itself."""
    server, client = make_peers(dtls_pki, SUITE_NAMES[0])
    handshake(server, client)
    layer = layer_from_connection(client.conn, client.tracker, is_server=False)
    assert server.conn.renegotiate()
    server.step()
    (event,) = layer.open_datagram(server.drain())  # a HelloRequest in epoch 1
    assert isinstance(event, RenegotiationRefused) and not layer.closed
    server.deliver(event.reply)
    server.deliver(layer.seal(b"hi"))
    with pytest.raises(SSL.Error, match="no renegotiation"):
        server.conn.recv(100)
