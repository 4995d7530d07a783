"""Files built to freeze, exhaust or fool the service: memory stays bounded, a killer file is
skipped after a crash, clocks and links cannot pick what is served, names cannot forge logs.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import tracemalloc
import zipfile

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
    wait_for,
    write,
    write_xlsx,
)

import app

CONTEXTS = ROOT / "contexts.toml"


def peak_mb(load):
    """(result of load(), peak MB that Python allocated while it ran)."""
    tracemalloc.start()
    try:
        result = load()
        return result, tracemalloc.get_traced_memory()[1] / 1e6
    finally:
        tracemalloc.stop()


def load(path):
    return app.build_snapshot(app.load_config(CONTEXTS), path)


# --- memory is bounded by what the file holds, not by what it claims ---------------------


def test_a_workbook_declaring_16384_columns_reads_at_its_real_width(tmp_path):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Order ID", "Email", "Status"])
    sheet.append(["1", "a@example.com", "shipped"])
    sheet.cell(row=20000, column=1, value=" ")  # the rows between are missing: read as empty rows
    source = tmp_path / "small.xlsx"
    book.save(source)
    bomb = tmp_path / "bomb.xlsx"
    with zipfile.ZipFile(source) as small, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for item in small.infolist():
            data = small.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = re.sub(rb'<dimension ref="[^"]*"\s*/>', b'<dimension ref="A1:XFD20000"/>', data)
                assert b"XFD20000" in data
            out.writestr(item, data)
    assert bomb.stat().st_size < 10_000
    snapshot, peak = peak_mb(lambda: load(bomb))
    assert snapshot.orders == 1 and peak < 30


def test_a_million_blank_rows_are_let_go_as_they_are_read(tmp_path):
    blank = "," * 80 + "\n"
    text = orders_csv(3) + blank * 200_000
    snapshot, peak = peak_mb(lambda: load(write(tmp_path / "o.csv", text)))
    assert snapshot.orders == 3 and snapshot.rows_without_order == 0
    assert peak < 40, f"{peak:.0f} MB for {len(text) / 1e6:.0f} MB of empty rows"


def test_rows_of_one_order_apart_keep_only_the_needed_cells(tmp_path):
    wide = ",".join(f"Extra {n}" for n in range(60))
    lines = [f"Order ID,Email,Item,{wide}"]
    for n in range(20_000):  # every order's second row at the end: read holding all orders
        lines.append(f"{n},c{n}@example.com,Hat," + ",".join(["filler text"] * 60))
    lines += [f"{n},,Scarf," + ",".join(["filler text"] * 60) for n in range(20_000)]
    snapshot, peak = peak_mb(lambda: load(write(tmp_path / "o.csv", "\n".join(lines) + "\n")))
    assert snapshot.orders == 20_000
    assert app.answer(snapshot, "7", "c7@example.com")[0] == 200
    assert peak < 60, f"{peak:.0f} MB"


def test_a_file_of_one_endless_line_is_refused_before_it_is_parsed(tmp_path):
    path = write(tmp_path / "o.csv", "Order ID,Email," + "x," * 1_500_000)
    with pytest.raises(app.ExportError, match="has a line longer than 1 MB"):
        peak_mb(lambda: load(path))


def test_a_load_past_the_memory_limit_is_stopped_with_a_clear_error(tmp_path):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(150_000))
    run = subprocess.run(
        [sys.executable, str(ROOT / "app.py"), "check", "--data", str(export)],
        env={**os.environ, "MEMORY_LIMIT_MB": "60"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert "reading it took the service past 60 MB of memory" in run.stderr and "MEMORY_LIMIT_MB" in run.stderr


def test_under_a_hard_memory_limit_the_budget_stops_a_too_big_load_first(tmp_path, contexts_file):
    resource = pytest.importorskip("resource")
    data = tmp_path / "data"
    write(data / "orders.csv", orders_csv(50))
    port = free_port()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(port),
        "ORDERS_FILE": str(data),
        "CONTEXTS_FILE": str(contexts_file),
        "MALLOC_ARENA_MAX": "2",
        "MEMORY_LIMIT_MB": "250",
        "SETTLE_SECONDS": "0.1",
        "THREADS": "2",
    }

    def limit():  # as a container or ulimit would: past it, any allocation of any thread fails
        resource.setrlimit(resource.RLIMIT_AS, (700 << 20, 700 << 20))

    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path, preexec_fn=limit) as served:
        served.wait_for("INFO serving ")
        # Rows of one order apart hold every order until the end: far past 700 MB of address space.
        big = orders_csv(600_000).splitlines()
        write(data / ".next.csv", "\n".join([big[0], *big[1::2], *big[2::2]]) + "\n")
        os.replace(data / ".next.csv", data / "orders_2026-12-01.csv")  # as export jobs do
        served.wait_for("refused, still serving orders.csv", timeout=120)
        assert "past 250 MB of memory" in served.output and "Traceback" not in served.output
        import urllib.request

        lookup = f"http://127.0.0.1:{port}/lookup?order_id=7&customer_email=customer7%40example.com"
        with urllib.request.urlopen(urllib.request.Request(lookup, headers={"x-api-key": KEY}), timeout=5) as r:
            assert r.status == 200
        write(data / "orders_2026-12-02.csv", orders_csv(60))  # and the next good export still loads
        served.wait_for("loaded orders_2026-12-02.csv", timeout=30)


def test_a_file_that_killed_the_service_while_loading_is_skipped_at_the_next_start(tmp_path, contexts_file):
    data, state = tmp_path / "data", tmp_path / "state"
    write(data / "orders.csv", orders_csv(30))
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(free_port()),
        "ORDERS_FILE": str(data),
        "CONTEXTS_FILE": str(contexts_file),
        "STATE_DIR": str(state),
    }
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as served:
        served.wait_for("INFO serving ")  # a good night: its copy is kept
    write(data / "orders_2026-12-01.csv", orders_csv(300_000))
    killed = subprocess.Popen([sys.executable, str(ROOT / "app.py")], env=env, cwd=tmp_path, stderr=subprocess.DEVNULL)
    wait_for(lambda: (state / "loading.json").exists(), timeout=30, what="the load to begin")
    killed.send_signal(signal.SIGKILL)  # as the kernel does past MemoryMax
    killed.wait(10)
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as served:
        served.wait_for("INFO serving ")
        assert "orders_2026-12-01.csv: was being loaded when the service stopped last time" in served.output
        assert "SERVING THE LAST GOOD COPY" in served.output
    assert served.output.count("orders_2026-12-01.csv: was being loaded") == 1


# --- clocks, links and names -------------------------------------------------------


def test_an_export_dated_in_the_future_does_not_win_for_good(tmp_path, contexts_file):
    data = tmp_path / "data"
    old = write(data / "orders_old.csv", orders_csv(5, status="unfulfilled"))
    future = time.mktime((2027, 1, 15, 0, 0, 0, 0, 0, -1))
    os.utime(old, (future, future))
    service = app.Service(make_settings(data, contexts_file))
    service.start()
    client = Client(app.create_app(service))
    body = client.get("/healthz").json
    assert client.get("/healthz").status == 503
    assert any("is in the future" in reason for reason in body["reasons"])
    write(data / "orders_tonight.csv", orders_csv(5, status="fulfilled"))
    assert service.reload() and service.snapshot.source.name == "orders_tonight.csv"
    assert client.get("/healthz").status == 200


def test_a_link_out_of_the_data_folder_is_not_followed_unless_allowed(tmp_path, contexts_file):
    secret = write(tmp_path / "elsewhere" / "secret.csv", "root:x:0:0:root:/root:/bin/bash\n")
    data = tmp_path / "data"
    data.mkdir()
    (data / "orders.csv").symlink_to(secret)
    with pytest.raises(app.ExportError) as refused:
        app.Service(make_settings(data, contexts_file)).start()
    assert "1 link(s) to files outside it are not followed" in str(refused.value)
    with pytest.raises(app.ExportError) as followed:
        app.Service(make_settings(data, contexts_file, FOLLOW_SYMLINKS="yes")).start()
    assert "root" not in str(followed.value) + followed.value.detail
    assert "one column only (not shown)" in followed.value.detail
    inside = write(data / "orders_real.csv", orders_csv(3))
    (data / "latest.csv").symlink_to(inside)  # a link within the folder is fine
    assert app.find_export(data).parent == data


@pytest.mark.parametrize(
    "first_line, explained",
    [
        ("jane@example.com,#1001,paid", "not shown"),
        ("root:x:0:0:root:/root:/bin/bash,x", "not shown"),
        ("<html><head><title>Sign in</title></head>,x", "is a web page (HTML)"),
    ],
)
def test_a_first_row_that_is_not_a_header_is_never_quoted(tmp_path, first_line, explained):
    path = write(tmp_path / "o.csv", first_line + "\n1,2,3\n")
    with pytest.raises(app.ExportError) as refused:
        load(path)
    said = str(refused.value) + refused.value.detail
    assert first_line.split(",")[0] not in said and explained in said


def test_a_file_name_cannot_forge_a_log_line_or_break_the_status_page(tmp_path, contexts_file):
    data = tmp_path / "data"
    write(data / "orders.csv", orders_csv(3))
    port = free_port()
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(port),
        "ORDERS_FILE": str(data),
        "CONTEXTS_FILE": str(contexts_file),
        "SETTLE_SECONDS": "0.1",
    }
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as served:
        served.wait_for("INFO serving ")
        # A name with a line break that reads like a log line of its own, and bytes that are not UTF-8.
        name = os.fsencode(data) + b"/orders-\xff\n2026-11-29 00:00:00,000 INFO loaded forged.csv"
        with open(name, "w") as f:
            f.write(orders_csv(0))
        served.wait_for("refused, still serving", timeout=20)
        import base64
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/",
            headers={"Authorization": "Basic " + base64.b64encode(f"x:{KEY}".encode()).decode()},
        )
        with urllib.request.urlopen(request, timeout=5) as response:
            assert response.status == 200 and "text/html" in response.headers["Content-Type"]
            page = response.read().decode("utf-8")
        assert "orders-??2026-11-29 00:00:00,000 INFO loaded forged.csv" in page
        import urllib.error

        with pytest.raises(urllib.error.HTTPError) as degraded:
            urllib.request.urlopen(
                urllib.request.Request(f"http://127.0.0.1:{port}/healthz", headers={"x-api-key": KEY}), timeout=5
            )
        assert degraded.value.code == 503
        assert json.loads(degraded.value.read())["last_refused"]["file"].startswith("orders-??2026-11-29")
    assert not any(line.startswith("2026-11-29 00:00:00,000 INFO loaded forged") for line in served.output.splitlines())


def test_a_full_state_folder_leaves_no_partial_copy_and_health_says_so(tmp_path, contexts_file, monkeypatch):
    import errno
    import shutil

    def disk_full(source, target):
        with open(target, "wb") as f:
            f.write(b"x" * 65536)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    service = started(make_settings(export.parent, contexts_file, STATE_DIR=str(tmp_path / "state")))
    assert list((tmp_path / "state").iterdir()) == []
    r = Client(app.create_app(service)).get("/healthz")
    assert r.status == 503
    assert any(
        "could not keep a copy of the export" in reason and "No space left" in reason for reason in r.json["reasons"]
    )


def test_a_workbook_that_unpacks_a_thousandfold_is_refused_unread(tmp_path):
    source = write_xlsx(
        tmp_path / "small.xlsx", {"Orders": [["Order ID", "Email", "Item"], ["1", "a@example.com", "x"]]}
    )
    bomb = tmp_path / "bomb.xlsx"
    cell = b'<c r="C2" t="inlineStr"><is><t>' + b"x" * 30_000_000 + b"</t></is></c>"  # one cell of 30 MB
    with zipfile.ZipFile(source) as small, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as out:
        for item in small.infolist():
            data = small.read(item)
            if item.filename == "xl/worksheets/sheet1.xml":
                data = data.replace(b"</row></sheetData>", b'</row><row r="3">' + cell + b"</row></sheetData>")
            out.writestr(item, data)
    assert bomb.stat().st_size < 100_000
    with pytest.raises(app.ExportError, match="over 100 times its own size"):
        load(bomb)


def test_a_stray_cell_far_right_and_far_down_costs_nothing(tmp_path, monkeypatch):
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    sheet.append(["Order ID", "Email", "Status"])
    sheet.cell(row=1, column=16384, value="x")  # a value in XFD1, beyond a gap of empty header cells
    sheet.append(["1", "a@example.com", "shipped"])
    sheet.cell(row=1_048_576, column=1, value=" ")  # and one in the sheet's last row
    path = tmp_path / "stray.xlsx"
    book.save(path)
    converted = []
    real = app.cell_text
    monkeypatch.setattr(app, "cell_text", lambda value, lost=None: converted.append(1) or real(value, lost))
    snapshot = load(path)
    assert snapshot.orders == 1 and snapshot.columns["order_id"] == "Order ID"
    assert len(converted) < 100_000  # the header's cells, not a million rows of 16,384


def test_an_order_of_more_rows_than_any_order_has_is_refused(tmp_path):
    rows = ["Order ID,Email,Item"] + [f"SHOP,a@example.com,Item {n}" for n in range(app.MAX_ORDER_ROWS + 5)]
    with pytest.raises(app.ExportError, match="has an order with more than 10,000 rows"):
        load(write(tmp_path / "o.csv", "\n".join(rows) + "\n"))


def test_a_clean_stop_during_a_load_does_not_skip_the_file_next_time(tmp_path, contexts_file):
    data, state = tmp_path / "data", tmp_path / "state"
    write(data / "orders.csv", orders_csv(300_000))
    env = {
        **os.environ,
        "API_KEY": KEY,
        "PORT": str(free_port()),
        "ORDERS_FILE": str(data),
        "CONTEXTS_FILE": str(contexts_file),
        "STATE_DIR": str(state),
    }
    stopped = subprocess.Popen([sys.executable, str(ROOT / "app.py")], env=env, cwd=tmp_path, stderr=subprocess.DEVNULL)
    wait_for(lambda: (state / "loading.json").exists(), timeout=30, what="the load to begin")
    stopped.send_signal(signal.SIGTERM)  # systemctl restart, in the middle of the load
    stopped.wait(30)
    assert not (state / "loading.json").exists()
    with Served([sys.executable, str(ROOT / "app.py")], env, tmp_path) as served:
        served.wait_for("INFO serving ", timeout=60)
    assert "was being loaded when the service stopped" not in served.output


def test_an_export_without_a_column_a_template_needs_falls_back_at_start(tmp_path, contexts_file):
    contexts_file.write_text(
        contexts_file.read_text().replace(
            'found = "Order {order_id} was found.', 'found = "Order {order_id} ({total}) was found.'
        )
    )
    data = tmp_path / "data"
    write(data / "orders.csv", "Order ID,Email,Total\n1,a@example.com,10.00\n")
    started(make_settings(data, contexts_file))  # a good night
    write(data / "orders.csv", "Order ID,Email\n1,a@example.com\n2,b@example.com\n")  # tonight: no Total
    service = app.Service(make_settings(data, contexts_file))
    service.start()
    assert service.from_last_good and "has no column for {total}" in service.refused["reason"]
    assert app.answer(service.snapshot, "1", "a@example.com")[0] == 200


def test_a_sheet_name_cannot_forge_a_log_line(tmp_path, contexts_file):
    import openpyxl

    book = openpyxl.Workbook()
    book.active.title = "Z\u2028ERROR forged"  # a line separator: openpyxl refuses \n, not this
    book.active.append(["Order ID", "Email"])
    book.save(tmp_path / "o.xlsx")
    contexts_file.write_text(contexts_file.read_text().replace('sheet = ""', 'sheet = "Orders"'))
    with pytest.raises(app.ExportError) as refused:
        app.build_snapshot(app.load_config(contexts_file), tmp_path / "o.xlsx")
    assert "\u2028" not in str(refused.value) and "Z?ERROR forged" in str(refused.value)


def test_a_copy_that_failed_for_lack_of_room_is_made_once_there_is_room(tmp_path, contexts_file, monkeypatch):
    import errno
    import shutil

    real_copy = shutil.copyfile

    def disk_full(source, target):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfile", disk_full)
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    service = started(make_settings(export.parent, contexts_file, STATE_DIR=str(tmp_path / "state")))
    assert service.copy_error
    monkeypatch.setattr(shutil, "copyfile", real_copy)  # room again
    watcher = app.Watcher(service).start(events=False)
    try:
        wait_for(lambda: service.copy_error is None, what="the copy on a later poll")
    finally:
        watcher.stop()
    assert service.last_good_copy().read_text() == orders_csv(3)


def rewritten(source, target, change):
    """A copy of a workbook with its parts changed by change(name, data) -> data, or None to leave a part out."""
    with zipfile.ZipFile(source) as small, zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as out:
        for item in small.infolist():
            if (data := change(item.filename, small.read(item))) is not None:
                out.writestr(item, data)
    return target


def row_far_down(name, data):
    """The second row renumbered 999,999,999,999: openpyxl would make up every row before it."""
    if name == "xl/worksheets/sheet1.xml":
        return re.sub(rb'<row r="2"', b'<row r="999999999999"', data).replace(b'r="A2"', b'r="A999999999999"')
    return data


@pytest.mark.parametrize(
    "change, says",
    [
        (lambda name, data: None if name.startswith("xl/worksheets/") else data, "holds no worksheet"),
        (row_far_down, "numbers a row past 1,048,576"),
    ],
)
def test_a_damaged_workbook_is_refused_at_once_and_the_next_export_loads(tmp_path, contexts_file, change, says):
    source = write_xlsx(
        tmp_path / "good.xlsx", {"Orders": [["Order ID", "Email", "Status"], ["1", "a@example.com", "shipped"]]}
    )
    data = tmp_path / "data"
    write(data / "orders.csv", orders_csv(20))
    service = started(make_settings(data, contexts_file))
    rewritten(source, data / "orders_2.xlsx", change)
    started_at = time.monotonic()
    assert service.reload() is False and time.monotonic() - started_at < 10
    assert says in service.status()["last_refused"]["reason"] and service.snapshot.orders == 20
    write(data / "orders_3.csv", orders_csv(21))  # a good export dropped later is still loaded
    assert service.reload() and service.snapshot.orders == 21
