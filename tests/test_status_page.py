"""The status page at /: parsed from real HTTP responses of a real server."""

import base64
import json
import os
import time
import urllib.error
import urllib.request
from html.parser import HTMLParser
from urllib.parse import urlencode

import pytest
from conftest import KEY, Client, make_settings, orders_csv, wait_for, write

import app


class Page(HTMLParser):
    """The parts of the page the tests read: the badge, tables by id, elements by id."""

    def __init__(self, html):
        super().__init__()
        self.by_id, self.tables, self.classes = {}, {}, {}
        self.stack, self.table, self.row = [], None, None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.stack.append((tag, attrs.get("id"), []))
        if attrs.get("id"):
            self.classes[attrs["id"]] = attrs.get("class", "")
        if tag == "table":
            self.table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr" and self.table is not None:
            self.row = []
            self.table.append(self.row)

    def handle_endtag(self, tag):
        while self.stack:
            name, element_id, text = self.stack.pop()
            content = "".join(text).strip()
            if element_id:
                self.by_id[element_id] = content
            if name in ("td", "th") and self.row is not None:
                self.row.append(content)
            if self.stack:
                self.stack[-1][2].append("".join(text))
            if name == tag:
                break
        if tag == "table":
            self.table = None

    def handle_data(self, data):
        if self.stack:
            self.stack[-1][2].append(data)


def fetch(url, password=None, form=None, origin=True):
    """(status, headers, html) of GET, or POST when form is given, from the page itself as a browser sends it."""
    headers = {}
    if form is not None and origin:
        headers["Origin"] = url.split("/", 3)[0] + "//" + url.split("/", 3)[2] if origin is True else origin
    if password is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(f"staff:{password}".encode()).decode()
    data = urlencode(form).encode() if form is not None else None
    request = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def test_without_the_key_only_health_and_how_to_sign_in(live_server):
    status, headers, html = fetch(live_server + "/")
    page = Page(html)
    assert status == 200 and headers.get_content_type() == "text/html"
    assert page.by_id["freshness"] == "healthy" and "green" in page.classes["freshness"]
    assert "sign in" in html and "orders.csv" not in html and "Orders / rows" not in html


def test_sign_in_asks_for_basic_auth(live_server):
    status, headers, _ = fetch(live_server + "/?login")
    assert status == 401 and headers["WWW-Authenticate"].startswith("Basic ")
    assert fetch(live_server + "/", password="wrong-key-0123456789abcdef")[0] == 401


def test_with_the_key_the_page_shows_data_rules_and_every_answer(live_server, service):
    status, headers, html = fetch(live_server + "/", password=KEY)
    page = Page(html)
    assert status == 200
    assert "default-src 'none'" in headers["Content-Security-Policy"] and headers["X-Frame-Options"] == "DENY"
    assert page.by_id["freshness"] == "healthy" and "green" in page.classes["freshness"]
    data = dict(page.tables["data"])
    assert data["File served"] == "orders.csv" and data["Orders / rows"] == "6 / 8"
    assert data["Last refused"] == "none since the last export was served" and data["contexts.toml"] == "ok"
    rules = page.tables["rules"][1:]
    assert len(rules) == len(service.snapshot.config.rules) + 1
    assert rules[0] == ["1", "cancelled_at is filled", "cancelled"]
    assert rules[-1] == ["", "no rule matches: the default answer", "found"]
    answers = dict(page.tables["templates"])
    assert set(answers) == set(service.snapshot.config.templates)
    assert answers["shipped_tracked"].startswith("Order #1001 was found and has shipped on 28 Nov 2026 with UPS")
    assert answers["not_found"].startswith("No order was found with the number #1001")
    # No customer data unless looked up.
    assert "example.com" not in html.replace("probe@example.invalid", "")


def test_try_a_lookup_shows_exactly_what_the_platform_gets(live_server, client):
    status, _, html = fetch(
        live_server + "/", password=KEY, form={"order_id": "#1002", "customer_email": "sam@example.com"}
    )
    page = Page(html)
    assert status == 200 and page.by_id["tried-status"] == "200 OK"
    assert json.loads(page.by_id["tried-body"]) == client.lookup("#1002", "sam@example.com").json
    page = Page(fetch(live_server + "/", password=KEY, form={"order_id": "1002", "customer_email": "x@y.z"})[2])
    assert page.by_id["tried-status"] == "404 Not Found"


def test_the_page_escapes_what_it_shows(tmp_path, contexts_file):
    contexts_file.write_text(
        contexts_file.read_text().replace(
            'processing = "Order {order_id} was found.',
            'processing = "<script>alert(1)</script> Order {order_id} was found.',
        )
    )
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    service = app.Service(make_settings(export.parent, contexts_file))
    service.start()
    r = Client(app.create_app(service)).get(
        "/", headers={"Authorization": "Basic " + base64.b64encode(f"x:{KEY}".encode()).decode()}, key=None
    )
    assert b"<script>" not in r.body and b"&lt;script&gt;" in r.body


@pytest.mark.parametrize(
    "age_hours, refused, color", [(1, False, "green"), (22, False, "amber"), (30, False, "red"), (1, True, "amber")]
)
def test_freshness_is_green_amber_or_red(tmp_path, contexts_file, age_hours, refused, color):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    old = time.time() - age_hours * 3600
    os.utime(export, (old, old))
    service = app.Service(make_settings(export.parent, contexts_file))
    service.start()
    if refused:
        write(export, "not,an,export\n")
        service.reload()
    auth = {"Authorization": "Basic " + base64.b64encode(f"x:{KEY}".encode()).decode()}
    page = Page(Client(app.create_app(service)).get("/", headers=auth, key=None).body.decode())
    assert page.classes["freshness"] == f"badge {color}"
    assert page.by_id["freshness"] == {"green": "healthy", "amber": "degraded", "red": "stale"}[color]


@pytest.mark.parametrize("origin", ["https://evil.example", "null", False])
def test_a_lookup_posted_from_another_page_is_refused(live_server, origin):
    status, _, html = fetch(
        live_server + "/", password=KEY, origin=origin, form={"order_id": "#1002", "customer_email": "sam@example.com"}
    )
    assert status == 403 and "sam@example.com" not in html and "tried-body" not in html


def test_a_lookup_from_the_page_is_logged_as_lookups_are(live_server, logs):
    fetch(live_server + "/", password=KEY, form={"order_id": "#1002", "customer_email": "sam@example.com"})
    wait_for(lambda: any("POST / 200" in r.getMessage() for r in logs.records), what="the request line")
    line = next(r.getMessage() for r in logs.records if "POST / 200" in r.getMessage())
    assert "order=1002 email=s***@example.com" in line and "sam@example.com" not in line
