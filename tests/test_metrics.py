"""Prometheus metrics at /metrics and the lookup insights on the status page: what an operator
with Grafana, or a merchant looking at the page, would read after real lookups.
"""

import base64
import os
import re
import sys
import urllib.error
import urllib.request

import pytest
from conftest import KEY, ROOT, Client, Served, free_port, make_settings, orders_csv, started, wait_for, write
from prometheus_client.parser import text_string_to_metric_families

import app

OTHER = "wrong-key-Zq8xV3mN7pL2tR5wB9cK"


def basic(password, user="prometheus"):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def scrape(client, headers=None):
    """The metrics as {(name, labels as a sorted tuple): value}."""
    r = client.request("GET", "/metrics", headers=headers or basic(KEY))
    assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain; version=")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(r.body.decode())
        for sample in family.samples
    }


@pytest.mark.parametrize(
    "headers, status",
    [
        ({}, 401),
        (basic(OTHER), 401),
        (basic(KEY), 200),
        (basic(KEY, user=""), 200),
        ({"x-api-key": KEY}, 200),
    ],
)
def test_metrics_need_the_key_as_basic_auth_password(client, headers, status):
    r = client.request("GET", "/metrics", headers=headers)
    assert r.status == status
    if status == 401:
        assert r.body == b"" and r.headers["Www-Authenticate"].startswith("Basic ")


def test_metrics_can_be_turned_off(export, contexts_file):
    client = Client(app.create_app(started(make_settings(export.parent, contexts_file, METRICS="no"))))
    assert client.request("GET", "/metrics", headers=basic(KEY)).status == 404
    assert client.lookup("#1001", "jane@example.com").status == 200


@pytest.mark.parametrize(
    "order_id, email, key, outcome",
    [
        ("#1001", "jane@example.com", KEY, "found"),
        ("#7777", "jane@example.com", KEY, "not_found"),
        ("#1001", "sam@example.com", KEY, "not_found"),
        ("", "jane@example.com", KEY, "missing"),
        ("#1001", "   ", KEY, "missing"),
        ("x" * 100, "jane@example.com", KEY, "invalid"),
        ("#1001", "jane@example.com", OTHER, "unauthorized"),
        ("#1001", "jane@example.com", None, "unauthorized"),
    ],
)
def test_each_lookup_is_counted_by_outcome(client, order_id, email, key, outcome):
    client.lookup(order_id, email, key=key)
    metrics = scrape(client)
    assert metrics[("orders_lookups_total", (("outcome", outcome),))] == 1
    assert sum(v for (name, _), v in metrics.items() if name == "orders_lookups_total") == 1
    assert metrics[("orders_lookup_duration_seconds_count", ())] == 1


def test_a_lookup_that_fails_inside_is_counted_as_an_error(client, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(app, "answer", broken)
    assert client.lookup("#1001", "jane@example.com").status == 500
    metrics = scrape(client)
    assert metrics[("orders_lookups_total", (("outcome", "error"),))] == 1
    assert sum(v for (name, _), v in metrics.items() if name == "orders_lookups_total") == 1


def test_a_guessing_client_is_counted_as_throttled(client):
    for _ in range(12):
        client.lookup("#1001", "jane@example.com", key=OTHER)
    metrics = scrape(client)
    assert metrics[("orders_lookups_total", (("outcome", "throttled"),))] == 2
    assert metrics[("orders_lookups_total", (("outcome", "unauthorized"),))] == 10


def test_no_label_or_value_carries_an_order_number_an_email_or_a_key(client):
    client.lookup("#SO-424242", "private.person@example.org")
    client.lookup("#1001", "jane@example.com")
    text = client.request("GET", "/metrics", headers=basic(KEY)).body.decode()
    for secret in ("424242", "private", "example.org", "jane", "1001", KEY):
        # Whole tokens only: a timing such as 0.00048657100160 may hold the digits 1001 by chance.
        assert not re.search(rf"(?<![\w.]){re.escape(secret)}(?![\w.])", text), secret


def test_the_data_served_and_the_loads_are_metrics(service, export):
    client = Client(app.create_app(service))
    metrics = scrape(client)
    assert metrics[("orders_served_orders", ())] == service.snapshot.orders
    assert metrics[("orders_served_rows", ())] == service.snapshot.rows
    assert metrics[("orders_max_age_seconds", ())] == 26 * 3600
    assert 0 <= metrics[("orders_data_age_seconds", ())] < 3600
    assert metrics[("orders_loads_accepted_total", ())] == 1
    assert metrics[("process_resident_memory_bytes", ())] > 10e6
    whole = export.read_text()
    write(export, whole[: len(whole) // 2 + 7])  # cut mid-row
    assert service.reload() is False
    write(service.settings.contexts, "[settings\n")
    assert service.reload() is False
    metrics = scrape(client)
    assert metrics[("orders_loads_refused_total", (("reason", "cut_off"),))] == 1
    assert metrics[("orders_loads_refused_total", (("reason", "contexts"),))] == 1
    assert metrics[("orders_loads_accepted_total", ())] == 1


@pytest.mark.parametrize(
    "message, kind",
    [
        ("o.csv: looks cut off: the last row has 3 of 9 fields", "cut_off"),
        (
            "o.csv: holds 10 orders, fewer than 50% of the 200 being served, so it looks cut off. ... min_orders_ratio",
            "shrunk",
        ),
        ("o.csv: 60 of the 200 orders ... more than max_vanished_ratio (20%) allows", "vanished"),
        ("o.csv: no column for email (looked for ...)", "missing_column"),
        ("o.csv: is a web page (HTML), not an export", "not_an_export"),
        ("o.csv: could not be read (ValueError).", "unreadable"),
    ],
)
def test_refusals_are_labelled_by_a_word_never_by_their_text(message, kind):
    assert app.refusal_kind(app.ExportError(message)) == kind


def test_webhook_events_and_fetches_are_counted_where_they_exist(tmp_path, contexts_file):
    import json

    from test_webhooks import SHOPIFY_SECRET, raw_post, shopify_order, sign

    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    service = started(
        make_settings(
            export.parent, contexts_file, SHOPIFY_WEBHOOK_SECRET=SHOPIFY_SECRET, STATE_DIR=str(tmp_path / "state")
        )
    )
    client = Client(app.create_app(service))
    body = json.dumps(shopify_order(5001)).encode()
    for signature in (sign(SHOPIFY_SECRET, body), "bad"):
        raw_post(
            client, "/webhooks/shopify", body, {"x-shopify-topic": "orders/create", "x-shopify-hmac-sha256": signature}
        )
    metrics = scrape(client)
    assert metrics[("orders_webhook_events_total", (("outcome", "applied"), ("platform", "shopify")))] == 1
    assert metrics[("orders_webhook_events_total", (("outcome", "unauthorized"), ("platform", "shopify")))] == 1
    assert not any(name == "orders_fetches_total" for name, _ in metrics)  # no ORDERS_URL, no such series
    service.stopped()


def test_serve_counts_lookups_in_the_log_thread(tmp_path, contexts_file):
    # As deployed: the request only queues its log tuple; the log's thread counts it.
    write(tmp_path / "data" / "orders.csv", orders_csv(5))
    port = free_port()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(port),
        "ORDERS_FILE": str(tmp_path / "data"),
        "CONTEXTS_FILE": str(contexts_file),
    }
    base = f"http://127.0.0.1:{port}"
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as served:
        served.wait_for("INFO serving ")
        for number in (1, 2, 99):
            request = urllib.request.Request(
                f"{base}/lookup?order_id=%23{number}&customer_email=customer{number}%40example.com",
                headers={"x-api-key": KEY},
            )
            try:
                urllib.request.urlopen(request, timeout=5).read()
            except urllib.error.HTTPError as e:
                assert e.code == 404

        def counted():
            with urllib.request.urlopen(
                urllib.request.Request(f"{base}/metrics", headers=basic(KEY)), timeout=5
            ) as response:
                text = response.read().decode()
            return (
                'orders_lookups_total{outcome="found"} 2.0' in text
                and 'orders_lookups_total{outcome="not_found"} 1.0' in text
            )

        wait_for(counted, what="the log thread to count the lookups")


def test_the_status_page_shows_the_days_lookups_and_the_last_not_found(client):
    client.lookup("#1001", "jane@example.com")
    client.lookup("SO-1001", "jane@example.com")
    client.lookup("#4242", "maria.garcia@example.com")
    page = client.request("GET", "/", headers=basic(KEY)).body.decode()
    assert "Lookups, last 24 hours" in page
    assert "3 lookups; 67% of those answered were not found" in page
    table = page.split('id="not-found"')[1]
    assert table.index("4242") < table.index("SO1001")  # newest first, as typed in letters and digits
    assert "m***@example.com" in table and "maria.garcia" not in page


@pytest.mark.parametrize(
    "requests, headings",
    [
        ([], ["found", "not found"]),
        ([("lookup", "", "jane@example.com", KEY)], ["found", "not found", "left out"]),
        (
            [
                ("lookup", "#1001", "jane@example.com", "wrong-key-wrong-key"),
                ("lookup", "#1001\x07", "jane@example.com", KEY),
            ],
            ["found", "not found", "unreadable", "wrong key"],
        ),
    ],
)
def test_each_hour_shows_every_outcome_the_day_had(client, requests, headings):
    client.lookup("#1001", "jane@example.com")
    for _, order_id, email, key in requests:
        client.lookup(order_id, email, key=key)
    page = client.request("GET", "/", headers=basic(KEY)).body.decode()
    table = page.split('id="hours"')[1].split("</table>")[0]
    assert re.findall(r"<th>([^<]+)</th>", table)[1:] == headings
    row = re.findall(r"<td>([^<]+)</td>", table)
    assert row[1:] == ["1", "0", *["1"] * (len(headings) - 2)]


@pytest.mark.parametrize(
    "counts, share, wanted",
    [
        ({1: 98, 5: 1, 13: 1}, 0.5, 0.5),
        ({1: 98, 5: 1, 13: 1}, 0.99, 5),
        ({1: 50, 12: 50}, 0.99, 100),
        ({}, 0.5, None),
    ],
)
def test_percentiles_are_read_off_the_buckets(counts, share, wanted):
    buckets = [0] * (len(app.LATENCY_MS) + 1)
    for at, n in counts.items():
        buckets[at] = n
    assert app.percentile(buckets, share) == wanted


def test_insights_keep_a_day_and_forget_the_rest():
    insights = app.Insights()
    day = 86400
    insights.observe([(t, "-", "GET", "/lookup", "200 OK", 1.0, ("1", "a@example.com")) for t in (0, day, day + 3600)])
    insights.observe([(day + 7200, "-", "GET", "/healthz", "200 OK", 1.0, None)])  # not a lookup
    summary = insights.day(now=day + 7200)
    assert summary["lookups"] == 2 and [hour for hour, _ in summary["hours"]] == ["00:00", "01:00"]
    assert insights.outcomes["found"] == 3  # /metrics counts since start
