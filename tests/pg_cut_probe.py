"""The child side of ``tests/test_pg_silent_cut.py``'s real silent cut: run in a network
namespace of its own (``unshare -n``), it starts a throwaway PostgreSQL cluster there, opens
a store and the event relay's listening connection on it, then takes the namespace's
loopback interface down, which drops every packet without a FIN or RST, as a real cut does
(data sent stays unacknowledged, keep-alive probes go unanswered), and up again. It prints
what it measured as one JSON object on its last line.

Run: ``unshare -n python -m tests.pg_cut_probe WORKDIR`` (as root; nothing outside the new
namespace is touched).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from server.store import Store, StoreUnavailableError
from server.store import schema as t
from server.store.pg_cluster import PgCluster, create_database
from server.store.pg_listen import EventLogListener, ListenerLostError

#: The URL's own bounds (the operator's overrides of server.store.postgresql's defaults),
#: short so the test is quick: 2 s of unacknowledged data, 2 s per connection attempt, an
#: idle connection probed after 1 s, every 1 s, given up after 2 unanswered probes.
BOUNDS = ("?tcp_user_timeout=2000&connect_timeout=2&keepalives_idle=1"
          "&keepalives_interval=1&keepalives_count=2")
#: Longest the probe waits for anything (seconds): far past every bound above.
GIVE_UP = 60.0


def loopback(state: str) -> None:
    subprocess.run(["ip", "link", "set", "lo", state], check=True)


def write(store: Store, key: str) -> None:
    with store.write() as tx:
        tx.conn.execute(sa.insert(t.meta).values(key=key, value="v"))


def keys(store: Store) -> set[str]:
    with store.read() as tx:
        rows = tx.conn.execute(sa.select(t.meta.c.key).where(t.meta.c.key.like("cut-%")))
        return {row[0] for row in rows}


def timed_failure(call: Any) -> tuple[float, str]:
    """Seconds until ``call()`` raised a store error, and its message."""
    began = time.monotonic()
    try:
        call()
    except StoreUnavailableError as exc:
        return time.monotonic() - began, str(exc)
    raise AssertionError("the call went through a cut path")


def listener_loss(listener: EventLogListener) -> tuple[float, str]:
    """Seconds until the idle listening connection was found dead."""
    began = time.monotonic()
    while time.monotonic() - began < GIVE_UP:
        try:
            listener.wait(0.5)
        except ListenerLostError as exc:
            return time.monotonic() - began, str(exc)
    raise AssertionError(f"the listening connection was not found dead in {GIVE_UP} s")


def main(workdir: Path) -> dict[str, Any]:
    loopback("up")
    result: dict[str, Any] = {}
    with PgCluster.start() as cluster:
        url = create_database(cluster.url(), "ota") + BOUNDS
        store = Store.open(url, workdir / "blobs", pool_size=2)
        try:
            write(store, "cut-before")
            listener = EventLogListener.connect(store.engine)
            loopback("down")
            # The idle listening connection, found dead by its keep-alive probes (timed
            # from the cut, in a thread of its own, as the relay waits on it) ...
            lost: list[tuple[float, str]] = []
            watcher = threading.Thread(target=lambda: lost.append(listener_loss(listener)))
            watcher.start()
            # ... while a statement is sent into the dead path (the pool's check of a
            # pooled connection: unacknowledged, then a new connection's attempt).
            result["read"] = timed_failure(lambda: keys(store))
            result["write"] = timed_failure(lambda: write(store, "cut-during"))
            watcher.join(GIVE_UP)
            result["listener"] = lost[0] if lost else None
            listener.close()
            loopback("up")
            began = time.monotonic()
            write(store, "cut-after")
            result["keys"] = sorted(keys(store))
            EventLogListener.connect(store.engine).close()
            result["recovered"] = time.monotonic() - began
        finally:
            loopback("up")
            store.close()
    return result


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]))))
