"""Stock clients against the real device server on ephemeral loopback ports.

``openssl s_client`` (TLS 1.3 and DTLS 1.2) and libcoap's ``coap-client`` (Debian package
libcoap3-bin, binary ``coap-client-openssl``) with a provisioned device certificate.
"""

from __future__ import annotations

import os
import shutil

import pytest
import trio

from otacore import coap
from server.authorization import MemoryDeviceDirectory
from server.transport import DeviceServer, DeviceSession, RefuseReason
from server.transport.client import DeviceCredentials
from tests.test_transport_tls import (
    DeviceKit,
    EchoHandler,
    eventually,
    make_device_kit,
    start_device_server,
)

OPENSSL = shutil.which("openssl")
COAP_CLIENT = shutil.which("coap-client-openssl") or shutil.which("coap-client")

pytestmark = pytest.mark.skipif(OPENSSL is None, reason="the openssl binary is not installed")


class ReplyOnceHandler(EchoHandler):
    """Answers the first message with the session's identity, then ends the session."""

    async def run(self, session: DeviceSession) -> None:
        self.sessions.append(session)
        await session.receive()
        await session.send(f"device={session.device_id} transport={session.transport}\n".encode())


class WellKnownCoreHandler(EchoHandler):
    """Just enough CoAP to answer GET /.well-known/core (RFC 6690) with 2.05 Content, over
    UDP (RFC 7252: piggybacked ACK) and TCP (RFC 8323: CSM exchange first)."""

    async def run(self, session: DeviceSession) -> None:
        self.sessions.append(session)
        if session.transport == "udp":
            while True:
                request = coap.decode_udp(await session.receive())
                if request.type == coap.MessageType.CON and request.is_request:
                    response = coap.Message(
                        type=coap.MessageType.ACK,
                        code=self._answer(request),
                        message_id=request.message_id,
                        token=request.token,
                        payload=b"</firmware>",
                    )
                    response.set_content_format(40)  # application/link-format
                    await session.send(coap.encode_udp(response))
        reader = coap.TcpFrameReader()
        while True:
            for request in reader.feed(await session.receive()):
                if request.code == coap.Code.CSM:  # RFC 8323 section 5.3: answer with ours
                    csm = coap.Message(type=coap.MessageType.CON, code=coap.Code.CSM)
                    await session.send(coap.encode_tcp(csm))
                elif request.is_request:
                    response = coap.Message(
                        type=coap.MessageType.CON,
                        code=self._answer(request),
                        token=request.token,
                        payload=b"</firmware>",
                    )
                    response.set_content_format(40)
                    await session.send(coap.encode_tcp(response))

    @staticmethod
    def _answer(request: coap.Message) -> int:
        if request.code == coap.Code.GET and request.uri_path == [".well-known", "core"]:
            return coap.Code.CONTENT
        return coap.Code.NOT_FOUND


@pytest.fixture(scope="module")
def kit(tmp_path_factory: pytest.TempPathFactory) -> DeviceKit:
    return make_device_kit(tmp_path_factory.mktemp("interop-kit"))


async def s_client(
    server: DeviceServer, transport: str, device: DeviceCredentials, stdin: bytes
) -> tuple[int, str]:
    """Run ``openssl s_client`` as ``device``; return its exit status and all its output."""
    assert OPENSSL is not None
    if transport == "tcp":
        assert server.tcp_address is not None
        flags, port = ["-tls1_3", "-alpn", "coap"], server.tcp_address[1]
    else:
        assert server.udp_address is not None
        flags, port = ["-dtls1_2"], server.udp_address[1]
    command = [
        OPENSSL,
        "s_client",
        *flags,
        *("-connect", f"127.0.0.1:{port}"),
        *("-cert", str(device.cert_path), "-key", str(device.key_path)),
        *("-CAfile", str(device.ca_path), "-verify_return_error", "-verify_ip", "127.0.0.1"),
        "-ign_eof",
    ]
    with trio.fail_after(30):
        result = await trio.run_process(
            command, stdin=stdin, capture_stdout=True, capture_stderr=True, check=False
        )
    return result.returncode, (result.stdout + result.stderr).decode(errors="replace")


@pytest.mark.parametrize(("transport", "protocol"), [("tcp", "TLSv1.3"), ("udp", "DTLSv1.2")])
async def test_openssl_s_client_completes_mutual_handshake(
    nursery: trio.Nursery, kit: DeviceKit, transport: str, protocol: str
) -> None:
    handler = ReplyOnceHandler()
    server = await start_device_server(nursery, kit, kit.directory(), handler)
    status, output = await s_client(server, transport, kit.good, b"hello\n")
    assert status == 0, output
    assert "Verify return code: 0 (ok)" in output
    assert protocol in output
    assert f"device={kit.good_id} transport={transport}" in output
    if transport == "tcp":
        assert "ALPN protocol: coap" in output
    assert server.stats.full_handshakes[transport] == 1


@pytest.mark.parametrize("transport", ["tcp", "udp"])
@pytest.mark.parametrize(
    ("which", "reason"),
    [("foreign", RefuseReason.HANDSHAKE_FAILED), ("unknown", RefuseReason.NOT_AUTHORIZED)],
)
async def test_openssl_s_client_with_a_refused_certificate(
    nursery: trio.Nursery, kit: DeviceKit, transport: str, which: str, reason: str
) -> None:
    handler = ReplyOnceHandler()
    server = await start_device_server(nursery, kit, kit.directory(), handler)
    _, output = await s_client(server, transport, getattr(kit, which), b"hello\n")
    assert "device=" not in output
    await eventually(lambda: server.stats.refused[(transport, reason)] == 1)
    assert handler.sessions == []
    _, output = await s_client(server, transport, kit.good, b"hello\n")
    assert f"device={kit.good_id}" in output


@pytest.mark.skipif(COAP_CLIENT is None and not os.environ.get("CI"),
                    reason="libcoap's coap-client is not installed (CI installs it)")
@pytest.mark.parametrize("scheme", ["coaps", "coaps+tcp"])
async def test_libcoap_client_gets_well_known_core(
    nursery: trio.Nursery, kit: DeviceKit, scheme: str
) -> None:
    assert COAP_CLIENT is not None
    directory: MemoryDeviceDirectory = kit.directory()
    handler = WellKnownCoreHandler()
    server = await start_device_server(nursery, kit, directory, handler)
    address = server.udp_address if scheme == "coaps" else server.tcp_address
    assert address is not None
    command = [
        COAP_CLIENT,
        *("-m", "get", "-B", "10"),
        *("-c", str(kit.good.cert_path), "-j", str(kit.good.key_path), "-R", str(kit.good.ca_path)),
        f"{scheme}://127.0.0.1:{address[1]}/.well-known/core",
    ]
    with trio.fail_after(30):
        result = await trio.run_process(
            command, capture_stdout=True, capture_stderr=True, check=False
        )
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    assert result.stdout.strip() == b"</firmware>"  # printed only for a 2.xx answer
    assert [s.device_id for s in handler.sessions] == [kit.good_id]
    assert handler.sessions[0].transport == ("udp" if scheme == "coaps" else "tcp")
