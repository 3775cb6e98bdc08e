"""Fixtures: a real control-plane server on an ephemeral loopback port, clients, firmware.

The helper classes and functions here exist only to back the fixtures."""

from __future__ import annotations

import hashlib
import itertools
import os
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import trio
from hypothesis import HealthCheck, settings

from otacore.module import build_module
from otacore.platforms import ModuleFunction

# The browser tests' fixtures, ``browser`` and ``page``: a headless system Chromium under
# Playwright (imported only when a test uses them; skipped where Chromium is absent).
from tests.browser import browser, page  # noqa: F401
from tests.collector_state import collector_kept

if TYPE_CHECKING:  # the server stack is imported by the fixtures that use it, so test
    # sessions that never start a server do not pay for importing it
    from server.app import ServerConfig, ServerHandle
    from server.store import Store

# Property tests pass or fail on the code, never on the machine's speed: no per-example
# deadline and no "too slow" health check (both measure wall-clock time). Tests' own
# @settings inherit these.
settings.register_profile("otacloud", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("otacloud")

#: Test modules that run whole fleets in subprocesses (servers, their worker processes, load
#: generators, emulated devices, the installed ``ota``), by work unit. scripts/run-tests.sh
#: runs the suite on every core (pytest-xdist, ``--dist loadgroup``); every other test is a
#: unit of its own. xdist hands out the units with the most tests first, so these two start
#: at once, one per worker, and the single tests fill in around them: no long test is left
#: to the end, and a module fixture (the installed package) is built once. The two units
#: take about as long each (~50 s on an idle machine; the README flow alone ~35 s).
FLEET_GROUPS: dict[str, str] = {
    "test_bench_fleet_nodes": "fleet-benches",
    "test_console_browser": "browser",
    "test_bench_fleet_smoke": "fleet-benches",
    "test_bench_hold": "fleet-benches",
    "test_installed_package": "fleet-benches",
    "test_multiprocess_server": "fleet-benches",
    "test_emulator_nodes": "operator-flows",
    "test_multinode_e2e": "multinode",
    "test_readme_flow": "operator-flows",
    "test_sigkill": "operator-flows",
}

try:
    from xdist.scheduler import LoadGroupScheduling
except ImportError:  # pytest-xdist (a dev dependency) missing: the suite runs serially
    LoadGroupScheduling = None

if LoadGroupScheduling is not None:

    class FleetGroupScheduling(LoadGroupScheduling):
        """``--dist loadgroup`` with the units of :data:`FLEET_GROUPS`.

        pytest-xdist groups tests by a suffix that its worker hook appends to their node
        ids from ``xdist_group`` marks; with pytest 9.2 that rewrite no longer takes effect
        (pytest-dev/pytest-xdist#1386), so the groups are made here, from the node ids the
        controller schedules. ``_split_scope`` is how xdist's own loadfile and loadgroup
        modes define their units; tests/test_suite_scheduling.py fails if that changes."""

        def _split_scope(self, nodeid: str) -> str:
            scope = super()._split_scope(nodeid)
            if scope == nodeid:  # no xdist_group suffix: a unit of its own, unless a fleet's
                module = nodeid.split("::", 1)[0].rpartition("/")[2].removesuffix(".py")
                return FLEET_GROUPS.get(module, scope)
            return scope

    @pytest.hookimpl(optionalhook=True)  # with ``-p no:xdist`` nothing calls it
    def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
        """The scheduler of ``--dist loadgroup`` (other modes: pytest-xdist's own)."""
        if config.getvalue("dist") == "loadgroup":
            return FleetGroupScheduling(config, log)
        return None


BORON = 13
ARGON = 12
#: Small upload limit for the test servers, so 413 paths are cheap to reach.
TEST_UPLOAD_LIMIT = 512 * 1024


def _make_firmware(
    version: int,
    *,
    platform_id: int = BORON,
    size: int = 4096,
    function: int = ModuleFunction.USER_PART,
    product_version: int | None = -1,
    seed: int = 0,
) -> bytes:
    """A valid module image; ``product_version`` -1 means "same as version", None omits it."""
    payload = hashlib.shake_256(f"{version}/{seed}".encode()).digest(size)
    embedded = version if product_version == -1 else product_version
    return build_module(
        payload,
        platform_id=platform_id,
        function=function,
        version=6,
        product_id=None if embedded is None else platform_id,
        product_version=embedded,
    )


def _server_config(data_dir: Path) -> ServerConfig:
    """Server settings for tests: ephemeral port, short SSE timings, small upload limit."""
    from server.api import ApiSettings
    from server.app import ServerConfig

    return ServerConfig(
        data_dir=data_dir,
        api_port=0,
        store_threads=4,
        api=ApiSettings(
            max_upload_bytes=TEST_UPLOAD_LIMIT,
            sse_keepalive_seconds=0.3,
            sse_send_timeout_seconds=2.0,
            sse_buffer=64,
        ),
        graceful_timeout=0.5,
        device_port=None,  # API tests need no device listeners
    )


@dataclass
class Api:
    """A running server with an owner client and helpers."""

    handle: ServerHandle
    client: httpx.AsyncClient
    token: str

    @property
    def store(self) -> Store:
        """The server's store (same process)."""
        return self.handle.store

    async def token_for(self, role: str, expires_in: int = 0) -> str:
        """A fresh token of ``role``."""
        grant = await trio.to_thread.run_sync(
            lambda: self.handle.fleet.create_api_token_sync(role, expires_in=expires_in)
        )
        return grant.access_token

    async def client_for(self, role: str) -> httpx.AsyncClient:
        """A client authenticated with a new token of ``role`` (close it after use)."""
        token = await self.token_for(role)
        return httpx.AsyncClient(
            base_url=self.handle.api_url, headers={"Authorization": f"Bearer {token}"}
        )

    async def snapshot(self) -> dict[str, Any]:
        """Every table row and blob name, to prove a refused request changed nothing."""
        if self.handle.recorder is not None:  # the events published so far are stored
            await self.handle.recorder.drain()

        def work() -> dict[str, Any]:
            with self.store.read() as tx:
                dump: dict[str, Any] = dict(tx.dump_tables())
            dump["audit_log"] = [row for row in dump["audit_log"] if row[3] != "token.issue"]
            dump["tokens"] = []  # tests mint tokens between snapshots
            dump["blobs"] = sorted(self.store.blobs.names())
            return dump

        return await trio.to_thread.run_sync(work)

    async def create_product(
        self, name: str = "Widget", platform_id: int = BORON
    ) -> dict[str, Any]:
        """Create a product through the API."""
        response = await self.client.post(
            "/v1/products", json={"name": name, "platform_id": platform_id}
        )
        assert response.status_code == 201, response.text
        product: dict[str, Any] = response.json()["product"]
        return product

    async def upload(
        self, product: str | int, version: int, image: bytes | None = None, **fields: Any
    ) -> httpx.Response:
        """Upload firmware (multipart field ``binary``)."""
        data = {"version": str(version), "title": f"v{version}", **fields}
        files = {
            "binary": ("firmware.bin", image or _make_firmware(version), "application/octet-stream")
        }
        return await self.client.post(f"/v1/products/{product}/firmware", data=data, files=files)

    async def report_running(self, device_id: str, version: int, platform_id: int = BORON) -> None:
        """Have a device report that it runs ``version``, as a device running its stored
        image does: a Hello claiming the version, then a Describe naming the image by its
        SHA-256 (what marks the firmware seen running). Without a stored image of that
        version only the Hello is sent."""
        fleet = self.handle.fleet
        view = await fleet.record_device_hello(
            device_id, platform_id=platform_id, product_version=version, system_version=5000
        )
        with self.store.read() as tx:
            firmware = tx.get_firmware(view.product.id, version)
        if firmware is not None:
            module = {"function": firmware.module_function, "index": firmware.module_index,
                      "version": firmware.module_version, "store": 0, "size": firmware.size,
                      "sha256": firmware.sha256, "dependencies": []}
            await fleet.record_describe(device_id, [module])


@pytest.fixture(params=["kernel", "twin"])
def applier_kernel(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Apply with the Cython kernel (when built) and with its pure-Python twin: issue 18
    wants the apply memory bounded with both. The applier reads the kernel it imported."""
    from otacore import _delta_py, delta, delta_stream

    if request.param == "twin":
        monkeypatch.setattr(delta_stream, "_kernel", _delta_py)
    elif not delta.NATIVE:
        pytest.skip("the Cython kernel is not built")
    return str(request.param)


@pytest.fixture
def make_firmware() -> Callable[..., bytes]:
    """Builder of valid firmware images: ``make_firmware(version, platform_id=13, size=4096,
    function=USER_PART, product_version=-1 (same as version) or None (omit), seed=0)``."""
    return _make_firmware


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """An empty data directory."""
    return tmp_path / "data"


#: The store backends the store tests run on (``store_backend``'s parameters).
STORE_BACKENDS = ("sqlite", "postgresql")
#: Where scripts/run-tests.sh passes the URL of the throwaway cluster it started.
PG_URL_VARIABLE = "OTA_TEST_PG_URL"
#: "postgresql" runs the in-process servers of the ``api`` and ``threaded_server`` fixtures
#: on PostgreSQL too (default "sqlite"): ``OTA_TEST_SERVER_STORE=postgresql pytest ...``.
SERVER_STORE_VARIABLE = "OTA_TEST_SERVER_STORE"
_pg_database_numbers = itertools.count(1)


def _worker_name() -> str:
    """This pytest process's name among xdist workers ("gw0", ...; "main" without xdist),
    plus its pid: names of its databases that no other process (or earlier run on the same
    cluster) uses."""
    return f"{os.environ.get('PYTEST_XDIST_WORKER', 'main')}_{os.getpid()}"


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """URL of the ``postgres`` database of a throwaway PostgreSQL cluster: the one
    scripts/run-tests.sh started (``OTA_TEST_PG_URL``), else one this session starts and
    stops itself. Without PostgreSQL installed the tests that need it fail (never skip)."""
    url = os.environ.get(PG_URL_VARIABLE)
    if url:
        yield url
        return
    from server.store.pg_cluster import PgCluster, PgClusterError

    try:
        cluster = PgCluster.start()
    except PgClusterError as exc:
        pytest.fail(f"cannot start a throwaway PostgreSQL for the store tests: {exc}",
                    pytrace=False)
    try:
        yield cluster.url()
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def pg_template(pg_admin_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Name of a database holding this worker's empty store schema, copied by
    :func:`pg_database` (CREATE DATABASE ... TEMPLATE copies the tables as files: no
    schema to build per test; 30-160 ms here, idle to busy)."""
    from server.store import Store
    from server.store.pg_cluster import create_database, drop_database

    name = f"ota_tmpl_{_worker_name()}"
    drop_database(pg_admin_url, name)
    store = Store.open(create_database(pg_admin_url, name),
                       tmp_path_factory.mktemp("pg-template-blobs"), pool_size=1)
    store.close()  # a template must have no sessions when it is copied
    yield name
    drop_database(pg_admin_url, name)


@pytest.fixture
def pg_database(pg_admin_url: str, pg_template: str) -> Iterator[str]:
    """URL of a fresh PostgreSQL database of this test alone, holding the empty schema;
    dropped after the test."""
    from server.store.pg_cluster import create_database, drop_database

    name = f"ota_t_{_worker_name()}_{next(_pg_database_numbers)}"
    yield create_database(pg_admin_url, name, template=pg_template)
    drop_database(pg_admin_url, name)


@pytest.fixture(params=STORE_BACKENDS)
def store_backend(request: pytest.FixtureRequest) -> str:
    """The store's backend: every test that uses it runs once on each."""
    return str(request.param)


@pytest.fixture
def store_url(store_backend: str, data_dir: Path, request: pytest.FixtureRequest) -> str:
    """The database URL of a fresh store on ``store_backend``: a SQLite file in
    ``data_dir`` or a database of its own on the throwaway PostgreSQL cluster (started
    only when a PostgreSQL test runs)."""
    if store_backend == "sqlite":
        from server.private_files import secure_data_dir

        return f"sqlite:///{secure_data_dir(data_dir).resolve() / 'ota.db'}"
    return str(request.getfixturevalue("pg_database"))


def _open_store(url: str, data_dir: Path, *, pool_size: int = 2) -> Store:
    """The store at ``url`` with its blobs in ``data_dir`` (as ``ota server --db-url``
    keeps them; for SQLite ``data_dir``'s own ``ota.db``, as ``--data`` alone)."""
    from server.store import Store

    if url.startswith("sqlite:"):
        return Store.open_dir(data_dir, pool_size=pool_size)
    return Store.open(url, data_dir / "blobs", pool_size=pool_size)


@pytest.fixture
def store(store_url: str, data_dir: Path) -> Iterator[Store]:
    """A store opened directly (no server), on each backend (``store_backend``)."""
    opened = _open_store(store_url, data_dir)
    yield opened
    opened.close()


@pytest.fixture
def reopen(store_url: str, data_dir: Path) -> Iterator[Callable[..., Store]]:
    """``reopen(pool_size=2)``: another store on the same database and blobs as ``store``
    (what a restarted server, the CLI or another process opens); closed after the test
    unless the test closed it."""
    opened: list[Store] = []

    def open_again(*, pool_size: int = 2) -> Store:
        opened.append(_open_store(store_url, data_dir, pool_size=pool_size))
        return opened[-1]

    yield open_again
    for other in opened:
        other.close()


@pytest.fixture
def sqlite_store(data_dir: Path) -> Iterator[Store]:
    """A store on SQLite only, for what is SQLite's own (pragmas, file migrations)."""
    from server.store import Store

    opened = Store.open_dir(data_dir, pool_size=2)
    yield opened
    opened.close()


@pytest.fixture
def server_db_url(request: pytest.FixtureRequest) -> str | None:
    """The ``--db-url`` of the servers the ``api`` fixture starts: None (the SQLite file of
    their data directory) unless ``OTA_TEST_SERVER_STORE=postgresql`` asks for a database
    of the throwaway PostgreSQL (a developer's switch to run the API tests there too)."""
    backend = os.environ.get(SERVER_STORE_VARIABLE, "sqlite")
    if backend == "sqlite":
        return None
    if backend == "postgresql":
        return str(request.getfixturevalue("pg_database"))
    pytest.fail(f"{SERVER_STORE_VARIABLE}={backend!r}: use sqlite or postgresql", pytrace=False)


@pytest.fixture
async def api(nursery: trio.Nursery, data_dir: Path, server_db_url: str | None
              ) -> AsyncIterator[Api]:
    """The real server (hypercorn on trio) on an ephemeral port, with an owner client."""
    from dataclasses import replace

    from server.app import serve

    config = replace(_server_config(data_dir), db_url=server_db_url)
    handle: ServerHandle = await nursery.start(serve, config)
    grant = await trio.to_thread.run_sync(
        lambda: handle.fleet.create_api_token_sync("owner", label="test owner")
    )
    async with httpx.AsyncClient(
        base_url=handle.api_url,
        headers={"Authorization": f"Bearer {grant.access_token}"},
        timeout=20,
    ) as client:
        yield Api(handle, client, grant.access_token)
    handle.shutdown.set()


@dataclass
class ThreadedServer:
    """A server running in its own thread (for synchronous tests such as hypothesis)."""

    url: str
    token: str
    handle: ServerHandle
    call: Callable[..., Any]  # run an async function on the server's trio loop


@pytest.fixture(scope="module")
def threaded_server(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
                    ) -> Iterator[ThreadedServer]:
    """One server per test module, on a trio loop in a background thread (on PostgreSQL
    with ``OTA_TEST_SERVER_STORE=postgresql``, as ``api``)."""
    from dataclasses import replace

    from server.app import serve

    data = tmp_path_factory.mktemp("threaded") / "data"
    config = _server_config(data)
    if os.environ.get(SERVER_STORE_VARIABLE, "sqlite") == "postgresql":
        from server.store.pg_cluster import create_database, drop_database

        admin_url = str(request.getfixturevalue("pg_admin_url"))
        name = f"ota_m_{_worker_name()}_{next(_pg_database_numbers)}"
        config = replace(config, db_url=create_database(
            admin_url, name, template=str(request.getfixturevalue("pg_template"))))
        request.addfinalizer(lambda: drop_database(admin_url, name))
    ready: dict[str, Any] = {}
    started = threading.Event()

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            handle: ServerHandle = await nursery.start(serve, config)
            grant = handle.fleet.create_api_token_sync("owner")
            ready.update(
                handle=handle,
                token=grant.access_token,
                trio_token=trio.lowlevel.current_trio_token(),
            )
            started.set()

    thread = threading.Thread(target=trio.run, args=(main,), daemon=True)
    thread.start()
    assert started.wait(30), "the threaded server did not start"
    handle, trio_token = ready["handle"], ready["trio_token"]

    def call(fn: Callable[..., Any], *args: Any) -> Any:
        return trio.from_thread.run(fn, *args, trio_token=trio_token)

    yield ThreadedServer(handle.api_url, ready["token"], handle, call)
    trio.from_thread.run_sync(handle.shutdown.set, trio_token=trio_token)
    thread.join(10)


@pytest.fixture(autouse=True)
def _collector_kept() -> Iterator[None]:
    """Every test leaves this process's garbage collector as it found it (a test running
    ``ota server`` in-process tunes it for a server: see tests/collector_state.py)."""
    with collector_kept():
        yield
