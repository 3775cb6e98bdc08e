"""Where a py-spy profile's CPU went, by part (benchmark helper, not a test).

    .venv/bin/python bench/sessions/profile_shares.py PROFILE.json [--top 25] [--per UNITS]

Reads a speedscope file written by ``py-spy record -f speedscope`` (as ``plane_ping_cost.py
--profile`` writes them) or a collapsed "raw" file (as ``ota bench fleet --profile`` writes
``server-profile.txt``); py-spy samples only threads that are
running, not those waiting in ``epoll_wait``, so samples are CPU) and prints:

- the share of samples whose innermost frame is in each part (self time: trio's run loop,
  trio's sockets, otacore, the server package, SQLAlchemy, pyOpenSSL, `cryptography`, the
  standard library...);
- the share of samples with a frame of each part anywhere on the stack (inclusive time);
- the ``--top`` functions by self time.

With ``--per UNITS --cpu SECONDS`` each share is also printed as microseconds per unit (e.g.
the server CPU seconds of the pinged phase and the number of pings).

py-spy's idle detection does not see two waits of a trio server as idle: ``epoll.poll`` in
trio's ``EpollIOManager.get_events`` (the run loop blocked in ``epoll_wait``) and
``WorkerThread._work`` (a cached worker thread blocked on its lock). Samples whose innermost
frame is one of ``--waits`` are dropped (on the plane-ping profiles the samples left match the
CPU seconds read from /proc within 1%); the kernel's share of an ``epoll_wait`` that returns
at once is lost with them.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from pathlib import Path
from typing import Any

#: (part, substring of a frame's file); the first that matches names the part.
PARTS: tuple[tuple[str, str], ...] = (
    ("trio run loop (_core/_run, epoll, timeouts)", "trio/_core/"),
    ("trio sockets/streams/ssl", "/trio/"),
    ("otacore (records, CoAP, transfer)", "/otacore/"),
    ("server/transport (endpoints, sessions)", "/server/transport/"),
    ("server/devices (link, device plane)", "/server/devices/"),
    ("server/store", "/server/store/"),
    ("server (other)", "/server/"),
    ("SQLAlchemy", "/sqlalchemy/"),
    ("pyOpenSSL", "/OpenSSL/"),
    ("cryptography", "/cryptography/"),
    ("outcome/sniffio/attrs", "/outcome/"),
    ("stdlib", "/lib/python3"),
)


def part_of(file: str) -> str:
    """The part a source file belongs to (absolute as in speedscope files, or relative to
    its sys.path entry as in raw ones, where a bare name is a standard-library module)."""
    if file and not file.startswith(("/", "<")):
        file = ("/" if "/" in file else "/lib/python3/") + file
    for part, marker in PARTS:
        if marker in file and (part != "stdlib" or "site-packages" not in file):
            return part
    return "other (native, builtins, site-packages)"


WAITS: tuple[str, ...] = ("EpollIOManager.get_events", "WorkerThread._work")


def analyse(profile: dict[str, Any], top: int, waits: tuple[str, ...] = WAITS) -> dict[str, Any]:
    """Self and inclusive shares by part, and the top self functions, without the samples
    whose innermost frame is a function named in ``waits``."""
    frames = profile["shared"]["frames"]
    parts = [part_of(frame.get("file", "") or "") for frame in frames]
    self_by_part: Counter[str] = Counter()
    incl_by_part: Counter[str] = Counter()
    self_by_function: Counter[str] = Counter()
    total = 0.0
    waited = 0.0
    for run in profile["profiles"]:
        for stack, weight in zip(run["samples"], run["weights"], strict=True):
            if not stack:
                continue
            leaf = frames[stack[-1]]
            if leaf["name"] in waits:
                waited += weight
                continue
            total += weight
            self_by_part[parts[stack[-1]]] += weight
            name = f"{leaf['name']} ({Path(leaf.get('file') or '?').name}:{leaf.get('line', 0)})"
            self_by_function[name] += weight
            for part in {parts[index] for index in stack}:
                incl_by_part[part] += weight
    return {
        "samples": total,
        "waited": waited,
        "self": {part: count / total for part, count in self_by_part.most_common()},
        "inclusive": {part: count / total for part, count in incl_by_part.most_common()},
        "top_self": [(name, count / total) for name, count in self_by_function.most_common(top)],
    }


_RAW_FRAME = re.compile(r"^(?P<name>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def speedscope_from_raw(text: str) -> dict[str, Any]:
    """A collapsed-stack file ("frame;frame;... count" per line) as a speedscope-shaped dict,
    so one analysis reads both formats."""
    frames: list[dict[str, Any]] = []
    index: dict[str, int] = {}
    samples: list[list[int]] = []
    weights: list[float] = []
    for line in text.splitlines():
        stack_text, _, count = line.rpartition(" ")
        if not stack_text or not count.isdigit():
            continue
        stack = []
        for frame in stack_text.split(";"):
            if frame not in index:
                match = _RAW_FRAME.match(frame)
                name, file = (match["name"], match["file"]) if match else (frame, "")
                index[frame] = len(frames)
                frames.append({"name": name, "file": file,
                               "line": int(match["line"] or 0) if match else 0})
            stack.append(index[frame])
        samples.append(stack)
        weights.append(float(count))
    return {"shared": {"frames": frames}, "profiles": [{"samples": samples, "weights": weights}]}


def main() -> None:
    """Print the shares of one profile."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("profile", type=Path)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--per", type=int, default=0, help="units (pings, MB) in the profile")
    parser.add_argument("--cpu", type=float, default=0.0, help="server CPU seconds they cost")
    parser.add_argument("--waits", nargs="*", default=list(WAITS),
                        help="functions whose samples are waits, not CPU")
    args = parser.parse_args()
    text = args.profile.read_text()
    profile = json.loads(text) if text.lstrip().startswith("{") else speedscope_from_raw(text)
    shares = analyse(profile, args.top, tuple(args.waits))
    scale = args.cpu / args.per * 1e6 if args.per and args.cpu else 0.0
    unit = "  {:7.1f} us/unit" if scale else ""
    # Weights are seconds in speedscope files and sample counts in raw ones.
    print(f"{shares['samples']:.2f} sampled running,"
          f" {shares['waited']:.2f} waiting (dropped)")
    for title in ("self", "inclusive"):
        print(f"-- {title} share by part")
        for part, share in shares[title].items():
            print(f"{share:7.1%}  {part}" + (unit.format(share * scale) if scale else ""))
    print("-- top functions by self time")
    for name, share in shares["top_self"]:
        print(f"{share:7.1%}  {name}" + (unit.format(share * scale) if scale else ""))


if __name__ == "__main__":
    main()
