"""Logs: one line per request and per load; never a key or a full email."""

import logging

import pytest

import app
from conftest import KEY, Client


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


@pytest.mark.parametrize("order_id, email", [
    ("1001", "jane@example.com"),
    ("9999\r\nFAKE LOG LINE", "evil@example.com\nINFO forged"),
])
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

    app.Service(make_settings(export.parent, contexts_file)).start()
    assert any(l.startswith("loaded orders.csv: 8 rows, 6 orders") and l.endswith("s") for l in lines(logs))


@pytest.mark.parametrize("email, masked", [
    ("jane@example.com", "j***@example.com"),
    ("J@x.io", "J***@x.io"),
    ("no-at-sign", "***"),
    ("a@b\r\nc", "a***@bc"),
])
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
