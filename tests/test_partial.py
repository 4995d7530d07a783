"""Counts and partial states: an item is counted only where the export gives its count, an order that left in
part says what left and what did not, a line that needs no shipping is never "not shipped yet", an order open for
long is not worded as if it ships soon, parcels are tied to their items; and the shipped answers promise nothing
an export does not hold, while a shop's contexts.toml that still carries an old promising answer is told so.

Each case is a small export written here; what is checked is the context the chat agent repeats to the customer
as fact, or what `check`, /healthz and the status page tell the merchant.
"""

import base64
import datetime
import html
import json
import os
import re
import tomllib

import pytest
from conftest import (
    KEY,
    ROOT,
    Client,
    answered,
    checked,
    make_settings,
    started,
    write,
    write_xlsx,
)

import app

CONTEXTS = ROOT / "contexts.toml"
SHOPIFY = (
    "Name,Email,Financial Status,Fulfillment Status,Fulfilled at,Created at,Lineitem quantity,Lineitem name,"
    "Lineitem requires shipping,Lineitem fulfillment status,Tracking Number,Tracking Company"
)


def snapshot(tmp_path, text, contexts=CONTEXTS, name="orders.csv"):
    """The snapshot a service would serve for an export written as text (or as workbook rows, for .xlsx)."""
    path = write_xlsx(tmp_path / name, text) if name.endswith(".xlsx") else write(tmp_path / name, text)
    return app.build_snapshot(app.load_config(contexts), path)


def context(snap, order_id="1", email="a@example.com"):
    status, text, _ = answered(snap, order_id, email)
    assert status == 200, text
    return text


def edited(tmp_path, old, new):
    """A copy of the shipped contexts.toml with old replaced by new."""
    text = CONTEXTS.read_text()
    assert old in text, old
    return write(tmp_path / "contexts.toml", text.replace(old, new, 1))


# --- quantities: a count only where the export gives one ------------------------------------------------


def test_without_a_quantity_column_items_are_named_without_a_count(tmp_path):
    snap = snapshot(
        tmp_path, "Order ID,Email,Status,Item\n1,a@example.com,processing,Hat\n1,a@example.com,processing,Scarf\n"
    )
    assert context(snap) == "Order 1 was found. It contains Hat, Scarf. It has not shipped yet."


@pytest.mark.parametrize("written", ["3", "3.0000", '"3,0"', "3.00", "3.0", " 3 "])
def test_a_whole_quantity_is_a_count_however_it_is_written(tmp_path, written):
    snap = snapshot(tmp_path, f"Order ID,Email,Status,Item,Quantity\n1,a@example.com,processing,Hat,{written}\n")
    assert context(snap) == "Order 1 was found. It contains 3 x Hat. It has not shipped yet."


def test_a_decimal_comma_quantity_of_a_semicolon_export_is_a_count(tmp_path):
    snap = snapshot(tmp_path, "Order ID;Email;Status;Item;Quantity\n1;a@example.com;processing;Hat;3,0\n")
    assert context(snap) == "Order 1 was found. It contains 3 x Hat. It has not shipped yet."


def test_a_workbook_quantity_of_3_0_is_3(tmp_path):
    snap = snapshot(
        tmp_path,
        {
            "Orders": [
                ["Order ID", "Email", "Status", "Item", "Quantity"],
                ["1", "a@example.com", "processing", "Hat", 3.0],
            ]
        },
        name="orders.xlsx",
    )
    assert context(snap) == "Order 1 was found. It contains 3 x Hat. It has not shipped yet."


def test_a_packed_item_written_without_a_count_gets_none(tmp_path):
    # A layout that packs "2x Lamp, Gift wrapping" in one cell: the wrapping's count is not written, so none is told.
    contexts = write(
        tmp_path / "contexts.toml",
        CONTEXTS.read_text()
        + """
[layouts.bundles]
name = "Bundles export"
detect = ["Ref", "Bundle"]
items = { columns = ["Bundle"], format = "count", between = "," }
columns.order_id = ["Ref"]
columns.email = ["Mail"]
""",
    )
    snap = snapshot(
        tmp_path, 'Ref,Mail,Status,Bundle\nA-7,kim@example.com,shipped,"2x Lamp, Gift wrapping"\n', contexts
    )
    assert "It contains 2 x Lamp, Gift wrapping." in context(snap, "A-7", "kim@example.com")


def test_a_quantity_that_is_no_number_is_left_out_not_made_1(tmp_path):
    snap = snapshot(
        tmp_path,
        "Order ID,Email,Status,Item,Quantity\n1,a@example.com,processing,Hat,\n"
        "1,a@example.com,processing,Scarf,two\n1,a@example.com,processing,Belt,2\n",
    )
    assert context(snap) == "Order 1 was found. It contains Hat, Scarf, 2 x Belt. It has not shipped yet."


# A shipped or done quantity beside the ordered one: (header row, rows, the answer).
SHIPPED_QUANTITIES = [
    # A delivery's demand and done quantity (Odoo): the done 0 is not "0 x Hat".
    (
        "Order ID,Email,Product,Demand,Quantity Done",
        ["1,a@example.com,Hat,3,0", "1,a@example.com,Scarf,2,2"],
        "Order 1 was found. Part of it has shipped: 2 x Scarf. Not shipped: 3 x Hat.",
    ),
    (
        "Order ID,Email,Product,Demand,Quantity Done",
        ["1,a@example.com,Hat,3,0"],
        "Order 1 was found. It contains 3 x Hat. It has not shipped yet.",
    ),
    # Amazon's quantity-purchased and quantity-shipped: a line shipped below its ordered quantity.
    (
        "order-id,buyer-email,product-name,quantity-purchased,quantity-shipped",
        ["1,a@example.com,Hat,3,1", "1,a@example.com,Scarf,2,2"],
        "Order 1 was found. Part of it has shipped: 1 x Hat, 2 x Scarf. Not shipped: 2 x Hat.",
    ),
    (
        "order-id,buyer-email,product-name,quantity-purchased,quantity-shipped",
        ["1,a@example.com,Hat,3,3"],
        "Order 1 was found and has shipped. It contains 3 x Hat. No tracking link is available for it.",
    ),
    # The order says shipped, a line's shipped quantity says not all of it: not the whole order as shipped.
    (
        "Order ID,Email,Status,Item,Quantity Ordered,Quantity Shipped",
        ["1,a@example.com,shipped,Hat,3,1", "1,a@example.com,shipped,Scarf,2,2"],
        "Order 1 was found. Part of it has shipped: 1 x Hat, 2 x Scarf. Not shipped: 2 x Hat.",
    ),
]


@pytest.mark.parametrize("header, rows, wanted", SHIPPED_QUANTITIES)
def test_a_shipped_quantity_says_how_much_of_the_ordered_one_left(tmp_path, header, rows, wanted):
    snap = snapshot(tmp_path, "\n".join([header, *rows]) + "\n")
    assert context(snap) == wanted


# --- partial states -----------------------------------------------------------------------------------


def shopify(tmp_path, *rows, contexts=CONTEXTS):
    return snapshot(tmp_path, "\n".join([SHOPIFY, *rows]) + "\n", contexts=contexts)


@pytest.mark.parametrize("fulfillment", ["fulfilled", "partial"])
def test_a_partly_refunded_shopify_order_with_a_pending_line_is_not_answered_as_shipped(tmp_path, fulfillment):
    # The case: partially_refunded, one line fulfilled, the other (refunded, never sent) pending.
    snap = shopify(
        tmp_path,
        f"#1,a@example.com,partially_refunded,{fulfillment},2024-02-02 10:00:00 +0100,"
        "2024-02-01 10:00:00 +0100,1,Board,true,fulfilled,1Z999AA10123456784,UPS",
        "#1,,,,,,1,Wax,true,pending,,",
    )
    assert context(snap, "#1") == (
        "Order #1 was found. Part of its payment has been refunded. Shipped: 1 x Board. Not shipped: 1 x Wax."
    )


def test_a_line_partly_shipped_without_a_count_claims_no_number(tmp_path):
    snap = shopify(
        tmp_path,
        "#1,a@example.com,paid,partial,,2024-02-01 10:00:00 +0100,2,Board,true,partial,,",
        "#1,,,,,,1,Wax,true,pending,,",
    )
    text = context(snap, "#1")
    assert text == (
        "Order #1 was found. Part of it has shipped: part of 2 x Board. Not shipped yet: part of 2 x Board, 1 x Wax."
    )
    assert "Still to ship: 2 x Board" not in text and "1 x Board" not in text


def test_a_partial_line_beside_a_shipped_one(tmp_path):
    snap = shopify(
        tmp_path,
        "#1,a@example.com,paid,partial,2024-02-02 10:00:00 +0100,2024-02-01 10:00:00 +0100,"
        "2,Board,true,partial,1Z999AA10123456784,UPS",
        "#1,,,,,,1,Wax,true,fulfilled,,",
    )
    assert context(snap, "#1") == (
        "Order #1 was found. Part of it has shipped on 2 Feb 2024: part of 2 x Board, "
        "1 x Wax. Not shipped yet: part of 2 x Board."
    )


@pytest.mark.parametrize("line_status", ["refunded", "cancelled", "canceled", "restocked", "pending"])
def test_a_line_that_did_not_leave_is_never_listed_as_shipped(tmp_path, line_status):
    snap = snapshot(
        tmp_path,
        "Order ID,Email,Status,Item,Qty,Item Status\n1,a@example.com,shipped,Hat,1,shipped\n"
        f"1,a@example.com,shipped,Scarf,2,{line_status}\n",
    )
    assert context(snap) == "Order 1 was found. Part of it has shipped: 1 x Hat. Not shipped: 2 x Scarf."


# A line the export says was refunded, by a refunded quantity (Magento's Item Qty Refunded, Wix's Quantity
# refunded): never told as shipped, or as still to ship, but as refunded. (header row, rows, the answer.)
REFUNDED_QUANTITIES = [
    pytest.param(
        "Order ID,Email,Status,Item,Item Qty Ordered,Item Qty Shipped,Item Qty Refunded",
        ["1,a@example.com,complete,Hat,1,1,0", "1,a@example.com,complete,Scarf,2,0,2"],
        "Order 1 was found and has shipped. It contains 1 x Hat. Refunded: 2 x Scarf. No tracking link is "
        "available for it.",
        id="shipped-0-refunded-2",
    ),
    pytest.param(
        "Order ID,Email,Status,Item,Item Qty Ordered,Item Qty Refunded",
        ["1,a@example.com,complete,Hat,1,0", "1,a@example.com,complete,Scarf,2,2"],
        "Order 1 was found and has shipped. It contains 1 x Hat. Refunded: 2 x Scarf. No tracking link is "
        "available for it.",
        id="refunded-2",
    ),
    pytest.param(
        "Order ID,Email,Status,Item,Quantity Ordered,Quantity Shipped,Quantity Refunded",
        ["1,a@example.com,shipped,Hat,1,1,0", "1,a@example.com,shipped,Scarf,3,1,2"],
        "Order 1 was found and has shipped. It contains 1 x Hat, 1 x Scarf. Refunded: 2 x Scarf. No tracking "
        "link is available for it.",
        id="1-of-3-shipped-2-refunded",
    ),
    pytest.param(
        "Order ID,Email,Status,Item,Item Qty Ordered,Item Qty Refunded",
        ["1,a@example.com,processing,Hat,1,0", "1,a@example.com,processing,Scarf,2,2"],
        "Order 1 was found. It contains 1 x Hat. Refunded: 2 x Scarf. It has not shipped yet.",
        id="processing-refunded-2",
    ),
    pytest.param(
        "Order ID,Email,Status,Item,Item Qty Ordered,Item Qty Refunded",
        ["1,a@example.com,complete,Hat,1,1", "1,a@example.com,complete,Scarf,2,2"],
        "Order 1 was found. It has been refunded.",
        id="all-refunded",
    ),
]


@pytest.mark.parametrize("header, rows, wanted", REFUNDED_QUANTITIES)
def test_a_refunded_quantity_is_told_as_refunded_never_as_shipped_or_to_ship(tmp_path, header, rows, wanted):
    assert context(snapshot(tmp_path, "\n".join([header, *rows]) + "\n")) == wanted


# --- lines that need no shipping ----------------------------------------------------------------------


def test_an_order_of_digital_lines_is_not_answered_as_not_shipped(tmp_path):
    snap = shopify(
        tmp_path,
        "#1,a@example.com,paid,unfulfilled,,2026-11-30 10:00:00 +0100,1,E-book,false,pending,,",
        "#1,,,,,,1,Monthly Subscription,false,pending,,",
    )
    text = context(snap, "#1")
    assert text == "Order #1 was found. It contains 1 x E-book, 1 x Monthly Subscription, which need no shipping."


def test_a_spanish_export_s_non_physical_product_needs_no_shipping(tmp_path):
    snap = snapshot(
        tmp_path,
        "Número de orden,Email,Estado del envío,Nombre del producto,Cantidad del producto,"
        "Producto Físico\n1,a@example.com,No está empaquetado,Curso online,1,No\n",
    )
    assert context(snap) == "Order 1 was found. It contains 1 x Curso online, which need no shipping."


def test_a_subscription_line_of_a_partly_shipped_order_is_not_still_to_ship(tmp_path):
    snap = shopify(
        tmp_path,
        "#1,a@example.com,paid,partial,2026-12-01 10:00:00 +0100,2026-11-30 10:00:00 +0100,"
        "1,Board,true,fulfilled,1Z999AA10123456784,UPS",
        "#1,,,,,,1,Monthly Subscription,false,pending,,",
        "#1,,,,,,1,Wax,true,pending,,",
    )
    assert (
        context(snap, "#1")
        == "Order #1 was found. Part of it has shipped on 1 Dec 2026: 1 x Board. Not shipped yet: 1 x Wax."
    )


def test_a_digital_line_beside_an_unshipped_physical_one_is_not_told_as_unshipped(tmp_path):
    snap = snapshot(
        tmp_path,
        "Número de orden,Email,Estado del envío,Nombre del producto,Cantidad del producto,"
        "Producto Físico\n1,a@example.com,No está empaquetado,Curso online,1,No\n"
        "1,a@example.com,No está empaquetado,Taza,2,Sí\n",
    )
    assert context(snap) == (
        "Order 1 was found. It contains 1 x Curso online, 2 x Taza. It has not shipped yet (no "
        "shipping is needed for 1 x Curso online)."
    )


# --- an order open for long ---------------------------------------------------------------------------

NOT_SHIPPED = "Order 1 was found. It was placed on {placed}. It contains 1 x Hat. It has not shipped yet."
NOT_SHIPPED_LONG = (
    "Order 1 was found. It was placed on {placed} and has not shipped; the shop's records say nothing "
    "of when it will. It contains 1 x Hat. The customer can ask support about it."
)


def noon(day):
    return datetime.datetime.fromisoformat(f"{day}T12:00:00+00:00").timestamp()


# (the order date as exported, the day it reads as, the day the export was made, [settings] overdue_days,
# the answer expected).
OVERDUE = [
    ("2026-01-01 09:00:00 +0000", "1 Jan 2026", "2026-01-02", 30, NOT_SHIPPED),
    ("2026-01-01 09:00:00 +0000", "1 Jan 2026", "2026-01-31", 30, NOT_SHIPPED),  # 30 days: not more than 30
    ("2026-01-01 09:00:00 +0000", "1 Jan 2026", "2026-02-01", 30, NOT_SHIPPED_LONG),
    ("2024-02-01 09:00:00 +0000", "1 Feb 2024", "2026-12-01", 30, NOT_SHIPPED_LONG),  # years open
    ("2026-01-01", "1 Jan 2026", "2026-01-09", 7, NOT_SHIPPED_LONG),
    ("2026-01-01", "1 Jan 2026", "2026-01-08", 7, NOT_SHIPPED),
    ("25/12/2025", "25 Dec 2025", "2026-03-01", 30, NOT_SHIPPED_LONG),  # a day-first date, told by 25
    pytest.param("01/02/2026", "01/02/2026", "2026-03-09", 7, NOT_SHIPPED_LONG, id="undecided-but-late-either-way"),
    pytest.param("01/02/2026", "01/02/2026", "2026-02-05", 7, NOT_SHIPPED, id="undecided-and-late-one-way-only"),
]


@pytest.mark.parametrize("placed, day, made, overdue_days, wanted", OVERDUE)
def test_an_order_open_longer_than_overdue_days_is_not_worded_as_shipping_soon(
    tmp_path, placed, day, made, overdue_days, wanted
):
    contexts = edited(tmp_path, "overdue_days = 30", f"overdue_days = {overdue_days}")
    path = write(
        tmp_path / "data" / "orders.csv",
        f"Order ID,Email,Status,Order Date,Item,Qty\n1,a@example.com,unfulfilled,{placed},Hat,1\n",
    )
    os.utime(path, (noon(made), noon(made)))  # the export's time: the day it was made
    snap = app.build_snapshot(app.load_config(contexts), path)
    assert context(snap) == wanted.format(placed=day)


# --- parcels ------------------------------------------------------------------------------------------

PARCELS = (
    'shipped_tracked = "Order {order_id} was found and has shipped[ on {shipped_at}][ with {carrier}]',
    (
        'shipped_tracked = "Order {order_id} was found and has shipped[ on {shipped_at}][ with {carrier}]'
        "[ in parcels {parcels}]"
    ),
)
FIRST_ROW = "#1,a@example.com,paid,fulfilled,2026-11-20 10:00:00 +0100,2026-11-19 10:00:00 +0100"


@pytest.mark.parametrize(
    "rows, parcels",
    [
        (
            [
                f"{FIRST_ROW},1,Hat,true,fulfilled,1Z999AA10123456784,UPS",
                "#1,,,,,,2,Scarf,true,fulfilled,1Z999AA10123456785,UPS",
            ],
            " in parcels 1Z999AA10123456784 (1 x Hat); 1Z999AA10123456785 (2 x Scarf) ",
        ),
        (
            [
                f"{FIRST_ROW},1,Hat,true,fulfilled,1Z999AA10123456784,UPS",
                "#1,,,,,,2,Scarf,true,fulfilled,1Z999AA10123456785,UPS",
                "#1,,,,,,1,Belt,true,fulfilled,1Z999AA10123456784,UPS",
            ],
            " in parcels 1Z999AA10123456784 (1 x Hat, 1 x Belt); 1Z999AA10123456785 (2 x Scarf) ",
        ),
        (
            [f"{FIRST_ROW},1,Hat,true,fulfilled,1Z999AA10123456784,UPS", "#1,,,,,,2,Scarf,true,fulfilled,,"],
            " ",
        ),  # one parcel: nothing to tie
        pytest.param(
            [
                f'{FIRST_ROW},1,Hat,true,fulfilled,"1Z999AA10123456784, 1Z999AA10123456785",UPS',
                "#1,,,,,,2,Scarf,true,fulfilled,,",
            ],
            " ",
            id="two-numbers-in-one-cell",
        ),
    ],
)
def test_parcels_name_each_tracking_number_with_the_items_of_its_rows(tmp_path, rows, parcels):
    snap = shopify(tmp_path, *rows, contexts=edited(tmp_path, *PARCELS))
    text = context(snap, "#1")
    assert text.startswith(f"Order #1 was found and has shipped on 20 Nov 2026 with UPS{parcels}(tracking number "), (
        text
    )


def test_the_default_answer_ties_each_parcel_to_its_items(tmp_path):
    snap = shopify(
        tmp_path,
        f"{FIRST_ROW},1,Hat,true,fulfilled,1Z999AA10123456784,UPS",
        "#1,,,,,,2,Scarf,true,fulfilled,1Z999AA10123456785,UPS",
    )
    text = context(snap, "#1")
    assert "1Z999AA10123456784 (1 x Hat)" in text and "1Z999AA10123456785 (2 x Scarf)" in text, text


# --- no promises --------------------------------------------------------------------------------------

# What no export says: how soon orders ship, how and when refunds are paid, what support will do.
PROMISES = [
    "business days",
    "original payment method",
    "will be refunded",
    "ships within",
    "ship within",
    "the rest will follow",
    "ships once",
    "support will help",
    "support can help",
    "refunds can take",
    "will arrive",
    "within 24 hours",
]
SHIPPED_TEMPLATES = tomllib.loads(CONTEXTS.read_text())["templates"]


@pytest.mark.parametrize("name", sorted(SHIPPED_TEMPLATES))
def test_no_shipped_answer_makes_a_promise(name):
    text = SHIPPED_TEMPLATES[name].casefold()
    assert [p for p in PROMISES if p in text] == []


def test_the_shipped_contexts_toml_holds_no_old_promising_answer(capsys, tmp_path):
    assert app.load_config(CONTEXTS).promising == ()
    path = write(tmp_path / "orders.csv", "Order ID,Email,Status,Item\n1,a@example.com,processing,Hat\n")
    code, out = checked(capsys, path)
    assert code == 0 and "word for word an earlier release's answer" not in out


OLD_ANSWERS = tomllib.loads((ROOT / "history.toml").read_text())["templates"]


def with_template(tmp_path, name, text):
    """A copy of the shipped contexts.toml whose template name is text."""
    shipped = CONTEXTS.read_text()
    changed = re.sub(
        rf"^{name} = \".*\"$", lambda _: f"{name} = {json.dumps(text)}", shipped, count=1, flags=re.MULTILINE
    )
    assert changed != shipped
    return write(tmp_path / "contexts.toml", changed)


@pytest.mark.parametrize("old", OLD_ANSWERS, ids=[f"{o['name']}-{i}" for i, o in enumerate(OLD_ANSWERS)])
def test_check_warns_of_an_old_shipped_answer_that_promises(tmp_path, capsys, old):
    contexts = with_template(tmp_path, old["name"], old["text"])
    path = write(tmp_path / "orders.csv", "Order ID,Email,Status,Item\n1,a@example.com,processing,Hat\n")
    code, out = checked(capsys, path, contexts)
    assert code == 0
    assert (
        f"warning  [templates] {old['name']} is word for word an earlier release's answer, which promises "
        f"{old['promises']}: no export holds that. Keep it only if your shop makes that promise"
    ) in out


def test_an_old_answer_the_shop_reworded_is_its_own(tmp_path, capsys):
    old = next(o for o in OLD_ANSWERS if o["name"] == "processing")
    contexts = with_template(tmp_path, "processing", old["text"].replace("two business days", "three business days"))
    path = write(tmp_path / "orders.csv", "Order ID,Email,Status,Item\n1,a@example.com,processing,Hat\n")
    code, out = checked(capsys, path, contexts)
    assert code == 0 and "word for word an earlier release's answer" not in out
    assert "orders normally ship within three business days" in context(
        app.build_snapshot(app.load_config(contexts), path)
    )


def test_an_old_promising_answer_shows_on_healthz_and_the_status_page(tmp_path):
    old = next(o for o in OLD_ANSWERS if o["name"] == "refunded")
    contexts = with_template(tmp_path, "refunded", old["text"])
    write(tmp_path / "data" / "orders.csv", "Order ID,Email,Status,Item\n1,a@example.com,refunded,Hat\n")
    client = Client(app.create_app(started(make_settings(tmp_path / "data", contexts))))
    note = (
        f"[templates] refunded is word for word an earlier release's answer, which promises {old['promises']}: "
        "no export holds that."
    )
    notes = client.get("/healthz", key=KEY).json["notes"]
    assert [n for n in notes if n.startswith(note)] != [], notes
    page = client.get(
        "/", headers={"Authorization": "Basic " + base64.b64encode(f"x:{KEY}".encode()).decode()}, key=None
    )
    assert page.status == 200
    listed = re.search(r'<ul id="notes">(.*?)</ul>', page.body.decode(), re.DOTALL)
    assert listed and note in html.unescape(listed[1])
    # The shop's wording still answers: it is theirs to keep or change.
    assert client.lookup("1", "a@example.com").context == old["text"].replace("{order_id}", "1")
