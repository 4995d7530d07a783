"""Dates in answers: every form exports write a date in is read and written the way the templates write dates
("25 Jul 2018"); whether 05/06/2025 is 5 June or 6 May is decided per column from its own values, then by the
language of its headers, and otherwise the date goes out as written, never guessed; [settings] language writes
the month names.

Each case is a small export written here and read as the service reads it; what is checked is the context
the chat agent would repeat to the customer.
"""

import datetime

import pytest
from conftest import ROOT, answered, write, write_xlsx

import app

CONTEXTS = ROOT / "contexts.toml"

# The shipped "found" answer, for an export with no status column: it gives the order date and claims no
# shipping state. The shipped "shipped" answer gives the ship date.
PLACED = "Order 1 was found. It was placed on {}. It contains Hat. The shop's records here do not say whether it has shipped yet."
SHIPPED = "Order 1 was found and has shipped on {}. It contains Hat. No tracking link is available for it."


def snapshot(tmp_path, text, contexts=CONTEXTS, name="orders.csv"):
    """The snapshot a service would serve for an export written as text (or as workbook rows, for .xlsx)."""
    path = write_xlsx(tmp_path / name, text) if name.endswith(".xlsx") else write(tmp_path / name, text)
    return app.build_snapshot(app.load_config(contexts), path)


def context(snap, order_id="1", email="a@example.com"):
    status, text, _ = answered(snap, order_id, email)
    assert status == 200, text
    return text


def csv_cell(value):
    return f'"{value}"' if "," in value else value


# Each form issue 24 names, as the exports that write it do, and the day a reader of the row takes it for.
DATE_FORMS = [
    ("7/25/2018 21:06", "25 Jul 2018"),  # WooCommerce/Magento US: month first, told by 25
    ("2/20/12 4:02 PM", "20 Feb 2012"),  # a US export with a two-digit year and a 12-hour time
    ("24/10/2025", "24 Oct 2025"),  # day first, told by 24
    ("16-05-2018 07:21:32", "16 May 2018"),  # dashes, day first, with seconds
    ("05.11.2025", "5 Nov 2025"),  # dots are written day first only
    ("Jan-18-16", "18 Jan 2016"),  # the footer-writing export of the issue
    ("Jan 18, 2016", "18 Jan 2016"),
    ("18 Jan 2016", "18 Jan 2016"),
    ("2018/07/25", "25 Jul 2018"),
    ("2026-11-28T10:00:00-04:00", "28 Nov 2026"),  # ISO with an offset
    ("2026-11-28 23:30:00 -0400", "28 Nov 2026"),  # Shopify's: the day as the shop's clock wrote it
    ("2026-11-28T23:30:00Z", "28 Nov 2026"),
    ("45966", "5 Nov 2025"),  # an Excel serial day saved into a CSV's date column
    ("45966.59375", "5 Nov 2025"),  # the same with a time of day (14:15)
]


@pytest.mark.parametrize("written, day", DATE_FORMS)
def test_each_form_of_order_date_is_written_as_the_template_writes_dates(tmp_path, written, day):
    snap = snapshot(tmp_path, f"Order ID,Email,Order Date,Item\n1,a@example.com,{csv_cell(written)},Hat\n")
    assert context(snap) == PLACED.format(day)


@pytest.mark.parametrize("written, day", DATE_FORMS)
def test_each_form_of_ship_date_is_written_as_the_template_writes_dates(tmp_path, written, day):
    snap = snapshot(
        tmp_path, f"Order ID,Email,Status,Ship Date,Item\n1,a@example.com,shipped,{csv_cell(written)},Hat\n"
    )
    assert context(snap) == SHIPPED.format(day)


@pytest.mark.parametrize(
    "first, second",
    [
        ("2026-11-26 10:00:00 +0000", "2026-11-27 11:00:00 +0000"),  # Shopify's times
        ("2026-11-26T10:00:00Z", "2026-11-27T11:00:00Z"),
        ("2026-11-26", "2026-11-27"),
    ],
)
def test_each_parcel_s_ship_day_is_written(tmp_path, first, second):
    # Two rows of one order shipped on two days: the answer names both, never the first alone.
    text = f"Order ID,Email,Status,Ship Date,Item\n1,a@example.com,shipped,{first},Hat\n1,a@example.com,shipped,{second},Scarf\n"
    said = context(snapshot(tmp_path, text))
    assert said.startswith("Order 1 was found and has shipped on 26 Nov 2026 and 27 Nov 2026."), said


@pytest.mark.parametrize(
    "cell",
    [
        datetime.datetime(2025, 11, 5, 14, 3),  # a date cell with a time
        datetime.datetime(2025, 11, 5),  # a date cell at midnight
        45966,  # a date column formatted as a number: Excel's day 45966
        45966.59375,
    ],
    ids=["datetime", "date", "serial", "serial-with-time"],
)
def test_workbook_dates_are_written_as_the_template_writes_dates(tmp_path, cell):
    snap = snapshot(
        tmp_path,
        {"Orders": [["Order ID", "Email", "Order Date", "Item"], ["1", "a@example.com", cell, "Hat"]]},
        name="orders.xlsx",
    )
    assert context(snap) == PLACED.format("5 Nov 2025")


# Whether a numeric date is day or month first, from the values of its own column: (the column's values,
# the first order's date as the answer gives it). Where no value tells, an English export's date goes out
# as written: 05/06/2025 could be either, and a guess would tell a customer the wrong month.
COLUMN_TELLS = [
    (["05/06/2025", "13/06/2025"], "5 Jun 2025"),  # 13 can only be a day
    (["05/06/2025", "06/13/2025"], "6 May 2025"),  # 13 can only be a day: the month is first
    (["05-06-2025", "28-06-2025"], "5 Jun 2025"),
    (["2/10/12 4:02 PM", "2/20/12 4:02 PM"], "10 Feb 2012"),
    (["05/06/2025", "06/07/2025"], "05/06/2025"),  # nothing tells: as written
    (["05/06/2025", "2025-06-13"], "05/06/2025"),  # an ISO date in the column says nothing of the others
    (["05/06/2025 10:00", "06/07/2025 11:30"], "05/06/2025 10:00"),  # as written, time and all
]


@pytest.mark.parametrize("values, day", COLUMN_TELLS)
def test_day_or_month_first_is_decided_by_the_values_of_the_column(tmp_path, values, day):
    rows = "".join(f"{n},c{n}@example.com,{value},Hat\n" for n, value in enumerate(values, 1))
    snap = snapshot(tmp_path, "Order ID,Email,Order Date,Item\n" + rows)
    assert context(snap, "1", "c1@example.com") == PLACED.format(day)


@pytest.mark.parametrize("late, day", [("01/20/2025", "6 May 2025"), ("20/01/2025", "5 Jun 2025")])
def test_a_value_far_down_the_file_still_decides_its_column(tmp_path, late, day):
    # 80 orders whose dates do not tell, then one that does: the first order's date follows it.
    rows = "".join(f"{n},c{n}@example.com,01/02/2025,Hat\n" for n in range(2, 80))
    snap = snapshot(
        tmp_path,
        "Order ID,Email,Order Date,Item\n1,a@example.com,05/06/2025,Hat\n" + rows + f"99,z@example.com,{late},Cap\n",
    )
    assert context(snap) == PLACED.format(day)


def test_each_date_column_is_decided_on_its_own(tmp_path):
    # The order dates are day first (13/06), the ship dates month first (07/14): one file, two conventions.
    contexts = CONTEXTS.read_text().replace(
        'shipped = "Order {order_id} was found and has shipped[ on {shipped_at}]',
        'shipped = "Order {order_id} of {order_date} was found and has shipped[ on {shipped_at}]',
    )
    assert contexts != CONTEXTS.read_text()
    snap = snapshot(
        tmp_path,
        "Order ID,Email,Status,Order Date,Ship Date,Item\n"
        "1,a@example.com,shipped,05/06/2025,05/07/2025,Hat\n"
        "2,b@example.com,shipped,13/06/2025,07/14/2025,Cap\n",
        contexts=write(tmp_path / "contexts.toml", contexts),
    )
    assert context(snap).startswith("Order 1 of 5 Jun 2025 was found and has shipped on 7 May 2025.")


def test_an_undecidable_ship_date_in_english_goes_out_as_written(tmp_path):
    snap = snapshot(tmp_path, "Order ID,Email,Status,Ship Date,Item\n1,a@example.com,shipped,05/06/2025,Hat\n")
    assert context(snap) == SHIPPED.format("05/06/2025")


# Headers in a language whose numeric dates are always day first: a column its values leave undecided is
# read day first. (id, header row).
DAY_FIRST_HEADERS = [
    ("de", "Bestellnummer,E-Mail,Bestelldatum,Artikel"),
    ("de-datum", "Bestellnummer,E-Mail,Datum,Produkt"),
    ("fr", "N° de commande,Courriel,Date de commande,Produit"),
    ("es", "Número de pedido,Correo electrónico,Fecha,Producto"),
    ("it", "Numero ordine,Email,Data ordine,Prodotto"),
    ("pt", "Número do pedido,E-mail,Data do pedido,Produto"),
    ("pl", "Numer zamówienia,E-mail,Data zamówienia,Produkt"),
    ("de-compound", "Bestellnummer,E-Mail,Bestelldatum,Produkt"),
    ("nl", "Bestelnummer,E-mail,Besteldatum,Product"),
]


@pytest.mark.parametrize("language, header", DAY_FIRST_HEADERS)
def test_a_day_first_language_decides_a_column_its_values_leave_open(tmp_path, language, header):
    snap = snapshot(tmp_path, f"{header}\n1,a@example.com,05/06/2025,Hat\n")
    assert context(snap) == PLACED.format("5 Jun 2025")


def test_the_values_win_over_the_language_of_the_headers(tmp_path):
    snap = snapshot(
        tmp_path,
        "Bestellnummer,E-Mail,Bestelldatum,Artikel\n1,a@example.com,05/06/2025,Hat\n2,b@example.com,06/13/2025,Cap\n",
    )
    assert context(snap) == PLACED.format("6 May 2025")


def test_an_english_export_that_does_not_tell_is_never_guessed(tmp_path):
    snap = snapshot(
        tmp_path,
        "Order Number,Email,Order Date,Product\n1,a@example.com,05/06/2025,Hat\n2,b@example.com,07/08/2025,Cap\n",
    )
    assert context(snap) == PLACED.format("05/06/2025")
    assert "It was placed on 07/08/2025." in context(snap, "2", "b@example.com")


# [settings] language: how answers write a date (vocabulary.toml [dates], CLDR's abbreviated month names).
LANGUAGES = [
    ("en", "5 Jun 2025", "5 Mar 2025"),
    ("de", "5. Juni 2025", "5. März 2025"),
    ("fr", "5 juin 2025", "5 mars 2025"),
    ("es", "5 jun 2025", "5 mar 2025"),
    ("pt", "5 de jun. de 2025", "5 de mar. de 2025"),
    ("it", "5 giu 2025", "5 mar 2025"),
    ("nl", "5 jun 2025", "5 mrt 2025"),
    ("pl", "5 cze 2025", "5 mar 2025"),
]


@pytest.mark.parametrize("language, june, march", LANGUAGES)
def test_dates_are_written_in_the_language_of_the_templates(tmp_path, language, june, march):
    contexts = CONTEXTS.read_text()
    assert 'language = "en"' in contexts
    contexts = write(tmp_path / "contexts.toml", contexts.replace('language = "en"', f'language = "{language}"'))
    snap = snapshot(
        tmp_path,
        "Order ID,Email,Order Date,Status,Ship Date,Item\n"
        "1,a@example.com,2025-06-05 10:00:00 +0200,,,Hat\n"
        "2,b@example.com,05.03.2025,shipped,03/05/2025,Cap\n"
        "3,c@example.com,2025-03-01,shipped,03/13/2025,Cap\n",
        contexts=contexts,
    )
    assert f" {june}." in context(snap)
    assert f" on {march}." in context(snap, "2", "b@example.com")  # the ship dates are month first (03/13)


def test_german_dates_never_get_english_month_names(tmp_path):
    contexts = write(tmp_path / "contexts.toml", CONTEXTS.read_text().replace('language = "en"', 'language = "de"'))
    text = context(snapshot(tmp_path, "Order ID,Email,Order Date,Item\n1,a@example.com,2025-10-24,Hat\n", contexts))
    assert "24. Okt. 2025" in text and "Oct" not in text


@pytest.mark.parametrize("language", ["xx", "english", "DE", ""])
def test_an_unknown_language_is_a_config_error_naming_the_key(tmp_path, language):
    contexts = write(
        tmp_path / "contexts.toml", CONTEXTS.read_text().replace('language = "en"', f'language = "{language}"')
    )
    with pytest.raises(app.ConfigError) as refused:
        app.load_config(contexts)
    message = str(refused.value)
    assert "[settings] language" in message and repr(language) in message
    assert "de, en, es, fr, it, nl, pl, pt" in message  # what to write instead


@pytest.mark.parametrize(
    "text, day_first, written",
    [
        ("05/06/2025", None, "05/06/2025"),
        ("05/06/2025", True, "5 Jun 2025"),
        ("05/06/2025", False, "6 May 2025"),
        ("13/06/2025", False, "13 Jun 2025"),  # a value over 12 tells, whatever the column says
        ("05.06.2025", False, "5 Jun 2025"),  # dots are day first
        ("31/02/2025", True, "31/02/2025"),  # no such day: as written
        ("not a date", None, "not a date"),
        ("2025-06-05 and 2025-06-07", None, "5 Jun 2025 and 7 Jun 2025"),  # parcels sent on two days
        ("5. März 2025", None, "5 Mar 2025"),  # month names with their accents, as German and French exports write them
        ("3 févr. 2025", None, "3 Feb 2025"),
        ("12 Décembre 2025", None, "12 Dec 2025"),
        ("5 de março de 2025", None, "5 de março de 2025"),  # a form not read: as written, never guessed
    ],
)
def test_date_written(text, day_first, written):
    assert app.date_written(text, day_first, app.ENGLISH) == written
