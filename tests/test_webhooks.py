"""Orders between exports: Shopify and WooCommerce webhooks, signed, stored in SQLite, answered from.

The payloads start from the platforms' documented samples (tests/fixtures/shopify_orders_create.json,
woocommerce_order.json; sources in tests/fixtures/README.md), changed the way a real order
changes: a new number, a fulfillment with tracking, a new status. Deliveries go over HTTP to
`python app.py`, signed as the platforms sign them.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import sqlite3
import sys
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from conftest import (
    KEY,
    ROOT,
    Client,
    Served,
    free_port,
    make_settings,
    orders_csv,
    started,
    wait_for,
    write,
)
from conftest import (
    lookup_over_http as lookup,
)
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st

import app

FIXTURES = ROOT / "tests" / "fixtures"
SHOPIFY_SECRET = "shpss-Tq7vX2mZp9LrT4wN8cB3hY6"
WOO_SECRET = "wc-Kd8sJ3nQ7xV2pL9mR4tB6"


def now_iso(delta=0):
    return (datetime.now(UTC) + timedelta(seconds=delta)).isoformat(timespec="seconds")


def shopify_order(number=5001, email="new@example.com", shipped=False, updated=None, order_id=None):
    """Shopify's documented orders/create sample, made a fresh order (and shipped, if asked)."""
    order = json.loads((FIXTURES / "shopify_orders_create.json").read_text())
    order.update(
        id=order_id or 7000000000 + number,
        name=f"#{number}",
        order_number=number,
        email=email,
        contact_email=email,
        cancelled_at=None,
        financial_status="paid",
        test=False,
        created_at=now_iso(-3600),
        updated_at=updated or now_iso(),
    )
    order["line_items"] = order["line_items"][:2]
    if shipped:
        order["fulfillment_status"] = "fulfilled"
        order["fulfillments"] = [
            {
                "id": 1,
                "status": "success",
                "created_at": now_iso(),
                "tracking_company": "UPS",
                "tracking_number": "1Z999AA10123456784",
                "tracking_numbers": ["1Z999AA10123456784"],
                "tracking_url": "https://www.ups.com/track?tracknum=1Z999AA10123456784",
                "tracking_urls": ["https://www.ups.com/track?tracknum=1Z999AA10123456784"],
                "shipment_status": "in_transit",
            }
        ]
    return order


def woo_order(number, email, status, modified=None):
    """WooCommerce's documented REST order (the "Retrieve an order" example), as order number."""
    order = json.loads((FIXTURES / "woocommerce_order.json").read_text())
    order.update(id=number, number=str(number), status=status, date_modified_gmt=(modified or now_iso())[:19])
    order["billing"]["email"] = email
    return order


def sign(secret, body):
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def shopify_headers(body, delivery, topic="orders/updated", secret=SHOPIFY_SECRET, shop="shop.myshopify.com"):
    """The headers Shopify sends with a delivery of body, signed with secret."""
    return {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": sign(secret, body),
        "X-Shopify-Shop-Domain": shop,
        "X-Shopify-Webhook-Id": delivery,
    }


def post(url, body, headers):
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def shopify(base, order, topic="orders/updated", secret=SHOPIFY_SECRET, delivery=None):
    body = json.dumps(order).encode()
    return post(f"{base}/webhooks/shopify", body, shopify_headers(body, delivery or os.urandom(8).hex(), topic, secret))


def woocommerce(base, order, topic="order.updated", secret=WOO_SECRET, delivery=None):
    body = json.dumps(order).encode()
    return post(
        f"{base}/webhooks/woocommerce",
        body,
        {
            "Content-Type": "application/json",
            "X-WC-Webhook-Topic": topic,
            "X-WC-Webhook-Signature": sign(secret, body),
            "X-WC-Webhook-Source": "https://shop.example.com/",
            "X-WC-Webhook-Delivery-ID": delivery or os.urandom(8).hex(),
        },
    )


def healthz(base):
    request = urllib.request.Request(f"{base}/healthz", headers={"x-api-key": KEY})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


class Shop:
    """python app.py with both webhook secrets, on a data folder and a state folder of its own."""

    def __init__(self, tmp_path, contexts_file):
        self.data, self.state = tmp_path / "data", tmp_path / "state"
        if not self.data.exists():
            write(self.data / "orders.csv", orders_csv(20))
        self.tmp, self.port = tmp_path, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "API_KEY": KEY,
            "PORT": str(self.port),
            "ORDERS_FILE": str(self.data),
            "CONTEXTS_FILE": str(contexts_file),
            "STATE_DIR": str(self.state),
            "SETTLE_SECONDS": "0.1",
            "SHOPIFY_WEBHOOK_SECRET": f"old-Wq3xR8vN2mK7pL4tZ9sB,{SHOPIFY_SECRET}",
            "WOOCOMMERCE_WEBHOOK_SECRET": WOO_SECRET,
        }

    def __enter__(self):
        self.served = Served([sys.executable, str(ROOT / "app.py")], self.env, self.tmp).__enter__()
        self.served.wait_for("INFO serving ")
        return self

    def __exit__(self, *exc):
        self.served.__exit__(*exc)


@pytest.fixture
def shop(tmp_path, contexts_file):
    with Shop(tmp_path, contexts_file) as running:
        yield running


def test_a_new_order_arrives_by_a_shopify_event_and_is_found_with_its_link(shop):
    assert lookup(shop.base, "#5001", "new@example.com")[0] == 404
    status, body = shopify(shop.base, shopify_order(5001, shipped=True), topic="orders/fulfilled")
    assert status == 200 and json.loads(body)["outcome"] == "applied"
    status, body = lookup(shop.base, "5001", "New@Example.com")
    assert status == 200
    assert body["context"].startswith("Order #5001 was found and has shipped on ")
    assert "with UPS (tracking number 1Z999AA10123456784)" in body["context"]
    assert body["tracking_url"] == "https://www.ups.com/track?tracknum=1Z999AA10123456784"
    assert "Aviator sunglasses" in body["context"]
    assert lookup(shop.base, "5001", "other@example.com")[0] == 404  # the email must match, as for exports


def test_a_woocommerce_event_changes_an_exported_orders_state(shop):
    assert "has not shipped yet" in lookup(shop.base, "3", "customer3@example.com")[1]["context"]
    status, _ = woocommerce(shop.base, woo_order(3, "customer3@example.com", "completed"))
    assert status == 200
    assert "was found and has shipped" in lookup(shop.base, "3", "customer3@example.com")[1]["context"]


def test_woocommerce_tracking_and_names_read_as_the_customer_sees_them(shop):
    """Shipment Tracking (and Advanced Shipment Tracking) keep parcels in the order's `_wc_shipment_tracking_items`.

    The entries' fields are those its add_tracking_item() writes (WooCommerce Shipment Tracking
    1.6.11; zorem/woo-advanced-shipment-tracking 3.9.2): a predefined carrier as a slug with no
    link, a custom one with its own. WooCommerce keeps item names as HTML (`&ndash;`, in its
    documented sample), which a customer must not read.
    """
    order = woo_order(3, "customer3@example.com", "completed")
    order["meta_data"].append(
        {
            "id": 13107,
            "key": "_wc_shipment_tracking_items",
            "value": [
                {
                    "tracking_provider": "dhl",
                    "custom_tracking_provider": "",
                    "custom_tracking_link": "",
                    "tracking_number": "JJD0099999999",
                    "date_shipped": "1732838400",
                    "tracking_id": "0f8d6d5c3b1a4e2f",
                },
                {
                    "tracking_provider": "",
                    "custom_tracking_provider": "Local &amp; Fast Courier",
                    "custom_tracking_link": "https://courier.example/track/LC123",
                    "tracking_number": "LC123",
                    "date_shipped": 1732924800,
                    "tracking_id": "a1b2c3d4e5f60718",
                },
            ],
        }
    )
    assert woocommerce(shop.base, order)[0] == 200
    status, body = lookup(shop.base, "3", "customer3@example.com")
    assert status == 200 and "JJD0099999999" in body["context"] and "LC123" in body["context"]
    assert "Ship Your Idea \u2013 Color: Black" in body["context"] and "&ndash;" not in body["context"]
    assert "&amp;" not in json.dumps(body)
    assert body["tracking_url"].startswith("https://")


def test_the_woocommerce_ping_gets_200_and_stores_nothing(shop):
    status, body = post(
        f"{shop.base}/webhooks/woocommerce", b"webhook_id=42", {"Content-Type": "application/x-www-form-urlencoded"}
    )
    assert status == 200 and json.loads(body) == {"ping": "ok"}
    assert healthz(shop.base)[1]["webhooks"]["woocommerce"]["received"] == 0


@pytest.mark.parametrize("signature", [None, "", "bm90IHRoZSBzaWduYXR1cmU=", "x" * 5000])
def test_a_bad_or_missing_signature_gets_401_and_changes_nothing(shop, signature):
    body = json.dumps(shopify_order(5002)).encode()
    headers = {"Content-Type": "application/json", "X-Shopify-Topic": "orders/create"}
    if signature is not None:
        headers["X-Shopify-Hmac-Sha256"] = signature
    status, answer = post(f"{shop.base}/webhooks/shopify", body, headers)
    assert status == 401 and answer == b""
    assert shopify(shop.base, shopify_order(5002), secret="a-wrong-secret-0123")[0] == 401
    assert lookup(shop.base, "5002", "new@example.com")[0] == 404
    counts = healthz(shop.base)[1]["webhooks"]["shopify"]
    assert counts["rejected"] == 2 and counts["applied"] == 0
    assert "new@example.com" not in shop.served.output and "Aviator" not in shop.served.output  # never the body


def test_a_replayed_delivery_is_applied_once(shop):
    first = shopify(shop.base, shopify_order(5003), delivery="b54557e4-bdd9-4b37-8a5f-bf7d70bcd043")
    again = shopify(shop.base, shopify_order(5003, updated=now_iso(5)), delivery="b54557e4-bdd9-4b37-8a5f-bf7d70bcd043")
    assert json.loads(first[1])["outcome"] == "applied" and json.loads(again[1])["outcome"] == "replayed"
    assert healthz(shop.base)[1]["webhooks"]["shopify"]["applied"] == 1


def test_an_older_change_arriving_late_does_not_undo_a_newer_one(shop):
    shopify(shop.base, shopify_order(5004, shipped=True, updated=now_iso(-60)))
    late = shopify(shop.base, shopify_order(5004, shipped=False, updated=now_iso(-120)))  # retried later
    assert json.loads(late[1])["outcome"] == "stale"
    assert "has shipped" in lookup(shop.base, "5004", "new@example.com")[1]["context"]


def test_two_writes_put_out_of_order_still_leave_the_newer_one(service):
    # Two events for one order, applied by two threads: the older may reach memory last.
    overlay = app.Overlay(service.snapshot)
    key = (service.snapshot.normalise("#5010"), "new@example.com")
    fields = {"Name": "#5010", "Email": "new@example.com", "Fulfillment Status": "fulfilled"}
    overlay.put("shopify", key, fields, moment=200)
    overlay.put("shopify", key, dict(fields, **{"Fulfillment Status": "unfulfilled"}), moment=100)
    status, body = app.answer(service.snapshot, "#5010", "new@example.com", overlay)
    assert status == 200 and "has shipped" in json.loads(body)["context"]


@pytest.mark.parametrize(
    "parcels, wanted",
    [
        (["delivered", "delivered"], "has been delivered"),
        (["delivered", "in_transit"], "has shipped"),  # one parcel delivered is not the order
        (["delivered", None], "has shipped"),  # a parcel the carrier says nothing of
    ],
)
def test_an_order_is_delivered_only_when_every_parcel_is(shop, parcels, wanted):
    order = shopify_order(5011, shipped=True)
    order["fulfillments"] = [
        dict(order["fulfillments"][0], id=n, shipment_status=status) for n, status in enumerate(parcels)
    ]
    shopify(shop.base, order)
    context = lookup(shop.base, "5011", "new@example.com")[1]["context"]
    assert wanted in context and (wanted == "has been delivered" or "delivered" not in context)


def test_parcels_with_two_carriers_name_both_and_guess_no_link(shop):
    order = shopify_order(5012, shipped=True)
    first = order["fulfillments"][0]
    order["fulfillments"] = [
        dict(first, id=1, tracking_urls=[], tracking_url=None),
        dict(
            first,
            id=2,
            tracking_company="DHL Express",
            tracking_number="1234567890",
            tracking_numbers=["1234567890"],
            tracking_urls=[],
            tracking_url=None,
        ),
    ]
    shopify(shop.base, order)
    body = lookup(shop.base, "5012", "new@example.com")[1]
    assert "with UPS / DHL Express (tracking number 1Z999AA10123456784, 1234567890)" in body["context"]
    assert body["tracking_url"] is None


def test_events_survive_a_restart(tmp_path, contexts_file):
    with Shop(tmp_path, contexts_file) as running:
        shopify(running.base, shopify_order(5005, shipped=True))
        woocommerce(running.base, woo_order(4, "customer4@example.com", "on-hold"))
    with Shop(tmp_path, contexts_file) as restarted:
        assert lookup(restarted.base, "5005", "new@example.com")[0] == 200
        assert "on hold" in lookup(restarted.base, "4", "customer4@example.com")[1]["context"]
        orders = healthz(restarted.base)[1]["webhooks"]
        assert orders["shopify"]["orders_from_events"] == 1 and orders["woocommerce"]["orders_from_events"] == 1
        assert orders["shopify"]["last_event"] and orders["woocommerce"]["last_event"]  # when it arrived, not "none"


def test_a_later_export_supersedes_the_events(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(20))
    os.utime(export, (time.time() - 6 * 3600,) * 2)
    with Shop(tmp_path, contexts_file) as shop:
        woocommerce(shop.base, woo_order(5, "customer5@example.com", "completed", modified=now_iso(-3 * 3600)))
        assert "has shipped" in lookup(shop.base, "5", "customer5@example.com")[1]["context"]
        temp = write(shop.data / ".next.csv", orders_csv(20, status="partial"))  # made more than an hour after it
        os.replace(temp, shop.data / "orders.csv")
        wait_for(
            lambda: "Part of it has shipped" in lookup(shop.base, "5", "customer5@example.com")[1]["context"],
            what="the export's newer state",
        )
        assert healthz(shop.base)[1]["webhooks"]["woocommerce"]["orders_from_events"] == 0


@pytest.mark.parametrize("minutes_before, kept", [(30, True), (90, False)])
def test_an_event_from_while_the_export_was_made_is_kept(shop, minutes_before, kept):
    # The export is read from the shop over its last hour (export_lag_hours = 1) and may lack what changed then.
    mtime = shop.data.joinpath("orders.csv").stat().st_mtime
    moment = datetime.fromtimestamp(mtime - minutes_before * 60, UTC).isoformat(timespec="seconds")
    answer = json.loads(woocommerce(shop.base, woo_order(6, "customer6@example.com", "completed", moment))[1])
    assert answer["stored"] is kept
    assert ("has shipped" in lookup(shop.base, "6", "customer6@example.com")[1]["context"]) is kept


@pytest.mark.parametrize("updated", [None, now_iso(3600)])  # stamped an hour ahead: a shop's clock running fast
def test_a_deleted_order_is_no_longer_found(shop, updated):
    shopify(shop.base, shopify_order(5006, order_id=123456789, updated=updated))
    assert lookup(shop.base, "5006", "new@example.com")[0] == 200
    status, body = shopify(shop.base, {"id": 123456789}, topic="orders/delete")
    assert status == 200 and json.loads(body)["outcome"] == "applied"
    assert lookup(shop.base, "5006", "new@example.com")[0] == 404


def test_a_corrupt_store_does_not_stop_the_service(tmp_path, contexts_file):
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "webhooks.sqlite3").write_bytes(b"SQLite format 3\x00" + os.urandom(4000))
    with Shop(tmp_path, contexts_file) as running:
        assert lookup(running.base, "1", "customer1@example.com")[0] == 200
        status, body = healthz(running.base)
        assert status == 503 and any("could not be read" in r and "moved aside" in r for r in body["reasons"])
        assert shopify(running.base, shopify_order(5007))[0] == 200  # a new store took its place
        assert lookup(running.base, "5007", "new@example.com")[0] == 200
        # A contexts.toml edit brings no export: the events lost are still missing from the answers.
        contexts_file.write_text(contexts_file.read_text().replace("max_age_hours = 26", "max_age_hours = 30"))
        running.served.wait_for("applied contexts.toml")
        assert healthz(running.base)[0] == 503
        temp = write(running.data / ".next.csv", orders_csv(20))
        os.replace(temp, running.data / "orders.csv")
        wait_for(lambda: healthz(running.base)[0] == 200, what="the next export to make up for the lost events")
    assert list((tmp_path / "state").glob("webhooks.sqlite3.unreadable-*"))


def test_an_unset_secret_makes_its_address_unknown(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    client = Client(app.create_app(started(make_settings(export.parent, contexts_file))))
    for method in ("POST", "GET"):
        for path in ("/webhooks/shopify", "/webhooks/woocommerce", "/nothing-here"):
            r = client.request(method, path, headers={"x-api-key": KEY})
            assert r.status == 404 and r.body == client.request("GET", "/nothing-here").body


@pytest.mark.parametrize(
    "body, topic, status",
    [
        (b"{not json", "orders/create", 400),
        (b"[1, 2, 3]", "orders/create", 400),
        (b'{"name": "#1"}', "orders/create", 400),  # no id: not an order
        (json.dumps({"id": 1, "name": "#77", "email": ""}).encode(), "orders/create", 200),  # no email: stored nothing
        (b'{"id": 1}', "products/update", 200),  # another topic: ignored
    ],
)
def test_signed_bodies_that_are_not_orders_get_a_json_answer(tmp_path, contexts_file, body, topic, status):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    settings = make_settings(
        export.parent, contexts_file, SHOPIFY_WEBHOOK_SECRET=SHOPIFY_SECRET, STATE_DIR=str(tmp_path / "state")
    )
    client = Client(app.create_app(started(settings)))
    r = raw_post(
        client,
        "/webhooks/shopify",
        body,
        {"x-shopify-topic": topic, "x-shopify-hmac-sha256": sign(SHOPIFY_SECRET, body)},
    )
    assert r.status == status and r.headers["Content-Type"] == "application/json"
    json.loads(r.body)


def raw_post(client, path, body, headers):
    """A POST through the in-process client, with a body."""
    import io
    from wsgiref.util import setup_testing_defaults

    environ = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "QUERY_STRING": "",
        "wsgi.input": io.BytesIO(body),
        "CONTENT_LENGTH": str(len(body)),
        "REMOTE_ADDR": "127.0.0.1",
    }
    setup_testing_defaults(environ)
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    seen = {}
    answer = b"".join(
        client.wsgi(
            environ,
            lambda status, headers, exc_info=None: seen.update(status=int(status.split()[0]), headers=dict(headers)),
        )
    )
    from conftest import Response

    return Response(seen["status"], seen["headers"], answer)


@pytest.fixture(scope="module")
def fuzz_client(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    export = write(root / "data" / "orders.csv", orders_csv(3))
    contexts = write(root / "contexts.toml", (ROOT / "contexts.toml").read_text())
    settings = make_settings(
        export.parent,
        contexts,
        SHOPIFY_WEBHOOK_SECRET=SHOPIFY_SECRET,
        WOOCOMMERCE_WEBHOOK_SECRET=WOO_SECRET,
        STATE_DIR=str(root / "state"),
    )
    return Client(app.create_app(started(settings)))


PAYLOADS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(
            st.sampled_from(
                [
                    "id",
                    "name",
                    "email",
                    "number",
                    "status",
                    "billing",
                    "line_items",
                    "fulfillments",
                    "meta_data",
                    "customer",
                    "updated_at",
                    "quantity",
                    "tracking_numbers",
                    "key",
                    "value",
                    "date_modified_gmt",
                    "x",
                ]
            ),
            children,
            max_size=6,
        )
    ),
    max_leaves=25,
)


@hypothesis_settings(max_examples=150, deadline=None)
@given(
    payload=PAYLOADS,
    platform=st.sampled_from(["shopify", "woocommerce"]),
    topic=st.sampled_from(["orders/create", "orders/delete", "order.updated", "order.deleted", "x"]),
)
def test_no_signed_body_ever_gets_a_500(fuzz_client, payload, platform, topic):
    body = json.dumps(payload, allow_nan=True).encode()
    secret, prefix = (SHOPIFY_SECRET, "x-shopify") if platform == "shopify" else (WOO_SECRET, "x-wc-webhook")
    headers = {
        f"{prefix}-topic": topic,
        (f"{prefix}-hmac-sha256" if platform == "shopify" else f"{prefix}-signature"): sign(secret, body),
    }
    r = raw_post(fuzz_client, f"/webhooks/{platform}", body, headers)
    assert r.status in (200, 400) and r.headers["Content-Type"] == "application/json"


@pytest.fixture
def in_process(tmp_path, contexts_file):
    """A started Service taking Shopify events, with a cap of 3 orders from events, and its WSGI client."""
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    service = started(
        make_settings(
            export.parent,
            contexts_file,
            SHOPIFY_WEBHOOK_SECRET=SHOPIFY_SECRET,
            STATE_DIR=str(tmp_path / "state"),
            WEBHOOK_MAX_ORDERS="3",
        )
    )
    yield service, Client(app.create_app(service))
    service.stopped()


def send(client, order):
    body = json.dumps(order).encode()
    return raw_post(
        client,
        "/webhooks/shopify",
        body,
        {"x-shopify-topic": "orders/updated", "x-shopify-hmac-sha256": sign(SHOPIFY_SECRET, body)},
    )


def test_the_cap_on_orders_from_events_holds_between_exports(in_process):
    service, client = in_process
    for number in range(6001, 6006):
        assert send(client, shopify_order(number, updated=now_iso(number - 6010))).status == 200
    found = [client.lookup(str(n), "new@example.com").status for n in range(6001, 6006)]
    assert found == [404, 404, 200, 200, 200]  # the oldest two went, as WEBHOOK_MAX_ORDERS=3 says
    assert json.loads(client.get("/healthz").body)["webhooks"]["shopify"]["orders_from_events"] == 3
    with sqlite3.connect(service.settings.state / "webhooks.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM orders").fetchone()[0] == 3


def test_a_failing_write_is_reported_and_costs_no_other_event(in_process, monkeypatch):
    service, client = in_process
    write_one = service.store.write

    def failing(job):
        if job.event.fields.get("order_id") == "#6102":
            raise sqlite3.OperationalError("database or disk is full")
        return write_one(job)

    monkeypatch.setattr(service.store, "write", failing)
    # Three events that arrive together, written in one round (one transaction).
    jobs = [
        app.StoreJob(app.shopify_event(shopify_order(n), "orders/updated"), (str(n), "new@example.com"), "")
        for n in (6101, 6102, 6103)
    ]
    service.store.pending.extend(jobs)
    service.store.wake.set()
    assert all(job.done.wait(10) for job in jobs)
    assert [job.outcome if job.error is None else "error" for job in jobs] == ["applied", "error", "applied"]
    assert send(client, shopify_order(6102)).status == 503  # through HTTP: the shop will send it again
    health = json.loads(client.get("/healthz").body)
    assert health["status"] == "degraded" and any("cannot be stored" in r for r in health["reasons"])
    assert any("cannot be stored" in r for r in health["reasons"])  # reported a while, for a monitor to see
    monkeypatch.setattr(service.store, "write", write_one)
    assert send(client, shopify_order(6102)).status == 200  # the shop sends it again; it is stored now
    assert client.lookup("6102", "new@example.com").status == 200
    assert service.health(time.time() + app.WebhookStore.FAILED_SECONDS + 1)[0] is True


def test_wrong_signatures_get_429_but_a_signed_event_from_the_same_address_never_does(in_process):
    service, client = in_process
    body = json.dumps(shopify_order(6201)).encode()
    statuses = [
        raw_post(
            client,
            "/webhooks/shopify",
            body,
            {"x-shopify-topic": "orders/updated", "x-shopify-hmac-sha256": sign("wrong", body)},
        ).status
        for _ in range(12)
    ]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    assert send(client, shopify_order(6201)).status == 200  # Shopify's addresses send every shop's events


@pytest.mark.parametrize("path, length", [("shopify", 3 << 20), ("bigcommerce", 100_000)])
def test_a_body_over_2_mb_gets_413_before_it_is_sent(shop, path, length):
    # The answer comes after the headers, so a client never has to push 3 MB nobody reads; a platform
    # without a secret (an address that does not exist) takes no more than any other (64 KB).
    import socket

    port = int(shop.base.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"POST /webhooks/{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            f"X-Shopify-Topic: orders/create\r\nX-Shopify-Hmac-Sha256: x\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413") and b"Request Entity Too Large" in head


def test_an_event_brings_the_records_time_forward(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(20))
    hours_ago = time.time() - 3 * 3600
    os.utime(export, (hours_ago, hours_ago))
    with Shop(tmp_path, contexts_file) as running:
        before = lookup(running.base, "#9999", "nobody@example.com")[1]["context"]
        config = app.load_config(contexts_file)
        assert app.records_time(hours_ago - 3600, config) in before  # less the hour an export takes to make
        shopify(running.base, shopify_order(5008))
        after = lookup(running.base, "#9999", "nobody@example.com")[1]["context"]
        assert app.records_time(hours_ago - 3600, config) not in after
        assert "hold orders placed until about " + app.records_time(time.time(), config)[:12] in after


def test_the_store_keeps_no_address_phone_or_payment(shop):
    shopify(shop.base, shopify_order(5009))
    with sqlite3.connect(shop.state / "webhooks.sqlite3") as db:
        stored = " ".join(row[0] for row in db.execute("SELECT fields FROM orders"))
    order = shopify_order(5009)
    for private in (
        order["billing_address"]["address1"],
        order["shipping_address"]["phone"] or "555",
        order["browser_ip"] or "216.191.105.146",
        "gateway",
    ):
        assert private not in stored


def test_probe_sends_a_signed_test_event(shop, capsys):
    code = app.main(["probe", f"{shop.base}/lookup", "--key", KEY, "--webhook", "shopify", "--secret", SHOPIFY_SECRET])
    out = capsys.readouterr().out
    assert code == 0 and "PASS  a signed shopify test event gets 200" in out
    code = app.main(["probe", f"{shop.base}/lookup", "--key", KEY, "--webhook", "woocommerce", "--secret", "wrong-one"])
    assert code == 1 and "the signature was refused" in capsys.readouterr().out
    assert healthz(shop.base)[1]["webhooks"]["shopify"]["applied"] == 0  # the test event changed no order


def test_the_status_page_and_lookup_command_show_the_events(shop, capsys):
    shopify(shop.base, shopify_order(5010, shipped=True))
    import base64 as b64

    request = urllib.request.Request(
        f"{shop.base}/", headers={"Authorization": "Basic " + b64.b64encode(f"x:{KEY}".encode()).decode()}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        page = response.read().decode()
    assert '<table id="webhooks">' in page and "<th>shopify</th>" in page
    assert re.search(r"<th>received since the service started</th>\s*<td>1</td>", page)
    assert re.search(r"<th>applied since the service started</th>\s*<td>1</td>", page)
    # From a shell beside the running service, without its secrets: the events answer as served; nothing changes.
    stored = (shop.state / "webhooks.sqlite3").stat().st_mtime_ns
    os.environ.update(STATE_DIR=str(shop.state))
    try:
        assert app.main(["lookup", "#5010", "new@example.com", "--data", str(shop.data)]) == 0
    finally:
        del os.environ["STATE_DIR"]
    assert capsys.readouterr().out.startswith('200 OK\n{"context": "Order #5010 was found and has shipped')
    assert (shop.state / "webhooks.sqlite3").stat().st_mtime_ns == stored


# What the signature does not cover: the topic, the delivery id, the shop it says it comes from ##################


def deliver(client, order, topic="orders/updated", delivery=None, shop_domain=None, body=None):
    """(status, JSON answer) of one signed Shopify delivery through the in-process client."""
    body = body or json.dumps(order).encode()
    headers = {"x-shopify-topic": topic, "x-shopify-hmac-sha256": sign(SHOPIFY_SECRET, body)}
    if delivery is not None:
        headers["x-shopify-webhook-id"] = delivery
    if shop_domain is not None:
        headers["x-shopify-shop-domain"] = shop_domain
    r = raw_post(client, "/webhooks/shopify", body, headers)
    return r.status, (json.loads(r.body) if r.body else None)


@pytest.mark.parametrize(
    "topic, body",
    [
        ("orders/delete", None),  # a captured order body, sent again as a deletion
        ("orders/updated", {"id": 7000006301}),  # a captured deletion, sent again as an order
    ],
)
def test_a_signed_body_sent_again_under_another_topic_is_refused(in_process, topic, body):
    service, client = in_process
    order = shopify_order(6301, updated=now_iso(-60))
    assert deliver(client, order, delivery="d-1")[1]["outcome"] == "applied"
    status, answer = deliver(client, body or order, topic=topic, delivery="d-2")
    assert status == 400 and ("deletion" in answer["context"])
    assert client.lookup("6301", "new@example.com").status == 200  # still found
    assert deliver(client, order, delivery="d-1")[1]["outcome"] == "replayed"  # the shop's own retry changes nothing


def test_a_deletion_is_undone_only_by_a_later_signed_change(in_process):
    service, client = in_process
    order = shopify_order(6302, order_id=7000006302, updated=now_iso(-60))
    deliver(client, order)
    assert deliver(client, {"id": 7000006302}, topic="orders/delete")[1]["outcome"] == "applied"
    assert client.lookup("6302", "new@example.com").status == 404
    # The same change again, under a new delivery id and another topic: not newer than the deletion.
    assert deliver(client, order, topic="orders/paid", delivery="late-retry")[1]["outcome"] in ("replayed", "stale")
    assert client.lookup("6302", "new@example.com").status == 404
    later = dict(order, updated_at=now_iso(), financial_status="refunded")  # a real later change: the order is back
    assert deliver(client, later)[1]["outcome"] == "applied"
    assert client.lookup("6302", "new@example.com").status == 200


def test_an_export_made_after_a_deletion_that_still_holds_the_order_wins(tmp_path):
    contexts = write(
        tmp_path / "contexts.toml",
        (ROOT / "contexts.toml").read_text().replace("export_lag_hours = 1", "export_lag_hours = 0"),
    )
    export = write(tmp_path / "data" / "orders.csv", orders_csv(5))
    os.utime(export, (time.time() - 600,) * 2)
    service = started(
        make_settings(export.parent, contexts, WOOCOMMERCE_WEBHOOK_SECRET=WOO_SECRET, STATE_DIR=str(tmp_path / "state"))
    )
    client = Client(app.create_app(service))
    order = woo_order(3, "customer3@example.com", "completed", modified=now_iso(-60))
    for topic, body in (("order.updated", order), ("order.deleted", {"id": 3})):
        data = json.dumps(body).encode()
        r = raw_post(
            client,
            "/webhooks/woocommerce",
            data,
            {"x-wc-webhook-topic": topic, "x-wc-webhook-signature": sign(WOO_SECRET, data)},
        )
        assert json.loads(r.body)["outcome"] == "applied"
    assert client.lookup("3", "customer3@example.com").status == 404
    time.sleep(1.1)
    write(export, orders_csv(5))  # made after the deletion, and order 3 is still in it (restored from the trash)
    assert service.reload()
    assert client.lookup("3", "customer3@example.com").status == 200
    service.stopped()


def test_a_body_sent_again_with_fresh_delivery_ids_is_stored_once_and_long_ids_are_refused(in_process):
    service, client = in_process
    order = shopify_order(6303)
    outcomes = [deliver(client, order, delivery=f"{n:04d}-" + "x" * 150)[1]["outcome"] for n in range(20)]
    assert outcomes == ["applied"] + ["replayed"] * 19
    status, answer = deliver(client, order, delivery="y" * 8000)
    assert status == 400 and "longer than 200" in answer["context"]
    with sqlite3.connect(service.settings.state / "webhooks.sqlite3") as db:
        assert db.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 2  # its body's hash, its first id


def test_the_remembered_deliveries_are_bounded_and_the_file_shrinks_back(tmp_path, monkeypatch):
    store = app.WebhookStore(tmp_path / "webhooks.sqlite3")
    monkeypatch.setattr(app, "MAX_DELIVERIES", 100)
    event = app.shopify_event(shopify_order(6304), "orders/updated")
    jobs = [store.apply(event, ("6304", "new@example.com"), [f"shopify:{n:06d}-{'z' * 190}"]) for n in range(4000)]
    assert {job.outcome for job in jobs} == {"applied"}  # the same order, as new each time: one row
    path = tmp_path / "webhooks.sqlite3"
    grown = path.stat().st_size + (tmp_path / "webhooks.sqlite3-wal").stat().st_size
    store.upkeep()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM deliveries").fetchone()[0] == 100
    assert path.stat().st_size + (tmp_path / "webhooks.sqlite3-wal").stat().st_size < grown / 4
    store.close()


@pytest.mark.parametrize(
    "header, link, status",
    [
        ("shop.myshopify.com", "https://shop.myshopify.com/1/orders/abc/authenticate?key=k", 200),
        ("other.myshopify.com", "https://other.myshopify.com/1/orders/abc/authenticate?key=k", 403),
        ("shop.myshopify.com", "https://other.myshopify.com/1/orders/abc/authenticate?key=k", 403),  # header forged
        (None, None, 403),
    ],
)
def test_a_pinned_shop_refuses_events_of_another_shop_that_shares_its_secret(
    tmp_path, contexts_file, header, link, status
):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    service = started(
        make_settings(
            export.parent,
            contexts_file,
            SHOPIFY_WEBHOOK_SECRET=SHOPIFY_SECRET,
            STATE_DIR=str(tmp_path / "state"),
            SHOP_DOMAIN="shop.myshopify.com",
        )
    )
    order = dict(shopify_order(6305), order_status_url=link)
    got, answer = deliver(Client(app.create_app(service)), order, shop_domain=header)
    assert got == status and (status == 200 or "another shop" in answer["context"])
    service.stopped()


def test_check_warns_when_a_webhook_secret_is_set_and_no_shop_is_pinned(tmp_path, contexts_file, capsys, monkeypatch):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    monkeypatch.setenv("SHOPIFY_WEBHOOK_SECRET", SHOPIFY_SECRET)
    monkeypatch.delenv("SHOP_DOMAIN", raising=False)
    assert app.main(["check", "--data", str(export), "--contexts", str(contexts_file)]) == 0
    out = capsys.readouterr().out
    assert "warning  SHOPIFY_WEBHOOK_SECRET is set but SHOP_DOMAIN is not" in out and SHOPIFY_SECRET not in out
    monkeypatch.setenv("SHOP_DOMAIN", "shop.myshopify.com")
    app.main(["check", "--data", str(export), "--contexts", str(contexts_file)])
    assert "SHOP_DOMAIN is not" not in capsys.readouterr().out


def test_purge_forgets_every_stored_event_of_an_address(in_process, capsys, monkeypatch):
    service, client = in_process
    assert send(client, shopify_order(6101, email="forget.me@example.com")).status == 200
    assert send(client, shopify_order(6102, email="keep.me@example.com")).status == 200
    assert client.lookup("6101", "forget.me@example.com").status == 200
    monkeypatch.setenv("STATE_DIR", str(service.settings.state))
    assert app.main(["purge", "Forget.Me@example.com"]) == 0
    out = capsys.readouterr().out
    assert "1 stored order of f***@example.com deleted" in out and "forget.me" not in out
    service.store.upkeep()  # what the store's writer does every minute: the running service forgets it
    assert client.lookup("6101", "forget.me@example.com").status == 404
    assert client.lookup("6102", "keep.me@example.com").status == 200
    service.store.close()
    stored = b"".join(p.read_bytes() for p in service.settings.state.glob("webhooks.sqlite3*"))
    assert b"forget.me" not in stored and b"keep.me" in stored  # no copy left in free pages or the log


def test_purge_refuses_what_is_no_address(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("STATE_DIR", str(tmp_path))
    assert app.main(["purge", "#1001"]) == 1
    assert "is not an e-mail address" in capsys.readouterr().err


def test_orders_from_events_are_kept_no_longer_than_webhook_days(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    service = started(
        make_settings(
            export.parent,
            contexts_file,
            SHOPIFY_WEBHOOK_SECRET=SHOPIFY_SECRET,
            STATE_DIR=str(tmp_path / "state"),
            WEBHOOK_DAYS="30",
        )
    )
    client = Client(app.create_app(service))
    assert send(client, shopify_order(6201)).status == 200
    with sqlite3.connect(service.settings.state / "webhooks.sqlite3") as db:  # received 31 days ago
        db.execute("UPDATE orders SET received = received - 31 * 86400")
    service.store.upkeep()
    assert client.lookup("6201", "new@example.com").status == 404
    assert json.loads(client.get("/healthz").body)["webhooks"]["shopify"]["orders_from_events"] == 0
    service.stopped()


def by_hand_examples():
    """The shell blocks of docs/WEBHOOKS.md's "Try it by hand", as a merchant copies them."""
    section = (ROOT / "docs" / "WEBHOOKS.md").read_text().split("### Try it by hand", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


@pytest.mark.parametrize(
    "block, order, says",
    [
        (by_hand_examples()[0], "5001", "Order #5001 was found and has shipped"),
        (by_hand_examples()[1], "5002", "Order 5002 was found"),
    ],
    ids=["shopify", "woocommerce"],
)
def test_the_documented_by_hand_event_is_accepted_and_answered(shop, block, order, says):
    import shutil
    import subprocess

    if not (shutil.which("openssl") and shutil.which("curl")):
        pytest.skip("the documented commands need openssl and curl")
    env = {
        **os.environ,
        "URL": shop.base,
        "KEY": KEY,
        "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET,
        "WOOCOMMERCE_WEBHOOK_SECRET": WOO_SECRET,
    }
    done = subprocess.run(["sh", "-c", block], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    stored, looked_up = [json.loads(line) for line in done.stdout.replace("}{", "}\n{").splitlines() if line.strip()]
    assert stored == {"stored": True, "outcome": "applied"}
    assert looked_up["context"].startswith(says)
