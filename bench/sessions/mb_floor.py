"""The floor under a delivered MB: sealing and sending 1 MiB as chunk records (benchmark script).

    .venv/bin/python bench/sessions/mb_floor.py [--chunk 1024] [--repeat 20]

Each figure is CPU seconds of this process per MiB (``time.process_time``, best of
``--repeat``), to set beside ``ota bench fleet``'s server CPU per MB:

- ``aesgcm_seal``: a bare `cryptography` AES-128-GCM seal of each ``--chunk``-byte chunk;
- ``dtls_seal_many``: our ``DtlsRecordLayer.seal_many`` of the same chunks (one call per
  window of 16, as the OTA sender seals a window);
- ``udp_sendto``: the sealed records sent one datagram each over loopback UDP with plain
  ``socket.sendto`` (the kernel's share, received by a socket nobody reads: dropped when full);
- ``tcp_send``: the same bytes written to a loopback TCP socket in windows of 16 records
  (one ``send`` per window), drained by a thread.

Results as JSON on stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from otacore.records.dtls12 import DtlsRecordLayer
from otacore.records.tls12_keys import SUITES, TrafficKeys

MIB = 1 << 20
WINDOW = 16


def best_cpu(call: Callable[[], object], repeat: int) -> float:
    """The least CPU seconds of this process one call took, over ``repeat`` calls."""
    best = float("inf")
    for _ in range(repeat):
        started = time.process_time()
        call()
        best = min(best, time.process_time() - started)
    return best


def main() -> None:
    """Measure and print the per-MiB floors."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    chunks = [os.urandom(args.chunk) for _ in range(MIB // args.chunk)]
    suite = SUITES[0]
    keys = TrafficKeys(suite, os.urandom(16), os.urandom(16), os.urandom(4), os.urandom(4))
    layer = DtlsRecordLayer(keys, is_server=True)
    aead, salt, aad = AESGCM(keys.server_write_key), keys.server_write_iv, bytes(13)

    def bare() -> None:
        for index, chunk in enumerate(chunks):
            aead.encrypt(salt + index.to_bytes(8, "big"), chunk, aad)

    def ours() -> list[bytes]:
        records: list[bytes] = []
        for start in range(0, len(chunks), WINDOW):
            records += layer.seal_many(chunks[start : start + WINDOW])
        return records

    records = ours()
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.connect(sink.getsockname())

    def udp() -> None:
        for record in records:
            with contextlib.suppress(OSError):  # a full sink drops it, as UDP may
                sender.send(record)

    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.create_connection(listener.getsockname())
    server, _ = listener.accept()

    def drain() -> None:
        while server.recv(1 << 16):
            pass

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    windows = [b"".join(records[start : start + WINDOW])
               for start in range(0, len(records), WINDOW)]

    def tcp() -> None:
        for window in windows:
            client.sendall(window)

    result = {"chunk": args.chunk,
              "aesgcm_seal_s_per_mib": best_cpu(bare, args.repeat),
              "dtls_seal_many_s_per_mib": best_cpu(ours, args.repeat),
              "udp_sendto_s_per_mib": best_cpu(udp, args.repeat)}
    # The drain thread's CPU counts in process_time too: the receiving side of loopback TCP.
    result["tcp_send_incl_receiver_s_per_mib"] = best_cpu(tcp, args.repeat)
    client.close()
    drainer.join(timeout=5)
    print(json.dumps({key: round(value, 5) if isinstance(value, float) else value
                      for key, value in result.items()}, indent=2))


if __name__ == "__main__":
    main()
