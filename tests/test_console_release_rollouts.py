"""The console's rollout pages over the real server: start a rollout from the form (phases
as percents), see its phases, counts and gates, steer it with pause / resume / abort (the
same fleet methods as the REST API, audit-logged as the signed-in user), and refusals shown
on the page."""

from __future__ import annotations

from tests.conftest import Api
from tests.console_helpers import add_user, join_team, page, post_form, signed_in

DEVICES = [f"{i:024x}" for i in range(1, 11)]


async def _product_with_devices(api: Api) -> str:
    product = await api.create_product("Widget")
    slug: str = product["slug"]
    for device in DEVICES:
        assert (await api.client.post(f"/v1/products/{slug}/devices",
                                      json={"id": device})).status_code == 200
    assert (await api.upload(slug, 2)).status_code == 201
    return slug


async def test_start_steer_and_watch_a_rollout(api: Api) -> None:
    slug = await _product_with_devices(api)
    url = f"/console/products/{slug}/rollouts"
    async with signed_in(api, token=api.token) as client:
        form = page(await client.get(url + "?version=2"))
        assert form.control_labelled("Version").name == "version"
        assert form.control_labelled("Phases (percent of devices)").name == "phases"
        assert form.unlabelled() == []
        # A bad plan: refused with the reason, the values kept.
        answer = await post_form(client, url, {"version": "2", "phases": "50,20",
                                               "force": "on"})
        assert answer.status_code == 400
        shown = page(answer)
        assert shown.alerts and "phase" in shown.alerts[0].lower()
        assert shown.control_labelled("Phases (percent of devices)").attrs["value"] == "50,20"
        answer = await post_form(client, url, {
            "version": "2", "phases": "20,100", "phase_wait": "60",
            "max_failure_percent": "10", "min_sample": "2", "on_failure": "abort",
            "force": "on"})
        assert answer.status_code == 303, answer.text
        rollout_url = answer.headers["location"].split("?")[0]
        rollout_id = rollout_url.rsplit("/", 1)[1]
        shown = page(await client.get(answer.headers["location"]))
        assert "The rollout was created." in shown.all_text
        assert shown.testids["rollout-state"] == "running"
        assert "Devices per phase" in shown.all_text
        assert "Abort when failures exceed 10" in shown.all_text
        fragment = page(await client.get(rollout_url + "/phases"))
        assert fragment.testids["rollout-state"] == "running"
        for action, state in (("pause", "paused"), ("resume", "running"),
                              ("abort", "aborted")):
            answer = await post_form(client, f"{rollout_url}/{action}",
                                     {"reason": f"test {action}"}, csrf_from=rollout_url)
            assert answer.status_code == 303, answer.text
            assert page(await client.get(rollout_url)).testids["rollout-state"] == state
        # Resuming an aborted rollout: refused, shown on its page.
        answer = await post_form(client, f"{rollout_url}/resume", {}, csrf_from=rollout_url)
        assert 400 <= answer.status_code < 500
        assert page(answer).alerts
        listing = page(await client.get(url))
        assert any(text == f"Rollout {rollout_id}" for _, text in listing.links)
    rest = (await api.client.get(f"/v1/products/{slug}/rollouts/{rollout_id}")).json()
    assert rest["rollout"]["state"] == "aborted"
    audit = (await api.client.get(f"/v1/products/{slug}/audit?action=rollout.")).json()
    assert {e["action"] for e in audit["entries"]} >= {"rollout.pause", "rollout.resume",
                                                       "rollout.abort"}
    assert {e["actor"] for e in audit["entries"]} == {"test owner"}


async def test_a_viewer_sees_rollouts_but_cannot_steer_them(api: Api) -> None:
    slug = await _product_with_devices(api)
    created = await api.client.post(f"/v1/products/{slug}/rollouts",
                                    json={"version": 2, "phases": "100", "force": True})
    assert created.status_code == 201, created.text
    rollout_id = created.json()["rollout"]["id"]
    await add_user(api, "vera@example.com")
    await join_team(api, slug, "vera@example.com", "viewer")
    async with signed_in(api, username="vera@example.com") as viewer:
        url = f"/console/products/{slug}/rollouts/{rollout_id}"
        shown = page(await viewer.get(url))
        assert shown.testids["rollout-state"] == "running"
        assert not any(c.tag == "button" and "formaction" in c.attrs for c in shown.controls)
        answer = await viewer.post(url + "/abort", data={"csrf_token": shown.value_of(
            "csrf_token"), "reason": "no"})
        assert answer.status_code == 403
        assert (await viewer.get(url)).status_code == 200  # the connection still serves
    rest = (await api.client.get(f"/v1/products/{slug}/rollouts/{rollout_id}")).json()
    assert rest["rollout"]["state"] == "running"
