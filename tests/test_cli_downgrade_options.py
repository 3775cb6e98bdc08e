"""``ota server --downgrades`` and ``--downgrade-lifetime`` (issue 13, finding 13): bad values
stop with a message naming the choices, good ones reach every server process's OTA engine."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from otacore.errors import ValidationError
from server.app import ServerConfig, worker_specs
from server.cli.main import app as ota_app
from server.devices.delivery import DowngradePolicy, OtaConfig
from server.workers import WorkerSettings, WorkerSpec


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--downgrades", "sometimes"], "unknown downgrade policy 'sometimes'; choose one of "
                                        "targeted, device, never"),
        (["--downgrade-lifetime", "0"], "lifetime must be 1 s to 365 days"),
    ],
)
def test_bad_downgrade_options_stop_with_a_message(
    tmp_path: Path, options: list[str], message: str
) -> None:
    result = CliRunner().invoke(ota_app, ["server", "--data", str(tmp_path), *options])
    # A wrong setting is a usage error (exit 2), as every configuration error is.
    assert result.exit_code == 2 and message in result.output, result.output


def test_downgrade_settings_reach_the_workers() -> None:
    config = ServerConfig(data_dir=Path("/nowhere"), workers=2,
                          ota=OtaConfig(downgrades=DowngradePolicy.parse("device"),
                                        downgrade_lifetime=600))

    class Bound:
        tcp_address = ("127.0.0.1", 1)
        udp_address = ("127.0.0.1", 2)

    (spec,) = worker_specs(config, Bound())  # type: ignore[arg-type]
    ota = WorkerSettings.from_spec(WorkerSpec.from_json(spec.to_json())).ota
    assert (ota.downgrades, ota.downgrade_lifetime) == (DowngradePolicy.DEVICE, 600)
    with pytest.raises(ValidationError, match="choose one of"):
        OtaConfig(downgrades="sometimes")  # type: ignore[arg-type]
