"""The live release view's drawing from known progress: the latency curve's SVG points and
labels, the bytes bars, the human figures, and when the view polls."""

from __future__ import annotations

from server.console.release_view import (
    CHART_HEIGHT,
    CHART_WIDTH,
    MARGIN_LEFT,
    POLL_MS,
    bytes_bars,
    human_bytes,
    human_duration,
    latency_curve,
    view_context,
)
from server.fleet.release_progress import (
    ReleaseCounts,
    ReleaseProgress,
    TransferBytes,
    latency_summary,
)
from server.store import FirmwareRecord, ProductRecord, ReleaseRecord

PRODUCT = ProductRecord(1, "widget", "Widget", 13, "", False, 1)
FIRMWARE = FirmwareRecord(1, 1, 2, "two", "", "a.bin", 1000, "ab" * 32, 13, 5, 1, 6, {}, "me",
                          1, None)
RELEASE = ReleaseRecord(1, 1, "product", None, None, 2, False, 1_000, "me", 0, 0, 0)


def _progress(latencies: list[int], *, target: int, updated: int, updating: int = 0,
              sent: int = 0, full: int = 0) -> ReleaseProgress:
    return ReleaseProgress(
        PRODUCT, FIRMWARE, (ReleaseCounts(RELEASE, target, updated, updating, 0),),
        latency_summary(sorted(latencies)), (), (),
        TransferBytes(sent, full, 1, 0, 1, target * FIRMWARE.size))


def test_the_curve_runs_from_the_release_to_the_slowest_device() -> None:
    curve = latency_curve(_progress([10_000, 20_000, 40_000], target=4, updated=3))
    assert curve is not None
    points = [tuple(map(float, p.split(","))) for p in curve.points.split()]
    assert points[0] == (MARGIN_LEFT, CHART_HEIGHT)  # the release: nobody updated
    # Each device's success is a step: x by its latency over the slowest, y by the share of
    # the 4 targeted devices updated by then.
    quarter, half, full = (MARGIN_LEFT + CHART_WIDTH * f for f in (0.25, 0.5, 1.0))
    assert points[1:] == [
        (quarter, CHART_HEIGHT), (quarter, CHART_HEIGHT * 3 / 4),
        (half, CHART_HEIGHT * 3 / 4), (half, CHART_HEIGHT / 2),
        (full, CHART_HEIGHT / 2), (full, CHART_HEIGHT / 4),
    ]
    assert (curve.x_max_label, curve.y_max_label) == ("40.0 s", "75%")
    assert curve.description == ("3 of 4 targeted devices updated; half of them within "
                                 "20.0 s, the slowest after 40.0 s")
    assert latency_curve(_progress([], target=4, updated=0)) is None


def test_bytes_bars_and_figures() -> None:
    bars = bytes_bars(_progress([], target=4, updated=0, sent=500, full=2000))
    assert [(b.label, b.value) for b in bars] == [
        ("Sent", 500), ("Full images of those transfers", 2000),
        ("Full images for every targeted device", 4000)]
    assert [b.width for b in bars] == [CHART_WIDTH / 8, CHART_WIDTH / 2, CHART_WIDTH]
    assert [human_bytes(n) for n in (999, 1000, 1_234_567, 5 * 10**9, None)] == [
        "999 B", "1.0 kB", "1.2 MB", "5.0 GB", "–"]
    assert [human_duration(ms) for ms in (850, 12_500, 200_000, 300_000, 7_500_000,
                                          86_400_000, None)] == [
        "850 ms", "12.5 s", "3 min 20 s", "5 min", "2 h 5 min", "24 h", "–"]


def test_the_view_polls_only_while_in_progress() -> None:
    assert view_context(_progress([1], target=2, updated=1, updating=1))["poll_ms"] == POLL_MS
    assert view_context(_progress([1, 2], target=2, updated=2))["poll_ms"] is None
