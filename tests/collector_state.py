"""The test process's cyclic garbage collector: kept as a test found it, or switched off
for a block.

``ota server`` tunes the collector of the process it runs in (server.gc_tuning: thresholds
50000/10/10, then ``gc.freeze()`` once it serves). A test that runs the command in-process
(``CliRunner().invoke(app, ["server", ...])``, e.g. tests/test_api_cli.py's busy-port test)
used to leave those settings to every later test of its pytest worker; objects that only a
collection frees (a trio ``SSLStream`` is a reference cycle) then lived for minutes, and a
powered-off emulated device's TLS session stayed on the server (test_metrics_release under
the full suite). conftest.py's autouse fixture wraps every test in :func:`collector_kept`.

This module holds no tests.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collector_kept() -> Iterator[None]:
    """Restore the collector's thresholds, its on/off state and its frozen objects (those
    frozen inside the block go back into the generations) when the block ends."""
    thresholds = gc.get_threshold()
    enabled = gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        yield
    finally:
        if gc.get_threshold() != thresholds:
            gc.set_threshold(*thresholds)
        if gc.isenabled() != enabled:
            (gc.enable if enabled else gc.disable)()
        if frozen == 0 and gc.get_freeze_count() > 0:
            gc.unfreeze()  # (with objects frozen before the block, there is no telling which)


@contextmanager
def collector_off() -> Iterator[None]:
    """No cyclic garbage collection inside the block: only an explicit close frees a
    socket held in a reference cycle."""
    with collector_kept():
        gc.disable()
        yield
