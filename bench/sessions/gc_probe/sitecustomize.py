"""A garbage-collector probe for benchmark server processes (``plane_ping_cost.py --gc-probe``).

Put this directory on the server's PYTHONPATH with ``GCPROBE_OUT=PREFIX``. The probe times
every collection per generation. SIGUSR1 writes ``PREFIX.<pid>.<n>`` (collections and their
seconds so far, objects tracked, process CPU); the first SIGUSR1 also starts a census of
what each middle or full collection is about to promote, written to
``PREFIX.<pid>.promoted`` at the second. ``GCPROBE_THRESHOLD=a,b,c`` sets gc.set_threshold.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import time
from collections import Counter
from typing import Any

_OUT = os.environ.get("GCPROBE_OUT")
_started: dict[int, float] = {}
_totals: dict[int, list[float]] = {0: [0, 0.0], 1: [0, 0.0], 2: [0, 0.0]}
_promoted: Counter[str] = Counter()
_census_on = False
_signals = 0


def _time_collections(phase: str, info: dict[str, Any]) -> None:
    generation = info["generation"]
    if phase == "start":
        _started[generation] = time.perf_counter()
        if _census_on and generation >= 1:
            # What sits in generation 1 now is promoted by this collection if it lives.
            _promoted.update(type(o).__qualname__ for o in gc.get_objects(1))
    else:
        total = _totals[generation]
        total[0] += 1
        total[1] += time.perf_counter() - _started.pop(generation, time.perf_counter())


def _snapshot(signum: int, frame: object) -> None:
    global _signals, _census_on
    _signals += 1
    with open(f"{_OUT}.{os.getpid()}.{_signals}", "w") as out:
        json.dump({"gc": _totals, "objects": len(gc.get_objects()),
                   "cpu": time.process_time()}, out)
    _census_on = _signals == 1
    if _signals == 2:
        with open(f"{_OUT}.{os.getpid()}.promoted", "w") as out:
            json.dump(_promoted.most_common(30), out, indent=0)


if _OUT:
    gc.callbacks.append(_time_collections)
    signal.signal(signal.SIGUSR1, _snapshot)
    if os.environ.get("GCPROBE_THRESHOLD"):
        gc.set_threshold(*(int(x) for x in os.environ["GCPROBE_THRESHOLD"].split(",")))
