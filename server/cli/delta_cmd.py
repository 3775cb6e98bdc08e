"""``ota delta``: make, apply and inspect binary delta patches between firmware images.

``apply`` streams the patch into a temporary file beside OUT and renames it only after the
target size and SHA-256 check out, so OUT is either byte-identical to the new image or left
untouched. Every failure is one line on stderr and exit status 1.
"""

from __future__ import annotations

import lzma
import os
import time
from pathlib import Path

import typer

from otacore import delta, delta_codec, delta_maker, delta_strategy
from otacore.delta_stream import PatchApplier
from otacore.errors import OtaError

app = typer.Typer(
    name="delta",
    help="Binary delta patches between firmware images (OTAD format).",
    no_args_is_help=True,
    add_completion=False,
)

_READ_PIECE = 1 << 16


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(code=1)


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise _fail(f"cannot read {what} {path}: {exc.strerror or exc}") from None


@app.command()
def make(
    old: Path = typer.Argument(..., help="Base (old) firmware image."),
    new: Path = typer.Argument(..., help="Target (new) firmware image."),
    patch: Path = typer.Argument(..., help="Where to write the patch."),
    level: int | None = typer.Option(
        None, min=1, max=22, help="zstd level of the payload (default: a tuned level-19 profile)."
    ),
    window_log: int = typer.Option(
        delta.DEFAULT_WINDOW_LOG,
        min=10,
        max=delta.MAX_WINDOW_LOG,
        help="Window log: the applier needs 2^N bytes for the codec's window (lzma2: N >= 12).",
    ),
    effort: int = typer.Option(
        delta_strategy.DEFAULT_EFFORT,
        min=1,
        max=delta_strategy.MAX_EFFORT,
        help="Strategies (filter sets) made in full, the smallest patch kept: make time grows "
        "about linearly with it; images under 128 KiB get more within the same budget; 1 is "
        "the detector's choice alone.",
    ),
    codec: str = typer.Option(
        "auto",
        help="Payload codec: auto (the smaller of zstd and lzma2), zstd (what version-1 "
        "appliers and the smallest decoders have) or lzma2. Both need the same window.",
    ),
    lzma_preset: int = typer.Option(
        9, min=0, max=9, help="liblzma preset of the lzma2 codec (9: strongest)."
    ),
    lzma_extreme: bool = typer.Option(
        False, help="liblzma's extreme variant of the preset (about 0.4% smaller, the LZMA2 "
        "pass about twice as slow)."
    ),
    format_version: int = typer.Option(
        delta.NEWEST_VERSION, "--format-version", min=2, max=delta.NEWEST_VERSION,
        help="Newest patch format to write: 4 for devices whose applier reads no version 5 "
        "(sparse columns), 3 for those that read no version 4 (control entries in columns), "
        "2 for those that read no version 3 (exact copies, literal branch conversion); the "
        "patch is then larger.",
    ),
    workers: int = typer.Option(
        delta_maker.DEFAULT_WORKERS, min=1, max=delta_maker.MAX_WORKERS,
        help="Threads the making uses: codec passes overlap each other and the next "
        "strategy (the patch is the same with any number).",
    ),
) -> None:
    """Write a patch that turns OLD into NEW."""
    try:
        codecs = delta_codec.codecs_named(codec)
    except OtaError as exc:
        raise _fail(str(exc)) from None
    old_image = _read(old, "old image")
    new_image = _read(new, "new image")
    started = time.perf_counter()
    try:
        result = delta_maker.search_patch(
            old_image,
            new_image,
            level=level,
            window_log=window_log,
            effort=effort,
            codecs=codecs,
            lzma_preset=lzma_preset | (lzma.PRESET_EXTREME if lzma_extreme else 0),
            workers=workers,
            format_version=format_version,
        )
    except OtaError as exc:
        raise _fail(str(exc)) from None
    elapsed = time.perf_counter() - started
    data = result.patch
    try:
        patch.write_bytes(data)
    except OSError as exc:
        raise _fail(f"cannot write patch {patch}: {exc.strerror or exc}") from None
    ratio = 100.0 * len(data) / max(1, len(new_image))
    tried = ", ".join(
        f"{delta_strategy.strategy_name(strategy)} {size}" for strategy, size in result.tried
    )
    codec_name = delta.CODEC_NAMES[delta.read_header(data).codec]
    typer.echo(
        f"{patch}: {len(data)} bytes ({ratio:.2f}% of {len(new_image)}), made in {elapsed:.2f} s; "
        f"strategy {delta_strategy.strategy_name(result.strategy)} of {len(result.tried)} tried "
        f"({tried}; zstd sizes), codec {codec_name}"
    )


@app.command()
def apply(
    old: Path = typer.Argument(..., help="Base (old) firmware image the patch was made for."),
    patch: Path = typer.Argument(..., help="The patch."),
    out: Path = typer.Argument(..., help="Where to write the new image."),
) -> None:
    """Apply PATCH to OLD, writing the verified new image to OUT."""
    temporary = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        with (
            old.open("rb") as old_file,
            patch.open("rb") as patch_file,
            temporary.open("wb") as sink,
        ):
            applier = PatchApplier(
                old_file,
                sink,
                max_window_log=delta.MAX_WINDOW_LOG,
                max_block_limit=delta.MAX_BLOCK_LIMIT,
            )
            while piece := patch_file.read(_READ_PIECE):
                applier.feed(piece)
            header = applier.finish()
        os.replace(temporary, out)
    except OtaError as exc:
        temporary.unlink(missing_ok=True)
        raise _fail(str(exc)) from None
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        name = exc.filename or ""
        raise _fail(f"{exc.strerror or exc}{': ' + str(name) if name else ''}") from None
    digest = "SHA-256" if len(header.target_sha256) == 32 else "SHA-256 prefix"
    typer.echo(f"{out}: {header.target_size} bytes, {digest} {header.target_sha256.hex()} verified")


@app.command()
def info(patch: Path = typer.Argument(..., help="The patch.")) -> None:
    """Print a patch's header."""
    data = _read(patch, "patch")
    try:
        header = delta.read_header(data)
    except OtaError as exc:
        raise _fail(str(exc)) from None
    digest = "SHA-256" if len(header.target_sha256) == 32 else "SHA-256 prefix"
    typer.echo(f"format version: {header.version}")
    typer.echo(f"base: {header.base_size} bytes, {digest} {header.base_sha256.hex()}")
    typer.echo(f"target: {header.target_size} bytes, {digest} {header.target_sha256.hex()}")
    codec = delta.CODEC_NAMES[header.codec]
    if header.codec == delta.CODEC_LZMA2:
        lc, lp, pb = delta.lzma_props(header.lzma_props)
        codec += f" (lc={lc} lp={lp} pb={pb})"
    typer.echo(f"payload: {header.payload_size} bytes, {codec}, window 2^{header.window_log}")
    typer.echo(f"header: {header.size} bytes")
    typer.echo(f"block limit: {header.block_limit} bytes")
