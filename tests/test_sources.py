"""Real exports as shops produce them, served by the default contexts.toml unmodified.

Each export is built here, byte for byte or cell by cell, the way Shopify,
WooCommerce, an ERP or Excel writes it; lookups then go end to end.
"""

import datetime
import json
import re
import zipfile

import pytest
from conftest import ROOT, write, write_xlsx

import app

CONTEXTS = ROOT / "contexts.toml"


def served(path):
    """The Snapshot the default contexts.toml makes of an export."""
    return app.build_snapshot(app.load_config(CONTEXTS), app.find_export(path))


def ask(snapshot, order_id, email):
    """(status, context, tracking_url) for a lookup."""
    status, body = app.answer(snapshot, order_id, email)
    body = json.loads(body)
    return status, body["context"], body.get("tracking_url")


# --- Shopify -----------------------------------------------------------------

SHOPIFY = """Name,Email,Financial Status,Paid at,Fulfillment Status,Fulfilled at,Accepts Marketing,Currency,Subtotal,Created at,Lineitem quantity,Lineitem name,Lineitem price,Lineitem sku,Lineitem fulfillment status,Billing Name,Shipping City,Cancelled at,Id,Tags
#2001,ann@example.com,paid,2026-11-27 09:00:00 -0500,unfulfilled,,no,USD,10.00,2026-11-27 09:00:00 -0500,1,Mug,10.00,MUG,pending,Ann A,Boston,,1,
#2002,bob@example.com,paid,2026-11-20 09:00:00 -0500,fulfilled,2026-11-21 09:00:00 -0500,no,USD,20.00,2026-11-20 09:00:00 -0500,2,Tea,10.00,TEA,fulfilled,Bob B,Austin,,2,
#2003,cat@example.com,paid,2026-11-20 09:00:00 -0500,partial,2026-11-21 09:00:00 -0500,no,USD,30.00,2026-11-20 09:00:00 -0500,1,Kettle,20.00,KET,fulfilled,Cat C,Denver,,3,
#2003,cat@example.com,,,,,,,,2026-11-20 09:00:00 -0500,1,Filter,10.00,FIL,pending,,,,,
#2004,dan@example.com,refunded,2026-11-20 09:00:00 -0500,restocked,,no,USD,5.00,2026-11-20 09:00:00 -0500,1,Spoon,5.00,SPO,restocked,Dan D,Miami,,4,
#2005,eve@example.com,refunded,2026-11-20 09:00:00 -0500,fulfilled,2026-11-21 09:00:00 -0500,no,USD,5.00,2026-11-20 09:00:00 -0500,1,Cup,5.00,CUP,fulfilled,Eve E,Reno,,5,
#2006,fay@example.com,pending,,unfulfilled,,no,USD,5.00,2026-11-20 09:00:00 -0500,1,Lid,5.00,LID,pending,Fay F,Waco,,6,
#2007,gus@example.com,paid,2026-11-20 09:00:00 -0500,unfulfilled,,no,USD,5.00,2026-11-20 09:00:00 -0500,1,Tray,5.00,TRA,pending,Gus G,Yuma,2026-11-21 10:00:00 -0500,7,
#2008,hal@example.com,paid,2026-11-20 09:00:00 -0500,partial,,no,USD,5.00,2026-11-20 09:00:00 -0500,1,Jar,5.00,JAR,,Hal H,Ames,,8,
"""


@pytest.fixture(scope="module")
def shopify(tmp_path_factory):
    return served(write(tmp_path_factory.mktemp("shopify") / "orders_export_1.csv", SHOPIFY))


@pytest.mark.parametrize(
    "order_id, email, text",
    [
        (
            "#2001",
            "ann@example.com",
            "Order #2001 was found. It was placed on 27 Nov 2026. It contains 1 x Mug. It has not shipped yet.",
        ),
        (
            "#2002",
            "bob@example.com",
            "Order #2002 was found and has shipped on 21 Nov 2026. It contains 2 x Tea. "
            "No tracking link is available for it.",
        ),
        (
            "#2003",
            "cat@example.com",
            "Order #2003 was found. Part of it has shipped on 21 Nov 2026: 1 x Kettle. Not shipped yet: 1 x Filter.",
        ),
        # No refund method or duration: no export holds them, and the shipped answers promise none.
        ("#2004", "dan@example.com", "Order #2004 was found, but it was cancelled, so it will not ship."),
        ("#2005", "eve@example.com", "Order #2005 was found. It has been refunded."),
        (
            "#2006",
            "fay@example.com",
            "Order #2006 was found. It contains 1 x Lid. Its payment has not been confirmed yet.",
        ),
        ("#2007", "gus@example.com", "Order #2007 was found, but it was cancelled, so it will not ship."),
        (
            "#2008",
            "hal@example.com",
            "Order #2008 was found. Part of it has shipped; the rest has not shipped yet. It contains 1 x Jar.",
        ),
    ],
)
def test_shopify_statuses_get_fitting_answers(shopify, order_id, email, text):
    status, context, url = ask(shopify, order_id, email)
    assert status == 200 and context.startswith(text) and url is None


def test_shopify_layout_and_columns_are_detected(shopify):
    assert shopify.layout == "Shopify orders export"
    assert shopify.columns["order_id"] == "Name" and shopify.columns["item_name"] == "Lineitem name"


# --- WooCommerce -------------------------------------------------------------

WOO = """Order Number,Order Status,Order Date,First Name (Billing),Email (Billing),Item #,Name,SKU,Quantity,Item Cost,Order Total Amount
5001,processing,2026-11-27 10:00,Ann,ann@example.com,1,Hoodie - M,HOOD-M,1,40,40
5002,completed,2026-11-20 10:00,Bob,bob@example.com,1,Cap,CAP,2,10,20
5003,on-hold,2026-11-26 10:00,Cat,cat@example.com,1,Scarf,SCA,1,15,15
5004,cancelled,2026-11-26 10:00,Dan,dan@example.com,1,Gloves,GLO,1,12,12
5005,refunded,2026-11-26 10:00,Eve,eve@example.com,1,Beanie,BEA,1,9,9
5006,failed,2026-11-26 10:00,Fay,fay@example.com,1,Socks,SOC,3,5,15
5007,pending,2026-11-26 10:00,Gus,gus@example.com,1,Belt,BEL,1,25,25
5008,processing,2026-11-27 11:00,Hal,hal@example.com,1,Tee - S,TEE-S,2,15,45
5008,processing,2026-11-27 11:00,Hal,hal@example.com,2,Tote,TOTE,1,15,45
"""


@pytest.fixture(scope="module")
def woo(tmp_path_factory):
    return served(write(tmp_path_factory.mktemp("woo") / "orders-2026-11-28.csv", WOO))


@pytest.mark.parametrize(
    "order_id, email, text",
    [
        (
            "5001",
            "ann@example.com",
            "Order 5001 was found. It was placed on 27 Nov 2026. It contains 1 x Hoodie - M. It has not shipped yet",
        ),
        ("5002", "bob@example.com", "Order 5002 was found and has shipped. It contains 2 x Cap."),
        (
            "5003",
            "cat@example.com",
            "Order 5003 was found. It contains 1 x Scarf. It is on hold and has not shipped yet",
        ),
        ("5004", "dan@example.com", "Order 5004 was found, but it was cancelled"),
        ("5005", "eve@example.com", "Order 5005 was found. It has been refunded"),
        ("5006", "fay@example.com", "Order 5006 was found, but its payment failed, so it will not ship."),
        (
            "#5007",
            "gus@example.com",
            "Order 5007 was found. It contains 1 x Belt. Its payment has not been confirmed yet",
        ),
        (
            "5008",
            "hal@example.com",
            "Order 5008 was found. It was placed on 27 Nov 2026. It contains 2 x Tee - S, 1 x Tote.",
        ),
    ],
)
def test_woocommerce_statuses_get_fitting_answers(woo, order_id, email, text):
    status, context, _ = ask(woo, order_id, email)
    assert status == 200 and context.startswith(text)


def test_woocommerce_name_is_the_item_and_order_number_the_order(woo):
    assert woo.layout == "WooCommerce orders export"
    assert woo.columns["order_id"] == "Order Number"
    assert woo.columns["item_name"] == "Name"
    assert woo.columns["email"] == "Email (Billing)"


# --- Generic ERP / hand-made sheet ---------------------------------------------

GENERIC = """Order #,Customer Email,Status,Product,Qty,Tracking Number,Carrier,Tracking URL,Estimated Delivery
A-100,ann@example.com,Shipped,Desk,1,1Z999AA10123456784,UPS,,2026-12-02
A-101,bob@example.com,shipped,Chair,2,JD0002 ; JD0003,DHL Express,,
A-102,cat@example.com,Delivered,Lamp,1,,,,
A-103,dan@example.com,Processing,Shelf,1,,,,
A-104,eve@example.com,In transit,Rug,1,X1,Pigeon Post,https://pigeon.example/track/X1,
A-105,fay@example.com,Shipped,Stool,1,,,,
"""


@pytest.fixture(scope="module")
def generic(tmp_path_factory):
    return served(write(tmp_path_factory.mktemp("erp") / "erp.csv", GENERIC))


@pytest.mark.parametrize(
    "order_id, email, text, url",
    [
        (
            "a100",
            "ann@example.com",
            "Order A-100 was found and has shipped with UPS (tracking number 1Z999AA10123456784). "
            "It can be followed with the tracking link; it is expected to arrive on 2 Dec 2026. "
            "It contains 1 x Desk.",
            "https://www.ups.com/track?tracknum=1Z999AA10123456784",
        ),
        (
            "A-101",
            "bob@example.com",
            "Order A-101 was found and has shipped with DHL Express (tracking number "
            "JD0002, JD0003). It can be followed with the tracking link. It contains 2 x Chair.",
            "https://www.dhl.com/global-en/home/tracking/tracking-express.html?submit=1&tracking-id=JD0002",
        ),
        ("A102", "cat@example.com", "Order A-102 was found and has been delivered. It contained 1 x Lamp.", None),
        ("A103", "dan@example.com", "Order A-103 was found. It contains 1 x Shelf. It has not shipped yet", None),
        (
            "A104",
            "eve@example.com",
            "Order A-104 was found and has shipped with Pigeon Post (tracking number X1).",
            "https://pigeon.example/track/X1",
        ),
        (
            "A105",
            "fay@example.com",
            "Order A-105 was found and has shipped. It contains 1 x Stool. No tracking link is available for it.",
            None,
        ),
    ],
)
def test_generic_exports_get_fitting_answers_and_links(generic, order_id, email, text, url):
    status, context, tracking_url = ask(generic, order_id, email)
    assert status == 200 and context.startswith(text) and tracking_url == url


def test_generic_layout_is_named(generic):
    assert generic.layout == "generic export"
    assert generic.columns["carrier"] == "Carrier" and generic.columns["order_id"] == "Order #"


def test_delivered_and_estimated_dates_read_well_in_check(capsys, tmp_path):
    write(tmp_path / "erp.csv", GENERIC)
    assert app.main(["check", "--data", str(tmp_path / "erp.csv"), "--contexts", str(CONTEXTS)]) == 0
    out = capsys.readouterr().out
    assert "generic export" in out and 'carrier            <- "Carrier"' in out


# --- CSV files that came through Excel --------------------------------------------

PLAIN = "Order Number,Email,Status,Item,Qty\n1001,jane@example.com,shipped,Café crème,2\n1002,sam@example.com,processing,Hat,1\n"


@pytest.mark.parametrize(
    "name, data",
    [
        ("utf-8", PLAIN.encode()),
        ("utf-8 with BOM", b"\xef\xbb\xbf" + PLAIN.encode()),
        ("windows-1252", PLAIN.encode("cp1252")),
        ("latin-1 with a byte cp1252 lacks", PLAIN.replace("Hat", "Hat\x81").encode("latin-1")),
        ("semicolons", PLAIN.replace(",", ";").encode()),
        ("semicolons and decimal commas", PLAIN.replace(",", ";").replace("Hat;1", 'Hat;1;"12,50"').encode()),
        ("excel sep= line", ("sep=;\n" + PLAIN.replace(",", ";")).encode()),
        ("tabs", PLAIN.replace(",", "\t").encode()),
        ("CRLF", PLAIN.replace("\n", "\r\n").encode()),
        ("lone CR", PLAIN.replace("\n", "\r").encode()),
        ("blank trailing rows", (PLAIN + ",,,,\n,,,,\r\n\n").encode()),
        ("headers with stray spaces and case", PLAIN.replace("Order Number,Email", "  order  NUMBER ,EMAIL ").encode()),
    ],
)
def test_csv_quirks_read_the_same(tmp_path, name, data):
    snap = served(write(tmp_path / "orders.csv", data))
    assert snap.orders == 2
    status, context, _ = ask(snap, "1001", "jane@example.com")
    assert status == 200 and "2 x Café crème" in context
    assert ask(snap, "1002", "sam@example.com")[0] == 200


# --- XLSX ----------------------------------------------------------------------


def with_cached_values(path, values):
    """Give formula cells the cached values Excel would have saved (openpyxl writes none)."""
    with zipfile.ZipFile(path) as z:
        parts = {n: z.read(n) for n in z.namelist()}
    sheet = parts["xl/worksheets/sheet1.xml"].decode()
    for formula, value in values.items():
        sheet = re.sub(
            rf'<c r="([A-Z]+\d+)"><f>{re.escape(formula)}</f><v\s*/>',
            rf'<c r="\1" t="str"><f>{formula}</f><v>{value}</v>',
            sheet,
        )
    parts["xl/worksheets/sheet1.xml"] = sheet.encode()
    with zipfile.ZipFile(path, "w") as z:
        for name, data in parts.items():
            z.writestr(name, data)
    return path


def test_xlsx_numbers_text_and_dates(tmp_path):
    path = write_xlsx(
        tmp_path / "orders.xlsx",
        {
            "Orders": [
                [
                    "Order Number",
                    "Email",
                    "Status",
                    "Product",
                    "Quantity",
                    "Tracking Number",
                    "Carrier",
                    "Estimated Delivery",
                ],
                [1001, "ann@example.com", "shipped", "Desk", 1.0, 123456789012, "FedEx", datetime.date(2026, 12, 2)],
                [1002.0, "bob@example.com", "processing", "Lamp", 2, None, None, None],
                ["00123", "cat@example.com", "processing", "Rug", 1, None, None, None],
            ]
        },
    )
    snap = served(path)
    status, context, url = ask(snap, "#1001", "ann@example.com")
    assert status == 200 and context.startswith(
        "Order 1001 was found and has shipped with FedEx (tracking number "
        "123456789012). It can be followed with the tracking link; it is "
        "expected to arrive on 2 Dec 2026."
    )
    assert url == "https://www.fedex.com/fedextrack/?trknbr=123456789012"
    assert ask(snap, "1002", "bob@example.com")[1].startswith("Order 1002 was found. It contains 2 x Lamp.")
    assert ask(snap, "00123", "cat@example.com")[1].startswith("Order 00123 was found")
    assert ask(snap, "123", "cat@example.com")[0] == 404  # leading zeros of a text cell are kept


def test_xlsx_orders_on_a_later_sheet_are_found(tmp_path):
    path = write_xlsx(
        tmp_path / "orders.xlsx",
        {
            "Read me": [["This workbook was exported on 28 Nov 2026"], ["Do not edit"]],
            "Orders": [["Order ID", "Email", "Status"], ["7", "a@example.com", "delivered"]],
        },
    )
    assert ask(served(path), "7", "a@example.com")[1].startswith("Order 7 was found and has been delivered.")


def test_xlsx_named_sheet_from_settings(tmp_path, contexts_file):
    contexts_file.write_text(contexts_file.read_text().replace('sheet = ""', 'sheet = "Shipped"'))
    path = write_xlsx(
        tmp_path / "orders.xlsx",
        {
            "Open": [["Order ID", "Email", "Status"], ["1", "a@example.com", "processing"]],
            "Shipped": [["Order ID", "Email", "Status"], ["2", "b@example.com", "shipped"]],
        },
    )
    snap = app.build_snapshot(app.load_config(contexts_file), path)
    assert snap.orders == 1 and ask(snap, "2", "b@example.com")[0] == 200
    contexts_file.write_text(contexts_file.read_text().replace('sheet = "Shipped"', 'sheet = "Orders"'))
    with pytest.raises(app.ExportError, match="has no sheet 'Orders'. Sheets: Open, Shipped"):
        app.build_snapshot(app.load_config(contexts_file), path)


def test_xlsx_formulas_read_as_their_cached_values(tmp_path):
    path = write_xlsx(
        tmp_path / "orders.xlsx",
        {
            "Sheet1": [
                ["Order Number", "Email", "Status", "Product"],
                ['=CONCAT("#",1001)', "ann@example.com", '=LOWER("SHIPPED")', "Desk"],
            ]
        },
    )
    with_cached_values(path, {'CONCAT("#",1001)': "#1001", 'LOWER("SHIPPED")': "shipped"})
    status, context, _ = ask(served(path), "1001", "ann@example.com")
    assert status == 200 and context.startswith("Order #1001 was found and has shipped.")
