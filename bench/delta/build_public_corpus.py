"""Rebuild the public delta corpus: real release pairs from Debian, PyPI and npm.

``public_corpus.toml`` (beside this file) lists every archive (registry, package, version,
file name, SHA-256) and every pair (class, the member of each archive that holds the image, how
it becomes the flat image a device flashes, and the SHA-256 and size of that image). This
script fetches each archive with the registry's own client into a cache directory, checks the
archive's SHA-256, extracts and converts the member, checks the image's SHA-256 and writes
``corpus-public/<pair>/{old,new}.bin`` plus ``corpus-public/manifest.json`` (what
``compare.py --corpus bench/delta/corpus-public`` reads).

Clients: Debian packages with ``apt-get download`` under a private apt configuration in the
cache (its own sources list naming the suites and components the manifest needs, its own
package lists: the machine's apt setup is left alone), unpacked with ``dpkg-deb``; PyPI with
``pip download --no-deps --no-binary :all:`` (sdists: what the manifest pins); npm with
``npm pack``. Any SHA-256 that differs from the manifest stops the build with a message naming
the archive or image, what was expected and what came (a registry that re-published or dropped
a version is the usual cause: the manifest then needs a new pair, not a new checksum).

Conversions (``convert`` in the manifest):

* ``raw``: the member is the image (vendor blobs, Device OS modules, ``.bin`` builds);
* ``zip``: the member is a zip archive and ``inner`` names the image inside it;
* ``ihex``: Intel HEX (``intelhex``), flattened from its lowest address up to ``below``
  (exclusive; leaves out UICR/config records that are not flash), gaps filled with 0xFF;
* ``python-hex-constant``: a Python module holding Intel HEX as the string constant ``inner``
  (uflash's embedded MicroPython runtime), read with ``ast`` and then handled as ``ihex``;
* ``esptool-stub``: an esptool flasher-stub JSON: its ``text`` segment then its ``data``
  segment (base64), the bytes esptool loads into the chip's RAM.

Run: ``python bench/delta/build_public_corpus.py [--cache DIR] [--pairs a b] [--record]``.
Needs Debian's ``apt-get``/``dpkg-deb`` (any Debian or Ubuntu), ``pip``, ``npm`` and the
``intelhex`` Python package.
"""

from __future__ import annotations

import argparse
import ast
import base64
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
MANIFEST = HERE / "public_corpus.toml"
DEFAULT_OUT = HERE / "corpus-public"
DEFAULT_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ota-delta-corpus"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DEBIAN_SECURITY_MIRROR = "http://deb.debian.org/debian-security"
CLASSES = (
    "cortex-m-app",
    "cortex-m-boot-ble",
    "device-os-system-part",
    "xtensa",
    "riscv",
    "vendor-container",
)


class CorpusError(Exception):
    """The corpus cannot be built as the manifest says; the message tells why and what to do."""


@dataclass(frozen=True)
class Archive:
    """One downloadable package file named in the manifest."""

    key: str
    registry: str  # "debian" | "pypi" | "npm"
    package: str
    version: str
    file: str
    sha256: str
    suite: str = ""
    component: str = "main"


def load_manifest(path: Path = MANIFEST) -> tuple[dict[str, Archive], dict[str, dict]]:
    """The archives and pairs of the manifest, checked for the fields each needs."""
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CorpusError(f"cannot read the corpus manifest {path}: {exc}") from exc
    archives: dict[str, Archive] = {}
    for key, fields in data.get("archives", {}).items():
        known = {k: fields[k] for k in Archive.__dataclass_fields__ if k in fields and k != "key"}
        missing = {"registry", "package", "version", "file", "sha256"} - known.keys()
        if missing:
            raise CorpusError(f"archive {key!r} in {path.name} lacks {sorted(missing)}")
        if known["registry"] not in ("debian", "pypi", "npm"):
            raise CorpusError(f"archive {key!r}: unknown registry {known['registry']!r}")
        if known["registry"] == "debian" and not known.get("suite"):
            raise CorpusError(f"archive {key!r}: a Debian archive needs its suite")
        archives[key] = Archive(key=key, **known)
    pairs: dict[str, dict] = {}
    for pair in data.get("pairs", []):
        name = pair.get("name", "?")
        if pair.get("class") not in CLASSES:
            raise CorpusError(f"pair {name!r}: class must be one of {', '.join(CLASSES)}")
        for side in ("old", "new"):
            image = pair.get(side)
            if not isinstance(image, dict) or image.get("archive") not in archives:
                raise CorpusError(f"pair {name!r}: {side}.archive must name an [archives] entry")
            if not image.get("member"):
                raise CorpusError(f"pair {name!r}: {side}.member is missing")
        if name in pairs:
            raise CorpusError(f"pair {name!r} appears twice in {path.name}")
        pairs[name] = pair
    return archives, pairs


def sha256_of(data: bytes) -> str:
    """Hex SHA-256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


# --- fetching ------------------------------------------------------------------------------


def _run(command: list[str], what: str, **kwargs: object) -> None:
    try:
        subprocess.run(command, check=True, capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]
    except FileNotFoundError as exc:
        raise CorpusError(f"{what}: {command[0]} is not installed ({exc})") from exc
    except subprocess.CalledProcessError as exc:
        tail = (exc.stderr or exc.stdout or "").strip().splitlines()[-3:]
        raise CorpusError(
            f"{what} failed ({' '.join(command[:3])} ...): {' | '.join(tail)}"
        ) from exc


class AptArchive:
    """``apt-get`` confined to a private configuration under the cache directory."""

    def __init__(self, root: Path, archives: list[Archive]) -> None:
        self.root = root
        self.archives = archives
        self._updated = False

    def options(self) -> list[str]:
        """apt options that keep lists, sources and downloads inside ``root``."""
        return [
            f"-oDir::Etc::SourceList={self.root / 'sources.list'}",
            "-oDir::Etc::SourceParts=/dev/null",
            f"-oDir::State::Lists={self.root / 'lists'}",
            f"-oDir::Cache={self.root / 'cache'}",
            "-oDir::State::status=/dev/null",
            "-oAPT::Architecture=amd64",
            "-oAPT::Sandbox::User=root",
        ]

    def update(self) -> None:
        """Write the sources list the manifest needs and fetch its package lists (once)."""
        if self._updated:
            return
        lines = set()
        for archive in self.archives:
            mirror = (
                DEBIAN_SECURITY_MIRROR if archive.suite.endswith("-security") else DEBIAN_MIRROR
            )
            lines.add(f"deb {mirror} {archive.suite} {archive.component}")
        for sub in ("lists/partial", "cache/archives/partial"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        (self.root / "sources.list").write_text("\n".join(sorted(lines)) + "\n")
        _run(["apt-get", *self.options(), "update"], "apt-get update (private lists)")
        self._updated = True

    def download(self, archive: Archive, into: Path) -> None:
        """``apt-get download package=version`` into ``into``."""
        self.update()
        _run(
            ["apt-get", *self.options(), "download", f"{archive.package}={archive.version}"],
            f"Debian package {archive.package} {archive.version} ({archive.suite})",
            cwd=into,
        )


def fetch(archive: Archive, cache: Path, apt: AptArchive) -> Path:
    """The archive file in the cache, downloaded if absent, its SHA-256 checked."""
    where = cache / archive.registry
    where.mkdir(parents=True, exist_ok=True)
    path = where / archive.file
    if not path.exists():
        print(f"  fetching {archive.registry} {archive.package} {archive.version}", file=sys.stderr)
        if archive.registry == "debian":
            apt.download(archive, where)
        elif archive.registry == "pypi":
            env = {**os.environ, "PIP_CONSTRAINT": "", "PIP_REQUIRE_VIRTUALENV": "0"}
            _run(
                [
                    sys.executable,
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--no-binary",
                    ":all:",
                    "--disable-pip-version-check",
                    "-d",
                    str(where),
                    f"{archive.package}=={archive.version}",
                ],
                f"PyPI {archive.package} {archive.version}",
                env=env,
            )
        else:
            _run(
                ["npm", "pack", "--silent", f"{archive.package}@{archive.version}"],
                f"npm {archive.package} {archive.version}",
                cwd=where,
            )
        if not path.exists():
            raise CorpusError(
                f"{archive.registry} {archive.package} {archive.version} downloaded, but not as "
                f"{archive.file}; found {sorted(p.name for p in where.iterdir())[:8]}"
            )
    got = sha256_of(path.read_bytes())
    if got != archive.sha256:
        raise CorpusError(
            f"checksum mismatch for {archive.registry} archive {archive.file}: manifest says "
            f"{archive.sha256}, the file in {where} has {got}. Delete it to download it again; "
            "if the registry serves this content now, the version was re-published: pick a "
            "new pair in public_corpus.toml instead of editing the checksum."
        )
    return path


# --- extracting and converting -------------------------------------------------------------


def read_member(archive: Archive, path: Path, member: str) -> bytes:
    """Bytes of ``member`` (a path inside the package) from the archive file."""
    if archive.registry == "debian":
        proc = subprocess.run(
            ["dpkg-deb", "--fsys-tarfile", str(path)], check=True, capture_output=True
        )
        stream: io.BytesIO | None = io.BytesIO(proc.stdout)
        names: tuple[str, ...] = (member, "./" + member.lstrip("./"))
    else:
        stream = None
        names = (member,)
    with tarfile.open(path if stream is None else None, fileobj=stream, mode="r:*") as tar:
        for name in names:
            try:
                extracted = tar.extractfile(name)
            except KeyError:
                continue
            if extracted is not None:
                return extracted.read()
    raise CorpusError(f"{archive.file} has no file {member!r}")


def flatten_ihex(text: str, below: int) -> bytes:
    """The flash image an Intel HEX file describes, from its lowest address up to ``below``."""
    try:
        from intelhex import IntelHex
    except ImportError as exc:
        raise CorpusError(
            "Intel HEX members need the intelhex package: pip install intelhex"
        ) from exc
    image = IntelHex(io.StringIO(text))
    addresses = [a for a in image.addresses() if a < below]
    if not addresses:
        raise CorpusError(f"the HEX file has no data below {below:#x}")
    image.padding = 0xFF  # erased flash
    return bytes(image.tobinarray(start=min(addresses), end=max(addresses)))


def convert(data: bytes, image: dict) -> bytes:
    """The flat image from the member's bytes, as ``image['convert']`` says."""
    how = image.get("convert", "raw")
    if how == "raw":
        return data
    if how == "zip":
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            return archive.read(image["inner"])
    if how == "ihex":
        return flatten_ihex(data.decode("ascii"), int(image.get("below", 0x10000000)))
    if how == "python-hex-constant":
        for node in ast.parse(data.decode("utf-8")).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == image["inner"] for t in node.targets
            ):
                text = ast.literal_eval(node.value)
                return flatten_ihex(text, int(image.get("below", 0x10000000)))
        raise CorpusError(f"no constant {image['inner']!r} in {image['member']}")
    if how == "esptool-stub":
        stub = json.loads(data)
        return base64.b64decode(stub["text"]) + base64.b64decode(stub.get("data", ""))
    raise CorpusError(
        f"unknown conversion {how!r} (raw, zip, ihex, python-hex-constant, esptool-stub)"
    )


def build_image(image: dict, archives: dict[str, Archive], cache: Path, apt: AptArchive) -> bytes:
    """One side of a pair: fetched, extracted, converted (not yet checked)."""
    archive = archives[image["archive"]]
    path = fetch(archive, cache, apt)
    return convert(read_member(archive, path, image["member"]), image)


def main(argv: list[str] | None = None) -> int:
    """Build the corpus (or, with --record, print what the images hash to); 0 when done."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--manifest", type=Path, default=MANIFEST)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="downloaded archives")
    parser.add_argument("--pairs", nargs="*", help="only these pairs (default: all)")
    parser.add_argument(
        "--record",
        action="store_true",
        help="print the SHA-256 and size of every image as JSON instead of checking them "
        "(for adding pairs to the manifest; archives are still checked)",
    )
    args = parser.parse_args(argv)
    try:
        archives, pairs = load_manifest(args.manifest)
        chosen = args.pairs or list(pairs)
        unknown = [p for p in chosen if p not in pairs]
        if unknown:
            raise CorpusError(f"no such pairs in the manifest: {', '.join(unknown)}")
        debian = [archives[pairs[p][s]["archive"]] for p in chosen for s in ("old", "new")]
        apt = AptArchive(args.cache / "apt", [a for a in debian if a.registry == "debian"])
        recorded: dict[str, dict] = {}
        manifest_out: dict[str, dict] = {}
        for name in chosen:
            pair = pairs[name]
            print(f"{name}: {pair['class']}", file=sys.stderr)
            images = {}
            for side in ("old", "new"):
                data = build_image(pair[side], archives, args.cache, apt)
                digest = sha256_of(data)
                recorded.setdefault(name, {})[side] = {"sha256": digest, "size": len(data)}
                if not args.record and digest != pair[side].get("sha256"):
                    raise CorpusError(
                        f"checksum mismatch for pair {name} ({side}: {pair[side]['member']}): "
                        f"manifest says {pair[side].get('sha256')}, built {digest} "
                        f"({len(data)} bytes). The archive matched, so the conversion differs: "
                        "check the intelhex version or the member path."
                    )
                images[side] = data
            if images["old"] == images["new"]:
                raise CorpusError(f"pair {name}: old and new are the same image")
            if not args.record:
                target = args.out / name
                target.mkdir(parents=True, exist_ok=True)
                (target / "old.bin").write_bytes(images["old"])
                (target / "new.bin").write_bytes(images["new"])
                manifest_out[name] = {
                    "class": pair["class"],
                    "old_size": len(images["old"]),
                    "new_size": len(images["new"]),
                    "description": pair.get("description", ""),
                }
    except CorpusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.record:
        print(json.dumps(recorded, indent=1))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    existing = args.out / "manifest.json"
    merged = json.loads(existing.read_text()) if existing.exists() and args.pairs else {}
    merged.update(manifest_out)
    existing.write_text(json.dumps(merged, indent=1) + "\n")
    print(f"wrote {len(manifest_out)} pairs to {args.out}")
    if shutil.which("du"):
        subprocess.run(["du", "-sh", str(args.out)], check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
