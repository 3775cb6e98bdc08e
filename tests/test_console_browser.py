"""The operators' console in a real browser (issue 17, done-when): Debian's ``chromium``,
headless, driven by Playwright (tests/browser.py), against a real ``ota server`` process
with emulated devices (``ota device emulate``, TLS and DTLS) in a process of their own.

The operator signs in from the keyboard; uploads firmware v2 and sees a wrong-version upload
refused with the module check's reason; locks one device to v2 with "flash now" and watches
its page show v2 once the emulated device took it (live, no reload); releases v2 to the
product as an immediate update and watches the release view reach "All updated" (live),
and the events page in another tab show the devices' events as they come. Every console
page visited is checked for labelled controls and walked with Tab.

The browser waits for conditions (Playwright's ``expect`` with a generous timeout); nothing
sleeps and then asserts. Nothing is random (the images are hashes of their version).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from tests.browser import (
    OPERATOR,
    OPERATOR_PASSWORD,
    PATIENCE_MS,
    ConsoleFleet,
    console_fleet,
)

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

DEVICES = 4  # alternating TLS 1.3 and DTLS 1.2

#: Every <input>/<select>/<textarea> the user can reach, without an accessible name: no
#: <label> (wrapping or for=), aria-label, aria-labelledby naming text, or title.
UNLABELLED_CONTROLS_JS = """() => {
  const named = (el) => {
    if ((el.getAttribute('aria-label') || '').trim()) return true;
    const ids = (el.getAttribute('aria-labelledby') || '').split(/\\s+/).filter(Boolean);
    if (ids.some((id) => (document.getElementById(id)?.textContent || '').trim())) return true;
    if (el.labels && [...el.labels].some((l) => l.textContent.trim())) return true;
    return !!(el.getAttribute('title') || '').trim();
  };
  const skip = new Set(['hidden', 'submit', 'button', 'reset', 'image']);
  return [...document.querySelectorAll('input, select, textarea')]
    .filter((el) => !(el.tagName === 'INPUT' && skip.has(el.type)))
    .filter((el) => !named(el))
    .map((el) => el.outerHTML.slice(0, 160));
}"""

#: Buttons without a name (no text, aria-label or title): a screen reader says only "button".
UNNAMED_BUTTONS_JS = """() => [...document.querySelectorAll(
    'button, input[type=submit], input[type=button], [role=button]')]
  .filter((el) => !((el.innerText || el.value || el.getAttribute('aria-label')
                     || el.getAttribute('title') || '').trim()))
  .map((el) => el.outerHTML.slice(0, 160))"""

#: The axe-core rule sets the console is held to (WCAG 2.0 and 2.1, levels A and AA).
AXE_TAGS = ["wcag2a", "wcag2aa", "wcag21a", "wcag21aa"]

#: Tables without header cells, and pictures (img, svg) without a text alternative.
UNDESCRIBED_JS = """() => {
  const out = [];
  for (const table of document.querySelectorAll('table')) {
    if (!table.querySelector('th')) out.push(table.outerHTML.slice(0, 120));
  }
  for (const img of document.querySelectorAll('img')) {
    if (!img.hasAttribute('alt')) out.push(img.outerHTML.slice(0, 120));
  }
  for (const svg of document.querySelectorAll('svg')) {
    if (svg.closest('[aria-hidden="true"]') || svg.parentElement.closest('svg')) continue;
    const named = (svg.getAttribute('aria-label') || '').trim()
      || svg.getAttribute('aria-labelledby')
      || (svg.querySelector(':scope > title')?.textContent || '').trim();
    if (!named) out.push(svg.outerHTML.slice(0, 120));
  }
  return out;
}"""

#: What has the keyboard focus now: tag, text/name, whether it is a control a keyboard
#: user may act on, and whether it shows a focus ring (an outline or a box shadow).
FOCUSED_JS = """() => {
  const el = document.activeElement;
  if (!el || el === document.body) return null;
  const tag = el.tagName.toLowerCase();
  const interactive = ['a', 'button', 'input', 'select', 'textarea', 'summary'].includes(tag)
    || el.hasAttribute('tabindex') || el.isContentEditable;
  const text = (el.getAttribute('aria-label') || el.innerText || el.value || el.name || '')
    .trim().slice(0, 60);
  const style = getComputedStyle(el);
  const ring = (style.outlineStyle !== 'none' && parseFloat(style.outlineWidth) > 0)
    || style.boxShadow !== 'none';
  const path = [];
  for (let node = el; node && node !== document.body; node = node.parentElement) {
    path.unshift(node.tagName + ':' + [...node.parentElement.children].indexOf(node));
  }
  return {tag, text, interactive, ring, href: el.getAttribute('href'), path: path.join('/')};
}"""


def check_accessible(page: Page, visited: list[str]) -> None:
    """The page's controls have accessible names, its tables headers, its pictures text
    alternatives, and the keyboard walks it: Tab from the top moves the focus through
    distinct interactive elements, each showing a focus ring, the first being a link (the
    skip link, or the first nav link)."""
    where = page.url
    visited.append(where)
    assert page.evaluate(UNLABELLED_CONTROLS_JS) == [], f"unlabelled controls on {where}"
    assert page.evaluate(UNNAMED_BUTTONS_JS) == [], f"buttons without a name on {where}"
    assert page.evaluate(UNDESCRIBED_JS) == [], (
        f"tables without headers or pictures without a text alternative on {where}")
    focusable = page.locator(
        "a[href], button:not([disabled]), input:not([type=hidden]):not([disabled]), "
        "select:not([disabled]), textarea:not([disabled])"
    ).count()
    assert focusable, f"nothing to focus on {where}"
    page.evaluate("() => { document.activeElement?.blur(); window.scrollTo(0, 0); }")
    page.keyboard.press("Tab")
    first = page.evaluate(FOCUSED_JS)
    assert first is not None and first["interactive"], f"Tab focused nothing on {where}"
    # A page under the nav begins with a link (skip link or nav); the login page may begin
    # with its first field.
    if "/login" not in where:
        assert first["tag"] == "a", f"the first Tab stop on {where} is {first}, not a link"
    seen = [first]
    for _ in range(min(focusable, 6) - 1):
        page.keyboard.press("Tab")
        now = page.evaluate(FOCUSED_JS)
        assert now is not None and now["interactive"], f"Tab left the controls on {where}"
        seen.append(now)
    paths = [stop["path"] for stop in seen]
    assert len(set(paths)) == len(paths), f"Tab did not move on {where}: {paths}"
    unringed = [stop for stop in seen if not stop["ring"]]
    assert unringed == [], f"focus not visible on {where}: {unringed}"
    # axe-core (Deque's accessibility engine, shipped by axe-playwright-python): every rule
    # of WCAG 2.1 A and AA it can check on the rendered page.
    from axe_playwright_python.sync_playwright import Axe

    found = Axe().run(page, options={"runOnly": {"type": "tag", "values": AXE_TAGS},
                                     "resultTypes": ["violations"]})
    assert found.violations_count == 0, f"axe-core on {where}:\n{found.generate_report()}"


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[ConsoleFleet]:
    """The server with an emulated fleet on v1 (both transports), every device online."""
    with console_fleet(tmp_path, devices=DEVICES) as running:
        running.start_emulator(version=1)
        running.wait_devices(lambda devices: len(devices) == DEVICES and all(
            d["online"] and d["firmware_version"] == 1 for d in devices))
        yield running


def sign_in_by_keyboard(page: Page) -> None:
    """On the login page, from the keyboard alone: type the username, Tab to the password,
    type it, Enter."""
    from playwright.sync_api import expect

    page.get_by_label("Username").focus()
    page.keyboard.type(OPERATOR)
    page.keyboard.press("Tab")
    expect(page.get_by_label("Password")).to_be_focused()
    page.keyboard.type(OPERATOR_PASSWORD)
    page.keyboard.press("Enter")
    expect(page.get_by_role("button", name="Sign out")).to_be_visible(timeout=PATIENCE_MS)


def choose_release_to_product(page: Page) -> None:
    """"Release to" → "Product", whether the form offers a select or a radio group."""
    from playwright.sync_api import expect

    chooser = page.get_by_label("Release to")
    if chooser.count() == 1 and chooser.evaluate("el => el.tagName") == "SELECT":
        chooser.select_option(label="Product")
    else:
        radio = page.get_by_role("radio", name="Product", exact=True)
        radio.check()
        expect(radio).to_be_checked()


def test_operator_signs_in_uploads_locks_and_releases(page: Page, fleet: ConsoleFleet) -> None:
    from playwright.sync_api import expect

    product = fleet.product_id
    visited: list[str] = []
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))

    # 1. An unauthenticated page goes to the login page; sign in from the keyboard.
    page.goto(fleet.console(f"/products/{product}/devices"))
    expect(page).to_have_url(re.compile(r"/console/login\?next="))
    check_accessible(page, visited)
    for label in ("Username", "Password", "Access token"):
        expect(page.get_by_label(label)).to_be_visible()
    sign_in_by_keyboard(page)
    # Back where the operator was going (?next=), the product's device list.
    expect(page).to_have_url(re.compile(rf"/console/products/{product}/devices"))
    rows = page.locator("table tbody tr")
    expect(rows).to_have_count(DEVICES)
    for device_id in fleet.device_ids:
        expect(page.get_by_role("link", name=device_id)).to_be_visible()
    for label in ("Group", "Version", "Online", "Development", "Locked", "Update status"):
        expect(page.get_by_label(label, exact=True)).to_be_visible()
    check_accessible(page, visited)

    # 2. Upload v2; then a binary embedding v3 uploaded as version 4 is refused, with the
    # module check's reason on the same page and the form's values kept.
    page.goto(fleet.console(f"/products/{product}/firmware"))
    check_accessible(page, visited)
    upload_firmware(page, fleet.image(2), version="2", title="Canary build")
    expect(page.get_by_role("alert")).to_have_count(0)
    expect(page.locator("body")).to_contain_text("Canary build")
    page.goto(fleet.console(f"/products/{product}/firmware"))  # the list links to v2
    expect(page.locator('a[href$="/firmware/2"]').first).to_be_visible()
    upload_firmware(page, fleet.image(3), version="4", title="Mislabelled")
    alert = page.get_by_role("alert")
    expect(alert).to_contain_text("embedded product version is 3")
    expect(alert).to_contain_text("version 4")
    expect(page.get_by_label("Version", exact=True)).to_have_value("4")
    expect(page.get_by_label("Title", exact=True)).to_have_value("Mislabelled")
    expect(page.locator('a[href$="/firmware/4"]')).to_have_count(0)
    check_accessible(page, visited)

    # 3. The canary: lock one device to v2 with "flash now" while the devices are away;
    # they come back, and the device page shows v2 once the canary took it and reported it,
    # with no reload (the live stream).
    fleet.stop_emulator()
    canary = fleet.device_ids[0]
    page.goto(fleet.console(f"/products/{product}/devices"))
    page.get_by_role("link", name=canary).click()
    expect(page).to_have_url(re.compile(rf"/devices/{canary}"))
    reported = page.get_by_test_id("device-firmware-version")
    expect(reported).to_have_text(version_text(1))
    expect(page.get_by_test_id("device-online")).to_be_visible()
    check_accessible(page, visited)
    page.get_by_label("Lock to version").select_option("2")
    page.get_by_label("Flash now").check()
    submit(page, page.get_by_role("button", name="Lock", exact=True))
    expect(reported).to_have_text(version_text(1))  # the device is offline: not yet
    navigations = count_navigations(page)
    fleet.start_emulator(version=1)  # their flash persists: the version they ran
    expect(reported).to_have_text(version_text(2), timeout=PATIENCE_MS)
    assert navigations() == 0, "the device page reloaded instead of updating live"
    devices = fleet.wait_devices(lambda listed: all(d["online"] for d in listed))
    assert {d["id"]: d["firmware_version"] for d in devices} == {
        device_id: 2 if device_id == canary else 1 for device_id in fleet.device_ids}
    submit(page, page.get_by_role("button", name="Unlock", exact=True))  # follows releases
    fleet.wait_devices(lambda listed: not any(d["desired_firmware_version"] for d in listed))

    # 4. Release v2 to the whole product as an immediate update while the devices are
    # away (the canary already runs it); they come back, and the release view's counts
    # reach "All updated" with no reload.
    fleet.stop_emulator()
    page.goto(fleet.console(f"/products/{product}/firmware/2"))
    check_accessible(page, visited)
    choose_release_to_product(page)
    expect(page.get_by_label("Groups", exact=True)).to_be_attached()
    page.get_by_label("Immediate update").check()
    submit(page, page.get_by_role("button", name="Release", exact=True))
    expect(page.get_by_test_id("release-target-count")).to_have_text(str(DEVICES))
    expect(page.get_by_test_id("release-updated-count")).to_have_text("1")
    expect(page.get_by_test_id("release-state")).not_to_have_text("All updated")
    navigations = count_navigations(page)
    # The live events page in a second tab, its stream open before the devices return.
    events = page.context.new_page()
    events.goto(fleet.console(f"/products/{product}/events"))
    expect(events.get_by_role("status")).not_to_have_text(re.compile("Connecting"))
    fleet.start_emulator(version=1)
    expect(page.get_by_test_id("release-state")).to_have_text("All updated",
                                                              timeout=PATIENCE_MS)
    expect(page.get_by_test_id("release-updated-count")).to_have_text(str(DEVICES))
    expect(page.get_by_test_id("release-failed-count")).to_have_text("0")
    assert navigations() == 0, "the release view reloaded instead of updating live"
    assert all(d["firmware_version"] == 2 for d in fleet.devices())
    check_accessible(page, visited)
    # Each device that took v2 was seen in the events as it happened, without a reload.
    arrived = events.locator("#events-rows")  # the live list (stored events: a table below)
    expect(arrived).to_contain_text("spark/flash/status")
    for device_id in fleet.device_ids[1:]:
        expect(arrived).to_contain_text(device_id)
    events.close()

    # The other pages the console's nav leads to, as a keyboard user finds them.
    for path in ("/", f"/products/{product}/groups", f"/products/{product}/rollouts",
                 f"/products/{product}/events", f"/products/{product}/audit"):
        response = page.goto(fleet.console(path))
        assert response is not None and response.status == 200, (path, response)
        check_accessible(page, visited)
    expect(page.locator("body")).to_contain_text("firmware")  # the audit log's entries
    assert errors == [], f"JavaScript errors: {errors}"
    print("pages checked for labels and Tab:", *visited, sep="\n  ")


def submit(page: Page, button: Locator) -> None:
    """Press a form's submit button and wait until the answer is in place: a plain form's
    POST, redirect and new page loaded; an htmx form's POST answered (swapped in place)."""
    from playwright.sync_api import expect

    plain = button.evaluate(
        "b => !b.closest('[hx-post],[data-hx-post],[hx-put],[hx-boost]')")
    if plain:
        with page.expect_navigation():
            button.click()
        page.wait_for_load_state()
    else:
        with page.expect_response(lambda answer: answer.request.method != "GET"):
            button.click()
    expect(page.locator("body")).to_be_visible()


def upload_firmware(page: Page, image: Path, *, version: str, title: str) -> None:
    """Fill the upload form on the firmware list page and press "Upload"; waits for the
    page the server answers with."""
    page.get_by_label("Firmware file").set_input_files(str(image))
    page.get_by_label("Version", exact=True).fill(version)
    page.get_by_label("Title", exact=True).fill(title)
    page.get_by_label("Description").fill(f"{title}: uploaded from the browser test")
    with page.expect_navigation():
        page.get_by_role("button", name="Upload").click()


def version_text(version: int) -> re.Pattern[str]:
    """The shown version: ``2``, ``v2`` or ``v2 (title)``; not 12 or 20."""
    return re.compile(rf"^\s*v?{version}(\D.*)?$", re.DOTALL)


def count_navigations(page: Page) -> Any:
    """A function returning how many times the page's main frame loaded a new document
    since this call."""
    loads: list[str] = []
    page.on("framenavigated", lambda frame: loads.append(frame.url)
            if frame == page.main_frame else None)
    return lambda: len(loads)


def test_console_login_refuses_a_bad_password_and_accepts_a_token(
    page: Page, tmp_path: Path
) -> None:
    """A wrong password is refused on the login page with a message (role="alert" or the
    page's text), nothing signed in; an API token in "Access token" signs in."""
    from playwright.sync_api import expect

    with console_fleet(tmp_path, devices=1) as fleet:
        page.goto(fleet.console("/login"))
        page.get_by_label("Username").fill(OPERATOR)
        page.get_by_label("Password").fill("not the password")
        page.get_by_role("button", name="Sign in").click()
        expect(page).to_have_url(re.compile(r"/console/login"))
        expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
        expect(page.locator("body")).to_contain_text(re.compile(r"invalid|wrong|incorrect",
                                                                re.IGNORECASE))
        check_accessible(page, [])
        expect(page.get_by_label("Username")).to_have_value(OPERATOR)  # kept for a retry
        page.get_by_label("Username").fill("")
        page.get_by_label("Access token").fill(fleet.token)
        page.get_by_role("button", name="Sign in").click()
        expect(page.get_by_role("button", name="Sign out")).to_be_visible(timeout=PATIENCE_MS)
        page.get_by_role("button", name="Sign out").click()
        expect(page).to_have_url(re.compile(r"/console/login"))
        page.goto(fleet.console("/"))  # signed out: pages lead to the login page again
        expect(page).to_have_url(re.compile(r"/console/login\?next="))
        expect(page.get_by_role("button", name="Sign out")).to_have_count(0)


def test_playwright_drives_the_system_chromium_against_a_server_process(
    page: Page, tmp_path: Path
) -> None:
    """The harness itself: the system Chromium, headless under Playwright, loads a page of
    a real ``ota server`` process (its OpenAPI description) and runs its JavaScript."""
    from playwright.sync_api import expect

    with console_fleet(tmp_path, devices=1) as fleet:
        response = page.goto(f"{fleet.api_url}/openapi.json")
        assert response is not None and response.status == 200
        description = page.evaluate("() => JSON.parse(document.body.innerText)")
        assert description["openapi"].startswith("3.")
        assert "/v1/products/{productIdOrSlug}/devices" in description["paths"] or any(
            path.endswith("/devices") for path in description["paths"])
        page.set_content("<label for=v>Version</label><input id=v>")
        page.get_by_label("Version").fill("7")
        expect(page.get_by_label("Version")).to_have_value("7")
        assert "Chrom" in page.evaluate("() => navigator.userAgent")


GOOD_PAGE = """<!doctype html><html lang="en"><head><title>A page</title></head><body>
<a href="#main">Skip to content</a><nav><a href="/console/">Products</a></nav>
<main id="main"><form><label for="v">Version</label><input id="v" name="version">
<label>Group <select name="group"><option>north</option></select></label>
<button type="submit">Filter</button></form>
<table><thead><tr><th scope="col">Device</th></tr></thead><tbody><tr><td>a</td></tr></tbody>
</table><svg role="img" aria-label="Update latency"><path d="M0 0"/></svg>
</main></body></html>"""


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (None, None),
        (('<label for="v">Version</label>', ""), "unlabelled controls"),
        (("<button type=\"submit\">Filter</button>", "<button></button>"),
         "buttons without a name"),
        (("<body>", "<body><style>:focus { outline: none }</style>"), "focus not visible"),
        (('<th scope="col">Device</th>', "<td>Device</td>"), "tables without headers"),
        ((' aria-label="Update latency"', ""), "without a text alternative"),
        (('<a href="#main">Skip to content</a>', ""), None),  # the nav's link comes first
        (('<a href="#main">Skip to content</a><nav><a href="/console/">Products</a></nav>',
          ""), "not a link"),
        # What only axe-core looks at here: a page without a title (WCAG 2.4.2).
        (("<head><title>A page</title></head>", ""), "axe-core"),
    ],
)
def test_the_accessibility_check_finds_what_it_looks_for(
    page: Page, change: tuple[str, str] | None, reason: str | None
) -> None:
    """check_accessible on pages made to miss one thing each: it fails, naming it."""
    html = GOOD_PAGE if change is None else GOOD_PAGE.replace(*change)
    assert html != GOOD_PAGE or change is None
    page.set_content(html)
    if reason is None:
        check_accessible(page, [])
    else:
        with pytest.raises(AssertionError, match=reason):
            check_accessible(page, [])
