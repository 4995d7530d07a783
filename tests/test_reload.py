"""Live data: real files, a real watchdog observer, lookups running throughout.

Each test changes files the way export jobs and editors do, then checks what
is served, what /healthz says, and that a thread looking an order up all
along never saw a failure.
"""

import os
import sys
import time
from types import SimpleNamespace

import pytest
from conftest import Client, LookupLoop, make_settings, orders_csv, started, wait_for, write, write_xlsx

import app

ORDERS = 100


@pytest.fixture
def live(tmp_path, contexts_file):
    """A service on a 100-order export, watched by watchdog (polling off), with lookups running."""
    data = tmp_path / "data"
    export = write(data / "orders.csv", orders_csv(ORDERS))
    service = app.Service(make_settings(data, contexts_file, POLL_SECONDS="3600"))
    service.start()
    wsgi = app.create_app(service)
    watcher = app.Watcher(service).start()
    lookups = LookupLoop(wsgi, "#1", "customer1@example.com")
    lookups.start()
    yield SimpleNamespace(
        service=service,
        export=export,
        data=data,
        contexts=contexts_file,
        client=Client(wsgi),
        lookups=lookups,
        watcher=watcher,
        tmp=tmp_path,
    )
    watcher.stop()
    assert lookups.finish() == [], "a lookup failed while files changed"


def context(live, order_id, email):
    """What the service answers now for this order."""
    return live.client.lookup(order_id, email)


def served_file(live):
    return live.service.snapshot.source.name


def health(live):
    """/healthz as a key holder sees it: (status, body)."""
    r = live.client.get("/healthz")
    return r.status, r.json


def refused(live):
    """Wait until a refusal is recorded and return /healthz with the key."""
    wait_for(lambda: live.service.refused is not None, what="the refusal")
    status, body = health(live)
    assert status == 503
    assert live.client.get("/healthz", key=None).json == {
        "status": "degraded",
        "data_age_seconds": body["data_age_seconds"],
    }
    return body


def test_replace_by_rename_is_picked_up(live):
    temp = write(live.data / ".orders.csv.tmp", orders_csv(ORDERS, status="fulfilled"))
    os.replace(temp, live.export)
    wait_for(lambda: "has shipped" in context(live, "1", "customer1@example.com").context, what="the new data")
    assert health(live)[0] == 200


def test_a_slow_write_in_place_ends_with_the_whole_file(live):
    text = orders_csv(ORDERS + 20, status="fulfilled")
    with open(live.export, "w", newline="") as f:
        f.write(text[: len(text) // 2])
        f.flush()
        time.sleep(0.3)  # the export job pauses mid-file: longer than the settle time
        f.write(text[len(text) // 2 :])
    wait_for(
        lambda: context(live, f"#{ORDERS + 20}", f"customer{ORDERS + 20}@example.com").status == 200,
        what="the last order of the complete file",
    )
    assert live.service.snapshot.orders == ORDERS + 20
    wait_for(lambda: health(live)[0] == 200, what="healthy again")


def test_a_newer_dated_file_in_the_folder_is_served(live):
    write(live.data / "orders_2026-11-29.csv", orders_csv(ORDERS, first=1, item="Fresh"))
    wait_for(lambda: served_file(live) == "orders_2026-11-29.csv", what="the dated file")
    assert "1 x Fresh 1" in context(live, "1", "customer1@example.com").context


@pytest.mark.parametrize(
    "name, content, reason",
    [
        ("orders_2026-11-29.xlsx", b"PK\x03\x04\x14\x00garbage, cut off", "not a readable XLSX workbook"),
        ("orders.csv", orders_csv(0), "holds no orders"),
        ("orders.csv", orders_csv(10), "holds 10 orders, fewer than 50% of the 100 being served"),
        ("orders.csv", "<html><body>502 Bad Gateway</body></html>\n", "is a web page (HTML), not an export"),
        ("orders.csv", "Customer,Total\nJane,10\n", "no column for order_id"),
        ("orders.csv", b"Name,Email\n#1,\xff\xfe\x00\x00binary\x00junk\n", "binary file"),
    ],
)
def test_a_bad_export_is_refused_and_the_good_data_stays(live, name, content, reason):
    before = context(live, "1", "customer1@example.com").body
    write(live.data / name, content)
    body = refused(live)
    assert reason in body["last_refused"]["reason"]
    assert body["last_refused"]["file"] == name
    assert body["file"] == "orders.csv" and body["orders"] == ORDERS
    assert context(live, "1", "customer1@example.com").body == before
    # A later good export is picked up as usual and health recovers.
    write(live.data / "orders_2026-11-30.csv", orders_csv(ORDERS, status="fulfilled"))
    wait_for(lambda: served_file(live) == "orders_2026-11-30.csv", what="the good file after the bad one")
    assert health(live)[0] == 200 and live.service.refused is None


def test_a_deleted_export_keeps_being_served(live):
    live.export.unlink()
    body = refused(live)
    assert "no export (.csv, .tsv, .txt or .xlsx)" in body["last_refused"]["reason"]
    assert context(live, "1", "customer1@example.com").status == 200


def test_duplicate_events_cause_one_reload(live, logs):
    text = orders_csv(ORDERS, status="fulfilled")
    for _ in range(5):
        write(live.export, text)
    wait_for(lambda: "has shipped" in context(live, "1", "customer1@example.com").context, what="the reload")
    time.sleep(0.5)  # time enough for a second, unwanted reload to show up
    loads = [r for r in logs.records if r.getMessage().startswith("loaded orders.csv")]
    assert len(loads) == 1


def test_a_good_contexts_edit_changes_the_wording(live):
    # A promise the shop makes itself, written in: the shipped answers make none.
    text = live.contexts.read_text().replace(
        "It has not shipped yet[ (no shipping is needed for {no_shipping_items})].",
        "It has not shipped yet; we ship on Mondays.",
    )
    temp = write(live.contexts.with_name("contexts.toml.swp"), text)
    os.replace(temp, live.contexts)  # editors save by rename
    wait_for(
        lambda: "we ship on Mondays" in context(live, "1", "customer1@example.com").context, what="the new wording"
    )


def test_a_bad_contexts_edit_keeps_the_last_good_config(live):
    before = context(live, "1", "customer1@example.com").body
    live.contexts.write_text(live.contexts.read_text().replace('processing = "Order', "processing = Order"))
    wait_for(lambda: live.service.config_error is not None, what="the refused edit")
    status, body = health(live)
    assert status == 503 and "line" in body["config"] and "contexts.toml" in body["config"]
    assert context(live, "1", "customer1@example.com").body == before
    live.contexts.write_text(live.contexts.read_text().replace("processing = Order", 'processing = "Fixed: Order'))
    wait_for(
        lambda: context(live, "1", "customer1@example.com").context.startswith("Fixed: Order #1"),
        what="the fixed config",
    )
    assert health(live)[0] == 200


def test_polling_alone_picks_up_changes_on_shares_without_events(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(10))
    service = app.Service(make_settings(export.parent, contexts_file, POLL_SECONDS="0.1"))
    service.start()
    watcher = app.Watcher(service).start(events=False)
    try:
        write(export, orders_csv(10, status="fulfilled"))
        client = Client(app.create_app(service))
        wait_for(lambda: "has shipped" in client.lookup("1", "customer1@example.com").context, what="the poll")
    finally:
        watcher.stop()


def test_restart_after_a_bad_night_serves_the_last_good_copy(tmp_path, contexts_file, logs):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(20))
    started(make_settings(export.parent, contexts_file))  # last night: a good export
    write(export, b"\x00\x01 garbage overwrote the export")  # tonight: broken, then the machine reboots
    service = app.Service(make_settings(export.parent, contexts_file))
    service.start()
    client = Client(app.create_app(service))
    assert client.lookup("#20", "customer20@example.com").status == 200
    body = client.get("/healthz").json
    assert body["from_last_good_copy"] is True
    assert any(reason.startswith("serving the last good copy after a refused export: ") for reason in body["reasons"])
    assert "binary file" in body["last_refused"]["reason"]
    assert client.get("/healthz").status == 503 and client.get("/livez").status == 200
    assert any("SERVING THE LAST GOOD COPY" in r.getMessage() for r in logs.records)


def test_a_deleted_export_at_restart_also_falls_back(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(20))
    started(make_settings(export.parent, contexts_file))
    export.unlink()
    service = app.Service(make_settings(export.parent, contexts_file))
    assert service.start().orders == 20 and service.from_last_good


def test_a_broken_export_with_no_good_one_ever_is_an_error(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", "Order Number,Status\n1,shipped\n")
    with pytest.raises(app.ExportError, match="no column for email"):
        app.Service(make_settings(export.parent, contexts_file)).start()


def test_the_copy_keeps_the_exports_age(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(5))
    os.utime(export, (1_700_000_000, 1_700_000_000))
    service = started(make_settings(export.parent, contexts_file))
    assert service.last_good_copy().stat().st_mtime == 1_700_000_000


def test_stale_data_makes_healthz_503_but_lookups_go_on(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(5))
    old = time.time() - 27 * 3600
    os.utime(export, (old, old))
    service = app.Service(make_settings(export.parent, contexts_file))
    service.start()
    client = Client(app.create_app(service))
    r = client.get("/healthz")
    assert r.status == 503 and any(
        reason.startswith("the data is older than 26 hours: the nightly export did not arrive")
        for reason in r.json["reasons"]
    )
    assert r.json["data_age_seconds"] >= 27 * 3600
    assert client.get("/healthz", key=None).json["status"] == "degraded"
    assert client.get("/livez").status == 200
    assert client.lookup("1", "customer1@example.com").status == 200


def test_a_long_load_logs_progress(tmp_path, contexts_file, logs, monkeypatch):
    monkeypatch.setattr(app, "PROGRESS_ROWS", 10)
    monkeypatch.setattr(app, "PROGRESS_SECONDS", 0.0)
    export = write(tmp_path / "o.csv", orders_csv(20))
    app.build_snapshot(app.load_config(contexts_file), export)
    assert any(r.getMessage().startswith("reading o.csv: 10 rows so far") for r in logs.records)


def test_the_copy_of_a_read_only_export_can_be_replaced(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(5))
    export.chmod(0o444)
    service = started(make_settings(export.parent, contexts_file))
    assert service.last_good_copy().stat().st_mode & 0o200  # writable by its owner
    export.chmod(0o644)
    write(export, orders_csv(6))
    assert service.reload() and service.last_good_copy().read_text() == orders_csv(6)


def test_after_a_restart_on_the_last_good_copy_the_broken_export_is_not_read_again(tmp_path, contexts_file, logs):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(20))
    started(make_settings(export.parent, contexts_file))
    write(export, "not an export\n")
    service = app.Service(make_settings(export.parent, contexts_file, POLL_SECONDS="0.1"))
    service.start()
    watcher = app.Watcher(service).start()
    try:
        time.sleep(0.5)  # several polls: none may retry the unchanged broken file
        write(export, orders_csv(25))
        wait_for(lambda: service.snapshot.orders == 25, what="the good export after the broken one")
    finally:
        watcher.stop()
    refusals = [r for r in logs.records if r.getMessage().startswith("refused")]
    assert refusals == []  # the start-up refusal is the SERVING THE LAST GOOD COPY line, said once
    assert sum("SERVING THE LAST GOOD COPY" in r.getMessage() for r in logs.records) == 1


def broken_xlsx(path, good_rows=20):
    """A workbook whose sheet XML breaks off after good_rows rows, as a crashed writer leaves it."""
    import zipfile

    source = write_xlsx(
        path.with_name("whole.xlsx"),
        {
            "Orders": [
                ["Name", "Email", "Fulfillment Status"],
                *([f"#{n}", f"customer{n}@example.com", "fulfilled"] for n in range(1, 60)),
            ]
        },
    )
    with zipfile.ZipFile(source) as whole, zipfile.ZipFile(path, "w") as cut:
        for item in whole.infolist():
            data = whole.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                rows = data.split(b"</row>")
                data = b"</row>".join(rows[: good_rows + 1]) + b'<row r="99"><c r="A99" t="s"><v>1</c></row>'
            cut.writestr(item, data)
    source.unlink()
    return path


def test_an_unexpected_failure_while_reading_is_a_refusal_and_reloading_goes_on(live):
    broken = broken_xlsx(live.data / "orders_2026-11-30.xlsx")
    body = refused(live)
    assert body["last_refused"]["file"] == broken.name and "could not be read" in body["last_refused"]["reason"]
    assert "customer" not in body["last_refused"]["reason"]  # no cell contents
    assert live.watcher.thread.is_alive()
    write(live.data / "orders_2026-12-01.csv", orders_csv(ORDERS, status="fulfilled"))
    wait_for(lambda: served_file(live) == "orders_2026-12-01.csv", what="the good export after the broken one")
    assert health(live)[0] == 200


def test_a_restart_with_a_broken_workbook_serves_the_last_good_copy(tmp_path, contexts_file):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(20))
    started(make_settings(export.parent, contexts_file))
    export.unlink()
    broken_xlsx(tmp_path / "data" / "orders.xlsx")
    service = app.Service(make_settings(export.parent, contexts_file))
    assert service.start().orders == 20 and service.from_last_good
    assert service.refused["file"] == "orders.xlsx"


def test_any_exception_during_a_reload_is_a_refusal(live, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(app, "build_snapshot", out_of_memory)
    write(live.export, orders_csv(ORDERS, status="fulfilled"))
    body = refused(live)
    assert "MemoryError" in body["last_refused"]["reason"]
    assert live.watcher.thread.is_alive()
    monkeypatch.undo()
    write(live.export, orders_csv(ORDERS + 1, status="fulfilled"))
    wait_for(lambda: live.service.snapshot.orders == ORDERS + 1, what="the next good export")


def test_a_contexts_file_nested_thousands_deep_is_refused(live):
    live.contexts.write_text(live.contexts.read_text() + "\n[settings.x]\ny = " + "[" * 5000 + "]" * 5000 + "\n")
    wait_for(lambda: live.service.config_error is not None, what="the refused edit")
    assert "nested too deeply" in live.service.config_error
    assert live.watcher.thread.is_alive() and health(live)[0] == 503


def test_overlapping_loads_put_the_switch_interval_back_as_it_was():
    # A reload and an upload's survey may overlap: the first to end must not give the other 5 ms slices,
    # and the last must not leave 0.5 ms behind for good (every lookup would pay for it).
    before, yielding = sys.getswitchinterval(), app.Yielding()
    first, second = yielding(), yielding()
    first.__enter__()
    second.__enter__()
    first.__exit__(None, None, None)
    assert sys.getswitchinterval() == app.RELOAD_SWITCH_INTERVAL
    second.__exit__(None, None, None)
    assert sys.getswitchinterval() == before
