"""contexts.toml: the default answers, and clear errors for every kind of mistake."""

import json

import pytest
from conftest import ROOT, write

import app


def edit(contexts_file, old, new):
    """Replace text in the test's copy of contexts.toml."""
    text = contexts_file.read_text()
    assert old in text, old
    contexts_file.write_text(text.replace(old, new, 1))
    return contexts_file


@pytest.mark.parametrize(
    "order_id, email, wanted",
    [
        (
            "1001",
            "jane@example.com",
            "Order #1001 was found. It was placed on 27 Nov 2026. It contains 2 x Wool Socks, 1 x Beanie. It has not "
            "shipped yet.",
        ),
        (
            "1002",
            "sam@example.com",
            "Order #1002 was found and has shipped with UPS (tracking number 1Z999AA10123456784).",
        ),
        (
            "1003",
            "alex@example.com",
            "Order #1003 was found. Part of it has shipped: 1 x Trail Runners. Not shipped yet: 3 x Running Socks.",
        ),
        ("1004", "maria@example.com", "Order #1004 was found, but it was cancelled"),
        ("1005", "li@example.com", "Order #1005 was found. It has been refunded"),
    ],
)
def test_default_templates_read_like_the_platforms_examples(client, order_id, email, wanted):
    assert client.lookup(order_id, email).context.startswith(wanted)


def test_the_shipped_sample_data_shows_every_state(tmp_path):
    config = app.load_config(ROOT / "contexts.toml")
    snap = app.build_snapshot(config, app.find_export(ROOT / "data"))
    assert {
        "processing",
        "shipped_tracked",
        "partial_items",
        "cancelled",
        "refunded",
        "shipped",
        "awaiting_payment",
    } <= set(app.survey(snap).answers)
    status, body = app.answer(snap, "#1001", "jane@example.com")
    assert status == 200 and json.loads(body)["context"].startswith("Order #1001 was found")


def test_any_column_is_a_placeholder_by_its_snake_case_header(tmp_path, contexts_file):
    edit(contexts_file, 'found = "Order {order_id} was found.', 'found = "Order {order_id} goes by {ship_via_service}.')
    path = write(tmp_path / "o.csv", "Order ID,Email,Ship Via (Service)\n5,a@example.com,Bike courier\n")
    snap = app.build_snapshot(app.load_config(contexts_file), path)
    assert json.loads(app.answer(snap, "5", "a@example.com")[1])["context"].startswith("Order 5 goes by Bike courier.")


def test_dates_in_templates_are_readable(tmp_path, contexts_file):
    edit(contexts_file, 'found = "Order {order_id} was found.', 'found = "Order {order_id} of {order_date}.')
    path = write(tmp_path / "o.csv", "Order ID,Email,Created at\n5,a@example.com,2025-05-11 09:55:16 -0400\n")
    snap = app.build_snapshot(app.load_config(contexts_file), path)
    assert "Order 5 of 11 May 2025." in json.loads(app.answer(snap, "5", "a@example.com")[1])["context"]


def test_a_rule_can_compare_words_with_a_derived_value(tmp_path, contexts_file):
    text = contexts_file.read_text().replace(
        "[[rules]]", '[[rules]]\nwhen = { item_count = "1" }\ntemplate = "single"\n\n[[rules]]', 1
    )
    contexts_file.write_text(
        text.replace("[templates]\n", '[templates]\nsingle = "Order {order_id} holds one item."\n')
    )
    path = write(
        tmp_path / "o.csv", "Order ID,Email,Item Name,Qty\n5,a@example.com,Hat,1\n6,b@example.com,Hat,1\n6,,Scarf,1\n"
    )
    snap = app.build_snapshot(app.load_config(contexts_file), path)
    assert json.loads(app.answer(snap, "5", "a@example.com")[1])["context"] == "Order 5 holds one item."
    assert json.loads(app.answer(snap, "6", "b@example.com")[1])["context"].startswith("Order 6 was found.")


@pytest.mark.parametrize(
    "item_format, separator, wanted",
    [
        ("{quantity} x {name}", ", ", "It contains 2 x Hat, Scarf."),
        ("{name} ({quantity})", " and ", "It contains Hat (2) and Scarf."),
        ("{{{name}}} x{quantity}", "; ", "It contains {Hat} x2; Scarf."),
    ],
)
def test_items_are_listed_as_the_items_format_says(tmp_path, contexts_file, item_format, separator, wanted):
    edit(contexts_file, 'format = "{quantity} x {name}"', f'format = "{item_format}"')
    edit(contexts_file, 'separator = ", "', f'separator = "{separator}"')
    # A spreadsheet's 2.0 reads 2; an item without a quantity is named without a count, never "1 x".
    path = write(tmp_path / "o.csv", "Order ID,Email,Item Name,Quantity\n5,a@example.com,Hat,2.0\n5,,Scarf,\n")
    snap = app.build_snapshot(app.load_config(contexts_file), path)
    assert wanted in json.loads(app.answer(snap, "5", "a@example.com")[1])["context"]


def test_a_rule_on_any_column_picks_its_template(tmp_path, contexts_file):
    text = contexts_file.read_text().replace(
        "[[rules]]", '[[rules]]\nwhen = { tags = "vip" }\ntemplate = "vip"\n\n[[rules]]', 1
    )
    contexts_file.write_text(
        text.replace("[templates]\n", '[templates]\nvip = "Order {order_id} was found; VIPs get it first."\n')
    )
    path = write(tmp_path / "o.csv", "Order ID,Email,Tags\n5,a@example.com,VIP\n6,b@example.com,\n")
    snap = app.build_snapshot(app.load_config(contexts_file), path)
    assert app.survey(snap).answers == {"vip": 1, "found": 1}


@pytest.mark.parametrize(
    "old, new, says",
    [
        ('processing = "Order {order_id} was found.', 'processing = "Order {order_id was found.', "stray brace"),
        (
            'processing = "Order {order_id} was found.',
            'processing = "Order {order_id.__class__} was found.',
            "is not a placeholder",
        ),
        (
            'processing = "Order {order_id} was found.',
            'processing = "Order {order_id!r} was found.',
            "is not a placeholder",
        ),
        ('template = "cancelled"', 'template = "canceled"', "names the template 'canceled', which does not exist"),
        ('default_template = "found"', 'default_template = "fund"', "default_template"),
        ('not_found = "No order was found with the number {order_id}', 'not_found = "No order {email}', "{email}"),
        ("[settings]", "[setting]", "[setting]: is not a known section"),
        ("max_age_hours = 26", 'max_age_hours = "26"', "max_age_hours"),
        ("max_age_hours = 26", "max_age_hours = -1", "must be more than 0"),
        ("min_orders_ratio = 0.5", "min_orders_ratio = 5", "between 0 and 1"),
        ("max_age_hours = 26", "max_age_hours = nan", "max_age_hours: should be like 26.0, not nan"),
        ("max_age_hours = 26", "max_age_hours = inf", "max_age_hours: should be like 26.0, not inf"),
        ("min_orders_ratio = 0.5", "min_orders_ratio = -nan", "min_orders_ratio: should be"),
        ("[columns]\n", '[columns]\norder_id = [1, "Order Number"]\n', "[columns] order_id"),
        ("[columns]\n", '[columns]\nE-mail = ["Mail"]\n', "[columns] E-mail: field names are lower case"),
        (
            "\n[carriers]\n",
            '\n[carriers]\nUPS = "http://www.ups.com/track?tracknum={tracking_number}"\n',
            "[carriers] UPS: must start with https://",
        ),
        ("\n[carriers]\n", '\n[carriers]\nUPS = "https://www.ups.com/track?tracknum={number}"\n', "{number}"),
        (
            '[[rules]]\nwhen = { cancelled_at = "*" }\ntemplate = "cancelled"',
            '[[rules]]\nwhen = { cancelled_at = "*" }\ntemplate = "cancelled"\ntempalte = "x"',
            "unknown key 'tempalte'",
        ),
    ],
)
def test_config_mistakes_name_the_file_the_key_and_the_fix(contexts_file, old, new, says):
    edit(contexts_file, old, new)
    with pytest.raises(app.ConfigError) as caught:
        app.load_config(contexts_file)
    assert says in str(caught.value)
    assert str(caught.value).startswith("contexts.toml:")


def test_a_toml_syntax_error_names_the_line(contexts_file):
    lines = contexts_file.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, 1) if line.startswith("processing ="))
    edit(contexts_file, 'processing = "Order', "processing = Order")
    with pytest.raises(app.ConfigError) as caught:
        app.load_config(contexts_file)
    assert f"line {number}" in str(caught.value)
    assert "quotes" in str(caught.value)


def test_an_unknown_placeholder_is_reported_with_what_is_available(tmp_path, contexts_file):
    edit(contexts_file, 'processing = "Order {order_id} was found.', 'processing = "Order {order_number} was found.')
    path = write(tmp_path / "o.csv", "Order ID,Email,Ship Date\n5,a@example.com,\n")
    with pytest.raises(app.ExportError) as caught:  # the data being served stays served
        app.build_snapshot(app.load_config(contexts_file), path)
    message = str(caught.value)
    assert message.startswith(
        "o.csv: has no column for {order_number}, which contexts.toml [templates] processing uses."
    )
    assert "{order_id}" in message and "{items}" in message and "{ship_date}" in message


def test_a_rule_on_an_unknown_field_is_reported(tmp_path, contexts_file):
    edit(contexts_file, 'when = { cancelled_at = "*" }', 'when = { canceled = "*" }')
    path = write(tmp_path / "o.csv", "Order ID,Email\n5,a@example.com\n")
    with pytest.raises(app.ExportError, match=r"\{canceled\}, which contexts.toml \[\[rules\]\] number 1 when uses"):
        app.build_snapshot(app.load_config(contexts_file), path)


@pytest.mark.parametrize("name", ["not_found", "missing", "invalid", "unavailable"])
def test_message_templates_are_required(contexts_file, name):
    text = contexts_file.read_text()
    contexts_file.write_text("\n".join(line for line in text.splitlines() if not line.startswith(f"{name} =")))
    with pytest.raises(app.ConfigError, match=f"\\[templates\\] {name}: is missing"):
        app.load_config(contexts_file)


@pytest.mark.parametrize(
    "carrier, number, url",
    [
        ("UPS", "1Z 999", "https://www.ups.com/track?tracknum=1Z%20999"),
        (
            "DHL Express",
            "123",
            "https://www.dhl.com/global-en/home/tracking/tracking-express.html?submit=1&tracking-id=123",
        ),
        ("usps", "9400", "https://tools.usps.com/go/TrackConfirmAction?tLabels=9400"),
        ("Royal Mail Tracked 24", "AB1GB", "https://www.royalmail.com/track-your-item#/tracking-results/AB1GB"),
        ("Pigeon Post", "1", None),
        ("", "1", None),
    ],
)
def test_tracking_links_are_built_from_loosely_matched_carriers(carrier, number, url):
    page = app.carrier_page(app.load_config(ROOT / "contexts.toml").carriers, carrier)
    assert (app.tracking_link(page, number) if page else None) == url


@pytest.mark.parametrize(
    "cell, url",
    [
        ("https://track.example.com/abc", "https://track.example.com/abc"),
        ("javascript:alert(1)", None),
        ("track.example.com/abc", None),
    ],
)
def test_only_http_links_from_the_export_reach_the_agent(tmp_path, contexts_file, cell, url):
    path = write(tmp_path / "o.csv", f"Order ID,Email,Status,Tracking URL\n5,a@example.com,shipped,{cell}\n")
    snap = app.build_snapshot(app.load_config(contexts_file), path)
    assert json.loads(app.answer(snap, "5", "a@example.com")[1])["tracking_url"] == url


def test_check_warns_when_an_answer_shows_free_text(capsys, tmp_path, contexts_file):
    edit(contexts_file, 'found = "Order {order_id} was found.', 'found = "Order {order_id} was found ({notes}).')
    path = write(tmp_path / "o.csv", "Order ID,Email,Notes\n5,a@example.com,leave at the door\n")
    assert app.main(["check", "--data", str(path), "--contexts", str(contexts_file)]) == 0
    assert (
        "warning  [templates] found uses {notes}, text that customers or staff type freely" in capsys.readouterr().out
    )


@pytest.mark.parametrize(
    "quantity, items, count",
    [
        ("\u00b2", "Hat, 2 x Cap", None),
        ("\u0662", "2 x Hat, 2 x Cap", "4"),
        ("1.5", "1.5 x Hat, 2 x Cap", None),
        ("two", "Hat, 2 x Cap", None),
        ("3.0000", "3 x Hat, 2 x Cap", "5"),
        ("3,0", "3 x Hat, 2 x Cap", "5"),
    ],
)
def test_an_odd_quantity_is_named_without_a_count_and_never_counted(tmp_path, contexts_file, quantity, items, count):
    # "1 x Hat" for a quantity that does not read would be a made-up fact; so would a total of all items.
    edit(
        contexts_file,
        'found = "Order {order_id} was found.',
        'found = "Order {order_id}[ ({item_count} items)] was found.',
    )
    path = write(tmp_path / "o.csv", f"Order ID,Email,Item,Qty\n5,a@example.com,Hat,{quantity}\n5,,Cap,2\n")
    status, body = app.answer(app.build_snapshot(app.load_config(contexts_file), path), "5", "a@example.com")
    context = json.loads(body)["context"]
    assert status == 200 and f"It contains {items}." in context
    assert (f"({count} items)" in context) if count else "items)" not in context


def test_item_statuses_must_be_words(contexts_file):
    edit(contexts_file, 'shipped = ["fulfilled", "shipped", "delivered"]', "shipped = [1, 2]")
    with pytest.raises(app.ConfigError, match=r"\[items\] shipped: should be a list of words"):
        app.load_config(contexts_file)


def test_check_warns_about_free_text_by_the_header_it_reads_too(capsys, tmp_path, contexts_file):
    edit(contexts_file, "[columns]\n", '[columns]\ndelivery_info = ["Customer Note"]\n')
    edit(
        contexts_file, 'found = "Order {order_id} was found.', 'found = "Order {order_id} was found ({delivery_info}).'
    )
    path = write(tmp_path / "o.csv", "Order ID,Email,Customer Note\n5,a@example.com,leave it\n")
    assert app.main(["check", "--data", str(path), "--contexts", str(contexts_file)]) == 0
    assert (
        "warning  [templates] found uses {delivery_info}, text that customers or staff type freely"
        in capsys.readouterr().out
    )


def test_every_unknown_placeholder_is_reported_at_once_with_the_nearest_name(tmp_path, contexts_file):
    edit(
        contexts_file,
        'processing = "Order {order_id} was found.',
        'processing = "Order {ordr_id} was found {trackng_url}.',
    )
    export = write(tmp_path / "data" / "orders.csv", "Order,Email\n1,a@example.com\n")
    with pytest.raises(app.ExportError) as caught:
        app.build_snapshot(app.load_config(contexts_file), export)
    message = str(caught.value)
    assert "{ordr_id}, which contexts.toml [templates] processing uses (did you mean {order_id}?)" in message
    assert "{trackng_url}, which contexts.toml [templates] processing uses (did you mean {tracking_url}?)" in message


def test_a_messages_unknown_placeholders_are_reported_at_once(contexts_file):
    text = contexts_file.read_text()
    start = text.index("not_found = ")
    line = text[start : text.index("\n", start)]
    edit(contexts_file, line, 'not_found = "No order {ordr_id} as of {record_updated}."')
    with pytest.raises(app.ConfigError) as caught:
        app.load_config(contexts_file)
    assert (
        "uses the unknown placeholders {ordr_id} (did you mean {order_id}?), {record_updated} (did you mean "
        "{records_updated}?)"
    ) in str(caught.value)


def test_a_fixed_edit_is_logged_as_applied_even_when_it_restores_the_served_wording(tmp_path, contexts_file, logs):
    from conftest import make_settings, orders_csv, started

    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    service = started(make_settings(export.parent, contexts_file))
    good = contexts_file.read_text()
    contexts_file.write_text(good.replace("[settings]", "[settings\n", 1))  # a typo: refused, the old wording stays
    assert not service.reload()
    contexts_file.write_text(good)  # put right: the same wording as served
    assert service.reload()
    assert any(r.getMessage().startswith("applied contexts.toml: ") for r in logs.records)


def test_check_gives_the_line_to_paste_for_a_status_word_no_rule_names(tmp_path, capsys, contexts_file):
    export = write(tmp_path / "orders.csv", "Order ID,Email,Status\n1,a@example.com,Gerade im Versand\n")
    assert app.main(["check", "--data", str(export), "--contexts", str(contexts_file)]) == 0
    out = capsys.readouterr().out
    assert "status 'gerade im versand' (1 order) is named by no rule" in out
    block = out[out.index("\n[vocabulary.statuses]\n") + 1 :].splitlines()
    assert block[:2] == ["[vocabulary.statuses]", '"MEANING" = ["gerade im versand"]']
    pasted = contexts_file.read_text() + "\n" + "\n".join(block[:2]) + "\n"
    contexts_file.write_text(pasted)  # as pasted, without choosing: refused, naming what to do
    with pytest.raises(app.ConfigError, match=r"\[vocabulary.statuses\] MEANING: is no word a rule names"):
        app.load_config(contexts_file)
    contexts_file.write_text(pasted.replace('"MEANING"', '"shipped"'))
    snapshot = app.build_snapshot(app.load_config(contexts_file), export)
    status, body = app.answer(snapshot, "1", "a@example.com")
    assert json.loads(body)["context"].startswith("Order 1 was found and has shipped.")


def test_a_contexts_toml_of_an_earlier_release_is_told_what_it_lacks_and_promises(tmp_path, capsys):
    # A shop that copied contexts.toml on 29 Nov 2026 and never edited it.
    old = ROOT / "tests" / "fixtures" / "contexts_2026-11-29.toml"
    export = ROOT / "tests" / "exports" / "shopify_partial_refund.csv"
    assert app.main(["check", "--data", str(export), "--contexts", str(old)]) == 0
    out = capsys.readouterr().out
    assert "warning  [[rules]] are word for word an earlier release's: they lack the rules added since" in out
    assert "[templates] processing is word for word an earlier release's answer, which promises a shipping time" in out
    assert app.main(["check", "--data", str(export), "--contexts", str(ROOT / "contexts.toml")]) == 0
    assert "earlier release" not in capsys.readouterr().out  # the shipped file itself: nothing to say


SHIPPED_UPS = "https://www.ups.com/track?tracknum={tracking_number}"
EARLIER_DHL = "https://www.dhl.com/global-en/home/tracking/tracking-express.html?submit=1&tracking-id={tracking_number}"
SHIPPED_DHL = "https://www.dhl.com/global-en/home/tracking/tracking-parcel.html?submit=1&tracking-id={tracking_number}"


@pytest.mark.parametrize(
    "lines, carrier, page, retired",
    [
        ("", "UPS", SHIPPED_UPS, ()),  # nothing of its own: carriers.toml's page
        (f'UPS = "{SHIPPED_UPS}"\n', "UPS", SHIPPED_UPS, ("UPS",)),  # a copy of the shipped line: shipped data
        (f'DHL = "{EARLIER_DHL}"\n', "DHL", SHIPPED_DHL, ("DHL",)),  # an earlier release's page: the fix reaches it
        ('UPS = "https://ups.example/{tracking_number}"\n', "UPS", "https://ups.example/{tracking_number}", ()),
        (
            '"Acme Freight" = "https://acme.example/?n={tracking_number}"\n',
            "acme freight",
            "https://acme.example/?n={tracking_number}",
            (),
        ),  # a carrier of its own, beside the shipped ones
    ],
)
def test_carriers_ship_as_data_and_a_shops_own_line_wins(contexts_file, lines, carrier, page, retired):
    config = app.load_config(edit(contexts_file, "\n[carriers]\n", "\n[carriers]\n" + lines))
    assert app.carrier_page(config.carriers, carrier) == page
    assert config.retired_carriers == retired
    assert app.carrier_page(config.carriers, "FedEx").startswith("https://www.fedex.com/")  # the others stay
