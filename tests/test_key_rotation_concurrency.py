"""Key rotations are atomic (issue 13, finding 12): rotations running at the same time, in
threads or in separate processes, each get their own sequence number, the statements stay
contiguous, and a device trusting only the original key can apply every one of them."""

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

PRODUCT = 4242


def _check_chain(data_dir: Path, original_public: bytes, rotations: int) -> None:
    """Sequences 1..N, each once; ``rotations`` introductions; a device catches up on all."""
    statements = [parse_statement(raw) for raw in product_statements(data_dir, PRODUCT)]
    assert [s.sequence for s in statements] == list(range(1, len(statements) + 1))
    introduced = [s for s in statements if s.action is KeyAction.INTRODUCE]
    assert len(introduced) == rotations
    assert len({s.subject_key_id for s in introduced}) == rotations  # no rotation was lost
    store = TrustStore.initial(PRODUCT, [original_public]).catch_up(statements)
    assert store.sequence == len(statements)
    current = product_signing_key(data_dir, PRODUCT)
    assert current.key_id in store.key_ids and len(store.key_ids) <= MAX_PRODUCT_KEYS


def test_concurrent_rotations_in_threads_take_distinct_sequences(tmp_path: Path) -> None:
    original = product_signing_key(tmp_path, PRODUCT)
    threads, per_thread = 6, 4
    start = threading.Barrier(threads)
    sequences: list[int] = []
    errors: list[BaseException] = []

    def rotate() -> None:
        try:
            start.wait()
            for _ in range(per_thread):
                sequences.append(rotate_product_key(tmp_path, PRODUCT).sequence)
        except BaseException as exc:  # surfaced below, with the thread's traceback
            errors.append(exc)

    workers = [threading.Thread(target=rotate) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert not errors, errors
    assert len(sequences) == len(set(sequences)) == threads * per_thread
    _check_chain(tmp_path, original.public_key, threads * per_thread)


def _rotate_in_process(data_dir: str, count: int, start: threading.Barrier) -> None:
    start.wait()
    for index in range(count):
        rotate_product_key(Path(data_dir), PRODUCT)
        if index == 1:  # a withdrawal races the rotations too
            withdrawn = product_statements(Path(data_dir), PRODUCT)
            first = parse_statement(withdrawn[0]).subject_key_id
            # Another process may have withdrawn (or retired) it first.
            with contextlib.suppress(ConflictError):
                withdraw_product_key(Path(data_dir), PRODUCT, first)


def test_concurrent_rotations_in_processes_take_distinct_sequences(tmp_path: Path) -> None:
    original = product_signing_key(tmp_path, PRODUCT)
    context = multiprocessing.get_context("spawn")
    processes, per_process = 4, 5
    start = context.Barrier(processes)
    children = [
        context.Process(target=_rotate_in_process, args=(str(tmp_path), per_process, start))
        for _ in range(processes)
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=120)
    assert [child.exitcode for child in children] == [0] * processes
    _check_chain(tmp_path, original.public_key, processes * per_process)
