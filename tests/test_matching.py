"""Matching: order numbers and emails as customers type them."""

import json

import pytest
from conftest import KEY, ROOT, Client, make_settings, started, write

import app


@pytest.mark.parametrize("typed", ["#1001", "1001", " # 1001 ", "1001.0", "#1001.00", "1-0-0-1"])
def test_order_number_forms_are_one(typed):
    assert app.normalise_order_id(typed) == "1001"


@pytest.mark.parametrize("a, b", [("SO-00042", "so00042"), ("ab#12", "AB-12"), ("#00123", "00123")])
def test_letters_compare_without_case_and_leading_zeros_are_kept(a, b):
    assert app.normalise_order_id(a) == app.normalise_order_id(b)
    assert app.normalise_order_id("#00123") != app.normalise_order_id("123")


@pytest.mark.parametrize("typed", ["1001.5", "1001.05", "1001.01"])
def test_only_a_trailing_point_zero_is_dropped(typed):
    assert app.normalise_order_id(typed) != "1001"


@pytest.mark.parametrize(
    "order_id, email",
    [
        ("#1001", "jane@example.com"),
        ("1001", " JANE@Example.COM "),
        (" # 1001 ", "jane@example.com"),
        ("1001.0", "Jane@example.com"),
    ],
)
def test_lookup_matches_typed_variants(client, order_id, email):
    assert client.lookup(order_id, email).status == 200


def test_mixed_case_email_in_the_export_matches(client):
    assert client.lookup("1002", "sam@example.com").status == 200


@pytest.mark.parametrize("query", ["jo%2Bshop%40example.com", "jo+shop@example.com", "JO+Shop@example.com"])
def test_a_plus_address_matches_whether_or_not_the_caller_encoded_it(tmp_path, contexts_file, query):
    export = write(tmp_path / "data" / "orders.csv", "Order Number,Email,Status\n5,jo+shop@example.com,shipped\n")
    client = Client(app.create_app(started(make_settings(export.parent, contexts_file))))
    assert client.get("/lookup", f"order_id=5&customer_email={query}", key=KEY).status == 200


@pytest.mark.parametrize(
    "order_id, email",
    [
        ("1001", "sam@example.com"),  # another customer's email
        ("1002", "jane@example.com"),  # the other way round
        ("10011", "jane@example.com"),
        ("100", "jane@example.com"),
        ("1001", "jane@example.co"),
    ],
)
def test_both_must_belong_to_the_same_order(client, order_id, email):
    assert client.lookup(order_id, email).status == 404


# Numbers that read alike after '#' and punctuation are dropped, as multi-store exports and prefixes make them.
ALIKE = """Order Number,Email,Status,Item,Tracking Number,Carrier
#1001,jane@example.com,unfulfilled,Wool Socks,,
1001,bob@example.com,shipped,Snow Boots,1Z999AA10123456784,UPS
A-12,kim@example.com,unfulfilled,Scarf,,
A12,kim@example.com,shipped,Mittens,1Z999AA10123456785,UPS
7,lee@example.com,unfulfilled,Hat,,
7,ann@example.com,shipped,Gloves,1Z999AA10123456786,UPS
"""


@pytest.fixture(params=["together", "apart"])
def alike(request, tmp_path):
    """The export above, its rows in order or with each order's rows scattered (read again, holding all)."""
    lines = ALIKE.splitlines()
    if request.param == "apart":
        lines = [lines[0], *lines[1::2], *lines[2::2], "5,x@example.com,unfulfilled,Cap,,", "5,,,Belt,,"]
        lines.insert(1, "5,,,Belt,,")
    path = write(tmp_path / "orders.csv", "\n".join(lines) + "\n")
    return app.build_snapshot(app.load_config(ROOT / "contexts.toml"), path)


def ask(snapshot, order_id, email):
    status, body = app.answer(snapshot, order_id, email)
    return status, json.loads(body)


@pytest.mark.parametrize(
    "order_id, email, has, lacks",
    [
        ("#1001", "jane@example.com", "Wool Socks", "Snow Boots"),
        ("1001", "jane@example.com", "Wool Socks", "Snow Boots"),
        ("1001", "bob@example.com", "Snow Boots", "Wool Socks"),
        ("7", "lee@example.com", "Hat", "Gloves"),
        ("7", "ann@example.com", "Gloves", "Hat"),
    ],
)
def test_orders_of_different_customers_never_merge(alike, order_id, email, has, lacks):
    status, body = ask(alike, order_id, email)
    assert status == 200 and has in body["context"] and lacks not in body["context"]


@pytest.mark.parametrize("typed, has, lacks", [("A-12", "Scarf", "Mittens"), ("a12", "Mittens", "Scarf")])
def test_one_customers_alike_numbers_answer_the_one_typed_exactly(alike, typed, has, lacks):
    status, body = ask(alike, typed, "kim@example.com")
    assert status == 200 and has in body["context"] and lacks not in body["context"]


def test_one_customers_alike_numbers_typed_otherwise_answer_both(alike):
    status, body = ask(alike, "A 12", "kim@example.com")
    assert status == 200 and "Order A-12 was found" in body["context"] and "Order A12 was found" in body["context"]
    assert body["tracking_url"] == "https://www.ups.com/track?tracknum=1Z999AA10123456785"  # the only link


def test_alike_numbers_are_counted_apart(alike):
    assert alike.orders == 6 + (alike.source.read_text().count("\n5,") > 0)
    assert alike.orders_sharing == 1


def test_check_reports_numbers_that_read_alike(capsys, tmp_path):
    path = write(tmp_path / "orders.csv", ALIKE)
    assert app.main(["check", "--data", str(path)]) == 0
    out = capsys.readouterr().out
    assert "warning  3 order numbers are written in ways that read alike" in out
    assert "1 share an email with another" in out


def test_one_customers_rows_interleaved_with_anothers_stay_one_order(tmp_path):
    path = write(
        tmp_path / "o.csv",
        "Order Number,Email,Status,Item\n#1001,jane@shop-a.com,fulfilled,Apron\n"
        "#1001,bob@shop-b.com,unfulfilled,Mug\n#1001,jane@shop-a.com,,Cap\n",
    )
    snapshot = app.build_snapshot(app.load_config(ROOT / "contexts.toml"), path)
    status, body = ask(snapshot, "1001", "jane@shop-a.com")
    assert status == 200 and body["context"].count("was found") == 1
    assert "Apron, Cap" in body["context"] and "Mug" not in body["context"]
    assert snapshot.orders == 2


RELAYED = (
    "order-id\tbuyer-email\tproduct-name\tquantity-purchased\n"
    "114-1\tx0kgf9fe5xy9gk@marketplace.amazon.de\tLamp\t1\n"
    "114-2\t3af1ste55n8nrbj@marketplace.amazon.co.uk\tShade\t2\n"
)


@pytest.mark.parametrize(
    "header, addresses, marketplace",
    [
        ("buyer-email", ("x0kgf9fe5xy9gk@marketplace.amazon.de", "3af1ste55n8nrbj@marketplace.amazon.co.uk"), "Amazon"),
        ("Buyer Email", ("43ad1d549beae3625950@members.ebay.de", "74684c24ca049e0c2e13@members.ebay.com"), "eBay"),
        ("Email", ("32818112E02443689A0744011F043312@relay.walmart.com", "4B20D3A3D3F8@relay.walmart.com"), "Walmart"),
        ("Virtual email", ("a81f@orders.examplemarket.com", "b72c@orders.examplemarket.com"), "the marketplace"),
    ],
)
def test_a_marketplaces_relay_addresses_are_named_where_the_merchant_looks(
    tmp_path, capsys, header, addresses, marketplace
):
    text = RELAYED.replace("buyer-email", header)
    for old, new in zip(
        ("x0kgf9fe5xy9gk@marketplace.amazon.de", "3af1ste55n8nrbj@marketplace.amazon.co.uk"), addresses
    ):
        text = text.replace(old, new)
    export = write(tmp_path / "data" / "report.txt", text)
    code = app.main(["check", "--data", str(export), "--contexts", str(ROOT / "contexts.toml")])
    out = capsys.readouterr().out
    assert code == 0
    assert f"all of the e-mail addresses looked at are {marketplace}'s relay addresses" in out
    assert "lookups by a customer's e-mail will not find these orders" in out
    service = started(make_settings(export.parent, ROOT / "contexts.toml"))
    health = Client(app.create_app(service)).get("/healthz", key=KEY).json
    assert health["relay_addresses"] == {"marketplace": marketplace, "addresses": 2, "of": 2}


def test_the_shops_own_addresses_are_no_relay(tmp_path, capsys):
    export = write(tmp_path / "data" / "orders.csv", "Order,Email\n1,ana@amazon.com\n2,bo@ebay.de\n")
    assert app.main(["check", "--data", str(export), "--contexts", str(ROOT / "contexts.toml")]) == 0
    assert "relay" not in capsys.readouterr().out
