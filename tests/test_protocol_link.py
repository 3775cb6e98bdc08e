"""CoapLink: the same request/response API over UDP (RFC 7252) and TCP (RFC 8323)."""

from __future__ import annotations

import random

import pytest

from otacore.coap import Code, Message, MessageType, decode_tcp_stream
from otacore.protocol.link import (
    CoapLink,
    FrameRejected,
    PeerPinged,
    PeerReleased,
    RequestFailed,
    RequestReceived,
    ResponseReceived,
    TcpLink,
    UdpLink,
    make_link,
)


def _pump(src: CoapLink, dst: CoapLink, now: float) -> list[object]:
    events: list[object] = []
    out = src.take_outgoing()
    if isinstance(src, TcpLink):
        out = [b"".join(out)] if out else []
    for data in out:
        events.extend(dst.receive(data, now))
    return events


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_request_and_piggybacked_response(transport: str) -> None:
    server, device = make_link(transport), make_link(transport)  # type: ignore[arg-type]
    _pump(server, device, 0.0)  # TCP: the CSM goes first
    _pump(device, server, 0.0)
    hello = Message(MessageType.CON, Code.POST, payload=b"hi")
    hello.set_uri_path("h")
    token = device.request(hello, 0.0)
    (received,) = _pump(device, server, 0.0)
    assert isinstance(received, RequestReceived) and received.message.uri_path == ["h"]
    server.respond(received.message, Message(MessageType.ACK, Code.CHANGED, payload=b"ok"), 0.0)
    (answer,) = _pump(server, device, 0.0)
    assert isinstance(answer, ResponseReceived) and answer.token == token
    assert answer.message.code == Code.CHANGED and answer.message.payload == b"ok"


def test_udp_request_retransmits_then_fails() -> None:
    link = UdpLink()
    link.request(Message(MessageType.CON, Code.GET), 0.0)
    assert len(link.take_outgoing()) == 1
    now, sent, failures = 0.0, 0, []
    while (deadline := link.next_deadline()) is not None:
        now = deadline
        failures += link.poll(now)
        sent += len(link.take_outgoing())
    assert sent == 4  # MAX_RETRANSMIT (RFC 7252 4.8)
    assert len(failures) == 1 and isinstance(failures[0], RequestFailed)


def test_udp_ping_is_answered() -> None:
    server, device = UdpLink(), UdpLink()
    device.ping(0.0)
    assert _pump(device, server, 0.0) == [PeerPinged()]
    assert len(server.take_outgoing()) == 1


def test_udp_garbage_is_not_fatal() -> None:
    events = UdpLink().receive(b"\xff\x00", 0.0)
    assert len(events) == 1 and isinstance(events[0], FrameRejected) and not events[0].fatal


def test_tcp_sends_csm_first_and_answers_ping() -> None:
    link = TcpLink()
    (csm_bytes,) = link.take_outgoing()
    csm, _ = decode_tcp_stream(csm_bytes)
    assert csm is not None and csm.code == Code.CSM
    ping = TcpLink()
    ping.take_outgoing()
    ping.ping(0.0)
    assert _pump(ping, link, 0.0) == [PeerPinged()]
    pong, _ = decode_tcp_stream(link.take_outgoing()[0])
    assert pong is not None and pong.code == Code.PONG


def test_tcp_release_and_malformed_stream() -> None:
    server, device = TcpLink(), TcpLink()
    server.take_outgoing()
    server.release(30)
    assert _pump(server, device, 0.0) == [PeerReleased(abort=False)]
    events = TcpLink(max_frame_size=1024).receive(b"\xe0\xff\xff", 0.0)  # a 65804-byte frame
    assert len(events) == 1 and isinstance(events[0], FrameRejected) and events[0].fatal


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_stream_split_at_random_points_still_decodes(transport: str) -> None:
    rng = random.Random(7)
    server, device = make_link(transport), make_link(transport)  # type: ignore[arg-type]
    for i in range(20):
        msg = Message(MessageType.CON, Code.POST, payload=bytes([i]) * rng.randrange(1, 3000))
        msg.set_uri_path("e", f"n{i}")
        device.request(msg, 0.0)
    got: list[object] = []
    for data in device.take_outgoing():
        if transport == "tcp":
            cuts = sorted(rng.sample(range(1, len(data)), min(3, len(data) - 1)))
            for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True):
                got += server.receive(data[a:b], 0.0)
        else:
            got += server.receive(data, 0.0)
    requests = [e for e in got if isinstance(e, RequestReceived)]
    assert [r.message.uri_path[1] for r in requests] == [f"n{i}" for i in range(20)]


@pytest.mark.parametrize("transport", ["udp", "tcp"])
def test_a_quiet_link_keeps_no_outbox_nor_awaited_tokens(transport: str) -> None:
    """One link per idle session (issue 14 item 4): once its requests are answered and
    its outbox drained, it holds neither (made again by the next)."""
    server, device = make_link(transport), make_link(transport)  # type: ignore[arg-type]
    _pump(server, device, 0.0)
    _pump(device, server, 0.0)
    for round_ in range(2):
        ask = Message(MessageType.CON, Code.GET)
        ask.set_uri_path("d")
        token = server.request(ask, 1.0 + round_)
        (received,) = [e for e in _pump(server, device, 1.0) if isinstance(e, RequestReceived)]
        device.respond(received.message, Message(MessageType.ACK, Code.CONTENT), 1.0)
        answers = _pump(device, server, 1.0)
        assert [e.token for e in answers if isinstance(e, ResponseReceived)] == [token]
        assert server.take_outgoing() == []
        # Private, on purpose: "nothing held" is what this test pins.
        assert (server._outgoing, server._awaiting) == (None, None)
        assert device._outgoing is None
