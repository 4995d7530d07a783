"""The status page at / in a real browser: Playwright drives the system's Chromium against `python app.py`.

What a person sees on a phone and a desktop: standards mode, no sideways scrolling (also when
contexts.toml has a long mistake to show), the lookup result in view after "Look up", and on a
phone the health and the form before the folded rules. A screenshot of each state is kept in
$TEST_ARTIFACTS (default .artifacts/ in the repository) to look at.

Needs `pip install playwright` and Debian's `chromium` (apt-get install chromium); Playwright's
own browser download is not used (never `playwright install`). Without either the module skips.
"""

import base64
import json
import os
import shutil
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode

import pytest
from conftest import KEY, ROOT, Served, free_port, orders_csv, wait_for, write

sync_api = pytest.importorskip(
    "playwright.sync_api",
    reason="the browser tests need Playwright: pip install playwright (then apt-get install chromium)",
)


def system_chromium():
    """The machine's own Chromium, or None."""
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


CHROMIUM = system_chromium()
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="the browser tests need a system Chromium: apt-get install chromium"
)

# No internet here: without the background-networking flags Chromium keeps trying (and failing) to call home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
VIEWPORTS = [pytest.param((390, 844), id="phone"), pytest.param((1280, 800), id="desktop")]
TIMEOUT_MS = 30_000  # generous: a loaded CI machine may be slow to start Chromium or render

# A [settings] key far too long to fit a phone's width unbroken: the page must wrap the error, not scroll sideways.
LONG_KEY = "this_setting_name_was_pasted_by_mistake_" * 6 + "end"
ORDER_ID, EMAIL = "#7", "customer7@example.com"  # an order in orders_csv(20)
LONG_NUMBER = "SO-" + "9" * 60  # not found; the page shows its letters and digits, cut to 20
LONG_EMAIL = "a.customer.with.a.rather.long.address@" + "subdomain-of-a-long-shop-domain." * 5 + "example"


def artifacts():
    """The folder for screenshots: $TEST_ARTIFACTS, else .artifacts/ in the repository."""
    folder = Path(os.environ.get("TEST_ARTIFACTS") or ROOT / ".artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def screenshot(page, viewport, state, full_page=True):
    """Keep what the page looks like, e.g. status-page-390x844-healthy.png."""
    width, height = viewport
    page.screenshot(path=str(artifacts() / f"status-page-{width}x{height}-{state}.png"), full_page=full_page)


def healthz(base):
    """/healthz with the key: the service's own status."""
    request = urllib.request.Request(base + "/healthz", headers={"x-api-key": KEY})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:  # 503 when degraded still carries the status
        return json.loads(e.read())


class Service:
    """python app.py on a free port with its own data folder, contexts.toml and webhook events on."""

    def __init__(self, folder):
        self.folder, self.port = folder, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.contexts = Path(shutil.copy(ROOT / "contexts.toml", folder / "contexts.toml"))
        write(folder / "data" / "orders.csv", orders_csv(20))
        # A webhook secret, so the page also shows its webhooks table (the widest one).
        self.env = {
            **os.environ,
            "API_KEY": KEY,
            "PORT": str(self.port),
            "ORDERS_FILE": str(folder / "data"),
            "CONTEXTS_FILE": str(self.contexts),
            "STATE_DIR": str(folder / "state"),
            "SETTLE_SECONDS": "0.1",
            "POLL_SECONDS": "0.5",
            "SHOPIFY_WEBHOOK_SECRET": "browser-test-webhook-Hq4Lz8Wm2Xv6Tp9Rk3",
        }

    def __enter__(self):
        self.served = Served([sys.executable, str(ROOT / "app.py")], self.env, self.folder).__enter__()
        self.served.wait_for("INFO serving ")
        return self

    def __exit__(self, *exc):
        self.served.__exit__(*exc)


@pytest.fixture(scope="module")
def browser():
    """One Chromium for the whole module."""
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(
            executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True, timeout=TIMEOUT_MS
        )
        yield chromium
        chromium.close()


def get(url, headers):
    """The body of a GET, whatever its status."""
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as response:
            return response.read().decode()
    except urllib.error.HTTPError as e:
        return e.read().decode()


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """The service with the shipped contexts.toml and a fresh export, after a few lookups by the chat platform.

    The lookups fill the page's "last 24 hours" tables, one not found with a long number and a long email.
    """
    with Service(tmp_path_factory.mktemp("healthy")) as service:
        # Every outcome but an error, so the hour's table has all its columns.
        for order_id, email, key in [
            (ORDER_ID, EMAIL, KEY),
            (LONG_NUMBER, LONG_EMAIL, KEY),
            ("#404", "nobody@example.com", KEY),
            ("", EMAIL, KEY),
            ("#1\x07", EMAIL, KEY),
            (ORDER_ID, EMAIL, "not-the-key-not-the-key"),
        ]:
            get(
                f"{service.base}/lookup?{urlencode({'order_id': order_id, 'customer_email': email})}",
                {"x-api-key": key},
            )
        signed_in = {"Authorization": "Basic " + base64.b64encode(f"staff:{KEY}".encode()).decode()}
        wait_for(
            lambda: 'id="not-found"' in get(service.base + "/", signed_in),
            timeout=30,
            what="the status page to list the lookups not found",
        )
        yield service


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """A service whose contexts.toml was edited, while serving, into a long mistake it refused."""
    with Service(tmp_path_factory.mktemp("broken")) as service:
        text = service.contexts.read_text(encoding="utf-8")
        service.contexts.write_text(text.replace("[settings]\n", f"[settings]\n{LONG_KEY} = 1\n", 1), encoding="utf-8")
        wait_for(
            lambda: LONG_KEY in healthz(service.base).get("config", ""),
            timeout=30,
            what="/healthz to report the contexts.toml mistake",
        )
        yield service


def open_page(browser, viewport, service, signed_in=True):
    """A new page at / of service, signed in as staff would be: "sign in" and the key as the password."""
    width, height = viewport
    context = browser.new_context(
        viewport={"width": width, "height": height}, http_credentials={"username": "staff", "password": KEY}
    )
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    page.goto(service.base + ("/?login" if signed_in else "/"))
    return page


@pytest.fixture
def pages(browser):
    """Opens pages and closes their contexts after the test."""
    opened = []

    def opener(*args, **kwargs):
        opened.append(open_page(browser, *args, **kwargs))
        return opened[-1]

    yield opener
    for page in opened:
        page.context.close()


def overflow(page):
    """(scrollWidth, innerWidth): sideways scrolling when the first is larger."""
    return page.evaluate("[document.documentElement.scrollWidth, window.innerWidth]")


def wider_than_viewport(page):
    """The elements whose right edge is past the viewport, to say what overflows when something does."""
    return page.evaluate("""() => [...document.querySelectorAll('body *')]
        .filter(e => e.getBoundingClientRect().right > window.innerWidth + 0.5)
        .map(e => e.tagName.toLowerCase() + (e.id ? '#' + e.id : '') + ' ' + Math.round(e.getBoundingClientRect().right) + 'px')
        .slice(0, 10)""")


def assert_no_overflow(page):
    scroll_width, inner_width = overflow(page)
    assert scroll_width <= inner_width, (
        f"scrolls sideways ({scroll_width} > {inner_width}): {wider_than_viewport(page)}"
    )


def top(page, selector):
    """An element's y on the page (not the viewport)."""
    return page.evaluate("s => document.querySelector(s).getBoundingClientRect().top + window.scrollY", selector)


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_public_view_then_sign_in(pages, healthy, viewport):
    page = pages(viewport, healthy, signed_in=False)
    assert page.evaluate("document.compatMode") == "CSS1Compat"
    assert page.locator("#freshness").inner_text() == "healthy" and page.locator("#data").count() == 0
    assert_no_overflow(page)
    screenshot(page, viewport, "public")
    page.get_by_role("link", name="sign in").click()
    page.locator("#data").wait_for()
    assert "?login" in page.url and page.locator("h2#try").is_visible()


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_signed_in_page_in_standards_mode_and_no_sideways_scrolling(pages, healthy, viewport):
    page = pages(viewport, healthy)
    assert page.evaluate("document.compatMode") == "CSS1Compat"
    assert page.locator("#freshness").inner_text() == "healthy"
    assert page.locator("#webhooks").is_visible()  # the widest table is on the page
    assert page.locator("#not-found").is_visible()  # and the lookups not found, one with a long email
    assert page.locator("#hours th").count() == 6  # the hour, found, not found and the three other outcomes
    assert_no_overflow(page)
    screenshot(page, viewport, "healthy")
    for fold in ("#rules-fold", "#templates-fold"):  # and unfolded, the rules and answers fit too
        page.locator(fold + " > summary").click()
        assert page.locator(fold).evaluate("d => d.open")
    assert page.locator("#rules").is_visible() and page.locator("#templates").is_visible()
    assert_no_overflow(page)
    screenshot(page, viewport, "unfolded")


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_a_long_contexts_mistake_is_shown_without_sideways_scrolling(pages, broken, viewport):
    page = pages(viewport, broken)
    assert page.evaluate("document.compatMode") == "CSS1Compat"
    assert page.locator("#freshness").inner_text() == "degraded"
    assert "the last contexts.toml edit was refused" in page.locator("#reasons").inner_text()
    error = page.locator("#data td", has_text=LONG_KEY)
    assert error.is_visible() and "is not a known setting" in error.inner_text()
    box = error.bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= viewport[0], f"the error is cut off: {box}"
    assert_no_overflow(page)
    screenshot(page, viewport, "broken")


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_look_up_lands_on_the_result(pages, healthy, viewport):
    page = pages(viewport, healthy)
    page.fill("input[name=order_id]", ORDER_ID)
    page.fill("input[name=customer_email]", EMAIL)
    with page.expect_navigation():
        page.get_by_role("button", name="Look up").click()
    page.locator("#tried").wait_for()
    assert page.url.endswith("/#tried")
    assert page.locator("#tried-status").inner_text() == "200 OK"
    assert "was found" in page.locator("#tried-body").inner_text()
    # In view after the navigation, as the person sees it: the box against the visible area.
    rect = page.locator("#tried").evaluate(
        "e => { const r = e.getBoundingClientRect(); return {top: r.top, bottom: r.bottom, height: window.innerHeight} }"
    )
    assert rect["top"] < rect["height"] and rect["bottom"] > 0, f"#tried is out of view after Look up: {rect}"
    assert_no_overflow(page)
    screenshot(page, viewport, "tried", full_page=False)  # what is on screen right after "Look up"


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_health_and_the_form_come_before_the_folded_rules(pages, healthy, viewport):
    page = pages(viewport, healthy)
    folded = min(top(page, "#rules-fold"), top(page, "#templates-fold"))
    for first in ("#freshness", "#reasons", "h2#try"):
        assert top(page, first) < folded, f"{first} is below the folded rules"
    assert page.locator("h2#try").inner_text() == "Try a lookup"
    for fold in ("#rules-fold", "#templates-fold"):
        assert page.locator(fold).evaluate("d => d.open") is False, f"{fold} is open by default"
        assert not page.locator(fold + " table").is_visible()


@pytest.fixture(scope="module")
def stale(tmp_path_factory):
    """A service whose export is three days old: the nightly export stopped arriving."""
    import time

    folder = tmp_path_factory.mktemp("stale")
    service = Service(folder)
    old = time.time() - 3 * 86400
    os.utime(folder / "data" / "orders.csv", (old, old))
    with service:
        yield service


@pytest.mark.parametrize("viewport", VIEWPORTS)
def test_the_reason_and_what_to_do_are_read_first_and_times_in_plain_words(pages, stale, viewport):
    page = pages(viewport, stale)
    assert page.locator("#freshness").inner_text() == "stale"
    reason = page.locator("#reasons li").first
    assert reason.inner_text().startswith(
        "the data is older than 26 hours: the nightly export did not arrive. Check the job that writes or uploads it"
    )
    box = reason.bounding_box()
    assert box["y"] + box["height"] <= viewport[1], f"the reason is below the fold: {box}"
    exported = page.locator("#exported")
    assert exported.inner_text().endswith("(3 days ago)") and "T" not in exported.inner_text().split(",")[0]
    line = exported.evaluate("e => parseFloat(getComputedStyle(e).lineHeight)")
    assert exported.bounding_box()["height"] <= 2.5 * line, "the file's time wraps over more than two lines"
    assert page.locator("#records").inner_text().endswith("(the file's time less export_lag_hours = 1)")
    assert_no_overflow(page)
    screenshot(page, viewport, "stale", full_page=False)
