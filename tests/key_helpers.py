"""Waiting for a server process's key cache (server.devices.key_cache) to hold the store's
keys: a rotation made from the test (a thread, the CLI) reaches an in-process server on the
embedded store at its next stamp check (no event relay runs there), so a test that asserts
on the next Hello or offer waits for that first, on the condition, never a sleep."""

from __future__ import annotations

from functools import partial
from pathlib import Path

import trio

from server.devices.keys import product_key_state
from server.devices.plane import DevicePlane
from server.store import Store


async def keys_caught_up(store: Store, data_dir: Path, plane: DevicePlane | None,
                         product_id: int, *, timeout: float = 30.0) -> None:
    """Return once ``plane``'s key cache holds the product's current key and statements as
    the store has them now (TooSlowError after ``timeout`` seconds)."""
    assert plane is not None, "the server runs no device plane"
    state = await trio.to_thread.run_sync(partial(product_key_state, store, data_dir,
                                                  product_id))
    wanted = (state.key.key_id, len(state.statements))
    with trio.fail_after(timeout):
        while True:
            snapshot = plane.keys.cached(product_id)
            if snapshot is not None and snapshot.stamp == wanted:
                return
            await trio.sleep(0.02)
