"""The sign-in limits after the security review of issue 13's finding 3 (findings B, C, E, F),
over the real API.

* B: the address limit counts an IPv6 /64 as one address, and one address group holds at
  most ``login_max_checks_per_address`` places of the password-hashing queue. Loopback has
  a single IPv6 address, so these two tests give the real app (real fleet, store and
  hashing pool) its client addresses through httpx's ASGI transport; everything else here
  goes over real sockets from loopback addresses (127.0.x.y), bound by httpx.
* C: guesses from anywhere do not lock an owner out of the addresses it signed in from, and
  an installation administrator lifts a lockout through the API and ``ota admin
  sign-in-limits``.
* E: a spray of failures against other names cannot flush an account's count.
* F: lockouts are logged (one line, then a summary per interval) and audited once.

No test waits for a lockout to end: account lockouts start at 10 minutes here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from trio.testing import MockClock
from typer.testing import CliRunner

from server.api import ApiSettings, create_app
from server.cli.main import app as ota_app
from tests.conftest import Api, _server_config
from tests.test_api_login_throttle import client_from, sign_in

PASSWORD = "correct horse battery"
OWNER = "ops@example.com"


@asynccontextmanager
async def _server(nursery: trio.Nursery, data_dir: Path, **api: Any) -> AsyncIterator[Api]:
    """A real server with these API settings, an owner token and the user ops@example.com."""
    from server.app import serve

    config = _server_config(data_dir)
    config = replace(config, api=replace(config.api, **api))
    handle = await nursery.start(serve, config)
    grant = await trio.to_thread.run_sync(lambda: handle.fleet.create_api_token_sync("owner"))
    await trio.to_thread.run_sync(
        lambda: handle.fleet.create_user_sync(OWNER, PASSWORD, "developer"))
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=30, headers={
            "Authorization": f"Bearer {grant.access_token}"}) as client:
        yield Api(handle, client, grant.access_token)
    handle.shutdown.set()


def _asgi_from(app: Any, address: str) -> httpx.AsyncClient:
    """A client of the app itself, which sees ``address`` as the client's address."""
    transport = httpx.ASGITransport(app=app, client=(address, 40_000))
    return httpx.AsyncClient(base_url="http://ota.test", transport=transport, timeout=30)


async def _fail_from(api: Api, addresses: list[str], username: str) -> None:
    for address in addresses:
        async with client_from(api, address) as client:
            assert (await sign_in(client, username, "wrong")).status_code == 400


async def _audit(api: Api, action: str) -> list[Any]:
    def work() -> list[Any]:
        with api.store.read() as tx:
            return [row for row in tx.list_audit(limit=1000) if row.action == action]

    return await trio.to_thread.run_sync(work)


# --- B: IPv6 address groups and the hashing queue ------------------------------------------


async def test_guesses_from_many_addresses_of_one_ipv6_64_share_its_limit(api: Api) -> None:
    """Review script f3_ipv6.py: 600 guesses from 60 addresses of one /64 all got 400."""
    await trio.to_thread.run_sync(
        lambda: api.handle.fleet.create_user_sync(OWNER, PASSWORD, "developer"))
    app = create_app(api.handle.fleet, ApiSettings())  # Particle's 10 failures per address
    statuses = []
    for n in range(12):  # one guess from each of 12 addresses of 2001:db8:100:1::/64
        async with _asgi_from(app, f"2001:db8:100:1::{0x1001 + n:x}") as client:
            statuses.append((await sign_in(client, f"nobody-{n}", "wrong")).status_code)
    assert statuses == [400] * 10 + [429] * 2
    async with _asgi_from(app, "2001:db8:100:1:ffff:ffff:ffff:ffff") as same_64:
        refused = await sign_in(same_64, OWNER, PASSWORD)
        assert refused.status_code == 429 and "from this address" in refused.text
    async with _asgi_from(app, "2001:db8:100:2::1") as next_64:
        assert (await sign_in(next_64, OWNER, PASSWORD)).status_code == 200


async def test_one_ipv6_64_holds_no_more_than_its_share_of_the_hashing_queue(api: Api) -> None:
    """Review script f3_ipv6_dos.py: 80 addresses of one /64 filled the hashing queue and
    the real user's sign-ins got 503."""
    fleet = api.handle.fleet
    await trio.to_thread.run_sync(lambda: fleet.create_user_sync(OWNER, PASSWORD, "developer"))
    app = create_app(fleet, ApiSettings())
    share = 4  # ApiSettings.login_max_checks_per_address
    holders = [object() for _ in range(int(fleet.hash_limiter.total_tokens))]
    for holder in holders:  # every hashing thread is busy: checks queue up
        await fleet.hash_limiter.acquire_on_behalf_of(holder)
    statuses: list[int] = []
    legit: list[int] = []

    async def guess(n: int) -> None:
        async with _asgi_from(app, f"2001:db8:100:1::{0x2001 + n:x}") as client:
            statuses.append((await sign_in(client, f"x{n}", "wrong")).status_code)

    async def owner() -> None:
        async with _asgi_from(app, "2001:db8:100:2::1") as client:
            legit.append((await sign_in(client, OWNER, PASSWORD)).status_code)

    async with trio.open_nursery() as nursery:
        for n in range(10):
            nursery.start_soon(guess, n)
        with trio.fail_after(30):  # every guess either waits for a hashing thread or got 429
            while statuses.count(429) + fleet.hash_limiter.statistics().tasks_waiting < 10:
                await trio.sleep(0.01)
        assert fleet.hash_limiter.statistics().tasks_waiting == share
        assert statuses == [429] * (10 - share)
        nursery.start_soon(owner)  # the queue has room for everybody else
        with trio.fail_after(30):
            while fleet.hash_limiter.statistics().tasks_waiting < share + 1:
                await trio.sleep(0.01)
        for holder in holders:
            fleet.hash_limiter.release_on_behalf_of(holder)
    assert sorted(statuses) == [400] * share + [429] * (10 - share)
    assert legit == [200]


# --- C: lockouts that do not lock owners out, and an administrator's unlock ---------------


async def test_guesses_from_anywhere_cannot_lock_an_owner_out_of_its_own_address(
    nursery: trio.Nursery, data_dir: Path,
) -> None:
    """Review scripts f3_lockout_dos.py and f3_client_creds.py: failures from anywhere
    locked the account (and an OAuth client) for 30 minutes, also for its owner."""
    async with _server(nursery, data_dir, login_max_failures_per_user=5,
                       login_first_account_lockout_seconds=600) as api:
        client_id, secret = await trio.to_thread.run_sync(
            lambda: api.handle.fleet.create_client_sync("CI", "viewer"))

        async def client_token(address: str, the_secret: str) -> httpx.Response:
            async with client_from(api, address) as http:
                return await http.post("/oauth/token", data={
                    "grant_type": "client_credentials", "client_id": client_id,
                    "client_secret": the_secret})

        async with client_from(api, "127.0.2.1") as home:  # where the owner signs in
            assert (await sign_in(home, OWNER, PASSWORD)).status_code == 200
        assert (await client_token("127.0.2.2", secret)).status_code == 200  # the CI's host
        guesses = []
        for n in range(1, 26):  # 25 guesses from 25 addresses at each
            async with client_from(api, f"127.0.10.{n}") as client:
                guesses.append((await sign_in(client, OWNER, "wrong")).status_code)
            guesses.append((await client_token(f"127.0.11.{n}", "wrong")).status_code)
        # 5 failures each, then both are locked for addresses they never signed in from.
        assert guesses[0::2] == [400] * 5 + [429] * 20
        assert guesses[1::2] == [401] * 5 + [429] * 20
        async with client_from(api, "127.0.2.1") as home:
            assert (await sign_in(home, OWNER, PASSWORD)).status_code == 200
        assert (await client_token("127.0.2.2", secret)).status_code == 200
        # From an address they never used, the account and the client are locked.
        async with client_from(api, "127.0.12.1") as fresh:
            refused = await sign_in(fresh, OWNER, PASSWORD)
        assert refused.status_code == 429 and "for this account" in refused.text
        refused = await client_token("127.0.12.2", secret)
        assert refused.status_code == 429 and "for this OAuth client" in refused.text


async def test_an_administrator_lifts_a_lockout_through_the_api_and_the_cli(
    nursery: trio.Nursery, data_dir: Path,
) -> None:
    async with _server(nursery, data_dir, login_max_failures_per_user=5,
                       login_first_account_lockout_seconds=600) as api:
        await _fail_from(api, [f"127.0.20.{n}" for n in range(1, 6)], OWNER)
        async with client_from(api, "127.0.21.1") as owner:
            assert (await sign_in(owner, OWNER, PASSWORD)).status_code == 429
        listed = (await api.client.get("/v1/sign-in-limits")).json()
        assert listed["limits"][0] == {
            "kind": "user", "name": OWNER, "failures": 5, "limit": 5, "in_progress": 0,
            "locked": True, "retry_after": listed["limits"][0]["retry_after"]}
        assert 590 <= listed["limits"][0]["retry_after"] <= 600
        # Only installation owners and administrators may see or clear them.
        for role in ("developer", "viewer"):
            async with await api.client_for(role) as other:
                assert (await other.get("/v1/sign-in-limits")).status_code == 403
                denied = await other.delete(f"/v1/sign-in-limits/users/{OWNER}")
                assert denied.status_code == 403
        async with await api.client_for("administrator") as admin:
            cleared = await admin.delete(f"/v1/sign-in-limits/users/{OWNER}")
        assert cleared.status_code == 200, cleared.text
        assert cleared.json()["cleared"]["failures"] == 5 and cleared.json()["cleared"]["locked"]
        async with client_from(api, "127.0.21.1") as owner:
            assert (await sign_in(owner, OWNER, PASSWORD)).status_code == 200
        unlocks = await _audit(api, "sign_in.unlock")
        assert [(row.target, row.details["failures"]) for row in unlocks] == [
            (f"user:{OWNER}", 5)]
        assert (await api.client.delete("/v1/sign-in-limits/devices/x")).status_code == 400

        # The same through the CLI (a running server: the limits live in its memory).
        await _fail_from(api, [f"127.0.22.{n}" for n in range(1, 6)], "dave@example.com")
        env = {"OTA_API_URL": api.handle.api_url, "OTA_TOKEN": api.token}

        def ota(*args: str) -> Any:
            return CliRunner().invoke(ota_app, ["admin", "sign-in-limits", *args], env=env)

        shown = await trio.to_thread.run_sync(ota, "list")
        assert shown.exit_code == 0 and "dave@example.com" in shown.output, shown.output
        done = await trio.to_thread.run_sync(ota, "clear", "user", "dave@example.com")
        assert done.exit_code == 0, done.output
        assert "lockout lifted, 5 failed sign-ins forgotten" in done.output
        again = await trio.to_thread.run_sync(ota, "clear", "user", "dave@example.com")
        assert "no failed sign-ins were counted" in again.output
        after = await trio.to_thread.run_sync(ota, "list", "--json")
        assert after.exit_code == 0, after.output
        assert "dave@example.com" not in after.output and "127.0.22.5" in after.output


# --- E: a spray of other names does not flush an account's count ---------------------------


async def test_a_spray_of_other_names_does_not_flush_an_accounts_count(
    nursery: trio.Nursery, data_dir: Path,
) -> None:
    """Review script f3_evict_live.py: 19 guesses at dave, 10,000 at other names, and dave
    got 20 more guesses. Here: 16 keys remembered, 4 guesses at dave, 40 at other names."""
    async with _server(nursery, data_dir, login_tracked_keys=16,
                       login_max_failures_per_address=3, login_max_failures_per_user=5,
                       login_first_account_lockout_seconds=600) as api:
        await _fail_from(api, [f"127.0.30.{n}" for n in range(1, 5)], "dave")
        for n in range(20):  # 2 failures per address, under its limit of 3
            async with client_from(api, f"127.0.31.{n + 1}") as client:
                for name in (f"spray-{n}-a", f"spray-{n}-b"):
                    assert (await sign_in(client, name, "wrong")).status_code == 400
        await _fail_from(api, ["127.0.32.1"], "dave")  # the 5th: dave is locked now
        async with client_from(api, "127.0.32.2") as client:
            assert (await sign_in(client, "dave", "wrong")).status_code == 429


# --- F: lockouts are logged and audited, once -----------------------------------------------


async def test_lockouts_are_logged_once_per_burst_then_summarised_and_audited_once(
    nursery: trio.Nursery, data_dir: Path, caplog: pytest.LogCaptureFixture,
    mock_clock: MockClock,
) -> None:
    """The burst runs with trio's clock stopped (``mock_clock``: rate 0), so its eight
    attempts fall in one 0.2 s interval however long the machine takes to hash the
    passwords; once it is over, the clock jumps to each deadline and the summaries fall due."""
    caplog.set_level(logging.INFO, logger="ota.api.sign_in")
    async with _server(nursery, data_dir, login_max_failures_per_address=3,
                       login_log_interval=0.2) as api:
        async with client_from(api, "127.0.40.1") as attacker:
            for n in range(3):
                assert (await sign_in(attacker, f"guess-{n}", "wrong")).status_code == 400
            for _ in range(5):
                assert (await sign_in(attacker, OWNER, PASSWORD)).status_code == 429
        assert trio.current_time() == 0  # the whole burst at one instant
        mock_clock.autojump_threshold = 0  # from here on, time jumps whenever all is idle

        def lines(level: int, text: str) -> list[str]:
            return [r.getMessage() for r in caplog.records
                    if r.name == "ota.api.sign_in" and r.levelno == level
                    and text in r.getMessage()]

        with trio.fail_after(30):  # the summaries come from the server's own task
            while not lines(logging.WARNING, "sign-in limits in the last") or \
                    not lines(logging.INFO, "more failed sign-ins"):
                await trio.sleep(0.02)
        first = lines(logging.WARNING, "sign-in lockout")
        assert len(first) == 1 and "address 127.0.40.1 after 3 failed attempts" in first[0]
        assert "sign-in-limits clear address 127.0.40.1" in first[0]
        summary = lines(logging.WARNING, "sign-in limits in the last")
        assert summary == ["sign-in limits in the last 0.2 s: 5 refused (address locked); "
                           "most from 127.0.40.1 (5)"]
        failed = lines(logging.INFO, "failed sign-in for account 'guess-0' from 127.0.40.1")
        assert len(failed) == 1
        assert lines(logging.INFO, "2 more failed sign-ins") != []
        lockouts = await _audit(api, "sign_in.lockout")
        assert [(row.actor, row.target, row.details["failures"]) for row in lockouts] == [
            ("address:127.0.40.1", "address:127.0.40.1", 3)]
