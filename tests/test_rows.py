"""Rows that are not orders, rows that belong to the order above, and cells a spreadsheet marked: a footer,
a totals line, a repeated header or a separator never becomes an order; an e-mail cell that holds no address
makes no order, and a lookup with no address asks for it again; an ERP's item rows without an order number join
the order above; lines before the header are passed over; Excel's guards come off, and a tracking number a
spreadsheet damaged is withheld, never shown. Each is counted where the merchant looks: `check`, /healthz,
/metrics and the status page.
"""

import base64
import html
import re

import pytest
from conftest import KEY, ROOT, Client, answered, checked, make_settings, started, write
from prometheus_client.parser import text_string_to_metric_families

import app

CONTEXTS = ROOT / "contexts.toml"
NOT_AN_EMAIL = (
    "No order could be looked up: what was given as the e-mail address is not one. Please ask the "
    "customer again for the e-mail address used for the order."
)
NOT_FOUND = "No order was found with the number "


def snapshot(path):
    return app.build_snapshot(app.load_config(CONTEXTS), path)


def ten_orders(first=1001):
    """Ten orders of one row each: 1001 to 1010, c1@example.com to c10@example.com."""
    return "".join(f"{first + n},c{n + 1}@example.com,shipped,Cap {n + 1}\n" for n in range(10))


HEADER = "Order ID,Email,Status,Item\n"


def basic():
    return {"Authorization": "Basic " + base64.b64encode(f"x:{KEY}".encode()).decode()}


def served(tmp_path, text):
    """A client of a started service on the export text, in its own data folder."""
    write(tmp_path / "data" / "orders.csv", text)
    contexts = write(tmp_path / "contexts.toml", CONTEXTS.read_text())
    return Client(app.create_app(started(make_settings(tmp_path / "data", contexts))))


def scrape(client):
    """{(name, labels as a sorted tuple): value} of /metrics."""
    r = client.request("GET", "/metrics", headers=basic())
    assert r.status == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.body.decode())
        for s in family.samples
    }


def page_notes(client):
    """The notes of the status page, as a merchant reads them."""
    r = client.get("/", headers=basic(), key=None)
    assert r.status == 200
    listed = re.search(r'<ul id="notes">(.*?)</ul>', r.body.decode(), re.DOTALL)
    return [html.unescape(n) for n in re.findall(r"<li>(.*?)</li>", listed[1], re.DOTALL)] if listed else []


# --- rows that are no order ---------------------------------------------------------------------------

# The footer of the issue: an export that ends with how many records it holds, when and at what time. The
# "4" lands in the order-number column and "16:41:35" in the e-mail column.
FOOTER_EXPORT = (
    "Order Number,Customer Name,Status,Order Date,Email,Item\n"
    "1001,Ann,shipped,Jan-15-16,a@example.com,Hat\n1002,Bo,shipped,Jan-16-16,b@example.com,Hat\n"
    "1003,Cy,shipped,Jan-17-16,c@example.com,Hat\n1004,Di,shipped,Jan-17-16,d@example.com,Hat\n"
    "4, record(s) downloaded,from ,Jan-18-16,16:41:35,\n"
)


def test_a_footer_line_never_becomes_an_order(tmp_path, capsys):
    path = write(tmp_path / "orders.csv", FOOTER_EXPORT)
    snap = snapshot(path)
    assert snap.orders == 4
    for email in ("16:41:35", " record(s) downloaded"):
        assert answered(snap, "4", email) == (404, NOT_AN_EMAIL, None)
    assert answered(snap, "1004", "d@example.com")[0] == 200
    code, out = checked(capsys, path)
    assert code == 0 and "rows     4; orders 4;" in out
    assert "warning  1 row left out as rows whose e-mail cell holds no address" in out


# Totals lines as exports and spreadsheets write them under the orders, in the order-number column.
TOTALS = [
    "Total",
    "Totals",
    "TOTAL",
    "Total:",
    "Subtotal",
    "Sub-Total",
    "Summe",
    "Gesamtsumme",
    "Totaal",
    "Razem",
    "Suma",
    "Totale",
    "Grand Total",
    "Total general",
]


@pytest.mark.parametrize("word", TOTALS)
def test_a_totals_line_never_becomes_an_order(tmp_path, capsys, word):
    path = write(
        tmp_path / "orders.csv",
        "Order ID,Email,Status,Item,Total\n" + ten_orders().replace("\n", ",5.00\n") + f"{word},,,,50.00\n",
    )
    assert answered(snapshot(path), word, "c1@example.com")[0] == 404
    code, out = checked(capsys, path)
    assert code == 0 and "rows     10; orders 10;" in out
    assert "warning  1 row left out as totals lines" in out
    assert "no email and can never be found" not in out


def test_a_repeated_header_never_becomes_an_order(tmp_path, capsys):
    # Two exports pasted one under the other: the second header row sits among the orders.
    path = write(tmp_path / "orders.csv", HEADER + ten_orders(1001) + HEADER + ten_orders(2001))
    snap = snapshot(path)
    assert snap.orders == 20
    assert answered(snap, "Order ID", "Email") == (404, NOT_AN_EMAIL, None)
    assert answered(snap, "2010", "c10@example.com")[0] == 200
    code, out = checked(capsys, path)
    assert code == 0 and "rows     20; orders 20;" in out
    assert re.search(r"warning  1 row left out as ", out)


def test_a_repeated_header_in_a_small_export_is_left_out_too(tmp_path):
    path = write(
        tmp_path / "orders.csv",
        HEADER
        + "1,a@example.com,shipped,Hat\n2,b@example.com,shipped,Cap\n"
        + HEADER
        + "3,c@example.com,shipped,Cap\n",
    )
    snap = snapshot(path)
    assert snap.orders == 3 and answered(snap, "3", "c@example.com")[0] == 200


@pytest.mark.parametrize("separator", ["-----,-----,-----,-----", "=====,,,", "*****,,,", "---", ";;;;"])
def test_a_separator_line_never_becomes_an_order(tmp_path, capsys, separator):
    path = write(tmp_path / "orders.csv", HEADER + ten_orders(1001) + separator + "\n" + ten_orders(2001))
    snap = snapshot(path)
    assert snap.orders == 20
    cell = separator.split(",")[0]
    assert answered(snap, cell, "c1@example.com")[0] in (400, 404)
    code, out = checked(capsys, path)
    assert code == 0 and "rows     20; orders 20;" in out
    assert re.search(r"warning  1 row (has|have) no order number and (was|were) skipped", out)


# --- e-mail cells and lookups without an address ------------------------------------------------------


def test_rows_left_out_are_counted_by_reason_on_healthz_and_metrics(tmp_path):
    client = served(
        tmp_path,
        HEADER + ten_orders() + "2001,n/a,shipped,Cap\n-----,-----,-----,-----\n" + ten_orders(3001) + "Total,,,\n",
    )
    left_out = client.get("/healthz", key=KEY).json["rows_read"]["left_out"]
    assert left_out == {"no order number": 1, "rows whose e-mail cell holds no address": 1, "totals lines": 1}
    metrics = scrape(client)
    assert metrics[("orders_rows_left_out", (("reason", "totals lines"),))] == 1
    assert metrics[("orders_rows_left_out", (("reason", "rows whose e-mail cell holds no address"),))] == 1
    assert metrics[("orders_served_orders", ())] == 20


@pytest.mark.parametrize("cell", ["n/a", "not given", "16:41:35", "Ann Smith", "0"])
def test_an_email_cell_that_holds_no_address_makes_no_order(tmp_path, capsys, cell):
    path = write(tmp_path / "orders.csv", HEADER + ten_orders() + f"2001,{cell},shipped,Cap\n")
    snap = snapshot(path)
    assert snap.orders == 10
    assert answered(snap, "2001", cell) == (404, NOT_AN_EMAIL, None)
    status, text, _ = answered(snap, "2001", "c1@example.com")
    assert status == 404 and text.startswith(NOT_FOUND + "2001 and that email address.")
    code, out = checked(capsys, path)
    assert code == 0 and "rows     10; orders 10;" in out
    assert "warning  1 row left out as rows whose e-mail cell holds no address" in out


@pytest.mark.parametrize("email", ["jane", "jane.example.com", "16:41:35", "n/a", "+49 170 1234567"])
def test_a_lookup_whose_email_is_no_address_asks_for_it_again(tmp_path, email):
    client = served(tmp_path, HEADER + "1001,jane@example.com,shipped,Hat\n")
    r = client.lookup("1001", email)
    assert (r.status, r.context) == (404, NOT_AN_EMAIL)
    assert client.lookup("1001", "jane@example.com").status == 200


def test_the_shipped_not_an_email_answer_is_the_one_served():
    assert app.load_config(CONTEXTS).templates["not_an_email"].render({}) == NOT_AN_EMAIL


# --- follow-on rows (Odoo and other ERPs) ---------------------------------------------------------------

ODOO = (
    "Order Reference,Customer Email,Status,Product,Quantity\n"
    "S00012,a@example.com,shipped,Desk,1\n,,,Chair,4\n,,,Lamp,2\n"
    "S00013,b@example.com,shipped,Shelf,1\n,,,Hook,6\n"
)


def test_item_rows_without_an_order_number_belong_to_the_order_above(tmp_path, capsys):
    path = write(tmp_path / "orders.csv", ODOO)
    snap = snapshot(path)
    assert answered(snap, "S00012", "a@example.com")[1] == (
        "Order S00012 was found and has shipped. It contains 1 x Desk, 4 x Chair, 2 x Lamp. "
        "No tracking link is available for it."
    )
    assert "It contains 1 x Shelf, 6 x Hook." in answered(snap, "S00013", "b@example.com")[1]
    code, out = checked(capsys, path)
    assert code == 0 and "rows     5; orders 2;" in out
    assert (
        "rows     3 item rows without an order number belong to the order above them (the export writes an "
        "order's further lines so)"
    ) in out
    assert "no order number and were skipped" not in out


def test_follow_on_rows_are_counted_on_healthz_and_metrics(tmp_path):
    client = served(tmp_path, ODOO)
    assert client.get("/healthz", key=KEY).json["rows_read"]["attached_to_the_order_above"] == 3
    assert scrape(client)[("orders_rows_attached", ())] == 3


def test_an_item_row_with_another_customer_s_email_is_not_attached(tmp_path, capsys):
    path = write(
        tmp_path / "orders.csv",
        "Order Reference,Customer Email,Status,Product,Quantity\n"
        "S00012,a@example.com,shipped,Desk,1\n,,,Chair,4\n,b@example.com,,Lamp,2\n"
        "S00013,b@example.com,shipped,Shelf,1\n",
    )
    snap = snapshot(path)
    assert "It contains 1 x Desk, 4 x Chair." in answered(snap, "S00012", "a@example.com")[1]
    assert "Lamp" not in answered(snap, "S00013", "b@example.com")[1]
    _, out = checked(capsys, path)
    assert "rows     1 item row without an order number belongs to the order above it" in out
    assert "warning  1 row has no order number and was skipped" in out
    assert (
        "warning  1 item row has no order number and follows no order of its customer (another e-mail, or apart "
        "from any order), so no order could take it: the orders near it may be answered with fewer items"
    ) in out


@pytest.mark.parametrize("careful", [False, True], ids=["rows together", "rows apart"])
def test_item_rows_below_a_totals_line_join_no_order(tmp_path, capsys, careful):
    # A totals line is no order, so the item rows under it are no order's either: never counted as an order's rows.
    later = "S00013,b@example.com,shipped,Shelf,1\n" if careful else ""  # S00013 again: read the careful way
    path = write(
        tmp_path / "orders.csv",
        "Order Reference,Customer Email,Status,Product,Quantity\n"
        "S00013,b@example.com,shipped,Shelf,1\nTotal,,,,2\n,,,Lamp,2\n" + later,
    )
    snap = snapshot(path)
    assert "Lamp" not in answered(snap, "S00013", "b@example.com")[1]
    assert (snap.orders, snap.reading["attached"]) == (1, 0)
    assert snap.reading["not_orders"] == {"totals lines": 1}
    _, out = checked(capsys, path)
    assert "warning  1 item row has no order number and follows no order of its customer" in out


def test_follow_on_rows_are_attached_when_an_order_s_rows_are_apart(tmp_path):
    # S00012 comes back after S00013: the file is read the careful way, and follow-on rows still join.
    snap = snapshot(
        write(
            tmp_path / "orders.csv",
            "Order Reference,Customer Email,Status,Product,Quantity\n"
            "S00012,a@example.com,shipped,Desk,1\n,,,Lamp,2\n"
            "S00013,b@example.com,shipped,Shelf,1\n"
            "S00012,a@example.com,shipped,Rug,1\n",
        )
    )
    assert "It contains 1 x Desk, 2 x Lamp, 1 x Rug." in answered(snap, "S00012", "a@example.com")[1]
    assert snap.reading["attached"] == 1


# --- lines before the header ----------------------------------------------------------------------------

PREAMBLE = "Orders export\nShop: Example GmbH, 1 Dec - 2 Dec 2026\n\n" + HEADER + "1,a@example.com,shipped,Hat\n"


def test_lines_before_the_header_are_passed_over_and_named(tmp_path, capsys):
    path = write(tmp_path / "orders.csv", PREAMBLE)
    snap = snapshot(path)
    assert answered(snap, "1", "a@example.com")[1].startswith("Order 1 was found and has shipped.")
    assert snap.orders == 1
    code, out = checked(capsys, path)
    assert code == 0
    assert (
        "warning  2 lines before the header left out: 'Orders export', 'Shop: Example GmbH 1 Dec - 2 Dec 2026'" in out
    )


def test_lines_before_the_header_show_on_healthz(tmp_path):
    client = served(tmp_path, PREAMBLE)
    assert client.get("/healthz", key=KEY).json["rows_read"]["left_out"]["before the header"] == 2


# --- spreadsheet damage: guards taken off, damaged numbers withheld ------------------------------------

TRACKED = "Order ID,Email,Status,Item,Tracking Number,Carrier\n"
SHOWN = (
    "Order 1 was found and has shipped with UPS (tracking number 1Z999AA10123456784). It can be followed with "
    "the tracking link. It contains Hat."
)


@pytest.mark.parametrize("cell", ['"=""1Z999AA10123456784"""', "'1Z999AA10123456784", '"1Z999AA10123456784"'])
def test_a_spreadsheet_s_guard_on_a_tracking_number_is_taken_off(tmp_path, cell):
    snap = snapshot(write(tmp_path / "orders.csv", TRACKED + f"1,a@example.com,shipped,Hat,{cell},UPS\n"))
    assert answered(snap, "1", "a@example.com") == (200, SHOWN, "https://www.ups.com/track?tracknum=1Z999AA10123456784")


@pytest.mark.parametrize(
    "cell",
    [
        '"=""00123"""',
        "'00123",
    ],
)
def test_a_spreadsheet_s_guard_on_an_order_number_is_taken_off(tmp_path, cell):
    snap = snapshot(write(tmp_path / "orders.csv", HEADER + f"{cell},a@example.com,shipped,Hat\n"))
    status, text, _ = answered(snap, "00123", "a@example.com")
    assert status == 200 and text.startswith("Order 00123 was found and has shipped."), text


@pytest.mark.parametrize("cell", ['"="""""', "'"])
def test_a_guard_around_nothing_is_an_empty_cell_to_the_rules(tmp_path, cell):
    # A cancellation date of ="" is no cancellation: the order is answered as shipped, not as cancelled.
    text = "Order ID,Email,Status,Item,Cancelled at\n" + f"1,a@example.com,shipped,Hat,{cell}\n"
    status, said, _ = answered(snapshot(write(tmp_path / "orders.csv", text)), "1", "a@example.com")
    assert status == 200 and said.startswith("Order 1 was found and has shipped."), said


def test_guards_taken_off_are_counted_in_check_and_healthz(tmp_path, capsys):
    text = (
        TRACKED + '"=""1001""",a@example.com,shipped,Hat,"=""1Z999AA10123456784""",UPS\n'
        "1002,b@example.com,shipped,Cap,1Z999AA10123456785,UPS\n"
    )
    code, out = checked(capsys, write(tmp_path / "orders.csv", text))
    assert code == 0
    assert "cells    a spreadsheet's marks taken off 2 cells (Excel's =\"...\" guard, a leading '" in out
    assert served(tmp_path, text).get("/healthz", key=KEY).json["rows_read"]["cells_unguarded"] == 2


def test_a_leading_apostrophe_taken_off_is_counted(tmp_path, capsys):
    text = TRACKED + "1,a@example.com,shipped,Hat,'1Z999AA10123456784,UPS\n"
    _, out = checked(capsys, write(tmp_path / "orders.csv", text))
    assert "marks taken off 1 cell " in out, out


def test_guards_alone_raise_no_warning_of_damaged_cells(tmp_path, capsys):
    text = TRACKED + '1,a@example.com,shipped,Hat,"=""1Z999AA10123456784""",UPS\n'
    _, out = checked(capsys, write(tmp_path / "orders.csv", text))
    assert "damaged by a spreadsheet" not in out, out


WITHHELD = "Order 3 was found and has shipped with UPS. It contains Cap. No tracking link is available for it."

# Tracking numbers a spreadsheet damaged for good, as CSV rows of order 3: (rows, the export's separator).
DAMAGED = [
    pytest.param("3,c@example.com,shipped,Cap,3.60003E+14,UPS", id="scientific"),
    pytest.param("3,c@example.com,shipped,Cap,3.6E+14,UPS", id="scientific-short"),
    pytest.param("3,c@example.com,shipped,Cap,360002771597232.0,UPS", id="point-zero"),
    pytest.param('3,c@example.com,shipped,Cap,"3,60003E+14",UPS', id="scientific-decimal-comma"),
    pytest.param("3;c@example.com;shipped;Cap;3,60003E+14;UPS", id="scientific-decimal-comma-semicolons"),
]


def damaged_export(row):
    """Order 1 with a good tracking number, then row, with the separator row uses."""
    head = TRACKED + "1,a@example.com,shipped,Hat,1Z999AA10123456784,UPS\n"
    return (head.replace(",", ";") if row.startswith("3;") else head) + row + "\n"


@pytest.mark.parametrize("row", DAMAGED)
def test_a_damaged_tracking_number_is_withheld_and_counted_in_check(tmp_path, capsys, row):
    path = write(tmp_path / "orders.csv", damaged_export(row))
    snap = snapshot(path)
    assert answered(snap, "3", "c@example.com") == (200, WITHHELD, None)  # still found; no number, no link
    assert answered(snap, "1", "a@example.com")[1] == SHOWN
    code, out = checked(capsys, path)
    assert code == 0
    assert (
        "warning  1 tracking_number cell damaged by a spreadsheet (scientific notation such as 3,60003E+14, lost "
        "digits, a .0 added): withheld, never shown. Download the export again without opening it in a "
        "spreadsheet, or format the column as text before saving it"
    ) in out


@pytest.mark.parametrize("row", DAMAGED)
def test_damaged_cells_show_on_healthz_metrics_and_the_status_page(tmp_path, row):
    client = served(tmp_path, damaged_export(row))
    assert client.lookup("3", "c@example.com").context == WITHHELD
    assert client.get("/healthz", key=KEY).json["rows_read"]["cells_withheld"] == {"tracking_number": 1}
    assert scrape(client)[("orders_cells_withheld", (("field", "tracking_number"),))] == 1
    notes = [n for n in page_notes(client) if "damaged by a spreadsheet" in n]
    assert len(notes) == 1 and notes[0].startswith("1 tracking_number cell damaged by a spreadsheet")
    assert "format the column as text" in notes[0]


def test_a_damaged_number_beside_a_good_one_in_one_cell_leaves_the_good_one(tmp_path):
    snap = snapshot(
        write(tmp_path / "orders.csv", TRACKED + '3,c@example.com,shipped,Cap,"3.60003E+14; 1Z999AA10123456785",UPS\n')
    )
    status, text, url = answered(snap, "3", "c@example.com")
    assert status == 200
    assert "(tracking number 1Z999AA10123456785)" in text and "E+14" not in text
    assert url == "https://www.ups.com/track?tracknum=1Z999AA10123456785"


def test_an_order_number_given_a_point_zero_is_found_and_shown_without_it(tmp_path, capsys):
    # A .0 added to a whole number loses nothing: the order is found by the number customers know, shown so.
    path = write(tmp_path / "orders.csv", HEADER + ten_orders() + "100012345.0,a@example.com,shipped,Hat\n")
    _, out = checked(capsys, path)
    assert "order_id cell damaged" not in out
    status, text, _ = answered(snapshot(path), "100012345", "a@example.com")
    assert status == 200 and text.startswith("Order 100012345 was found") and "100012345.0" not in text, text


def test_an_order_number_in_scientific_notation_is_counted_as_lost(tmp_path, capsys):
    path = write(tmp_path / "orders.csv", HEADER + ten_orders() + "1.00012E+8,a@example.com,shipped,Hat\n")
    _, out = checked(capsys, path)
    assert "1 order_id cell damaged by a spreadsheet" in out and "cannot be found by their number" in out


def test_an_email_column_with_a_few_placeholders_is_still_the_email_column(tmp_path, capsys):
    # Orders taken by phone: "n/a" in three of thirteen e-mail cells. The column is still the e-mail column.
    rows = [f"{i},c{i}@example.com,shipped,Hat" for i in range(1, 11)] + [f"{i},n/a,shipped,Hat" for i in range(11, 14)]
    path = write(tmp_path / "orders.csv", HEADER + "\n".join(rows) + "\n")
    assert answered(snapshot(path), "3", "c3@example.com")[0] == 200
    code, out = checked(capsys, path)
    assert code == 0 and "3 rows left out as rows whose e-mail cell holds no address" in out
