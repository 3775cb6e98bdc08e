"""``pip install .`` (not editable) ships what the installed ``ota`` needs: the fleet
benchmark runs from a throwaway virtualenv, away from the source tree.

The project is copied (sources only) and built into a wheel by pip, with build isolation as
a user's ``pip install .`` does, but without the Cython kernels (``OTA_NO_NATIVE_BUILD=1``:
the pure-Python twins keep the build to seconds). The wheel goes into a new virtualenv
with ``--no-deps``; the dependencies come from this test run's environment through a
``.pth`` line. ``ota bench fleet --devices 50`` then runs there, from a directory outside
the checkout and without PYTHONPATH, so only installed code can answer.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
#: What ``pip install .`` needs of the checkout; the rest (tests, bench results) stays.
SOURCES = ("otacore", "server", "ext", "pyproject.toml", "setup.py", "README.md")
_LEFTOVERS = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.c", "build", "*.egg-info")


def build_leftovers(directory: str, names: list[str]) -> set[str]:
    """Build leftovers to skip: compiled files, and Cython's annotation pages (``*.html``)
    except the console's templates, which the package ships."""
    skipped = set(_LEFTOVERS(directory, names))
    if Path(directory).name != "templates" and Path(directory).parent.name != "templates":
        skipped |= {name for name in names if name.endswith(".html")}
    return skipped


def run(argv: list[str], cwd: Path, env: dict[str, str], timeout: float) -> str:
    """Run a command; its stdout (an AssertionError with both streams if it fails)."""
    done = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    streams = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0, f"{argv[:3]} exited {done.returncode}:\n{streams}"
    return done.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A virtualenv with the project installed from a wheel, and the environment to run it
    in (no PYTHONPATH, no editable install on the path)."""
    root = tmp_path_factory.mktemp("installed")
    source = root / "src"
    source.mkdir()
    for name in SOURCES:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, source / name, ignore=build_leftovers)
        else:
            shutil.copy2(path, source / name)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["OTA_NO_NATIVE_BUILD"] = "1"
    wheels = root / "wheels"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    run([*pip, "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(source)],
        cwd=root, env=env, timeout=600)  # fmt: skip
    (wheel,) = wheels.glob("otacloud-*.whl")
    target = root / "venv"
    venv.EnvBuilder(with_pip=False).create(target)
    python = target / "bin" / "python"
    run([*pip, "--python", str(python), "install", "--quiet", "--no-deps", str(wheel)],
        cwd=root, env=env, timeout=300)  # fmt: skip
    # The dependencies (trio, cryptography, ...) of this environment, after the venv's own
    # site-packages: a plain path line, so this environment's editable-install hooks stay off.
    (site_packages,) = (target / "lib").glob("python3*/site-packages")
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (site_packages / "zz_test_dependencies.pth").write_text("\n".join(deps) + "\n")
    return target, env


def test_the_installed_package_is_the_one_that_runs(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    target, env = installed
    code = "import otacore, server.bench.fleet.runner as r; print(r.__file__, otacore.__file__)"
    out = run([str(target / "bin" / "python"), "-c", code], cwd=tmp_path, env=env, timeout=60)
    for path in out.split():
        assert Path(path).is_relative_to(target), out
    assert "otacloud 0.1.0" in run([str(target / "bin" / "ota"), "info"], tmp_path, env, 60)
    # The console's templates and static assets are package data (no build step).
    code = ("import server.console.templating as c; print(c.TEMPLATE_DIR / 'base.html', "
            "c.TEMPLATE_DIR / 'devices' / 'device.html', c.STATIC_DIR / 'htmx.min.js')")
    out = run([str(target / "bin" / "python"), "-c", code], cwd=tmp_path, env=env, timeout=60)
    for path in out.split():
        assert Path(path).is_relative_to(target) and Path(path).is_file(), out


def test_ota_bench_fleet_runs_from_the_installed_package(
    installed: tuple[Path, dict[str, str]], tmp_path: Path
) -> None:
    target, env = installed
    ota = str(target / "bin" / "ota")
    out = tmp_path / "out"
    printed = run(
        [ota, "bench", "fleet", "--devices", "50", "--out", str(out), "--work-dir", str(tmp_path)],
        cwd=tmp_path, env=env, timeout=300,
    )  # fmt: skip
    result = json.loads((out / "result.json").read_text())
    assert result["devices"] == result["release_updated"] == 50, printed
    assert result["release_end"] == "done" and result["online_end"] == "done"
    assert result["command"] == "ota bench fleet --devices 50 --out " + str(out) + (
        " --work-dir " + str(tmp_path)
    )
    # The optional parts say which extra brings them.
    missing_plot = any("matplotlib" in note for note in result["notes"])
    assert missing_plot == (not (out / "result.png").is_file())
    if missing_plot:
        assert "pip install 'otacloud[bench]'" in printed
    if shutil.which("py-spy") is None and not (target / "bin" / "py-spy").exists():
        refused = subprocess.run(
            [ota, "bench", "fleet", "--devices", "2", "--procs", "1", "--profile",
             "--out", str(tmp_path / "never")],
            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert refused.returncode == 1
        assert "--profile needs py-spy" in refused.stderr
        assert "pip install 'otacloud[bench]'" in refused.stderr
        assert not (tmp_path / "never").exists()
