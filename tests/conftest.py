"""Fixtures shared by the tests: exports written on the fly, services, clients."""

import contextlib
import io
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlencode
from wsgiref.util import setup_testing_defaults

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import app  # noqa: E402

KEY = "test-Kq7vX2mZp9LrT4wN8cB3"
OTHER_KEY = "rotated-Hn4Qz8Wm2Xv6Tp9Rk3Ls"

SHOPIFY_HEADER = (
    "Name,Email,Financial Status,Fulfillment Status,Created at,Lineitem quantity,"
    "Lineitem name,Lineitem fulfillment status,Cancelled at,Tracking Number,Tracking Company"
)

# A small Shopify-shaped export: order-level fields on the first row only.
SHOPIFY_CSV = f"""{SHOPIFY_HEADER}
#1001,jane@example.com,paid,unfulfilled,2026-11-27 09:12:40 +0000,2,Wool Socks,pending,,,
#1001,,,,,1,Beanie,pending,,,
#1002,Sam@Example.com,paid,fulfilled,2026-11-24 14:03:11 +0000,1,Down Jacket,fulfilled,,1Z999AA10123456784,UPS
#1003,alex@example.com,paid,partial,2026-11-25 18:44:02 +0000,1,Trail Runners,fulfilled,,00340434161094042557,DHL Express
#1003,alex@example.com,,,,3,Running Socks,pending,,,
#1004,maria@example.com,refunded,unfulfilled,2026-11-20 11:00:00 +0000,1,Rain Shell,pending,2026-11-21 09:00:00 +0000,,
#1005,li@example.com,refunded,fulfilled,2026-11-10 16:20:00 +0000,1,Fleece,fulfilled,,,
#1006,,paid,fulfilled,2026-11-10 16:20:00 +0000,1,Gift Card,fulfilled,,,
"""


def orders_csv(count, status="unfulfilled", first=1, item="Item"):
    """A Shopify-shaped export of count orders, #first onwards, two rows each."""
    lines = [SHOPIFY_HEADER]
    for n in range(first, first + count):
        line_status = "fulfilled" if status == "fulfilled" else "pending"  # each line as Shopify writes it
        lines.append(
            f"#{n},customer{n}@example.com,paid,{status},2026-11-27 09:00:00 +0000,1,{item} {n},{line_status},,,"
        )
        lines.append(f"#{n},,,,,2,Extra {n},{line_status},,,")
    return "\n".join(lines) + "\n"


def wait_for(predicate, timeout=10.0, what="the condition"):
    """Poll predicate until it is true; fail with what when the deadline passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class LookupLoop(threading.Thread):
    """Looks an order up again and again while a test changes files; records failures."""

    def __init__(self, wsgi, order_id, email):
        super().__init__(daemon=True)
        self.client, self.order_id, self.email = Client(wsgi), order_id, email
        self.stopping, self.count, self.failures = threading.Event(), 0, []

    def run(self):
        while not self.stopping.is_set():
            try:
                r = self.client.lookup(self.order_id, self.email)
                if r.status != 200:
                    self.failures.append((r.status, r.body))
            except Exception as e:  # any exception is a failure the test must report
                self.failures.append(repr(e))
            self.count += 1
            time.sleep(0.001)  # steady traffic, not a busy loop that starves the reload

    def finish(self):
        """Stop and return the failures seen."""
        self.stopping.set()
        self.join(10)
        assert self.count > 0
        return self.failures


def answered(snapshot, order_id, email):
    """(status, context, tracking_url) of a lookup answered from a snapshot, as the platform would read it."""
    status, body = app.answer(snapshot, order_id, email)
    body = json.loads(body)
    return status, body["context"], body.get("tracking_url")


def checked(capsys, path, contexts=ROOT / "contexts.toml"):
    """(exit code, printed text) of `python app.py check` on an export."""
    code = app.main(["check", "--data", str(path), "--contexts", str(contexts)])
    return code, capsys.readouterr().out


def lookup_over_http(base, order_id, email):
    """(status, JSON body) of a lookup sent over HTTP to a running service, with the key."""
    request = urllib.request.Request(
        f"{base}/lookup?{urlencode({'order_id': order_id, 'customer_email': email})}", headers={"x-api-key": KEY}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def upload(connection, body, key):
    """(status, JSON answer) of an export PUT to /export over an open connection, which is closed after."""
    try:
        connection.request("PUT", "/export", body=body, headers={"x-upload-key": key, "Content-Type": "text/csv"})
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def write(path, text, encoding="utf-8"):
    """Write an export or config file and return its path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding=encoding, newline="")
    return path


def write_xlsx(path, sheets):
    """Write a workbook; sheets maps each sheet name to its rows (lists of values)."""
    import openpyxl

    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for row in rows:
            sheet.append(row)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    book.save(path)
    return path


@pytest.fixture(autouse=True)
def restore_logging():
    """The CLI sets up logging for the process; put it back after each test."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def contexts_file(tmp_path):
    """A copy of the shipped contexts.toml that a test may edit."""
    return Path(shutil.copy(ROOT / "contexts.toml", tmp_path / "contexts.toml"))


@pytest.fixture
def export(tmp_path):
    """The small Shopify-shaped export, in its own data folder."""
    return write(tmp_path / "data" / "orders.csv", SHOPIFY_CSV)


def make_settings(data, contexts, **overrides):
    """Settings as the environment would give them, for tests."""
    env = {"API_KEY": f"{KEY},{OTHER_KEY}", "SETTLE_SECONDS": "0.05", "POLL_SECONDS": "0.5", **overrides}
    return app.settings_from({"data": str(data), "contexts": str(contexts)}, env=env)


def started(settings):
    """A started Service whose copy of the export (made after serving begins) is in place."""
    service = app.Service(settings)
    service.start()
    if service.copying:
        service.copying.join(30)
    return service


@pytest.fixture
def service(export, contexts_file):
    """A started Service on the small export."""
    s = app.Service(make_settings(export.parent, contexts_file))
    s.start()
    return s


class Client:
    """Calls a WSGI app in-process and returns (status, headers, body)."""

    def __init__(self, wsgi):
        self.wsgi = wsgi

    def request(self, method, path, query="", headers=None, body=b""):
        environ = {
            "REQUEST_METHOD": method,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "wsgi.input": io.BytesIO(body),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_ADDR": "127.0.0.1",
        }
        setup_testing_defaults(environ)
        environ["wsgi.errors"] = io.StringIO()
        for name, value in (headers or {}).items():
            environ["HTTP_" + name.upper().replace("-", "_")] = value
        seen = {}

        def start_response(status, response_headers, exc_info=None):
            seen["status"] = int(status.split()[0])
            seen["headers"] = response_headers

        body = b"".join(self.wsgi(environ, start_response))
        return Response(seen["status"], dict(seen["headers"]), body)

    def get(self, path, query="", key=KEY, headers=None):
        headers = dict(headers or {})
        if key is not None:
            headers["x-api-key"] = key
        return self.request("GET", path, query, headers)

    def lookup(self, order_id, email, key=KEY):
        from urllib.parse import urlencode

        return self.get("/lookup", urlencode({"order_id": order_id, "customer_email": email}), key=key)


class Response:
    """What a client got back."""

    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    @property
    def json(self):
        return json.loads(self.body)

    @property
    def context(self):
        return self.json["context"]


@pytest.fixture
def client(service):
    """A WSGI client of the app serving the small export."""
    return Client(app.create_app(service))


class Served:
    """python app.py as a user starts it, its stderr collected by a thread."""

    def __init__(self, argv, env, cwd, **popen):
        import subprocess

        self.process = subprocess.Popen(argv, env=env, cwd=cwd, stderr=subprocess.PIPE, text=True, **popen)
        self.lines = []
        self.reader = threading.Thread(target=lambda: self.lines.extend(self.process.stderr), daemon=True)
        self.reader.start()

    @property
    def output(self):
        return "".join(self.lines)

    def wait_for(self, text, timeout=20):
        """Wait until the process has printed text; fail with what it printed."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise AssertionError(f"app.py never printed {text!r}; it printed:\n{self.output}")
            time.sleep(0.05)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(10)
        self.reader.join(5)
        self.process.stderr.close()


def free_port():
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(service):
    """The app of service on a real waitress server on a loopback port; yields its base URL."""
    server = app.make_server(app.create_app(service), service.settings, host="127.0.0.1", port=0)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.effective_port}"
    finally:
        server.close()
        thread.join(5)


@pytest.fixture
def live_server(service):
    """The small export's service on a real waitress server; yields its base URL."""
    with serving(service) as url:
        yield url


@pytest.fixture
def logs(caplog):
    """Captured log records of the service, INFO and up."""
    caplog.set_level(logging.INFO, logger="orders")
    return caplog


# nginx in front of the service, from a shipped config (tests/test_deploy.py, tests/test_replicas.py) ##########

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)


def nginx_missing():
    """Why nginx cannot be run in front of the service here, or None."""
    if NGINX is None:
        return "nginx is not installed (apt-get install nginx-light; .ci/run does)"
    if shutil.which("openssl") is None:
        return "openssl is needed to make a test certificate"
    return None


def swap(text, old, new, name="the shipped config"):
    """Replace every occurrence of a string the shipped config must contain; fail loudly if it drifted."""
    assert old in text, f"{name} no longer contains {old!r}"
    return text.replace(old, new)


def port_open(port):
    """True when something accepts connections on the loopback port."""
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def make_certificate(folder):
    """(certificate, key) for 127.0.0.1 and localhost, self-signed, in folder."""
    cert, key = Path(folder) / "cert.pem", Path(folder) / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@contextlib.contextmanager
def running_nginx(folder, site, port):
    """nginx in the foreground with site (a shipped config, its paths swapped) in its http block, until the block ends.

    Everything nginx writes (pid, logs, temp files) stays in folder; port is the one to
    wait for (the TLS one) before yielding.
    """
    folder = Path(folder)
    write(folder / "site.conf", site)
    temp = {name: folder / name for name in ("client", "proxy", "fastcgi", "uwsgi", "scgi")}
    write(
        folder / "nginx.conf",
        f"""
user root;
worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log;
events {{ worker_connections 256; }}
http {{
    client_body_temp_path {temp["client"]};
    proxy_temp_path {temp["proxy"]};
    fastcgi_temp_path {temp["fastcgi"]};
    uwsgi_temp_path {temp["uwsgi"]};
    scgi_temp_path {temp["scgi"]};
    include {folder}/site.conf;
}}
""",
    )
    nginx = subprocess.Popen(
        [NGINX, "-p", str(folder), "-c", str(folder / "nginx.conf")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: port_open(port) or nginx.poll() is not None, what="nginx to listen")
        assert nginx.poll() is None, nginx.stdout.read() + (folder / "error.log").read_text()
        yield nginx
    finally:
        nginx.terminate()
        nginx.wait(10)


# Caddy in front of the service, from a shipped Caddyfile (tests/test_deploy.py) ###############################

CADDY = shutil.which("caddy")


@contextlib.contextmanager
def running_caddy(folder, caddyfile, port):
    """caddy run on caddyfile (a shipped one, its paths swapped), admin API off, until the block ends.

    Its data and config folders stay in folder; port is the one to wait for before yielding.
    """
    folder = Path(folder)
    path = write(folder / "Caddyfile", "{\n\tadmin off\n\tauto_https disable_redirects\n}\n" + caddyfile)
    env = {
        **os.environ,
        "XDG_DATA_HOME": str(folder / "caddy-data"),
        "XDG_CONFIG_HOME": str(folder / "caddy-config"),
        "HOME": str(folder),
    }
    caddy = subprocess.Popen(
        [CADDY, "run", "--config", str(path), "--adapter", "caddyfile"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_for(lambda: port_open(port) or caddy.poll() is not None, what="caddy to listen")
        assert caddy.poll() is None, caddy.stdout.read()
        yield caddy
    finally:
        caddy.terminate()
        caddy.wait(10)


# PostgreSQL: a throwaway cluster from the system's own binaries ############################################

PG_PASSWORD = "pg-Xq7mV3zK9pL2wT8nB4rD"


def postgres_binaries():
    """The folder of the system's PostgreSQL server programs (initdb, pg_ctl), or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"), key=lambda p: int(p.parts[-3]), reverse=True)
    for candidate in [*found, shutil.which("pg_ctl")]:
        if candidate and os.access(candidate, os.X_OK) and (Path(candidate).parent / "initdb").exists():
            return Path(candidate).parent
    return None


class Postgres:
    """A PostgreSQL cluster in a folder of its own, on a free port, run as a user that is not root (initdb
    refuses root): password authentication over TCP, as a deployment has it. Databases are made per test."""

    def __init__(self, binaries):
        import tempfile

        self.bin, self.port, self.user = binaries, free_port(), "orders"
        self.durable = False  # fsync off: tests need no durability; the benchmark turns it on, as deployed
        self.run_as = None
        if os.geteuid() == 0:  # as root (a container, CI): the cluster runs as the system's postgres user, or nobody
            import pwd

            name = next((n for n in ("postgres", "nobody") if _has_user(n)), None)
            if name is None:
                pytest.skip("PostgreSQL cannot run as root, and no other user exists to run it")
            self.run_as = pwd.getpwnam(name)
        self.folder = Path(tempfile.mkdtemp(prefix="orders-pg-"))
        self.folder.chmod(0o755)
        password = self.folder / "password"
        password.write_text(PG_PASSWORD + "\n")
        if self.run_as:
            os.chown(self.folder, self.run_as.pw_uid, self.run_as.pw_gid)
            os.chown(password, self.run_as.pw_uid, self.run_as.pw_gid)
        self.data, self.log = self.folder / "data", self.folder / "server.log"
        self.run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            self.user,
            "--pwfile",
            str(password),
            "-E",
            "UTF8",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
            "--no-sync",
        )
        password.unlink()
        self.count = 0

    def run(self, program, *args, check=True):
        """One of the cluster's programs, as the cluster's user."""
        command = [str(self.bin / program), *args]
        if self.run_as:
            command = [
                "setpriv",
                f"--reuid={self.run_as.pw_uid}",
                f"--regid={self.run_as.pw_gid}",
                "--clear-groups",
                *command,
            ]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=self.folder)
        if check and done.returncode:
            raise RuntimeError(f"{program} failed: {done.stdout}{done.stderr}")
        return done

    def start(self):
        """Start the server (again): it listens on 127.0.0.1 and on a socket in its folder."""
        self.run(
            "pg_ctl",
            "-D",
            str(self.data),
            "-l",
            str(self.log),
            "-w",
            "-t",
            "60",
            "-o",
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 -c fsync={'on' if self.durable else 'off'}",
            "start",
        )

    def stop(self):
        """Stop the server at once (connections dropped), as a crash or a failover would."""
        self.run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop", check=False)

    def url(self, database):
        """A DATABASE_URL without the password (given apart, as DATABASE_PASSWORD_FILE)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{database}"

    def new_database(self):
        """A fresh database for one test: (its DATABASE_URL, a file holding the password)."""
        import psycopg

        self.count += 1
        name = f"shop{self.count}"
        with psycopg.connect(f"{self.url('postgres')}?password={PG_PASSWORD}", autocommit=True) as db:
            db.execute(f"CREATE DATABASE {name}")
        password = self.folder.parent / f"{self.folder.name}-password"
        password.write_text(PG_PASSWORD + "\n")
        return self.url(name), password

    def remove(self):
        self.stop()
        shutil.rmtree(self.folder, ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.folder.parent / f"{self.folder.name}-password").unlink()


def _has_user(name):
    import pwd

    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


@pytest.fixture(scope="session")
def postgres():
    """A running PostgreSQL cluster for the session; skipped with the reason where none is installed."""
    pytest.importorskip("psycopg", reason="the shared-store tests need psycopg: pip install -r requirements.txt")
    binaries = postgres_binaries()
    if binaries is None:
        pytest.skip("the shared-store tests need PostgreSQL's server programs (apt-get install postgresql)")
    cluster = Postgres(binaries)
    cluster.start()
    yield cluster
    cluster.remove()
