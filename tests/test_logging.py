"""Logs: one line per request and per load; never a key or a full email."""

import logging

import pytest
from conftest import KEY, started

import app


def lines(logs):
    """The service's log lines."""
    return [r.getMessage() for r in logs.records if r.name.startswith("orders")]


def test_a_request_logs_status_time_order_and_masked_email(client, logs):
    client.lookup("#1001", "jane@example.com")
    line = lines(logs)[-1]
    assert "GET /lookup 200" in line
    assert "order=1001" in line and "email=j***@example.com" in line
    assert "ms" in line
    assert "jane@" not in line and "order_id=" not in line


@pytest.mark.parametrize(
    "order_id, email",
    [
        ("1001", "jane@example.com"),
        ("9999\r\nFAKE LOG LINE", "evil@example.com\nINFO forged"),
    ],
)
def test_keys_full_emails_and_raw_input_never_reach_the_log(client, logs, order_id, email):
    client.lookup(order_id, email)
    client.lookup(order_id, email, key="wrong-key-0123456789abcdef")
    client.get("/healthz")
    text = "\n".join(lines(logs))
    assert KEY not in text and "wrong-key" not in text
    assert email.split("@")[0] + "@" not in text
    # Hostile input cannot forge a log line: no line break or control character gets through.
    assert not any(c in line for line in lines(logs) for c in "\r\n\x00\x1b")


def test_a_load_logs_file_rows_orders_and_seconds(export, contexts_file, logs):
    from conftest import make_settings

    started(make_settings(export.parent, contexts_file))
    assert any(line.startswith("loaded orders.csv: 8 rows, 6 orders") and line.endswith("s") for line in lines(logs))


@pytest.mark.parametrize(
    "email, masked",
    [
        ("jane@example.com", "j***@example.com"),
        ("J@x.io", "J***@x.io"),
        ("no-at-sign", "***"),
        ("a@b\r\nc", "a***@bc"),
    ],
)
def test_masking(email, masked):
    assert app.mask_email(email) == masked


def test_waitress_queue_warnings_are_silenced():
    app.setup_logging("text")
    assert not logging.getLogger("waitress.queue").isEnabledFor(logging.WARNING)


def test_text_lines_carry_the_time_of_each_record():
    import time as clock

    formatter = app.TextLines()
    for created in (1_700_000_000.25, 1_700_000_000.75, 1_700_000_001.5):
        record = logging.LogRecord("orders", logging.INFO, __file__, 1, "hello", None, None)
        record.created, record.msecs = created, (created % 1) * 1000
        expected = clock.strftime("%Y-%m-%d %H:%M:%S", clock.localtime(created)) + f",{int(record.msecs):03d}"
        assert formatter.format(record) == f"{expected} INFO hello"


@pytest.mark.parametrize("formatter", [app.TextLines, app.JsonLines])
def test_a_queued_request_line_reads_as_a_logged_one(formatter):
    """serve queues raw request tuples; the flush thread writes the line logging would write, as safe."""
    import io

    handler = app.LogHandler(interval=3600)
    handler.setFormatter(formatter())
    handler.stream = io.StringIO()
    entry = (
        1_700_000_000.5,
        "127.0.0.1",
        "GET",
        "/lookup\x1b[2J",
        "200 OK",
        0.42,
        ("#1001\r\nINFO forged", "jane@example.com"),
    )
    handler.queue_request(entry)
    handler.flush_now()
    record = logging.LogRecord("orders.access", logging.INFO, __file__, 1, "%s", (app.request_line(entry),), None)
    record.created, record.msecs = entry[0], 500.0
    written = handler.stream.getvalue()
    assert written == formatter().format(record) + "\n"
    assert "127.0.0.1 GET /lookup?[2J 200 0.4ms order=1001infoforged email=j***@example.com" in written
    assert "jane@" not in written and "\r" not in written and "\x1b" not in written


def test_an_odd_request_tuple_costs_its_own_line_only():
    import io

    handler = app.LogHandler(interval=3600)
    handler.setFormatter(app.TextLines())
    handler.stream = io.StringIO()
    handler.queue_request((1_700_000_000.0, "127.0.0.1", "GET", None, "200 OK", 0.1, None))  # no path at all
    handler.queue_request((1_700_000_000.0, "127.0.0.1", "GET", "/lookup", "200 OK", 0.1, ("1001", "a@example.com")))
    handler.flush_now()
    first, second = handler.stream.getvalue().splitlines()
    assert "could not be made" in first and "GET /lookup 200" in second


def test_json_lines_for_log_collectors_and_start_up_facts(tmp_path, export, contexts_file):
    import json
    import os
    import sys
    import urllib.request

    from conftest import ROOT, Served, free_port

    port = free_port()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "LOG_FORMAT": "json",
        "PORT": str(port),
        "ORDERS_FILE": str(export),
        "CONTEXTS_FILE": str(contexts_file),
        "STATE_DIR": str(tmp_path / "state"),
    }
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as served:
        served.wait_for('"message": "serving ')
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/lookup?order_id=1001&customer_email=jane@example.com", headers={"x-api-key": KEY}
        )
        urllib.request.urlopen(request, timeout=5).read()
        served.wait_for("GET /lookup 200")
    lines = [json.loads(line) for line in served.output.splitlines() if line.strip()]
    assert all(set(line) == {"time", "level", "logger", "message"} for line in lines)
    start = next(line["message"] for line in lines if line["message"].startswith("serving "))
    assert str(export) in start and f"http://127.0.0.1:{port}/lookup" in start
    assert "key: 1 key(s) from API_KEY" in start
    assert any(line["message"].startswith("loaded orders.csv: 8 rows, 6 orders") for line in lines)
    lookup = next(line for line in lines if "GET /lookup 200" in line["message"])
    assert lookup["logger"] == "orders.access" and "email=j***@example.com" in lookup["message"]
    assert KEY not in served.output and "jane@" not in served.output


def test_an_email_typed_as_the_order_number_is_not_logged(client, logs):
    client.lookup("jane.doe@gmail.com", "jane.doe@gmail.com")
    line = next(r.getMessage() for r in logs.records if "/lookup" in r.getMessage())
    assert "order=(an-email)" in line and "janedoe" not in line and "gmail" not in line.split("email=")[0]
