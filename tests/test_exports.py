"""Reading exports: CSV, TSV and XLSX known by their content, line items grouped into orders, the newest file of a
folder."""

import datetime
import os

import pytest
from conftest import checked, write, write_xlsx

import app


def snapshot_of(path, contexts):
    """The Snapshot a service would serve for path."""
    return app.build_snapshot(app.load_config(contexts), app.find_export(path))


def context(snapshot, order_id, email):
    """The context text answered for a lookup, with its status."""
    import json

    status, body = app.answer(snapshot, order_id, email)
    return status, json.loads(body)["context"]


def test_line_items_are_grouped_into_one_order(export, contexts_file):
    snap = snapshot_of(export, contexts_file)
    assert (snap.rows, snap.orders) == (8, 6)
    status, text = context(snap, "1001", "jane@example.com")
    assert status == 200
    assert "2 x Wool Socks, 1 x Beanie" in text


def test_order_fields_come_from_the_first_row_that_has_them(tmp_path, contexts_file):
    # The first row has no status; the second has it, the third repeats it: the order is shipped.
    # (Rows that give different words are in test_honest: then no one of them is taken.)
    csv_text = (
        "Order Number,Email,Status,Item,Qty\nA-1,a@example.com,,Hat,1\nA-1,,shipped,Scarf,2\nA-1,,Shipped,Gloves,1\n"
    )
    snap = snapshot_of(write(tmp_path / "o.csv", csv_text), contexts_file)
    status, text = context(snap, "a1", "a@example.com")
    assert "has shipped" in text and "1 x Hat, 2 x Scarf, 1 x Gloves" in text


def test_rows_of_one_order_need_not_be_adjacent(tmp_path, contexts_file):
    csv_text = "Order ID,Email,Item\n1,a@example.com,Hat\n2,b@example.com,Cap\n1,a@example.com,Scarf\n"
    snap = snapshot_of(write(tmp_path / "o.csv", csv_text), contexts_file)
    assert snap.orders == 2
    assert "It contains Hat, Scarf." in context(snap, "1", "a@example.com")[1]  # no quantity column: no count


def test_xlsx_numeric_order_numbers_read_as_integers(tmp_path, contexts_file):
    path = write_xlsx(
        tmp_path / "orders.xlsx",
        {
            "Orders": [
                ["Order Number", "Email", "Status", "Product", "Quantity"],
                [1001, "jane@example.com", "processing", "Hat", 2.0],
                [1002.0, "sam@example.com", "shipped", "Cap", 1],
            ]
        },
    )
    snap = snapshot_of(path, contexts_file)
    status, text = context(snap, "#1002", "sam@example.com")
    assert status == 200 and text.startswith("Order 1002 was found")
    assert "2 x Hat" in context(snap, "1001", "jane@example.com")[1]


def test_xlsx_numbers_too_long_to_be_exact_are_never_shown(tmp_path, contexts_file, capsys):
    # A USPS tracking number typed into a numeric cell: Excel keeps 15 digits and stores 9.4001118992232e+21.
    path = write_xlsx(
        tmp_path / "orders.xlsx",
        {
            "Orders": [
                ["Order Number", "Email", "Status", "Product", "Tracking Number", "Carrier"],
                [1001, "jane@example.com", "shipped", "Hat", 9.4001118992232e21, "USPS"],
                [1002, "sam@example.com", "shipped", "Cap", 123456789012345, "USPS"],  # 15 digits are exact
            ]
        },
    )
    snap = snapshot_of(path, contexts_file)
    status, text = context(snap, "1001", "jane@example.com")
    assert status == 200 and "has shipped" in text and "94001118992232" not in text and "tracking number" not in text
    assert "tracking number 123456789012345" in context(snap, "1002", "sam@example.com")[1]
    assert app.main(["check", "--data", str(path), "--contexts", str(contexts_file)]) == 0
    assert "warning  1 cells held numbers of 16 or more digits" in capsys.readouterr().out


def test_xlsx_dates_read_as_dates(tmp_path, contexts_file):
    contexts_file.write_text(
        contexts_file.read_text().replace(
            'found = "Order {order_id} was found.', 'found = "Order {order_id} of {order_date} was found.'
        )
    )
    path = write_xlsx(
        tmp_path / "orders.xlsx",
        {
            "Sheet1": [
                ["Order ID", "Email", "Order Date"],
                ["7", "a@example.com", datetime.datetime(2026, 11, 28, 0, 0)],
            ]
        },
    )
    assert "Order 7 of 28 Nov 2026 was found" in context(snapshot_of(path, contexts_file), "7", "a@example.com")[1]


def test_a_folder_serves_its_newest_export(tmp_path, contexts_file):
    old = write(tmp_path / "data" / "orders_2026-11-27.csv", "Order ID,Email\n1,a@example.com\n")
    new = write(tmp_path / "data" / "orders_2026-11-28.csv", "Order ID,Email\n2,b@example.com\n")
    write(tmp_path / "data" / "notes.txt", "not an export")
    write(tmp_path / "data" / "~$orders.xlsx", b"lock file")
    os.utime(old, (1_000_000, 1_000_000))
    assert app.find_export(tmp_path / "data") == new
    snap = snapshot_of(tmp_path / "data", contexts_file)
    assert snap.source == new and context(snap, "2", "b@example.com")[0] == 200


TAB_SEPARATED = "order-id\tbuyer-email\tproduct-name\tquantity-purchased\n114-1\ta@example.com\tLamp\t2\n"


@pytest.mark.parametrize("name", ["orders.txt", "orders.tsv", "orders.tab", "orders", "report.csv"])
def test_a_table_is_read_whatever_its_name_says(tmp_path, contexts_file, name):
    # Amazon offers its order reports only as tab-separated .txt; some systems write no extension.
    write(tmp_path / "data" / name, TAB_SEPARATED)
    snapshot = snapshot_of(tmp_path / "data", contexts_file)
    assert snapshot.source.name == name
    assert context(snapshot, "114-1", "a@example.com") == (
        200,
        "Order 114-1 was found. It contains 2 x Lamp. The shop's records here do not say whether it has shipped yet.",
    )


def test_a_workbook_is_read_as_one_whatever_its_name(tmp_path, contexts_file):
    path = write_xlsx(tmp_path / "book.xlsx", {"Orders": [["Order ID", "Email"], ["7", "a@example.com"]]})
    renamed = path.rename(tmp_path / "orders.csv")  # a merchant's rename, or a download named by its link
    assert context(snapshot_of(renamed, contexts_file), "7", "a@example.com")[0] == 200


def test_excel_unicode_text_is_read(tmp_path, contexts_file):
    # Excel's "Save as Unicode Text": UTF-16 with a byte order mark, tab-separated.
    path = write(tmp_path / "orders.txt", TAB_SEPARATED.replace("Lamp", "Lámpara"), encoding="utf-16")
    assert "It contains 2 x Lámpara." in context(snapshot_of(path, contexts_file), "114-1", "a@example.com")[1]


def test_a_stray_text_file_is_passed_over_not_served(tmp_path, contexts_file, capsys):
    export = write(tmp_path / "data" / "orders.csv", "Order ID,Email\n1,a@example.com\n")
    os.utime(export, (1_000_000, 1_000_000))
    write(tmp_path / "data" / "README.txt", "Exports land here every night.\nAsk Ana before deleting them.\n")
    write(tmp_path / "data" / "notes", "nothing to see")
    assert app.find_export(tmp_path / "data") == export
    code, out = checked(capsys, tmp_path / "data", contexts_file)
    assert code == 0 and "passed over, as they hold no table: README.txt, notes" in out


def test_a_folder_of_only_stray_files_says_so(tmp_path):
    write(tmp_path / "data" / "README.txt", "Exports land here.\n")
    with pytest.raises(app.ExportError, match="README.txt do not hold a table"):
        app.find_export(tmp_path / "data")


def ods_bytes():
    """The first bytes an OpenDocument spreadsheet starts with: a zip whose first entry names its kind."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("mimetype", "application/vnd.oasis.opendocument.spreadsheet")
        archive.writestr("content.xml", "<office:document-content/>")
    return buffer.getvalue()


def zip_of_csv():
    """A zip archive holding a CSV, as some platforms e-mail their exports."""
    import io
    import zipfile

    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("orders.csv", "Order ID,Email\n1,a@example.com\n")
    return buffer.getvalue()


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("orders.xls", b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + bytes(504), "old Excel workbook (.xls)"),
        ("orders.ods", ods_bytes(), "OpenDocument spreadsheet (.ods)"),
        ("orders.csv", zip_of_csv(), "zip archive"),
    ],
)
def test_spreadsheets_not_read_here_are_refused_with_how_to_save_them(tmp_path, contexts_file, name, content, says):
    write(tmp_path / "data" / name, content)
    with pytest.raises(app.ExportError) as caught:
        snapshot_of(tmp_path / "data", contexts_file)
    assert says in str(caught.value) and name in str(caught.value)
    assert "save it as CSV" in str(caught.value) or "Unpack it" in str(caught.value)


def test_only_the_columns_used_are_kept(export, contexts_file):
    config = app.load_config(contexts_file)
    header = ["Order Number", "Email", "Billing Street", "Phone", "Fulfillment Status", "Notes"]
    plan = app.make_plan(config, header, "orders.csv")
    assert "billing_street" not in plan.order_fields and "phone" not in plan.order_fields
    assert {"order_id", "status"} <= set(plan.order_fields)
    assert "email" not in plan.order_fields and plan.email_column == 1  # read for the key, not kept twice


@pytest.mark.parametrize(
    "name, content, says",
    [
        ("orders.csv", "Order Number,Status\n1,shipped\n", "no column for email"),
        ("orders.csv", "Customer,Email\nJane,jane@example.com\n", "no column for order_id"),
        ("orders.csv", "", "is empty"),
        ("orders.csv", b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "binary file"),
        ("orders.xlsx", b"PK\x03\x04 this is not really a workbook", "not a readable XLSX"),
    ],
)
def test_unusable_exports_are_refused_with_a_clear_message(tmp_path, contexts_file, name, content, says):
    path = write(tmp_path / name, content)
    with pytest.raises(app.ExportError) as caught:
        snapshot_of(path, contexts_file)
    message = str(caught.value)
    assert says in message and name in message


def test_a_missing_column_message_lists_what_the_file_has_and_the_fix(tmp_path, contexts_file):
    path = write(tmp_path / "o.csv", "Order Number,Kontaktperson\n1,Jane Roe\n")
    with pytest.raises(app.ExportError) as caught:
        snapshot_of(path, contexts_file)
    assert '"Kontaktperson"' in caught.value.detail  # for `check` at a terminal, not for logs
    assert "[columns] email" in str(caught.value) and "Kontaktperson" not in str(caught.value)


def test_an_empty_folder_says_where_to_drop_the_export(tmp_path):
    (tmp_path / "data").mkdir()
    with pytest.raises(app.ExportError, match="Drop the export there"):
        app.find_export(tmp_path / "data")


SHIPPED = "Order 1 was found and has shipped. It contains {}. No tracking link is available for it."


@pytest.mark.parametrize(
    "row, wanted",
    [
        ("1,a@example.com,paid,shipped,Hat\x1fRed", SHIPPED.format("Hat Red")),  # the character between kept cells
        ("1,a@example.com,paid,shipped,Hat\x1eRed", SHIPPED.format("Hat Red")),  # the one between kept rows
        ("1,a@example.com,pa\x1fid,shipped,Hat", SHIPPED.format("Hat")),  # an order cell before the status
    ],
)
def test_a_cell_holding_a_separator_cannot_shift_the_others(tmp_path, contexts_file, row, wanted):
    path = write(
        tmp_path / "o.csv", f"Order ID,Email,Financial Status,Status,Item\n{row}\n2,b@example.com,paid,shipped,Cap\n"
    )
    snap = snapshot_of(path, contexts_file)
    assert context(snap, "1", "a@example.com") == (200, wanted)
    assert context(snap, "2", "b@example.com")[1].startswith("Order 2 was found and has shipped. It contains Cap.")


@pytest.mark.parametrize(
    "csv_text",
    [
        "Order ID,Email,Status,Item\n1,a@example.com,shipped\n2,b@example.com,processing,Hat\n",  # a short row
        "Order ID,Email,Status,Item\n1,a@example.com\n2,b@example.com,processing,Hat,extra,cells\n",
    ],
)
def test_ragged_rows_are_read_without_shifting_cells(tmp_path, contexts_file, csv_text):
    snap = snapshot_of(write(tmp_path / "o.csv", csv_text), contexts_file)
    assert snap.orders == 2
    assert context(snap, "2", "b@example.com")[1].startswith("Order 2 was found. It contains Hat.")
    assert context(snap, "1", "a@example.com")[0] == 200


@pytest.mark.parametrize(
    "cell",
    [
        '"1Z999AA10123456784, 1Z999AA10123456785"',
        "1Z999AA10123456784;1Z999AA10123456785",
        "1Z999AA10123456784|1Z999AA10123456785",
    ],
)
def test_several_tracking_numbers_in_one_cell_are_each_given(tmp_path, contexts_file, cell):
    text = f"Order Number,Email,Status,Tracking Number,Carrier\nA-1,a@example.com,shipped,{cell},UPS\n"
    snap = snapshot_of(write(tmp_path / "o.csv", text), contexts_file)
    assert "(tracking number 1Z999AA10123456784, 1Z999AA10123456785)" in context(snap, "A-1", "a@example.com")[1]


@pytest.mark.parametrize("delimiter", [";", "\t", "|", ","])
def test_a_title_line_above_the_header_does_not_hide_the_delimiter(tmp_path, contexts_file, capsys, delimiter):
    rows = [
        ["Bestellnummer", "E-Mail", "Status", "Artikel"],
        ["1001", "a@example.de", "versendet", "Tasse"],
        ["1002", "b@example.de", "offen", "Teller"],
    ]
    text = "Bestellungen Export 03.12.2026\n\n" + "".join(delimiter.join(row) + "\n" for row in rows)
    path = write(tmp_path / "orders.csv", text)
    assert context(snapshot_of(path, contexts_file), "1001", "a@example.de")[0] == 200
    code, out = checked(capsys, path, contexts_file)
    assert code == 0 and "1 line before the header left out: 'Bestellungen Export 03.12.2026'" in out
