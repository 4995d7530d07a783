"""The export fetched from a URL (ORDERS_URL): a real local HTTP(S) server, conditional requests,
failures that keep the data being served, and a token that never reaches a log.
"""

import hashlib
import http.client
import http.server
import json
import os
import shutil
import ssl
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from conftest import KEY, ROOT, Client, Served, free_port, make_settings, orders_csv, wait_for, write

import app

TOKEN = "tok_9f8e7d6c5b4a39281706"


class Origin:
    """An HTTP server standing for Google Sheets, Dropbox or a shop: it serves files, or misbehaves on cue."""

    def __init__(self, folder, tls_context=None):
        self.folder, self.mode, self.requests = folder, "files", []
        self.inner = 0  # the port of a service on this machine that a redirect must not reach
        origin = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, directory=str(folder), **kwargs)

            def log_message(self, *args):
                pass

            def do_GET(self):
                origin.requests.append((self.path, dict(self.headers)))
                mode = origin.mode
                if mode == "error":
                    self.send_error(500, "Internal Server Error")
                elif mode == "slow":
                    time.sleep(3)
                    self.send_error(500)
                elif mode == "html":
                    body = b"<!DOCTYPE html><html><body>Sign in to continue</body></html>"
                    self.send_response(200)
                    self.send_header("Content-Type", "text/html; charset=utf-8")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif mode == "cut":
                    body = (folder / "orders.csv").read_bytes()
                    self.send_response(200)
                    self.send_header("Content-Type", "text/csv")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])  # and the connection ends
                    self.close_connection = True
                elif mode == "etag":  # as S3 and Dropbox answer: an ETag, and 304 when it still matches
                    body = (folder / "orders.csv").read_bytes()
                    tag = f'"{hashlib.md5(body).hexdigest()}"'
                    if self.headers.get("If-None-Match") == tag:
                        self.send_response(304)
                        self.send_header("ETag", tag)
                        self.end_headers()
                        return
                    self.send_response(200)
                    self.send_header("Content-Type", "text/csv")
                    self.send_header("ETag", tag)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                elif mode == "drip":  # a byte at a time, each well within the read timeout
                    self.send_response(200)
                    self.send_header("Content-Type", "text/csv")
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    for _ in range(100):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.05)
                    self.close_connection = True
                elif mode in ("bad-length", "bad-location", "to-loopback", "to-metadata"):
                    # Answers a review found killed the fetcher: a length that is no number, a Location
                    # urllib cannot parse; and redirects into this machine or a cloud's metadata service.
                    self.send_response(200 if mode == "bad-length" else 302)
                    self.send_header("Content-Length", "abc" if mode == "bad-length" else "0")
                    if mode != "bad-length":
                        self.send_header(
                            "Location",
                            {
                                "bad-location": "http://[::1",
                                "to-loopback": f"http://localhost:{origin.inner}/healthz",
                                "to-metadata": "http://169.254.169.254/latest/meta-data/",
                            }[mode],
                        )
                    self.end_headers()
                    if mode == "bad-length":
                        self.wfile.write(b"Name,Email\n")
                    self.close_connection = True
                elif mode == "auth" and self.headers.get("Authorization") != "Basic am86czNjcjN0LVB3":
                    self.send_error(401)  # HTTP Basic, as a shop's protected export URL asks
                elif mode.startswith("redirect"):
                    hops = int(mode[8:] or 1)
                    self.send_response(302)
                    self.send_header("Location", f"/hop{hops - 1}/orders.csv" if hops > 1 else "/orders.csv")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    origin.mode = f"redirect{hops - 1}" if hops > 1 else "files"
                else:
                    self.path = self.path.split("?", 1)[0]
                    super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if tls_context:
            self.server.socket = tls_context.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls_context else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/orders.csv?token={TOKEN}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def origin(tmp_path):
    write(tmp_path / "origin" / "orders.csv", orders_csv(30))
    served = Origin(tmp_path / "origin")
    yield served
    served.close()


def fetching(tmp_path, contexts_file, url, **env):
    """A Service whose data folder is filled by its fetcher."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    settings = make_settings(data, contexts_file, ORDERS_URL=url, STATE_DIR=str(tmp_path / "state"), **env)
    service = app.Service(settings)
    return service


def test_the_first_fetch_serves_the_orders_and_a_changed_file_is_fetched_again(tmp_path, contexts_file, origin):
    service = fetching(tmp_path, contexts_file, origin.url)
    assert service.fetcher.fetch()
    service.start()
    assert service.snapshot.source.name == "fetched.csv" and service.snapshot.orders == 30
    assert service.fetcher.fetch() and service.fetcher.outcomes["not_modified"] == 1  # unchanged: a 304
    assert "If-Modified-Since" in origin.requests[-1][1]
    time.sleep(1.1)  # Last-Modified is to the second
    write(origin.folder / "orders.csv", orders_csv(31))
    assert service.fetcher.fetch() and service.fetcher.outcomes["fetched"] == 2
    assert service.reload() and service.snapshot.orders == 31


def test_fetches_are_counted_by_outcome_in_the_metrics(tmp_path, contexts_file, origin, monkeypatch):
    from test_metrics import basic, scrape

    monkeypatch.setattr(app, "FETCH_TIMEOUT", 1)
    service = fetching(tmp_path, contexts_file, origin.url)
    service.fetcher.fetch()
    service.start()
    service.fetcher.fetch()  # unchanged: a 304
    origin.mode = "error"
    service.fetcher.fetch()
    metrics = scrape(Client(app.create_app(service)), basic(KEY))
    assert {labels[0][1]: value for (name, labels), value in metrics.items() if name == "orders_fetches_total"} == {
        "fetched": 1,
        "not_modified": 1,
        "failed": 1,
    }
    assert TOKEN not in repr(metrics)


def test_an_unchanged_export_by_its_etag_is_a_304_that_changes_nothing(tmp_path, contexts_file, origin):
    origin.mode = "etag"
    service = fetching(tmp_path, contexts_file, origin.url)
    assert service.fetcher.fetch()
    service.start()
    fetched = tmp_path / "data" / "fetched.csv"
    before, served = (fetched.read_bytes(), fetched.stat().st_mtime_ns), service.snapshot
    assert service.fetcher.fetch() and service.fetcher.outcomes == {"fetched": 1, "not_modified": 1}
    assert origin.requests[-1][1]["If-None-Match"].startswith('"')
    assert (fetched.read_bytes(), fetched.stat().st_mtime_ns) == before
    assert service.files_state() == service.tried and service.snapshot is served  # the watcher finds nothing new
    write(origin.folder / "orders.csv", orders_csv(32))  # a new ETag
    assert service.fetcher.fetch() and service.fetcher.outcomes["fetched"] == 2


def test_failed_fetches_are_tried_again_sooner_then_every_fetch_seconds(tmp_path, contexts_file, origin):
    service = fetching(tmp_path, contexts_file, origin.url, FETCH_SECONDS="900")
    fetcher, waits = service.fetcher, []

    class Clock:
        def wait(self, seconds):
            waits.append(seconds)
            return len(waits) > 8  # stop after eight rounds

    def failing():
        fetcher.job.failed("the server answered 500")
        return False

    fetcher.stopping, fetcher.fetch = Clock(), failing
    fetcher.run()
    assert waits == [900, 30, 60, 120, 300, 600, 600, 600, 600]  # at start: fetched already; then backing off
    fetcher.job.succeeded()
    waits[:] = []
    fetcher.fetch = lambda: True
    fetcher.run()
    assert set(waits) == {900}  # once it works again: every FETCH_SECONDS


def test_the_fetched_files_time_is_the_exports(tmp_path, contexts_file, origin):
    yesterday = time.time() - 86400
    os.utime(origin.folder / "orders.csv", (yesterday, yesterday))
    service = fetching(tmp_path, contexts_file, origin.url)
    service.fetcher.fetch()
    assert abs((tmp_path / "data" / "fetched.csv").stat().st_mtime - yesterday) < 2


@pytest.mark.parametrize(
    "mode, says",
    [
        ("error", "the server answered 500"),
        ("slow", "broke off (TimeoutError)"),
        ("drip", "the download took longer than"),
        ("cut", "the download broke off after"),
        ("html", "answered with a web page"),
    ],
)
def test_a_failed_fetch_keeps_the_data_and_shows_on_healthz(tmp_path, contexts_file, origin, monkeypatch, mode, says):
    monkeypatch.setattr(app, "FETCH_TIMEOUT", 1)
    monkeypatch.setattr(app, "FETCH_DEADLINE", 1)
    service = fetching(tmp_path, contexts_file, origin.url)
    service.fetcher.fetch()
    service.start()
    before = (tmp_path / "data" / "fetched.csv").read_bytes()
    origin.mode = mode
    assert not service.fetcher.fetch()
    assert (tmp_path / "data" / "fetched.csv").read_bytes() == before
    assert [p.name for p in (tmp_path / "data").iterdir()] == ["fetched.csv"]  # no partial file left
    status = service.status()
    assert says in status["fetch"]["last_error"] and status["fetch"]["failures_in_a_row"] == 1
    assert TOKEN not in json.dumps(status) and "/orders.csv" not in json.dumps(status)
    assert service.health()[0]  # healthy still: a failure turns health 503 only after max_age_hours
    service.fetcher.job.failing_since -= 27 * 3600
    healthy, reasons, _ = service.health()
    assert not healthy and any("fetching the export has failed for more than 26 hours" in r for r in reasons)


def test_an_oversized_body_is_stopped_and_removed(tmp_path, contexts_file, origin):
    write(origin.folder / "orders.csv", orders_csv(2000))
    service = fetching(tmp_path, contexts_file, origin.url, MAX_EXPORT_MB="0.01")
    assert not service.fetcher.fetch()
    assert "larger than MAX_EXPORT_MB" in service.fetcher.job.last_error
    assert list((tmp_path / "data").iterdir()) == []


def test_redirects_are_followed_up_to_five(tmp_path, contexts_file, origin):
    service = fetching(tmp_path, contexts_file, origin.url)
    origin.mode = "redirect3"
    assert service.fetcher.fetch() and (tmp_path / "data" / "fetched.csv").exists()
    origin.mode = "redirect7"
    assert not service.fetcher.fetch() and "redirected more than 5 times" in service.fetcher.job.last_error


@pytest.mark.parametrize(
    "url, says",
    [
        ("http://orders.example.com/export.csv?token=abc", "plain http://"),
        ("ftp://orders.example.com/export.csv", "is not an https:// URL"),
    ],
)
def test_plain_http_to_another_machine_is_refused_at_start(url, says):
    with pytest.raises(app.SettingsError) as refused:
        app.settings_from({}, env={"ORDERS_URL": url})
    assert says in str(refused.value) and "abc" not in str(refused.value) and "export.csv" not in str(refused.value)


def test_the_service_fetches_at_start_and_every_fetch_seconds_and_never_logs_the_token(tmp_path, contexts_file, origin):
    port = free_port()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(port),
        "ORDERS_FILE": str(tmp_path / "data"),
        "CONTEXTS_FILE": str(contexts_file),
        "STATE_DIR": str(tmp_path / "state"),
        "ORDERS_URL": origin.url,
        "FETCH_SECONDS": "1",
        "SETTLE_SECONDS": "0.1",
    }
    (tmp_path / "data").mkdir()
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as served:
        served.wait_for("INFO serving ")
        assert "loaded fetched.csv: 60 rows, 30 orders" in served.output
        time.sleep(1.1)
        write(origin.folder / "orders.csv", orders_csv(35))
        served.wait_for("loaded fetched.csv: 70 rows, 35 orders", timeout=20)
        origin.mode = "error"
        served.wait_for("fetching http://127.0.0.1/… failed (1 in a row)", timeout=20)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/healthz", headers={"x-api-key": KEY})
        with urllib.request.urlopen(request, timeout=5) as response:
            health = json.loads(response.read())
    assert health["fetch"]["source"] == "http://127.0.0.1/…" and health["orders"] == 35
    assert TOKEN not in served.output and "token=" not in served.output


def test_a_first_fetch_that_fails_with_nothing_to_serve_says_so_in_one_line(tmp_path, contexts_file, origin):
    import subprocess

    origin.mode = "error"
    (tmp_path / "data").mkdir()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(free_port()),
        "ORDERS_FILE": str(tmp_path / "data"),
        "CONTEXTS_FILE": str(contexts_file),
        "STATE_DIR": str(tmp_path / "state"),
        "ORDERS_URL": origin.url,
    }
    done = subprocess.run([sys.executable, str(ROOT / "app.py")], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "error: the first fetch of ORDERS_URL (http://127.0.0.1/…) failed, and" in done.stderr
    assert "holds no export yet: the server answered 500" in done.stderr and "Drop the export" not in done.stderr
    assert "nothing loaded yet" in done.stderr and TOKEN not in done.stderr


@pytest.fixture
def certificate(tmp_path):
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (apt-get install openssl): the TLS test needs a certificate")
    key, cert = tmp_path / "key.pem", tmp_path / "cert.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ],
        check=True,
        capture_output=True,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


def test_over_tls_the_certificate_is_checked(tmp_path, contexts_file, certificate, monkeypatch):
    context, cert = certificate
    write(tmp_path / "origin" / "orders.csv", orders_csv(12))
    secure = Origin(tmp_path / "origin", context)
    try:
        service = fetching(tmp_path, contexts_file, secure.url)
        assert not service.fetcher.fetch()  # a certificate no one vouches for
        assert "CERTIFICATE_VERIFY_FAILED" in service.fetcher.job.last_error
        monkeypatch.setenv("SSL_CERT_FILE", str(cert))  # the machine trusts it: as a real one would be
        assert service.fetcher.fetch()
        service.start()
        assert service.snapshot.orders == 12
    finally:
        secure.close()


def test_a_bad_fetched_export_is_refused_by_the_guards_like_a_dropped_one(tmp_path, contexts_file, origin):
    service = fetching(tmp_path, contexts_file, origin.url)
    service.fetcher.fetch()
    service.start()
    time.sleep(1.1)
    body = orders_csv(30).encode()
    write(origin.folder / "orders.csv", body[: int(len(body) * 0.7)])  # the export job died mid-file
    assert service.fetcher.fetch()  # the fetch itself worked
    assert service.reload() is False and "looks cut off" in service.refused["reason"]
    assert service.snapshot.orders == 30


def test_a_web_page_saved_as_csv_is_refused_with_a_clear_reason(tmp_path, contexts_file):
    page = write(tmp_path / "orders.csv", "\ufeff<!DOCTYPE html>\n<html><head><title>Sign in</title></head></html>\n")
    with pytest.raises(app.ExportError, match="is a web page \\(HTML\\), not an export"):
        app.build_snapshot(app.load_config(contexts_file), page)


@pytest.mark.parametrize("mode", ["bad-length", "bad-location"])
def test_a_malformed_answer_is_a_counted_failure_and_the_fetcher_lives_on(tmp_path, contexts_file, origin, mode):
    service = fetching(tmp_path, contexts_file, origin.url, FETCH_SECONDS="1")
    assert service.fetcher.fetch()
    service.start()
    origin.mode = mode
    service.fetcher.start()
    try:
        wait_for(lambda: service.fetcher.job.failures >= 1, what="the malformed answer to count as a failure")
        status = service.status()["fetch"]
        assert "cannot be read" in status["last_error"] or "not a number" in status["last_error"]
        assert service.fetcher.thread.is_alive()  # it tries again after its backoff
        origin.mode = "files"
        write(origin.folder / "orders.csv", orders_csv(31))
        service.fetcher.job.failures = 0  # skip the 30 s backoff: the next round comes at FETCH_SECONDS
        wait_for(lambda: service.fetcher.outcomes["fetched"] == 2, timeout=15, what="the next fetch to work")
    finally:
        service.fetcher.stop()
    assert service.health()[0]  # healthy: a failure degrades only once the data would go stale


def test_a_malformed_first_answer_does_not_stop_a_start_with_an_export_in_the_folder(tmp_path, contexts_file, origin):
    origin.mode = "bad-length"
    write(tmp_path / "data" / "orders.csv", orders_csv(12))
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(free_port()),
        "ORDERS_FILE": str(tmp_path / "data"),
        "CONTEXTS_FILE": str(contexts_file),
        "STATE_DIR": str(tmp_path / "state"),
        "ORDERS_URL": origin.url,
    }
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as served:
        served.wait_for("INFO serving ")
        assert "the export already in the data folder will be served" in served.output
        assert "Traceback" not in served.output and TOKEN not in served.output


@pytest.mark.parametrize("mode", ["to-loopback", "to-metadata"])
def test_a_redirect_into_this_machine_or_a_private_network_is_refused(tmp_path, contexts_file, origin, mode):
    # ORDERS_URL's own host may be this machine (here it is 127.0.0.1); a hop to another name is checked.
    inner = Origin(tmp_path / "origin")  # stands for the service's own /healthz, or any local admin page
    origin.inner = inner.server.server_address[1]
    try:
        service = fetching(tmp_path, contexts_file, origin.url)
        origin.mode = mode
        assert not service.fetcher.fetch()
        assert "an address on this machine or a private network; refused" in service.fetcher.job.last_error
        assert not inner.requests and not (tmp_path / "data" / "fetched.csv").exists()
    finally:
        inner.close()


def test_a_name_that_resolves_to_this_machine_at_connect_time_is_refused(origin):
    # DNS rebinding: checked on the address really connected to, not only when the redirect is read.
    port = origin.server.server_address[1]
    connection = app.guarded(http.client.HTTPConnection, "export.example.com")("127.0.0.1", port, timeout=5)
    with pytest.raises(app.FetchError, match="private network; refused"):
        connection.connect()
    assert app.guarded(http.client.HTTPConnection, "127.0.0.1")("127.0.0.1", port, timeout=5).connect() is None


def test_the_configured_host_may_be_this_machine(tmp_path, contexts_file, origin):
    service = fetching(tmp_path, contexts_file, origin.url)  # http://127.0.0.1:...: the export on this machine
    origin.mode = "redirect2"  # hops that stay on it
    assert service.fetcher.fetch() and (tmp_path / "data" / "fetched.csv").exists()


def test_credentials_go_in_orders_url_auth_and_only_to_its_host(tmp_path, contexts_file, origin):
    with pytest.raises(app.SettingsError, match="ORDERS_URL_AUTH=user:password") as refused:
        app.settings_from({}, env={"ORDERS_URL": "https://jo:s3cr3t-Pw@shop.example.com/orders.csv"})
    assert "s3cr3t" not in str(refused.value) and "jo:" not in str(refused.value)
    origin.mode = "auth"
    service = fetching(tmp_path, contexts_file, origin.url, ORDERS_URL_AUTH="jo:s3cr3t-Pw")
    assert service.fetcher.fetch() and (tmp_path / "data" / "fetched.csv").exists()
    assert "s3cr3t" not in json.dumps(service.status()) and "am86czNjcjN0LVB3" not in json.dumps(service.status())
    (tmp_path / "other").mkdir()
    unauthorised = fetching(tmp_path / "other", contexts_file, origin.url)
    assert not unauthorised.fetcher.fetch() and "401" in unauthorised.fetcher.job.last_error
