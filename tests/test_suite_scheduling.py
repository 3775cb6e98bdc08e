"""How scripts/run-tests.sh spreads the suite over workers (tests/conftest.py): the modules
that start whole fleets in subprocesses form two pytest-xdist work units; every other test
is a unit of its own."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FLEET_GROUPS

xdist_scheduler = pytest.importorskip("xdist.scheduler")
TESTS = Path(__file__).resolve().parent


def test_every_fleet_module_exists() -> None:
    """A renamed module would silently leave the group (and run beside the others)."""
    missing = sorted(name for name in FLEET_GROUPS if not (TESTS / f"{name}.py").is_file())
    assert missing == [], f"tests/conftest.py FLEET_GROUPS names no file for {missing}"


def test_fleet_modules_share_their_units_and_other_tests_stand_alone() -> None:
    from tests.conftest import FleetGroupScheduling

    config = pytest.Config.fromdictargs({"tx": ["2*popen"]}, [])  # as `-n 2` sets it
    scheduling = FleetGroupScheduling(config)
    assert isinstance(scheduling, xdist_scheduler.LoadGroupScheduling)
    split = scheduling._split_scope
    benches = {
        split("tests/test_bench_fleet_smoke.py::test_small_fleet_run_reports_every_field[1-x]"),
        split("tests/test_installed_package.py::test_the_installed_package_is_the_one_that_runs"),
        split("tests/test_installed_package.py::test_ota_bench_fleet_runs_from_the_installed_pa"),
    }
    flows = {
        split("tests/test_readme_flow.py::test_readme_operator_flow"),
        split("tests/test_sigkill.py::test_sigkill_during_uploads_and_releases_loses_nothing"),
    }
    assert benches == {"fleet-benches"} and flows == {"operator-flows"}
    alone = "tests/test_record_tls13.py::test_unsupported_suite_is_named"
    assert split(alone) == alone
    # Similar names are not fleet modules; an explicit xdist_group still wins.
    assert split("tests/test_readme_flow_extra.py::t") == "tests/test_readme_flow_extra.py::t"
    assert split("tests/test_sigkill.py::test_x@other") == "other"
