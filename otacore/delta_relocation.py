"""Relocation models: how branch targets and pointers moved between two images.

The maker (otacore.delta_maker) observes, on the copies it found, each branch target's and
pointer's delta, fits a piecewise-constant map to them (:func:`fit_map`) and finds the old
image's load address from its pointers (:func:`detect_base`); the map is sent in the patch's
prelude (otacore.delta, "Prelude"), and the filter walk (ext/delta_filter.h) predicts with it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from numpy.typing import NDArray

from otacore.delta import put_varint, zigzag


def fit_map(
    keys: NDArray[np.int64], deltas: NDArray[np.int64], *, cap: int, zero_default: bool
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """A piecewise-constant map (sorted keys, deltas) agreeing with most observations.

    Observations sorted by key fall into runs of equal delta. A short run (fewer than
    ``min_run`` observations) between two runs of the same delta is noise, such as a constant
    that happens to look like a pointer: it is dropped and its neighbours merge. Each remaining
    run of at least ``min_run`` whose delta differs from the one in force starts an entry;
    what the map gets wrong is left to the difference bytes. ``min_run`` grows until the map
    has at most ``cap`` entries. With ``zero_default`` the delta before the first entry is 0.
    """
    empty = np.empty(0, dtype=np.int64)
    if keys.shape[0] == 0 or cap <= 0:
        return empty, empty
    k, d = _sort_pairs(keys, deltas)
    starts = np.concatenate(([0], np.flatnonzero(d[1:] != d[:-1]) + 1))
    base_counts = np.diff(np.concatenate((starts, [k.shape[0]])))
    base_keys, base_deltas = k[starts], d[starts]
    initial = 0 if zero_default else np.iinfo(np.int64).min
    min_run = 2
    while True:
        rk, rd, rc = _smooth_runs(base_keys, base_deltas, base_counts, min_run)
        chosen = rc >= min_run
        rk, rd, rc = rk[chosen], rd[chosen], rc[chosen]
        # One entry per key: the run with most observations (then the first) wins.
        by_key = np.lexsort((-rc, rk))
        _, first = np.unique(rk[by_key], return_index=True)
        pick = np.sort(by_key[first])
        rk, rd = rk[pick], rd[pick]
        # An entry repeating the delta already in force adds nothing.
        keep = rd != np.concatenate(([initial], rd[:-1]))
        if int(keep.sum()) <= cap:
            return rk[keep].astype(np.int64), rd[keep].astype(np.int64)
        min_run = min_run * 3 // 2 + 1


def _sort_pairs(
    keys: NDArray[np.int64], deltas: NDArray[np.int64]
) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
    """Observations sorted by key, then delta."""
    low = int(keys.min())
    if int(keys.max()) - low < 1 << 32 and -(1 << 31) <= int(deltas.min()) <= int(deltas.max()) < (
        1 << 31
    ):
        # One sort of packed 64-bit (key, delta) values is several times faster than lexsort.
        packed = ((keys - low).astype(np.uint64) << np.uint64(32)) | (deltas + (1 << 31)).astype(
            np.uint64
        )
        packed.sort()
        return (packed >> np.uint64(32)).astype(np.int64) + low, (
            packed & np.uint64(0xFFFFFFFF)
        ).astype(np.int64) - (1 << 31)
    order = np.lexsort((deltas, keys))
    return keys[order], deltas[order]


def _smooth_runs(
    keys: NDArray[np.int64], deltas: NDArray[np.int64], counts: NDArray[np.int64], min_run: int
) -> tuple[NDArray[np.int64], NDArray[np.int64], NDArray[np.int64]]:
    """Drop short runs lying between two runs of equal delta and merge those neighbours."""
    while keys.shape[0] > 2:
        noise = np.zeros(keys.shape[0], dtype=bool)
        noise[1:-1] = (counts[1:-1] < min_run) & (deltas[:-2] == deltas[2:])
        noise[1:] &= ~noise[:-1]  # never two neighbours in one pass
        if not noise.any():
            break
        keys, deltas, counts = keys[~noise], deltas[~noise], counts[~noise]
        head = np.concatenate(([True], deltas[1:] != deltas[:-1]))
        group = np.cumsum(head) - 1
        counts = np.bincount(group, weights=counts).astype(np.int64)
        keys, deltas = keys[head], deltas[head]
    return keys, deltas, counts


def detect_base(
    words: tuple[NDArray[np.int64], NDArray[np.int64]],
    branches: tuple[NDArray[np.int64], NDArray[np.int64]],
    *,
    thumb: bool,
    image_size: int,
) -> int | None:
    """The load address of the old image, if its pointers give it away.

    ``words`` and ``branches`` are (old value, delta) and (old target, delta) observations;
    only those that moved count (constants stay put). A function pointer holds base + the
    function's image offset (+1 for Thumb), so the right base turns many moved pointers into
    moved branch targets. Candidates are the 256-aligned differences between a few pointers
    and all targets (load addresses are sector-aligned) that recur most; the one hitting the
    most targets wins if it is well ahead of the next.
    """
    values, value_deltas = words
    targets, target_deltas = branches
    keep = value_deltas != 0
    if thumb:
        keep &= (values & 1) == 1
    values = np.unique(values[keep] - (1 if thumb else 0))
    targets = np.unique(targets[(target_deltas != 0) & (targets >= 0) & (targets < image_size)])
    if values.shape[0] == 0 or targets.shape[0] == 0:
        return None
    sample = values[:: max(1, values.shape[0] // 32)]
    candidates = (sample[:, None] - targets[None, :]).ravel()
    candidates = candidates[
        (candidates & 0xFF == 0) & (candidates >= 0) & (candidates + image_size <= 1 << 32)
    ]
    if candidates.shape[0] == 0:
        return None
    # The right base recurs once per sampled pointer; score only the most recurrent few.
    candidates, recurrence = np.unique(candidates, return_counts=True)
    candidates = candidates[np.argsort(-recurrence, kind="stable")[:16]]
    probes = values[:: max(1, values.shape[0] // 2000)]
    hits = probes[None, :] - candidates[:, None]
    at = np.minimum(np.searchsorted(targets, hits), targets.shape[0] - 1)
    scores = np.count_nonzero(targets[at] == hits, axis=1)
    order = np.argsort(-scores, kind="stable")
    best = int(scores[order[0]])
    runner_up = int(scores[order[1]]) if order.shape[0] > 1 else 0
    if best >= 4 and best >= 2 * runner_up:
        return int(candidates[order[0]])
    return None


def encode_map(out: bytearray, keys: NDArray[np.int64], deltas: NDArray[np.int64]) -> None:
    put_varint(out, int(keys.shape[0]))
    previous: int | None = None
    for key, delta in zip(keys.tolist(), deltas.tolist(), strict=True):
        put_varint(out, zigzag(key) if previous is None else key - previous)
        put_varint(out, zigzag(delta))
        previous = key


EMPTY_MAP = (np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64))
#: (filters, base, image_size, relocation map, value map): what the walk needs (delta_filter.h).
Model = tuple[int, int, int, tuple[NDArray[np.int64], NDArray[np.int64]], Any]
