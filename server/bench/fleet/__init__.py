"""The fleet benchmark behind ``ota bench fleet``: a real server, thousands of emulated
devices in load-generator processes, handshake rates, session memory, an immediate release
and an nginx baseline. It ships in the package, so an installed ``ota`` runs it; the
write-up and the results of past runs are in the repository's ``bench/fleet/``.

Modules (all under ``server.bench.fleet``): ``runner`` (orchestration, the result),
``options`` (what to run), ``phases`` (handshakes, fleet and release, nginx), ``figures``
(the measurements summed up), ``control`` (the runner's handles on the server and the load
generators), ``loadgen`` (the load-generator process), ``loadgen_spec`` (its spec),
``bare_handshakes`` and ``fleet_driver`` (its handshake rounds and emulated fleet),
``lines`` (the JSON-lines pipe protocol), ``procs`` (child
processes, /proc readings), ``images`` (benchmark firmware and provisioning),
``nginx_baseline`` (nginx and its HTTPS clients), ``profile`` (py-spy sampling),
``report`` (JSON, PNG plot, rich table, progress), and for ``ota bench hold`` (sessions held
at once for a while) ``hold`` (its orchestration, samples and result) and ``holder`` (the
load generator's held devices).
"""

from __future__ import annotations

import trio

from otacore.errors import OtaError


class BenchError(OtaError):
    """The benchmark could not run or finish a phase (the message says which and why)."""


def error_text(exc: BaseException) -> str:
    """``Type: message``, with the underlying error when one caused it (trio wraps socket
    and TLS errors in BrokenResourceError)."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    cause = exc.__cause__ or exc.__context__
    if cause is not None and not isinstance(exc, trio.TooSlowError):
        text += f" ({type(cause).__name__}: {cause})"
    return text[:200]
