"""Rollouts and maintenance windows over real HTTP (issue 15, interfaces): create, list,
show, pause, resume and abort; a threshold that aborts by itself shows its reason; windows
set, shown and cleared; who may do what; bad input gets a specific 4xx."""

from __future__ import annotations

from typing import Any

import httpx
import pytest
import trio

from otacore.rollout import Verdict
from tests.conftest import Api

DEVICES = [f"{i:024x}" for i in range(1, 21)]


async def _product(api: Api, name: str = "Rollouts", devices: list[str] = DEVICES) -> str:
    """A product of 20 devices, firmware v1 and v2 uploaded (neither seen running), group
    "beta" holding the first four devices."""
    slug = (await api.create_product(name))["slug"]
    for version in (1, 2):
        assert (await api.upload(slug, version)).status_code == 201
    for device in devices:
        added = await api.client.post(f"/v1/products/{slug}/devices", json={"id": device})
        assert added.status_code == 200, added.text
    assert (await api.client.post(f"/v1/products/{slug}/groups", json={"name": "beta"})
            ).status_code == 201
    for device in devices[:4]:
        moved = await api.client.put(f"/v1/products/{slug}/devices/{device}",
                                     json={"groups": ["beta"]})
        assert moved.status_code == 200, moved.text
    return slug


async def _create(api: Api, slug: str, **fields: Any) -> dict[str, Any]:
    response = await api.client.post(f"/v1/products/{slug}/rollouts", json=fields)
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["ok"] is True
    rollout: dict[str, Any] = body["rollout"]
    return rollout


async def test_rollout_lifecycle(api: Api) -> None:
    slug = await _product(api)
    url = f"/v1/products/{slug}/rollouts"
    unforced = await api.client.post(url, json={"version": 2, "phases": "10,50,100"})
    assert unforced.status_code == 400 and "force" in unforced.json()["error"]

    rollout = await _create(api, slug, version=2, phases="10,50,100", phase_wait=5,
                            max_failure_percent=20, min_sample=2, on_failure="abort",
                            force=True)
    rid = rollout["id"]
    assert isinstance(rid, int)
    assert rollout["state"] == "running" and rollout["reason"] is None
    assert rollout["forced"] is True and rollout["groups"] == [] and rollout["version"] == 2
    # Devices in the group "beta" have no group release: the product default decides them.
    assert rollout["counts"]["total"] == 20 and rollout["counts"]["pending"] == 20
    assert [p["size"] for p in rollout["phases"]] == [10, 50, 100]
    assert sum(p["counts"]["total"] for p in rollout["phases"]) == 20
    assert rollout["phases"][0]["opened_at"] is not None
    assert rollout["phases"][1]["opened_at"] is None
    assert rollout["criteria"][0]["action"] == "abort"
    assert rollout["criteria"][0]["percent"] == 20

    shown = await api.client.get(f"{url}/{rid}")
    assert shown.status_code == 200
    assert shown.json()["rollout"]["id"] == rid
    assert shown.json()["rollout"]["state"] == "running"

    # One active rollout per scope: a second product-default rollout is refused.
    again = await api.client.post(url, json={"version": 1, "phases": "100", "force": True})
    assert again.status_code == 409 and f"rollout {rid}" in again.json()["error"]

    paused = await api.client.post(f"{url}/{rid}/pause", json={"reason": "checking logs"})
    assert paused.status_code == 200, paused.text
    assert paused.json()["rollout"]["state"] == "paused"
    assert paused.json()["rollout"]["reason"] == "checking logs"
    twice = await api.client.post(f"{url}/{rid}/pause")
    assert twice.status_code == 409, twice.text
    resumed = await api.client.post(f"{url}/{rid}/resume")
    assert resumed.status_code == 200 and resumed.json()["rollout"]["state"] == "running"
    aborted = await api.client.post(f"{url}/{rid}/abort", data={"reason": "wrong build"})
    assert aborted.status_code == 200, aborted.text
    body = aborted.json()["rollout"]
    assert body["state"] == "aborted" and body["reason"] == "wrong build"
    kinds = [e["kind"] for e in body["events"]]
    assert {"started", "paused", "resumed", "aborted"} <= set(kinds)
    refused = await api.client.post(f"{url}/{rid}/resume")
    assert refused.status_code == 409

    # Once aborted, the scope is free again; the list is newest first, filterable.
    group_rollout = await _create(api, slug, version=1, phases="#1,all", groups=["beta"],
                                  force=True)
    listed = (await api.client.get(url)).json()["rollouts"]
    assert [r["id"] for r in listed] == [group_rollout["id"], rid]
    assert group_rollout["groups"] == ["beta"]
    only_v2 = (await api.client.get(url, params={"version": "2"})).json()["rollouts"]
    assert [r["id"] for r in only_v2] == [rid]
    aborted = (await api.client.get(url, params={"state": "aborted"})).json()["rollouts"]
    assert [r["id"] for r in aborted] == [rid]
    both = (await api.client.get(url, params={"state": "running,aborted"})).json()
    assert [r["id"] for r in both["rollouts"]] == [group_rollout["id"], rid]
    bad_state = await api.client.get(url, params={"state": "exploded"})
    assert bad_state.status_code == 400 and "unknown rollout state" in bad_state.text

    with api.store.read() as tx:
        product_id = tx.get_product(slug).id  # type: ignore[union-attr]
        actions = [a.action for a in tx.list_audit(product_id)]
    assert {"rollout.create.forced", "rollout.pause", "rollout.resume",
            "rollout.abort"} <= set(actions)


async def _phase_one(api: Api, slug: str, rid: int) -> list[str]:
    fleet = api.handle.fleet
    found = []
    for device in DEVICES:
        decision = await fleet.rollout_offer_decision(slug, rid, device)
        if decision.verdict is Verdict.OFFER:
            found.append(device)
    return found


async def test_a_threshold_aborts_and_show_names_the_rollbacks(api: Api) -> None:
    slug = await _product(api)
    rollout = await _create(api, slug, version=2, phases="#4,all", max_failure_percent=20,
                            min_sample=2, on_failure="abort", force=True)
    rid = rollout["id"]
    first = await _phase_one(api, slug, rid)
    assert len(first) == 4
    fleet = api.handle.fleet
    for device in first[:2]:
        for outcome in ("offered", "downloading", "rebooting", "rolled_back"):
            await fleet.record_rollout_outcome(slug, rid, device, outcome)
    shown = (await api.client.get(f"/v1/products/{slug}/rollouts/{rid}")).json()["rollout"]
    assert shown["state"] == "aborted"
    assert "rolled_back" in shown["reason"]
    assert shown["counts"]["rolled_back"] == 2 and shown["counts"]["failed"] == 2
    assert shown["phases"][0]["counts"]["rolled_back"] == 2
    assert shown["phases"][1]["counts"]["rolled_back"] == 0
    aborted = [e for e in shown["events"] if e["kind"] == "aborted"]
    assert len(aborted) == 1 and aborted[0]["by"] == "policy"
    # Events number phases from 1, as phases[].phase does.
    started = [e for e in shown["events"] if e["kind"] == "phase_started"]
    assert [e["phase"] for e in started] == [1] and "phase 1 of 2" in started[0]["reason"]


async def test_windows_set_show_and_clear(api: Api) -> None:
    slug = await _product(api)
    url = f"/v1/products/{slug}/window"
    assert (await api.client.get(url)).json() == {"window": None, "groups": []}
    assert (await api.client.delete(url)).status_code == 404

    set_ = await api.client.put(url, json={"cron": "0 2 * * *", "duration": 120,
                                           "timezone": "Europe/Berlin"})
    assert set_.status_code == 200, set_.text
    window = set_.json()["window"]
    assert window["cron"] == "0 2 * * *" and window["duration"] == 120
    assert window["timezone"] == "Europe/Berlin" and window["group"] is None
    assert isinstance(window["open_now"], bool) and window["next_open_at"] is not None
    # A group's window, as a form; the product's is replaced in place.
    group = await api.client.put(url, data={"cron": "30 3 * * 1-5", "duration": "60",
                                            "group": "beta"})
    assert group.status_code == 200, group.text
    assert group.json()["window"]["timezone"] == "UTC"
    replaced = await api.client.put(url, json={"cron": "0 4 * * *", "duration": 30})
    assert replaced.status_code == 200
    shown = (await api.client.get(url)).json()
    assert shown["window"]["cron"] == "0 4 * * *"
    assert [(w["group"], w["cron"]) for w in shown["groups"]] == [("beta", "30 3 * * 1-5")]

    assert (await api.client.delete(url, params={"group": "beta"})).status_code == 204
    assert (await api.client.delete(url)).status_code == 204
    assert (await api.client.get(url)).json() == {"window": None, "groups": []}
    with api.store.read() as tx:
        product_id = tx.get_product(slug).id  # type: ignore[union-attr]
        actions = [a.action for a in tx.list_audit(product_id)]
    assert actions.count("window.set") == 3 and actions.count("window.clear") == 2


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "message"),
    [
        ("post", "/rollouts", {"phases": "100"}, 400, "firmware version"),
        ("post", "/rollouts", {"version": 2, "phases": "10,5", "force": True}, 400, "phase"),
        ("post", "/rollouts", {"version": 2, "phases": "abc", "force": True}, 400, "phase"),
        ("post", "/rollouts", {"version": 9, "force": True}, 404, "no firmware version 9"),
        ("post", "/rollouts", {"version": 2, "force": "maybe"}, 400, "force"),
        ("post", "/rollouts", {"version": 2, "colour": "red"}, 400, "unknown"),
        ("post", "/rollouts", {"version": 2, "groups": ["nope"], "force": True}, 400,
         "does not exist"),
        ("post", "/rollouts", {"version": 2, "max_failure_percent": 120, "force": True}, 400,
         "outside"),
        ("post", "/rollouts", {"version": 2, "on_failure": "abort", "force": True}, 400,
         "max_failure_percent"),
        ("post", "/rollouts", {"version": 2, "max_failure_percent": 5, "on_failure": "explode",
                               "force": True}, 400, "explode"),
        ("post", "/rollouts", {"version": 2, "max_per_minute": 0, "force": True}, 400,
         "max_per_minute"),
        ("get", "/rollouts/abc", None, 400, "positive whole number"),
        ("get", "/rollouts/0", None, 400, "positive whole number"),
        ("get", "/rollouts/999", None, 404, "no rollout 999"),
        ("get", "/rollouts?version=x", None, 400, "version"),
        ("post", "/rollouts/999/pause", {}, 404, "no rollout 999"),
        ("post", "/rollouts/999/pause", {"reason": 5}, 400, "reason must be text"),
        ("post", "/rollouts/999/resume", {"reason": "x"}, 400, "unknown"),
        ("put", "/window", {"duration": 5}, 400, "cron is required"),
        ("put", "/window", {"cron": "0 2 * * *"}, 400, "duration is required"),
        ("put", "/window", {"cron": "0 2 * *", "duration": 5}, 400, "five fields"),
        ("put", "/window", {"cron": "0 25 * * *", "duration": 5}, 400, "cron"),
        ("put", "/window", {"cron": "0 2 * * *", "duration": 0}, 400, "duration"),
        ("put", "/window", {"cron": "0 2 * * *", "duration": 1.5}, 400, "whole minutes"),
        ("put", "/window", {"cron": "0 2 * * *", "duration": 5, "timezone": "Mars/Base"}, 400,
         "unknown time zone"),
        ("put", "/window", {"cron": "0 2 * * *", "duration": 5, "group": "nope"}, 400,
         "no group"),
        ("put", "/window", {"cron": ["0"], "duration": 5}, 400, "cron must be text"),
        ("put", "/window", {"cron": "0 2 * * *", "duration": 5, "when": 1}, 400, "unknown"),
        ("delete", "/window?group=nope", None, 400, "no group"),
    ],
)
async def test_bad_input_gets_a_specific_error(
    api: Api, method: str, path: str, body: dict[str, Any] | None, status: int, message: str
) -> None:
    slug = await _product(api)
    before = await api.snapshot()
    url = f"/v1/products/{slug}{path}"
    response = await api.client.request(method.upper(), url, json=body)
    assert response.status_code == status, response.text
    assert message in response.json()["error"], response.text
    assert await api.snapshot() == before


async def test_who_may_see_and_steer_rollouts(api: Api) -> None:
    slug = await _product(api)
    other = await _product(api, "Elsewhere", [f"ff{d[2:]}" for d in DEVICES])
    rollout = await _create(api, slug, version=2, phases="50,100", force=True)
    rid = rollout["id"]
    base = f"/v1/products/{slug}"

    viewer = await api.client_for("viewer")
    async with viewer:
        assert (await viewer.get(f"{base}/rollouts/{rid}")).status_code == 200
        assert (await viewer.get(f"{base}/rollouts")).status_code == 200
        assert (await viewer.get(f"{base}/window")).status_code == 200
        for method, path, body in (
            ("POST", "/rollouts", {"version": 2, "phases": "100", "force": True}),
            ("POST", f"/rollouts/{rid}/pause", {}),
            ("POST", f"/rollouts/{rid}/abort", {}),
            ("PUT", "/window", {"cron": "0 2 * * *", "duration": 5}),
            ("DELETE", "/window", None),
        ):
            refused = await viewer.request(method, f"{base}{path}", json=body)
            assert refused.status_code == 403, (method, path, refused.text)

    # An API user of the other product does not see this one's rollout (404, as for a
    # product that does not exist).
    created = await api.client.post(f"/v1/products/{other}/team", json={
        "friendly_name": "ops", "scopes": ["firmware:release", "firmware:get",
                                          "products:update"]})
    assert created.status_code == 201, created.text
    token = created.json()["created"]["tokens"][0]["token"]
    async with httpx.AsyncClient(base_url=api.handle.api_url, timeout=20,
                                 headers={"Authorization": f"Bearer {token}"}) as outsider:
        for method, path in (("GET", f"/rollouts/{rid}"), ("POST", f"/rollouts/{rid}/abort"),
                             ("PUT", "/window")):
            refused = await outsider.request(method, f"{base}{path}", json={})
            assert refused.status_code == 404, refused.text
            assert "not found" in refused.json()["error"]
        # Its own product's rollouts do not include this rollout's id either.
        assert (await outsider.get(f"/v1/products/{other}/rollouts/{rid}")).status_code == 404
        # Holding firmware:release there, it may steer rollouts and set windows.
        own = await outsider.post(f"/v1/products/{other}/rollouts",
                                  json={"version": 2, "phases": "100", "force": True})
        assert own.status_code == 201, own.text
        window = await outsider.put(f"/v1/products/{other}/window",
                                    json={"cron": "0 2 * * *", "duration": 5})
        assert window.status_code == 200, window.text
        # ... but not list them: that needs firmware:list.
        listed = await outsider.get(f"/v1/products/{other}/rollouts")
        assert listed.status_code == 403 and "firmware:list" in listed.json()["error"]

    shown = (await api.client.get(f"{base}/rollouts/{rid}")).json()["rollout"]
    assert shown["state"] == "running"


async def test_rollout_events_reach_the_event_stream(api: Api) -> None:
    slug = await _product(api)
    seen: list[str] = []
    ready = trio.Event()

    async def listen() -> None:
        async with api.client.stream("GET", f"/v1/products/{slug}/events/ota/rollout") as rsp:
            ready.set()
            async for line in rsp.aiter_lines():
                if line.startswith("event:"):
                    seen.append(line[6:].strip())
                    if "ota/rollout/aborted" in seen:
                        return

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(listen)
            await ready.wait()
            rollout = await _create(api, slug, version=2, phases="100", force=True)
            aborted = await api.client.post(
                f"/v1/products/{slug}/rollouts/{rollout['id']}/abort")
            assert aborted.status_code == 200
    assert seen[0] == "ota/rollout/started" and seen[-1] == "ota/rollout/aborted"


async def test_openapi_documents_the_routes(api: Api) -> None:
    document = (await api.client.get("/openapi.json")).json()
    paths = document["paths"]
    rollouts = paths["/v1/products/{product}/rollouts"]
    assert set(rollouts) == {"get", "post"}
    body = rollouts["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert {"version", "phases", "max_failure_percent", "on_failure", "force"} <= set(
        body["properties"])
    for action in ("pause", "resume", "abort"):
        assert "post" in paths[f"/v1/products/{{product}}/rollouts/{{rollout_id}}/{action}"]
    assert set(paths["/v1/products/{product}/window"]) == {"get", "put", "delete"}
    assert paths["/v1/products/{product}/window"]["put"]["x-access"]["scope"] == \
        "products:update"


async def test_a_rollout_from_a_urlencoded_form(api: Api) -> None:
    slug = await _product(api)
    response = await api.client.post(f"/v1/products/{slug}/rollouts", data={
        "version": "2", "phases": "#2,all", "groups": "beta", "max_failure_percent": "25",
        "min_sample": "2", "on_failure": "pause", "max_per_minute": "10", "force": "true"})
    assert response.status_code == 201, response.text
    rollout = response.json()["rollout"]
    assert rollout["groups"] == ["beta"] and rollout["counts"]["total"] == 4
    assert rollout["criteria"][0]["percent"] == 25 and rollout["criteria"][0]["min_sample"] == 2
    assert rollout["rate_per_minute"] == 10
    refused = await api.client.post(f"/v1/products/{slug}/rollouts", data={
        "version": "2", "force": "perhaps"})
    assert refused.status_code == 400 and "force must be true or false" in refused.text
