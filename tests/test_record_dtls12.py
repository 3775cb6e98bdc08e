"""The DTLS 1.2 record layer against real OpenSSL peers (issue 14 items 2 and 3).

Every test runs a full mutual-auth DTLS 1.2 handshake between two pyOpenSSL connections over
memory BIOs (the server's context as ``server/transport/dtls.py`` builds it), hands one side
to ``otacore.records`` and checks that OpenSSL and our layer read each other's records.
The helpers here are shared by the other ``test_record_dtls12_*`` modules.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from OpenSSL import SSL

from otacore.errors import (
    RecordError,
    RecordLayerClosedError,
    RecordOverflowError,
    RecordSequenceExhaustedError,
    UnsupportedCipherSuiteError,
)
from otacore.records.dtls12 import (
    MAX_PLAINTEXT,
    MAX_SEQUENCE,
    RECORD_HEADER,
    AlertDescription,
    AlertLevel,
    ApplicationData,
    DtlsRecordLayer,
    RecordEvent,
    SessionClosed,
)
from otacore.records.dtls12_handover import HandshakeRecordTracker, layer_from_connection
from otacore.records.openssl_memory import drain_output
from otacore.records.tls12_keys import SUITES, derive_traffic_keys, suite_named, tls12_prf
from server.identity import ProvisionedDevice, init_pki, pki_dir, provision_devices
from server.transport.dtls import (
    DTLS_CIPHERS,
    make_dtls_client_context,
    make_dtls_server_context,
)

#: OpenSSL 3.2+ offers CCM-8 only at security level 0 (server/transport/dtls.py).
CCM8 = b"ECDHE-ECDSA-AES128-CCM8:@SECLEVEL=0"
SUITE_NAMES = [suite.openssl_name for suite in SUITES]
#: SSL_OP_NO_EXTENDED_MASTER_SECRET (OpenSSL ssl.h SSL_OP_BIT(0)); pyOpenSSL has no name for it.
OP_NO_EXTENDED_MASTER_SECRET = 1 << 0


def make_dtls_pki(root: Path) -> tuple[object, ProvisionedDevice]:
    """An installation PKI and one provisioned device under ``root``."""
    ca_dir = pki_dir(root / "data")
    (device,) = provision_devices(ca_dir, 1, root / "devices")
    return init_pki(ca_dir), device


@pytest.fixture(scope="module")
def dtls_pki(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, ProvisionedDevice]:
    return make_dtls_pki(tmp_path_factory.mktemp("dtls12-records"))


def cipher_string(suite_name: str) -> bytes:
    """An OpenSSL cipher list that offers only ``suite_name``."""
    return CCM8 if suite_name.endswith("CCM8") else suite_name.encode()


@dataclass
class Peer:
    """One OpenSSL side of the in-process handshake and everything it put on the wire."""

    conn: SSL.Connection
    tracker: HandshakeRecordTracker = field(default_factory=HandshakeRecordTracker)
    #: Every datagram this side emitted, OpenSSL's and (once handed over) our layer's.
    wire: list[bytes] = field(default_factory=list)

    def drain(self) -> bytes:
        """All of OpenSSL's pending output (several datagrams concatenated)."""
        out = drain_output(self.conn)
        if out:
            self.tracker.outgoing(out)
            self.wire.append(out)
        return out

    def deliver(self, data: bytes) -> None:
        """Give OpenSSL a datagram from the other side."""
        if data:
            self.tracker.incoming(data)
            self.conn.bio_write(data)

    def step(self) -> None:
        with suppress(SSL.WantReadError):
            self.conn.do_handshake()


def make_peers(
    pki: tuple[object, ProvisionedDevice],
    suite_name: str,
    *,
    client_options: int = 0,
    session: SSL.Session | None = None,
    client_context: SSL.Context | None = None,
    server_context: SSL.Context | None = None,
) -> tuple[Peer, Peer]:
    """(server, client), not yet connected, offering only ``suite_name``. Pass the contexts
    of an earlier pair (and its ``session``) to resume: the ticket keys are the context's."""
    installation, device = pki
    if server_context is None:
        server_context = make_dtls_server_context(installation)  # type: ignore[arg-type]
        server_context.set_cipher_list(DTLS_CIPHERS + b":" + CCM8)
        server_context.set_options(SSL.OP_NO_QUERY_MTU)
    if client_context is None:
        client_context = make_dtls_client_context(
            Path(device.ca_path), Path(device.cert_path), Path(device.key_path)
        )
        client_context.set_cipher_list(cipher_string(suite_name))
        client_context.set_options(SSL.OP_NO_QUERY_MTU | client_options)
    server = SSL.Connection(server_context)
    server.set_accept_state()
    server.set_ciphertext_mtu(1400)
    client = SSL.Connection(client_context)
    client.set_connect_state()
    client.set_ciphertext_mtu(1400)
    if session is not None:
        client.set_session(session)
    return Peer(server), Peer(client)


def handshake(server: Peer, client: Peer, *, drop_server_final: bool = False) -> None:
    """Run the handshake to the end. ``drop_server_final``: the server's last flight is lost
    (the client is left waiting for it, the server has finished)."""
    for _ in range(20):
        client.step()
        to_server = client.drain()
        server.deliver(to_server)
        server.step()
        to_client = server.drain()
        server_done = server.conn.get_state_string() == b"SSL negotiation finished successfully"
        if drop_server_final and server_done:
            return
        client.deliver(to_client)
        if not to_server and not to_client:
            break
    assert server.conn.get_state_string() == b"SSL negotiation finished successfully"
    assert client.conn.get_state_string() == b"SSL negotiation finished successfully"


def established(
    pki: tuple[object, ProvisionedDevice], suite_name: str, **kwargs: object
) -> tuple[Peer, Peer, DtlsRecordLayer]:
    """A finished handshake, the server side handed to our layer."""
    server, client = make_peers(pki, suite_name, **kwargs)  # type: ignore[arg-type]
    handshake(server, client)
    assert server.conn.get_cipher_name() == suite_name
    return server, client, layer_from_connection(server.conn, server.tracker, is_server=True)


def records_of(datagram: bytes) -> Iterator[tuple[int, int, int]]:
    """(content type, epoch, seq) of each record in a datagram."""
    offset = 0
    while offset + 13 <= len(datagram):
        content_type, _version, epoch_seq, length = RECORD_HEADER.unpack_from(datagram, offset)
        yield content_type, epoch_seq >> 48, epoch_seq & MAX_SEQUENCE
        offset += 13 + length


def assert_no_nonce_reuse(wire: list[bytes]) -> int:
    """Every protected record on ``wire`` has its own (epoch, seq): its nonce. Returns the count."""
    seen = [(epoch, seq) for datagram in wire for _t, epoch, seq in records_of(datagram) if epoch]
    assert len(seen) == len(set(seen)), "a protected (epoch, seq) was sent twice"
    return len(seen)


def client_reads(client: Peer, datagram: bytes) -> bytes:
    client.deliver(datagram)
    return client.conn.recv(MAX_PLAINTEXT + 1)


def opened_data(events: list[RecordEvent]) -> list[bytes]:
    assert all(isinstance(event, ApplicationData) for event in events), events
    return [event.data for event in events if isinstance(event, ApplicationData)]


# --- key derivation -----------------------------------------------------------------------


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_prf_matches_openssl_exporter(dtls_pki: tuple[object, ProvisionedDevice],
                                      suite_name: str) -> None:  # fmt: skip
    """Our TLS 1.2 PRF is OpenSSL's: the RFC 5705 exporter is PRF(master, label, cr + sr)."""
    server, client = make_peers(dtls_pki, suite_name)
    handshake(server, client)
    conn = server.conn
    seed = conn.client_random() + conn.server_random()
    suite = suite_named(suite_name)
    for size in (1, 32, 48, 100):
        ours = tls12_prf(suite.prf_hash, conn.master_key(), b"EXPERIMENTAL otacloud", seed, size)
        assert ours == conn.export_keying_material(b"EXPERIMENTAL otacloud", size)


def test_prf_known_answer() -> None:
    """A published TLS 1.2 PRF (SHA-256) test vector (IETF TLS list, Birr-Pixton 2012)."""
    secret = bytes.fromhex("9bbe436ba940f017b17652849a71db35")
    seed = bytes.fromhex("a0ba9f936cda311827a6f796ffd5198c")
    expected = bytes.fromhex(
        "e3f229ba727be17b8d122620557cd453c2aab21d07c3d495329b52d4e61edb5a6b301791e90d35c9c9a46b4e"
        "14baf9af0fa022f7077def17abfd3797c0564bab4fbc91666e9def9b97fce34f796789baa48082d122ee42c5"
        "a72e5a5110fff70187347b66"
    )
    assert tls12_prf("sha256", secret, b"test label", seed, 100) == expected


# --- our layer as the server, OpenSSL as the client -----------------------------------------


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
@pytest.mark.parametrize("ems", [True, False], ids=["ems", "no-ems"])
def test_server_layer_and_openssl_client_read_each_other(
    dtls_pki: tuple[object, ProvisionedDevice], suite_name: str, ems: bool
) -> None:
    """Both directions, every suite, sizes 0..2^14, with and without extended master secret
    (RFC 7627 changes the master secret only; the key block is derived the same way)."""
    server, client, layer = established(
        dtls_pki, suite_name, client_options=0 if ems else OP_NO_EXTENDED_MASTER_SECRET
    )
    seed = random.randrange(2**32)
    print(f"random seed {seed}")
    rng = random.Random(seed)
    sizes = [0, 1, 2, 15, 16, 17, 1024, 1400, MAX_PLAINTEXT - 1, MAX_PLAINTEXT]
    sizes += [rng.randrange(MAX_PLAINTEXT + 1) for _ in range(20)]
    for size in sizes:
        payload = rng.randbytes(size)
        datagram = layer.seal(payload)
        server.wire.append(datagram)
        if not size:  # OpenSSL neither returns nor sends (SSL_write of 0) empty records
            client.deliver(datagram)
            continue
        assert client_reads(client, datagram) == payload
        client.conn.send(payload)
        assert opened_data(layer.open_datagram(client.drain())) == [payload]
    # OpenSSL confirms with one more record that it accepted everything, empty ones included.
    assert client_reads(client, layer.seal(b"last")) == b"last"
    assert layer.discarded == 0
    assert_no_nonce_reuse(server.wire)
    assert_no_nonce_reuse(client.wire)


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_long_run_of_sequence_numbers(dtls_pki: tuple[object, ProvisionedDevice],
                                      suite_name: str) -> None:  # fmt: skip
    """Thousands of records each way, then sequence numbers past 2^32 (the 48-bit field and
    the explicit nonce / XOR nonce use all of it), then up to 2^48 - 1 and exhaustion."""
    _server, client, layer = established(dtls_pki, suite_name)
    for index in range(3000):
        payload = index.to_bytes(4, "big") * 8
        assert client_reads(client, layer.seal(payload)) == payload
        client.conn.send(payload)
        assert opened_data(layer.open_datagram(client.drain())) == [payload]
    for start in (2**32 - 3, 2**40 + 7, MAX_SEQUENCE - 2):
        layer.write_seq = start  # a session that has sealed that many (test only)
        for _ in range(3):
            assert client_reads(client, layer.seal(b"far")) == b"far"
    with pytest.raises(RecordSequenceExhaustedError, match="exhausted"):
        layer.seal(b"one too many")
    assert layer.write_seq == MAX_SEQUENCE + 1


def test_record_size_limits(dtls_pki: tuple[object, ProvisionedDevice]) -> None:
    """RFC 6347 4.1.1 / RFC 5246 6.2: at most 2^14 plaintext bytes per record."""
    _server, client, layer = established(dtls_pki, SUITE_NAMES[0])
    before = layer.write_seq
    with pytest.raises(RecordOverflowError, match="at most 16384"):
        layer.seal(bytes(MAX_PLAINTEXT + 1))
    assert layer.write_seq == before  # nothing consumed
    assert client_reads(client, layer.seal(bytes(MAX_PLAINTEXT))) == bytes(MAX_PLAINTEXT)


# --- handover: sequence numbers OpenSSL used -------------------------------------------------


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_handover_continues_after_openssl_sequence_numbers(
    dtls_pki: tuple[object, ProvisionedDevice], suite_name: str
) -> None:
    """OpenSSL's server sealed exactly one epoch-1 record (its Finished, seq 0), and the
    NewSessionTicket went in epoch 0 before ChangeCipherSpec; so our first record is seq 1."""
    server, client, layer = established(dtls_pki, suite_name)
    sent = [record for datagram in server.wire for record in records_of(datagram)]
    protected = [(t, epoch, seq) for t, epoch, seq in sent if epoch]
    assert protected == [(22, 1, 0)]  # handshake(Finished), epoch 1, seq 0
    final_flight_types = [t for t, epoch, _seq in sent[-3:]]
    assert final_flight_types == [22, 20, 22]  # NewSessionTicket, CCS, Finished
    assert (layer.write_epoch, layer.write_seq, layer.read_epoch) == (1, 1, 1)
    assert layer.holds_last_flight  # the server sent the final flight of a full handshake
    # The client's Finished (epoch 1, seq 0) already went through OpenSSL: replaying it is
    # caught by the window our layer inherited, so it does not trigger a retransmission.
    replayed = [record for _place, record in server.tracker.incoming_protected]
    assert len(replayed) == 1
    events = layer.open_datagram(replayed[0])
    assert [type(event).__name__ for event in events] == ["RecordDiscarded"]
    datagram = layer.seal(b"x")
    server.wire.append(datagram)
    assert client_reads(client, datagram) == b"x"
    assert assert_no_nonce_reuse(server.wire) == 2


def test_handover_refuses_unfinished_or_untracked(
    dtls_pki: tuple[object, ProvisionedDevice],
) -> None:
    from otacore.errors import RecordHandoverError

    server, client = make_peers(dtls_pki, SUITE_NAMES[0])
    with pytest.raises(RecordHandoverError, match="not finished"):
        layer_from_connection(server.conn, server.tracker, is_server=True)
    handshake(server, client)
    with pytest.raises(RecordHandoverError, match="tracker saw no protected record"):
        layer_from_connection(server.conn, HandshakeRecordTracker(), is_server=True)


# --- our layer as the client, OpenSSL as the server (item 8: the emulated devices) ------------


@pytest.mark.parametrize("suite_name", SUITE_NAMES)
def test_client_layer_and_openssl_server_read_each_other(
    dtls_pki: tuple[object, ProvisionedDevice], suite_name: str
) -> None:
    server, client = make_peers(dtls_pki, suite_name)
    handshake(server, client)
    layer = layer_from_connection(client.conn, client.tracker, is_server=False)
    assert not layer.holds_last_flight  # the server's flight was the final one
    assert (layer.write_epoch, layer.write_seq) == (1, 1)  # after the client's Finished
    rng = random.Random(14)
    for size in [0, 1, 100, 1024, MAX_PLAINTEXT] + [rng.randrange(2000) for _ in range(30)]:
        payload = rng.randbytes(size)
        server.deliver(layer.seal(payload))
        if not size:
            continue
        assert server.conn.recv(MAX_PLAINTEXT + 1) == payload
        server.conn.send(payload)
        assert opened_data(layer.open_datagram(server.drain())) == [payload]
    # Orderly close from our client: OpenSSL's server sees close_notify.
    server.deliver(layer.close())
    with pytest.raises(SSL.ZeroReturnError):
        server.conn.recv(100)
    with pytest.raises(RecordLayerClosedError):
        layer.seal(b"after close")


# --- alerts ---------------------------------------------------------------------------------


def test_close_notify_both_ways(dtls_pki: tuple[object, ProvisionedDevice]) -> None:
    _server, client, layer = established(dtls_pki, SUITE_NAMES[1])
    client.conn.shutdown()  # OpenSSL's close_notify
    events = layer.open_datagram(client.drain())
    assert len(events) == 1 and isinstance(events[0], SessionClosed)
    closed = events[0]
    assert (closed.alert, closed.fatal, closed.by_peer) == (0, False, True)
    client.deliver(closed.reply)  # RFC 5246 7.2.1: our close_notify in answer
    assert client.conn.shutdown() is True  # both close_notify exchanged
    assert layer.closed
    assert [type(e).__name__ for e in layer.open_datagram(b"anything")] == ["RecordDiscarded"]


def test_our_fatal_alert_ends_the_openssl_peer(dtls_pki: tuple[object, ProvisionedDevice]) -> None:
    _server, client, layer = established(dtls_pki, SUITE_NAMES[2])
    client.deliver(layer.seal_alert(AlertLevel.FATAL, AlertDescription.INTERNAL_ERROR))
    with pytest.raises(SSL.Error, match="internal error"):
        client.conn.recv(100)
    assert layer.closed and layer.close_alert == AlertDescription.INTERNAL_ERROR


def test_layer_to_layer_alerts(dtls_pki: tuple[object, ProvisionedDevice]) -> None:
    """Warning alerts other than close_notify keep the session; fatal ones end it."""
    server, client = make_peers(dtls_pki, SUITE_NAMES[0])
    handshake(server, client)
    ours = layer_from_connection(server.conn, server.tracker, is_server=True)
    device = layer_from_connection(client.conn, client.tracker, is_server=False)
    warning = device.seal_alert(AlertLevel.WARNING, AlertDescription.USER_CANCELED)
    events = ours.open_datagram(warning)
    assert [type(e).__name__ for e in events] == ["PeerAlert"] and not ours.closed
    assert opened_data(ours.open_datagram(device.seal(b"still here"))) == [b"still here"]
    data = device.seal(b"behind the fatal alert in the same datagram")
    events = ours.open_datagram(
        device.seal_alert(AlertLevel.FATAL, AlertDescription.HANDSHAKE_FAILURE) + data
    )
    assert events == [SessionClosed(40, True, True, b"")]
    assert ours.closed and device.closed


def test_forged_records_during_the_handshake_do_not_move_the_window(
    dtls_pki: tuple[object, ProvisionedDevice],
) -> None:
    """An off-path forger's records sent during the handshake (the highest sequence number,
    another epoch, a fake Finished after the server's) are kept by the tracker but fail to
    authenticate at hand-over: the replay window, the epoch and the kept flight come from
    genuine records only, so the device's data still opens."""
    server, client = make_peers(dtls_pki, SUITE_NAMES[0])
    forged = [
        RECORD_HEADER.pack(23, 0xFEFD, (1 << 48) | MAX_SEQUENCE, 40) + bytes(40),
        RECORD_HEADER.pack(23, 0xFEFD, (0xFFFF << 48) | 3, 40) + bytes(40),
    ]
    for record in forged:
        server.deliver(record)  # OpenSSL drops them too
    handshake(server, client)
    fake_finished = RECORD_HEADER.pack(22, 0xFEFD, (1 << 48) | 7, 48) + bytes(48)
    server.deliver(fake_finished)  # as if the client had sent its Finished after ours
    kept = [record for _place, record in server.tracker.incoming_protected]
    assert all(record in kept for record in [*forged, fake_finished])
    layer = layer_from_connection(server.conn, server.tracker, is_server=True)
    assert layer.read_epoch == 1 and layer.holds_last_flight
    client.conn.send(b"genuine")
    assert opened_data(layer.open_datagram(client.drain())) == [b"genuine"]


def test_unsupported_suite_is_refused_at_handover(
    dtls_pki: tuple[object, ProvisionedDevice],
) -> None:
    """A CBC suite (not AEAD) negotiated by a context configured otherwise is named."""
    installation, _device = dtls_pki
    server_context = make_dtls_server_context(installation)  # type: ignore[arg-type]
    server_context.set_cipher_list(b"ECDHE-ECDSA-AES128-SHA256")
    server_context.set_options(SSL.OP_NO_QUERY_MTU)
    server, client = make_peers(dtls_pki, "ECDHE-ECDSA-AES128-SHA256",
                                server_context=server_context)  # fmt: skip
    handshake(server, client)
    with pytest.raises(UnsupportedCipherSuiteError, match="ECDHE-ECDSA-AES128-SHA256"):
        layer_from_connection(server.conn, server.tracker, is_server=True)


def test_key_derivation_refuses_bad_inputs() -> None:
    suite = suite_named(SUITE_NAMES[0])
    with pytest.raises(UnsupportedCipherSuiteError, match="not one the record layer seals"):
        suite_named("AES128-SHA")
    with pytest.raises(RecordError, match="48 bytes"):
        derive_traffic_keys(suite, bytes(47), bytes(32), bytes(32))
    with pytest.raises(RecordError, match="32 bytes each"):
        derive_traffic_keys(suite, bytes(48), bytes(31), bytes(32))
    with pytest.raises(RecordError, match="sha256 or sha384"):
        tls12_prf("md5", b"k", b"l", b"s", 4)
    keys = derive_traffic_keys(suite, bytes(range(48)), bytes(32), bytes(32))
    for secret in (keys.client_write_key, keys.server_write_key, keys.client_write_iv):
        assert repr(secret) not in repr(keys)  # keys never reach a log
