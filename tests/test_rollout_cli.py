"""``ota rollout ...`` and ``ota product window ...`` against a real server over HTTP (issue
15's CLI contract): create prints the rollout with an ``id``; show --json has ``state``,
total and per-phase ``counts`` and the reason of a pause or abort; pause, resume, abort;
windows set, shown and cleared; refusals and bad input exit non-zero with the server's
message."""

from __future__ import annotations

import json
import threading
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from otacore.module import build_module
from server.cli.main import app
from server.client import ApiClient

runner = CliRunner()
PRODUCT = "cli-rollouts"
DEVICES = [f"c0{i:022x}" for i in range(1, 11)]


def _ota(server: Any, *args: str, token: str | None = None) -> Any:
    env = {"OTA_API_URL": server.url, "OTA_TOKEN": token or server.token,
           "OTA_PRODUCT": PRODUCT, "COLUMNS": "200"}  # rich tables unfolded
    return runner.invoke(app, list(args), env=env)


def _json(server: Any, *args: str) -> Any:
    result = _ota(server, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def _setup(server: Any, tmp_path: Path) -> None:
    """The product with firmware v1 and v2 (neither seen running), ten devices and a group
    "canary" (once per module: the tests share the server)."""
    if _ota(server, "group", "list").exit_code == 0:
        return
    created = _json(server, "product", "create", "CLI Rollouts", "--platform-id", "13",
                    "--api-url", server.url, "--token", server.token)
    assert created["slug"] == PRODUCT
    for version in (1, 2):
        image = build_module(bytes([version]) * 3000, platform_id=13, function=5, version=6,
                             product_id=13, product_version=version)
        path = tmp_path / f"v{version}.bin"
        path.write_bytes(image)
        _json(server, "firmware", "upload", str(path), "--version", str(version),
              "--title", f"v{version}")
    for device in DEVICES:
        _json(server, "device", "add", device)
    _json(server, "group", "create", "canary")


def test_rollout_flow_through_the_cli(threaded_server: Any, tmp_path: Path) -> None:
    server = threaded_server
    _setup(server, tmp_path)

    unforced = _ota(server, "rollout", "create", "2", "--phases", "10,50,100")
    assert unforced.exit_code == 1 and "force" in unforced.output
    rollout = _json(server, "rollout", "create", "2", "--phases", "10,50,100",
                    "--phase-wait", "30", "--max-failure-percent", "20", "--min-sample", "2",
                    "--on-failure", "abort", "--max-per-minute", "5", "--force")
    rid = str(rollout["id"])
    assert rollout["state"] == "running" and rollout["version"] == 2
    assert rollout["criteria"][0] == {"percent": 20.0, "min_sample": 2, "action": "abort",
                                      "scope": "phase", "kinds": rollout["criteria"][0]["kinds"]}
    assert rollout["policy"]["phase_wait_ms"] == 30 * 60_000
    assert rollout["rate_per_minute"] == 5

    shown = _json(server, "rollout", "show", rid)
    assert shown["id"] == rollout["id"] and shown["state"] == "running"
    assert shown["counts"]["total"] == len(DEVICES)
    assert [p["phase"] for p in shown["phases"]] == [1, 2, 3]
    assert sum(p["counts"]["total"] for p in shown["phases"]) == len(DEVICES)
    assert shown["reason"] is None

    paused = _ota(server, "rollout", "pause", rid, "--reason", "looking at crash logs")
    assert paused.exit_code == 0, paused.output
    assert f"rollout {rid}: paused (looking at crash logs)" in paused.output
    shown = _json(server, "rollout", "show", rid)
    assert shown["state"] == "paused" and shown["reason"] == "looking at crash logs"
    view = _ota(server, "rollout", "show", rid)
    assert view.exit_code == 0 and "paused" in view.output and "looking at crash logs" in \
        view.output
    twice = _ota(server, "rollout", "pause", rid)
    assert twice.exit_code == 1 and "error:" in twice.output

    resumed = _ota(server, "rollout", "resume", rid)
    assert resumed.exit_code == 0 and f"rollout {rid}: running" in resumed.output
    # A second rollout of the product default is refused while this one is active.
    clash = _ota(server, "rollout", "create", "1", "--phases", "100", "--force")
    assert clash.exit_code == 1 and f"rollout {rid}" in clash.output

    aborted = _ota(server, "rollout", "abort", rid, "--reason", "bad build")
    assert aborted.exit_code == 0 and "aborted (bad build)" in aborted.output
    final = _json(server, "rollout", "show", rid)
    assert final["state"] == "aborted" and final["reason"] == "bad build"
    # --watch on a finished rollout draws the view once and returns.
    watched = _ota(server, "rollout", "show", rid, "--watch", "--interval", "0.2")
    assert watched.exit_code == 0 and "aborted" in watched.output
    assert "bad build" in watched.output

    group_rollout = _json(server, "rollout", "create", "2", "--phases", "#1,all",
                          "--groups", "canary", "--force")
    assert group_rollout["groups"] == ["canary"]
    listed = _json(server, "rollout", "list")
    assert [r["id"] for r in listed] == [group_rollout["id"], rollout["id"]]
    table = _ota(server, "rollout", "list")
    assert table.exit_code == 0 and "aborted" in table.output and "canary" in table.output
    # The group "canary" holds no device: its rollout completed at once.
    assert [r["state"] for r in listed] == ["completed", "aborted"]
    assert _json(server, "rollout", "list", "--state", "running,paused") == []
    assert [r["id"] for r in _json(server, "rollout", "list", "--state", "completed")] == [
        group_rollout["id"]]
    assert [r["id"] for r in _json(server, "rollout", "list", "--state", "aborted")] == [
        rollout["id"]]


def test_rollout_cli_refusals_and_bad_input(threaded_server: Any, tmp_path: Path) -> None:
    server = threaded_server
    _setup(server, tmp_path)
    bad_choice = _ota(server, "rollout", "create", "2", "--phases", "100",
                      "--on-failure", "explode")
    assert bad_choice.exit_code == 2 and "explode" in bad_choice.output
    for args, message in (
        (("rollout", "create", "2", "--phases", "50,10", "--force"), "phase"),
        (("rollout", "create", "2", "--phases", "100", "--groups", "ghosts", "--force"),
         "does not exist"),
        (("rollout", "create", "2", "--phases", "100", "--on-failure", "abort", "--force"),
         "max_failure_percent"),
        (("rollout", "show", "999999"), "no rollout 999999"),
        (("rollout", "show", "abc"), "positive whole number"),
        (("rollout", "list", "--state", "sleeping"), "sleeping"),
        (("rollout", "resume", "999999"), "no rollout 999999"),
        (("product", "window", "set", "--cron", "0 2 * *", "--duration", "60"), "five fields"),
        (("product", "window", "set", "--cron", "0 2 * * *", "--duration", "60",
          "--timezone", "Mars/Base"), "unknown time zone"),
    ):
        result = _ota(server, *args)
        assert result.exit_code == 1, (args, result.output)
        assert result.output.startswith("error: ") and message in result.output, (
            args, result.output)
    elsewhere = _ota(server, "rollout", "show", "1", "--product", "no-such-product")
    assert elsewhere.exit_code == 1 and "not found" in elsewhere.output
    watch_json = _ota(server, "rollout", "show", "1", "--watch", "--json")
    assert watch_json.exit_code == 2 and "poll" in watch_json.output


def test_windows_and_roles_through_the_cli(threaded_server: Any, tmp_path: Path) -> None:
    server = threaded_server
    _setup(server, tmp_path)
    none = _ota(server, "product", "window", "show")
    assert none.exit_code == 0 and "no maintenance windows" in none.output

    set_ = _ota(server, "product", "window", "set", "--cron", "0 2 * * *", "--duration", "120",
                "--timezone", "Europe/Berlin")
    assert set_.exit_code == 0, set_.output
    assert "product window: cron '0 2 * * *' for 120 min (Europe/Berlin)" in set_.output
    group = _json(server, "product", "window", "set", "--cron", "30 1 * * 6", "--duration",
                  "60", "--group", "canary")
    assert group["group"] == "canary" and group["timezone"] == "UTC"
    shown = _json(server, "product", "window", "show")
    assert shown["window"]["cron"] == "0 2 * * *" and shown["window"]["duration"] == 120
    assert [w["group"] for w in shown["groups"]] == ["canary"]
    table = _ota(server, "product", "window", "show")
    assert table.exit_code == 0 and "Europe/Berlin" in table.output

    bad = _ota(server, "product", "window", "set", "--cron", "0 2 * * *", "--duration", "60",
               "--timezone", "Mars/Base")
    assert bad.exit_code == 1 and "unknown time zone" in bad.output
    bad = _ota(server, "product", "window", "set", "--cron", "0 2 * *", "--duration", "60")
    assert bad.exit_code == 1 and "five fields" in bad.output

    viewer = server.handle.fleet.create_api_token_sync("viewer").access_token
    refused = _ota(server, "product", "window", "clear", token=viewer)
    assert refused.exit_code == 1 and "products:update" in refused.output
    refused = _ota(server, "rollout", "create", "2", "--phases", "100", "--force",
                   token=viewer)
    assert refused.exit_code == 1 and "firmware:release" in refused.output
    assert _ota(server, "product", "window", "show", token=viewer).exit_code == 0

    cleared = _ota(server, "product", "window", "clear", "--group", "canary")
    assert cleared.exit_code == 0 and "group canary" in cleared.output
    cleared = _ota(server, "product", "window", "clear")
    assert cleared.exit_code == 0, cleared.output
    again = _ota(server, "product", "window", "clear")
    assert again.exit_code == 1 and "has no maintenance window" in again.output


def test_scheduled_rollout_and_a_watch_that_sees_it_end(
    threaded_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = threaded_server
    _setup(server, tmp_path)
    for rollout in _json(server, "rollout", "list"):
        if rollout["state"] not in ("aborted", "completed"):
            _ota(server, "rollout", "abort", str(rollout["id"]))
    scheduled = _json(server, "rollout", "create", "2", "--phases", "50,100", "--force",
                      "--start-at", "2099-12-24T02:00+01:00", "--reboot-timeout", "20",
                      "--backoff-failures", "2", "--backoff-minutes", "90",
                      "--success-percent", "95", "--failure-scope", "both",
                      "--max-failure-percent", "10", "--max-per-minute", "10",
                      "--rate-increment-factor", "2", "--rate-increase-after", "5")
    rid = str(scheduled["id"])
    assert scheduled["state"] == "scheduled"
    assert scheduled["policy"]["start_at"] == datetime(2099, 12, 24, 1, 0, tzinfo=UTC
                                                       ).timestamp() * 1000
    assert [c["scope"] for c in scheduled["criteria"]] == ["phase", "rollout"]
    assert scheduled["policy"]["reboot_timeout_ms"] == 20 * 60_000
    naive = _ota(server, "rollout", "create", "2", "--phases", "100", "--start-at",
                 "2099-12-24T02:00")
    assert naive.exit_code == 2  # a time without its offset is ambiguous: refused

    # --watch polls until the rollout ends: abort it once the watch has drawn it running.
    polled = threading.Event()
    get_rollout = ApiClient.get_rollout

    def observed(self: ApiClient, product: str, rollout_id: str | int) -> Any:
        answer = get_rollout(self, product, rollout_id)
        polled.set()
        return answer

    monkeypatch.setattr(ApiClient, "get_rollout", observed)
    watched: dict[str, Any] = {}
    watcher = threading.Thread(target=lambda: watched.update(
        result=_ota(server, "rollout", "show", rid, "--watch", "--interval", "0.2")))
    watcher.start()
    assert polled.wait(60), "the watch never asked for the rollout"
    aborted = _ota(server, "rollout", "abort", rid, "--reason", "not this year")
    assert aborted.exit_code == 0, aborted.output
    watcher.join(60)
    assert not watcher.is_alive(), "the watch did not end when the rollout aborted"
    assert watched["result"].exit_code == 0, watched["result"].output
    assert "not this year" in watched["result"].output
