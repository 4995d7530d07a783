#!/usr/bin/env python3
"""Soak: the service's resident memory over a long run of steady traffic.

    python bench/soak.py                     # one hour: the bar is set for its second half
    python bench/soak.py --minutes 10        # a shorter look

Starts `python app.py` as a user would, on a Shopify-shaped export of --orders orders
(bench/run.py's), and for --minutes keeps up at once: lookups at --lookup-rate a second,
signed Shopify order events at --event-rate a second (each a change of one of
--event-orders orders, so the orders held from events level off, as in a shop), a new
export dropped into the data folder every --export-every seconds, and the export
uploaded to PUT /export every --upload-every seconds. Resident memory (VmRSS) is read
every 30 s; the table gives it per ten minutes, and the growth over the run's second
half, in MB and in MB per hour. Bar: less than 5 MB over the second half of an hour.
Results go to bench/out/soak.json.
"""

from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import hmac
import http.client
import json
import os
import random
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run as bench  # noqa: E402  (the export, the server process, /proc readings)

GROWTH_BAR_MB = 5.0  # over the second half of a one-hour soak


def write_export(path, orders, seed):
    """The export, written aside and renamed into place, as a nightly job drops it."""
    hidden = path.with_name(f".{path.name}.partial")
    with open(hidden, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(bench.HEADER)
        writer.writerows(bench.export_rows(orders, seed))
    os.replace(hidden, path)


def paced(rate, stop, work):
    """Call work() rate times a second until stop is set; behind schedule, at once."""
    began, n = time.perf_counter(), 0
    while not stop.is_set():
        if (wait := began + n / rate - time.perf_counter()) > 0:
            time.sleep(wait)
        work(n)
        n += 1


class Traffic:
    """The loads of a soak, each in threads of its own; counts what failed."""

    def __init__(self, port, args, folder):
        self.port, self.args, self.folder = port, args, folder
        self.stop, self.outcomes = threading.Event(), Counter()
        self.sample = json.loads((bench.ROOT / "tests" / "fixtures" / "shopify_orders_create.json").read_text())

    def connection(self):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)

    def send(self, connection, method, path, body=None, headers=None):
        """One request on a keep-alive connection (opened again after a failure); its status."""
        try:
            connection.request(method, path, body, headers or {})
            response = connection.getresponse()
            response.read()
            return response.status
        except (OSError, http.client.HTTPException):
            connection.close()
            return 0

    def lookups(self, share):
        """Lookups of orders all over the export, at share of --lookup-rate."""
        connection, rng = self.connection(), random.Random(share)

        def one(_):
            n = 1001 + rng.randrange(self.args.orders)
            self.outcomes[
                f"lookup {self.send(connection, 'GET', bench.lookup_path(n), headers={'x-api-key': bench.KEY})}"
            ] += 1

        paced(self.args.lookup_rate / 4, self.stop, one)

    def events(self):
        """Signed orders/updated events, each a change of one of --event-orders orders, stamped now."""
        connection, secret = self.connection(), bench.WEBHOOK_SECRET.encode()

        def one(n):
            number = n % self.args.event_orders
            stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
            order = dict(
                self.sample,
                id=9_000_000 + number,
                name=f"#W{number}",
                email=f"webhook{number}@example.com",
                updated_at=stamp,
                financial_status=("paid", "pending")[n % 2],
            )
            body = json.dumps(order).encode()
            signature = base64.b64encode(hmac.new(secret, body, hashlib.sha256).digest()).decode()
            status = self.send(
                connection,
                "POST",
                "/webhooks/shopify",
                body,
                {
                    "Content-Type": "application/json",
                    "X-Shopify-Topic": "orders/updated",
                    "X-Shopify-Hmac-Sha256": signature,
                    "X-Shopify-Webhook-Id": f"soak-{n}-{os.urandom(6).hex()}",
                },
            )
            self.outcomes[f"event {status}"] += 1

        paced(self.args.event_rate, self.stop, one)

    def exports(self):
        """A new export in the data folder every --export-every seconds; an upload every --upload-every."""
        started = time.monotonic()
        dropped = uploaded = 0
        while not self.stop.wait(1):
            elapsed = time.monotonic() - started
            if elapsed >= (dropped + 1) * self.args.export_every:
                dropped += 1
                write_export(self.folder / "orders.csv", self.args.orders, 1 + dropped % 2)
            if elapsed >= (uploaded + 1) * self.args.upload_every:
                uploaded += 1
                body = self.upload_body(uploaded % 2)
                status = self.send(
                    self.connection(),
                    "PUT",
                    "/export",
                    body,
                    {
                        "x-upload-key": bench.UPLOAD_KEY,
                        "Content-Type": "text/csv",
                        "Last-Modified": time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime()),
                    },
                )
                self.outcomes[f"upload {status}"] += 1

    def upload_body(self, which):
        """One of two exports that differ from the dropped ones (an identical upload would change nothing)."""
        made = self.__dict__.setdefault("uploads_made", {})
        if which not in made:
            path = self.folder.parent / f"upload-{which}.csv"
            write_export(path, self.args.orders, 3 + which)
            made[which] = path.read_bytes()
        return made[which]

    def start(self):
        threads = [threading.Thread(target=self.lookups, args=(n,), daemon=True) for n in range(4)]
        threads += [
            threading.Thread(target=self.events, daemon=True),
            threading.Thread(target=self.exports, daemon=True),
        ]
        for thread in threads:
            thread.start()
        return threads


def soak(args):
    """Run the soak; returns the readings and the figures."""
    folder = bench.OUT / "soak" / "data"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.iterdir():
        old.unlink()
    write_export(folder / "orders.csv", args.orders, 1)
    port = bench.free_port()
    env = {**bench.service_env(folder, port), "STATE_DIR": str(bench.OUT / "soak" / "state")}
    server = bench.Process([sys.executable, str(bench.ROOT / "app.py")], env, port)
    readings = []
    try:
        server.wait_ready()
        traffic = Traffic(port, args, folder)
        threads = traffic.start()
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < args.minutes * 60:
            readings.append((elapsed / 60, server.mb("VmRSS")))
            if len(readings) % 20 == 1:
                print(f"{elapsed / 60:5.1f} min  {readings[-1][1]:6.1f} MB  {dict(traffic.outcomes)}", flush=True)
            time.sleep(30)
        traffic.stop.set()
        for thread in threads:
            thread.join(30)
    finally:
        server.stop()
    return figures(readings, traffic.outcomes, args)


def figures(readings, outcomes, args):
    """Growth over the second half: the mean of the last sixth of the run's readings less that of a sixth around
    its middle. A new export each minute swings memory by some 15 MB between loads; a mean over ten minutes
    of them, not a reading or two, says where it stands."""
    width = args.minutes / 6

    def mean(start):
        window = [mb for minute, mb in readings if start <= minute < start + width]
        return statistics.fmean(window) if window else float("nan")

    middle, end = mean(args.minutes / 2 - width / 2), mean(args.minutes - width)
    growth = end - middle
    return {
        "minutes": args.minutes,
        "orders": args.orders,
        "event_rate": args.event_rate,
        "lookup_rate": args.lookup_rate,
        "readings": readings,
        "outcomes": dict(outcomes),
        "rss_first_mb": readings[0][1],
        "rss_middle_mb": middle,
        "rss_end_mb": end,
        "second_half_growth_mb": growth,
        "growth_mb_per_hour": growth / (args.minutes / 2) * 60,
        "bar_mb": GROWTH_BAR_MB,
        "met": args.minutes >= 60 and growth < GROWTH_BAR_MB,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=60)
    parser.add_argument("--orders", type=int, default=100_000)
    parser.add_argument("--lookup-rate", type=float, default=990)
    parser.add_argument("--event-rate", type=float, default=20)
    parser.add_argument("--event-orders", type=int, default=7000, help="orders the events change, over and over")
    parser.add_argument("--export-every", type=float, default=60, help="seconds between exports dropped in")
    parser.add_argument("--upload-every", type=float, default=180, help="seconds between uploads")
    args = parser.parse_args()
    bench.OUT.mkdir(parents=True, exist_ok=True)
    result = soak(args)
    (bench.OUT / "soak.json").write_text(json.dumps(result, indent=1))
    for minute, mb in result["readings"][::20]:
        print(f"{minute:5.1f} min  {mb:6.1f} MB")
    print(
        f"second half: {result['rss_middle_mb']:.1f} -> {result['rss_end_mb']:.1f} MB, "
        f"{result['second_half_growth_mb']:+.1f} MB ({result['growth_mb_per_hour']:+.1f} MB/h); "
        f"bar < {GROWTH_BAR_MB:g} MB over the second half of an hour: "
        + ("met" if result["met"] else "not met" if args.minutes >= 60 else "(a run shorter than an hour)")
    )
    print(f"outcomes: {result['outcomes']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
