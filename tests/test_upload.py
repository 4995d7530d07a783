"""The export pushed by upload: PUT /export (or POST, raw or as a form's file), over real HTTP to
`python app.py`, checked as `check` checks it before anything served changes.
"""

import json
import os
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request

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
    write,
)
from conftest import (
    lookup_over_http as lookup,
)

import app

UPLOAD_KEY = "upl-Wq4zV8nX2rT6mK9pL3sB"


def send(url, body, key=UPLOAD_KEY, method="PUT", content_type="text/csv", timeout=60):
    headers = {"Content-Type": content_type}
    if key is not None:
        headers["x-upload-key"] = key
    request = urllib.request.Request(f"{url}/export", data=body, headers=headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    """python app.py with an upload key, serving 40 orders."""
    root = tmp_path_factory.mktemp("upload")
    write(root / "data" / "orders.csv", orders_csv(40))
    contexts = write(root / "contexts.toml", (ROOT / "contexts.toml").read_text())
    port = free_port()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "UPLOAD_KEY": UPLOAD_KEY,
        "PORT": str(port),
        "ORDERS_FILE": str(root / "data"),
        "CONTEXTS_FILE": str(contexts),
        "STATE_DIR": str(root / "state"),
        "MAX_EXPORT_MB": "5",
        "SETTLE_SECONDS": "0.1",
    }
    with Served([sys.executable, str(ROOT / "app.py")], env, root) as served:
        served.wait_for("INFO serving ")
        served.url, served.data = f"http://127.0.0.1:{port}", root / "data"
        yield served


def test_a_good_file_gets_200_with_the_check_summary_and_is_then_served(shop):
    status, body = send(shop.url, orders_csv(42, status="fulfilled").encode())
    answer = json.loads(body)
    assert status == 200 and answer["accepted"] and answer["orders"] == 42 and answer["rows"] == 84
    assert answer["layout"] == "Shopify orders export" and answer["answers"] == {"shipped": 42}
    assert answer["file"] == "uploaded.csv" and isinstance(answer["warnings"], list)
    assert "has shipped" in lookup(shop.url, "#42", "customer42@example.com")[1]["context"]
    shop.wait_for("bytes: accepted as uploaded.csv (42 orders)", timeout=5)  # through a pipe: it may come later


@pytest.mark.parametrize(
    "body, says",
    [
        (orders_csv(42).encode()[:-300], "looks cut off"),
        (orders_csv(5).encode(), "holds 5 orders, fewer than 50%"),
        (b"<!DOCTYPE html><html>Sign in</html>", "is a web page"),
        (b"", "is empty"),
    ],
)
def test_a_bad_file_gets_422_and_changes_nothing(shop, body, says):
    before = lookup(shop.url, "#1", "customer1@example.com")
    status, answer = send(shop.url, body)
    reason = json.loads(answer)["reason"]
    assert status == 422 and not json.loads(answer)["accepted"] and says in reason
    assert ".uploading" not in reason and (reason.startswith("the upload") or not body)  # no name the sender never gave
    assert lookup(shop.url, "#1", "customer1@example.com") == before
    assert not [p for p in shop.data.iterdir() if p.name.startswith(".uploading")]
    assert f"upload: {len(body)} bytes: refused, still serving" in shop.output  # its size and outcome, no contents


@pytest.mark.parametrize("key", [KEY, None, "", "upl-wrong-key-000000000000"])
def test_the_lookup_key_or_no_key_gets_401(shop, key):
    sent = orders_csv(43).encode()
    status, body = send(shop.url, sent, key=key)
    assert status == 401 and body == b""
    # The line is written before the answer, but reaches the test through a pipe and a reading thread.
    shop.wait_for(f"upload: {len(sent)} bytes: refused, a wrong or missing x-upload-key", timeout=5)


@pytest.mark.parametrize("key, length", [(UPLOAD_KEY, 6_800_000), ("upl-wrong-key-000000000000", 70_000)])
def test_a_body_over_the_cap_gets_413_before_it_is_sent(shop, key, length):
    # As curl does with a large body (Expect: 100-continue): the headers first, the answer before the body.
    import socket

    port = int(shop.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(
            f"PUT /export HTTP/1.1\r\nHost: x\r\nx-upload-key: {key}\r\nContent-Type: text/csv\r\n"
            f"Content-Length: {length}\r\n\r\n".encode()
        )
        head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 413") and b"application/json" in head  # MAX_EXPORT_MB=5; 64 KB without the key
    assert lookup(shop.url, "#1", "customer1@example.com")[0] == 200


def test_post_with_the_file_as_a_form_field_is_accepted_too(shop):
    boundary = "----order-lookup-test"
    body = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="orders.csv"\r\n'
        f"Content-Type: text/csv\r\n\r\n{orders_csv(44)}\r\n--{boundary}--\r\n"
    ).encode()
    status, answer = send(shop.url, body, method="POST", content_type=f"multipart/form-data; boundary={boundary}")
    assert status == 200 and json.loads(answer)["orders"] == 44


def documented_commands():
    """The shell blocks of docs/UPDATING.md's "Pushed" section, as a merchant copies them."""
    import re

    section = (ROOT / "docs" / "UPDATING.md").read_text().split("### Pushed", 1)[1].split("\n### ", 1)[0]
    blocks = [textwrap.dedent(b) for b in re.findall(r"```sh\n(.*?)```", section, re.S)]
    blocks = [b.split("\n", 1)[1] if b.startswith("#!") else b for b in blocks]  # the cron script: its body
    return [b for b in blocks if "curl" in b]


@pytest.mark.parametrize("command", documented_commands(), ids=["fail-with-body", "older-curl", "cron-script"])
def test_the_documented_upload_commands_upload_and_print_a_refusals_reason(shop, tmp_path, command):
    import shutil
    import subprocess

    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    if (
        "--fail-with-body" in command
        and "fail-with-body" not in subprocess.run(["curl", "--help", "all"], capture_output=True, text=True).stdout
    ):
        pytest.skip("this curl is older than 7.76 (no --fail-with-body)")
    script = (
        command.replace("https://orders.example.com", shop.url)
        .replace('$(cat "$HOME/.orders-upload-key")', "$UPLOAD_KEY")
        .replace("exec curl", "curl")
    )

    def run(name, text):
        file = write(tmp_path / name, text)
        body = script.replace("orders.csv", str(file))  # the cron script takes the file as its argument, $1
        return subprocess.run(
            ["sh", "-c", body, "push-orders", str(file)],
            env={**os.environ, "UPLOAD_KEY": UPLOAD_KEY},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        )

    done = run("orders.csv", orders_csv(45))
    assert done.returncode == 0 and '"accepted": true' in done.stdout and '"orders": 45' in done.stdout
    refused = run("cut.csv", orders_csv(45)[:-200])
    assert refused.returncode != 0  # cron mails what a failing job printed: the reason must be in it
    assert "looks cut off" in refused.stdout + refused.stderr


def test_a_form_upload_as_documented_is_accepted(shop, tmp_path):
    """docs/UPDATING.md: `curl -F file=@orders.csv ...` for tools that can only post a form."""
    import shutil
    import subprocess

    if not shutil.which("curl"):
        pytest.skip("curl is not installed")
    assert "curl -F file=@orders.csv" in (ROOT / "docs" / "UPDATING.md").read_text()
    file = write(tmp_path / "orders.csv", orders_csv(46))
    done = subprocess.run(
        ["curl", "-fsS", "-F", f"file=@{file}", "-H", f"x-upload-key: {UPLOAD_KEY}", f"{shop.url}/export"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0 and json.loads(done.stdout)["orders"] == 46


def test_an_xlsx_upload_is_read_as_a_workbook(shop, tmp_path):
    from conftest import write_xlsx

    rows = [
        ["Name", "Email", "Fulfillment Status"],
        *([f"#{n}", f"customer{n}@example.com", "unfulfilled"] for n in range(1, 46)),
    ]
    book = write_xlsx(tmp_path / "orders.xlsx", {"Orders": rows})
    status, answer = send(shop.url, book.read_bytes(), content_type="application/octet-stream")
    assert status == 200 and json.loads(answer)["file"] == "uploaded.xlsx" and json.loads(answer)["orders"] == 45
    assert not (shop.data / "uploaded.csv").exists()  # the other kind, from an earlier upload, is gone


def test_concurrent_uploads_stay_consistent(shop):
    results = []

    def upload(count):
        results.append((count, *send(shop.url, orders_csv(count).encode())))

    threads = [threading.Thread(target=upload, args=(count,)) for count in (50, 51, 52, 53)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert {status for _, status, _ in results} <= {200, 409}
    accepted = [count for count, status, _ in results if status == 200]
    assert accepted
    busy = [json.loads(body)["reason"] for _, status, body in results if status == 409]
    assert all("Another upload is being checked" in reason for reason in busy)
    served = lookup(shop.url, f"#{accepted[-1]}", f"customer{accepted[-1]}@example.com")
    assert served[0] == 200 or any(c > accepted[-1] for c in accepted)


def test_a_body_larger_than_the_server_keeps_in_memory_arrives_whole(shop):
    # Over 512 KB, waitress holds the body in a temporary file, which the kernel copies into the data folder.
    body = orders_csv(9000).encode()
    assert len(body) > 2 * 524288
    status, answer = send(shop.url, body)
    assert status == 200 and json.loads(answer)["orders"] == 9000
    assert (shop.data / "uploaded.csv").read_bytes() == body
    assert lookup(shop.url, "#9000", "customer9000@example.com")[0] == 200


def test_without_an_upload_key_the_address_does_not_exist(export, contexts_file):
    client = Client(app.create_app(started(make_settings(export.parent, contexts_file))))
    for method in ("PUT", "POST", "GET"):
        r = client.request(method, "/export", headers={"x-upload-key": "anything"})
        assert r.status == 404 and r.body == client.request("GET", "/nothing-here").body


@pytest.fixture
def uploads(tmp_path, contexts_file):
    """(service, client, the export dropped 5 hours ago) with an upload key and a Shopify webhook secret."""
    from test_webhooks import SHOPIFY_SECRET

    export = write(tmp_path / "data" / "orders.csv", orders_csv(40))
    os.utime(export, (time.time() - 5 * 3600,) * 2)
    service = started(
        make_settings(
            export.parent,
            contexts_file,
            UPLOAD_KEY=UPLOAD_KEY,
            STATE_DIR=str(tmp_path / "state"),
            SHOPIFY_WEBHOOK_SECRET=SHOPIFY_SECRET,
        )
    )
    yield service, Client(app.create_app(service)), export
    service.stopped()


def put(client, body, **headers):
    """(status, JSON answer) of an upload through the in-process client."""
    r = client.request("PUT", "/export", headers={"x-upload-key": UPLOAD_KEY, **headers}, body=body)
    return r.status, (json.loads(r.body) if r.body else None)


def shipped_three_hours_ago(client):
    """A signed Shopify event, 3 hours old: order #7 shipped with tracking, after the export was made."""
    from test_webhooks import deliver, now_iso, shopify_order

    order = dict(
        shopify_order(7, email="customer7@example.com", shipped=True, updated=now_iso(-3 * 3600)),
        name="#7",
        order_number=7,
    )
    assert deliver(client, order)[1]["outcome"] == "applied"
    assert "has shipped" in client.lookup("#7", "customer7@example.com").context


def test_an_identical_upload_changes_nothing(uploads):
    service, client, export = uploads
    shipped_three_hours_ago(client)
    served, mtime = service.snapshot, export.stat().st_mtime_ns
    status, answer = put(client, export.read_bytes())
    assert status == 200 and answer["unchanged"] is True and answer["orders"] == 40
    assert service.snapshot is served and export.stat().st_mtime_ns == mtime
    assert not list(export.parent.glob("uploaded.*"))
    assert "has shipped" in client.lookup("#7", "customer7@example.com").context


@pytest.mark.parametrize(
    "last_modified, kept",
    [
        (None, True),  # dated by the newest day its orders name: older than the event
        (5 * 3600, True),  # the sender says it was made 5 hours ago
        (0, False),  # made now: the event is in it, or was undone since
    ],
)
def test_an_older_export_sent_again_keeps_the_newer_events(uploads, last_modified, kept):
    from email.utils import formatdate

    service, client, export = uploads
    shipped_three_hours_ago(client)
    again = export.read_bytes().replace(b"\n", b"\r\n")  # the same export, saved again: not byte for byte
    headers = {} if last_modified is None else {"Last-Modified": formatdate(time.time() - last_modified, usegmt=True)}
    status, answer = put(client, again, **headers)
    assert status == 200 and answer["accepted"] and not answer.get("unchanged")
    context = client.lookup("#7", "customer7@example.com").context
    assert ("has shipped" in context) is kept
    assert service.snapshot.data_time <= time.time() - (3 * 3600 if kept else 0) + 5
    assert not service.health()[0] if last_modified is None else service.health()[0]  # orders of 2026-11-27: stale


def test_an_upload_is_dated_the_same_after_a_restart(uploads, contexts_file):
    service, client, export = uploads
    again = export.read_bytes().replace(b"\n", b"\r\n")
    assert put(client, again)[0] == 200
    made = service.snapshot.made
    restarted = started(service.settings)
    assert restarted.snapshot.source.name == "uploaded.csv" and restarted.snapshot.made == made


def test_the_right_upload_key_is_never_throttled(uploads):
    service, client, export = uploads
    statuses = [put(client, b"Name,Email\n", **{"x-upload-key": "upl-wrong-key-000000000000"})[0] for _ in range(12)]
    assert statuses[:10] == [401] * 10 and statuses[10:] == [429, 429]
    assert put(client, orders_csv(41).encode())[0] == 200  # the same address, the right key


@pytest.mark.parametrize("way", ["upload", "folder"])
def test_a_slow_ratchet_down_is_refused_like_a_single_cut(uploads, way):
    service, client, export = uploads
    sizes = [34, 29, 25, 21, 18]  # each 15% smaller than the one before: none is cut in half
    outcomes = []
    for count in sizes:
        body = orders_csv(count)
        if way == "upload":
            outcomes.append(put(client, body.encode())[0])
        else:
            time.sleep(0.01)
            write(export, body)
            outcomes.append(200 if service.reload() else 422)
    assert outcomes == [200, 200, 200, 200, 422]  # 18 is under half of the 40 a few exports ago
    assert service.snapshot.orders == 21
    if way == "folder":
        assert "fewer than 50% of the 40 in the largest of the last 5 exports accepted" in service.refused["reason"]


def test_a_refused_upload_shows_where_the_merchant_looks_until_a_good_export_is_served(uploads):
    import base64

    from test_metrics import scrape

    service, client, _ = uploads
    status, answer = put(client, orders_csv(5).encode())
    assert status == 422
    health = client.get("/healthz").json
    assert health["status"] == "degraded" and health["last_refused"]["source"] == "upload"
    assert health["last_refused"]["reason"] == answer["reason"] and "holds 5 orders, fewer than 50%" in answer["reason"]
    assert f"the last upload was refused: {answer['reason']}" in health["reasons"]
    auth = {"Authorization": "Basic " + base64.b64encode(f"x:{KEY}".encode()).decode()}
    page = client.get("/", headers=auth, key=None).body.decode()
    assert page.count("holds 5 orders, fewer than 50%") == 1  # at the top, said once
    assert scrape(client)[("orders_export_refused", (("source", "upload"),))] == 1
    assert put(client, orders_csv(41).encode())[0] == 200  # a good export: the refusal is history
    assert client.get("/healthz").json["last_refused"] is None
    assert scrape(client)[("orders_export_refused", (("source", "upload"),))] == 0
