"""``ota bench hold`` / ``server.bench.fleet.hold``: a tiny end-to-end hold (a real ``ota
server`` with two processes, two load generators, both transports, devices pinging), the
keep-alive probe's CoAP, and the option checks."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from otacore.coap import (
    Code,
    Message,
    MessageType,
    TcpFrameReader,
    decode_udp,
    encode_tcp,
    encode_udp,
)
from server.bench.fleet import BenchError
from server.bench.fleet.hold import HoldOptions, rss_trend, run_hold
from server.bench.fleet.holder import HoldSettings, KeepAliveProbe, _SessionEnded

DEVICES = 20


def _processes_mentioning(text: str) -> list[str]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if text in cmdline:
            found.append(cmdline)
    return found


async def test_tiny_hold_holds_every_device_on_both_transports(tmp_path: Path) -> None:
    out = tmp_path / "hold.json"
    lines: list[str] = []
    options = HoldOptions(
        devices=DEVICES,
        transport="both",
        procs=2,
        server_procs=2,
        hold_seconds=3.0,
        sample_interval=1.0,
        # Pings every second; a slow answer is counted as missed but never drops a device
        # (max_missed is out of reach), so the outcome does not depend on the machine's speed.
        settings=HoldSettings(keepalive_interval=1.0, keepalive_timeout=0.5, max_missed=10**6),
        out_path=out,
        work_parent=tmp_path,
    )
    result = await run_hold(options, lines.append)

    assert _processes_mentioning(str(tmp_path)) == []  # server, workers, load generators
    assert [p for p in tmp_path.iterdir() if p.name.startswith("ota-bench-hold-")] == []
    assert json.loads(out.read_text()) == result
    assert lines[0] == f"seed {result['seed']}"  # printed before anything random ran
    assert (result["devices"], result["procs"], result["server_procs"]) == (DEVICES, 2, 2)
    assert result["ramp_end"] == "done" and result["ramp_s"] > 0
    assert result["every_device_held"] is True
    assert result["connected_min"] == result["connected_at_end"] == DEVICES
    assert result["server_sessions_min"] == result["server_sessions_max"] == DEVICES
    assert sum(result["server_sessions_by_process"]) == DEVICES
    assert result["drops"] == result["reconnects"] == 0 and result["drop_reasons"] == {}
    assert result["held_seconds"] >= 3.0
    samples = result["samples"]
    assert len(samples) >= 4  # at 0, 1, 2 and 3 s of the hold
    for sample in samples:
        assert sample["server_sessions"] == sample["connected"] == DEVICES
        assert sample["connected_tcp"] == sample["connected_udp"] == DEVICES // 2
        assert sample["server_rss_kib"] > 0 and sample["loadgen_rss_kib"] > 0
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    # Every device pinged during the hold and the server answered (or was late).
    assert samples[-1]["pings_sent"] >= DEVICES
    assert result["pings_answered"] + result["pings_missed"] <= (
        result["pings_sent"] + result["pings_awaited_at_start"])  # answers to earlier pings
    assert result["pings_answered"] > 0
    assert result["server_rss_growth_pct"] is not None
    assert result["loadgen_rss_growth_pct"] is not None
    assert result["server_rss_per_session_kib"] is not None
    for trend in (result["server_rss_trend"], result["loadgen_rss_trend"]):
        assert set(trend) == {
            "growth_pct", "settled_from_s", "settled_growth_pct", "spread_pct",
            "slope_kib_per_min",
        }  # fmt: skip
    assert result["server_cpu_per_s"] >= 0 and result["loadgen_cpu_per_s"] >= 0
    assert result["notes"] == []


def _tcp_messages(data: list[bytes]) -> list[Message]:
    reader = TcpFrameReader()
    return [message for piece in data for message in reader.feed(piece)]


def test_tcp_probe_sends_csm_then_ping_and_matches_pong() -> None:
    probe = KeepAliveProbe("tcp", 0x1234)
    first = _tcp_messages(probe.first())
    assert [m.code for m in first] == [Code.CSM, Code.PING]  # RFC 8323 5.3: CSM first
    assert probe.feed(encode_tcp(Message(MessageType.CON, Code.CSM))) == (False, [])
    answered, replies = probe.feed(encode_tcp(Message(MessageType.CON, Code.PONG, token=b"\1")))
    assert answered and replies == []
    # The server's own ping is answered with a Pong echoing its token (RFC 8323 5.4).
    answered, replies = probe.feed(encode_tcp(Message(MessageType.CON, Code.PING, token=b"ab")))
    assert not answered
    (pong,) = _tcp_messages(replies)
    assert (pong.code, pong.token) == (Code.PONG, b"ab")
    # A frame split across two reads still completes.
    pong_bytes = encode_tcp(Message(MessageType.CON, Code.PONG, token=b"\2"))
    assert probe.feed(pong_bytes[:1]) == (False, [])
    assert probe.feed(pong_bytes[1:])[0] is True
    with pytest.raises(_SessionEnded, match="released"):
        probe.feed(encode_tcp(Message(MessageType.CON, Code.RELEASE)))
    with pytest.raises(_SessionEnded, match="malformed"):
        KeepAliveProbe("tcp", 1).feed(b"\xff" * 8)


def test_udp_probe_matches_the_ack_of_its_own_ping_only() -> None:
    probe = KeepAliveProbe("udp", 0xFFFF)
    (datagram,) = probe.first()
    ping = decode_udp(datagram)
    assert (ping.type, ping.code, ping.message_id) == (MessageType.CON, Code.EMPTY, 0xFFFF)
    other = encode_udp(Message(MessageType.ACK, Code.EMPTY, 0x1111))
    assert probe.feed(other) == (False, [])
    ack = encode_udp(Message(MessageType.ACK, Code.EMPTY, 0xFFFF))
    assert probe.feed(ack) == (True, [])
    assert probe.feed(ack) == (False, [])  # a duplicate answers nothing more
    (second,) = probe.ping()
    assert decode_udp(second).message_id == 0  # ids wrap at 16 bits
    assert probe.feed(encode_udp(Message(MessageType.RST, Code.EMPTY, 0))) == (True, [])
    # The server's CON (its ping, or a request a held device does not serve): an empty RST.
    answered, (reply,) = probe.feed(encode_udp(Message(MessageType.CON, Code.EMPTY, 77)))
    rst = decode_udp(reply)
    assert not answered and (rst.type, rst.code, rst.message_id) == (MessageType.RST, 0, 77)
    assert probe.feed(b"\x00") == (False, [])  # malformed: ignored (RFC 7252 4.2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"devices": 40_000, "procs": 2}, "19,000 each"),
        ({"devices": 40_000, "transport": "tcp", "procs": 3, "server_procs": 2}, "procs 3"),
        ({"devices": 10, "procs": 11}, "between 1 and the devices"),
        ({"devices": 10, "hold_seconds": 0}, "--hold-seconds must be positive"),
        ({"devices": 10, "transport": "sctp"}, "tcp, udp or both"),
        (
            {"devices": 10, "settings": HoldSettings(keepalive_interval=150, keepalive_timeout=20)},
            "idle_timeout",
        ),
    ],
)
def test_options_are_checked_with_actionable_messages(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(Exception, match=message) as raised:
        HoldOptions(**fields)  # type: ignore[arg-type]
    assert isinstance(raised.value, BenchError) or "transport" in str(raised.value)


def test_settings_are_checked_and_default_to_enough_processes() -> None:
    with pytest.raises(BenchError, match="shorter than its interval"):
        HoldSettings(keepalive_interval=10, keepalive_timeout=10)
    with pytest.raises(BenchError, match="positive"):
        HoldSettings(connect_timeout=0)
    # An idle timeout raised on the server allows longer keep-alive intervals.
    HoldOptions(
        devices=10,
        settings=HoldSettings(keepalive_interval=150, keepalive_timeout=20),
        device_limits=("idle_timeout=400",),
    )
    big = HoldOptions(devices=100_000)
    assert big.loadgens() == 6 and big.servers() == 4  # 16,667 devices, 12,500 sessions each
    assert HoldOptions(devices=3).loadgens() == 2
    assert HoldSettings.from_request({"keepalive_interval": 30.0, "cmd": "hold_start"}) == (
        HoldSettings(keepalive_interval=30.0)
    )


def test_rss_trend_separates_the_first_keepalive_round_from_a_steady_leak() -> None:
    # Flat after a step in the first minute (each session's first ping builds its state).
    flat = [{"t": t, "rss": 1000 if t < 60 else 1010} for t in range(0, 301, 10)]
    trend = rss_trend(flat, "rss", settled_after=60)
    assert trend["growth_pct"] == 1.0 and trend["spread_pct"] == 1.0
    assert (trend["settled_from_s"], trend["settled_growth_pct"]) == (60, 0.0)
    assert trend["slope_kib_per_min"] == 0.0
    # A leak of 6 KiB a minute shows as such, whatever the step before it.
    leak = [{"t": t, "rss": 1000 + t // 10} for t in range(0, 301, 10)]
    assert rss_trend(leak, "rss", settled_after=60)["slope_kib_per_min"] == 6.0
    # A hold shorter than the settling time: the last sample alone, no slope.
    short = rss_trend(flat[:3], "rss", settled_after=60)
    assert short["settled_from_s"] == 20 and short["slope_kib_per_min"] is None
