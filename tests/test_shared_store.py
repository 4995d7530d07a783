"""Replicas that share one PostgreSQL (DATABASE_URL): every instance answers every event and every upload.

Two `python app.py` of one shop, each with its own data folder and STATE_DIR, on one database
of a real PostgreSQL cluster that the tests start from the system's programs (conftest's
`postgres`): an event delivered to one is answered by the other; one stopped during
deliveries catches up when it starts; a delivery sent to both is applied once; an older
event never overwrites a newer one; with the database stopped, lookups and deliveries go on
(the events spooled in STATE_DIR) and /healthz says why it is degraded, until the database
returns and every instance catches up; an upload to one is served by the other; an
instance of another shop refuses to start on the database; events held in the SQLite store
move into the database when DATABASE_URL is switched on.

The deadlines are generous: how fast an instance follows is the benchmark's to measure.
Skipped, with the reason, where PostgreSQL's server programs or psycopg are missing.
"""

import http.client
import json
import sys

import pytest
from conftest import KEY, ROOT, Served, orders_csv, upload, wait_for, write
from test_replicas import Instance
from test_webhooks import SHOPIFY_SECRET, now_iso, shopify_order, sign

import app

SHOP = "jsmith.myshopify.com"  # the shop the webhook fixture's order names
FOLLOWED = 20.0  # seconds: far above the second it takes, for a loaded CI machine


class SharedInstance(Instance):
    """One replica on the shared database: its own data folder (the same export) and STATE_DIR."""

    def __init__(self, tmp_path, name, database, shop=SHOP):
        data = tmp_path / f"data-{name}"
        write(data / "orders.csv", orders_csv(200))
        super().__init__(tmp_path, name, data)
        url, password_file = database
        self.env.update(DATABASE_URL=url, DATABASE_PASSWORD_FILE=str(password_file), SHOP_DOMAIN=shop)

    def deliver(self, order, delivery, topic="orders/updated"):
        """(status, JSON body) of a signed Shopify delivery straight to this instance."""
        body = json.dumps(order).encode()
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        try:
            connection.request(
                "POST",
                "/webhooks/shopify",
                body=body,
                headers={
                    "Content-Type": "application/json",
                    "X-Shopify-Topic": topic,
                    "X-Shopify-Hmac-Sha256": sign(SHOPIFY_SECRET, body),
                    "X-Shopify-Shop-Domain": SHOP,
                    "X-Shopify-Webhook-Id": delivery,
                },
            )
            response = connection.getresponse()
            return response.status, json.loads(response.read() or b"{}")
        finally:
            connection.close()

    def answer(self, number, email="new@example.com"):
        """(status, context) of a lookup on this instance's own port."""
        status, body = self.get(f"/lookup?order_id=%23{number}&customer_email={email.replace('@', '%40')}")
        return status, body.get("context", "")

    def health(self):
        """/healthz as a key holder reads it."""
        return self.get("/healthz")[1]


@pytest.fixture
def database(postgres):
    """A fresh database of the session's cluster: (DATABASE_URL without a password, the password's file)."""
    return postgres.new_database()


@pytest.fixture
def pair(tmp_path, database):
    """Two instances of one shop on one database, started."""
    first, second = SharedInstance(tmp_path, "first", database), SharedInstance(tmp_path, "second", database)
    try:
        yield first.start(), second.start()
    finally:
        first.close(), second.close()


def test_an_event_delivered_to_one_instance_is_answered_by_the_other(pair):
    first, second = pair
    assert second.answer(5001)[0] == 404
    status, body = first.deliver(shopify_order(5001), "delivery-5001")
    assert (status, body["outcome"]) == (200, "applied")
    wait_for(lambda: second.answer(5001)[0] == 200, FOLLOWED, "the second instance to answer the event")
    assert second.answer(5001)[1].startswith("Order #5001 was found")


def test_an_instance_stopped_during_deliveries_catches_up_when_it_starts(pair):
    first, second = pair
    second.stop()
    for number in (5101, 5102, 5103):
        assert first.deliver(shopify_order(number), f"delivery-{number}")[0] == 200
    second.start()
    wait_for(
        lambda: all(second.answer(number)[0] == 200 for number in (5101, 5102, 5103)),
        FOLLOWED,
        "the restarted instance to answer every event it missed",
    )


def test_the_same_delivery_sent_to_both_instances_is_applied_once(pair):
    first, second = pair
    order = shopify_order(5201)
    assert first.deliver(order, "delivery-5201")[1]["outcome"] == "applied"
    assert second.deliver(order, "delivery-5201")[1]["outcome"] == "replayed"
    assert second.deliver(order, "another-id-same-body")[1]["outcome"] == "replayed"  # the body's hash marks it too
    wait_for(lambda: second.answer(5201)[0] == 200, FOLLOWED, "the other instance to answer it")


def test_an_older_event_never_overwrites_a_newer_one(pair):
    first, second = pair
    newer = shopify_order(5301, shipped=True, updated=now_iso(0))
    older = shopify_order(5301, updated=now_iso(-600))
    assert first.deliver(newer, "delivery-5301-new")[1]["outcome"] == "applied"
    assert second.deliver(older, "delivery-5301-old")[1]["outcome"] == "stale"
    for instance in (first, second):
        wait_for(lambda instance=instance: "has shipped" in instance.answer(5301)[1], FOLLOWED, "the newer state")


def test_with_the_database_stopped_no_lookup_and_no_event_is_lost(pair, postgres):
    first, second = pair
    postgres.stop()
    try:
        assert first.answer(7, "customer7@example.com")[0] == 200  # the export still answers
        status, body = first.deliver(shopify_order(5401), "delivery-5401")
        assert (status, body["outcome"]) == (200, "applied")  # durable in the spool: 200, the shop does not retry
        assert first.answer(5401)[0] == 200
        wait_for(lambda: first.health()["status"] == "degraded", FOLLOWED, "/healthz to say degraded")
        assert any("cannot be reached" in reason for reason in first.health()["reasons"])
    finally:
        postgres.start()
    wait_for(lambda: second.answer(5401)[0] == 200, 60, "the spooled event to reach the other instance")
    wait_for(lambda: first.health()["status"] == "ok", 60, "/healthz to be ok again")


def test_an_export_uploaded_to_one_instance_is_served_by_the_other(pair):
    first, second = pair
    connection = http.client.HTTPConnection("127.0.0.1", first.port, timeout=60)
    from test_replicas import UPLOAD_KEY

    status, body = upload(connection, orders_csv(220, status="fulfilled").encode(), UPLOAD_KEY)
    assert status == 200 and body["accepted"], body
    wait_for(
        lambda: "has shipped" in second.answer(220, "customer220@example.com")[1],
        FOLLOWED,
        "the other instance to serve the upload",
    )


def test_a_refused_upload_changes_nothing_on_the_other_instance(pair):
    first, second = pair
    connection = http.client.HTTPConnection("127.0.0.1", first.port, timeout=60)
    from test_replicas import UPLOAD_KEY

    status, _ = upload(connection, orders_csv(3, status="fulfilled").encode(), UPLOAD_KEY)  # far fewer orders
    assert status == 422
    assert "has shipped" not in second.answer(2, "customer2@example.com")[1]
    assert second.health()["last_refused"] is None


def test_an_instance_of_another_shop_refuses_to_start_on_the_database(tmp_path, database, pair):
    other = SharedInstance(tmp_path, "other", database, shop="other-shop.myshopify.com")
    with Served([sys.executable, str(ROOT / "app.py")], other.env, tmp_path) as served:
        assert served.process.wait(30) == 1
    assert "holds the events of another shop (jsmith.myshopify.com)" in served.output
    assert "Traceback" not in served.output


def test_events_held_in_sqlite_move_into_the_database(tmp_path, database):
    alone = SharedInstance(tmp_path, "alone", database)
    for name in ("DATABASE_URL", "DATABASE_PASSWORD_FILE"):
        del alone.env[name]
    alone.start()
    try:
        assert alone.deliver(shopify_order(5501), "delivery-5501")[1]["outcome"] == "applied"
    finally:
        alone.close()
    alone.env.update(SharedInstance(tmp_path, "unused", database).env)
    alone.env.update(PORT=str(alone.port), STATE_DIR=str(alone.state), ORDERS_FILE=str(tmp_path / "data-alone"))
    other = SharedInstance(tmp_path, "other", database)
    try:
        alone.start()
        other.start()
        wait_for(lambda: other.answer(5501)[0] == 200, FOLLOWED, "the event moved in to reach another instance")
    finally:
        alone.close(), other.close()


@pytest.mark.parametrize(
    "env, says",
    [
        ({"DATABASE_URL": "postgresql://orders:secret@db/shop", "SHOP_DOMAIN": SHOP}, "holds a password"),
        ({"DATABASE_URL": "postgresql://orders@db/shop?password=secret", "SHOP_DOMAIN": SHOP}, "holds a password"),
        ({"DATABASE_URL": "mysql://orders@db/shop", "SHOP_DOMAIN": SHOP}, "give a PostgreSQL URL"),
        ({"DATABASE_URL": "postgresql://orders@db/shop"}, "needs SHOP_DOMAIN"),
        (
            {"DATABASE_URL": "postgresql://orders@db/shop", "SHOP_DOMAIN": SHOP, "DATABASE_PASSWORD_FILE": "/nowhere"},
            "DATABASE_PASSWORD_FILE=/nowhere: cannot be read",
        ),
    ],
)
def test_database_settings_that_would_leak_or_cannot_work_are_refused(env, says):
    with pytest.raises(app.SettingsError, match=says) as refused:
        app.settings_from({}, {"API_KEY": KEY, **env})
    assert "secret" not in str(refused.value)
