"""Waking an idle TLS 1.3 session: rebuilding its AEAD objects from the kept keys and IVs
vs deriving them again from the traffic secrets (what every wake-up cost before).

Run:
  .venv/bin/python -m pytest bench/test_bench_tls13_wake.py --benchmark-enable -q \\
      -p no:cacheprovider

:class:`Tls13RecordLayer` drops its AEAD objects when the idle sweeper rests a quiet
session (``server/transport/tls_idle.py``); a device's next ping wakes it. One real
mutual-auth handshake per suite (pyOpenSSL, memory BIOs) provides the secrets. Every round
is one wake-up of both directions (what a ping and its pong need):

- "kept keys": ``release_ciphers`` then both ciphers rebuilt from the kept 28-44 bytes of
  key and IV per direction (the layer as it is);
- "re-derived": the same, with the kept keys cleared first, so the layer runs
  HKDF-Expand-Label (RFC 8446 7.3) twice per direction, as it did on every wake-up before
  it kept them.

The difference of the two means is the saving per ping of an idle session. The "ping"
groups add sealing a ping record and opening its answer (a client-side layer seals it),
for the saving relative to a whole wake-and-ping.
"""

from __future__ import annotations

import functools
from typing import Any

import pytest

from otacore.records.tls13 import ApplicationData, Tls13RecordLayer
from tests.tls13_peers import SUITE_NAMES, handshake

PING = bytes(8)  # a CoAP-over-TCP Ping is a few bytes (RFC 8323 5.4)


@functools.cache
def _layers(suite: str) -> tuple[Tls13RecordLayer, Tls13RecordLayer]:
    handover = handshake(suite).handover
    server = handover.record_layer()
    device = Tls13RecordLayer(
        handover.suite,
        is_server=False,
        read_secret=handover.write_secret,
        write_secret=handover.read_secret,
        read_seq=handover.write_seq,
    )
    # Both directions used once, so the server's keys are derived and kept.
    device.receive_data(server.send_application_data(b"hello"))
    server.receive_data(device.send_application_data(b"hello"))
    return server, device


def _wake_kept(layer: Tls13RecordLayer) -> None:
    layer.release_ciphers()
    layer._read_cipher()
    layer._write_cipher()


def _wake_rederived(layer: Tls13RecordLayer) -> None:
    layer.release_ciphers()
    layer._read_key_iv = layer._write_key_iv = b""  # as before: nothing kept but secrets
    layer._read_cipher()
    layer._write_cipher()


def _ping_kept(server: Tls13RecordLayer, device: Tls13RecordLayer) -> Any:
    server.release_ciphers()
    events = server.receive_data(device.send_application_data(PING))
    return device.receive_data(server.send_application_data(PING)), events


def _ping_rederived(server: Tls13RecordLayer, device: Tls13RecordLayer) -> Any:
    server.release_ciphers()
    server._read_key_iv = server._write_key_iv = b""
    events = server.receive_data(device.send_application_data(PING))
    return device.receive_data(server.send_application_data(PING)), events


@pytest.mark.parametrize("suite", SUITE_NAMES)
@pytest.mark.parametrize("wake", [_wake_kept, _wake_rederived], ids=["kept-keys", "re-derived"])
def test_bench_wake(benchmark: Any, suite: str, wake: Any) -> None:
    benchmark.group = f"tls13-wake-{suite}"
    server, _ = _layers(suite)
    benchmark(wake, server)
    assert server._read_key_iv and server._write_key_iv


@pytest.mark.parametrize("suite", SUITE_NAMES)
@pytest.mark.parametrize("ping", [_ping_kept, _ping_rederived], ids=["kept-keys", "re-derived"])
def test_bench_wake_and_ping(benchmark: Any, suite: str, ping: Any) -> None:
    benchmark.group = f"tls13-ping-{suite}"
    server, device = _layers(suite)
    answered, received = benchmark(ping, server, device)
    assert answered == [ApplicationData(PING)] and received == [ApplicationData(PING)]
