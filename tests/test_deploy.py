"""The shipped nginx config in front of the service started as deployed: TLS, client addresses, reloads.

Skipped where nginx or openssl is missing; .ci/run installs nginx. The nginx helpers are in conftest.py,
shared with tests/test_replicas.py.
"""

import http.client
import json
import os
import shutil
import ssl
import subprocess
import sys
import time

import pytest
from conftest import (
    CADDY,
    KEY,
    ROOT,
    Served,
    free_port,
    make_certificate,
    nginx_missing,
    orders_csv,
    running_caddy,
    running_nginx,
    upload,
    wait_for,
    write,
)
from conftest import swap as swap_in

SHIPPED = ROOT / "deploy" / "nginx" / "orders.conf"
UPLOAD_KEY = "upl-deploy-test-key-4hT9wQ2xZ7"
SHOPIFY_SECRET = "shpss-deploy-Tq7vX2mZp9LrT4wN8c"
WOO_SECRET = "wc-deploy-Kd8sJ3nQ7xV2pL9mR4tB6"


def swap(text, old, new):
    """Replace a string deploy/nginx/orders.conf must contain; fail loudly if it drifted."""
    return swap_in(text, old, new, "deploy/nginx/orders.conf")


@pytest.fixture
def deployed(tmp_path):
    """The service as deployed (app.py, trusted proxy) behind nginx from the shipped config."""
    if nginx_missing():
        pytest.skip(nginx_missing())
    data = tmp_path / "data"
    write(data / "orders.csv", orders_csv(200))
    app_port, http_port, https_port = free_port(), free_port(), free_port()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(app_port),
        "ORDERS_FILE": str(data),
        "CONTEXTS_FILE": str(ROOT / "contexts.toml"),
        "TRUSTED_PROXY": "127.0.0.1",
        "TRUSTED_PROXY_HEADERS": "x-forwarded-for x-forwarded-proto",
        "SETTLE_SECONDS": "0.1",
        "UPLOAD_KEY": UPLOAD_KEY,
        "STATE_DIR": str(tmp_path / "state"),
        "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET,
        "WOOCOMMERCE_WEBHOOK_SECRET": WOO_SECRET,
    }
    cert, key = make_certificate(tmp_path)
    site = SHIPPED.read_text()
    site = swap(site, "server 127.0.0.1:8080;", f"server 127.0.0.1:{app_port};")
    site = swap(site, "listen 80;", f"listen 127.0.0.1:{http_port};")
    site = swap(site, "listen 443 ssl http2;", f"listen 127.0.0.1:{https_port} ssl http2;")
    site = swap(site, "/etc/letsencrypt/live/orders.example.com/fullchain.pem", str(cert))
    site = swap(site, "/etc/letsencrypt/live/orders.example.com/privkey.pem", str(key))
    site = swap(site, "/var/log/nginx/orders.log", str(tmp_path / "access.log"))
    site = swap(site, "root /var/www/html;", f"root {tmp_path};")
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as service:
        service.wait_for("INFO serving ")
        with running_nginx(tmp_path, site, https_port):
            context = ssl.create_default_context(cafile=str(cert))
            yield type(
                "Deployed",
                (),
                {
                    "https": https_port,
                    "http": http_port,
                    "context": context,
                    "service": service,
                    "data": data,
                    "tmp": tmp_path,
                },
            )


def lookup(deployed, order=1, source="127.0.0.1"):
    """(status, headers, body) of a lookup through nginx over TLS, from a chosen client address."""
    connection = http.client.HTTPSConnection(
        "127.0.0.1", deployed.https, context=deployed.context, timeout=5, source_address=(source, 0)
    )
    try:
        connection.request(
            "GET",
            f"/lookup?order_id=%23{order}&customer_email=customer{order}%40example.com",
            headers={"x-api-key": KEY},
        )
        response = connection.getresponse()
        return response.status, response.headers, response.read()
    finally:
        connection.close()


def test_lookups_through_nginx_over_tls(deployed):
    status, headers, body = lookup(deployed, 7)
    assert status == 200 and headers.get_content_type() == "application/json"
    assert json.loads(body)["context"].startswith("Order #7 was found")


def test_the_service_logs_the_real_client_address(deployed):
    assert lookup(deployed, 8, source="127.0.0.2")[0] == 200
    deployed.service.wait_for("127.0.0.2 GET /lookup 200")


def test_nginx_logs_no_emails_keys_or_signatures(deployed):
    lookup(deployed, 9)
    secrets = secret_bearing_requests(deployed.https, deployed.context)
    wait_for(
        lambda: (deployed.tmp / "access.log").exists() and (deployed.tmp / "access.log").read_text().count("\n") >= 6,
        what="nginx's access log",
    )
    text = (deployed.tmp / "access.log").read_text()
    assert '"GET /lookup" 200' in text and '"PUT /export" 200' in text and '"POST /webhooks/shopify" 200' in text
    assert "customer9" not in text and "example.com" not in text
    assert not [secret for secret in secrets if secret in text]


def test_plain_http_is_sent_to_https(deployed):
    connection = http.client.HTTPConnection("127.0.0.1", deployed.http, timeout=5)
    connection.request("GET", "/lookup")
    response = connection.getresponse()
    assert response.status == 301 and response.headers["Location"].startswith("https://")


def test_lookups_answer_while_the_export_reloads(deployed):
    write(deployed.data / ".next.csv", orders_csv(40_000, status="fulfilled"))
    os.replace(deployed.data / ".next.csv", deployed.data / "orders.csv")
    statuses = []
    deadline = time.monotonic() + 60
    while "40,000 orders" not in deployed.service.output and time.monotonic() < deadline:
        statuses.append(lookup(deployed, 5)[0])
    assert "40,000 orders" in deployed.service.output, deployed.service.output[-2000:]
    assert statuses and set(statuses) == {200}
    assert b"has shipped" in lookup(deployed, 5)[2]


def test_an_export_of_several_megabytes_is_uploaded_through_nginx(deployed):
    body = orders_csv(60_000, status="fulfilled").encode()  # about 4 MB: far past the 64 KB of other requests
    connection = http.client.HTTPSConnection("127.0.0.1", deployed.https, context=deployed.context, timeout=60)
    status, answer = upload(connection, body, UPLOAD_KEY)
    assert status == 200 and answer["accepted"] is True and answer["orders"] == 60_000, answer
    assert b"has shipped" in lookup(deployed, 59_999)[2]


@pytest.mark.skipif(shutil.which("caddy") is None, reason="caddy is not installed (apt-get install caddy)")
def test_the_shipped_caddyfile_is_valid():
    result = subprocess.run(
        ["caddy", "validate", "--config", str(ROOT / "deploy" / "Caddyfile"), "--adapter", "caddyfile"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Valid configuration" in result.stdout + result.stderr


def secret_bearing_requests(port, context):
    """A lookup, an upload, a webhook of each platform and a signed-in /metrics through a proxy on port.

    Returns every secret and email they carried, none of which may reach the proxy's log.
    """
    from base64 import b64encode

    from test_webhooks import shopify_order, sign, woo_order

    def send(method, path, body=b"", headers=None):
        connection = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        try:
            connection.request(method, path, body=body, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    shopify_body = json.dumps(shopify_order(5001, email="hooked@example.com")).encode()
    woo_body = json.dumps(woo_order(5002, "woo@example.com", "completed")).encode()
    basic = b64encode(f"prometheus:{KEY}".encode()).decode()
    assert (
        send("GET", "/lookup?order_id=%231&customer_email=customer1%40example.com", headers={"x-api-key": KEY})[0]
        == 200
    )
    assert send("PUT", "/export", orders_csv(200, status="fulfilled").encode(), {"x-upload-key": UPLOAD_KEY})[0] == 200
    assert (
        send(
            "POST",
            "/webhooks/shopify",
            shopify_body,
            {
                "X-Shopify-Topic": "orders/updated",
                "X-Shopify-Hmac-Sha256": sign(SHOPIFY_SECRET, shopify_body),
                "X-Shopify-Webhook-Id": "a1b2c3d4-0000-4000-8000-000000000001",
                "Content-Type": "application/json",
            },
        )[0]
        == 200
    )
    assert (
        send(
            "POST",
            "/webhooks/woocommerce",
            woo_body,
            {
                "X-WC-Webhook-Topic": "order.updated",
                "X-WC-Webhook-Signature": sign(WOO_SECRET, woo_body),
                "X-WC-Webhook-Delivery-ID": "77",
                "Content-Type": "application/json",
            },
        )[0]
        == 200
    )
    assert send("GET", "/metrics", headers={"Authorization": f"Basic {basic}"})[0] == 200
    return [
        KEY,
        UPLOAD_KEY,
        SHOPIFY_SECRET,
        WOO_SECRET,
        sign(SHOPIFY_SECRET, shopify_body),
        sign(WOO_SECRET, woo_body),
        basic,
        "customer1",
        "hooked@example.com",
        "woo@example.com",
    ]


@pytest.mark.skipif(CADDY is None, reason="caddy is not installed (apt-get install caddy; .ci/run does)")
@pytest.mark.parametrize("shipped", ["Caddyfile", "Caddyfile.shops"])
def test_caddy_logs_no_key_secret_signature_or_email(tmp_path, shipped):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    data = tmp_path / "data"
    write(data / "orders.csv", orders_csv(50))
    app_port, https_port = free_port(), free_port()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(app_port),
        "ORDERS_FILE": str(data),
        "CONTEXTS_FILE": str(ROOT / "contexts.toml"),
        "STATE_DIR": str(tmp_path / "state"),
        "TRUSTED_PROXY": "127.0.0.1",
        "SETTLE_SECONDS": "0.1",
        "UPLOAD_KEY": UPLOAD_KEY,
        "SHOPIFY_WEBHOOK_SECRET": SHOPIFY_SECRET,
        "WOOCOMMERCE_WEBHOOK_SECRET": WOO_SECRET,
    }
    cert, key = make_certificate(tmp_path)
    text = (ROOT / "deploy" / shipped).read_text()
    site = f"https://127.0.0.1:{https_port} {{\n\ttls {cert} {key}\n"
    if shipped == "Caddyfile":
        text = swap_in(text, "orders.example.com {\n", site, shipped)
        text = swap_in(text, "127.0.0.1:8080", f"127.0.0.1:{app_port}", shipped)
        text = swap_in(text, "/var/log/caddy/orders.log", str(tmp_path / "orders.log"), shipped)
    else:
        sites = text[text.index("shop-a.orders.example.com {") :]
        text = swap_in(text, sites, f"{site}\timport orders shop-a {app_port}\n}}\n", shipped)
        text = swap_in(text, "/var/log/caddy/orders-{args.0}.log", str(tmp_path / "orders-{args.0}.log"), shipped)
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as service:
        service.wait_for("INFO serving ")
        with running_caddy(tmp_path, text, https_port):
            secrets = secret_bearing_requests(https_port, ssl.create_default_context(cafile=str(cert)))
            log = tmp_path / ("orders.log" if shipped == "Caddyfile" else "orders-shop-a.log")
            wait_for(lambda: log.exists() and log.read_text().count("\n") >= 5, what="caddy's access log")
    text = log.read_text()
    assert '"uri":"/export"' in text and '"uri":"/webhooks/shopify"' in text  # the requests were logged
    leaked = [secret for secret in secrets if secret in text]
    assert not leaked, f"{shipped}: the access log holds {leaked}"
