"""Failed sign-ins cannot slow the server down or guess passwords without limit (issue 13,
finding 3): scrypt runs on its own thread pool, and /oauth/token answers 429 once an address
or an account collected its failures.

Nothing here depends on the machine's speed: the pool test holds every hashing slot itself
and waits for conditions; the limit tests count answers. Client addresses are real loopback
source addresses (127.0.0.2, ...), bound by httpx.
"""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import trio

from tests.conftest import Api, _server_config

PASSWORD = "correct horse battery"


@pytest.fixture
async def limited_api(nursery: trio.Nursery, data_dir: Path) -> AsyncIterator[Api]:
    """A server whose sign-in limits are small: 3 failures per address, 5 per account (first
    account lockout 10 minutes, so that no lockout ends during a test), one hashing thread
    and 4 checks waiting for it."""
    from server.app import serve

    config = _server_config(data_dir)
    config = replace(config, api=replace(
        config.api,
        login_max_failures_per_address=3,
        login_max_failures_per_user=5,
        login_first_account_lockout_seconds=600,
        password_hash_threads=1,
        password_hash_queue=4,
    ))
    handle = await nursery.start(serve, config)
    grant = await trio.to_thread.run_sync(lambda: handle.fleet.create_api_token_sync("owner"))
    await trio.to_thread.run_sync(
        lambda: handle.fleet.create_user_sync("ops@example.com", PASSWORD, "developer")
    )
    async with httpx.AsyncClient(base_url=handle.api_url, timeout=30, headers={
            "Authorization": f"Bearer {grant.access_token}"}) as client:
        yield Api(handle, client, grant.access_token)
    handle.shutdown.set()


def client_from(api: Api, address: str) -> httpx.AsyncClient:
    """A client whose connections come from ``address`` (any of 127.0.0.0/8 is local)."""
    transport = httpx.AsyncHTTPTransport(local_address=address)
    return httpx.AsyncClient(base_url=api.handle.api_url, transport=transport, timeout=30)


async def sign_in(client: httpx.AsyncClient, username: str, password: str) -> httpx.Response:
    return await client.post("/oauth/token", data={
        "grant_type": "password", "username": username, "password": password})


async def test_store_reads_go_on_while_every_hashing_slot_is_taken(api: Api) -> None:
    fleet = api.handle.fleet
    await trio.to_thread.run_sync(
        lambda: fleet.create_user_sync("ops@example.com", PASSWORD, "viewer")
    )
    holders = [object() for _ in range(int(fleet.hash_limiter.total_tokens))]
    for holder in holders:  # every password-hashing thread is busy
        await fleet.hash_limiter.acquire_on_behalf_of(holder)
    answers: list[int] = []

    async def guess(n: int) -> None:  # each from its own address (4 checks per address)
        async with client_from(api, f"127.0.4.{n + 1}") as client:
            answers.append((await sign_in(client, f"nobody-{n}", "wrong")).status_code)

    async with trio.open_nursery() as nursery:
        for n in range(8):  # as many as the store has threads, and more
            nursery.start_soon(guess, n)
        with trio.fail_after(30):
            while fleet.hash_limiter.statistics().tasks_waiting < 8:
                await trio.sleep(0.01)
        # The store's threads are free: reads are answered while every check waits.
        with trio.fail_after(30):
            listed = await api.client.get("/v1/products")
            me = await api.client.get("/v1/access_tokens/current")
        assert listed.status_code == 200 and me.status_code == 200
        assert answers == [] and fleet.hash_limiter.statistics().tasks_waiting == 8
        for holder in holders:
            fleet.hash_limiter.release_on_behalf_of(holder)
    assert answers == [400] * 8


async def test_the_next_failure_from_an_address_gets_429(api: Api) -> None:
    """With the default limits: Particle's 10 failures from one address."""
    await trio.to_thread.run_sync(
        lambda: api.handle.fleet.create_user_sync("ops@example.com", PASSWORD, "viewer"))
    async with (client_from(api, "127.0.0.2") as attacker,
                client_from(api, "127.0.0.3") as someone_else):
        for n in range(10):  # failures against accounts that do not exist count too
            name = "ops@example.com" if n % 2 else f"nobody-{n}@example.com"
            response = await sign_in(attacker, name, "wrong")
            assert response.status_code == 400, response.text
        refused = await sign_in(attacker, "ops@example.com", PASSWORD)  # even the right one
        assert refused.status_code == 429, refused.text
        assert refused.json()["error"] == "too_many_requests"
        assert "from this address" in refused.json()["error_description"]
        assert 1700 <= int(refused.headers["retry-after"]) <= 1800
        # Another address is not locked out, and its success does not unlock the first.
        assert (await sign_in(someone_else, "ops@example.com", PASSWORD)).status_code == 200
        assert (await sign_in(attacker, "ops@example.com", PASSWORD)).status_code == 429


async def test_failures_against_one_account_from_many_addresses_lock_it_for_new_addresses(
    limited_api: Api,
) -> None:
    """The account's count is the account's, not an address's (OWASP): guesses spread over
    many addresses lock it, for addresses it has not signed in from before."""
    for n in range(5):  # 5 failures, each from its own address (under the address limit)
        async with client_from(limited_api, f"127.0.1.{n + 1}") as client:
            assert (await sign_in(client, "ops@example.com", "wrong")).status_code == 400
    async with client_from(limited_api, "127.0.2.1") as owner:
        refused = await sign_in(owner, "ops@example.com", PASSWORD)
        assert refused.status_code == 429
        assert "for this account" in refused.json()["error_description"]
        assert 0 < int(refused.headers["retry-after"]) <= 600  # the first, short lockout
        # Other accounts from that address are not affected.
        await trio.to_thread.run_sync(lambda: limited_api.handle.fleet.create_user_sync(
            "dev@example.com", PASSWORD, "viewer"))
        assert (await sign_in(owner, "dev@example.com", PASSWORD)).status_code == 200


async def test_a_success_clears_only_its_own_address(limited_api: Api) -> None:
    async with client_from(limited_api, "127.0.0.4") as first, \
            client_from(limited_api, "127.0.0.5") as second:
        for _ in range(2):
            assert (await sign_in(first, "ghost-1", "wrong")).status_code == 400
            assert (await sign_in(second, "ghost-2", "wrong")).status_code == 400
        assert (await sign_in(second, "ops@example.com", PASSWORD)).status_code == 200
        # The first address still has its 2 failures: one more locks it out.
        assert (await sign_in(first, "ghost-1", "wrong")).status_code == 400
        assert (await sign_in(first, "ops@example.com", PASSWORD)).status_code == 429
        # The second started over with its success.
        for _ in range(2):
            assert (await sign_in(second, "ghost-2", "wrong")).status_code == 400
        assert (await sign_in(second, "ops@example.com", PASSWORD)).status_code == 200


async def test_client_credentials_are_limited_too(limited_api: Api) -> None:
    fleet = limited_api.handle.fleet
    client_id, secret = await trio.to_thread.run_sync(
        lambda: fleet.create_client_sync("CI", "viewer"))

    def basic(the_secret: str) -> dict[str, str]:
        pair = base64.b64encode(f"{client_id}:{the_secret}".encode()).decode()
        return {"Authorization": f"Basic {pair}"}

    async with client_from(limited_api, "127.0.0.6") as client:
        for _ in range(3):
            response = await client.post("/oauth/token", data={"grant_type": "client_credentials"},
                                         headers=basic("wrong"))
            assert response.status_code == 401
        refused = await client.post("/oauth/token", data={"grant_type": "client_credentials"},
                                    headers=basic(secret))
        assert refused.status_code == 429 and int(refused.headers["retry-after"]) > 0


async def test_parallel_guesses_cannot_overtake_the_count(limited_api: Api) -> None:
    fleet = limited_api.handle.fleet
    holder = object()
    await fleet.hash_limiter.acquire_on_behalf_of(holder)  # the checks queue up
    statuses: list[int] = []

    async def guess(client: httpx.AsyncClient) -> None:
        statuses.append((await sign_in(client, "ops@example.com", "wrong")).status_code)

    async with client_from(limited_api, "127.0.0.7") as client, trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(guess, client)
        with trio.fail_after(30):  # 3 admitted (the address limit), 7 refused at once
            while statuses.count(429) < 7 or fleet.hash_limiter.statistics().tasks_waiting < 3:
                await trio.sleep(0.01)
        assert statuses == [429] * 7 and fleet.hash_limiter.statistics().tasks_waiting == 3
        fleet.hash_limiter.release_on_behalf_of(holder)
    assert sorted(statuses) == [400] * 3 + [429] * 7


async def test_a_full_hashing_queue_answers_503_at_once(limited_api: Api) -> None:
    """... except to an account's sign-in from an address it signed in from before: that
    waits its turn (a flood from elsewhere delays its owner but does not refuse them)."""
    fleet = limited_api.handle.fleet
    async with client_from(limited_api, "127.0.3.50") as home:
        assert (await sign_in(home, "ops@example.com", PASSWORD)).status_code == 200
    holder = object()
    await fleet.hash_limiter.acquire_on_behalf_of(holder)
    statuses: list[int] = []

    async def guess(n: int) -> None:
        async with client_from(limited_api, f"127.0.3.{n + 1}") as client:
            statuses.append((await sign_in(client, f"user{n}", "wrong")).status_code)

    async with trio.open_nursery() as nursery:
        for n in range(4):
            nursery.start_soon(guess, n)
        with trio.fail_after(30):
            while fleet.hash_limiter.statistics().tasks_waiting < 4:
                await trio.sleep(0.01)
        async with client_from(limited_api, "127.0.3.99") as late:
            busy = await sign_in(late, "ops@example.com", PASSWORD)
        assert busy.status_code == 503 and busy.headers["retry-after"] == "2"
        assert busy.json()["error"] == "temporarily_unavailable"
        owner: list[int] = []

        async def owner_signs_in() -> None:
            async with client_from(limited_api, "127.0.3.50") as home:
                owner.append((await sign_in(home, "ops@example.com", PASSWORD)).status_code)

        nursery.start_soon(owner_signs_in)
        with trio.fail_after(30):  # in the queue, past its bound
            while fleet.hash_limiter.statistics().tasks_waiting < 5:
                await trio.sleep(0.01)
        fleet.hash_limiter.release_on_behalf_of(holder)
    assert statuses == [400] * 4 and owner == [200]
