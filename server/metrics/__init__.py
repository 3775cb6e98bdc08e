"""The server's Prometheus metrics: what each process counts, and the cheap calls that count.

Every server process (the main one and each ``--workers`` worker) counts its own devices,
transfers and store writes in these metrics; the main process's ``/metrics`` endpoint
(:mod:`server.metrics.endpoint`) shows their sum (:mod:`server.metrics.aggregate`).

How the values cross processes: a worker process is started with
``PROMETHEUS_MULTIPROC_DIR`` in its environment (:func:`worker_environment`), so
prometheus-client, when it is first imported there, keeps each value in a memory-mapped
file of that directory (its multiprocess mode). The main process keeps its own values in
memory, and merges them with the files when scraped. Counters of a worker that exited stay
in the sum (its files remain: a counter never goes back when a worker restarts); its gauges
(``multiprocess_mode="livesum"``) leave the sum once the supervisor marks it dead.

Label values are bounded sets fixed here (transports, kinds, results, refusal reasons,
route names): never a device id, an address or a raw URL path.

The counting calls sit on hot paths (every handshake, every session's start and end, every
transfer's progress write): each is one pre-bound child's ``inc``; the bytes of a transfer
are added in batches (at each progress write and at its end), never per chunk
(``bench/test_bench_metrics.py`` measures both).
"""

from __future__ import annotations

import os
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: The environment variable prometheus-client reads at import to choose its multiprocess
#: mode (https://prometheus.github.io/client_python/multiprocess/).
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

#: This process's metrics (not prometheus-client's global registry: a program embedding
#: the server keeps its own metrics apart, and no process_* series of one process pass for
#: the installation's).
REGISTRY = CollectorRegistry(auto_describe=True)

TRANSPORTS = ("tcp", "udp")
#: How a session's security began: a full handshake, a resumed one (a TLS 1.3 ticket or a
#: DTLS session id), or a DTLS session restored after a server restart (no handshake).
HANDSHAKE_KINDS = ("full", "resumed", "restored")
#: The file kinds a module travels as (``otacore.transfer.planner.Encoding``: zstd is
#: shown as "compressed").
FILE_KINDS = ("full", "delta", "compressed")
_FILE_KIND = {"full": "full", "delta": "delta", "zstd": "compressed"}
#: How an update ended (the rollout outcomes' names, ``server.fleet.rollouts``):
#: succeeded (the device booted it and committed), download_failed (the transfer failed
#: for good), image_refused (the device refused the image at the offer, the end of the
#: download or boot), rolled_back (its self-test failed after boot).
UPDATE_RESULTS = ("succeeded", "download_failed", "image_refused", "rolled_back")

SESSIONS = Gauge(
    "ota_sessions", "Live device sessions, by transport (tcp: TLS 1.3, udp: DTLS 1.2).",
    ["transport"], multiprocess_mode="livesum", registry=REGISTRY)
HANDSHAKES = Counter(
    "ota_handshakes", "Device handshakes by transport, kind (full, resumed, restored; "
    "unknown for a failed one) and result (ok, failed: the TLS/DTLS handshake failed or "
    "timed out).", ["transport", "kind", "result"], registry=REGISTRY)
REFUSALS = Counter(
    "ota_device_refusals", "Device connections refused before a session started, by "
    "transport and reason.", ["transport", "reason"], registry=REGISTRY)
BYTES_SENT = Counter(
    "ota_bytes_sent", "OTA file bytes sent to devices, first transmissions only, by the "
    "kind of file: full image, delta patch or compressed (zstd) image.", ["kind"],
    registry=REGISTRY)
BYTES_RETRANSMITTED = Counter(
    "ota_bytes_retransmitted", "OTA file bytes sent again (chunks the device did not "
    "acknowledge in time), by kind of file.", ["kind"], registry=REGISTRY)
RETRANSMITS = Counter(
    "ota_retransmits", "OTA chunks sent again, by transport.", ["transport"],
    registry=REGISTRY)
TRANSFERS_ACTIVE = Gauge(
    "ota_transfers_active", "OTA file transfers in progress.", multiprocess_mode="livesum",
    registry=REGISTRY)
UPDATES = Counter(
    "ota_updates", "Updates that ended, by result (succeeded, download_failed, "
    "image_refused, rolled_back).", ["result"], registry=REGISTRY)
STORE_COMMIT_SECONDS = Histogram(
    "ota_store_commit_seconds", "Seconds a store write transaction took, from its start to "
    "its durable commit (a group commit's batch is one transaction).",
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
             10.0),
    registry=REGISTRY)
HTTP_REQUESTS = Counter(
    "ota_http_requests", "API requests answered, by route name (unmatched: no route) and "
    "HTTP status.", ["route", "status"], registry=REGISTRY)
WORKER_EXITS = Counter(
    "ota_worker_exits", "Worker processes that exited unasked (each is restarted).",
    registry=REGISTRY)
EVENT_HISTORY_DROPPED = Counter(
    "ota_event_history_dropped", "Events not stored in the event history because the "
    "process's history buffer was full (the store slow or unreachable); the live stream "
    "still carried them.", registry=REGISTRY)

# Pre-bound children: a hot path pays one dict lookup and one inc, never labels()'s lock.
_SESSIONS = {transport: SESSIONS.labels(transport) for transport in TRANSPORTS}
_HANDSHAKES_OK = {(transport, kind): HANDSHAKES.labels(transport, kind, "ok")
                  for transport in TRANSPORTS for kind in HANDSHAKE_KINDS}
_HANDSHAKES_FAILED = {transport: HANDSHAKES.labels(transport, "unknown", "failed")
                      for transport in TRANSPORTS}
_BYTES_SENT = {name: BYTES_SENT.labels(kind) for name, kind in _FILE_KIND.items()}
_BYTES_RETRANSMITTED = {name: BYTES_RETRANSMITTED.labels(kind)
                        for name, kind in _FILE_KIND.items()}
_RETRANSMITS = {transport: RETRANSMITS.labels(transport) for transport in TRANSPORTS}
_UPDATES = {result: UPDATES.labels(result) for result in UPDATE_RESULTS}


def session_started(transport: str) -> None:
    """A device session began (registered)."""
    _SESSIONS[transport].inc()


def session_ended(transport: str) -> None:
    """A device session ended (unregistered, or replaced by a newer one)."""
    _SESSIONS[transport].dec()


def handshake_ok(transport: str, kind: str) -> None:
    """A session began after a ``kind`` handshake (see :data:`HANDSHAKE_KINDS`)."""
    _HANDSHAKES_OK[(transport, kind)].inc()


def handshake_failed(transport: str) -> None:
    """A TLS or DTLS handshake failed or timed out."""
    _HANDSHAKES_FAILED[transport].inc()


def refused(transport: str, reason: str) -> None:
    """A connection was refused (``reason``: a ``RefuseReason`` value, a bounded set)."""
    REFUSALS.labels(transport, reason).inc()


def file_bytes(transfer: str, first: int, again: int, chunks_again: int,
               transport: str) -> None:
    """Bytes of a ``transfer`` file ("full", "delta", "zstd") sent since the last call:
    ``first`` sent for the first time, ``again`` in ``chunks_again`` retransmitted chunks."""
    if first:
        _BYTES_SENT[transfer].inc(first)
    if chunks_again:
        _BYTES_RETRANSMITTED[transfer].inc(again)
        _RETRANSMITS[transport].inc(chunks_again)


def update_ended(result: str) -> None:
    """An update ended with ``result`` (one of :data:`UPDATE_RESULTS`)."""
    _UPDATES[result].inc()


def worker_environment(directory: Path) -> dict[str, str]:
    """The environment of a worker process whose metrics go to ``directory`` (this
    process's environment plus prometheus-client's multiprocess directory)."""
    return {**os.environ, MULTIPROC_ENV: str(directory)}


def history_dropped() -> None:
    """An event was not stored in the history: the recorder's buffer was full."""
    EVENT_HISTORY_DROPPED.inc()
