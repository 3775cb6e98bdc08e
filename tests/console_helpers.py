"""Helpers for the console tests: a signed-in browser-like client over the real server, and
a small HTML reader (forms, fields, labels, alerts) built on the standard library's parser.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from html.parser import HTMLParser

import httpx
import trio

from tests.conftest import Api

PASSWORD = "correct horse battery"


@dataclass
class Control:
    """A form control as the page has it."""

    tag: str
    attrs: dict[str, str]

    @property
    def name(self) -> str:
        return self.attrs.get("name", "")

    @property
    def type(self) -> str:
        return self.attrs.get("type", "text" if self.tag == "input" else self.tag)


class Page(HTMLParser):
    """What the tests read from a page: controls, labels, alerts, links, test ids, text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.controls: list[Control] = []
        self.labels_for: dict[str, str] = {}  # control id -> label text
        self.wrapped: set[int] = set()  # indexes of controls inside a <label>
        self.alerts: list[str] = []
        self.links: list[tuple[str, str]] = []  # (href, text)
        self.testids: dict[str, str] = {}
        self.text: list[str] = []
        self._label: list[tuple[str | None, list[str]]] = []
        self._alert_depth: list[int] = []
        self._alert_text: list[str] = []
        self._link: list[tuple[str, list[str]]] = []
        self._testid: list[tuple[str, list[str]]] = []
        self._testid_depths: list[int] = []
        self._depth = 0

    _VOID = frozenset({"input", "br", "meta", "link", "img", "hr", "source", "col", "wbr"})

    def handle_starttag(self, tag: str, attrs_list: list[tuple[str, str | None]]) -> None:
        attrs = {k: (v or "") for k, v in attrs_list}
        if tag not in self._VOID:
            self._depth += 1
        if tag in ("input", "select", "textarea", "button"):
            self.controls.append(Control(tag, attrs))
            if self._label:
                self.wrapped.add(len(self.controls) - 1)
        if tag == "label":
            self._label.append((attrs.get("for"), []))
        if attrs.get("role") == "alert":
            self._alert_depth.append(self._depth)
            self._alert_text.append("")
        if tag == "a" and "href" in attrs:
            self._link.append((attrs["href"], []))
        if "data-testid" in attrs and tag not in self._VOID:
            self._testid.append((attrs["data-testid"], []))
            self._testid_depths.append(self._depth)

    def handle_endtag(self, tag: str) -> None:
        if tag == "label" and self._label:
            target, parts = self._label.pop()
            if target:
                self.labels_for[target] = " ".join("".join(parts).split())
        if tag == "a" and self._link:
            href, parts = self._link.pop()
            self.links.append((href, " ".join("".join(parts).split())))
        if self._alert_depth and self._alert_depth[-1] == self._depth:
            self._alert_depth.pop()
            self.alerts.append(" ".join(self._alert_text.pop().split()))
        if self._testid_depths and self._testid_depths[-1] == self._depth:
            self._testid_depths.pop()
            name, parts = self._testid.pop()
            self.testids[name] = " ".join("".join(parts).split())
        if tag not in self._VOID:
            self._depth -= 1

    def handle_data(self, data: str) -> None:
        self.text.append(data)
        for _, parts in self._label:
            parts.append(data)
        for _, parts in self._link:
            parts.append(data)
        for _, parts in self._testid:
            parts.append(data)
        if self._alert_text:
            self._alert_text[-1] += data

    def value_of(self, name: str) -> str:
        """The value of the first control named ``name``."""
        for control in self.controls:
            if control.name == name:
                return control.attrs.get("value", "")
        raise AssertionError(f"no control named {name!r} on the page")

    def label_of(self, control: Control) -> str | None:
        """The control's label text (a <label for>, a wrapping <label>, or aria-label)."""
        if "aria-label" in control.attrs:
            return control.attrs["aria-label"]
        if control.attrs.get("id") in self.labels_for:
            return self.labels_for[control.attrs["id"]]
        if self.controls.index(control) in self.wrapped:
            return "(wrapped)"
        if control.tag == "button":
            return "(button text)"
        return None

    def unlabelled(self) -> list[Control]:
        """Visible controls without a label (hidden inputs and buttons need none)."""
        return [c for c in self.controls if c.type not in ("hidden", "submit", "button")
                and c.tag != "button" and not self.label_of(c)]

    def control_labelled(self, label: str) -> Control:
        """The control whose <label> reads ``label``."""
        for control in self.controls:
            if control.attrs.get("id") and self.labels_for.get(control.attrs["id"]) == label:
                return control
            if control.attrs.get("aria-label") == label:
                return control
        raise AssertionError(f"no control labelled {label!r}; labels: {self.labels_for}")

    @property
    def all_text(self) -> str:
        return " ".join(" ".join(self.text).split())


def page(response: httpx.Response) -> Page:
    """The parsed HTML of a response."""
    assert response.headers.get("content-type", "").startswith("text/html"), (
        response.status_code, response.headers.get("content-type"), response.text[:200])
    parsed = Page()
    parsed.feed(response.text)
    parsed.close()
    return parsed


def browser(api: Api, **kwargs: object) -> httpx.AsyncClient:
    """A client without the owner's bearer token: it has only the cookies it is given."""
    return httpx.AsyncClient(base_url=api.handle.api_url, timeout=30, **kwargs)  # type: ignore[arg-type]


async def sign_in(client: httpx.AsyncClient, *, username: str = "", password: str = "",
                  token: str = "", next_path: str = "") -> httpx.Response:
    """Open the sign-in page, then send the form (with its CSRF value) as a browser does."""
    login = await client.get("/console/login" + (f"?next={next_path}" if next_path else ""))
    assert login.status_code == 200, login.text
    form = page(login)
    return await client.post("/console/login", data={
        "login_csrf": form.value_of("login_csrf"), "next": form.value_of("next"),
        "username": username, "password": password, "token": token,
    })


@asynccontextmanager
async def signed_in(api: Api, *, username: str = "", token: str = ""
                    ) -> AsyncIterator[httpx.AsyncClient]:
    """A client signed in to the console (a user's password, or a token)."""
    async with browser(api) as client:
        answer = await sign_in(client, username=username,
                               password=PASSWORD if username else "", token=token)
        assert answer.status_code == 303, answer.text
        yield client


async def add_user(api: Api, name: str, role: str = "none") -> None:
    """An operator account with :data:`PASSWORD`."""
    await trio.to_thread.run_sync(
        lambda: api.handle.fleet.create_user_sync(name, PASSWORD, role))


async def join_team(api: Api, product: str, name: str, role: str) -> None:
    """Put ``name`` on ``product``'s team as ``role`` (through the REST API)."""
    answer = await api.client.post(f"/v1/products/{product}/team",
                                   json={"username": name, "role": role})
    assert answer.status_code == 200, answer.text


async def post_form(client: httpx.AsyncClient, url: str, fields: dict[str, object],
                    *, csrf_from: str | None = None) -> httpx.Response:
    """POST a console form with the session's CSRF token read from ``csrf_from`` (a page
    URL; default the form's own page ``url``)."""
    source = await client.get(csrf_from or url)
    assert source.status_code == 200, source.text
    token = page(source).value_of("csrf_token")
    return await client.post(url, data={"csrf_token": token, **fields})  # type: ignore[dict-item]
