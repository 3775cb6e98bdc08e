"""bench/delta/build_public_corpus.py and its manifest: the public delta corpus's provenance.

No registry is asked here: the archives are made in the test and put where the builder's
cache would hold them, so the checksum checks, extraction and conversions run for real.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import re
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "delta"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


builder = _load("build_public_corpus")


def test_manifest_covers_every_class_with_successive_real_pairs() -> None:
    archives, pairs = builder.load_manifest()
    assert len(pairs) >= 24
    assert {pair["class"] for pair in pairs.values()} == set(builder.CLASSES)
    for name, pair in pairs.items():
        old, new = pair["old"], pair["new"]
        for image in (old, new):
            assert re.fullmatch(r"[0-9a-f]{64}", image["sha256"]), name
            assert 3 * 1024 <= image["size"] <= 1600 * 1024, name
        assert old["sha256"] != new["sha256"], name
        # Two releases of one image: the same package (or the same file in one package).
        assert archives[old["archive"]].package == archives[new["archive"]].package, name
        assert old["archive"] != new["archive"] or old["member"] != new["member"], name
    for archive in archives.values():
        assert re.fullmatch(r"[0-9a-f]{64}", archive.sha256)
        assert archive.registry in ("debian", "pypi", "npm")
    registries = {
        archives[p[s]["archive"]].registry for p in pairs.values() for s in ("old", "new")
    }
    assert registries == {"debian", "pypi", "npm"}


def _npm_tarball(members: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _write_manifest(path: Path, archive_bytes: bytes, images: dict[str, bytes]) -> None:
    digest = hashlib.sha256(archive_bytes).hexdigest()
    sides = {
        side: (
            f'{side} = {{ archive = "a", member = "package/{side}.bin", '
            f'sha256 = "{hashlib.sha256(data).hexdigest()}", size = {len(data)} }}'
        )
        for side, data in images.items()
    }
    path.write_text(
        f"""
[archives.a]
registry = "npm"
package = "example-firmware"
version = "1.0.0"
file = "example-firmware-1.0.0.tgz"
sha256 = "{digest}"
licence = "test"

[[pairs]]
name = "p"
class = "cortex-m-app"
{sides["old"]}
{sides["new"]}
"""
    )


def test_builds_pairs_from_cached_archives_and_writes_the_manifest(tmp_path: Path) -> None:
    old, new = b"\x01\x02" * 4000, b"\x01\x03" * 4000
    tarball = _npm_tarball({"package/old.bin": old, "package/new.bin": new})
    (tmp_path / "cache" / "npm").mkdir(parents=True)
    (tmp_path / "cache" / "npm" / "example-firmware-1.0.0.tgz").write_bytes(tarball)
    manifest = tmp_path / "corpus.toml"
    _write_manifest(manifest, tarball, {"old": old, "new": new})
    out = tmp_path / "out"
    argv = ["--manifest", str(manifest), "--cache", str(tmp_path / "cache"), "--out", str(out)]
    assert builder.main(argv) == 0
    assert (out / "p" / "old.bin").read_bytes() == old
    assert (out / "p" / "new.bin").read_bytes() == new
    listing = json.loads((out / "manifest.json").read_text())
    assert listing["p"]["class"] == "cortex-m-app"
    assert listing["p"]["new_size"] == len(new)


def test_refuses_an_archive_whose_checksum_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = b"a" * 5000, b"b" * 5000
    tarball = _npm_tarball({"package/old.bin": old, "package/new.bin": new})
    manifest = tmp_path / "corpus.toml"
    _write_manifest(manifest, tarball, {"old": old, "new": new})
    (tmp_path / "cache" / "npm").mkdir(parents=True)
    (tmp_path / "cache" / "npm" / "example-firmware-1.0.0.tgz").write_bytes(tarball + b"\0")
    argv = ["--manifest", str(manifest), "--cache", str(tmp_path / "cache")]
    assert builder.main([*argv, "--out", str(tmp_path / "out")]) == 1
    message = capsys.readouterr().err
    assert "checksum mismatch for npm archive example-firmware-1.0.0.tgz" in message
    assert hashlib.sha256(tarball).hexdigest() in message
    assert not (tmp_path / "out").exists()


def test_refuses_an_image_whose_checksum_differs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    old, new = b"a" * 5000, b"b" * 5000
    tarball = _npm_tarball({"package/old.bin": old, "package/new.bin": new})
    manifest = tmp_path / "corpus.toml"
    _write_manifest(manifest, tarball, {"old": old, "new": new + b"!"})
    (tmp_path / "cache" / "npm").mkdir(parents=True)
    (tmp_path / "cache" / "npm" / "example-firmware-1.0.0.tgz").write_bytes(tarball)
    argv = ["--manifest", str(manifest), "--cache", str(tmp_path / "cache")]
    assert builder.main([*argv, "--out", str(tmp_path / "out")]) == 1
    assert "checksum mismatch for pair p (new: package/new.bin)" in capsys.readouterr().err


def test_manifest_errors_name_the_entry(tmp_path: Path) -> None:
    manifest = tmp_path / "bad.toml"
    manifest.write_text('[[pairs]]\nname = "x"\nclass = "toaster"\n')
    with pytest.raises(builder.CorpusError, match="pair 'x': class must be one of"):
        builder.load_manifest(manifest)
    manifest.write_text('[archives.a]\nregistry = "debian"\n')
    with pytest.raises(builder.CorpusError, match=r"archive 'a' in bad\.toml lacks"):
        builder.load_manifest(manifest)


def test_esptool_stub_is_text_then_data() -> None:
    stub = {
        "entry": 1074521580,
        "text": base64.b64encode(b"TEXT").decode(),
        "text_start": 1074520064,
        "data": base64.b64encode(b"DATA").decode(),
        "data_start": 1073605544,
    }
    image = builder.convert(json.dumps(stub).encode(), {"convert": "esptool-stub"})
    assert image == b"TEXTDATA"


def test_zip_member() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("firmware-base.bin", b"\x00\x20\x00\x20")
        archive.writestr("firmware.metadata.json", b"{}")
    image = builder.convert(out.getvalue(), {"convert": "zip", "inner": "firmware-base.bin"})
    assert image == b"\x00\x20\x00\x20"


def _hex_text() -> str:
    intelhex = pytest.importorskip("intelhex")
    image = intelhex.IntelHex()
    image.puts(0x0000, b"\x11\x22")
    image.puts(0x0008, b"\x33")
    image.puts(0x10001014, b"\x00\x80\x07\x00")  # nRF UICR bootloader address: not flash
    text = io.StringIO()
    image.write_hex_file(text)
    return text.getvalue()


def test_ihex_is_flattened_below_the_limit_with_erased_gaps() -> None:
    text = _hex_text()
    image = builder.convert(text.encode(), {"convert": "ihex", "below": 0x10000000})
    assert image == b"\x11\x22" + b"\xff" * 6 + b"\x33"


def test_python_hex_constant_is_read_without_running_the_module() -> None:
    text = _hex_text()
    module = f"import sys\nsys.exit('never run')\n_RUNTIME = {text!r}\n".encode()
    image = builder.convert(
        module, {"convert": "python-hex-constant", "inner": "_RUNTIME", "member": "m.py"}
    )
    assert image == b"\x11\x22" + b"\xff" * 6 + b"\x33"
    with pytest.raises(builder.CorpusError, match="no constant '_OTHER'"):
        builder.convert(
            module, {"convert": "python-hex-constant", "inner": "_OTHER", "member": "m.py"}
        )


def test_unknown_conversion_is_refused() -> None:
    with pytest.raises(builder.CorpusError, match="unknown conversion 'elf'"):
        builder.convert(b"", {"convert": "elf"})


tables = _load("public_tables")
anatomy = _load("patch_anatomy")


def _row(pair: str, cls: str, tool: str, size: int, make: float = 1.0) -> dict:
    return {
        "pair": pair,
        "class": cls,
        "tool": tool,
        "old_size": 1000,
        "new_size": 1000,
        "patch_size": size,
        "make_s": make,
        "make_cpu_s": make,
        "apply_s": 0.1,
        "apply_peak_kib": 100,
        **({"cli_apply_ok": True} if tool == "ours" else {}),
    }


def test_public_tables_compare_against_each_pairs_best_peer() -> None:
    rows = [
        _row("a", "riscv", "ours", 110, make=2.0),
        _row("a", "riscv", "bsdiff4", 100),
        _row("a", "riscv", "zstd-cli", 120, make=4.0),
        _row("b", "xtensa", "ours", 50, make=2.0),
        _row("b", "xtensa", "bsdiff4", 80),
        _row("b", "xtensa", "zstd-cli", 60, make=4.0),
    ]
    text = tables.public_markdown(rows)
    assert "| a | riscv | 1000 → 1000 | 110 | **100** | 120 | bsdiff4 | 1.10 ⚠ |" in text
    assert "| b | xtensa | 1000 → 1000 | **50** | 80 | 60 | zstd-cli | 0.83 |" in text
    # all: ours 160 against best-each 160 (100 + 60) and bsdiff4's total 180; one pair > 5%.
    assert "| **all** | 2 | 160 | 160 | 1.00 | 180 | 180 | 0.89 (bsdiff4) | 1 |" in text
    assert "| ours | 160 | 4.00 | 0.50 |" in text
    assert "byte-exact for 2 of 2 patches" in text


def test_anatomy_walk_accounts_for_every_byte_of_the_new_image() -> None:
    from otacore import delta

    old = bytes(range(256)) * 64
    new = old[:5000] + b"brand new bytes" * 20 + old[5000:12000] + bytes(300) + old[12000:]
    walked = anatomy.walk(delta.make_patch(old, new), old)
    # copies (difference bytes for the non-exact ones only) and literals make the image
    assert walked["copied"] + len(walked["extra"]) == len(new)
    assert len(walked["diff"]) <= walked["copied"]
    assert b"brand new bytes" in walked["extra"]
    assert walked["entries"] >= 2
    assert anatomy.extra_in_old(old, new, delta.make_patch(old, new)) <= len(walked["extra"])


def test_compare_public_runs_ours_the_twin_and_zstd_end_to_end(tmp_path: Path) -> None:
    """compare.py --public on a one-pair corpus: real patches, ``ota delta apply`` checks,
    the twin in its own process, the zstd command-line tool, tables and plot written."""
    import shutil
    import subprocess

    pytest.importorskip("matplotlib")
    if shutil.which("zstd") is None:
        pytest.skip("Debian zstd is not installed")
    corpus = tmp_path / "corpus"
    (corpus / "p").mkdir(parents=True)
    old = bytes(range(256)) * 40
    new = old[:3000] + b"a release note" * 10 + old[3000:]
    (corpus / "p" / "old.bin").write_bytes(old)
    (corpus / "p" / "new.bin").write_bytes(new)
    (corpus / "manifest.json").write_text(json.dumps({"p": {"class": "riscv"}}))
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH / "compare.py"),
            "--public",
            "--corpus",
            str(corpus),
            "--out",
            str(out),
            "--tools",
            "ours",
            "ours-py",
            "zstd-cli",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    rows = {r["tool"]: r for r in json.loads((out / "public-results.json").read_text())}
    assert rows["ours"]["cli_apply_ok"] and rows["ours-py"]["cli_apply_ok"]
    assert rows["ours-py"]["same_as_ours"]
    assert rows["zstd-cli"]["patch_size"] > 0
    assert "| p | riscv | 10240 → 10380 |" in (out / "public-results.md").read_text()
    assert (out / "public-results.png").stat().st_size > 0
