"""The HTTP contract the chat platform relies on, case by case (DESIGN.md's table)."""

import json
import urllib.error
import urllib.request

import pytest
from conftest import KEY, OTHER_KEY, ROOT, SHOPIFY_CSV, Client, make_settings, started, write

import app


@pytest.mark.parametrize(
    "headers, query",
    [
        ({}, ""),
        ({"x-api-key": ""}, ""),
        ({"x-api-key": "wrong-key-0123456789abcdef"}, ""),
        ({"x-api-key": KEY[:-1]}, ""),
        ({"x-api-key": KEY + "x"}, ""),
        ({"x-api-key": f"{KEY},{OTHER_KEY}"}, ""),
        ({"authorization": f"Bearer {KEY}"}, ""),
        ({}, f"api_key={KEY}&x-api-key={KEY}"),  # a key in the query string is not accepted
    ],
)
def test_missing_or_wrong_key_is_401_with_empty_json_body(client, headers, query):
    q = "order_id=1001&customer_email=jane@example.com&" + query
    r = client.request("GET", "/lookup", q, headers)
    assert r.status == 401
    assert r.body == b""
    assert r.headers["Content-Type"] == "application/json"


@pytest.mark.parametrize("key", [KEY, OTHER_KEY])
def test_every_rotated_key_is_accepted(client, key):
    r = client.lookup("#1001", "jane@example.com", key=key)
    assert r.status == 200


@pytest.mark.parametrize(
    "query, asks_for",
    [
        ("", "the order number and the email address"),
        ("order_id=1001", "the email address"),
        ("customer_email=jane@example.com", "the order number"),
        ("order_id=%20%20&customer_email=jane@example.com", "the order number"),
        ("order_id=1001&customer_email=%20", "the email address"),
        ("order_id=%23%23%23&customer_email=jane@example.com", "the order number"),
    ],
)
def test_missing_or_blank_parameter_is_400_saying_what_to_ask(client, query, asks_for):
    r = client.get("/lookup", query)
    assert r.status == 400
    assert asks_for in r.context
    assert "could not be looked up" in r.context


def test_found_order_is_200_with_context_and_tracking_url(client):
    r = client.lookup("#1002", "sam@example.com")
    assert r.status == 200
    assert r.json == {
        "context": "Order #1002 was found and has shipped with UPS (tracking number 1Z999AA10123456784). "
        "It can be followed with the tracking link. It contains 1 x Down Jacket.",
        "tracking_url": "https://www.ups.com/track?tracknum=1Z999AA10123456784",
    }


def test_found_order_without_tracking_has_null_tracking_url(client):
    r = client.lookup("1001", "jane@example.com")
    assert r.status == 200
    assert r.json["tracking_url"] is None
    assert "Order #1001 was found" in r.context


def test_a_404_does_not_reveal_whether_the_order_number_exists(client, tmp_path, contexts_file):
    # The same request against an export with #1001 (wrong email) and one without #1001 at all.
    without = write(
        tmp_path / "other" / "orders.csv",
        "\n".join(line for line in SHOPIFY_CSV.splitlines() if not line.startswith("#1001")) + "\n",
    )
    other = app.Service(make_settings(without.parent, contexts_file))
    other.start()
    other_client = Client(app.create_app(other))
    for email in ("sam@example.com", "jane@example.org"):
        known = client.lookup("#1001", email)
        unknown = other_client.lookup("#1001", email)
        assert known.status == unknown.status == 404
        assert known.body == unknown.body
        assert known.headers == unknown.headers
    assert "No order was found" in known.context


def test_order_without_email_can_never_be_found(client):
    assert client.lookup("#1006", "").status == 400
    assert client.lookup("#1006", "anyone@example.com").status == 404


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
def test_other_methods_are_405_json(client, method):
    r = client.request(method, "/lookup", "order_id=1001&customer_email=jane@example.com", {"x-api-key": KEY})
    assert r.status == 405
    assert r.headers["Content-Type"] == "application/json"
    assert r.context == "This address only answers GET requests."


@pytest.mark.parametrize(
    "path, says, allow",
    [
        ("/export", "This address only answers PUT or POST requests.", "PUT,POST"),
        ("/webhooks/shopify", "This address only answers POST requests.", "POST"),
    ],
)
def test_the_upload_and_webhook_addresses_name_their_own_methods(export, contexts_file, path, says, allow):
    settings = make_settings(
        export.parent,
        contexts_file,
        UPLOAD_KEY="upl-contract-test-key-5Hq8Zr2Lw",
        SHOPIFY_WEBHOOK_SECRET="shpss-contract-test-4Tn7Vb",
    )
    r = Client(app.create_app(started(settings))).request("GET", path)
    assert (r.status, json.loads(r.body)["context"], r.headers["Allow"]) == (405, says, allow)


def test_unknown_path_is_json_404(client):
    r = client.get("/admin")
    assert r.status == 404
    assert r.headers["Content-Type"] == "application/json"
    assert "/lookup" in r.context


def test_head_answers_like_get_without_a_body(client):
    r = client.request("HEAD", "/lookup", "order_id=1001&customer_email=jane@example.com", {"x-api-key": KEY})
    assert r.status == 200
    assert r.body == b""


@pytest.mark.parametrize(
    "query",
    [
        "order_id=1001&customer_email=jane@example.com",  # found
        "order_id=9999&customer_email=jane@example.com",  # not found
        "order_id=1001",  # missing
        "order_id=1001&customer_email=jane",  # not an address
    ],
)
def test_a_lookup_answered_before_bottle_is_the_one_bottles_route_gives(service, query):
    wsgi = app.create_app(service)
    direct = Client(wsgi).request("GET", "/lookup", query, {"x-api-key": KEY})
    wsgi.lookup = None  # every lookup through Bottle's route
    routed = Client(wsgi).request("GET", "/lookup", query, {"x-api-key": KEY})
    assert (direct.status, direct.headers, direct.body) == (routed.status, routed.headers, routed.body)
    assert int(direct.headers["Content-Length"]) == len(direct.body)


def explode(*args):
    raise RuntimeError("secret internals /srv/app.py line 42")


def fail_in_route(monkeypatch, wsgi):
    """A fault inside a route: Bottle catches it."""
    monkeypatch.setattr(app, "answer", explode)


def fail_around_routes(monkeypatch, wsgi):
    """A fault outside Bottle, in the request log's own answer to a lookup or in Bottle as a whole: caught."""
    monkeypatch.setattr(wsgi, "app", explode)
    monkeypatch.setattr(wsgi, "lookup", explode)


@pytest.mark.parametrize("fail", [fail_in_route, fail_around_routes])
def test_an_unexpected_failure_is_a_json_500_without_traceback(service, monkeypatch, fail):
    wsgi = app.create_app(service)
    fail(monkeypatch, wsgi)
    r = Client(wsgi).lookup("1001", "jane@example.com")
    assert r.status == 500
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Cache-Control"] == "no-store"
    assert r.context == app.load_config(ROOT / "contexts.toml").templates["unavailable"].text
    assert b"Traceback" not in r.body and b"secret internals" not in r.body


@pytest.mark.parametrize("fail", [fail_in_route, fail_around_routes])
def test_a_failure_is_worded_by_the_merchants_unavailable_template(export, contexts_file, monkeypatch, fail):
    text = contexts_file.read_text()
    shipped = next(line for line in text.splitlines() if line.startswith("unavailable = "))
    contexts_file.write_text(text.replace(shipped, 'unavailable = "Our order desk is busy; try again soon."'))
    service = app.Service(make_settings(export.parent, contexts_file))
    service.start()
    wsgi = app.create_app(service)
    fail(monkeypatch, wsgi)
    r = Client(wsgi).lookup("1001", "jane@example.com")
    assert (r.status, r.context) == (500, "Our order desk is busy; try again soon.")


def test_before_any_load_the_fault_text_is_the_shipped_unavailable_template(export, contexts_file):
    service = app.Service(make_settings(export.parent, contexts_file))  # not started: nothing loaded
    r = Client(app.create_app(service)).lookup("1001", "jane@example.com")
    assert r.status == 503
    assert r.context == app.load_config(ROOT / "contexts.toml").templates["unavailable"].text


@pytest.mark.parametrize("path", ["/lookup", "/healthz", "/livez", "/nope"])
@pytest.mark.parametrize("key", [KEY, None])
def test_every_response_is_json_and_not_cached(client, path, key):
    r = client.get(path, "order_id=1001&customer_email=jane@example.com", key=key)
    assert r.headers["Content-Type"] == "application/json"
    assert r.headers["Cache-Control"] == "no-store"
    assert r.headers["X-Content-Type-Options"] == "nosniff"


def test_healthz_without_key_says_only_health_and_age(client):
    r = client.get("/healthz", key=None)
    assert r.status == 200
    assert set(r.json) == {"status", "data_age_seconds"}
    assert r.json["status"] == "ok"


def test_healthz_with_key_shows_file_counts_and_times_but_no_customer_data(client):
    r = client.get("/healthz")
    body = r.json
    assert r.status == 200
    assert body["file"] == "orders.csv"
    assert body["orders"] == 6 and body["rows"] == 8
    assert body["loaded_at"] and body["load_seconds"] >= 0
    assert body["last_refused"] is None and body["config"] == "ok"
    assert "example.com" not in r.body.decode() and KEY not in r.body.decode()


def test_healthz_with_wrong_key_is_the_public_view(client):
    r = client.get("/healthz", key="wrong-key-0123456789abcdef")
    assert set(r.json) == {"status", "data_age_seconds"}


def test_through_a_real_waitress_server(live_server):
    request = urllib.request.Request(
        f"{live_server}/lookup?order_id=%231001&customer_email=JANE@example.com", headers={"x-api-key": KEY}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "application/json"
        assert json.load(response)["context"].startswith("Order #1001 was found")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(f"{live_server}/lookup?order_id=1001&customer_email=jane@example.com", timeout=5)
    assert caught.value.code == 401
    assert caught.value.read() == b""
