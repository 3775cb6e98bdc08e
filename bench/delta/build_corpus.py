"""Build the firmware-pair corpus for the delta benchmarks (deterministic, seeded).

For each pair a seeded generator writes a firmware-like C program (modules of functions that
call each other, state machines with jump tables, string literals for logging, const tables,
function-pointer dispatch tables, RAM globals), mutates a copy of it the way a release does,
compiles both with the same flags and keeps the flat binaries:

* Cortex-M4: ``arm-none-eabi-gcc -mcpu=cortex-m4 -mthumb -Os``, a simple flash/RAM linker
  script, ``objcopy -O binary`` (Debian package ``gcc-arm-none-eabi``);
* x86-64: the host ``gcc -Os``, freestanding, same program shape (a different ISA).

Releases: ``patch`` (one function changed), ``minor`` (a few functions added early and a few
changed, so everything after shifts, plus new strings and globals), ``major`` (a third of
the functions rewritten, many added, tables edited). Output: ``bench/delta/corpus/<pair>/
{old,new}.bin`` and ``manifest.json`` (git-ignored). Run: ``python bench/delta/build_corpus.py``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import random
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "corpus"
WORDS = [
    "sensor",
    "link",
    "radio",
    "cloud",
    "flash",
    "ota",
    "chunk",
    "retry",
    "timeout",
    "battery",
    "charge",
    "gps",
    "fix",
    "modem",
    "socket",
    "packet",
    "crc",
    "header",
    "window",
    "ack",
    "frame",
    "queue",
    "buffer",
    "overflow",
    "underflow",
    "ready",
    "busy",
    "idle",
    "sleep",
    "wake",
    "config",
    "update",
    "reset",
    "fault",
    "bus",
    "spi",
    "i2c",
    "uart",
    "adc",
    "pwm",
    "timer",
    "rtc",
    "watchdog",
    "cell",
    "signal",
    "handshake",
    "session",
    "key",
    "cert",
    "token",
    "event",
    "publish",
    "subscribe",
    "variable",
    "function",
]


@dataclass
class Func:
    name: str
    body: list[str]


@dataclass
class Program:
    funcs: list[Func]
    tables: dict[str, bytes]
    globals_: list[str]  # struct field counts as C declarations
    strings_seed: int
    machines: int
    next_id: int = 0
    extra_files: dict[str, str] = field(default_factory=dict)


class Generator:
    """Seeded source of statements for one program."""

    def __init__(self, rng: random.Random, program: Program) -> None:
        self.rng = rng
        self.program = program

    def text(self) -> str:
        words = self.rng.sample(WORDS, self.rng.randint(2, 5))
        return " ".join(words) + (" %u" if self.rng.random() < 0.7 else "")

    def const(self) -> str:
        return f"0x{self.rng.getrandbits(self.rng.choice((4, 8, 16, 32))):X}u"

    def callee(self) -> str:
        return self.rng.choice(self.program.funcs).name if self.program.funcs else "leaf"

    def table_ref(self) -> tuple[str, int]:
        name = self.rng.choice(sorted(self.program.tables))
        return name, len(self.program.tables[name])

    def statement(self, depth: int = 0) -> str:
        r = self.rng
        kind = r.choices(
            ("arith", "call", "if", "loop", "log", "global", "switch", "pointer"),
            weights=(5, 5, 3, 2, 2, 3, 1 if depth == 0 else 0, 1),
        )[0]
        if kind == "arith":
            op = r.choice(("+=", "^=", "-=", "|="))
            return f"acc {op} (a * {self.const()}) ^ (b >> {r.randint(1, 13)});"
        if kind == "call":
            return f"acc += {self.callee()}(a ^ {self.const()}, acc);"
        if kind == "if":
            inner = self.statement(depth + 1)
            test = self.const()  # drawn before the else branch's constant (seeded order)
            other = f"b += {r.randint(1, 99)}u;"
            return f"if ((a & {test}) != 0u) {{ {inner} }} else {{ {other} }}"
        if kind == "loop":
            name, size = self.table_ref()
            mask = (1 << int(math.log2(size))) - 1
            return (
                f"for (i = 0; i < {r.randint(2, 16)}u; i++) {{ acc += {name}[(a + i) & {mask}u]; }}"
            )
        if kind == "log":
            return f'log_msg("{self.text()}", acc);'
        if kind == "global":
            index = r.randrange(len(self.program.globals_))
            return f"g_state{index}.f{r.randrange(4)} += acc ^ {self.const()};"
        if kind == "switch":
            machine = r.randrange(self.program.machines)
            cases = []
            for case in range(r.randint(4, 9)):
                cases.append(
                    f"case {case}u: {self.statement(depth + 1)} g_machine{machine} = "
                    f"{r.randint(0, 8)}u; break;"
                )
            return f"switch (g_machine{machine}) {{ {' '.join(cases)} default: acc = 0u; break; }}"
        return f"acc += callbacks[(a + {r.randint(0, 7)}u) & 7u](acc, b);"

    def function(self) -> Func:
        self.program.next_id += 1
        body = [self.statement() for _ in range(self.rng.randint(3, 14))]
        return Func(f"fn_{self.program.next_id:05d}", body)


def new_program(seed: int, functions: int, table_kib: int) -> Program:
    rng = random.Random(seed)
    tables: dict[str, bytes] = {}
    tables["sine"] = bytes(int(127.5 + 127.5 * math.sin(2 * math.pi * i / 256)) for i in range(256))
    tables["crc"] = b"".join((lambda c: c.to_bytes(4, "little"))(_crc_entry(i)) for i in range(256))
    tables["font"] = bytes(rng.choice((0, 0x18, 0x3C, 0x66, 0x7E, 0xC3)) for _ in range(2048))
    remaining = table_kib * 1024
    blob = 0
    while remaining > 0:  # certificates, radio/asset blobs: large incompressible const data
        size = min(remaining, 1 << rng.randint(14, 17))
        tables[f"blob{blob}"] = rng.randbytes(size)
        remaining -= size
        blob += 1
    program = Program([], tables, [], seed, machines=max(4, functions // 60))
    program.globals_ = [
        f"uint32_t f0, f1, f2, f3; uint8_t pad[{rng.randint(0, 64)}];"
        for _ in range(max(8, functions // 25))
    ]
    gen = Generator(rng, program)
    for _ in range(functions):
        program.funcs.append(gen.function())
    return program


def _crc_entry(i: int) -> int:
    c = i
    for _ in range(8):
        c = (c >> 1) ^ 0xEDB88320 if c & 1 else c >> 1
    return c


def mutate(program: Program, release: str, seed: int) -> Program:
    """A copy of ``program`` changed the way a ``patch``/``minor``/``major`` release is."""
    rng = random.Random(seed)
    result = replace(
        program,
        funcs=[Func(f.name, list(f.body)) for f in program.funcs],
        tables=dict(program.tables),
        globals_=list(program.globals_),
    )
    gen = Generator(rng, result)
    count = len(result.funcs)
    if release == "patch":
        target = result.funcs[rng.randrange(count)]
        target.body[rng.randrange(len(target.body))] = gen.statement()
        return result
    changed = 6 if release == "minor" else count // 3
    added = 5 if release == "minor" else count // 5
    for _ in range(added):  # new functions, placed early so that what follows shifts
        at = rng.randrange(max(1, count // 5 if release == "minor" else count))
        result.funcs.insert(at, gen.function())
    for _ in range(changed):
        victim = result.funcs[rng.randrange(len(result.funcs))]
        if release == "major" and rng.random() < 0.5:
            victim.body = gen.function().body
        else:
            victim.body[rng.randrange(len(victim.body))] = gen.statement()
            victim.body.insert(rng.randrange(len(victim.body) + 1), gen.statement())
    for _ in range(2 if release == "minor" else 10):  # new globals shift RAM addresses
        result.globals_.insert(rng.randrange(len(result.globals_)), "uint32_t f0, f1, f2, f3;")
    if release == "major":
        name = "font"
        data = bytearray(result.tables[name])
        data[100:400] = rng.randbytes(300)
        result.tables[name] = bytes(data)
    return result


def render(program: Program, isa: str, modules: int) -> dict[str, str]:
    """The C sources of ``program``: a header, ``modules`` code files and main.c."""
    decls = [f"uint32_t {f.name}(uint32_t a, uint32_t b);" for f in program.funcs]
    header = [
        "#include <stdint.h>",
        "typedef uint32_t (*callback_t)(uint32_t, uint32_t);",
        "void log_msg(const char *text, uint32_t value);",
        "uint32_t leaf(uint32_t a, uint32_t b);",
        *decls,
        *(f"extern const uint8_t {name}[{len(data)}];" for name, data in program.tables.items()),
        *(
            f"struct state{i} {{ {g} }}; extern struct state{i} g_state{i};"
            for i, g in enumerate(program.globals_)
        ),
        *(f"extern volatile uint32_t g_machine{m};" for m in range(program.machines)),
        "extern const callback_t callbacks[8];",
    ]
    files = {"program.h": "\n".join(header) + "\n"}
    per_module = math.ceil(len(program.funcs) / modules)
    for m in range(modules):
        lines = ['#include "program.h"']
        for func in program.funcs[m * per_module : (m + 1) * per_module]:
            lines.append(f"uint32_t {func.name}(uint32_t a, uint32_t b) {{")
            lines.append("    uint32_t acc = a ^ b; uint32_t i;")
            lines.extend(f"    {s}" for s in func.body)
            lines.append("    (void)i; return acc ^ (b << 1);\n}")
        files[f"module{m:02d}.c"] = "\n".join(lines) + "\n"
    data_lines = ['#include "program.h"']
    for name, data in program.tables.items():
        body = ",".join(str(b) for b in data)
        data_lines.append(f"const uint8_t {name}[{len(data)}] = {{{body}}};")
    for i, _ in enumerate(program.globals_):
        data_lines.append(f"struct state{i} g_state{i} = {{ {i}u, {i * 3}u }};")
    for m in range(program.machines):
        data_lines.append(f"volatile uint32_t g_machine{m};")
    files["data.c"] = "\n".join(data_lines) + "\n"
    funcs = [f.name for f in program.funcs]
    callbacks = ", ".join(funcs[i * max(1, len(funcs) // 8)] for i in range(8))
    dispatch = ", ".join(funcs)
    vectors = (
        '__attribute__((section(".isr_vector"), used)) const void *const vectors[4] = {'
        "(const void *)0x20040000u, (const void *)reset_handler, (const void *)reset_handler,"
        " (const void *)reset_handler};"
        if isa == "arm"
        else ""
    )
    uart = "0x40004000u" if isa == "arm" else "0x3F8u"
    files["main.c"] = f"""#include "program.h"
void *memcpy(void *d, const void *s, unsigned long n) {{
    uint8_t *o = d; const uint8_t *i = s; while (n--) *o++ = *i++; return d; }}
void *memset(void *d, int v, unsigned long n) {{
    uint8_t *o = d; while (n--) *o++ = (uint8_t)v; return d; }}
void log_msg(const char *text, uint32_t value) {{
    volatile uint32_t *uart = (volatile uint32_t *){uart};
    while (*text) *uart = (uint32_t)*text++;
    *uart = value; }}
uint32_t leaf(uint32_t a, uint32_t b) {{ return a * 3u + b; }}
const callback_t callbacks[8] = {{ {callbacks} }};
static const callback_t dispatch[] = {{ {dispatch} }};
void reset_handler(void) {{
    uint32_t acc = 1u;
    for (;;) {{
        for (uint32_t k = 0; k < sizeof dispatch / sizeof dispatch[0]; k++)
            acc = dispatch[k](acc, k);
        log_msg("loop", acc);
    }}
}}
{vectors}
"""
    return files


ARM_LD = """MEMORY {{ FLASH (rx) : ORIGIN = {base:#x}, LENGTH = 8M
          RAM (rwx) : ORIGIN = 0x20000000, LENGTH = 1M }}
ENTRY(reset_handler)
SECTIONS {{
  .isr_vector : {{ KEEP(*(.isr_vector)) }} > FLASH
  .text : {{ *(.text*) *(.rodata*) . = ALIGN(4); }} > FLASH
  .data : {{ *(.data*) . = ALIGN(4); }} > RAM AT > FLASH
  .bss : {{ *(.bss*) *(COMMON) }} > RAM
}}
"""
X86_LD = """ENTRY(reset_handler)
SECTIONS {{
  . = {base:#x};
  .text : {{ *(.text*) }}
  .rodata : {{ *(.rodata*) }}
  .data : {{ *(.data*) }}
  .bss : {{ *(.bss*) *(COMMON) }}
  /DISCARD/ : {{ *(.comment) *(.note*) *(.eh_frame*) }}
}}
"""


def compile_program(program: Program, isa: str, base: int, workdir: Path) -> bytes:
    """Compile ``program`` for ``isa`` ("arm" or "x86") and return the flat binary."""
    modules = max(1, len(program.funcs) // 250)
    workdir.mkdir(parents=True, exist_ok=True)
    for name, text in render(program, isa, modules).items():
        (workdir / name).write_text(text)
    common = [
        "-Os",
        "-ffunction-sections",
        "-fdata-sections",
        "-ffreestanding",
        "-fno-builtin",
        "-fno-common",
        "-w",
    ]
    if isa == "arm":
        cc, objcopy = "arm-none-eabi-gcc", "arm-none-eabi-objcopy"
        flags = ["-mcpu=cortex-m4", "-mthumb", *common]
        (workdir / "link.ld").write_text(ARM_LD.format(base=base))
    else:
        cc, objcopy = "gcc", "objcopy"
        flags = ["-fno-pie", "-fno-asynchronous-unwind-tables", "-fno-stack-protector", *common]
        (workdir / "link.ld").write_text(X86_LD.format(base=base))
    sources = sorted(p.name for p in workdir.glob("*.c"))

    def build_object(source: str) -> str:
        obj = source.replace(".c", ".o")
        subprocess.run([cc, *flags, "-c", source, "-o", obj], cwd=workdir, check=True)
        return obj

    with ThreadPoolExecutor(max_workers=2) as pool:
        objects = list(pool.map(build_object, sources))
    link = [
        cc,
        *flags,
        "-nostdlib",
        "-Wl,--gc-sections",
        "-Wl,--build-id=none",
        "-T",
        "link.ld",
        "-o",
        "fw.elf",
        *objects,
    ]
    if isa == "arm":
        link.append("-lgcc")
    else:
        link[1:1] = ["-no-pie", "-static", "-Wl,--no-warn-rwx-segments"]
    subprocess.run(link, cwd=workdir, check=True)
    subprocess.run([objcopy, "-O", "binary", "fw.elf", "fw.bin"], cwd=workdir, check=True)
    return (workdir / "fw.bin").read_bytes()


@dataclass(frozen=True)
class PairSpec:
    name: str
    isa: str
    functions: int
    table_kib: int
    release: str
    seed: int
    base: int


PAIRS = (
    PairSpec("app-patch", "arm", 150, 8, "patch", 11, 0x000D4000),
    PairSpec("app-minor", "arm", 500, 16, "minor", 12, 0x000D4000),
    PairSpec("app-major", "arm", 500, 16, "major", 13, 0x000D4000),
    PairSpec("sys-patch", "arm", 2400, 96, "patch", 21, 0x00030000),
    PairSpec("sys-minor", "arm", 2400, 96, "minor", 22, 0x00030000),
    PairSpec("sys-major", "arm", 2400, 96, "major", 23, 0x00030000),
    PairSpec("big-minor", "arm", 3200, 900, "minor", 31, 0x08000000),
    PairSpec("x86-minor", "x86", 900, 16, "minor", 41, 0x00400000),
)


def build(out: Path, only: set[str] | None) -> dict[str, dict[str, object]]:
    tools = {"arm": "arm-none-eabi-gcc", "x86": "gcc"}
    manifest: dict[str, dict[str, object]] = {}
    with tempfile.TemporaryDirectory(prefix="ota-corpus-") as tmp:
        for spec in PAIRS:
            if only and spec.name not in only:
                continue
            if shutil.which(tools[spec.isa]) is None:
                print(f"skip {spec.name}: {tools[spec.isa]} is not installed", file=sys.stderr)
                continue
            old_program = new_program(spec.seed, spec.functions, spec.table_kib)
            new_prog = mutate(old_program, spec.release, spec.seed * 1000 + 7)
            images = {}
            for label, prog in (("old", old_program), ("new", new_prog)):
                images[label] = compile_program(
                    prog, spec.isa, spec.base, Path(tmp) / spec.name / label
                )
            target = out / spec.name
            target.mkdir(parents=True, exist_ok=True)
            for label, data in images.items():
                (target / f"{label}.bin").write_bytes(data)
            manifest[spec.name] = {
                "isa": spec.isa,
                "release": spec.release,
                "old_size": len(images["old"]),
                "new_size": len(images["new"]),
                "old_sha256": hashlib.sha256(images["old"]).hexdigest(),
                "new_sha256": hashlib.sha256(images["new"]).hexdigest(),
            }
            print(f"{spec.name}: old {len(images['old'])} B, new {len(images['new'])} B")
    existing = {}
    if (out / "manifest.json").exists():
        existing = json.loads((out / "manifest.json").read_text())
    existing.update(manifest)
    (out / "manifest.json").write_text(json.dumps(existing, indent=2, sort_keys=True) + "\n")
    return manifest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--only", nargs="*", help="pair names to build (default: all)")
    args = parser.parse_args()
    build(args.out, set(args.only) if args.only else None)


if __name__ == "__main__":
    main()
