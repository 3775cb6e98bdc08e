"""What the live release view draws, from a :class:`~server.fleet.ReleaseProgress`: human
figures (bytes, durations, times) and the update-latency curve and bytes bars as inline SVG
geometry (server-rendered: no chart library, no build step)."""

from __future__ import annotations

from dataclasses import dataclass

from server.events import iso_ms
from server.fleet import ReleaseProgress
from server.fleet.release_progress import IN_PROGRESS

#: The chart's drawing area (SVG user units) inside its margins.
CHART_WIDTH, CHART_HEIGHT, MARGIN_LEFT, MARGIN_BOTTOM = 480, 160, 48, 28
#: While a release is in progress the view re-fetches itself this often even without events
#: (transfer progress publishes none; a dropped event must not freeze the counts).
POLL_MS = 5_000


def human_bytes(count: int | None) -> str:
    """1,234,567 -> "1.2 MB" (decimal units, as transfer figures usually are)."""
    if count is None:
        return "–"
    value = float(count)
    for unit in ("B", "kB", "MB", "GB"):
        if abs(value) < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} GB"


def human_duration(ms: int | None) -> str:
    """Milliseconds as "850 ms", "12.5 s", "3 min 20 s", "5 min", "2 h 5 min", "24 h"."""
    if ms is None:
        return "–"
    if ms < 1000:
        return f"{ms} ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, seconds_left = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {seconds_left} s" if seconds_left else f"{minutes} min"
    hours, minutes_left = divmod(minutes, 60)
    return f"{hours} h {minutes_left} min" if minutes_left else f"{hours} h"


def when(ms: int | None) -> str:
    """An epoch-ms time as ISO-8601 UTC (what the REST API shows too)."""
    return "–" if ms is None else iso_ms(ms)


@dataclass(frozen=True)
class Curve:
    """The cumulative update-latency curve as an SVG polyline with axis labels."""

    points: str
    x_max_label: str
    y_max_label: str
    description: str


def latency_curve(progress: ReleaseProgress) -> Curve | None:
    """Share of the targeted devices updated against time since the release (None before
    the first recorded success)."""
    latency, target = progress.latency, progress.target
    if not latency.curve or target <= 0 or latency.max_ms is None:
        return None
    span = max(latency.max_ms, 1)
    # A step curve: the share stays flat until the next device's success, then rises.
    coordinates: list[tuple[float, float]] = [(MARGIN_LEFT, CHART_HEIGHT)]
    for ms, updated in latency.curve:
        x = MARGIN_LEFT + CHART_WIDTH * ms / span
        y = CHART_HEIGHT - CHART_HEIGHT * min(updated, target) / target
        coordinates += [(x, coordinates[-1][1]), (x, y)]
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in coordinates)
    p50 = human_duration(latency.percentiles[50])
    description = (f"{latency.count} of {target} targeted devices updated; half of them "
                   f"within {p50}, the slowest after {human_duration(latency.max_ms)}")
    return Curve(points, human_duration(span), f"{100 * latency.count // target}%",
                 description)


@dataclass(frozen=True)
class Bar:
    """One horizontal bar of the bytes chart."""

    label: str
    value: int
    width: float


def bytes_bars(progress: ReleaseProgress) -> list[Bar]:
    """Bytes sent, what the same transfers would have taken as full images, and every
    targeted device receiving the full image; widths relative to the largest."""
    sent = progress.transfer_bytes
    rows = [("Sent", sent.bytes_sent), ("Full images of those transfers", sent.bytes_full),
            ("Full images for every targeted device", sent.full_images_for_target)]
    largest = max((value for _, value in rows), default=0) or 1
    return [Bar(label, value, CHART_WIDTH * value / largest) for label, value in rows]


def view_context(progress: ReleaseProgress) -> dict[str, object]:
    """The template context of the release view fragment."""
    return {
        "progress": progress,
        "curve": latency_curve(progress),
        "bars": bytes_bars(progress),
        "poll_ms": POLL_MS if progress.state == IN_PROGRESS else None,
        "chart": {"width": CHART_WIDTH, "height": CHART_HEIGHT, "left": MARGIN_LEFT,
                  "bottom": MARGIN_BOTTOM},
        "human_bytes": human_bytes,
        "human_duration": human_duration,
        "when": when,
    }
