"""Tables and plot of the public-corpus comparison (``compare.py --public`` writes the rows).

Per pair: every tool's patch size, the best peer, and ours / best peer. Per class and in
total: ours against the sum of each pair's best peer and against each peer's own total (the
issue's yardstick is the best single peer's total: "total <= 0.9x the best of ..."), the
pairs where ours is more than 5% above that pair's best peer, and make time against
``zstd -19 --patch-from``. Run alone to redo the tables from a results file:
``python bench/delta/public_tables.py bench/delta/results/public-results.json``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run alone or loaded by path

from build_public_corpus import CLASSES as CLASS_ORDER  # the one list of classes

OURS = ("ours", "ours-py")
PEER_ORDER = (
    "bsdiff4",
    "detools-bsdiff",
    "detools-hdiffpatch",
    "xdelta3",
    "zstd-cli",
    "zstd-patch-from",
)
#: The issue's per-pair bound: no pair more than 5% above its best peer.
PAIR_SLACK = 1.05
ZSTD = "zstd-cli"


def _index(rows: list[dict]) -> tuple[list[str], list[str], dict[tuple[str, str], dict]]:
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    present = {r["tool"] for r in rows}
    peers = [t for t in PEER_ORDER if t in present]
    by = {(r["pair"], r["tool"]): r for r in rows}
    return pairs, peers, by


def best_peer(pair: str, peers: list[str], by: dict[tuple[str, str], dict]) -> tuple[str, int]:
    """(tool, size) of the smallest peer patch of ``pair``."""
    sizes = {t: by[(pair, t)]["patch_size"] for t in peers if (pair, t) in by}
    tool = min(sizes, key=sizes.__getitem__)
    return tool, sizes[tool]


def _summary(pairs: list[str], peers: list[str], by: dict[tuple[str, str], dict]) -> dict:
    ours = sum(by[(p, "ours")]["patch_size"] for p in pairs)
    best_each = sum(best_peer(p, peers, by)[1] for p in pairs)
    totals = {t: sum(by[(p, t)]["patch_size"] for p in pairs if (p, t) in by) for t in peers}
    complete = [t for t in peers if all((p, t) in by for p in pairs)]
    best_tool = min(complete, key=totals.__getitem__)
    over = [
        p for p in pairs if by[(p, "ours")]["patch_size"] > PAIR_SLACK * best_peer(p, peers, by)[1]
    ]
    return {
        "ours": ours,
        "best_each": best_each,
        "totals": totals,
        "best_tool": best_tool,
        "over": over,
    }


def public_markdown(rows: list[dict]) -> str:
    """The per-pair, per-class and total tables as markdown."""
    pairs, peers, by = _index(rows)
    ours_tools = [t for t in OURS if any(r["tool"] == t for r in rows)]
    classes = [c for c in CLASS_ORDER if any(by[(p, "ours")]["class"] == c for p in pairs)]
    lines = [
        "Patch size in bytes, per pair (smallest in bold; ratio = ours / that pair's best peer):",
        "",
        "| pair | class | old → new | ours | " + " | ".join(peers) + " | best peer | ratio |",
        "|---|---|---|---:|" + "---:|" * len(peers) + "---|---:|",
    ]
    for cls in classes:
        for pair in [p for p in pairs if by[(p, "ours")]["class"] == cls]:
            mine = by[(pair, "ours")]
            sizes = [mine["patch_size"]] + [
                by[(pair, t)]["patch_size"] if (pair, t) in by else None for t in peers
            ]
            smallest = min(s for s in sizes if s is not None)
            cells = ["" if s is None else f"**{s}**" if s == smallest else str(s) for s in sizes]
            tool, best = best_peer(pair, peers, by)
            ratio = mine["patch_size"] / best
            flag = " ⚠" if ratio > PAIR_SLACK else ""
            lines.append(
                f"| {pair} | {cls} | {mine['old_size']} → {mine['new_size']} | "
                + " | ".join(cells)
                + f" | {tool} | {ratio:.2f}{flag} |"
            )
    lines += [
        "",
        "Per class (sum of patch bytes; 'best each' = sum of every pair's best peer; "
        "'> 5%' = pairs where ours exceeds that pair's best peer by more than 5%):",
        "",
        "| class | pairs | ours | best each | ours / best each | "
        + " | ".join(peers)
        + " | ours / best peer total | > 5% |",
        "|---|---:|---:|---:|---:|" + "---:|" * len(peers) + "---:|---:|",
    ]
    for cls in [*classes, "all"]:
        chosen = pairs if cls == "all" else [p for p in pairs if by[(p, "ours")]["class"] == cls]
        s = _summary(chosen, peers, by)
        label = "**all**" if cls == "all" else cls
        lines.append(
            f"| {label} | {len(chosen)} | {s['ours']} | {s['best_each']} | "
            f"{s['ours'] / s['best_each']:.2f} | "
            + " | ".join(str(s["totals"][t]) for t in peers)
            + f" | {s['ours'] / s['totals'][s['best_tool']]:.2f} ({s['best_tool']}) | "
            f"{len(s['over'])} |"
        )
    lines += [
        "",
        "Make and apply time in total over the pairs (wall seconds, best of the runs; CPU "
        "seconds of the same runs, threads and child processes included; apply peak = extra "
        "RSS of the applying process):",
        "",
        "| tool | patch bytes | make s | make / zstd -19 --patch-from | make CPU s "
        "| CPU / zstd's | apply s | max apply peak KiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    zstd_rows = [by[(p, ZSTD)] for p in pairs if (p, ZSTD) in by]
    zstd_make = sum(r["make_s"] for r in zstd_rows)
    zstd_cpu = sum(r.get("make_cpu_s", 0.0) for r in zstd_rows)
    for tool in [*ours_tools, *peers]:
        measured = [by[(p, tool)] for p in pairs if (p, tool) in by]
        make = sum(r["make_s"] for r in measured)
        cpu = sum(r.get("make_cpu_s", 0.0) for r in measured)
        versus = f"{make / zstd_make:.2f}" if zstd_make else ""
        cpu_versus = f"{cpu / zstd_cpu:.2f}" if zstd_cpu else ""
        lines.append(
            f"| {tool} | {sum(r['patch_size'] for r in measured)} | {make:.2f} | {versus} | "
            f"{cpu:.2f} | {cpu_versus} | "
            f"{sum(r['apply_s'] for r in measured):.2f} | "
            f"{max(r['apply_peak_kib'] for r in measured)} |"
        )
    checked = [by[(p, t)] for p in pairs for t in ours_tools if (p, t) in by]
    exact = sum(1 for r in checked if r.get("cli_apply_ok"))
    lines += [
        "",
        f"`ota delta apply` gave the new image byte-exact for {exact} of {len(checked)} "
        "patches of ours.",
    ]
    twins = [by[(p, "ours-py")] for p in pairs if (p, "ours-py") in by]
    if twins:
        same = sum(1 for r in twins if r.get("same_as_ours"))
        lines.append(
            f"The pure-Python twin made byte-identical patches for {same} of {len(twins)} pairs."
        )
    return "\n".join(lines) + "\n"


def public_plot(rows: list[dict], path: Path) -> None:
    """Ours / best peer per pair (grouped by class), and patch bytes per tool per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs, peers, by = _index(rows)
    order = sorted(
        pairs,
        key=lambda p: (CLASS_ORDER.index(by[(p, "ours")]["class"]), pairs.index(p)),
    )
    palette = plt.get_cmap("tab10")
    colours = {cls: palette(i) for i, cls in enumerate(CLASS_ORDER)}
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(15, 0.28 * len(order) + 2), gridspec_kw={"width_ratios": [3, 2]}
    )
    ratios = [by[(p, "ours")]["patch_size"] / best_peer(p, peers, by)[1] for p in order]
    left.barh(range(len(order)), ratios, color=[colours[by[(p, "ours")]["class"]] for p in order])
    left.axvline(1.0, color="black", linewidth=0.8)
    left.axvline(PAIR_SLACK, color="red", linewidth=0.8, linestyle="--")
    left.set_xscale("log")
    left.set_yticks(range(len(order)), order, fontsize=7)
    left.invert_yaxis()
    left.set_xlabel("ours / best peer (log; dashed: +5%)")
    classes = [c for c in CLASS_ORDER if any(by[(p, "ours")]["class"] == c for p in pairs)]
    tools = ["ours", *peers]
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        totals = [
            sum(
                by[(p, tool)]["patch_size"]
                for p in pairs
                if by[(p, "ours")]["class"] == c and (p, tool) in by
            )
            for c in classes
        ]
        right.bar([x + i * width for x in range(len(classes))], totals, width, label=tool)
    right.set_yscale("log")
    right.set_xticks([x + 0.4 - width / 2 for x in range(len(classes))], classes, rotation=30)
    right.set_ylabel("patch bytes per class (log)")
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    """Rewrite the .md and .png beside a results .json."""
    path = Path(sys.argv[1])
    rows = json.loads(path.read_text())
    path.with_suffix(".md").write_text(public_markdown(rows))
    public_plot(rows, path.with_suffix(".png"))
    print(public_markdown(rows))


if __name__ == "__main__":
    main()
