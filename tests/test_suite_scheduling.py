"""How scripts/run-tests.sh spreads the suite over workers (tests/conftest.py): the modules
that start whole fleets in subprocesses form one pytest-xdist work unit; every other test is
a unit of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FLEET_GROUP, FLEET_MODULES

xdist_scheduler = pytest.importorskip("xdist.scheduler")
TESTS = Path(__file__).resolve().parent


def test_every_fleet_module_exists() -> None:
    """A renamed module would silently leave the group (and run beside the others)."""
    missing = sorted(name for name in FLEET_MODULES if not (TESTS / f"{name}.py").is_file())
    assert missing == [], f"tests/conftest.py FLEET_MODULES names no file for {missing}"


def test_fleet_modules_share_one_unit_and_other_tests_stand_alone() -> None:
    from tests.conftest import FleetGroupScheduling

    config = pytest.Config.fromdictargs({"tx": ["2*popen"]}, [])  # as `-n 2` sets it
    scheduling = FleetGroupScheduling(config)
    assert isinstance(scheduling, xdist_scheduler.LoadGroupScheduling)
    split = scheduling._split_scope
    for nodeid in (
        "tests/test_readme_flow.py::test_readme_operator_flow",
        "tests/test_bench_fleet_smoke.py::test_small_fleet_run_reports_every_field[1-full-records]",
        "tests/test_installed_package.py::test_the_installed_package_is_the_one_that_runs",
    ):
        assert split(nodeid) == FLEET_GROUP, nodeid
    alone = "tests/test_record_tls13.py::test_unsupported_suite_is_named"
    assert split(alone) == alone
    # Similar names are not fleet modules; an explicit xdist_group still wins.
    assert split("tests/test_readme_flow_extra.py::t") == "tests/test_readme_flow_extra.py::t"
    assert split("tests/test_sigkill.py::test_x@other") == "other"
