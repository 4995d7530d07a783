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

Behind real nginx from the shipped deploy/nginx/shared.conf (no `mirror`: each event goes to
one instance), on one machine in front of both instances and as two machines each in front of
its own (the file cut down by the command docs/DEPLOY.md gives): a signed event posted through
nginx is answered by both instances on their own ports, an upload is served by both, and
nginx's access log holds no key, secret, signature or email.

The deadlines are generous: how fast an instance follows is the benchmark's to measure.
Skipped, with the reason, where PostgreSQL's server programs or psycopg are missing, and the
nginx tests where nginx or openssl is.
"""

import contextlib
import http.client
import json
import re
import shutil
import ssl
import subprocess
import sys
import threading
import time

import pytest
from conftest import (
    KEY,
    PG_PASSWORD,
    ROOT,
    Served,
    free_port,
    make_certificate,
    nginx_missing,
    orders_csv,
    running_nginx,
    swap,
    upload,
    wait_for,
    write,
)
from test_replicas import Instance
from test_webhooks import SHOPIFY_SECRET, now_iso, shopify_headers, shopify_order

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
                headers=shopify_headers(body, delivery, topic, shop=SHOP),
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


class Asking(threading.Thread):
    """Lookups of an export order on an instance, one after another, until stopped: every status kept."""

    def __init__(self, instance):
        super().__init__(daemon=True)
        self.instance, self.statuses, self.stopping = instance, [], threading.Event()

    def run(self):
        while not self.stopping.is_set():
            self.statuses.append(self.instance.answer(7, "customer7@example.com")[0])

    def finish(self):
        self.stopping.set()
        self.join(30)
        return self.statuses


def delete(order_number):
    """Shopify's orders/delete body of an order from shopify_order: its id alone."""
    return {"id": 7000000000 + order_number}


def test_with_the_database_stopped_no_lookup_and_no_event_is_lost(pair, postgres):
    first, second = pair
    assert first.deliver(shopify_order(5402), "delivery-5402")[1]["outcome"] == "applied"
    wait_for(lambda: second.answer(5402)[0] == 200, FOLLOWED, "the order to be answered everywhere")
    asking = [Asking(first), Asking(second)]
    for loop in asking:
        loop.start()
    postgres.stop()
    try:
        status, body = first.deliver(shopify_order(5401), "delivery-5401")
        assert (status, body["outcome"]) == (200, "applied")  # durable in the spool: 200, the shop does not retry
        assert first.answer(5401)[0] == 200
        # A deletion of an order the spool does not hold waits there for the database: 200, not lost.
        status, body = first.deliver(delete(5402), "delivery-5402-deleted", topic="orders/delete")
        assert (status, body) == (200, {"stored": True, "outcome": "spooled"})
        wait_for(lambda: first.health()["status"] == "degraded", FOLLOWED, "/healthz to say degraded")
        health = first.health()
        assert any("cannot be reached" in reason for reason in health["reasons"])
        assert health["shared_database"] == {
            "url": first.env["DATABASE_URL"].replace("orders@", ""),
            "reachable": False,
        }
    finally:
        postgres.start()
    wait_for(lambda: second.answer(5401)[0] == 200, 60, "the spooled event to reach the other instance")
    for instance in (first, second):
        wait_for(lambda instance=instance: instance.answer(5402)[0] == 404, 60, "the spooled deletion everywhere")
    wait_for(lambda: first.health()["status"] == "ok", 60, "/healthz to be ok again")
    assert first.health()["shared_database"]["reachable"] is True
    for loop in asking:
        statuses = loop.finish()
        assert statuses and set(statuses) == {200}


def connect_as_owner(database):
    """A connection of our own to the test database, as its owner: to hold a lock or damage a row."""
    import psycopg

    url, _ = database
    return psycopg.connect(url, password=PG_PASSWORD, autocommit=True)


def test_a_database_that_keeps_a_delivery_waiting_costs_the_shop_no_timeout(pair, database):
    first, second = pair
    with connect_as_owner(database) as holder:
        holder.execute("SELECT pg_advisory_lock(%s)", (app.WRITE_LOCK,))  # as a stuck instance mid-write would
        started = time.monotonic()
        status, body = first.deliver(shopify_order(5701), "delivery-5701")
        assert (status, body["stored"]) == (200, True)
        assert time.monotonic() - started < 5  # Shopify's own deadline: past it, it counts a failure
        assert first.answer(5701)[0] == 200
    wait_for(lambda: second.answer(5701)[0] == 200, 60, "the spooled event to reach the other instance")


def test_a_change_that_cannot_be_read_is_passed_and_the_next_ones_still_arrive(pair, database):
    first, second = pair
    with connect_as_owner(database) as db:
        db.execute(
            "INSERT INTO changes (kind, platform, order_key, email_key, fields, time, received) "
            "VALUES ('put', 'shopify', 'bad', 'bad@example.com', 'not json', 0, 0)"
        )
    assert first.deliver(shopify_order(5801), "delivery-5801")[0] == 200
    wait_for(lambda: second.answer(5801)[0] == 200, FOLLOWED, "the change after the bad one")


def test_commands_of_another_shop_are_refused_on_the_database(tmp_path, database, pair):
    first, _ = pair
    assert first.deliver(shopify_order(5901), "delivery-5901")[0] == 200
    other = SharedInstance(tmp_path, "other", database, shop="other-shop.myshopify.com")
    for command in (["purge", "new@example.com"], ["lookup", "#5901", "new@example.com"]):
        done = subprocess.run(
            [sys.executable, str(ROOT / "app.py"), *command], env=other.env, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 1 and "holds the events of another shop" in done.stderr, done.stdout + done.stderr
    assert first.answer(5901)[0] == 200


def test_purge_forgets_an_address_on_every_instance(pair):
    first, second = pair
    assert first.deliver(shopify_order(5601, email="forget.me@example.com"), "delivery-5601")[0] == 200
    wait_for(lambda: second.answer(5601, "forget.me@example.com")[0] == 200, FOLLOWED, "the order everywhere")
    done = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "purge", "Forget.Me@example.com"],
        env=second.env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert "1 stored order of f***@example.com deleted from postgresql://" in done.stdout
    assert "forget.me" not in done.stdout + done.stderr
    for instance in (first, second):
        wait_for(
            lambda instance=instance: instance.answer(5601, "forget.me@example.com")[0] == 404,
            FOLLOWED,
            "every instance to forget the address",
        )


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
        ({"DATABASE_URL": "postgresql://orders@db/shop?pass%77ord=secret", "SHOP_DOMAIN": SHOP}, "holds a password"),
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


# nginx from deploy/nginx/shared.conf in front of the instances ##############################################

SHARED_CONF = ROOT / "deploy" / "nginx" / "shared.conf"


def documented_sed():
    """The sed expression docs/DEPLOY.md gives for two machines (each nginx in front of its own instance)."""
    guide = (ROOT / "docs" / "DEPLOY.md").read_text()
    command = re.search(r"sudo (sed -i '(/[^']+/d)' /etc/nginx/conf\.d/shared\.conf)", guide)
    assert command, "docs/DEPLOY.md no longer says how to cut shared.conf down to one instance per machine"
    assert command[1] in SHARED_CONF.read_text(), "shared.conf's header and docs/DEPLOY.md give different commands"
    return command[2]


def machine(folder, instances):
    """(site, https port, certificate) of one machine's nginx: shared.conf in front of its instances (one or two).

    With one, the file is cut down by the sed command docs/DEPLOY.md gives, run as written.
    """
    folder.mkdir()
    conf = folder / "shared.conf"
    shutil.copy(SHARED_CONF, conf)
    if len(instances) == 1:
        subprocess.run(["sed", "-i", documented_sed(), str(conf)], check=True)
        assert not [line for line in conf.read_text().splitlines() if "8082" in line.split("#", 1)[0]]
    site, (http_port, https_port), (cert, key) = conf.read_text(), (free_port(), free_port()), make_certificate(folder)
    for old, new in [
        *((f"127.0.0.1:{8081 + n}", f"127.0.0.1:{instance.port}") for n, instance in enumerate(instances)),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("/etc/letsencrypt/live/orders.example.com/fullchain.pem", str(cert)),
        ("/etc/letsencrypt/live/orders.example.com/privkey.pem", str(key)),
        ("/var/log/nginx/orders.log", str(folder / "access.log")),
        ("root /var/www/html;", f"root {folder};"),
    ]:
        site = swap(site, old, new, "deploy/nginx/shared.conf")
    return site, https_port, cert


def through(https_port, cert, method, path, body=None, headers=None, source="127.0.0.1"):
    """(status, body) of one request to a machine's nginx over TLS, from a chosen client address."""
    context = ssl.create_default_context(cafile=str(cert))
    connection = http.client.HTTPSConnection(
        "127.0.0.1", https_port, context=context, timeout=60, source_address=(source, 0)
    )
    try:
        connection.request(method, path, body=body, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@pytest.mark.skipif(bool(nginx_missing()), reason=str(nginx_missing()))
@pytest.mark.parametrize("machines", [1, 2], ids=["one machine, two instances", "two machines, one instance each"])
def test_nginx_from_shared_conf_passes_an_event_to_one_instance_and_both_answer_it(tmp_path, pair, machines):
    from test_replicas import UPLOAD_KEY

    first, second = pair
    layout = [pair] if machines == 1 else [[first], [second]]
    sites = [machine(tmp_path / f"machine-{n}", instances) for n, instances in enumerate(layout)]
    with contextlib.ExitStack() as running:
        for n, (site, https_port, _) in enumerate(sites):
            running.enter_context(running_nginx(tmp_path / f"machine-{n}", site, https_port))
        entry = sites[0][1:]  # where the shop, the tool and the chat platform come in

        body = json.dumps(shopify_order(5601, shipped=True)).encode()
        headers = shopify_headers(body, "delivery-5601", shop=SHOP)
        signature = headers["X-Shopify-Hmac-Sha256"]  # must not reach nginx's log (below)
        status, answer = through(*entry, "POST", "/webhooks/shopify", body, headers)
        assert status == 200 and json.loads(answer)["outcome"] == "applied", answer
        for instance in (first, second):  # one took it in, the other read it in the database
            wait_for(
                lambda instance=instance: "has shipped" in instance.answer(5601)[1],
                FOLLOWED,
                f"the {instance.name} instance to answer the event on its own port",
            )

        def delivered():
            """Deliveries the two instances logged between them."""
            return sum(instance.served.output.count("POST /webhooks/shopify") for instance in (first, second))

        wait_for(lambda: delivered() >= 1, what="the instance that took the event to log it")

        lookup = "/lookup?order_id=%237&customer_email=customer7%40example.com"
        assert through(*entry, "GET", lookup, headers={"x-api-key": KEY}, source="127.0.0.2")[0] == 200
        wait_for(
            lambda: any("127.0.0.2 GET /lookup 200" in i.served.output for i in (first, second)),
            what="an instance to log the real client address",
        )
        export = orders_csv(220, status="fulfilled").encode()
        status, answer = through(*entry, "PUT", "/export", export, {"x-upload-key": UPLOAD_KEY})
        assert status == 200 and json.loads(answer)["accepted"], answer
        for instance in (first, second):
            wait_for(
                lambda instance=instance: "has shipped" in instance.answer(220, "customer220@example.com")[1],
                FOLLOWED,
                f"the {instance.name} instance to serve the upload",
            )
        if machines == 2:  # the other machine's nginx answers the event too
            status, answer = through(
                *sites[1][1:],
                "GET",
                "/lookup?order_id=5601&customer_email=new%40example.com",
                headers={"x-api-key": KEY},
            )
            assert status == 200 and json.loads(answer)["context"].startswith("Order #5601 was found"), answer

    assert delivered() == 1  # one delivery and no copy: the other instance read the event in the database
    logs = [(tmp_path / f"machine-{n}" / "access.log").read_text() for n in range(machines)]
    assert all(f'"{request}" 200' in logs[0] for request in ("POST /webhooks/shopify", "PUT /export", "GET /lookup"))
    secrets = (KEY, UPLOAD_KEY, SHOPIFY_SECRET, signature, "@", "example.com", "customer7")
    leaked = [text for text in secrets for log in logs if text in log]
    assert not leaked, f"nginx's access log holds {leaked}"


@pytest.mark.parametrize("shipped, copies", [("replicas.conf", True), ("shared.conf", False)])
def test_only_replicas_conf_copies_webhooks_with_mirror(shipped, copies):
    # With the shared store an event reaches every instance through the database: a mirror
    # would only send each delivery twice.
    text = (ROOT / "deploy" / "nginx" / shipped).read_text()
    directives = [line.split("#", 1)[0].split() for line in text.splitlines()]
    assert any(words and words[0] in ("mirror", "mirror_request_body") for words in directives) is copies


def test_shared_conf_keeps_the_protections_of_replicas_conf():
    # TLS, the log format without the query string or any header, the body and header limits,
    # the client address replaced (never appended), the redirect to https.
    replicas, shared = ((ROOT / "deploy" / "nginx" / name).read_text() for name in ("replicas.conf", "shared.conf"))
    kept = [
        line.strip()
        for line in replicas.splitlines()
        if re.match(r"\s*(log_format|'|ssl_|access_log|client_|large_|proxy_set_header|listen|location /\.well)", line)
    ]
    assert kept and [line for line in kept if line not in shared] == []


def test_a_database_url_is_shown_without_its_user_also_with_several_hosts():
    assert app.shown_database("postgresql://orders@h1:5432,h2:5433/shop") == "postgresql://h1:5432,h2:5433/shop"
    assert app.shown_database("postgresql://orders@db.internal/shop?sslmode=verify-full") == (
        "postgresql://db.internal/shop"
    )
