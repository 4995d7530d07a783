"""The exports merchants schedule, read by layouts that are data (layouts.toml, or contexts.toml).

Each fixture in tests/fixtures/ is built from the platform's documented headers and value
shapes (tests/fixtures/README.md names the sources); each lookup checks the sentence a
customer would hear: found, the right state, the right items, the tracking link.
"""

import json
import shutil

import pytest
from conftest import ROOT, write, write_xlsx
from conftest import answered as ask
from conftest import checked as check

import app

FIXTURES = ROOT / "tests" / "fixtures"
CONTEXTS = ROOT / "contexts.toml"


def served(name, contexts=CONTEXTS):
    return app.build_snapshot(app.load_config(contexts), FIXTURES / name)


CASES = {
    "matrixify_orders.csv": (
        "Matrixify orders export (Shopify)",
        [
            (
                "#1001",
                "ana@example.com",
                "Order #1001 was found and has shipped on 21 Nov 2026 with DHL Express (tracking "
                "number JD014600006281234567). It can be followed with the tracking link. It "
                "contains 1 x Wool Hat, 2 x Scarf.",
                "https://www.dhl.com/global-en/home/tracking/tracking-express.html?submit=1&tracking-id=JD014600006281234567",
            ),
            ("1002", "ben@example.com", "Order #1002 was found, but it was cancelled", None),
            (
                "1003",
                "cy@example.com",
                "Order #1003 was found. It was placed on 27 Nov 2026. It contains 3 x Tea Towel. "
                "It has not shipped yet",
                None,
            ),
            (
                "1004",
                "dan@example.com",
                "Order #1004 was found and has been delivered. It contained 1 x Linen Apron.",
                "https://www.ups.com/track?tracknum=1Z999AA10123456784",
            ),
            (
                "1005",
                "eve@example.com",
                "Order #1005 was found. Part of it has shipped on 26 Nov 2026: 1 x Canvas Tote. "
                "Not shipped yet: 2 x Enamel Mug.",
                "https://www.ups.com/track?tracknum=1Z999AA10123456785",
            ),
        ],
    ),
    "webtoffee_orders.csv": (
        "WooCommerce: WebToffee Order Export",
        [
            (
                "1234",
                "ana@example.com",
                "Order 1234 was found and has shipped with ups (tracking number 1Z999AA10123456784). "
                "It can be followed with the tracking link. It contains 1 x Wool Hat, 2 x Scarf.",
                "https://www.ups.com/track?tracknum=1Z999AA10123456784",
            ),
            (
                "1235",
                "ben@example.com",
                "Order 1235 was found. It was placed on 21 Nov 2026. It contains 2 x Mug. It has not shipped yet",
                None,
            ),
            ("1236", "cy@example.com", "Order 1236 was found, but it was cancelled", None),
            (
                "1237",
                "dan@example.com",
                "Order 1237 was found. It contains 1 x Linen Apron, Gift wrapping. It is on hold",
                None,
            ),
            (
                "1238",
                "eve@example.com",
                "Order 1238 was found and has shipped with Pigeon Post (tracking number PP123).",
                "https://pigeon.example/track/PP123",
            ),
        ],
    ),
    "skyverge_default.csv": (
        "WooCommerce: Customer / Order / Coupon Export",
        [
            (
                "1234",
                "ana@example.com",
                "Order 1234 was found and has shipped with dhl (tracking number JD014600006281234567). "
                "It can be followed with the tracking link. It contains 1 x Wool Hat, 1 x Scarf: "
                "red|wool.",
                # Plain "dhl" is not known to be Express: dhl.com's parcel page finds Paket and Express numbers alike.
                "https://www.dhl.com/global-en/home/tracking/tracking-parcel.html?submit=1&tracking-id=JD014600006281234567",
            ),
            (
                "1235",
                "ben@example.com",
                "Order 1235 was found. It was placed on 21 Nov 2026. It contains 2 x Mug. It has not shipped yet",
                None,
            ),
            ("WC-01236", "cy@example.com", "Order WC-01236 was found. It has been refunded", None),
        ],
    ),
    "skyverge_one_row_per_item.csv": (
        "WooCommerce: Customer / Order / Coupon Export, one row per item",
        [
            (
                "1234",
                "ana@example.com",
                "Order 1234 was found and has shipped. It contains 1 x Wool Hat, 1 x Scarf. No "
                "tracking link is available for it.",
                None,
            ),
            (
                "1235",
                "ben@example.com",
                "Order 1235 was found. It was placed on 21 Nov 2026. It contains 2 x Mug.",
                None,
            ),
        ],
    ),
    "woocommerce_tracking_columns.csv": (
        "WooCommerce orders export",
        [
            (
                "1240",
                "ana@example.com",
                "Order 1240 was found and has shipped with FedEx (tracking number 123456789012). It "
                "can be followed with the tracking link. It contains 1 x Wool Hat, 1 x Scarf.",
                "https://www.fedex.com/fedextrack/?trknbr=123456789012",
            ),
            (
                "1241",
                "ben@example.com",
                "Order 1241 was found. It was placed on 21 Nov 2026. It contains 2 x Mug. It has not shipped yet",
                None,
            ),
        ],
    ),
    "bigcommerce_orders.csv": (
        "BigCommerce orders export",
        [
            (
                "1042",
                "ana.ruiz@example.com",
                "Order 1042 was found and has shipped on 26 Nov 2026. It contains 2 x Enamel "
                "Camp Mug, 1 x Canvas Tote. No tracking link is available for it.",
                None,
            ),
            (
                "1043",
                "ben.cole@example.net",
                "Order 1043 was found. It was placed on 27 Nov 2026. It contains 1 x Organic "
                "Tee, Green. It has not shipped yet",
                None,
            ),
            ("1044", "chen.li@example.org", "Order 1044 was found, but it was cancelled", None),
            (
                "1045",
                "dee@example.org",
                "Order 1045 was found and is ready to be picked up. It contains 1 x Trail Cap.",
                None,
            ),
        ],
    ),
    "squarespace_orders.csv": (
        "Squarespace orders export",
        [
            (
                "124",
                "dana@example.com",
                "Order 00124 was found. It was placed on 26 Nov 2026. It contains 1 x Wool Scarf "
                "(Grey), 1 x Knit Beanie (Navy). It has not shipped yet",
                None,
            ),
            (
                "#00125",
                "eli@example.com",
                "Order 00125 was found and has shipped on 28 Nov 2026. It contains 1 x Wool "
                "Scarf (Red). No tracking link is available for it.",
                None,
            ),
            ("00126", "flo@example.com", "Order 00126 was found, but it was cancelled", None),
        ],
    ),
    "wix_orders.csv": (
        "Wix orders export",
        [
            (
                "10231",
                "fay@example.com",
                "Order 10231 was found and has shipped (tracking number 1Z999AA10123456784). It "
                "contains 2 x Linen Apron (Color:Sand | Size:M), 1 x Tea Towel. No tracking link is "
                "available",
                None,
            ),
            (
                "10232",
                "gus@example.com",
                "Order 10232 was found. It contains 1 x Linen Apron (Color:Olive | "
                "Size:L). Its payment has not been confirmed yet",
                None,
            ),
            (
                "10233",
                "hal@example.com",
                "Order 10233 was found. It was placed on 28 Nov 2026. It contains 1 x Tea Towel. "
                "It has not shipped yet",
                None,
            ),
            ("10234", "ivy@example.com", "Order 10234 was found, but it was cancelled", None),
        ],
    ),
    "magento_order_grid.csv": (
        "Magento / Adobe Commerce order grid export",
        [
            (
                "311",
                "hana@example.com",
                "Order 000000311 was found and has shipped. It contains the items ordered. No "
                "tracking link is available for it.",
                None,
            ),
            (
                "#000000312",
                "ivan@example.com",
                "Order 000000312 was found. It was placed on 27 Nov 2026. It "
                "contains the items ordered. It has not shipped yet",
                None,
            ),
            (
                "000000313",
                "jo@example.com",
                "Order 000000313 was found. It contains the items ordered. Its payment has not been confirmed yet",
                None,
            ),
            ("314", "kai@example.com", "Order 000000314 was found, but it was cancelled", None),
            ("315", "lu@example.com", "Order 000000315 was found. It has been refunded", None),
        ],
    ),
}
LOOKUPS = [(name, *case) for name, (_, cases) in CASES.items() for case in cases]


@pytest.fixture(scope="module")
def snapshots():
    return {name: served(name) for name in CASES}


@pytest.mark.parametrize("name, order_id, email, text, url", LOOKUPS)
def test_each_layout_answers_its_orders(snapshots, name, order_id, email, text, url):
    status, context, tracking_url = ask(snapshots[name], order_id, email)
    assert status == 200 and context.startswith(text) and tracking_url == url


@pytest.mark.parametrize("name", CASES)
def test_check_names_the_layout_and_explains_every_warning(capsys, name):
    code, out = check(capsys, FIXTURES / name)
    assert code == 0 and f"({CASES[name][0]}, modified " in out
    warnings = [line for line in out.splitlines() if line.startswith("warning")]
    expected = {
        "matrixify_orders.csv": ["'gift card line' is neither items nor tracking"],
        "webtoffee_orders.csv": ["1 packed item did not read as the layout says"],
    }.get(name, [])
    assert len(warnings) == len(expected) and all(e in w for e, w in zip(expected, warnings)), warnings


def test_matrixify_rows_of_other_kinds_never_become_items(snapshots):
    _, context, _ = ask(snapshots["matrixify_orders.csv"], "1001", "ana@example.com")
    for not_an_item in ("Standard", "WELCOME10", "x Wool Hat, 2 x Scarf, 1 x Wool Hat"):
        assert not_an_item not in context
    assert "Gift note" not in ask(snapshots["matrixify_orders.csv"], "1005", "eve@example.com")[1]


def test_matrixify_reads_the_same_from_its_workbook(tmp_path):
    import csv

    with open(FIXTURES / "matrixify_orders.csv", newline="") as f:
        rows = list(csv.reader(f))
    path = write_xlsx(tmp_path / "Orders.xlsx", {"Customers": [["ID", "Email"]], "Orders": rows})
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), path)
    assert snapshot.layout == "Matrixify orders export (Shopify)"
    for _, order_id, email, text, url in (case for case in LOOKUPS if case[0] == "matrixify_orders.csv"):
        status, context, tracking_url = ask(snapshot, order_id, email)
        assert status == 200 and context.startswith(text) and tracking_url == url


def test_matrixify_without_an_email_column_reads_customer_email(tmp_path):
    text = (FIXTURES / "matrixify_orders.csv").read_text()
    header, *rows = text.splitlines()
    columns = header.split(",")
    at = columns.index("Email")
    cut = [",".join(c for i, c in enumerate(line.split(",")) if i != at) for line in (header, *rows)]
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), write(tmp_path / "orders.csv", "\n".join(cut) + "\n"))
    assert snapshot.columns["email"] == "Customer: Email"
    assert ask(snapshot, "1001", "ana@example.com")[0] == 200


def test_matrixify_leaves_out_a_cancelled_fulfillment(tmp_path):
    # #1006: its first parcel's fulfillment was cancelled (and had reported delivered); a second one is on its way.
    head = (
        "5512345678906,#1006,MERGE,1006,fay@example.com,fay@example.com,2026-11-20 10:00:00 +0100,"
        "2026-11-20 10:00:00 +0100,,paid,fulfilled"
    )
    rows = [
        f"{head},Line Item,14011111160,Lamp,Lamp,LMP-1,1,fulfilled,,,,,,,,,",
        f"{head},Fulfillment Line,14011111160,Lamp,Lamp,LMP-1,1,,4400000060,cancelled,2026-11-21 09:00:00 +0100,"
        "UPS,delivered,1Z999AA10100000001,https://www.ups.com/track?tracknum=1Z999AA10100000001,,",
        f"{head},Fulfillment Line,14011111160,Lamp,Lamp,LMP-1,1,,4400000061,success,2026-11-22 09:00:00 +0100,"
        "UPS,in_transit,1Z999AA10100000002,https://www.ups.com/track?tracknum=1Z999AA10100000002,,",
    ]
    text = (FIXTURES / "matrixify_orders.csv").read_text() + "\n".join(rows) + "\n"
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), write(tmp_path / "orders.csv", text))
    status, context, url = ask(snapshot, "1006", "fay@example.com")
    assert status == 200 and context.startswith(
        "Order #1006 was found and has shipped on 22 Nov 2026 with UPS (tracking number 1Z999AA10100000002)."
    )
    assert "1Z999AA10100000001" not in context + url and "delivered" not in context


def without_column(name, header_text):
    """A fixture's text with one column taken out (no cell of these fixtures holds a comma)."""
    lines = (FIXTURES / name).read_text().splitlines()
    at = lines[0].split(",").index(header_text)
    return "\n".join(",".join(c for i, c in enumerate(line.split(",")) if i != at) for line in lines) + "\n"


def test_a_layouts_columns_are_the_only_ones_read_for_its_fields(tmp_path, capsys):
    # Without "Order Fulfillment Status", [columns]' "Fulfillment Status" would read "Fulfillment: Status":
    # a parcel's "success", not the order's state.
    path = write(tmp_path / "orders.csv", without_column("matrixify_orders.csv", "Order Fulfillment Status"))
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), path)
    assert "status" not in snapshot.columns
    code, out = check(capsys, path)
    assert (
        "no status column (the Matrixify orders export (Shopify) layout reads it from 'Order Fulfillment Status')"
        in out
    )
    assert "add its header to [layouts.matrixify.columns] status." in out


def test_a_shipped_layout_is_changed_key_by_key_from_contexts(tmp_path, contexts_file):
    text = without_column("matrixify_orders.csv", "Order Fulfillment Status").replace(
        "Fulfillment: Status", "Fulfillment: Status,Order State", 1
    )
    lines = text.splitlines()
    at = lines[0].split(",").index("Order State")
    rows = [line.split(",") for line in lines[1:]]
    for row in rows:
        row.insert(at, "fulfilled" if row[1] == "#1001" else "")
    path = write(tmp_path / "orders.csv", "\n".join([lines[0], *map(",".join, rows)]) + "\n")
    contexts_file.write_text(contexts_file.read_text() + '\n[layouts.matrixify.columns]\nstatus = ["Order State"]\n')
    snapshot = app.build_snapshot(app.load_config(contexts_file), path)
    assert snapshot.layout == "Matrixify orders export (Shopify)" and snapshot.columns["status"] == "Order State"
    assert snapshot.columns["tracking_number"] == "Fulfillment: Tracking Number"  # the shipped columns stay
    assert "has shipped" in ask(snapshot, "1001", "ana@example.com")[1]


def test_two_customers_told_apart_only_by_customer_email_are_two_orders(tmp_path):
    # Two stores' numbers merged into one export: #2001 twice, Email empty, only Customer: Email tells them apart.
    header = "Name,Email,Customer: Email,Order Fulfillment Status,Line: Type,Line: Title,Line: Quantity\n"
    rows = "#2001,,gus@example.com,fulfilled,Line Item,Kettle,1\n#2001,,hal@example.com,,Line Item,Teapot,1\n"
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), write(tmp_path / "orders.csv", header + rows))
    assert "1 x Kettle." in ask(snapshot, "2001", "gus@example.com")[1]
    hal = ask(snapshot, "2001", "hal@example.com")[1]
    assert "1 x Teapot" in hal and "Kettle" not in hal and "has shipped" not in hal


def test_a_workbook_sheet_is_found_by_a_layouts_order_number_header(tmp_path):
    # Magento's order number is "ID", which [columns] does not name: the sheet is still found, not the first.
    import csv

    with open(FIXTURES / "magento_order_grid.csv", newline="") as f:
        rows = list(csv.reader(f))
    path = write_xlsx(tmp_path / "orders.xlsx", {"Notes": [["Exported by", "Jo"]], "Orders": rows})
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), path)
    assert snapshot.layout == "Magento / Adobe Commerce order grid export" and snapshot.orders == len(rows) - 1


def test_a_bigcommerce_product_name_with_the_item_separator_stays_one_item(tmp_path):
    text = (FIXTURES / "bigcommerce_orders.csv").read_text().replace("Enamel Camp Mug", "Enamel Camp Mug | Blue")
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), write(tmp_path / "orders.csv", text))
    assert (
        "It contains 2 x Enamel Camp Mug | Blue, 1 x Canvas Tote." in ask(snapshot, "1042", "ana.ruiz@example.com")[1]
    )


@pytest.mark.parametrize(
    "a, b",
    [
        ("order_number", "Order Number"),
        ("Customer: Email", "customer email"),
        ("Line-Item  Name", "line_item_name"),
        ("E-mail", "e mail"),
    ],
)
def test_headers_compare_loosely(a, b):
    assert app.header_key(a) == app.header_key(b)


def test_columns_that_read_alike_or_compete_are_named_by_check(capsys, tmp_path):
    path = write(
        tmp_path / "orders.csv",
        "Order Number,Customer: Email,Customer Email,Email,Status\n"
        "1,a@example.com,b@example.com,c@example.com,shipped\n",
    )
    code, out = check(capsys, path)
    assert (
        'column   email              <- "Email" (header words: "email"; 1 of 1 are e-mail addresses; also fits: '
        "'Customer: Email')" in out
    )
    assert "warning  columns 'Customer: Email' and 'Customer Email' read alike" in out


def test_a_new_typed_and_packed_layout_needs_only_contexts_toml_lines(tmp_path, contexts_file):
    # An ERP we never saw: typed rows ("Row" is H, I or P) and items packed in one cell.
    contexts_file.write_text(
        contexts_file.read_text()
        + """
[layouts.acme_erp]
name = "ACME ERP export"
detect = ["Beleg", "Satzart"]
rows = { type = "Satzart", items = ["I"], tracking = ["P"], other = ["H"] }
items = { columns = ["Bundle"], format = "count", between = "," }
columns.order_id = ["Beleg"]
columns.email = ["Mail"]
columns.item_name = ["Text"]
columns.item_quantity = ["Menge"]
columns.tracking_number = ["Paket"]
columns.status = ["Zustand"]
"""
    )
    path = write(
        tmp_path / "acme.csv",
        "Beleg,Satzart,Mail,Zustand,Text,Menge,Paket,Bundle\n"
        "A-7,H,kim@example.com,shipped,,,,\n"
        "A-7,I,,,Desk,1,,\n"
        'A-7,I,,,,,,"2x Lamp, 1x Rug"\n'
        "A-7,P,,,Desk,1,1Z999AA10123456784,\n",
    )
    snapshot = app.build_snapshot(app.load_config(contexts_file), path)
    assert snapshot.layout == "ACME ERP export"
    status, context, _ = ask(snapshot, "a7", "kim@example.com")
    assert status == 200 and "It contains 1 x Desk, 2 x Lamp, 1 x Rug." in context
    assert "tracking number 1Z999AA10123456784" in context


def test_a_layout_in_contexts_toml_replaces_the_shipped_one(tmp_path, contexts_file):
    contexts_file.write_text(
        contexts_file.read_text()
        + """
[layouts.wix]
name = "Wix, our way"
detect = ["Order number", "Contact email"]
columns.order_id = ["Order number"]
columns.email = ["Contact email"]
"""
    )
    config = app.load_config(contexts_file)
    assert [layout.name for layout in config.layouts if layout.key == "wix"] == ["Wix, our way"]
    shutil.copy(FIXTURES / "wix_orders.csv", tmp_path / "wix.csv")
    assert app.build_snapshot(config, tmp_path / "wix.csv").layout == "Wix, our way"


def test_magento_without_the_email_column_says_how_to_export_it(tmp_path):
    lines = (FIXTURES / "magento_order_grid.csv").read_text().splitlines()
    cut = [line.replace(",hana@example.com", "").replace('"Customer Email",', "") for line in lines[:2]]
    with pytest.raises(app.ExportError) as refused:
        app.build_snapshot(app.load_config(CONTEXTS), write(tmp_path / "grid.csv", "\n".join(cut) + "\n"))
    assert "Magento / Adobe Commerce order grid export carries no buyer's e-mail address" in str(refused.value)
    assert "Default View" in str(refused.value)


@pytest.mark.parametrize(
    "text, says",
    [
        ('[layouts.x]\nname = 1\ndetect = ["A"]\n', "[layouts.x] name: should be"),
        ("[layouts.x]\ndetect = []\n", "[layouts.x] detect: is empty"),
        ('[layouts.x]\ndetect = ["A"]\nitems = { columns = ["B"], format = "xml" }\n', "[layouts.x] items format"),
        ('[layouts.x]\ndetect = ["A"]\nrows = { kind = "B" }\n', "[layouts.x] rows: has the unknown key 'kind'"),
        ('[layouts.x]\ndetect = ["A"]\ncolour = "red"\n', "[layouts.x] colour: is not a known key"),
        ('[layouts.x]\ndetect = ["A"]\nrows = { ignore = ["B"] }\n', "[layouts.x] rows.ignore: should be"),
        ('[layouts.x]\ndetect = ["A"]\nrows = { ignore = { B = 1 } }\n', "[layouts.x] rows.ignore.B: should be"),
    ],
)
def test_a_layout_with_a_mistake_is_a_clear_config_error(contexts_file, text, says):
    contexts_file.write_text(contexts_file.read_text() + "\n" + text)
    with pytest.raises(app.ConfigError) as caught:
        app.load_config(contexts_file)
    assert says in str(caught.value) and str(caught.value).startswith("contexts.toml:")


def test_an_unreadable_packed_cell_is_shown_as_written_and_counted(capsys):
    code, out = check(capsys, FIXTURES / "webtoffee_orders.csv")
    assert (
        "warning  1 packed item did not read as the layout says (e.g. 'Gift wrapping'); each is shown as "
        "written, with no quantity" in out
    )


# WebToffee's line_item_N cells (see tests/fixtures/README.md), one that lost its name key:
# nothing made up, and counted.
BROKEN_PACKED = (
    "order_number,status,customer_email,line_item_1,line_item_2\n"
    "603,completed,ann@example.com,name:Hat|quantity:2,sku:HAT-1|quantity:3\n"
)


def test_a_packed_item_without_its_name_gets_no_made_up_quantity(tmp_path, capsys):
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), write(tmp_path / "o.csv", BROKEN_PACKED))
    context = json.loads(app.answer(snapshot, "603", "ann@example.com")[1])["context"]
    assert "2 x Hat, sku:HAT-1|quantity:3" in context and "1 x sku" not in context
    code, out = check(capsys, tmp_path / "o.csv")
    assert "1 packed item did not read as the layout says (e.g. 'sku:HAT-1|quantity:3')" in out


def test_the_shopify_shaped_load_takes_the_plain_path():
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), ROOT / "data" / "sample_orders.csv")
    assert snapshot.layout == "Shopify orders export" and not snapshot.packer.plan.rich


def test_a_packed_tracking_entry_without_a_number_is_left_out_and_counted(tmp_path, capsys):
    text = (FIXTURES / "skyverge_default.csv").read_text()
    header, first, *rest = text.splitlines(keepends=True)
    broken = first.replace("tracking_number:JD014600006281234567|", "")  # the entry kept its carrier, lost its number
    assert broken != first
    path = write(tmp_path / "o.csv", header + broken + "".join(rest))
    code, out = check(capsys, path)
    assert "warning  1 packed tracking entry had no tracking number the layout reads (e.g. " in out
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), path)
    context = json.loads(app.answer(snapshot, "1234", "ana@example.com")[1])["context"]
    assert "JD014600006281234567" not in context and "tracking number" not in context


def test_snake_case_tracking_columns_are_read_like_their_headers(tmp_path):
    # As WooCommerce plugins and scripts name them (tracking_number, tracking_provider).
    text = (
        "order_number,customer_email,status,item_name,tracking_number,tracking_provider\n"
        "881,kim@example.com,completed,Lamp,1Z999AA10123456784,UPS\n"
    )
    snapshot = app.build_snapshot(app.load_config(CONTEXTS), write(tmp_path / "o.csv", text))
    body = json.loads(app.answer(snapshot, "881", "kim@example.com")[1])
    assert "with UPS (tracking number 1Z999AA10123456784)" in body["context"]
    assert body["tracking_url"] == "https://www.ups.com/track?tracknum=1Z999AA10123456784"
