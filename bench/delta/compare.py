"""Compare our delta engine with bsdiff4, detools, xdelta3 and zstd --patch-from.

For every pair of ``bench/delta/corpus`` (build it first with build_corpus.py) or of the
public corpus (``--public``: ``bench/delta/corpus-public``, built by build_public_corpus.py)
and every tool: patch size, make time, apply time and apply peak memory. Each apply runs in a fresh
child process that loads the old image and the patch first and then resets its peak-RSS
counter (``/proc/self/clear_refs``), so "apply peak" is the extra resident memory the apply
itself needed (xdelta3 runs as its own process: its whole peak RSS is reported). Every apply
output is checked against the new image's SHA-256.

Tools: ``ours`` (``otacore.delta.make_patch`` with the defaults of ``ota delta make``, the
Cython kernel), ``ours-py`` (the same in a child process with ``OTA_PURE_PYTHON=1``: the
pure-Python twin; its patch must be byte-identical to ``ours``), ``bsdiff4``,
``detools-bsdiff`` and ``detools-hdiffpatch`` (LZMA), ``xdelta3`` (``-9``),
``zstd-patch-from`` (python-zstandard, level 19 + long-distance matching, in process) and
``zstd-cli`` (``zstd -19 --long=W --patch-from=OLD``, the command-line tool, W covering
both images). Every patch of ours is also applied with ``ota delta apply`` (the CLI) and
compared with the new image.

Writes ``<name>.md`` (markdown tables), ``<name>.json`` and ``<name>.png`` into ``--out``
(default ``bench/delta/results``, name ``results``, or ``public-results`` with --public).
Run: ``python bench/delta/compare.py [--public] [--pairs a b] [--tools t ...]``.
Needs: pip ``bsdiff4 detools matplotlib``; Debian ``xdelta3`` and ``zstd``.
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
#: The public corpus's default: the issue's peers, zstd as its command-line tool.
PUBLIC_TOOLS = (
    "ours",
    "ours-py",
    "bsdiff4",
    "detools-bsdiff",
    "detools-hdiffpatch",
    "xdelta3",
    "zstd-cli",
)
#: Tools that are ours (the rest are peers, the yardstick).
OURS = ("ours", "ours-py")
ZSTD_CLI_LEVEL = 19


def zstd_cli_window_log(old_size: int, new_size: int) -> int:
    """``--long`` window log for ``zstd --patch-from``: the window must cover the old image
    (the dictionary) and the new one (zstd's manual, --patch-from)."""
    return max(10, min(27, math.ceil(math.log2(old_size + new_size + 1))))


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
    if tool == "ours-py":
        return _make_in_twin(old, new, workdir)[0]
    if tool == "zstd-cli":
        (workdir / "old").write_bytes(old)
        (workdir / "new").write_bytes(new)
        window_log = zstd_cli_window_log(len(old), len(new))
        subprocess.run(
            [
                "zstd",
                f"-{ZSTD_CLI_LEVEL}",
                f"--long={window_log}",
                "-q",
                "-f",
                f"--patch-from={workdir / 'old'}",
                str(workdir / "new"),
                "-o",
                str(workdir / "patch"),
            ],
            check=True,
            capture_output=True,
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


def _make_in_twin(old: bytes, new: bytes, workdir: Path) -> tuple[bytes, float]:
    """(patch, make seconds) from the pure-Python twin in a child process (the kernel is
    chosen once per process, at import): only the make itself is timed, in the child."""
    (workdir / "old").write_bytes(old)
    (workdir / "new").write_bytes(new)
    env = {**os.environ, "OTA_PURE_PYTHON": "1"}
    result = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child-make",
            str(workdir / "old"),
            str(workdir / "new"),
            str(workdir / "patch"),
        ],
        check=True,
        capture_output=True,
        text=True,
        env=env,
    )
    answer = json.loads(result.stdout.strip().splitlines()[-1])
    if answer["native"]:
        raise RuntimeError("OTA_PURE_PYTHON=1 did not select the pure-Python twin")
    return (workdir / "patch").read_bytes(), float(answer["seconds"])


def _warm_up() -> None:
    """Make one tiny patch first, so that imports and first-call set-up (numpy, zstd) are not
    charged to the first pair's make time."""
    from otacore import delta

    delta.make_patch(bytes(range(256)) * 16, bytes(range(255, -1, -1)) * 16)


def child_make(old_path: str, new_path: str, patch_path: str) -> None:
    """Child process: make one patch with whichever kernel this process loaded, print
    {"seconds", "native"} as JSON."""
    from otacore import delta

    _warm_up()
    old, new = Path(old_path).read_bytes(), Path(new_path).read_bytes()
    started = time.perf_counter()
    patch = delta.make_patch(old, new)
    seconds = time.perf_counter() - started
    Path(patch_path).write_bytes(patch)
    print(json.dumps({"seconds": seconds, "native": delta.NATIVE}))


def cli_apply_matches(old_path: Path, patch_path: Path, want_sha256: str, workdir: Path) -> bool:
    """Whether ``ota delta apply OLD PATCH OUT`` (the command-line tool) writes the new image."""
    ota = Path(sys.executable).with_name("ota")
    command = [str(ota)] if ota.exists() else [sys.executable, "-m", "server.cli.main"]
    out = workdir / "cli-out"
    out.unlink(missing_ok=True)
    result = subprocess.run(
        [*command, "delta", "apply", str(old_path), str(patch_path), str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    return result.returncode == 0 and hashlib.sha256(out.read_bytes()).hexdigest() == want_sha256


def _apply_in_process(tool: str, old: bytes, patch: bytes, new_size: int) -> Callable[[], bytes]:
    """A closure applying ``patch`` (everything it needs already loaded)."""
    if tool in OURS:
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


def _run_external(command: list[str], workdir: Path, what: str) -> tuple[float, int]:
    """(wall seconds, peak RSS KiB) of a command-line tool. Through GNU time when it is there:
    a child forked from this Python process would report this process's RSS as its peak
    (Linux keeps the pre-exec high-water mark), time's own footprint is ~2 MiB."""
    gnu_time = shutil.which("time") or ("/usr/bin/time" if Path("/usr/bin/time").exists() else "")
    report = workdir / "time.out"
    prefix = [gnu_time, "-f", "%M", "-o", str(report)] if gnu_time else []
    started = time.perf_counter()
    proc = subprocess.Popen([*prefix, *command])
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{what} failed")
    peak = int(report.read_text().split()[-1]) if gnu_time else usage.ru_maxrss
    return seconds, peak


def apply_patch(tool: str, old_path: Path, patch_path: Path, new_size: int, workdir: Path) -> dict:
    """Apply in a separate process; returns seconds, peak_kib and the output's sha256."""
    if tool == "zstd-cli":
        out = workdir / "out"
        window_log = zstd_cli_window_log(old_path.stat().st_size, new_size)
        seconds, peak = _run_external(
            [
                "zstd",
                "-d",
                "-q",
                "-f",
                f"--long={window_log}",
                f"--patch-from={old_path}",
                str(patch_path),
                "-o",
                str(out),
            ],
            workdir,
            "zstd -d --patch-from",
        )
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        return {"seconds": seconds, "peak_kib": peak, "sha256": digest}
    if tool == "xdelta3":
        out = workdir / "out"
        seconds, peak = _run_external(
            ["xdelta3", "-d", "-f", "-s", str(old_path), str(patch_path), str(out)],
            workdir,
            "xdelta3 -d",
        )
        digest = hashlib.sha256(out.read_bytes()).hexdigest()
        return {"seconds": seconds, "peak_kib": peak, "sha256": digest}
    twin = {"OTA_PURE_PYTHON": "1"} if tool == "ours-py" else {}
    result = subprocess.run(
        [sys.executable, __file__, "--child", tool, str(old_path), str(patch_path), str(new_size)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **twin},
    )
    answer: dict = json.loads(result.stdout.strip().splitlines()[-1])
    return answer


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (xdelta3 runs as one)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def measure(
    corpus: Path,
    pairs: list[str],
    tools: list[str],
    repeat: int,
    classes: dict[str, str] | None = None,
) -> list[dict]:
    """One row per (pair, tool): sizes, make and apply times, apply peak; ours also checked
    with ``ota delta apply`` and (the twin) for byte-identical patches."""
    rows = []
    classes = classes or {}
    if "ours" in tools:
        _warm_up()
    with tempfile.TemporaryDirectory(prefix="ota-delta-bench-") as tmp:
        workdir = Path(tmp)
        for pair in pairs:
            old_path, new_path = corpus / pair / "old.bin", corpus / pair / "new.bin"
            old, new = old_path.read_bytes(), new_path.read_bytes()
            want = hashlib.sha256(new).hexdigest()
            made: dict[str, bytes] = {}
            for tool in tools:
                make_seconds = make_cpu = math.inf
                if tool == "ours-py":  # ~30x slower than the kernel: one run, timed in the child
                    patch, make_seconds = _make_in_twin(old, new, workdir)
                    make_cpu = make_seconds
                else:
                    for _ in range(repeat):
                        started, cpu = time.perf_counter(), _cpu_seconds()
                        patch = make_patch(tool, old, new, workdir)
                        make_seconds = min(make_seconds, time.perf_counter() - started)
                        make_cpu = min(make_cpu, _cpu_seconds() - cpu)
                made[tool] = patch
                patch_path = workdir / f"{pair}.{tool}.patch"
                patch_path.write_bytes(patch)
                applied = apply_patch(tool, old_path, patch_path, len(new), workdir)
                if applied["sha256"] != want:
                    raise RuntimeError(f"{tool} did not reproduce {pair}")
                row = {
                    "pair": pair,
                    "class": classes.get(pair, ""),
                    "tool": tool,
                    "old_size": len(old),
                    "new_size": len(new),
                    "patch_size": len(patch),
                    "make_s": make_seconds,
                    "make_cpu_s": make_cpu,
                    "apply_s": applied["seconds"],
                    "apply_peak_kib": applied["peak_kib"],
                }
                if tool in OURS:
                    row["cli_apply_ok"] = cli_apply_matches(old_path, patch_path, want, workdir)
                    if not row["cli_apply_ok"]:
                        raise RuntimeError(f"ota delta apply did not reproduce {pair} ({tool})")
                if tool == "ours-py" and "ours" in made:
                    row["same_as_ours"] = patch == made["ours"]
                rows.append(row)
                print(
                    f"{pair:34s} {tool:20s} {len(patch):9d} B  make {make_seconds:7.3f} s "
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
    if len(sys.argv) > 1 and sys.argv[1] == "--child-make":
        child_make(sys.argv[2], sys.argv[3], sys.argv[4])
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--public",
        action="store_true",
        help="the public corpus (corpus-public, the issue's peers, tables per class)",
    )
    parser.add_argument("--corpus", type=Path, help="default: corpus, or corpus-public")
    parser.add_argument("--out", type=Path, default=HERE / "results")
    parser.add_argument("--name", help="file stem of the results (default results/public-results)")
    parser.add_argument("--pairs", nargs="*")
    parser.add_argument("--tools", nargs="*", help="default: all for the chosen corpus")
    parser.add_argument("--repeat", type=int, default=1, help="make runs per tool (best kept)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the rows of other pairs/tools already in <name>.json (run in parts)",
    )
    args = parser.parse_args()
    corpus = args.corpus or HERE / ("corpus-public" if args.public else "corpus")
    name = args.name or ("public-results" if args.public else "results")
    manifest_path = corpus / "manifest.json"
    if not manifest_path.exists():
        builder = "build_public_corpus.py" if args.public else "build_corpus.py"
        sys.exit(
            f"error: {manifest_path} is missing: build the corpus first (bench/delta/{builder})"
        )
    manifest = json.loads(manifest_path.read_text())
    pairs = args.pairs or list(manifest)
    unknown = [p for p in pairs if p not in manifest]
    if unknown:
        sys.exit(f"error: not in {manifest_path}: {', '.join(unknown)}")
    tools = args.tools or list(PUBLIC_TOOLS if args.public else TOOLS)
    missing = [t for t in ("xdelta3", "zstd") if shutil.which(t) is None]
    tools = [t for t in tools if not (t == "xdelta3" and "xdelta3" in missing)]
    tools = [t for t in tools if not (t == "zstd-cli" and "zstd" in missing)]
    if missing:
        print(f"note: {', '.join(missing)} not installed: left out", file=sys.stderr)
    classes = {pair: str(manifest[pair].get("class", "")) for pair in pairs}
    rows = measure(corpus, pairs, tools, args.repeat, classes)
    args.out.mkdir(parents=True, exist_ok=True)
    json_path = args.out / f"{name}.json"
    if args.merge and json_path.exists():
        fresh = {(r["pair"], r["tool"]) for r in rows}
        kept = [r for r in json.loads(json_path.read_text()) if (r["pair"], r["tool"]) not in fresh]
        order = list(manifest)
        rows = sorted(
            kept + rows,
            key=lambda r: (order.index(r["pair"]) if r["pair"] in order else len(order), r["tool"]),
        )
        tools = list(dict.fromkeys([*tools, *(r["tool"] for r in kept)]))
    json_path.write_text(json.dumps(rows, indent=1) + "\n")
    if args.public:
        from public_tables import public_markdown, public_plot

        text = public_markdown(rows)
        public_plot(rows, args.out / f"{name}.png")
    else:
        text = markdown(rows, tools)
        plot(rows, tools, args.out / f"{name}.png")
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
