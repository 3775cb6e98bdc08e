"""Hypothesis fuzzing of the rollout and maintenance-window endpoints over real HTTP: junk
and near-valid bodies, ids and queries get a 4xx with a message, never a 500.

Values are drawn near the valid ones (plan strings, percentages, epoch times, cron
expressions, zone names) as well as from any JSON, so that examples reach the policy, the
store and the state machine, not only the first field check. A rollout an example created
is aborted at once, so the next example's create is judged on its body, not refused as a
second rollout of the same scope.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st

from otacore.module import build_module
from tests.test_api_fuzz import ALLOWED, FUZZ, _send_json, broken_text, json_values, texts

DEVICES = [f"{i:024x}" for i in range(0xF00, 0xF0C)]

epoch_ms = st.integers(-(2**64), 2**64) | st.sampled_from([0, 1, 2**63 - 1, 253402300800000])
whole = st.integers(-5, 10**6) | st.sampled_from([2**63, 2**70, "5", "x", "", 1.5, True])
percent = st.floats(-1, 101, allow_nan=False) | st.integers(-1, 101) | st.sampled_from(
    ["20", "abc", None, float("inf")])
plans = st.sampled_from(["10,50,100", "#5,#20,all", "100", "#1,all", "", "0", "#0", "50,10",
                         "101", "10,,100", "#", "all", "1e3", "١٠٠"]) | texts
ROLLOUT_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "version": st.sampled_from([1, 2, "1", 0, -1, 2**70, 65536]) | json_values,
    "phases": plans | st.lists(st.integers(-1, 200) | st.just("all"), max_size=4),
    "groups": st.sampled_from([["beta"], "beta", "beta,nope", [], [""], ["a" * 300]])
    | json_values,
    "phase_wait": whole,
    "phase_starts": st.lists(st.none() | epoch_ms, max_size=4) | json_values,
    "start_at": epoch_ms | json_values,
    "success_percent": percent,
    "max_failure_percent": percent,
    "min_sample": whole,
    "on_failure": st.sampled_from(["pause", "abort", "explode", ""]) | json_values,
    "failure_scope": st.sampled_from(["phase", "rollout", "both", "x"]),
    "thresholds": st.lists(
        st.fixed_dictionaries({}, optional={
            "percent": percent, "min_sample": whole,
            "action": st.sampled_from(["pause", "abort", 3]),
            "scope": st.sampled_from(["phase", "rollout", "all"]),
            "kinds": st.sampled_from([["rolled_back"], "rolled_back", [], ["succeeded"],
                                      [1], {}]),
        }) | json_values, max_size=3) | json_values,
    "max_per_minute": whole,
    "rate_increment_factor": percent,
    "rate_increase_after": whole,
    "backoff_failures": whole,
    "backoff_minutes": whole,
    "reboot_timeout": whole,
    "immediate": st.booleans() | json_values,
    "force": st.just(True) | json_values,
    "colour": json_values,
}


def _near(valid: dict[str, Any], fields: dict[str, st.SearchStrategy[Any]]
          ) -> st.SearchStrategy[dict[str, Any]]:
    """``valid`` with one to three fields set to drawn values, or any subset of drawn
    fields (most examples then pass the first checks and reach the policy and store)."""
    one = st.sampled_from(sorted(fields)).flatmap(
        lambda name: fields[name].map(lambda value: (name, value)))
    near = st.lists(one, min_size=1, max_size=3).map(lambda pairs: {**valid, **dict(pairs)})
    return near | st.fixed_dictionaries({}, optional=fields)


VALID_ROLLOUT = {"version": 2, "phases": "10,50,100", "force": True}
cron_texts = st.sampled_from(["0 2 * * *", "*/5 * * * *", "0 2 * *", "0 25 * * *",
                              "0 0 31 2 *", "@daily", "0 2 * * * *", "0 2 L * *",
                              "0 0 29 2 *", ""]) | texts
zones = st.sampled_from(["UTC", "Europe/Berlin", "Australia/Lord_Howe", "Mars/Base", "",
                         "../../etc/passwd", "Europe/Berlin\x00", "/etc/localtime"]) | texts
WINDOW_FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "cron": cron_texts | json_values,
    "duration": st.integers(-1, 10**6) | st.sampled_from(["60", "1e3", 2**70]) | json_values,
    "timezone": zones | json_values,
    "group": st.sampled_from(["beta", "nope", "", "a" * 300]) | json_values,
    "when": json_values,
}
VALID_WINDOW = {"cron": "0 2 * * *", "duration": 60}
ids = st.sampled_from(["1", "0", "-1", "abc", "9" * 19, "9" * 400, "1.0", " 1", "%00", "١"]) \
    | st.integers(-(2**70), 2**70).map(str) | texts.filter(lambda t: t and "/" not in t)


@pytest.fixture(scope="module")
def client(threaded_server: Any) -> Iterator[httpx.Client]:
    with httpx.Client(
        base_url=threaded_server.url,
        headers={"Authorization": f"Bearer {threaded_server.token}"},
        timeout=30,
    ) as http:
        product = http.post("/v1/products", json={"name": "Rollout fuzz", "platform_id": 13})
        assert product.status_code == 201
        slug = product.json()["product"]["slug"]
        for version in (1, 2):
            image = build_module(bytes([version]) * 2000, platform_id=13, function=5,
                                 version=6, product_id=13, product_version=version)
            uploaded = http.post(f"/v1/products/{slug}/firmware",
                                 data={"version": str(version), "title": "t"},
                                 files={"binary": ("f.bin", image)})
            assert uploaded.status_code == 201, uploaded.text
        for device in DEVICES:
            assert http.post(f"/v1/products/{slug}/devices", json={"id": device}
                             ).status_code == 200
        assert http.post(f"/v1/products/{slug}/groups", json={"name": "beta"}
                         ).status_code == 201
        http.headers["x-product"] = slug
        yield http


def _base(client: httpx.Client) -> str:
    return f"/v1/products/{client.headers['x-product']}"


def _checked(response: httpx.Response) -> httpx.Response:
    assert response.status_code in ALLOWED, response.text
    if response.status_code >= 400:
        body = response.json()
        assert body["ok"] is False and body["error"]
    return response


def _abort_active(client: httpx.Client) -> None:
    for rollout in client.get(f"{_base(client)}/rollouts").json()["rollouts"]:
        if rollout["state"] in ("scheduled", "running", "paused"):
            _checked(client.post(f"{_base(client)}/rollouts/{rollout['id']}/abort"))


@FUZZ
@given(body=_near(VALID_ROLLOUT, ROLLOUT_FIELDS))
@example(body={"version": 2, "phases": "10,50,100", "force": True, "start_at": 2**64})
@example(body={"version": 2, "force": True, "phase_starts": [2**63]})
@example(body={"version": 2, "force": True, "groups": ["beta"], "max_per_minute": 2**70})
@example(body={"version": 2, "force": True, "phase_wait": 2**63})
def test_fuzz_create_rollout(client: httpx.Client, body: dict[str, Any]) -> None:
    response = _checked(_send_json(client, "POST", f"{_base(client)}/rollouts", body))
    event(f"create: {response.status_code}")  # --hypothesis-show-statistics: depth reached
    if response.status_code == 201:
        rollout = response.json()["rollout"]
        shown = _checked(client.get(f"{_base(client)}/rollouts/{rollout['id']}"))
        assert shown.status_code == 200
        assert shown.json()["rollout"]["state"] in ("scheduled", "running", "completed")
    _abort_active(client)


@FUZZ
@given(rollout_id=ids, body=st.dictionaries(st.sampled_from(["reason", "x"]) | broken_text,
                                            json_values, max_size=3),
       action=st.sampled_from(["pause", "resume", "abort"]),
       version=st.text(max_size=20) | ids.filter(str.isprintable))
@example(rollout_id="1", body={"reason": "x" * 600}, action="pause", version="2")
def test_fuzz_rollout_ids_actions_and_queries(
    client: httpx.Client, rollout_id: str, body: dict[str, Any], action: str, version: str
) -> None:
    created = _checked(_send_json(client, "POST", f"{_base(client)}/rollouts",
                                  {"version": 2, "phases": "50,100", "force": True}))
    real = str(created.json()["rollout"]["id"]) if created.status_code == 201 else "1"
    # Lone surrogates travel as their (invalid UTF-8) bytes, as a raw client could send.
    for target in (quote(rollout_id, safe="", errors="surrogatepass"), real):
        _checked(client.get(f"{_base(client)}/rollouts/{target}"))
        _checked(_send_json(client, "POST", f"{_base(client)}/rollouts/{target}/{action}",
                            body))
    _checked(client.get(f"{_base(client)}/rollouts", params={"version": version}))
    _abort_active(client)


@FUZZ
@given(body=_near(VALID_WINDOW, WINDOW_FIELDS), group=texts | st.sampled_from(["beta", "nope"]))
@example(body={"cron": "0 0 30 2 *", "duration": 5}, group="beta")
@example(body={"cron": "0 2 * * *", "duration": 5, "timezone": "Europe/Berlin\x00"}, group="")
def test_fuzz_windows(client: httpx.Client, body: dict[str, Any], group: str) -> None:
    response = _checked(_send_json(client, "PUT", f"{_base(client)}/window", body))
    event(f"set window: {response.status_code}")
    shown = _checked(client.get(f"{_base(client)}/window"))
    assert shown.status_code == 200
    if response.status_code == 200:
        assert response.json()["window"]["cron"] == " ".join(str(body["cron"]).split())
    encoded = quote(group, safe="", errors="surrogatepass")
    _checked(client.delete(f"{_base(client)}/window?group={encoded}"))


@FUZZ
@given(raw=st.binary(max_size=300),
       media=st.sampled_from(["application/json", "application/x-www-form-urlencoded",
                              "multipart/form-data; boundary=zz", "text/plain", ""]),
       target=st.sampled_from([("POST", "/rollouts"), ("POST", "/rollouts/1/pause"),
                               ("POST", "/rollouts/1/abort"), ("POST", "/rollouts/1/resume"),
                               ("PUT", "/window")]))
def test_fuzz_raw_rollout_bodies(
    client: httpx.Client, raw: bytes, media: str, target: tuple[str, str]
) -> None:
    method, path = target
    headers = {"content-type": media} if media else {}
    response = _checked(client.request(method, f"{_base(client)}{path}", content=raw,
                                       headers=headers))
    assert response.headers["content-type"].startswith("application/json")
    _abort_active(client)
