"""Hypothesis fuzzing of the console: junk query strings and form values give 4xx pages (or
the page itself), never a 500.

The server runs on its own trio loop in a background thread (``threaded_server``); a
console session signed in with the owner's token drives it with plain synchronous httpx.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

DEVICE = "0123456789abcdef01234567"
#: What a console answer may be: a page, a redirect (after an action; 307: a trailing
#: slash), or a refusal.
ALLOWED = {200, 303, 307, 400, 403, 404, 405, 409, 413}
FUZZ = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

texts = st.text(max_size=30)
#: Values that look almost right: numbers, booleans, statuses, group names, long digits.
near_values = st.sampled_from([
    "", "0", "1", "2", "-1", "65535", "65536", "9" * 30, "yes", "no", "true", "on",
    "up_to_date", "failed", "beta", "nope", "#12ab34", "#zzzzzz", "%00", " ", "\x00",
])
values = texts | near_values
LIST_KEYS = ["q", "group", "version", "online", "development", "locked", "status", "page",
             "per_page", "x"]
FORM_KEYS = ["version", "flash", "development", "forced", "group", "name", "description",
             "color", "csrf_token", "x"]


@pytest.fixture(scope="module")
def console(threaded_server) -> Iterator[httpx.Client]:
    """A console session (the owner's token) on a product with a device, firmware 1 and a
    group."""
    from otacore.module import build_module

    api = httpx.Client(base_url=threaded_server.url, timeout=30,
                       headers={"Authorization": f"Bearer {threaded_server.token}"})
    product = api.post("/v1/products", json={"name": "Fuzz", "platform_id": 13})
    assert product.status_code == 201
    image = build_module(b"\x01" * 2000, platform_id=13, function=5, version=6, product_id=13,
                         product_version=1)
    assert api.post("/v1/products/fuzz/firmware", data={"version": "1", "title": "t"},
                    files={"binary": ("f.bin", image)}).status_code == 201
    assert api.post("/v1/products/fuzz/devices", json={"id": DEVICE}).status_code == 200
    assert api.post("/v1/products/fuzz/groups", json={"name": "beta"}).status_code == 201
    api.close()
    with httpx.Client(base_url=threaded_server.url, timeout=30) as client:
        login = client.get("/console/login")
        csrf = re.search(r'name="login_csrf" value="([^"]+)"', login.text)
        assert csrf is not None
        signed = client.post("/console/login", data={"login_csrf": csrf.group(1),
                                                     "token": threaded_server.token})
        assert signed.status_code == 303, signed.text
        home = client.get(f"/console/products/fuzz/devices/{DEVICE}")
        token = re.search(r'name="csrf_token" value="([^"]+)"', home.text)
        assert token is not None
        client.headers["x-csrf"] = token.group(1)
        yield client


def _check(answer: httpx.Response) -> None:
    assert answer.status_code in ALLOWED, (answer.status_code, answer.text[:500])
    if answer.status_code >= 400 and answer.headers.get("content-type", "").startswith(
            "text/html"):
        assert 'role="alert"' in answer.text


@FUZZ
@given(query=st.dictionaries(st.sampled_from(LIST_KEYS) | texts, values, max_size=6))
@example(query={"page": "9" * 30})
@example(query={"version": "-1", "status": "up_to_date", "group": "beta"})
def test_fuzz_device_list_queries(console: httpx.Client, query: dict[str, str]) -> None:
    _check(console.get("/console/products/fuzz/devices", params=query))


@FUZZ
@given(device=texts | st.just(DEVICE), before=values, fragment=values)
def test_fuzz_device_page_paths(console: httpx.Client, device: str, before: str,
                                fragment: str) -> None:
    path = f"/console/products/fuzz/devices/{quote(device, safe='')}"
    _check(console.get(path, params={"before": before, "fragment": fragment}))


@FUZZ
@given(
    action=st.sampled_from(["lock", "unlock", "development", "forced", "groups/add",
                            "groups/remove"]),
    form=st.dictionaries(st.sampled_from(FORM_KEYS) | texts, values | st.lists(
        values, min_size=2, max_size=3), max_size=5),
    with_csrf=st.booleans(),
)
def test_fuzz_device_actions(console: httpx.Client, action: str, form: dict[str, object],
                             with_csrf: bool) -> None:
    if with_csrf:
        form = {**form, "csrf_token": console.headers["x-csrf"]}
    answer = console.post(f"/console/products/fuzz/devices/{DEVICE}/{action}", data=form)
    _check(answer)
    if not with_csrf and "csrf_token" not in form:
        assert answer.status_code == 403


@FUZZ
@given(
    target=st.sampled_from(["", "/beta/edit", "/nope/edit", "/nope/delete"]),
    form=st.dictionaries(st.sampled_from(FORM_KEYS) | texts, values, max_size=5),
)
def test_fuzz_group_forms(console: httpx.Client, target: str, form: dict[str, str]) -> None:
    answer = console.post(f"/console/products/fuzz/groups{target}",
                          data={**form, "csrf_token": console.headers["x-csrf"]})
    _check(answer)


@FUZZ
@given(body=st.binary(max_size=200), content_type=st.sampled_from([
    "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain",
    "application/json", ""]))
def test_fuzz_raw_bodies(console: httpx.Client, body: bytes, content_type: str) -> None:
    headers = {"content-type": content_type} if content_type else {}
    for path in (f"/console/products/fuzz/devices/{DEVICE}/lock", "/console/login",
                 "/console/products/fuzz/groups", "/console/logout"):
        _check(console.post(path, content=body, headers=headers))
