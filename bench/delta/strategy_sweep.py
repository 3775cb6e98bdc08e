"""What the strategy search (otacore.delta_strategy) gains per effort, and what it costs.

For every pair of a corpus: the detector's evidence and family, the size of every strategy's
patch in search order (one search at the largest effort gives them all), the patch each
effort keeps, and the make time of a fresh search at each effort (best of ``--repeat``). Every
kept patch is applied with ``otacore.delta.apply_patch`` and the streaming applier and must
give the new image byte-exact. Writes ``results/<name>.json`` and ``results/<name>.md``.

Run: ``python bench/delta/strategy_sweep.py [--corpus bench/delta/corpus-public]
[--efforts 1 2 3 6] [--repeat 1] [--name public-strategies]``.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))

from otacore import delta, delta_maker, delta_strategy  # noqa: E402
from otacore.delta_stream import PatchApplier  # noqa: E402


def _apply_streamed(old: bytes, patch: bytes) -> bytes:
    sink = io.BytesIO()
    applier = PatchApplier(io.BytesIO(old), sink)
    for at in range(0, len(patch), 4096):
        applier.feed(patch[at : at + 4096])
    applier.finish()
    return sink.getvalue()


def sweep_pair(old: bytes, new: bytes, efforts: list[int], repeat: int) -> dict[str, object]:
    """Sizes of every strategy, the size and make time kept at each effort."""
    scores = delta_maker.branch_scores(old)
    full = delta_maker.search_patch(old, new, effort=delta_strategy.MAX_EFFORT)
    sizes = [size for _, size in full.tried]
    kept: dict[str, int] = {}
    seconds: dict[str, float] = {}
    for effort in efforts:
        best = float("inf")
        for _ in range(repeat):
            started = time.perf_counter()
            result = delta_maker.search_patch(old, new, effort=effort)
            best = min(best, time.perf_counter() - started)
        if result.patch != delta_maker.search_patch(old, new, effort=effort).patch:
            raise SystemExit("the search is not deterministic")
        if delta.apply_patch(old, result.patch) != new or _apply_streamed(old, result.patch) != new:
            raise SystemExit("a kept patch does not apply byte-exact")
        if len(result.patch) != min(sizes[:effort]):
            raise SystemExit("the search did not keep the smallest of the strategies it tried")
        kept[str(effort)], seconds[str(effort)] = len(result.patch), best
    return {
        "scores": list(scores),
        "family": delta_maker.detect_family(old),
        "order": [delta_strategy.strategy_name(s) for s, _ in full.tried],
        "sizes": sizes,
        "kept": kept,
        "make_s": seconds,
    }


def table(rows: dict[str, dict], efforts: list[int]) -> str:
    """Markdown: per pair, then the totals per effort."""
    head = ["pair", "thumb, x86 evidence", "order (size of each strategy)"]
    head += [f"effort {e}" for e in efforts]
    lines = ["| " + " | ".join(head) + " |", "|---|---|---|" + "---:|" * len(efforts)]
    for pair, row in rows.items():
        tried = ", ".join(f"{n} {s}" for n, s in zip(row["order"], row["sizes"], strict=True))
        cells = [pair, "{}, {}".format(*row["scores"]), tried]
        cells += [str(row["kept"][str(e)]) for e in efforts]
        lines.append("| " + " | ".join(cells) + " |")
    totals = ["**total bytes**", "", ""]
    totals += [f"**{sum(r['kept'][str(e)] for r in rows.values())}**" for e in efforts]
    times = ["make, total s", "", ""]
    times += [f"{sum(r['make_s'][str(e)] for r in rows.values()):.2f}" for e in efforts]
    lines += ["| " + " | ".join(totals) + " |", "| " + " | ".join(times) + " |"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=HERE / "corpus-public")
    parser.add_argument("--efforts", type=int, nargs="*", default=[1, 2, 3, 6])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--pairs", nargs="*")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", default="public-strategies")
    args = parser.parse_args()
    for effort in args.efforts:
        delta_strategy.check_effort(effort)
    pairs = sorted(p.name for p in args.corpus.iterdir() if (p / "old.bin").is_file())
    rows = {}
    for pair in args.pairs or pairs:
        old = (args.corpus / pair / "old.bin").read_bytes()
        new = (args.corpus / pair / "new.bin").read_bytes()
        rows[pair] = sweep_pair(old, new, args.efforts, args.repeat)
        print(pair, rows[pair]["kept"], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / f"{args.name}.md").write_text(table(rows, args.efforts))
    print(table(rows, args.efforts))


if __name__ == "__main__":
    main()
