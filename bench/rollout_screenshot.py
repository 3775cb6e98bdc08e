"""Regenerate the README's screenshot of the rollout progress view
(``ota rollout show ID --watch``): ``docs/rollout-progress.svg``.

It runs a real rollout: the real server (REST API, TLS 1.3 / DTLS 1.2 device plane, OTA
engine) on a temporary data directory, 30 emulated devices on real sockets running v1, and
a v2 that fails its self-test rolled out in phases 10%, 50% and 100% with
``max_failure_percent 20`` and ``on_failure abort``, as in README "Rolling out safely".
Once the rollout aborted and its devices mid-update reported back, the view the CLI draws
from ``GET .../rollouts/ID`` is rendered with rich's own SVG export
(``Console(record=True)``, ``save_svg``).

Run from the repository root::

    .venv/bin/python -m bench.rollout_screenshot [docs/rollout-progress.svg]
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path
from typing import Any

import trio
from rich.console import Console

from otacore.device import make_test_marker
from server.cli.rollout_cmd import progress_view
from tests.test_ota_e2e_kit import APP_V1, STEP, SYSTEM_5003, TRANSPORTS, app, ota_rig, running

DEVICES = 30
OUT = Path("docs/rollout-progress.svg")
POLICY = {"phases": "10,50,100", "max_failure_percent": 20, "on_failure": "abort",
          "force": True}


async def _aborted_rollout(tmp: Path) -> dict[str, Any]:
    async with trio.open_nursery() as nursery, ota_rig(nursery, tmp, count=DEVICES) as rig:
        await rig.upload_device_os(SYSTEM_5003)
        await rig.upload(1, APP_V1)
        await rig.release(1, product_default=True)
        await rig.upload(2, app(2, marker=make_test_marker(selftest_fail_after=0)))
        fleet = rig.fleet([(d, TRANSPORTS[i % 2]) for i, d in enumerate(rig.ids)])
        async with running(fleet):
            response = await rig.api.post(f"/v1/products/{rig.product}/rollouts",
                                          json={"version": 2, **POLICY})
            response.raise_for_status()
            rollout_id = response.json()["rollout"]["id"]
            with trio.fail_after(4 * STEP):
                while True:
                    response = await rig.api.get(
                        f"/v1/products/{rig.product}/rollouts/{rollout_id}")
                    response.raise_for_status()
                    body: dict[str, Any] = response.json()
                    shown: dict[str, Any] = body.get("rollout", body)
                    counts = shown["counts"]
                    settled = not any(counts[k] for k in ("offered", "downloading",
                                                          "rebooting"))
                    if shown["state"] == "aborted" and settled:  # every rollback is in
                        break
                    await trio.sleep(0.2)
        nursery.cancel_scope.cancel()
    return shown


def main(argv: list[str]) -> int:
    """Run the rollout and write the SVG (the path in ``argv``, else ``OUT``)."""
    out = Path(argv[0]) if argv else OUT
    with tempfile.TemporaryDirectory() as tmp:
        shown = trio.run(_aborted_rollout, Path(tmp))
    console = Console(record=True, width=100, file=io.StringIO())
    console.print(progress_view(shown))
    out.parent.mkdir(parents=True, exist_ok=True)
    console.save_svg(str(out), title=f"ota rollout show {shown['id']} --product sensors --watch")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
