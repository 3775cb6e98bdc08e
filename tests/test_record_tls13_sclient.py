"""`openssl s_client -tls1_3` over a real TCP socket against our handshake + record layer.

pyOpenSSL has no way to make OpenSSL send a KeyUpdate; s_client's ``k`` and ``K`` commands
do (KeyUpdate with update_not_requested / update_requested, RFC 8446 4.6.3). The socket
timeouts only stop a hung test; no assertion depends on time.
"""

from __future__ import annotations

import select
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from otacore.records.tls13 import (
    ApplicationData,
    CloseNotifyReceived,
    KeyUpdateReceived,
    Tls13Event,
    Tls13RecordLayer,
)
from otacore.records.tls13_handover import Tls13Handshake
from tests.tls13_peers import context, pki

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

GUARD_SECONDS = 30.0


def _write_credentials(directory: Path) -> tuple[Path, Path, Path]:
    installation = pki()
    pem = serialization.Encoding.PEM
    ca = directory / "ca.pem"
    cert = directory / "cert.pem"
    key = directory / "key.pem"
    ca.write_bytes(installation.ca.public_bytes(pem))
    cert.write_bytes(installation.device_cert.public_bytes(pem))
    key.write_bytes(
        installation.device_key.private_bytes(
            pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return ca, cert, key


class _Server:
    """Our side of one connection: the accepted socket and the record layer."""

    def __init__(self, connection: socket.socket, layer: Tls13RecordLayer) -> None:
        self.connection = connection
        self.layer = layer
        self.events: list[Tls13Event] = []

    def feed(self, data: bytes) -> None:
        self.events += self.layer.receive_data(data)
        answer = self.layer.data_to_send()  # KeyUpdate answers, close_notify
        if answer:
            self.connection.sendall(answer)

    def receive_until(self, wanted: bytes) -> bytes:
        """Read until the application data received so far ends with ``wanted``."""
        while not self.received().endswith(wanted):
            data = self.connection.recv(65536)
            assert data, f"connection ended before {wanted!r}; events {self.events}"
            self.feed(data)
        return self.received()

    def receive_event(self, wanted: Tls13Event) -> None:
        """Read until ``wanted`` has been received."""
        while wanted not in self.events:
            data = self.connection.recv(65536)
            assert data, f"connection ended before {wanted!r}; events {self.events}"
            self.feed(data)

    def received(self) -> bytes:
        return b"".join(e.data for e in self.events if isinstance(e, ApplicationData))


def _accept_and_take_over(listener: socket.socket) -> _Server:
    connection, _ = listener.accept()
    connection.settimeout(GUARD_SECONDS)
    handshake = Tls13Handshake(context(server=True, export=True), is_server=True)
    while not handshake.complete:
        data = connection.recv(65536)
        assert data, "s_client closed during the handshake"
        handshake.receive_data(data)
        connection.sendall(handshake.data_to_send())  # our flight; at the end, the tickets
    handover = handshake.take_over()
    server = _Server(connection, handover.record_layer())
    server.feed(handover.unprocessed)
    return server


def _read_stdout_until(process: subprocess.Popen[bytes], wanted: bytes) -> bytes:
    assert process.stdout is not None
    seen = b""
    deadline = time.monotonic() + GUARD_SECONDS  # hang guard only
    while wanted not in seen:
        assert time.monotonic() < deadline, f"s_client never printed {wanted!r}: {seen!r}"
        ready, _, _ = select.select([process.stdout], [], [], 1.0)
        if ready:
            chunk = process.stdout.read1(65536)  # type: ignore[attr-defined]
            assert chunk, f"s_client ended before printing {wanted!r}: {seen!r}"
            seen += chunk
    return seen


def test_openssl_s_client_key_updates_both_ways(tmp_path: Path) -> None:
    ca, cert, key = _write_credentials(tmp_path)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(GUARD_SECONDS)
    port = listener.getsockname()[1]
    process = subprocess.Popen(
        [
            "openssl",
            "s_client",
            "-connect",
            f"127.0.0.1:{port}",
            "-tls1_3",
            "-cert",
            str(cert),
            "-key",
            str(key),
            "-CAfile",
            str(ca),
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdin is not None
    try:
        server = _accept_and_take_over(listener)
        layer = server.layer

        def command(line: bytes) -> None:
            assert process.stdin is not None
            process.stdin.write(line)
            process.stdin.flush()

        # s_client reads stdin in raw chunks and treats a chunk starting with a command
        # letter as that command only: each command waits for its effect on the wire.
        # "k": KeyUpdate(update_not_requested), then data under its new key.
        first_read_secret = layer.read_secret
        command(b"k\n")
        server.receive_event(KeyUpdateReceived(False))
        command(b"hello\n")
        server.receive_until(b"hello\n")
        assert layer.read_secret != first_read_secret
        assert layer.read_seq == 1

        # "K": KeyUpdate(update_requested): we must answer before our next record.
        write_secret = layer.write_secret
        server.events.clear()
        command(b"K\n")
        server.receive_event(KeyUpdateReceived(True))
        assert layer.write_secret != write_secret  # our answer went out in feed()
        command(b"again\n")
        server.receive_until(b"again\n")
        server.connection.sendall(layer.send_application_data(b"pong-one\n"))
        _read_stdout_until(process, b"pong-one")

        # We start one with update_requested; s_client follows on its next write.
        server.events.clear()
        server.connection.sendall(
            layer.update_keys(request_peer_update=True) + layer.send_application_data(b"pong-two\n")
        )
        _read_stdout_until(process, b"pong-two")
        command(b"last\n")
        server.receive_until(b"last\n")
        assert server.events[0] == KeyUpdateReceived(False)

        # "Q": s_client closes with close_notify; we answer with ours.
        command(b"Q\n")
        while CloseNotifyReceived() not in server.events:
            data = server.connection.recv(65536)
            assert data, f"no close_notify before EOF; events {server.events}"
            server.feed(data)
        assert layer.closed
        assert process.wait(GUARD_SECONDS) == 0
        server.connection.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        listener.close()
