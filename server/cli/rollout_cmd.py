"""``ota rollout ...`` (safe rollouts) and ``ota product window ...`` (maintenance windows),
through the REST API (issue 15's CLI contract).

Like ``ota firmware ...``, every command takes ``--api-url`` / ``--token`` (or OTA_API_URL /
OTA_TOKEN) and ``--product`` (or OTA_PRODUCT); ``--json`` prints the server's JSON, which is
what a script polls (``ota rollout show ID --json``: ``state``, ``reason``, ``counts`` and
``phases[].counts``). ``ota rollout show ID --watch`` redraws a progress view until the
rollout completes or aborts.
"""

from __future__ import annotations

import time
from datetime import datetime
from enum import StrEnum
from typing import Any

import typer
from rich import box
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from server.cli._output import fail, print_json
from server.cli.fleet_cmd import ApiUrl, AsJson, Product, Token, _client, _table

rollout_app = typer.Typer(
    help="Roll firmware out in phases that stop by themselves when devices fail.",
    no_args_is_help=True,
)
window_app = typer.Typer(
    help="Maintenance windows: offers start only inside them (cron, duration, time zone).",
    no_args_is_help=True,
)

#: States after which a rollout never changes again (``--watch`` stops there).
FINAL_STATES = frozenset({"aborted", "completed"})
#: Count columns of the progress view, in the order devices move through them, with the
#: short headings that keep the table within 80 columns.
COUNT_COLUMNS = {"pending": "pend", "offered": "offer", "downloading": "dl",
                 "rebooting": "boot", "succeeded": "ok", "download_failed": "dl\nfail",
                 "image_refused": "image\nrefused", "rolled_back": "rolled\nback",
                 "timed_out": "timed\nout", "held_off": "held"}
ROLLOUT_COLUMNS = ["id", "version", "groups", "state", "reason", "created_by"]
STATE_STYLES = {"running": "green", "scheduled": "cyan", "paused": "yellow", "aborted": "red",
                "completed": "bold green"}


class OnFailure(StrEnum):
    """What a crossed failure threshold does."""

    PAUSE = "pause"
    ABORT = "abort"


class FailureScope(StrEnum):
    """Where a failure threshold is judged."""

    PHASE = "phase"
    ROLLOUT = "rollout"
    BOTH = "both"


RolloutId = typer.Argument(..., help="The rollout's id (ota rollout list).")


def _unwrap(result: Any) -> dict[str, Any]:
    rollout: dict[str, Any] = result.get("rollout", result) if isinstance(result, dict) else {}
    return rollout


# --- rollouts ---------------------------------------------------------------------------


@rollout_app.command("create")
def rollout_create(
    version: int = typer.Argument(..., help="The product firmware version to roll out."),
    phases: str = typer.Option(..., "--phases",
                               help="Phase sizes: percentages of the target set (10,50,100) "
                               "or device counts (#5,#20,all)."),
    groups: str | None = typer.Option(None, "--groups",
                                      help="Roll out to these groups (G,H) instead of the "
                                      "product default."),
    phase_wait: int | None = typer.Option(None, "--phase-wait", min=0,
                                          help="Minutes to wait after a phase succeeded "
                                          "before the next one opens."),
    max_failure_percent: float | None = typer.Option(
        None, "--max-failure-percent", min=0, max=100,
        help="Stop when more than this share of a phase's finished devices failed."),
    min_sample: int | None = typer.Option(None, "--min-sample", min=1,
                                          help="Finished devices needed before the threshold "
                                          "is judged."),
    on_failure: OnFailure | None = typer.Option(None, "--on-failure",
                                                help="pause (an operator resumes) or abort."),
    failure_scope: FailureScope | None = typer.Option(None, "--failure-scope",
                                             help="Judge the threshold per phase, over the "
                                             "whole rollout, or both (default phase)."),
    max_per_minute: int | None = typer.Option(None, "--max-per-minute", min=1,
                                              help="Start at most this many offers a minute."),
    rate_increment_factor: float | None = typer.Option(
        None, "--rate-increment-factor", min=1,
        help="Multiply the rate limit by this ... (AWS IoT's exponential rate)."),
    rate_increase_after: int | None = typer.Option(
        None, "--rate-increase-after", min=1,
        help="... each time this many more devices succeeded."),
    success_percent: float | None = typer.Option(
        None, "--success-percent", min=0.001, max=100,
        help="Share of a phase that must succeed before the next opens (default 100)."),
    backoff_failures: int | None = typer.Option(
        None, "--backoff-failures", min=1,
        help="Hold a device back after this many failures (default 3) ..."),
    backoff_minutes: int | None = typer.Option(
        None, "--backoff-minutes", min=1, help="... for this many minutes (default 60)."),
    reboot_timeout: int | None = typer.Option(
        None, "--reboot-timeout", min=1,
        help="Minutes a rebooting device has to come back before it counts as timed out "
        "(default 15)."),
    start_at: datetime | None = typer.Option(
        None, "--start-at", formats=["%Y-%m-%dT%H:%M:%S%z", "%Y-%m-%dT%H:%M%z",
                                     "%Y-%m-%d %H:%M%z"],
        help="Start later, at a time with its UTC offset, e.g. 2026-12-24T02:00+01:00 "
        "(scheduled until then)."),
    immediate: bool = typer.Option(False, "--immediate",
                                   help="Offer to online devices of an open phase now "
                                   "(else at each device's next session)."),
    force: bool = typer.Option(False, "--force",
                               help="Roll out firmware no device has run yet "
                               "(audit-logged)."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Create a rollout of VERSION; it starts with its first phase, at once or at
    --start-at."""
    with _client(api_url, token) as client:
        result = client.create_rollout(
            product, version=version, phases=phases, groups=groups, phase_wait=phase_wait,
            max_failure_percent=max_failure_percent, min_sample=min_sample,
            on_failure=None if on_failure is None else on_failure.value,
            failure_scope=None if failure_scope is None else failure_scope.value,
            max_per_minute=max_per_minute,
            rate_increment_factor=rate_increment_factor,
            rate_increase_after=rate_increase_after, success_percent=success_percent,
            backoff_failures=backoff_failures, backoff_minutes=backoff_minutes,
            reboot_timeout=reboot_timeout,
            start_at=None if start_at is None else int(start_at.timestamp() * 1000),
            immediate=immediate or None, force=force or None,
        )
    rollout = _unwrap(result)
    if as_json:
        print_json(rollout)
        return
    Console().print(progress_view(rollout))


@rollout_app.command("list")
def rollout_list(
    version: int | None = typer.Option(None, "--version", help="Only rollouts of this "
                                       "firmware version."),
    state: str | None = typer.Option(None, "--state", help="Only rollouts in these states, "
                                     "comma-separated (scheduled, running, paused, aborted, "
                                     "completed)."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """List the product's rollouts, newest first."""
    with _client(api_url, token) as client:
        result = client.list_rollouts(product, version, state)
    rollouts = result.get("rollouts", []) if isinstance(result, dict) else []
    if as_json:
        print_json(rollouts)
        return
    rows = [{**r, "reason": r.get("reason") or "",
             "progress": f"{r['counts'].get('succeeded', 0)}/{r['counts'].get('total', 0)}"}
            for r in rollouts]
    _table(rows, [*ROLLOUT_COLUMNS[:4], "progress", *ROLLOUT_COLUMNS[4:]])


@rollout_app.command("show")
def rollout_show(
    rollout_id: str = RolloutId,
    watch: bool = typer.Option(False, "--watch", help="Redraw the progress view until the "
                               "rollout completes or aborts (Ctrl-C stops watching)."),
    interval: float = typer.Option(2.0, "--interval", min=0.2,
                                   help="Seconds between polls with --watch."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Show a rollout: state, the reason of a pause or abort, counts per phase and total."""
    if watch and as_json:
        fail("--watch draws a progress view; poll 'ota rollout show ID --json' instead", code=2)
    with _client(api_url, token) as client:
        rollout = _unwrap(client.get_rollout(product, rollout_id))
        if as_json:
            print_json(rollout)
            return
        if not watch:
            Console().print(progress_view(rollout))
            return
        try:
            with Live(progress_view(rollout), auto_refresh=False) as live:
                while rollout.get("state") not in FINAL_STATES:
                    time.sleep(interval)
                    rollout = _unwrap(client.get_rollout(product, rollout_id))
                    live.update(progress_view(rollout), refresh=True)
        except KeyboardInterrupt:
            raise typer.Exit(130) from None


def _change(action: str, rollout_id: str, reason: str | None, product: str, api_url: str,
            token: str | None, as_json: bool) -> None:
    with _client(api_url, token) as client:
        rollout = _unwrap(client.change_rollout(product, rollout_id, action, reason))
    if as_json:
        print_json(rollout)
        return
    why = f" ({rollout['reason']})" if rollout.get("reason") else ""
    typer.echo(f"rollout {rollout.get('id')}: {rollout.get('state')}{why}")


@rollout_app.command("pause")
def rollout_pause(
    rollout_id: str = RolloutId,
    reason: str | None = typer.Option(None, "--reason", help="Why (shown by show)."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Pause a rollout: no new offers until resumed; transfers in progress finish."""
    _change("pause", rollout_id, reason, product, api_url, token, as_json)


@rollout_app.command("resume")
def rollout_resume(
    rollout_id: str = RolloutId,
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Resume a paused rollout."""
    _change("resume", rollout_id, None, product, api_url, token, as_json)


@rollout_app.command("abort")
def rollout_abort(
    rollout_id: str = RolloutId,
    reason: str | None = typer.Option(None, "--reason", help="Why (shown by show)."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Abort a rollout: offers stop at once; devices mid-download are told to discard."""
    _change("abort", rollout_id, reason, product, api_url, token, as_json)


def progress_view(rollout: dict[str, Any]) -> Group:
    """The rollout as a heading and a table of counts per phase and in total."""
    state = str(rollout.get("state", "?"))
    groups = rollout.get("groups") or []
    heading = Text.assemble(
        (f"rollout {rollout.get('id')}", "bold"),
        f"  version {rollout.get('version')} to ",
        ", ".join(groups) if groups else "the product default",
        "  ",
        (state, STATE_STYLES.get(state, "")),
    )
    parts: list[Any] = [heading]
    if rollout.get("reason"):
        parts.append(Text(f"reason: {rollout['reason']}", style="yellow"))
    table = Table(box=box.SIMPLE_HEAD, padding=(0, 0), pad_edge=False)
    table.add_column("phase")
    table.add_column("size", justify="right")
    table.add_column("open")
    for column_heading in COUNT_COLUMNS.values():
        table.add_column(column_heading, justify="right")
    table.add_column("total", justify="right")
    percent = (rollout.get("plan") or {}).get("kind") == "percent"
    for phase in rollout.get("phases", []):
        counts = phase.get("counts", {})
        opened = "yes" if phase.get("opened_at") is not None else "no"
        if phase.get("met_at") is not None:
            opened = "met"
        size = phase.get("size")
        shown_size = "all" if size is None else f"{size}%" if percent else f"#{size}"
        table.add_row(str(phase.get("phase")), shown_size, opened,
                      *(str(counts.get(n, 0)) for n in COUNT_COLUMNS),
                      str(counts.get("total", 0)))
    totals = rollout.get("counts", {})
    table.add_row("all", "", "", *(str(totals.get(n, 0)) for n in COUNT_COLUMNS),
                  str(totals.get("total", 0)), style="bold")
    parts.append(table)
    events = rollout.get("events") or []
    for event in events[-5:]:
        why = f": {event['reason']}" if event.get("reason") else ""
        where = f" phase {event['phase']}" if isinstance(event.get("phase"), int) else ""
        parts.append(Text(f"  {event.get('kind')}{where}{why}", style="dim"))
    return Group(*parts)


# --- maintenance windows ------------------------------------------------------------------

WINDOW_COLUMNS = ["group", "cron", "duration", "timezone", "open_now", "next_open_at",
                  "updated_by"]


@window_app.command("set")
def window_set(
    cron: str = typer.Option(..., "--cron", help='When the window opens, e.g. "0 2 * * *" '
                             "(02:00 every day)."),
    duration: int = typer.Option(..., "--duration", min=1, help="How long it stays open, "
                                 "in minutes."),
    timezone: str = typer.Option("UTC", "--timezone", help="IANA time zone of the cron "
                                 "expression, e.g. Europe/Berlin."),
    group: str | None = typer.Option(None, "--group", help="Set this group's window "
                                     "instead of the product's."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
    as_json: bool = AsJson,
) -> None:
    """Set (or replace) the product's maintenance window, or a group's."""
    with _client(api_url, token) as client:
        result = client.set_window(product, cron, duration, timezone, group)
    window = result.get("window", result) if isinstance(result, dict) else result
    if as_json:
        print_json(window)
        return
    where = f"group {group}" if group else "product"
    typer.echo(f"{where} window: cron {window['cron']!r} for {window['duration']} min "
               f"({window['timezone']}); next opens {window['next_open_at']}")


@window_app.command("clear")
def window_clear(
    group: str | None = typer.Option(None, "--group", help="Clear this group's window "
                                     "instead of the product's."),
    product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
) -> None:
    """Remove the product's (or a group's) maintenance window: offers may start any time."""
    with _client(api_url, token) as client:
        client.clear_window(product, group)
    typer.echo(f"cleared the {'group ' + group if group else 'product'} maintenance window")


@window_app.command("show")
def window_show(product: str = Product, api_url: str = ApiUrl, token: str | None = Token,
                as_json: bool = AsJson) -> None:
    """Show the product's maintenance window and its groups' windows."""
    with _client(api_url, token) as client:
        result = client.list_windows(product)
    if as_json:
        print_json(result)
        return
    rows = ([result["window"]] if result.get("window") else []) + list(result.get("groups", []))
    if not rows:
        typer.echo("no maintenance windows: offers may start any time")
        return
    _table([{**r, "group": r.get("group") or "(product)"} for r in rows], WINDOW_COLUMNS)

