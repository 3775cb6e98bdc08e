"""The UDP shell: DTLS 1.2 with mutual authentication, on the project's own UDP endpoint.

``udp_endpoint.UdpEndpoint`` owns the socket: the stateless cookie exchange (RFC 6347
section 4.2.1, ``otacore.records.dtls12_cookie``) comes before any per-peer state; OpenSSL
runs each handshake on memory BIOs (``otacore.records.dtls12_server``); once it completes,
the session's keys go to our record layer (``otacore.records.dtls12``) and the OpenSSL object
is freed, so an established session (``udp_session.DtlsSession``) holds no OpenSSL state.

This module builds the contexts (server and device side) and starts the endpoint. Devices
still use ``trio.DTLSEndpoint`` (real OpenSSL peers for our server); their helpers live in
``udp_trio_device`` and are re-exported here for the device-side callers.
pyOpenSSL has no DTLS 1.2 constant: the raw version 0xFEFD is used; it freezes a Context
after first use, so device clients make a fresh Context per connection.
"""

from __future__ import annotations

import socket
from pathlib import Path

import trio
from OpenSSL import SSL

from otacore.records.dtls12_server import prepare_server_context
from server.identity import InstallationPki
from server.transport.session_host import SessionHost
from server.transport.udp_endpoint import UdpEndpoint
from server.transport.udp_saved import SavedDtlsSession
from server.transport.udp_session import DtlsSession
from server.transport.udp_trio_device import (
    connection_of as _connection_of,
)
from server.transport.udp_trio_device import (
    peer_certificate_der,
    receive_datagram,
    send_close_notify,
    session_reused,
)

__all__ = [
    "DTLS1_2_VERSION",
    "DTLS_CIPHERS",
    "DtlsSession",
    "_connection_of",
    "make_dtls_client_context",
    "make_dtls_server_context",
    "peer_certificate_der",
    "receive_datagram",
    "send_close_notify",
    "serve_dtls",
    "session_reused",
]

#: DTLS 1.2 wire version (RFC 6347 section 4.1); pyOpenSSL has no named constant for it.
DTLS1_2_VERSION = 0xFEFD
#: ECDHE-ECDSA AEAD suites. RFC 7252 section 9.1.3.3 names AES-128-CCM-8 for CoAP, but OpenSSL
#: 3.2+ allows CCM-8 only at security level 0 (measured: a CCM-8-only client fails to connect),
#: so devices need AES-128-CCM, AES-GCM or ChaCha20-Poly1305.
DTLS_CIPHERS = (
    b"ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305:"
    b"ECDHE-ECDSA-AES256-GCM-SHA384:ECDHE-ECDSA-AES128-CCM"
)
#: Session id context: OpenSSL refuses to resume sessions with client certificates without one.
_SESSION_ID_CONTEXT = b"otacloud-dtls"


def make_dtls_server_context(pki: InstallationPki) -> SSL.Context:
    """The server's DTLS 1.2 context: server cert, client certs required from the CA.

    Resumption uses stateless session tickets (RFC 5077); the server-side session cache is
    off, so past sessions cost the server no memory. Configure everything here: pyOpenSSL
    refuses changes once the context is in use.
    """
    context = SSL.Context(SSL.DTLS_METHOD)
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    context.set_cipher_list(DTLS_CIPHERS)
    context.use_certificate_chain_file(str(pki.server_cert_path))
    context.use_privatekey_file(str(pki.server_key_path))
    context.check_privatekey()
    context.load_verify_locations(str(pki.ca_cert_path))
    context.add_client_ca(pki.ca_cert)  # the CertificateRequest names our CA
    prepare_server_context(context, verify_mode=SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
    context.set_mode(SSL.MODE_RELEASE_BUFFERS)
    context.set_session_id(_SESSION_ID_CONTEXT)
    context.set_session_cache_mode(SSL.SESS_CACHE_OFF)
    return context


def make_dtls_client_context(ca_path: Path, cert_path: Path, key_path: Path) -> SSL.Context:
    """A device-side DTLS 1.2 context. Make a new one per connection (pyOpenSSL freezes a
    context once used, and trio's connect() changes it)."""
    context = SSL.Context(SSL.DTLS_METHOD)
    context.set_min_proto_version(DTLS1_2_VERSION)
    context.set_max_proto_version(DTLS1_2_VERSION)
    context.set_cipher_list(DTLS_CIPHERS)
    context.use_certificate_chain_file(str(cert_path))
    context.use_privatekey_file(str(key_path))
    context.check_privatekey()
    context.load_verify_locations(str(ca_path))
    context.set_verify(SSL.VERIFY_PEER)
    return context


async def serve_dtls(
    sock: socket.socket,
    context: SSL.Context,
    host: SessionHost,
    queue_size: int = 10,
    *,
    restore: list[SavedDtlsSession] | None = None,
    task_status: trio.TaskStatus[UdpEndpoint] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve DTLS devices on the bound UDP socket ``sock`` until cancelled; reports the
    running :class:`UdpEndpoint` (its ``stats`` count drops and discards).
    ``queue_size``: datagrams kept per peer not yet read (the rest are dropped).
    ``restore``: sessions saved by the previous process, restored before the first read."""
    endpoint = UdpEndpoint(sock, context, host, queue_size=queue_size)
    endpoint.to_restore = list(restore or ())
    await endpoint.serve(task_status=task_status)
