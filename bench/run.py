#!/usr/bin/env python3
"""Benchmark: the service against baselines measured in the same run, on the same machine.

    python bench/run.py                    # 50,000 orders: about a minute
    python bench/run.py --orders 500000    # the size the bars are set for
    python bench/run.py --spin 20          # also: what 20 µs of Python per request costs here
    ONE_CPU=no python bench/run.py         # both apps free to move between CPUs

Generates a Shopify-shaped export (CSV and XLSX, reproducible with --seed),
measures each baseline and the service side by side, and prints a table of
figures and ratios against the bars; the same goes to bench/out/results.json.
Memory is read from /proc (VmRSS, VmHWM), load with wrk when installed, else
with the bundled Python load generator.
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "out"  # --out changes it
KEY = "bench-7Hq2xV9mLp4ZrT8wK3nB"

HEADER = [
    "Name",
    "Email",
    "Financial Status",
    "Paid at",
    "Fulfillment Status",
    "Fulfilled at",
    "Currency",
    "Subtotal",
    "Shipping",
    "Taxes",
    "Total",
    "Created at",
    "Lineitem quantity",
    "Lineitem name",
    "Lineitem price",
    "Lineitem sku",
    "Lineitem fulfillment status",
    "Billing Name",
    "Shipping City",
    "Cancelled at",
    "Tracking Number",
    "Tracking Company",
]
PRODUCTS = [
    f"{a} {b}"
    for a in ("Wool", "Down", "Trail", "Rain", "Fleece", "Merino", "Canvas", "Leather")
    for b in ("Socks", "Jacket", "Runners", "Shell", "Pullover", "Beanie", "Tote", "Boots", "Cap")
]
CITIES = ["Boston", "Austin", "Denver", "Ottawa", "Leeds", "Lyon", "Turin", "Graz", "Porto", "Ghent"]
CARRIERS = ["UPS", "USPS", "FedEx", "DHL Express", "Canada Post"]


# --- the export ------------------------------------------------------------------


def export_rows(orders, seed):
    """Shopify-shaped rows: about 1.67 line items per order, order fields on the first row only."""
    rng = random.Random(seed)
    for n in range(1001, 1001 + orders):
        items = 1 + (rng.random() < 0.45) + (rng.random() < 0.2)
        status = rng.choices(["fulfilled", "unfulfilled", "partial", "restocked"], [70, 22, 6, 2])[0]
        financial = rng.choices(["paid", "pending", "refunded"], [90, 6, 4])[0]
        day = f"2026-{rng.randint(8, 11):02d}-{rng.randint(1, 28):02d} {rng.randint(0, 23):02d}:14:05 -0400"
        tracking = f"1Z{rng.randrange(10**15):015d}" if status in ("fulfilled", "partial") else ""
        for i in range(items):
            first = i == 0
            qty = rng.choice((1, 1, 1, 2, 3))
            price = rng.choice((12.5, 19.0, 45.0, 89.0, 129.0))
            yield [
                f"#{n}",
                f"customer{n}@example.com" if first or rng.random() < 0.3 else "",
                financial if first else "",
                day if first else "",
                status if first else "",
                day if first and status == "fulfilled" else "",
                "USD" if first else "",
                f"{price * qty:.2f}" if first else "",
                "5.00" if first else "",
                "0.00" if first else "",
                f"{price * qty + 5:.2f}" if first else "",
                day,
                str(qty),
                rng.choice(PRODUCTS),
                f"{price:.2f}",
                f"SKU-{rng.randrange(9999):04d}",
                "fulfilled" if status == "fulfilled" else "pending",
                f"Customer {n}" if first else "",
                rng.choice(CITIES) if first else "",
                day if first and status == "restocked" else "",
                tracking if first else "",
                rng.choice(CARRIERS) if first and tracking else "",
            ]


def make_exports(out, orders, xlsx_orders, seed):
    """Write orders.csv (and orders.xlsx) unless the same ones are already there."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / f"exports-{orders}-{xlsx_orders}-{seed}.ok"
    csv_path, xlsx_path = out / "orders.csv", out / "orders.xlsx"
    if stamp.exists() and csv_path.exists() and xlsx_path.exists():
        return csv_path, xlsx_path
    for old in out.glob("exports-*.ok"):
        old.unlink()
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(export_rows(orders, seed))
    import openpyxl

    book = openpyxl.Workbook(write_only=True)
    sheet = book.create_sheet("Orders")
    sheet.append(HEADER)
    for row in export_rows(xlsx_orders, seed):
        row[12] = int(row[12])  # quantities are numbers in a workbook
        sheet.append(row)
    book.save(xlsx_path)
    stamp.touch()
    return csv_path, xlsx_path


# --- baselines, each run in a fresh process so its memory is its own --------------


def baseline_csv_pass(path):
    """The floor: one csv.reader pass over the file."""
    with open(path, newline="", encoding="utf-8") as f:
        for _ in csv.reader(f):
            pass


def baseline_naive(path):
    """A naive load: DictReader, a dict of row dicts per order."""
    orders = {}
    with open(path, newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            orders.setdefault(row["Name"], []).append(row)
    return orders


def baseline_tuples(path):
    """A careful load: only the needed columns, as tuples, repeated strings interned."""
    wanted = [
        HEADER.index(h)
        for h in (
            "Name",
            "Email",
            "Financial Status",
            "Fulfillment Status",
            "Lineitem quantity",
            "Lineitem name",
            "Lineitem fulfillment status",
            "Cancelled at",
            "Tracking Number",
            "Tracking Company",
        )
    ]
    orders = {}
    intern = sys.intern
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        next(reader)
        for row in reader:
            orders.setdefault(row[0], []).append(tuple(intern(row[i]) for i in wanted))
    return orders


def baseline_openpyxl(path):
    """The floor for workbooks: openpyxl read_only iteration over every row."""
    import openpyxl

    book = openpyxl.load_workbook(path, read_only=True, data_only=True)
    for _ in book.worksheets[0].iter_rows(values_only=True):
        pass
    book.close()


BASELINES = {
    "csv_pass": baseline_csv_pass,
    "naive": baseline_naive,
    "tuples": baseline_tuples,
    "openpyxl": baseline_openpyxl,
}


def run_baseline(name, path):
    """Time one baseline in a child process; (seconds, peak MB) as the OS saw it."""
    out = subprocess.run(
        [sys.executable, __file__, "--baseline", name, str(path), "--out", str(OUT)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def baseline_child(name, path):
    """In the child: run the baseline, print seconds and peak memory."""
    started = time.perf_counter()
    kept = BASELINES[name](path)
    seconds = time.perf_counter() - started
    print(
        json.dumps(
            {"seconds": seconds, "peak_mb": proc_mb(os.getpid(), "VmHWM"), "rss_mb": proc_mb(os.getpid(), "VmRSS")}
        )
    )
    del kept


def proc_status(pid, field):
    """A field of a process's /proc status, as text ("" when absent)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split(":", 1)[1].strip()
    return ""


def proc_mb(pid, field):
    """A memory figure of a process from /proc, in MB."""
    value = proc_status(pid, field)
    return int(value.split()[0]) / 1024 if value else float("nan")


# --- servers ------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bare_app(spin_us=0.0):
    """A bare Bottle app answering /lookup with a constant JSON body.

    spin_us adds that many microseconds of plain Python (an empty loop) to each request:
    what a microsecond of Python costs in throughput on this machine.
    """
    import bottle

    app = bottle.Bottle()
    body = json.dumps(
        {
            "context": "Order #1001 was found. It contains 1 x Wool Socks. It has not shipped yet; "
            "orders normally ship within two business days.",
            "tracking_url": None,
        }
    ).encode()

    def spin(loops):
        """An empty loop; its time per pass calibrates --spin."""
        started = time.perf_counter()
        for _ in range(loops):
            pass
        return time.perf_counter() - started

    loops = round(spin_us * 1e-6 * 200_000 / min(spin(200_000) for _ in range(5))) if spin_us else 0

    @app.get("/lookup")
    def lookup():
        if loops:
            spin(loops)
        bottle.response.content_type = "application/json"
        return body

    return app


def bare_child(port, spin_us=0.0):
    """In the child: the bare app on waitress, set up as the service sets itself up."""
    sys.path.insert(0, str(ROOT))
    import app as service_app

    # As the service does: without this, waitress writes "Task queue depth is N" to stderr on
    # nearly every request under load, and the baseline would pay for a write the service skips.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    settings = service_app.settings_from({"port": port})  # THREADS, ONE_CPU, ... as the service reads them
    if settings.one_cpu:
        service_app.keep_to_one_cpu(settings.cpu)  # CPU= as the benchmark gives the service
    service_app.make_server(bare_app(spin_us), settings).run()


def bare_defaults_child(port):
    """In the child: the bare app as waitress serves it out of the box (4 threads, any CPU)."""
    import waitress

    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    waitress.serve(bare_app(), host="127.0.0.1", port=port, _quiet=True)


def in_process_child(path, orders):
    """In the child: microseconds per lookup through each WSGI app, called directly, no server."""
    import io
    from collections import deque

    sys.path.insert(0, str(ROOT))
    import app as service_app

    settings = service_app.settings_from(
        {}, env={"ORDERS_FILE": str(path), "API_KEY": KEY, "STATE_DIR": str(OUT / "state")}
    )
    service = service_app.Service(settings)
    service.start()
    queued = deque()
    service_wsgi = service_app.create_app(service, queued.append)  # as `serve` does: lines made off the path
    rng = random.Random(1)
    environs = [
        {
            "REQUEST_METHOD": "GET",
            "PATH_INFO": "/lookup",
            "QUERY_STRING": lookup_path(n).split("?", 1)[1],
            "HTTP_X_API_KEY": KEY,
            "REMOTE_ADDR": "127.0.0.1",
            "SERVER_NAME": "bench",
            "SERVER_PORT": "80",
            "SERVER_PROTOCOL": "HTTP/1.1",
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(),
        }
        for n in (1001 + rng.randrange(orders) for _ in range(20_000))
    ]

    def per_request(wsgi):
        """Best of three passes over the lookups, in µs per request."""

        def start_response(status, headers, exc_info=None):
            pass

        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            for environ in environs:
                for _ in wsgi(dict(environ), start_response):
                    pass
            best = min(best, (time.perf_counter() - started) / len(environs) * 1e6)
        return best

    bare_us, service_us = per_request(bare_app()), per_request(service_wsgi)
    formatter, entries = service_app.TextLines(), list(queued)[: len(environs)]
    started = time.perf_counter()
    for entry in entries:  # what the log's flush thread does for each
        formatter.line(entry[0], "INFO", "orders.access", service_app.request_line(entry))
    line_us = (time.perf_counter() - started) / len(entries) * 1e6
    print(json.dumps({"bare_us": bare_us, "service_us": service_us, "log_line_us": line_us}))


class Process:
    """A server process started as a user would start it."""

    def __init__(self, argv, env, port):
        self.port = port
        self.log = open(OUT / f"server-{port}.log", "w")
        self.process = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT
        )
        self.started = time.perf_counter()

    def wait_ready(self, path="/healthz", timeout=600):
        """Seconds from start until path answers (anything but a refused connection)."""
        while time.perf_counter() - self.started < timeout:
            if self.process.poll() is not None:
                raise SystemExit(f"server exited; see {self.log.name}")
            try:
                status, _ = get(self.port, path)
                if status < 500:
                    return time.perf_counter() - self.started
            except OSError:
                pass
            time.sleep(0.02)
        raise SystemExit("server did not start in time")

    def mb(self, field):
        return proc_mb(self.process.pid, field)

    def cpus(self):
        """The CPUs the server may run on, as /proc lists them ("0", "0-1")."""
        return proc_status(self.process.pid, "Cpus_allowed_list")

    def stop(self):
        self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def get(port, path, key=KEY):
    """(status, body) of one GET."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("GET", path, headers={"x-api-key": key})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


# --- load ---------------------------------------------------------------------------


def lookup_path(n):
    """The lookup of order #n, as the chat platform sends it."""
    return f"/lookup?order_id=%23{n}&customer_email=customer{n}%40example.com"


# Lookups spread over the whole export, as customers would ask, not one hot order.
WRK_SCRIPT = """
local orders = tonumber(os.getenv("BENCH_ORDERS"))
local counter = 0
request = function()
  counter = counter + 7919
  local n = 1001 + (counter % orders)
  return wrk.format("GET", "/lookup?order_id=%23" .. n .. "&customer_email=customer" .. n .. "%40example.com")
end
"""


def wrk(port, seconds, connections, orders, threads=2):
    """Throughput and latency with wrk."""
    script = OUT / "lookups.lua"
    script.write_text(WRK_SCRIPT)
    out = subprocess.run(
        [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{seconds}s",
            "--latency",
            "-s",
            str(script),
            "-H",
            f"x-api-key: {KEY}",
            f"http://127.0.0.1:{port}/lookup",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "BENCH_ORDERS": str(orders)},
    ).stdout

    def latency(label):
        match = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        value, unit = float(match.group(1)), match.group(2)
        return value * {"us": 0.001, "ms": 1, "s": 1000}[unit]

    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    sockets = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    return {
        "tool": "wrk",
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "p50_ms": latency("50"),
        "p99_ms": latency("99"),
        "failures": (int(errors.group(1)) if errors else 0) + (sum(map(int, sockets.groups())) if sockets else 0),
    }


def python_load(port, seconds, connections, orders, record=None, until=None):
    """Throughput and latency with keep-alive connections from threads; timestamps kept if record.

    until: an Event that ends the load instead of seconds (then at most 600 s), so that lookups run for as
    long as what is measured beside them takes.
    """
    stop_at = time.perf_counter() + (600 if until else seconds)
    samples, failures, lock = [], [0], threading.Lock()

    def worker(seed):
        rng = random.Random(seed)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        mine, failed = [], 0
        while (now := time.perf_counter()) < stop_at and not (until and until.is_set()):
            try:
                connection.request("GET", lookup_path(1001 + rng.randrange(orders)), headers={"x-api-key": KEY})
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    failed += 1
            except (OSError, http.client.HTTPException):
                failed += 1
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            mine.append((now, time.perf_counter() - now))
        with lock:
            samples.extend(mine)
            failures[0] += failed

    workers = [threading.Thread(target=worker, args=(n,)) for n in range(connections)]
    started = time.perf_counter()
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    elapsed = time.perf_counter() - started
    latencies = sorted(s[1] * 1000 for s in samples)
    if record is not None:
        record.extend(samples)
    return {
        "tool": "python",
        "rps": len(samples) / elapsed,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "failures": failures[0],
        "requests": len(samples),
    }


def percentile(values, p):
    """The p-th percentile of sorted values."""
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def load(port, seconds, connections, orders):
    """wrk when installed, else the Python generator."""
    if shutil.which("wrk"):
        return wrk(port, seconds, connections, orders)
    return python_load(port, seconds, connections, orders)


# --- the run ------------------------------------------------------------------------


WEBHOOK_SECRET = "bench-shpss-Tq7vX2mZp9LrT4wN8cB3"
UPLOAD_KEY = "bench-upl-Wq4zV8nX2rT6mK9pL3sB"


STARTS = 5  # start-to-serving (CSV) or load (XLSX) and the pass it is measured against: each timed this often
ROUNDS = 3  # lookups of the bare app and of the service: rounds in turn, the median of each compared


def service_env(path, port):
    """The service's environment in the benchmark: python app.py as a user starts it, on the bare app's CPU."""
    return {
        "ORDERS_FILE": str(path),
        "API_KEY": KEY,
        "PORT": str(port),
        "STATE_DIR": str(OUT / "state"),
        "SETTLE_SECONDS": "0.2",
        "LOG_FORMAT": "text",
        "SHOPIFY_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "UPLOAD_KEY": UPLOAD_KEY,
        "CPU": our_cpu(),
    }


def our_cpu():
    """The CPU both apps are kept to: the lowest this run may use ("" off Linux)."""
    return str(min(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else ""


def time_a_start(path):
    """(seconds from python app.py to a first answer, the load's own seconds), on a fresh state folder, then
    stopped."""
    shutil.rmtree(OUT / "state", ignore_errors=True)
    port = free_port()
    server = Process([sys.executable, str(ROOT / "app.py")], service_env(path, port), port)
    try:
        return server.wait_ready(), json.loads(get(port, "/healthz")[1])["load_seconds"]
    finally:
        server.stop()


def lookups_in_turn(service_port, args):
    """The bare app and the service under the same load, ROUNDS times each in turn: (bare, service) of the median
    rounds. Taken in turn, a shared machine's drift hits both alike."""
    port = free_port()
    bare = Process([sys.executable, __file__, "--bare", str(port), "--out", str(OUT)], {"CPU": our_cpu()}, port)
    rounds = {"bare": [], "service": []}
    try:
        bare.wait_ready("/lookup")
        for which in ("bare", "service", "service", "bare", "bare", "service")[: 2 * ROUNDS]:  # drift falls on both
            measured = load(port if which == "bare" else service_port, args.seconds, args.connections, args.orders)
            rounds[which].append({**measured, "cpus": bare.cpus()} if which == "bare" else measured)
    finally:
        bare.stop()
    median = lambda results: sorted(results, key=lambda r: r["rps"])[len(results) // 2]
    return median(rounds["bare"]), median(rounds["service"]), {k: [r["rps"] for r in v] for k, v in rounds.items()}


def measure_service(path, args, label):
    """Start python app.py on path; load time, memory, and (for CSV) throughput, a reload and webhooks under load."""
    port = free_port()
    shutil.rmtree(OUT / "state", ignore_errors=True)  # no events or copies of an earlier run
    server = Process([sys.executable, str(ROOT / "app.py")], service_env(path, port), port)
    try:
        start_to_serving = server.wait_ready()
        status = json.loads(get(port, "/healthz")[1])
        result = {
            "start_to_serving_s": start_to_serving,
            "load_s": status["load_seconds"],
            "orders": status["orders"],
            "rows": status["rows"],
            "rss_mb": server.mb("VmRSS"),
            "peak_after_load_mb": server.mb("VmHWM"),
            "cpus": server.cpus(),
        }
        if label == "csv":
            result["bare"], result["load"], result["rounds_rps"] = lookups_in_turn(port, args)
            result["reload"] = reload_under_load(server, path, args)
            result["peak_mb"] = server.mb("VmHWM")
            result["webhooks"] = webhooks_under_load(server, args)
            result["upload"] = upload_under_load(server, path, args)
        return result
    finally:
        server.stop()
        # More starts, each just after a pass of its floor (csv.reader, openpyxl): the fastest of each is the
        # figure, so that a shared machine's moment of drift falls on neither alone.
        passes, starts, loads = [], [result["start_to_serving_s"]], [result["load_s"]]
        for _ in range(STARTS - 1):
            passes.append(run_baseline("csv_pass" if label == "csv" else "openpyxl", path))
            start, load_s = time_a_start(path)
            starts.append(start)
            loads.append(load_s)
        result.update(start_to_serving_s=min(starts), starts_s=starts, load_s=min(loads), loads_s=loads, passes=passes)


def reload_under_load(server, path, args):
    """Replace the export while lookups run; failures, latency during the reload, reload time."""
    before = json.loads(get(server.port, "/healthz")[1])["loaded_at"]
    samples, done = [], threading.Event()  # lookups run until the new export is served, however long it takes
    loader = threading.Thread(
        target=lambda: result.update(
            python_load(server.port, args.seconds, args.connections, args.orders, samples, until=done)
        )
    )
    result = {}
    loader.start()
    time.sleep(1)
    copy = path.with_name(".orders.csv.next")
    shutil.copyfile(path, copy)
    replaced = time.perf_counter()
    os.replace(copy, path)  # the nightly job's rename into place
    while json.loads(get(server.port, "/healthz")[1])["loaded_at"] == before:
        if time.perf_counter() - replaced > 600:
            raise SystemExit("the reload never finished")
        time.sleep(0.05)
    served = time.perf_counter()
    done.set()
    loader.join()
    status = json.loads(get(server.port, "/healthz")[1])
    during = sorted(d * 1000 for t, d in samples if replaced <= t <= served)
    return {
        "replace_to_served_s": served - replaced,
        "load_s": status["load_seconds"],
        "failures": result["failures"],
        "requests_during": len(during),
        "p50_during_ms": percentile(during, 50),
        "p99_during_ms": percentile(during, 99),
        "max_during_ms": during[-1] if during else float("nan"),
    }


def webhooks_under_load(server, args):
    """Post signed Shopify order events at a steady rate, from a process of their own, while lookups run.

    Each event is Shopify's documented orders/create sample (15 KB) as a new order, sent at
    --event-rate a second over 4 connections (as fast as they go, should the service fall
    behind). Lookups run meanwhile with wrk when installed, for as long as the burst lasts,
    else with the Python generator. Gives the events applied per second and the lookups'
    latency during the burst.
    """
    samples, lookups = [], {}
    seconds = math.ceil(args.events / args.event_rate) + 1
    if shutil.which("wrk"):
        run = lambda: lookups.update(wrk(server.port, seconds, args.connections, args.orders))
    else:
        run = lambda: lookups.update(python_load(server.port, seconds + 3, args.connections, args.orders, samples))
    loader = threading.Thread(target=run)
    loader.start()
    started = time.perf_counter()
    child = subprocess.run(
        [
            sys.executable,
            __file__,
            "--post-events",
            str(server.port),
            "--events",
            str(args.events),
            "--event-rate",
            str(args.event_rate),
            "--out",
            str(OUT),
        ],
        capture_output=True,
        text=True,
    )
    finished = time.perf_counter()
    loader.join()
    if child.returncode:
        raise SystemExit(f"posting the webhook events failed:\n{child.stderr}")
    posted = json.loads(child.stdout.splitlines()[-1])
    if lookups["tool"] == "wrk":  # wrk ran for the burst's length: its percentiles are the burst's
        p50, p99 = lookups["p50_ms"], lookups["p99_ms"]
    else:
        during = sorted(d * 1000 for t, d in samples if started <= t <= finished)
        p50, p99 = percentile(during, 50), percentile(during, 99)
    return {
        "events": args.events,
        "rate": args.event_rate,
        "applied": posted["applied"],
        "failed": args.events - posted["applied"],
        "events_per_s": posted["applied"] / posted["seconds"],
        "lookup_failures": lookups["failures"],
        "lookups_by": lookups["tool"],
        "p50_during_ms": p50,
        "p99_during_ms": p99,
    }


def changed_copy(path, name):
    """The export with one more order at its end: a new export, as the next night's (an identical one is only
    compared, not loaded)."""
    copy = path.with_name(name)
    shutil.copyfile(path, copy)
    with open(copy, "a", newline="", encoding="utf-8") as f:
        csv.writer(f).writerow(
            [
                f"#9{time.time_ns() % 10**9:09d}",
                "late@example.com",
                "paid",
                "",
                "unfulfilled",
                *[""] * (len(HEADER) - 5),
            ]
        )
    return copy


def upload_under_load(server, path, args):
    """PUT the next export to /export while lookups run: how long until it is checked and served, and the
    lookups' latency meanwhile."""
    path = changed_copy(path, ".orders-uploaded.csv")
    samples, lookups, done = [], {}, threading.Event()  # lookups run until the upload is answered
    loader = threading.Thread(
        target=lambda: lookups.update(
            python_load(server.port, args.seconds, args.connections, args.orders, samples, until=done)
        )
    )
    loader.start()
    time.sleep(1)
    started = time.perf_counter()
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=600)
    with open(path, "rb") as body:
        connection.request(
            "PUT",
            "/export",
            body,
            {"x-upload-key": UPLOAD_KEY, "Content-Type": "text/csv", "Content-Length": str(path.stat().st_size)},
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
    finished = time.perf_counter()
    done.set()
    connection.close()
    loader.join()
    during = sorted(d * 1000 for t, d in samples if started <= t <= finished)
    size = path.stat().st_size
    path.unlink()
    return {
        "status": response.status,
        "accepted": answer.get("accepted"),
        "seconds": finished - started,
        "mb": size / 1e6,
        "lookup_failures": lookups["failures"],
        "peak_mb": server.mb("VmHWM"),
        "p50_during_ms": percentile(during, 50),
        "p99_during_ms": percentile(during, 99),
    }


def measure_fetch(path, args):
    """ORDERS_URL at a local web server: from a new export there to the service serving it, FETCH_SECONDS apart."""
    import http.server

    site = OUT / "site"
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir()
    shutil.copyfile(path, site / "orders.csv")
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=str(site), **k)
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    origin = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=origin.serve_forever, daemon=True).start()
    port, data = free_port(), OUT / "fetched-data"
    shutil.rmtree(data, ignore_errors=True)
    shutil.rmtree(OUT / "state", ignore_errors=True)
    data.mkdir()
    env = {
        **service_env(data, port),
        "ORDERS_URL": f"http://127.0.0.1:{origin.server_address[1]}/orders.csv",
        "FETCH_SECONDS": str(FETCH_SECONDS),
    }
    server = Process([sys.executable, str(ROOT / "app.py")], env, port)
    try:
        first = server.wait_ready()
        before = json.loads(get(port, "/healthz")[1])
        time.sleep(FETCH_SECONDS / 2)  # the change lands anywhere within the fetch interval
        os.replace(changed_copy(site / "orders.csv", ".next.csv"), site / "orders.csv")
        changed = time.perf_counter()
        while json.loads(get(port, "/healthz")[1])["loaded_at"] == before["loaded_at"]:
            if time.perf_counter() - changed > 600:
                raise SystemExit("the changed export was never fetched")
            time.sleep(0.05)
        return {
            "start_to_serving_s": first,
            "change_to_served_s": time.perf_counter() - changed,
            "fetch_seconds": FETCH_SECONDS,
            "load_s": json.loads(get(port, "/healthz")[1])["load_seconds"],
        }
    finally:
        server.stop()
        origin.shutdown()


FETCH_SECONDS = 10  # the benchmark's fetch interval (the service's default is 900)


def post_events_child(port, events, rate):
    """In the child: post the events at rate a second over 4 keep-alive connections; print how many were applied,
    and in how long."""
    import base64
    import hashlib
    import hmac

    sample = json.loads((ROOT / "tests" / "fixtures" / "shopify_orders_create.json").read_text())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 60))  # newer than the export
    bodies = []
    for n in range(events):
        sample.update(id=9_000_000 + n, name=f"#W{n}", email=f"webhook{n}@example.com", updated_at=stamp)
        body = json.dumps(sample).encode()
        bodies.append((body, base64.b64encode(hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).digest())))
    outcomes, lock = Counter(), threading.Lock()

    def post(share):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        every = 4 / rate  # each of the 4 connections sends a quarter of the rate
        for n, (body, signature) in enumerate(share):
            if (wait := began + n * every - time.perf_counter()) > 0:  # on schedule; behind it, at once
                time.sleep(wait)
            connection.request(
                "POST",
                "/webhooks/shopify",
                body,
                {
                    "Content-Type": "application/json",
                    "X-Shopify-Topic": "orders/create",
                    "X-Shopify-Hmac-Sha256": signature,
                    "X-Shopify-Webhook-Id": signature[:24].decode(),
                    "X-Shopify-Shop-Domain": BENCH_SHOP,
                },
            )
            response = connection.getresponse()
            outcome = json.loads(response.read() or b"{}").get("outcome", str(response.status))
            with lock:
                outcomes[outcome] += 1
        connection.close()

    posters = [threading.Thread(target=post, args=(bodies[i::4],)) for i in range(4)]
    began = started = time.perf_counter()
    for poster in posters:
        poster.start()
    for poster in posters:
        poster.join()
    print(json.dumps({"applied": outcomes["applied"], "seconds": time.perf_counter() - started, "outcomes": outcomes}))


def small_export(args, name):
    """The export of the lines that compare two settings of the service: at most 20,000 orders, in OUT/name.

    Returns (its path, how many orders it holds).
    """
    orders = min(args.orders, 20_000)
    folder = OUT / name
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "orders.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(HEADER)
        writer.writerows(export_rows(orders, args.seed))
    return folder / "orders.csv", orders


def started_service(export, name, **env):
    """python app.py serving export with a STATE_DIR of its own (name) and env's settings, once it answers."""
    port = free_port()
    settings = {
        "ORDERS_FILE": str(export),
        "API_KEY": KEY,
        "PORT": str(port),
        "STATE_DIR": str(export.parent / f"state-{name}"),
    }
    server = Process([sys.executable, str(ROOT / "app.py")], {**settings, **env}, port)
    try:
        server.wait_ready()
    except BaseException:
        server.stop()
        raise
    return server


def measure_metrics(args, rounds=6):
    """Lookups with METRICS on and off, in turn, on a small export; while on, /metrics is scraped twice a second.

    Counting is done by the log's thread, so the two should be alike. Both servers stay up
    on the same CPU and take the load in turn, on-off-off-on, so that the machine's drift
    falls on both alike; their medians are compared.
    """
    export, orders = small_export(args, "metrics")
    rps, scrapes, servers = {"yes": [], "no": []}, [], {}
    try:
        for setting in ("yes", "no"):
            servers[setting] = started_service(export, setting, METRICS=setting, CPU=our_cpu())
        for setting in ("yes", "no", "no", "yes") * (rounds // 2):
            port, stop = servers[setting].port, threading.Event()

            def scrape(port=port, stop=stop):
                while not stop.wait(0.5):
                    started = time.perf_counter()
                    status, _ = get(port, "/metrics")
                    scrapes.append((time.perf_counter() - started) * 1000 if status == 200 else math.inf)

            scraper = threading.Thread(target=scrape, daemon=True)
            if setting == "yes":
                scraper.start()
            try:
                rps[setting].append(load(port, args.seconds, args.connections, orders)["rps"])
            finally:
                stop.set()
                if setting == "yes":
                    scraper.join()
    finally:
        for server in servers.values():
            server.stop()
    on, off = statistics.median(rps["yes"]), statistics.median(rps["no"])
    return {
        "on_rps": on,
        "off_rps": off,
        "ratio": on / off,
        "rounds": rounds,
        "all_rps": rps,
        "scrapes": len(scrapes),
        "scrape_ms": statistics.median(scrapes) if scrapes else math.nan,
    }


def measure_one_cpu(args, rounds=4):
    """Lookups with ONE_CPU=yes (the default: every thread on one CPU) and ONE_CPU=no, in turn, on a small export.

    What keeping to one CPU buys, the figure behind keep_to_one_cpu: both servers stay up and
    take the same load in turn, yes-no-no-yes, and their medians are compared.
    """
    export, orders = small_export(args, "one_cpu")
    rps, servers = {"yes": [], "no": []}, {}
    try:
        for setting in ("yes", "no"):
            servers[setting] = started_service(
                export, setting, ONE_CPU=setting, **({"CPU": our_cpu()} if setting == "yes" else {})
            )
        for setting in ("yes", "no", "no", "yes") * (rounds // 2):
            result = load(servers[setting].port, args.seconds, args.connections, orders)
            rps[setting].append((result["rps"], result["p99_ms"]))
    finally:
        for server in servers.values():
            server.stop()
    yes, no = (statistics.median(r for r, _ in rps[k]) for k in ("yes", "no"))
    return {
        "yes_rps": yes,
        "no_rps": no,
        "ratio": yes / no,
        "yes_p99_ms": statistics.median(p for _, p in rps["yes"]),
        "no_p99_ms": statistics.median(p for _, p in rps["no"]),
        "rounds": rounds,
        "all_rps": rps,
    }


BENCH_SHOP = "jsmith.myshopify.com"  # the shop the webhook fixture's order_status_url names


def measure_shared(args, rounds=4, deliveries=100):
    """DATABASE_URL: lookups with it and without (in turn, as the other ratios), events a second into PostgreSQL,
    and the time from a delivery's 200 at one instance to the other instance answering it.

    The cluster is a throwaway one started from the system's PostgreSQL programs, as the tests
    start theirs (tests/conftest.py). None when those programs or psycopg are missing.
    """
    sys.path.insert(0, str(ROOT / "tests"))
    try:
        import psycopg  # noqa: F401 - only whether it is installed
        from conftest import Postgres, postgres_binaries
    except ImportError as missing:
        print(f"  skipped: {missing}", flush=True)
        return None
    if postgres_binaries() is None:
        print("  skipped: PostgreSQL's server programs are not installed (apt-get install postgresql)", flush=True)
        return None
    export, orders = small_export(args, "shared")
    cluster = Postgres(postgres_binaries())
    cluster.durable = True  # every commit synced to disk, as a real database does
    cluster.start()
    servers = {}
    try:
        url, password_file = cluster.new_database()
        shared = {"DATABASE_URL": url, "DATABASE_PASSWORD_FILE": str(password_file), "SHOP_DOMAIN": BENCH_SHOP}
        for name in ("with", "without", "other"):
            servers[name] = started_service(
                export,
                name,
                SHOPIFY_WEBHOOK_SECRET=WEBHOOK_SECRET,
                CPU=our_cpu(),
                **(shared if name != "without" else {}),
            )
        rps = {"with": [], "without": []}
        for name in ("with", "without", "without", "with") * (rounds // 2):
            rps[name].append(load(servers[name].port, args.seconds, args.connections, orders)["rps"])
        posted = post_events(servers["with"].port, args.events, args.event_rate)
        seen = delivery_to_other(servers["with"].port, servers["other"].port, deliveries)
    finally:
        for server in servers.values():
            server.stop()
        cluster.remove()
    with_, without = statistics.median(rps["with"]), statistics.median(rps["without"])
    return {
        "with_rps": with_,
        "without_rps": without,
        "ratio": with_ / without,
        "rounds": rounds,
        "all_rps": rps,
        "events": args.events,
        "events_per_s": posted["applied"] / posted["seconds"],
        "failed": args.events - posted["applied"],
        "deliveries": deliveries,
        "other_p50_ms": percentile(seen, 50),
        "other_p99_ms": percentile(seen, 99),
    }


def post_events(port, events, rate):
    """{"applied", "seconds"} of signed events posted by the child process (see post_events_child)."""
    child = subprocess.run(
        [sys.executable, __file__, "--post-events", str(port), "--events", str(events), "--event-rate", str(rate)],
        capture_output=True,
        text=True,
    )
    if child.returncode:
        raise SystemExit(f"posting the webhook events failed:\n{child.stderr}")
    return json.loads(child.stdout.splitlines()[-1])


def delivery_to_other(port, other, deliveries):
    """Milliseconds from each delivery's 200 at port to the instance at other answering its order, one at a time."""
    import base64
    import hashlib
    import hmac

    sample = json.loads((ROOT / "tests" / "fixtures" / "shopify_orders_create.json").read_text())
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(time.time() + 60))  # newer than the export
    times = []
    for n in range(deliveries):
        sample.update(id=9_500_000 + n, name=f"#D{n}", email=f"other{n}@example.com", updated_at=stamp)
        body = json.dumps(sample).encode()
        signature = base64.b64encode(hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).digest()).decode()
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        connection.request(
            "POST",
            "/webhooks/shopify",
            body,
            {
                "X-Shopify-Topic": "orders/updated",
                "X-Shopify-Hmac-Sha256": signature,
                "X-Shopify-Shop-Domain": BENCH_SHOP,
                "X-Shopify-Webhook-Id": f"bench-{n}",
            },
        )
        response = connection.getresponse()
        response.read()
        connection.close()
        stored = time.perf_counter()
        if response.status != 200:
            raise SystemExit(f"a delivery was answered {response.status}")
        path = f"/lookup?order_id=%23D{n}&customer_email=other{n}%40example.com"
        while get(other, path)[0] != 200:
            if time.perf_counter() - stored > 30:
                raise SystemExit("the other instance did not answer a delivery within 30 s")
            time.sleep(0.002)
        times.append((time.perf_counter() - stored) * 1000)
    return sorted(times)


def measure_bare(args, spin_us=0.0):
    """The bare Bottle/waitress app, same settings, same load."""
    port = free_port()
    server = Process(
        [sys.executable, __file__, "--bare", str(port), "--spin", str(spin_us), "--out", str(OUT)],
        {"CPU": our_cpu()},
        port,
    )
    try:
        server.wait_ready("/lookup")
        return {**load(port, args.seconds, args.connections, args.orders), "cpus": server.cpus()}
    finally:
        server.stop()


def shared_rows(shared):
    """The table's lines for replicas sharing PostgreSQL (see measure_shared)."""
    return [
        f"| service: lookups with DATABASE_URL vs without, {shared['ratio']:.2f}x; median of {shared['rounds']} rounds "
        f"each | | | {shared['with_rps']:,.0f} vs {shared['without_rps']:,.0f} | | |",
        f"| service: {shared['events']:,} signed events into PostgreSQL, {shared['events_per_s']:,.0f}/s applied "
        f"({shared['failed']} not) | | | | | |",
        f"| service: a delivery's 200 at one instance to the other answering it ({shared['deliveries']} in turn) "
        f"| | | | {shared['other_p50_ms']:.1f} | {shared['other_p99_ms']:.1f} |",
    ]


def measure_bare_defaults(args):
    """The bare app at waitress's defaults, same load: what a plain Bottle app on waitress gives."""
    port = free_port()
    server = Process([sys.executable, __file__, "--bare-defaults", str(port), "--out", str(OUT)], {}, port)
    try:
        server.wait_ready("/lookup")
        return {**load(port, args.seconds, args.connections, args.orders), "cpus": server.cpus()}
    finally:
        server.stop()


def run(args):
    out = OUT
    print(f"generating {args.orders:,} orders (CSV) and {args.xlsx_orders:,} (XLSX), seed {args.seed} ...", flush=True)
    csv_path, xlsx_path = make_exports(out, args.orders, args.xlsx_orders, args.seed)
    results = {
        "orders": args.orders,
        "xlsx_orders": args.xlsx_orders,
        "csv_mb": csv_path.stat().st_size / 1e6,
        "connections": args.connections,
        "seconds": args.seconds,
        "load_tool": "wrk" if shutil.which("wrk") else "python",
    }
    for name, path in (("csv_pass", csv_path), ("naive", csv_path), ("tuples", csv_path), ("openpyxl", xlsx_path)):
        print(f"baseline {name} ...", flush=True)
        results[name] = run_baseline(name, path)
    print("bare app under load ...", flush=True)
    results["bare"] = measure_bare(args)
    print("bare app at waitress defaults ...", flush=True)
    results["bare_defaults"] = measure_bare_defaults(args)
    if args.spin:
        print(f"bare app plus {args.spin:g} µs of Python per request ...", flush=True)
        results["bare_spin"] = {"spin_us": args.spin, **measure_bare(args, args.spin)}
    print("both apps in-process ...", flush=True)
    child = subprocess.run(
        [sys.executable, __file__, "--in-process", str(csv_path), "--orders", str(args.orders), "--out", str(OUT)],
        capture_output=True,
        text=True,
    )
    if child.returncode:
        raise SystemExit(f"the in-process measurement failed:\n{child.stderr}")
    results["in_process"] = json.loads(child.stdout.splitlines()[-1])
    print("service on CSV: load, lookups, reload under load ...", flush=True)
    results["service_csv"] = measure_service(csv_path, args, "csv")
    # The floor the CSV load is measured against, timed as often as the load and beside it: the fastest of each.
    passes = [results["csv_pass"], *results["service_csv"].pop("passes")]
    results["csv_pass"] = {**min(passes, key=lambda r: r["seconds"]), "all_s": [r["seconds"] for r in passes]}
    print("service fetching ORDERS_URL ...", flush=True)
    results["fetch"] = measure_fetch(csv_path, args)
    print("service with metrics on and off, in turn ...", flush=True)
    results["metrics"] = measure_metrics(args)
    print("service with ONE_CPU=yes and no, in turn ...", flush=True)
    results["one_cpu"] = measure_one_cpu(args)
    print("replicas sharing PostgreSQL (DATABASE_URL) ...", flush=True)
    results["shared"] = measure_shared(args)
    print("service on XLSX ...", flush=True)
    results["service_xlsx"] = measure_service(xlsx_path, args, "xlsx")
    passes = [results["openpyxl"], *results["service_xlsx"].pop("passes")]
    results["openpyxl"] = {**min(passes, key=lambda r: r["seconds"]), "all_s": [r["seconds"] for r in passes]}
    results["checks"] = checks(results)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print()
    print(table(results))
    print(f"\n(written to {out / 'results.json'})")
    return 0 if all(c["bar_ok"] for c in results["checks"]) else 1


def checks(r):
    """Each bar and goal of the performance issue, with the figure measured."""
    s, x = r["service_csv"], r["service_xlsx"]
    rows = [
        (
            "CSV load, start to serving, vs csv.reader pass",
            s["start_to_serving_s"] / r["csv_pass"]["seconds"],
            "x",
            3.0,
            2.0,
            "<=",
        ),
        ("XLSX load vs openpyxl read_only pass", x["load_s"] / r["openpyxl"]["seconds"], "x", 1.3, 1.1, "<="),
        ("resident memory with the orders loaded", s["rss_mb"], "MB", 212, 200, "<="),
        ("peak resident memory across a full reload", s["peak_mb"], "MB", 400, 350, "<"),
        ("lookups vs bare Bottle/waitress, same CPU terms", s["load"]["rps"] / s["bare"]["rps"], "x", 0.7, 0.95, ">="),
        ("lookups vs bare app at waitress defaults", s["load"]["rps"] / r["bare_defaults"]["rps"], "x", 1.0, 1.2, ">"),
        ("failed requests during a full reload", s["reload"]["failures"], "", 0, 0, "<="),
        ("p99 lookup latency during the reload", s["reload"]["p99_during_ms"], "ms", 20, 10, "<"),
        ("webhook events applied per second, under lookups", s["webhooks"]["events_per_s"], "/s", 200, 500, ">="),
        ("p99 lookup latency during the webhook burst", s["webhooks"]["p99_during_ms"], "ms", 20, 10, "<"),
        (
            "p99 lookup latency while the export is uploaded and swapped in",
            s["upload"]["p99_during_ms"],
            "ms",
            20,
            10,
            "<",
        ),
        (
            "upload (PUT, checked, swapped in) vs a reload of the same size, both under lookups",
            s["upload"]["seconds"] / s["reload"]["replace_to_served_s"],
            "x",
            1.5,
            1.2,
            "<=",
        ),
        (
            "failed lookups during the upload (and the upload accepted)",
            s["upload"]["lookup_failures"] + (0 if s["upload"]["accepted"] else 1),
            "",
            0,
            0,
            "<=",
        ),
        ("lookups with metrics on (scraped twice a second) vs off", r["metrics"]["ratio"], "x", 0.98, 1.0, ">="),
        *(
            [
                ("lookups with DATABASE_URL vs without", r["shared"]["ratio"], "x", 0.95, 1.0, ">="),
                ("webhook events into PostgreSQL", r["shared"]["events_per_s"], "/s", 200, 400, ">="),
            ]
            if r.get("shared")
            else []
        ),
    ]
    ok = lambda v, limit, op: {"<=": v <= limit, "<": v < limit, ">=": v >= limit, ">": v > limit}[op]
    return [
        {
            "what": w,
            "value": v,
            "unit": u,
            "bar": b,
            "goal": g,
            "op": op,
            "bar_ok": ok(v, b, op),
            "goal_ok": ok(v, g, op),
        }
        for w, v, u, b, g, op in rows
    ]


def table(r):
    """The figures and the bars, as the README shows them."""
    s = r["service_csv"]
    lines = [
        f"{r['orders']:,} orders, {s['rows']:,} rows, {r['csv_mb']:.0f} MB CSV; XLSX {r['xlsx_orders']:,} orders; "
        f"load by {r['load_tool']}, {r['connections']} connections, {r['seconds']} s; "
        f"service on CPU {r['service_csv']['cpus']}, bare app on CPU {r['bare']['cpus']}",
        "",
        "| measured in this run | seconds | peak MB | req/s | p50 ms | p99 ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        f"| csv.reader pass (fastest of {STARTS}) | {r['csv_pass']['seconds']:.2f} | "
        f"{r['csv_pass']['peak_mb']:.0f} | | | |",
        f"| naive load (DictReader, dicts per order) | {r['naive']['seconds']:.2f} | "
        f"{r['naive']['peak_mb']:.0f} | | | |",
        f"| needed columns as interned tuples | {r['tuples']['seconds']:.2f} | {r['tuples']['peak_mb']:.0f} | | | |",
        f"| openpyxl read_only pass (XLSX, fastest of {STARTS}) | {r['openpyxl']['seconds']:.2f} | "
        f"{r['openpyxl']['peak_mb']:.0f} | | | |",
        f"| bare Bottle/waitress, constant JSON (median of {ROUNDS} rounds, in turn with the service's) | | | "
        f"{s['bare']['rps']:,.0f} | {s['bare']['p50_ms']:.1f} | {s['bare']['p99_ms']:.1f} |",
        f"| the same at waitress defaults (4 threads, any CPU) | | | {r['bare_defaults']['rps']:,.0f} | "
        f"{r['bare_defaults']['p50_ms']:.1f} | {r['bare_defaults']['p99_ms']:.1f} |",
        *(
            [
                f"| the same, plus {r['bare_spin']['spin_us']:g} µs of Python per request "
                f"({r['bare_spin']['rps'] / r['bare']['rps']:.2f}x of the bare app's "
                f"{r['bare']['rps']:,.0f} just before) | | | "
                f"{r['bare_spin']['rps']:,.0f} | "
                f"{r['bare_spin']['p50_ms']:.1f} | {r['bare_spin']['p99_ms']:.1f} |"
            ]
            if "bare_spin" in r
            else []
        ),
        f"| service: CSV start to serving (load {s['load_s']:.2f} s; fastest of {len(s['starts_s'])} starts) | "
        f"{s['start_to_serving_s']:.2f} | "
        f"{s['peak_after_load_mb']:.0f} | | | |",
        f"| service: lookups (median of {ROUNDS} rounds) | | | {s['load']['rps']:,.0f} | {s['load']['p50_ms']:.1f} | "
        f"{s['load']['p99_ms']:.1f} |",
        f"| service: reload under load (replace to served) | {s['reload']['replace_to_served_s']:.2f} | "
        f"{s['peak_mb']:.0f} | | {s['reload']['p50_during_ms']:.1f} | {s['reload']['p99_during_ms']:.1f} |",
        f"| service: {s['webhooks']['events']:,} signed Shopify events sent at {s['webhooks']['rate']:,.0f}/s, "
        f"{s['webhooks']['events_per_s']:,.0f}/s applied ({s['webhooks']['failed']} not), lookups by "
        f"{s['webhooks']['lookups_by']} meanwhile | | | | {s['webhooks']['p50_during_ms']:.1f} | "
        f"{s['webhooks']['p99_during_ms']:.1f} |",
        f"| service: the {s['upload']['mb']:.0f} MB export uploaded (PUT /export), checked and swapped in "
        f"({'accepted' if s['upload']['accepted'] else 'REFUSED'}) | {s['upload']['seconds']:.2f} | "
        f"{s['upload']['peak_mb']:.0f} | | {s['upload']['p50_during_ms']:.1f} | {s['upload']['p99_during_ms']:.1f} |",
        f"| service: ORDERS_URL fetched every {r['fetch']['fetch_seconds']} s: a new export there to served "
        f"(at most the interval, plus download and load {r['fetch']['load_s']:.2f} s) | "
        f"{r['fetch']['change_to_served_s']:.2f} | | | | |",
        f"| service: lookups with metrics on, /metrics scraped every 0.5 s ({r['metrics']['scrape_ms']:.1f} ms a "
        f"scrape), vs off; median of {r['metrics']['rounds']} rounds each | | | {r['metrics']['on_rps']:,.0f} vs "
        f"{r['metrics']['off_rps']:,.0f} | | |",
        f"| service: lookups kept on one CPU (ONE_CPU=yes) vs free to move (no), {r['one_cpu']['ratio']:.2f}x; "
        f"median of {r['one_cpu']['rounds']} rounds each | | | {r['one_cpu']['yes_rps']:,.0f} vs "
        f"{r['one_cpu']['no_rps']:,.0f} | | {r['one_cpu']['yes_p99_ms']:.1f} vs {r['one_cpu']['no_p99_ms']:.1f} |",
        *(shared_rows(r["shared"]) if r.get("shared") else []),
        f"| service: XLSX load (fastest of {len(r['service_xlsx']['loads_s'])} starts) | "
        f"{r['service_xlsx']['load_s']:.2f} | "
        f"{r['service_xlsx']['peak_after_load_mb']:.0f} | | | |",
        "",
        f"In-process, per lookup through the WSGI app (no server): bare {r['in_process']['bare_us']:.1f} µs, "
        f"service {r['in_process']['service_us']:.1f} µs, plus {r['in_process']['log_line_us']:.1f} µs to make "
        "its log line in the log's thread.",
        "",
        "| bar | measured | bar | goal | |",
        "| --- | ---: | ---: | ---: | --- |",
    ]
    for c in r["checks"]:
        unit = c["unit"]
        value = f"{c['value']:.2f}{unit}" if unit == "x" else f"{c['value']:,.0f}{(' ' + unit) if unit else ''}"
        verdict = "goal met" if c["goal_ok"] else ("bar met" if c["bar_ok"] else "BAR MISSED")
        lines.append(
            f"| {c['what']} | {value} | {c['op']} {c['bar']}{unit} | {c['op']} {c['goal']}{unit} | {verdict} |"
        )
    return "\n".join(lines)


def main():
    global OUT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--orders", type=int, default=50_000, help="orders in the CSV export (default 50,000)")
    parser.add_argument("--xlsx-orders", type=int, help="orders in the XLSX export (default: --orders, at most 20,000)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seconds", type=int, default=5, help="seconds of load per measurement")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument(
        "--events", type=int, default=10_000, help="signed webhook events in the burst (default 10,000)"
    )
    parser.add_argument(
        "--event-rate",
        type=float,
        default=500,
        help="events sent a second, steadily, during the burst (default 500, the goal)",
    )
    parser.add_argument("--out", type=Path, default=OUT, help="folder for the exports and results (default bench/out)")
    parser.add_argument("--baseline", nargs=2, metavar=("NAME", "FILE"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--spin",
        type=float,
        default=0.0,
        metavar="MICROSECONDS",
        help="also measure the bare app with this much plain Python added to each request",
    )
    parser.add_argument("--bare", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--bare-defaults", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--post-events", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--in-process", type=Path, metavar="FILE", help=argparse.SUPPRESS)
    args = parser.parse_args()
    OUT = args.out
    OUT.mkdir(parents=True, exist_ok=True)
    if args.baseline:
        return baseline_child(args.baseline[0], args.baseline[1])
    if args.bare:
        return bare_child(args.bare, args.spin)
    if args.bare_defaults:
        return bare_defaults_child(args.bare_defaults)
    if args.post_events:
        return post_events_child(args.post_events, args.events, args.event_rate)
    if args.in_process:
        return in_process_child(args.in_process, args.orders)
    args.xlsx_orders = args.xlsx_orders or min(args.orders, 20_000)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
