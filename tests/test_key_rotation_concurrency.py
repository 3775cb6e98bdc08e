"""Key rotations are atomic (issue 13, finding 12), on every node of an installation:
rotations running at the same time, in threads or in separate processes (the nodes of one
PostgreSQL installation included), each get their own sequence number, the statements stay
contiguous, and a device trusting only the original key can apply every one of them. The
store's UNIQUE (product_id, sequence) makes colliding rotations conflict and retry; no lock
file of one data directory is involved."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
from pathlib import Path

from otacore.errors import ConflictError
from otacore.signing import KeyAction, TrustStore, parse_statement
from server.devices.keys import (
    MAX_PRODUCT_KEYS,
    product_signing_key,
    product_statements,
    rotate_product_key,
    withdraw_product_key,
)
from server.events import EventBus
from server.fleet import SYSTEM_ACTOR, Fleet
from server.store import Store
from tests.conftest import _open_store


def _product(store: Store) -> int:
    return Fleet(store, EventBus()).create_product_sync(SYSTEM_ACTOR, "Sensors", 13).id


def _check_chain(store: Store, data_dir: Path, product: int, original_public: bytes,
                 rotations: int) -> None:
    """Sequences 1..N, each once; ``rotations`` introductions; a device catches up on all."""
    statements = [parse_statement(raw) for raw in product_statements(store, product)]
    assert [s.sequence for s in statements] == list(range(1, len(statements) + 1))
    introduced = [s for s in statements if s.action is KeyAction.INTRODUCE]
    assert len(introduced) == rotations
    assert len({s.subject_key_id for s in introduced}) == rotations  # no rotation was lost
    trust = TrustStore.initial(product, [original_public]).catch_up(statements)
    assert trust.sequence == len(statements)
    current = product_signing_key(store, data_dir, product)
    assert current.key_id in trust.key_ids and len(trust.key_ids) <= MAX_PRODUCT_KEYS


def test_concurrent_rotations_in_threads_take_distinct_sequences(
    store: Store, data_dir: Path
) -> None:
    product = _product(store)
    original = product_signing_key(store, data_dir, product)
    threads, per_thread = 6, 4
    start = threading.Barrier(threads)
    sequences: list[int] = []
    errors: list[BaseException] = []

    def rotate() -> None:
        try:
            start.wait()
            for _ in range(per_thread):
                sequences.append(rotate_product_key(store, data_dir, product).sequence)
        except BaseException as exc:  # surfaced below, with the thread's traceback
            errors.append(exc)

    workers = [threading.Thread(target=rotate) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    assert len(sequences) == len(set(sequences)) == threads * per_thread
    _check_chain(store, data_dir, product, original.public_key, threads * per_thread)


def _rotate_in_process(url: str, data_dir: str, product: int, count: int,
                       start: threading.Barrier) -> None:
    """One "node": its own process and store connections on the shared database."""
    store = _open_store(url, Path(data_dir), pool_size=1)
    try:
        start.wait()
        for index in range(count):
            rotate_product_key(store, Path(data_dir), product)
            if index == 1:  # a withdrawal races the rotations too
                withdrawn = product_statements(store, product)
                first = parse_statement(withdrawn[0]).subject_key_id
                # Another process may have withdrawn (or retired) it first.
                with contextlib.suppress(ConflictError):
                    withdraw_product_key(store, Path(data_dir), product, first)
    finally:
        store.close()


def test_concurrent_rotations_in_processes_take_distinct_sequences(
    store: Store, store_url: str, data_dir: Path
) -> None:
    product = _product(store)
    original = product_signing_key(store, data_dir, product)
    context = multiprocessing.get_context("spawn")
    processes, per_process = 4, 5
    start = context.Barrier(processes)
    children = [
        context.Process(target=_rotate_in_process,
                        args=(store_url, str(data_dir), product, per_process, start))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0] * processes
    _check_chain(store, data_dir, product, original.public_key, processes * per_process)
