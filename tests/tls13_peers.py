"""Real OpenSSL peers for the TLS 1.3 record-layer tests: a PKI like the server's, pyOpenSSL
contexts on memory BIOs, and handshakes that end with our layer on one side."""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from OpenSSL import SSL, crypto

from otacore.records.openssl_memory import drain_output
from otacore.records.tls13 import Tls13RecordLayer
from otacore.records.tls13_handover import Tls13Handover, Tls13Handshake, enable_record_export
from otacore.records.tls13_keys import SUITES, CipherSuite, traffic_key_and_iv
from server.identity import (
    create_ca,
    issue_device_certificate,
    issue_server_certificate,
    new_device_id,
    new_device_key,
)

SUITE_NAMES = [suite.name for suite in SUITES]
#: What the device endpoint offers (OpenSSL's TLS 1.3 default, server/transport/tls.py).
DEFAULT_SUITES = (
    "TLS_AES_256_GCM_SHA384",
    "TLS_CHACHA20_POLY1305_SHA256",
    "TLS_AES_128_GCM_SHA256",
)


@dataclass(frozen=True)
class Pki:
    """An installation CA with a server and one device certificate (P-256, as issued)."""

    ca: x509.Certificate
    server_cert: x509.Certificate
    server_key: ec.EllipticCurvePrivateKey
    device_id: str
    device_cert: x509.Certificate
    device_key: ec.EllipticCurvePrivateKey


@functools.cache
def pki() -> Pki:
    """One PKI per test process (key generation is the slow part)."""
    ca, ca_key = create_ca()
    server_key = new_device_key()
    server_cert = issue_server_certificate(ca, ca_key, server_key.public_key())
    device_key = new_device_key()
    device_id = new_device_id()
    device_cert = issue_device_certificate(ca, ca_key, device_id, device_key.public_key())
    return Pki(ca, server_cert, server_key, device_id, device_cert, device_key)


def context(*, server: bool, suites: str | None = None, export: bool = False) -> SSL.Context:
    """A TLS 1.3-only mutual-auth context for the server or a device."""
    installation = pki()
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_3_VERSION)
    ctx.use_certificate(installation.server_cert if server else installation.device_cert)
    ctx.use_privatekey(installation.server_key if server else installation.device_key)
    ctx.get_cert_store().add_cert(crypto.X509.from_cryptography(installation.ca))
    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    if suites:
        ctx.set_tls13_ciphersuites(suites.encode())
        if "CCM_8" in suites:  # 64-bit tags: OpenSSL 3 allows them only at security level 0
            ctx.set_cipher_list(b"DEFAULT:@SECLEVEL=0")
    if export:
        enable_record_export(ctx)
    return ctx


def drain(connection: SSL.Connection) -> bytes:
    """Everything an OpenSSL connection has written to its memory BIO."""
    return drain_output(connection)


def step(connection: SSL.Connection) -> bytes:
    """Advance an OpenSSL handshake as far as it goes; return what it wrote."""
    with contextlib.suppress(SSL.WantReadError):
        connection.do_handshake()
    return drain(connection)


def recv_all(connection: SSL.Connection, data: bytes) -> bytes:
    """Feed ``data`` to an OpenSSL peer and read every application byte it yields."""
    if data:
        connection.bio_write(data)
    out = b""
    while True:
        try:
            out += connection.recv(65536)
        except SSL.WantReadError:
            return out


@dataclass
class Session:
    """Our layer on one side, an OpenSSL peer on the other, handshake done."""

    handover: Tls13Handover
    layer: Tls13RecordLayer
    peer: SSL.Connection
    #: The bytes OpenSSL (on our side) wrote in the handshake's last step.
    last_flight: bytes


def handshake(
    suite: str | None = None,
    *,
    our_side_is_server: bool = True,
    rekey_after: int | None = None,
    extra_client_data: bytes = b"",
) -> Session:
    """Run a full mutual-auth TLS 1.3 handshake between our :class:`Tls13Handshake` and an
    OpenSSL peer over memory BIOs, then take the session over.

    ``extra_client_data`` (server side only): the OpenSSL client sends it right after its
    Finished, and it reaches our side in the same chunk as the Finished.
    """
    ours = Tls13Handshake(
        context(server=our_side_is_server, suites=suite, export=True),
        is_server=our_side_is_server,
    )
    peer = SSL.Connection(context(server=not our_side_is_server, suites=suite), None)
    if our_side_is_server:
        peer.set_connect_state()
    else:
        peer.set_accept_state()
    to_peer = ours.data_to_send()  # the ClientHello, if we are the client
    last_flight = b""
    for _ in range(10):
        if to_peer:
            peer.bio_write(to_peer)
        from_peer = step(peer)
        if extra_client_data and our_side_is_server and from_peer:
            try:
                peer.do_handshake()
                peer.send(extra_client_data)
                from_peer += drain(peer)
            except SSL.WantReadError:
                pass
        if from_peer:
            ours.receive_data(from_peer)
        to_peer = ours.data_to_send()
        if ours.complete:
            last_flight = to_peer
            if to_peer:
                peer.bio_write(to_peer)
            break
    else:
        raise AssertionError("the handshake did not complete")
    handover = ours.take_over()
    kwargs = {} if rekey_after is None else {"rekey_after": rekey_after}
    layer = handover.record_layer(**kwargs)
    # The OpenSSL side finishes too (a server completes on our Finished); what it writes
    # (its tickets) stays in its BIO for the test to drain.
    with contextlib.suppress(SSL.WantReadError):
        peer.do_handshake()
    return Session(handover, layer, peer, last_flight)


def seal_raw(
    suite: CipherSuite,
    secret: bytes,
    seq: int,
    inner: bytes,
    *,
    outer_type: int = 23,
    length_adjust: int = 0,
) -> bytes:
    """A TLSCiphertext sealed independently of the layer (RFC 8446 5.2, 5.3): ``inner`` is
    the whole TLSInnerPlaintext (content, type, padding) so tests can break any part."""
    key, iv = traffic_key_and_iv(suite, secret)
    length = len(inner) + suite.tag_length + length_adjust
    header = bytes((outer_type, 3, 3)) + length.to_bytes(2, "big")
    nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
    return header + suite.aead(key).encrypt(nonce, inner, header)


def open_raw(suite: CipherSuite, secret: bytes, seq: int, record: bytes) -> bytes:
    """Open one record independently of the layer; returns the TLSInnerPlaintext."""
    key, iv = traffic_key_and_iv(suite, secret)
    nonce = (int.from_bytes(iv, "big") ^ seq).to_bytes(12, "big")
    return suite.aead(key).decrypt(nonce, record[5:], record[:5])


def split_records(data: bytes) -> list[bytes]:
    """A byte stream cut into its TLS records."""
    records = []
    while data:
        end = 5 + int.from_bytes(data[3:5], "big")
        records.append(data[:end])
        data = data[end:]
    return records
