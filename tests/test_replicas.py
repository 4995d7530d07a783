"""Replicas behind the shipped deploy/nginx/replicas.conf: no single instance is a point of failure.

Two `python app.py` as deployed (one shared data folder, a STATE_DIR each, the same keys and
webhook secret) behind real nginx over TLS, from the shipped file with only the ports, the
certificate and log paths swapped:

- an instance stopped in the middle of a load of lookups (terminated, as systemd stops it)
  costs no lookup: nginx passes each request it could not answer to the other instance; one
  killed (a crash) costs at most the answers it was in the middle of writing; both restarted
  one after the other as docs/DEPLOY.md says cost none;
- a signed Shopify event posted to nginx reaches both instances (the first by proxy, the
  second by `mirror`), and each answers the new order on its own port;
- an export uploaded through nginx reaches one instance, which writes it into the shared
  folder, where the other finds it;
- Prometheus scrapes each instance at its own path through nginx, never the two in turn;
- with the first instance down, the event gets 502, which makes the shop send it again,
  the second has it already, and the shop's retry (the same delivery id) brings it to the
  first once that is back, while the second applies it only once.

Skipped where nginx or openssl is missing; .ci/run installs nginx.
"""

import http.client
import json
import os
import re
import signal
import ssl
import sys
import threading
import time

import pytest
from conftest import (
    KEY,
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
from test_webhooks import SHOPIFY_SECRET, shopify_headers, shopify_order

SHIPPED = ROOT / "deploy" / "nginx" / "replicas.conf"
ORDERS = 200  # orders in the shared export: #1 ... #200, customerN@example.com
UPLOAD_KEY = "upl-replicas-test-key-8Jd2Qx5Lm9"


class Instance:
    """One replica: python app.py on the shared data folder, with a port and a STATE_DIR of its own."""

    def __init__(self, tmp_path, name, data):
        self.name, self.port, self.state, self.tmp = name, free_port(), tmp_path / f"state-{name}", tmp_path
        self.env = {
            **os.environ,
            "API_KEY": KEY,
            "PORT": str(self.port),
            "ORDERS_FILE": str(data),
            "STATE_DIR": str(self.state),
            "CONTEXTS_FILE": str(ROOT / "contexts.toml"),
            "TRUSTED_PROXY": "127.0.0.1",
            "TRUSTED_PROXY_HEADERS": "x-forwarded-for x-forwarded-proto",
            "SETTLE_SECONDS": "0.1",
            "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET,
            "UPLOAD_KEY": UPLOAD_KEY,
        }
        self.served = None

    def start(self):
        self.served = Served([sys.executable, str(ROOT / "app.py")], self.env, self.tmp).__enter__()
        self.served.wait_for("INFO serving ")
        return self

    def stop(self, how=signal.SIGTERM):
        """Stop the process as systemd (SIGTERM) or a crash (SIGKILL) would, and wait for it to be gone."""
        self.served.process.send_signal(how)
        self.served.process.wait(10)
        self.close()

    def close(self):
        if self.served:
            self.served.__exit__(None, None, None)
            self.served = None

    def get(self, path):
        """(status, JSON body) of a GET straight to this instance, with the API key."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            connection.request("GET", path, headers={"x-api-key": KEY})
            response = connection.getresponse()
            return response.status, json.loads(response.read())
        finally:
            connection.close()


@pytest.fixture
def replicas(tmp_path):
    """Two instances on one data folder, behind nginx from deploy/nginx/replicas.conf."""
    if nginx_missing():
        pytest.skip(nginx_missing())
    data = tmp_path / "data"
    write(data / "orders.csv", orders_csv(ORDERS))
    first, second = Instance(tmp_path, "first", data), Instance(tmp_path, "second", data)
    http_port, https_port = free_port(), free_port()
    cert, key = make_certificate(tmp_path)
    site = SHIPPED.read_text()
    for old, new in [
        ("127.0.0.1:8081", f"127.0.0.1:{first.port}"),
        ("127.0.0.1:8082", f"127.0.0.1:{second.port}"),
        ("listen 80;", f"listen 127.0.0.1:{http_port};"),
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;"),
        ("/etc/letsencrypt/live/orders.example.com/fullchain.pem", str(cert)),
        ("/etc/letsencrypt/live/orders.example.com/privkey.pem", str(key)),
        ("/var/log/nginx/orders.log", str(tmp_path / "access.log")),
        ("root /var/www/html;", f"root {tmp_path};"),
    ]:
        site = swap(site, old, new, "deploy/nginx/replicas.conf")
    try:
        first.start(), second.start()
        with running_nginx(tmp_path, site, https_port):
            context = ssl.create_default_context(cafile=str(cert))
            yield type(
                "Replicas",
                (),
                {"first": first, "second": second, "https": https_port, "context": context, "tmp": tmp_path},
            )
    finally:
        first.close(), second.close()


def connect(replicas):
    return http.client.HTTPSConnection("127.0.0.1", replicas.https, context=replicas.context, timeout=10)


class Load(threading.Thread):
    """Looks orders up through nginx over one kept-alive TLS connection, again and again; records every failure.

    A failure is anything but 200 with the order's own answer: another status, a wrong
    body, a broken connection.
    """

    def __init__(self, replicas, offset):
        super().__init__(daemon=True)
        self.replicas, self.order = replicas, offset
        self.stopping, self.count, self.failures = threading.Event(), 0, []

    def run(self):
        connection = connect(self.replicas)
        while not self.stopping.is_set():
            self.order = self.order % ORDERS + 1
            try:
                connection.request(
                    "GET",
                    f"/lookup?order_id=%23{self.order}&customer_email=customer{self.order}%40example.com",
                    headers={"x-api-key": KEY},
                )
                response = connection.getresponse()
                status, body = response.status, response.read()
                if status != 200 or not json.loads(body)["context"].startswith(f"Order #{self.order} was found"):
                    self.failures.append((self.order, status, body[:200]))
            except Exception as e:
                self.failures.append((self.order, repr(e)))
                connection.close()
                connection = connect(self.replicas)
            self.count += 1
        connection.close()


def served_lookups(instance):
    return instance.served.output.count("GET /lookup 200")


def under_load(replicas, action):
    """Failures (and the count) of lookups through nginx from 4 connections, while action stops instances."""
    loads = [Load(replicas, offset) for offset in (0, 50, 100, 150)]
    for load in loads:
        load.start()
    try:
        # Both instances answer before one stops: otherwise stopping one would prove nothing.
        wait_for(
            lambda: served_lookups(replicas.first) >= 20 and served_lookups(replicas.second) >= 20,
            timeout=30,
            what="lookups through nginx to reach both instances",
        )
        action()
        stopped_at = sum(load.count for load in loads)
        # Counted, not timed: a slow machine only takes longer.
        wait_for(
            lambda: sum(load.count for load in loads) >= stopped_at + 400,
            timeout=60,
            what="400 lookups after the instance stopped",
        )
    finally:
        for load in loads:
            load.stopping.set()
            load.join(15)
    return [failure for load in loads for failure in load.failures], sum(load.count for load in loads)


def test_no_lookup_fails_while_an_instance_stops(replicas):
    # SIGTERM, as systemd stops or restarts it: the instance finishes the answers it is
    # writing; a request it had not started is refused or cut off with nothing sent, and
    # nginx passes it to the other instance.
    failures, count = under_load(replicas, lambda: replicas.first.stop(signal.SIGTERM))
    assert failures == [], f"{len(failures)} of {count} lookups failed: {failures[:5]}"


def test_a_crashed_instance_cuts_at_most_the_answers_it_was_writing(replicas):
    # SIGKILL, as a crash or the kernel's out-of-memory killer: nginx routes around the
    # dead instance (no 502, no lookup lost after it), but an answer whose header the
    # instance had sent and whose body it had not (waitress sends them apart) reaches the
    # client cut short: nginx has passed the header on and cannot ask the other instance.
    # At most one such answer per connection in flight (4).
    failures, count = under_load(replicas, lambda: replicas.first.stop(signal.SIGKILL))
    assert len(failures) <= 4, f"{len(failures)} of {count} lookups failed: {failures[:5]}"
    assert all("IncompleteRead" in str(failure) for failure in failures), failures


def test_both_restarted_one_after_the_other_as_documented_cost_no_lookup(replicas):
    # docs/DEPLOY.md: restart one, wait until it answers /livez, wait longer than nginx leaves
    # a failed instance alone (fail_timeout), restart the other. Restarted at once, every
    # lookup fails until fail_timeout has passed: nginx has no instance it believes is up.
    guide = (ROOT / "docs" / "DEPLOY.md").read_text()
    pause = int(re.search(r"&& sleep (\d+) && sudo systemctl restart orders@shop-a-2", guide)[1])
    fail_timeouts = {int(t) for t in re.findall(r"fail_timeout=(\d+)s", SHIPPED.read_text())}
    assert fail_timeouts and pause > max(fail_timeouts), (pause, fail_timeouts)

    def restart_both():
        replicas.first.stop()
        replicas.first.start()  # returns once it serves, as /livez would say
        time.sleep(pause)
        replicas.second.stop()
        replicas.second.start()

    failures, count = under_load(replicas, restart_both)
    assert failures == [], f"{len(failures)} of {count} lookups failed: {failures[:5]}"


def post_event(replicas, order, delivery):
    """(status, body) of a signed Shopify orders/create delivery posted to nginx, as Shopify sends it."""
    body = json.dumps(order).encode()
    connection = connect(replicas)
    try:
        connection.request(
            "POST",
            "/webhooks/shopify",
            body=body,
            headers=shopify_headers(body, delivery, "orders/create"),
        )
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def answers(instance, number):
    """The status an instance, asked on its own port, gives a lookup of the order from the event."""
    return instance.get(f"/lookup?order_id=%23{number}&customer_email=new%40example.com")[0]


def test_a_webhook_posted_to_nginx_reaches_every_instance(replicas):
    for instance in (replicas.first, replicas.second):
        assert answers(instance, 5001) == 404
    status, body = post_event(replicas, shopify_order(5001, shipped=True), "delivery-5001")
    assert status == 200 and json.loads(body)["outcome"] == "applied", body
    assert answers(replicas.first, 5001) == 200  # the first answered the shop: it has stored the event
    # The second's copy is sent alongside; its answer goes nowhere, so wait for it.
    wait_for(lambda: answers(replicas.second, 5001) == 200, what="the second instance to answer order #5001")
    status, body = replicas.second.get("/lookup?order_id=5001&customer_email=new%40example.com")
    assert body["context"].startswith("Order #5001 was found and has shipped")


def test_with_the_first_instance_down_the_shops_retry_reaches_it(replicas):
    replicas.first.stop()
    order = shopify_order(5002)
    status, _ = post_event(replicas, order, "delivery-5002")
    assert status == 502  # not 200: the shop keeps the event and sends it again
    wait_for(lambda: answers(replicas.second, 5002) == 200, what="the second instance to get its copy")

    replicas.first.start()  # its port, its STATE_DIR: as systemd restarts it
    assert answers(replicas.first, 5002) == 404
    status, body = post_event(replicas, order, "delivery-5002")  # Shopify's retry: the same delivery id
    assert status == 200 and json.loads(body)["outcome"] == "applied", body
    assert answers(replicas.first, 5002) == 200

    def second_saw_the_retry():
        return replicas.second.get("/healthz")[1]["webhooks"]["shopify"]["received"] == 2

    wait_for(second_saw_the_retry, what="the retry's copy to reach the second instance")
    assert replicas.second.get("/healthz")[1]["webhooks"]["shopify"]["applied"] == 1  # recognised, applied once


def test_an_export_uploaded_through_nginx_is_served_by_every_instance(replicas):
    body = orders_csv(ORDERS + 10, status="fulfilled").encode()
    status, answer = upload(connect(replicas), body, UPLOAD_KEY)
    assert status == 200 and answer["orders"] == ORDERS + 10, answer
    order = ORDERS + 5  # only in the upload
    for instance in (replicas.first, replicas.second):  # one took it in, the other read it from the folder
        wait_for(
            lambda instance=instance: (
                instance.get(f"/lookup?order_id={order}&customer_email=customer{order}%40example.com")[0] == 200
            ),
            timeout=20,
            what=f"the {instance.name} instance to serve the upload",
        )


def test_prometheus_scrapes_each_instance_at_its_own_path(replicas):
    import base64

    authorization = {"Authorization": "Basic " + base64.b64encode(f"prometheus:{KEY}".encode()).decode()}

    def scrape(path):
        connection = connect(replicas)
        try:
            connection.request("GET", path, headers=authorization)
            response = connection.getresponse()
            return response.status, response.read().decode()
        finally:
            connection.close()

    started = {}
    for _ in range(3):  # the same instance at each path, every time
        for path in ("/replica/1/metrics", "/replica/2/metrics"):
            status, text = scrape(path)
            assert status == 200
            started.setdefault(path, set()).add(re.search(r"^process_start_time_seconds (\S+)$", text, re.M)[1])
    assert all(len(times) == 1 for times in started.values()) and len(set.union(*started.values())) == 2
    assert scrape("/metrics")[0] == 404  # through the shared upstream it would alternate
