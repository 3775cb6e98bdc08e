"""The maker's threads (otacore.delta_maker ``workers``): the strategies are made beside
each other, the codec passes overlap each other, and nothing else changes.

The patch, the strategy kept and the sizes tried are the same with any number of threads,
on real-shaped pairs and fuzzed ones; the second strategy is made beside the first, and the
first one's codec step runs beside the winner's when it may still win (checked by which
thread ran what, never by time); no thread
outlives a search, even one that fails; bad thread counts are refused with their range; the
operator reaches the setting from ``ota delta make`` and ``ota server``.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from otacore import delta, delta_codec, delta_maker, delta_strategy
from otacore.delta import PatchInputError
from otacore.errors import ValidationError
from server.cli import server_cmd
from server.cli.delta_cmd import app
from server.devices.delivery import OtaConfig
from server.devices.deltas import DeltaCache
from server.events import EventBus
from server.fleet import Fleet
from server.store import Store
from tests.server_cli_capture import capture_server_configs
from tests.test_delta_strategy import PAIRS, _applies, adversarial_pairs


def _maker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("delta-")]


@pytest.mark.parametrize("name", sorted(PAIRS))
@pytest.mark.parametrize("effort", [1, 2, 3])
def test_the_patch_does_not_depend_on_the_threads(name: str, effort: int) -> None:
    old, new = PAIRS[name]()
    alone = delta_maker.search_patch(old, new, effort=effort, workers=1)
    for workers in (2, 3):
        assert delta_maker.search_patch(old, new, effort=effort, workers=workers) == alone
    assert _applies(old, new, alone.patch)
    assert _maker_threads() == []


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pair=adversarial_pairs(), effort=st.integers(1, 3), workers=st.integers(2, 4))
def test_fuzzed_pairs_give_one_patch_whatever_the_threads(
    pair: tuple[bytes, bytes], effort: int, workers: int
) -> None:
    old, new = pair
    one = delta_maker.search_patch(old, new, effort=effort, block_limit=1024, workers=1)
    many = delta_maker.search_patch(old, new, effort=effort, block_limit=1024, workers=workers)
    assert many == one


def _log_threads(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Record which thread makes each strategy, runs each codec step and each LZMA2 pass."""
    log: list[tuple[str, str]] = []
    real_make_one, real_finish = delta_maker._make_one, delta_codec.PatchEncoder.finish
    real_lzma = delta_codec.compress_lzma2

    def make_one(*args: object, **kwargs: object) -> object:
        log.append(("make", threading.current_thread().name))
        return real_make_one(*args, **kwargs)  # type: ignore[arg-type]

    def finish(self: delta_codec.PatchEncoder, *args: object, **kwargs: object) -> bytes:
        log.append(("finish", threading.current_thread().name))
        return real_finish(self, *args, **kwargs)  # type: ignore[arg-type]

    def lzma2(*args: object, **kwargs: object) -> bytes:
        log.append(("lzma2", threading.current_thread().name))
        return real_lzma(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(delta_maker, "_make_one", make_one)
    monkeypatch.setattr(delta_codec.PatchEncoder, "finish", finish)
    monkeypatch.setattr(delta_codec, "compress_lzma2", lzma2)
    return log


def test_the_second_strategy_is_made_beside_the_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """With threads, the second strategy is made on a strategy thread beside the first (made
    in the caller's thread); the first won, so its codec step is the only one, its passes on
    the encoder threads. Without threads everything runs in the caller's thread, and the
    patch is the same."""
    monkeypatch.setattr(delta_strategy, "EFFORT_UNIT", 1)  # two strategies, not all six
    old, new = PAIRS["thumb relinked"]()
    log = _log_threads(monkeypatch)
    threaded = delta_maker.search_patch(old, new, effort=2, workers=2)
    assert threaded.strategy == delta_strategy.AUTO
    makers = sorted(name.split("_")[0] for step, name in log if step == "make")
    assert makers == ["MainThread", "delta-strategy"]
    assert [name for step, name in log if step == "finish"] == ["MainThread"]
    lzma_threads = [name for step, name in log if step == "lzma2"]
    assert lzma_threads and all(name.startswith("delta-encode") for name in lzma_threads)
    log.clear()
    alone = delta_maker.search_patch(old, new, effort=2, workers=1)
    assert {name for _, name in log} == {"MainThread"}
    assert alone == threaded


def test_the_first_codec_step_runs_beside_the_winners_when_it_may_win(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The second strategy wins on zstd by less than RECODE_MARGIN: the first one's payload
    goes through the codec step too, on the background thread beside the winner's."""
    old, new = PAIRS["data container"]()
    log = _log_threads(monkeypatch)
    result = delta_maker.search_patch(old, new, effort=2, workers=2)
    first, second = (size for _, size in result.tried)
    assert second < first <= (1 + delta_maker.RECODE_MARGIN) * second
    finishers = sorted(name.split("_")[0] for step, name in log if step == "finish")
    assert finishers == ["MainThread", "delta-first"]
    assert all(name.startswith("delta-encode") for step, name in log if step == "lzma2")
    log.clear()
    assert delta_maker.search_patch(old, new, effort=2, workers=1) == result
    assert [name for step, name in log if step == "finish"] == ["MainThread"] * 2


@pytest.mark.parametrize("workers", [1, 2])
def test_a_first_strategy_clearly_beaten_skips_the_codec_step(
    monkeypatch: pytest.MonkeyPatch, workers: int
) -> None:
    """Beaten by more than the margin and above RECODE_ALWAYS bytes (both lowered to 0
    here), the first strategy's payload is not encoded again: one codec step, the
    winner's."""
    old, new = PAIRS["data container"]()
    monkeypatch.setattr(delta_maker, "RECODE_MARGIN", 0.0)
    monkeypatch.setattr(delta_maker, "RECODE_ALWAYS", 0)
    log = _log_threads(monkeypatch)
    result = delta_maker.search_patch(old, new, effort=2, workers=workers)
    assert result.strategy == 0 and result.tried[0][1] > result.tried[1][1]
    assert [step for step, _ in log].count("finish") == 1
    assert _applies(old, new, result.patch)


@pytest.mark.parametrize(
    ("first", "winner", "worth"),
    [
        (delta_maker.RECODE_ALWAYS, 1, True),  # small: always
        (delta_maker.RECODE_ALWAYS + 1, 1, False),
        (101_000, 100_000, True),  # within 1%
        (101_001, 100_000, False),
    ],
)
def test_which_first_strategies_are_worth_the_codec_step(
    first: int, winner: int, worth: bool
) -> None:
    assert delta_maker._worth_recoding(b"f" * first, b"w" * winner) is worth


def test_no_thread_outlives_a_failed_search(monkeypatch: pytest.MonkeyPatch) -> None:
    """The second strategy fails on its thread while the first is made: the error reaches
    the caller, and no maker thread is left."""
    old, new = PAIRS["data container"]()
    real_make_one = delta_maker._make_one
    calls: list[int] = []

    class StrategyFailed(Exception):
        pass

    def make_one(*args: object, **kwargs: object) -> bytes:
        calls.append(1)
        if len(calls) == 2:
            raise StrategyFailed("the second strategy broke")
        return real_make_one(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(delta_maker, "_make_one", make_one)
    with pytest.raises(StrategyFailed):
        delta_maker.search_patch(old, new, effort=2, workers=2)
    assert _maker_threads() == []


@pytest.mark.parametrize("workers", [0, -1, delta_maker.MAX_WORKERS + 1, True, 2.0, "2"])
def test_a_thread_count_outside_the_range_is_refused(workers: object) -> None:
    with pytest.raises(PatchInputError, match="workers must be a whole number of threads"):
        delta_maker.search_patch(b"old" * 100, b"new" * 100, workers=workers)  # type: ignore[arg-type]
    with pytest.raises(PatchInputError, match="workers must be a whole number of threads"):
        delta.make_patch(b"old" * 100, b"new" * 100, workers=workers)  # type: ignore[arg-type]


def test_ota_delta_make_takes_workers(tmp_path: Path) -> None:
    old, new = PAIRS["thumb relinked"]()
    (tmp_path / "old.bin").write_bytes(old)
    (tmp_path / "new.bin").write_bytes(new)
    runner = CliRunner()
    made = {}
    for workers in ("1", "3"):
        result = runner.invoke(
            app,
            ["make", str(tmp_path / "old.bin"), str(tmp_path / "new.bin"),
             str(tmp_path / f"p{workers}"), "--workers", workers],
        )
        assert result.exit_code == 0, result.output
        made[workers] = (tmp_path / f"p{workers}").read_bytes()
    assert made["1"] == made["3"] == delta.make_patch(old, new)
    refused = runner.invoke(
        app,
        ["make", str(tmp_path / "old.bin"), str(tmp_path / "new.bin"), str(tmp_path / "q"),
         "--workers", "0"],
    )
    assert refused.exit_code == 2 and not (tmp_path / "q").exists()


def test_the_server_setting_reaches_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    captured = capture_server_configs(monkeypatch)
    runner = CliRunner()
    given_option = runner.invoke(
        server_cmd.app, ["server", "--data", str(tmp_path), "--delta-threads-per-patch", "1"]
    )
    assert given_option.exit_code == 0, given_option.output
    assert captured[-1].ota.delta_threads_per_patch == 1  # type: ignore[attr-defined]
    from_file = runner.invoke(
        server_cmd.app,
        ["server", "--data", str(tmp_path), "--set", "delivery.delta_threads_per_patch=4"],
    )
    assert from_file.exit_code == 0, from_file.output
    assert captured[-1].ota.delta_threads_per_patch == 4  # type: ignore[attr-defined]
    assert OtaConfig().delta_threads_per_patch == delta_maker.DEFAULT_WORKERS
    for wrong in (0, delta_maker.MAX_WORKERS + 1, True):
        with pytest.raises(ValidationError, match="delta_threads_per_patch must be a whole"):
            OtaConfig(delta_threads_per_patch=wrong)
    refused = runner.invoke(
        server_cmd.app, ["server", "--data", str(tmp_path), "--delta-threads-per-patch", "0"]
    )
    assert refused.exit_code == 2, refused.output


async def test_the_server_delta_cache_makes_its_patch_with_its_threads(
    sqlite_store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real store and fleet: the cache hands its thread count to the maker, and the
    patch it stores is the same as one made without threads."""
    old, new = PAIRS["x86 code"]()
    seen: list[int] = []
    real_search = delta_maker.search_patch

    def search(*args: object, **kwargs: object) -> delta_strategy.SearchResult:
        seen.append(kwargs["workers"])  # type: ignore[arg-type]
        return real_search(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(delta_maker, "search_patch", search)
    cache = DeltaCache(Fleet(sqlite_store, EventBus()), workers=3)
    found = await cache.patch_for("a" * 64, old, "c" * 64, new)
    assert found is not None and seen == [3]
    assert found[1] == delta.make_patch(old, new, workers=1)
