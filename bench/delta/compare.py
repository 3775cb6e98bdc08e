"""Compare our delta engine with bsdiff4, detools, xdelta3 and zstd --patch-from.

For every pair of ``bench/delta/corpus`` (build it first with build_corpus.py) and every
tool: patch size, make time, apply time and apply peak memory. Each apply runs in a fresh
child process that loads the old image and the patch first and then resets its peak-RSS
counter (``/proc/self/clear_refs``), so "apply peak" is the extra resident memory the apply
itself needed (xdelta3 runs as its own process: its whole peak RSS is reported). Every apply
output is checked against the new image's SHA-256.

Writes ``results.md`` (markdown table), ``results.json`` and ``results.png`` into ``--out``
(default ``bench/delta/results``). Run: ``python bench/delta/compare.py [--pairs a b]``.
Needs: pip ``bsdiff4 detools matplotlib``; Debian ``xdelta3``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

TOOLS = ("ours", "bsdiff4", "detools-bsdiff", "detools-hdiffpatch", "xdelta3", "zstd-patch-from")


def _zstd_params(old: bytes, new: bytes):  # type: ignore[no-untyped-def]
    import zstandard

    window_log = max(10, min(27, math.ceil(math.log2(len(old) + len(new) + 1))))
    return zstandard.ZstdCompressionParameters.from_level(
        19, window_log=window_log, enable_ldm=True
    ), window_log


def make_patch(tool: str, old: bytes, new: bytes, workdir: Path) -> bytes:
    """The patch ``tool`` makes from old to new."""
    if tool == "ours":
        from otacore import delta

        return delta.make_patch(old, new)
    if tool == "bsdiff4":
        import bsdiff4

        return bytes(bsdiff4.diff(old, new))
    if tool.startswith("detools-"):
        import detools

        algorithm = tool.split("-", 1)[1]
        out = io.BytesIO()
        detools.create_patch(
            io.BytesIO(old),
            io.BytesIO(new),
            out,
            compression="lzma",
            patch_type="sequential" if algorithm == "bsdiff" else "hdiffpatch",
            algorithm=algorithm,
            use_mmap=False,
        )
        return out.getvalue()
    if tool == "xdelta3":
        (workdir / "old").write_bytes(old)
        (workdir / "new").write_bytes(new)
        subprocess.run(
            [
                "xdelta3",
                "-e",
                "-9",
                "-f",
                "-s",
                str(workdir / "old"),
                str(workdir / "new"),
                str(workdir / "patch"),
            ],
            check=True,
        )
        return (workdir / "patch").read_bytes()
    if tool == "zstd-patch-from":
        import zstandard

        params, _ = _zstd_params(old, new)
        dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        return zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(
            new
        )
    raise ValueError(tool)


def _apply_in_process(tool: str, old: bytes, patch: bytes, new_size: int) -> Callable[[], bytes]:
    """A closure applying ``patch`` (everything it needs already loaded)."""
    if tool == "ours":
        from otacore.delta_stream import PatchApplier

        def run() -> bytes:
            digest = hashlib.sha256()  # the sink hashes and drops: a device writes to flash
            applier = PatchApplier(old, digest.update)
            for at in range(0, len(patch), 1024):  # as it arrives, in network-sized pieces
                applier.feed(patch[at : at + 1024])
            applier.finish()
            return digest.digest()

        return run
    if tool == "bsdiff4":
        import bsdiff4

        return lambda: hashlib.sha256(bsdiff4.patch(old, patch)).digest()
    if tool.startswith("detools-"):
        import detools

        def run_detools() -> bytes:
            out = io.BytesIO()
            detools.apply_patch(io.BytesIO(old), io.BytesIO(patch), out)
            return hashlib.sha256(out.getvalue()).digest()

        return run_detools
    if tool == "zstd-patch-from":
        import zstandard

        dictionary = zstandard.ZstdCompressionDict(old, dict_type=zstandard.DICT_TYPE_RAWCONTENT)

        def run_zstd() -> bytes:
            decompressor = zstandard.ZstdDecompressor(dict_data=dictionary, max_window_size=1 << 27)
            return hashlib.sha256(decompressor.decompress(patch)).digest()

        return run_zstd
    raise ValueError(tool)


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


def child_apply(tool: str, old_path: str, patch_path: str, new_size: int) -> None:
    """Child process: apply once, print {"seconds", "peak_kib", "sha256"} as JSON."""
    old = Path(old_path).read_bytes()
    patch = Path(patch_path).read_bytes()
    run = _apply_in_process(tool, old, patch, new_size)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _rss_kib("VmRSS")
    started = time.perf_counter()
    digest = run()
    seconds = time.perf_counter() - started
    peak = _rss_kib("VmHWM") - before
    print(json.dumps({"seconds": seconds, "peak_kib": peak, "sha256": digest.hex()}))


def apply_patch(tool: str, old_path: Path, patch_path: Path, new_size: int, workdir: Path) -> dict:
    """Apply in a separate process; returns seconds, peak_kib and the output's sha256."""
    if tool == "xdelta3":
        out = workdir / "out"
        started = time.perf_counter()
        proc = subprocess.Popen(
            ["xdelta3", "-d", "-f", "-s", str(old_path), str(patch_path), str(out)]
        )
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - started
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise RuntimeError("xdelta3 -d failed")
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        return {"seconds": seconds, "peak_kib": usage.ru_maxrss, "sha256": digest}
    result = subprocess.run(
        [sys.executable, __file__, "--child", tool, str(old_path), str(patch_path), str(new_size)],
        check=True,
        capture_output=True,
        text=True,
    )
    answer: dict = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (xdelta3 runs as one)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure(corpus: Path, pairs: list[str], tools: list[str], repeat: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="ota-delta-bench-") as tmp:
        workdir = Path(tmp)
        for pair in pairs:
            old_path, new_path = corpus / pair / "old.bin", corpus / pair / "new.bin"
            old, new = old_path.read_bytes(), new_path.read_bytes()
            want = hashlib.sha256(new).hexdigest()
            for tool in tools:
                make_seconds = make_cpu = math.inf
                for _ in range(repeat):
                    started, cpu = time.perf_counter(), _cpu_seconds()
                    patch = make_patch(tool, old, new, workdir)
                    make_seconds = min(make_seconds, time.perf_counter() - started)
                    make_cpu = min(make_cpu, _cpu_seconds() - cpu)
                patch_path = workdir / f"{pair}.{tool}.patch"
                patch_path.write_bytes(patch)
                applied = apply_patch(tool, old_path, patch_path, len(new), workdir)
                if applied["sha256"] != want:
                    raise RuntimeError(f"{tool} did not reproduce {pair}")
                row = {
                    "pair": pair,
                    "tool": tool,
                    "old_size": len(old),
                    "new_size": len(new),
                    "patch_size": len(patch),
                    "make_s": make_seconds,
                    "make_cpu_s": make_cpu,
                    "apply_s": applied["seconds"],
                    "apply_peak_kib": applied["peak_kib"],
                }
                rows.append(row)
                print(
                    f"{pair:12s} {tool:20s} {len(patch):9d} B  make {make_seconds:7.3f} s "
                    f"(cpu {make_cpu:6.3f} s)  "
                    f"apply {applied['seconds']:6.3f} s  peak {applied['peak_kib']:7d} KiB",
                    flush=True,
                )
    return rows


def markdown(rows: list[dict], tools: list[str]) -> str:
    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    by = {(r["pair"], r["tool"]): r for r in rows}
    lines = ["Patch size in bytes (smallest in bold):", ""]
    lines.append("| pair | old → new | " + " | ".join(tools) + " |")
    lines.append("|---|---|" + "---:|" * len(tools))
    for pair in pairs:
        sizes = {t: by[(pair, t)]["patch_size"] for t in tools if (pair, t) in by}
        best = min(sizes.values())
        first = by[(pair, tools[0])]
        cells = [f"**{sizes[t]}**" if sizes[t] == best else str(sizes[t]) for t in sizes]
        lines.append(
            f"| {pair} | {first['old_size']} → {first['new_size']} | " + " | ".join(cells) + " |"
        )
    totals = {t: sum(r["patch_size"] for r in rows if r["tool"] == t) for t in tools}
    lines.append("| **total** | | " + " | ".join(str(totals[t]) for t in tools) + " |")
    lines += [
        "",
        "Totals per tool:",
        "",
        "| tool | patch bytes | make s (wall) | make s (CPU) | apply s | max apply peak KiB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for t in tools:
        mine = [r for r in rows if r["tool"] == t]
        lines.append(
            f"| {t} | {totals[t]} | {sum(r['make_s'] for r in mine):.2f} | "
            f"{sum(r['make_cpu_s'] for r in mine):.2f} | "
            f"{sum(r['apply_s'] for r in mine):.2f} | {max(r['apply_peak_kib'] for r in mine)} |"
        )
    lines += ["", "Per pair: make s / apply s / apply peak KiB:", ""]
    lines.append("| pair | " + " | ".join(tools) + " |")
    lines.append("|---|" + "---:|" * len(tools))
    for pair in pairs:
        cells = []
        for t in tools:
            r = by.get((pair, t))
            cells.append(
                f"{r['make_s']:.2f} / {r['apply_s']:.2f} / {r['apply_peak_kib']}" if r else ""
            )
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], tools: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = list(dict.fromkeys(r["pair"] for r in rows))
    by = {(r["pair"], r["tool"]): r for r in rows}
    fig, axes = plt.subplots(3, 1, figsize=(11, 11))
    width = 0.8 / len(tools)
    for i, tool in enumerate(tools):
        xs = [p + i * width for p in range(len(pairs))]
        for ax, key in zip(axes, ("patch_size", "make_s", "apply_peak_kib"), strict=True):
            ax.bar(
                xs, [by[(p, tool)][key] if (p, tool) in by else 0 for p in pairs], width, label=tool
            )
    for ax, title in zip(
        axes,
        ("patch size (bytes, log)", "make time (s, log)", "apply peak RSS (KiB, log)"),
        strict=True,
    ):
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xticks([p + 0.4 - width / 2 for p in range(len(pairs))], pairs)
    axes[0].legend(ncol=3, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_apply(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=HERE / "corpus")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--pairs", nargs="*")
    parser.add_argument("--tools", nargs="*", default=list(TOOLS))
    parser.add_argument("--repeat", type=int, default=1, help="make runs per tool (best kept)")
    args = parser.parse_args()
    manifest = json.loads((args.corpus / "manifest.json").read_text())
    pairs = args.pairs or list(manifest)
    tools = [t for t in args.tools if t != "xdelta3" or shutil.which("xdelta3")]
    rows = measure(args.corpus, pairs, tools, args.repeat)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "results.md").write_text(markdown(rows, tools))
    plot(rows, tools, args.out / "results.png")
    print(markdown(rows, tools))


if __name__ == "__main__":
    main()
