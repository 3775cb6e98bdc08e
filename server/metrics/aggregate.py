"""The installation's metrics as one exposition: this process's values plus those its
worker processes wrote (prometheus-client's multiprocess files), summed series by series.

prometheus-client's :class:`~prometheus_client.multiprocess.MultiProcessCollector` merges
the workers' files (counters and histograms summed, ``livesum`` gauges summed over the live
processes); this module adds the main process's in-memory values to that merge, so the main
process needs no multiprocess mode of its own (it works whatever imported prometheus-client
first, and its hot paths keep the cheaper in-memory values).
"""

from __future__ import annotations

import glob
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from server.metrics import REGISTRY

#: A fresh directory per server run holds the workers' files (see make_worker_dir).
WORKER_DIR_PREFIX = "ota-metrics-"


def make_worker_dir() -> Path:
    """A new private directory (0700, under ``$TMPDIR``) for this run's worker metric files:
    empty at start by construction, never shared with another run or another node of the
    installation (nodes may share a data directory)."""
    return Path(tempfile.mkdtemp(prefix=WORKER_DIR_PREFIX))


def remove_worker_dir(directory: Path) -> None:
    """Delete a directory :func:`make_worker_dir` made (at the server's end)."""
    shutil.rmtree(directory, ignore_errors=True)


def worker_exited(directory: Path, pid: int) -> None:
    """A worker process exited: its live gauges leave the sums (its counters stay)."""
    mark_process_dead(pid, str(directory))


def merge_families(families: Iterable[Metric]) -> list[Metric]:
    """Families of the same name summed sample by sample (name and labels); ``_created``
    samples, which no sum keeps meaning, are left out. Sample order is the first seen."""
    merged: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for family in families:
        if family.name not in merged:
            merged[family.name] = Metric(family.name, family.documentation, family.type,
                                         family.unit)
            values[family.name] = {}
        sums = values[family.name]
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            key = (sample.name, tuple(sorted(sample.labels.items())))
            sums[key] = sums.get(key, 0.0) + sample.value
    for name, family in merged.items():
        for (sample_name, labels), value in values[name].items():
            family.add_sample(sample_name, dict(labels), value)
    return list(merged.values())


class InstallationCollector(Collector):
    """This process's :data:`~server.metrics.REGISTRY` plus the files of the worker
    processes in ``worker_dir`` (None: a single-process server)."""

    def __init__(self, worker_dir: Path | None) -> None:
        self.worker_dir = worker_dir

    def collect(self) -> Iterator[Metric]:
        """Every family, summed over the processes."""
        families: list[Metric] = list(REGISTRY.collect())
        if self.worker_dir is not None:
            files = glob.glob(os.path.join(self.worker_dir, "*.db"))
            families += MultiProcessCollector.merge(files, accumulate=True)
        yield from merge_families(families)


def exposition(worker_dir: Path | None, accept: str | None) -> tuple[bytes, str]:
    """The text exposition (Prometheus text format, or OpenMetrics when ``accept`` asks for
    it) and its content type. Reads files: call it from a thread."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(InstallationCollector(worker_dir))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
