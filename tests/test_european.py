"""European exports: Shopware 6, PrestaShop, Odoo, plentymarkets and ShipStation; exports written in
German, French, Spanish, Italian and Dutch; the tracking links of Europe's carriers.

Each platform's fixture in tests/fixtures/ is written the way the platform writes it (its separator,
encoding, quoting and line ends; tests/fixtures/README.md names the sources). Every lookup checks
the whole sentence a customer would hear: found, the right state, the right items, the tracking link.
"""

import csv
import json
from datetime import datetime

import pytest
from conftest import ROOT, write, write_xlsx
from conftest import answered as ask
from conftest import checked as check

import app

FIXTURES = ROOT / "tests" / "fixtures"
CONTEXTS = ROOT / "contexts.toml"

NOT_YET = "It has not shipped yet."
CANCELLED = "was found, but it was cancelled, so it will not ship."
REFUNDED = "It has been refunded."
UNPAID = "Its payment has not been confirmed yet."
FOLLOW = "It can be followed with the tracking link."
NO_LINK = "No tracking link is available for it."
NOT_SAID = "The shop's records here do not say whether it has shipped yet."

DHL_PARCEL = "https://www.dhl.com/global-en/home/tracking/tracking-parcel.html?submit=1&tracking-id="
DHL_EXPRESS = "https://www.dhl.com/global-en/home/tracking/tracking-express.html?submit=1&tracking-id="
DHL_PAKET = "https://www.dhl.de/de/privatkunden/pakete-empfangen/verfolgen.html?lang=de&idc={}&rfn=&extendedSearch=true"


def served(path, contexts=CONTEXTS):
    return app.build_snapshot(app.load_config(contexts), path)


# The platforms' exports ###########################################################################

PLATFORMS = {
    # Shopware 6, a copy of the "Default orders" profile with the order's, the delivery's and the
    # payment's state and the parcels' numbers added (docs/EXPORTS.md).
    "shopware_orders.csv": (
        "Shopware 6 orders export",
        [
            (
                "10234",
                "anna.mueller@example.com",
                "Order 10234 was found and has shipped (tracking number 00340434161094042557, 00340434161094042558). It "
                f"contains the items ordered. {NO_LINK}",
                None,
            ),
            (
                "10235",
                "Jan.DeVries@example.nl",
                f"Order 10235 was found. It was placed on 28 Nov 2026. It contains the items ordered. {NOT_YET}",
                None,
            ),
            # The order cancelled while its delivery still says "open".
            ("10236", "lucie.martin@example.fr", f"Order 10236 {CANCELLED}", None),
            (
                "10237",
                "marco.rossi@example.it",
                "Order 10237 was found. Part of it has shipped; the rest has not shipped yet. It contains the items ordered.",
                None,
            ),
            # Delivery returned, payment refunded.
            ("10238", "sofia.garcia@example.es", f"Order 10238 was found. {REFUNDED}", None),
        ],
    ),
    # Shopware 6, the "Default orders" profile as shipped: the state is an ID, products are IDs.
    "shopware_default_orders.csv": (
        "Shopware 6 orders export",
        [
            (
                "10234",
                "anna.mueller@example.com",
                f"Order 10234 was found. It was placed on 27 Nov 2026. It contains the items ordered. {NOT_SAID}",
                None,
            ),
            (
                "10236",
                "lucie.martin@example.fr",
                f"Order 10236 was found. It was placed on 28 Nov 2026. It contains the items ordered. {NOT_SAID}",
                None,
            ),
        ],
    ),
    # PrestaShop, Advanced Parameters > Database > SQL Manager, the query in docs/EXPORTS.md.
    "prestashop_sql_orders.csv": (
        "PrestaShop orders (SQL Manager query)",
        [
            # The reference as the customer types it: without case.
            (
                "xkbknabjk",
                "lucie.martin@example.fr",
                f"Order XKBKNABJK was found and has shipped with Colissimo (tracking number 6A12345678901). {FOLLOW} It "
                "contains 1 x Hummingbird printed t-shirt - Size : S- Color : White, 2 x Mug The best is yet to come.",
                "https://www.laposte.fr/outils/suivre-vos-envois?code=6A12345678901",
            ),
            # No link of the carrier's own in the shop: built from [carriers].
            (
                "QWHZRTPLM",
                "anna.mueller@example.com",
                f"Order QWHZRTPLM was found and has shipped with Chronopost (tracking number XW123456785FR). {FOLLOW} It "
                "contains 1 x Affiche encadrée The adventure begins - Dimension : 40x60cm.",
                "https://www.chronopost.fr/tracking-no-cms/suivi-page?listeNumerosLT=XW123456785FR",
            ),
            (
                "BVNCXLKJH",
                "jan.peeters@example.be",
                f"Order BVNCXLKJH was found. It was placed on 28 Nov 2026. It contains 1 x Hummingbird cushion - Color : "
                f"Black. {NOT_YET}",
                None,
            ),
            (
                "PLOKIJUHY",
                "marco.rossi@example.it",
                f"Order PLOKIJUHY was found. It contains 3 x Brown bear notebook - Paper Type : Ruled. {UNPAID}",
                None,
            ),
            ("ZAQWSXCDE", "sofia.garcia@example.es", f"Order ZAQWSXCDE {CANCELLED}", None),
            (
                "MNBVCXWQA",
                "piet.jansen@example.nl",
                "Order MNBVCXWQA was found and has been delivered. It contained 1 x Customizable mug. If anything is "
                "missing or damaged, the customer can contact support.",
                "https://www.laposte.fr/outils/suivre-vos-envois?code=6A12345678902",
            ),
            (
                "RFVTGBYHN",
                "eva.berger@example.at",
                "Order RFVTGBYHN was found, but its payment failed, so it will not ship. The customer can place the order "
                "again or contact support.",
                None,
            ),
            # A state no rule names is passed on as PrestaShop names it, and claims nothing.
            (
                "UJMIKOLPY",
                "noah.keller@example.ch",
                "Order UJMIKOLPY was found. It was placed on 27 Nov 2026. It contains 1 x Hummingbird printed sweater - "
                'Size : M. The shop\'s records give its status as "On backorder (paid)"; they say nothing more about its '
                "shipping.",
                None,
            ),
            ("TGBYHNUJM", "lena.vogel@example.de", f"Order TGBYHNUJM was found. {REFUNDED}", None),
        ],
    ),
    # Odoo, Sales > Orders > Export as CSV; the same rows as XLSX in test_odoo_reads_the_same_from_its_workbook.
    "odoo_sale_orders.csv": (
        "Odoo sales orders export",
        [
            # "Fully Delivered" is Odoo's word for the delivery order validated: shipped, not received.
            # An order's further lines sit on rows of their own, order cells empty: they belong to it.
            (
                "S00042",
                "anna.mueller@example.com",
                "Order S00042 was found and has shipped. It contains 1 x [FURN_7777] "
                f"Office Chair, 2 x [FURN_8888] Desk Lamp. {NO_LINK}",
                None,
            ),
            (
                "s00043",
                "jan.devries@example.nl",
                f"Order S00043 was found. It was placed on 28 Nov 2026. It contains 1 x [FURN_0001] Standing Desk. {NOT_YET}",
                None,
            ),
            (
                "S00044",
                "lucie.martin@example.fr",
                f"Order S00044 was found. It was placed on 28 Nov 2026. It contains 1 x [FURN_0002] Cable Tray. {NOT_SAID}",
                None,
            ),
            ("S00045", "marco.rossi@example.it", f"Order S00045 {CANCELLED}", None),
            (
                "S00046",
                "sofia.garcia@example.es",
                "Order S00046 was found. Part of it has shipped; the rest has not shipped yet. It contains 1 x [FURN_7777] Office "
                "Chair, 1 x [FURN_0001] Standing Desk.",
                None,
            ),
        ],
    ),
    # plentymarkets, Data > Catalogues, format type Order, with the German column names of docs/EXPORTS.md.
    "plentymarkets_orders.csv": (
        "plentymarkets orders catalogue export",
        [
            (
                "48213",
                "anna.mueller@example.com",
                f"Order 48213 was found and has shipped with DHL (tracking number 00340434161094042557). {FOLLOW} It "
                "contains 1 x Bürostuhl Ergo, 2 x Schreibtischlampe Lumen.",
                DHL_PARCEL + "00340434161094042557",
            ),
            (
                "48214",
                "jonas.weber@example.de",
                f"Order 48214 was found. It was placed on 28 Nov 2026. It contains 1 x Stehpult Höhe 120 cm. {NOT_YET}",
                None,
            ),
            ("48215", "lena.vogel@example.de", f"Order 48215 {CANCELLED}", None),
            (
                "48216",
                "max.schmidt@example.de",
                f"Order 48216 was found. It contains 1 x Monitorarm Duo. {UNPAID}",
                None,
            ),
            # "Gerade im Versand" (being shipped: labels made, not yet handed over) claims nothing.
            (
                "48217",
                "eva.berger@example.at",
                "Order 48217 was found. It was placed on 28 Nov 2026. It contains 1 x Fußstütze. The shop's records give "
                'its status as "Gerade im Versand"; they say nothing more about its shipping.',
                "https://www.myhermes.de/empfangen/sendungsverfolgung/sendungsinformation/#H1234567890123456789",
            ),
            (
                "48218",
                "paul.krause@example.de",
                f"Order 48218 was found and has shipped with DPD (tracking number 01234567890123). {FOLLOW} It contains "
                "1 x Rollcontainer.",
                "https://tracking.dpd.de/status/en_US/parcel/01234567890123",
            ),
            (
                "48219",
                "mia.wolf@example.de",
                "Order 48219 was found. It was placed on 10 Nov 2026. It contains 1 x Bürostuhl Ergo. The shop's records "
                'give its status as "Retoure"; they say nothing more about its shipping.',
                None,
            ),
        ],
    ),
    # ShipStation, Shipments > Export: no status; a ship date and a tracking number say shipped.
    "shipstation_shipments.csv": (
        "ShipStation shipments export",
        [
            (
                "1001",
                "anna.mueller@example.com",
                f"Order #1001 was found and has shipped on 28 Nov 2026 with DHL Express (tracking number 1234567890). "
                f"{FOLLOW} It contains 1 x Office Chair, 2 x Desk Lamp.",
                DHL_EXPRESS + "1234567890",
            ),
            (
                "#1002",
                "jan.devries@example.nl",
                f"Order #1002 was found and has shipped on 28 Nov 2026 with UPS (tracking number 1Z999AA10123456784). "
                f"{FOLLOW} It contains 1 x Standing Desk.",
                "https://www.ups.com/track?tracknum=1Z999AA10123456784",
            ),
            (
                "1003",
                "tom.hughes@example.co.uk",
                f"Order #1003 was found and has shipped on 27 Nov 2026 with DPD UK (tracking number 15501234567890). "
                f"{FOLLOW} It contains 3 x Cable Tray, grey.",
                "https://www.dpd.co.uk/apps/tracking/?reference=15501234567890#results",
            ),
        ],
    ),
}
LOOKUPS = [(name, *case) for name, (_, cases) in PLATFORMS.items() for case in cases]


@pytest.fixture(scope="module")
def snapshots():
    return {name: served(FIXTURES / name) for name in PLATFORMS}


@pytest.mark.parametrize("name, order_id, email, text, url", LOOKUPS)
def test_each_platform_answers_its_orders(snapshots, name, order_id, email, text, url):
    status, context, tracking_url = ask(snapshots[name], order_id, email)
    assert (status, context, tracking_url) == (200, text, url)


@pytest.mark.parametrize(
    "name, warnings",
    [
        ("shopware_orders.csv", []),  # its "returned" is answered by the rule for returned orders
        (
            "shopware_default_orders.csv",
            ["no status column (the Shopware 6 orders export layout reads it from 'delivery_state')"],
        ),
        ("prestashop_sql_orders.csv", ["status 'on backorder (paid)' (1 order) is named by no rule"]),
        ("odoo_sale_orders.csv", []),
        ("plentymarkets_orders.csv", ["status 'gerade im versand' (1 order)", "status 'retoure' (1 order)"]),
        ("shipstation_shipments.csv", ["no status column", "give shipped_at different dates"]),
    ],
)
def test_check_names_the_platform_and_explains_every_warning(capsys, name, warnings):
    code, out = check(capsys, FIXTURES / name)
    assert code == 0 and f"({PLATFORMS[name][0]}, modified " in out
    said = [line for line in out.splitlines() if line.startswith("warning")]
    assert len(said) == len(warnings) and all(w in line for w, line in zip(warnings, said)), said


def test_an_order_number_of_another_shop_or_a_wrong_email_finds_nothing(snapshots):
    # PrestaShop's numeric id_order is not the number customers are given; the reference is.
    assert ask(snapshots["prestashop_sql_orders.csv"], "1841", "lucie.martin@example.fr")[0] == 404
    assert ask(snapshots["prestashop_sql_orders.csv"], "XKBKNABJK", "anna.mueller@example.com")[0] == 404
    assert ask(snapshots["odoo_sale_orders.csv"], "42", "anna.mueller@example.com")[0] == 404


# Shopware 6 #######################################################################################


def test_shopware_product_ids_never_reach_an_answer(snapshots):
    # Its line_items cell is "1x <product UUID>|2x <product UUID>": not names a customer knows.
    for name in ("shopware_orders.csv", "shopware_default_orders.csv"):
        context = ask(snapshots[name], "10234", "anna.mueller@example.com")[1]
        assert "0193a1e0" not in context and "the items ordered" in context


def test_shopware_is_read_as_shopware_writes_it():
    data = (FIXTURES / "shopware_orders.csv").read_bytes()
    assert data.startswith(b"id;order_number;") and b"\r\n" not in data and not data.startswith(b"\xef\xbb\xbf")
    assert b';"Hauptstra\xc3\x9fe 5";' in data  # fputcsv encloses a cell with a space, in UTF-8


# PrestaShop #######################################################################################


def test_prestashop_reads_the_same_when_the_sql_manager_writes_iso_8859_1(tmp_path):
    # Advanced Parameters > Database > SQL Manager > Settings: "Select your default file encoding".
    text = (FIXTURES / "prestashop_sql_orders.csv").read_text(encoding="utf-8")
    snapshot = served(write(tmp_path / "request_sql_1.csv", text.encode("iso-8859-1")))
    assert snapshot.layout == "PrestaShop orders (SQL Manager query)"
    for _name, order_id, email, text, url in (case for case in LOOKUPS if case[0] == "prestashop_sql_orders.csv"):
        assert ask(snapshot, order_id, email) == (200, text, url)


def prestashop_export(tmp_path, status, number="", carrier="Colissimo"):
    header = (
        "reference;id_order;email;status;date_add;product_name;product_quantity;tracking_number;carrier;tracking_url\n"
    )
    row = f'XKBKNABJK;1841;lucie.martin@example.fr;"{status}";"2026-11-25 18:42:10";Mug;1;{number};{carrier};\n'
    return served(write(tmp_path / "request_sql_1.csv", header + row))


@pytest.mark.parametrize(
    "status, text",
    [
        # The order states PrestaShop installs (install-dev/langs/*/data/order_state.xml), in its languages.
        (
            "Expédié",
            f"Order XKBKNABJK was found and has shipped with Colissimo (tracking number 6A12345678901). {FOLLOW}",
        ),
        ("Livré", "Order XKBKNABJK was found and has been delivered. It contained 1 x Mug."),
        ("Annulé", f"Order XKBKNABJK {CANCELLED}"),
        ("Remboursement", f"Order XKBKNABJK was found. {REFUNDED}"),
        (
            "Paiement accepté",
            f"Order XKBKNABJK was found. It was placed on 25 Nov 2026. It contains 1 x Mug. {NOT_YET}",
        ),
        (
            "En cours de préparation",
            f"Order XKBKNABJK was found. It was placed on 25 Nov 2026. It contains 1 x Mug. {NOT_YET}",
        ),
        ("En attente de virement bancaire", f"Order XKBKNABJK was found. It contains 1 x Mug. {UNPAID}"),
        ("Erreur de paiement", "Order XKBKNABJK was found, but its payment failed, so it will not ship."),
        (
            "Bestellung versandt",
            "Order XKBKNABJK was found and has shipped with Colissimo (tracking number 6A12345678901).",
        ),
        ("Bestellung ausgeliefert", "Order XKBKNABJK was found and has been delivered."),
        ("Bestellung storniert", f"Order XKBKNABJK {CANCELLED}"),
        (
            "Zahlung eingegangen",
            f"Order XKBKNABJK was found. It was placed on 25 Nov 2026. It contains 1 x Mug. {NOT_YET}",
        ),
        ("Zahlung erstattet", f"Order XKBKNABJK was found. {REFUNDED}"),
        ("Warten auf Zahlungseingang von Bank", f"Order XKBKNABJK was found. It contains 1 x Mug. {UNPAID}"),
        ("Pago aceptado", f"Order XKBKNABJK was found. It was placed on 25 Nov 2026. It contains 1 x Mug. {NOT_YET}"),
        ("Enviado", "Order XKBKNABJK was found and has shipped with Colissimo (tracking number 6A12345678901)."),
        (
            "Consegna in corso",
            "Order XKBKNABJK was found and has shipped with Colissimo (tracking number 6A12345678901).",
        ),
        (
            "Pagamento accettato",
            f"Order XKBKNABJK was found. It was placed on 25 Nov 2026. It contains 1 x Mug. {NOT_YET}",
        ),
        (
            "Betaling aanvaard",
            f"Order XKBKNABJK was found. It was placed on 25 Nov 2026. It contains 1 x Mug. {NOT_YET}",
        ),
        (
            "Wordt momenteel voorbereid",
            f"Order XKBKNABJK was found. It was placed on 25 Nov 2026. It contains 1 x Mug. {NOT_YET}",
        ),
        ("Verzonden", "Order XKBKNABJK was found and has shipped with Colissimo (tracking number 6A12345678901)."),
        (
            "Awaiting Cash On Delivery validation",
            "Order XKBKNABJK was found. It was placed on 25 Nov 2026. It contains "
            "1 x Mug. The shop's records give its status as \"Awaiting Cash On "
            'Delivery validation"; they say nothing more about its shipping.',
        ),
    ],
)
def test_prestashop_order_states_in_the_shops_languages(tmp_path, status, text):
    shipped = text.startswith("Order XKBKNABJK was found and has shipped")
    snapshot = prestashop_export(tmp_path, status, "6A12345678901" if shipped else "")
    assert ask(snapshot, "xkbknabjk", "Lucie.Martin@example.fr")[1].startswith(text)


# Odoo #############################################################################################


def odoo_rows():
    """The fixture's rows as Odoo's XLSX holds them: real dates and numbers, empty cells empty."""
    with open(FIXTURES / "odoo_sale_orders.csv", newline="", encoding="utf-8") as f:
        header, *rows = list(csv.reader(f))
    typed = []
    for row in rows:
        cells = dict(zip(header, row))
        if cells["Order Date"]:
            cells["Order Date"] = datetime.fromisoformat(cells["Order Date"])
        for number in ("Total", "Order Lines/Quantity"):
            cells[number] = float(cells[number]) if cells[number] else None
        typed.append([None if value == "" else value for value in cells.values()])
    return [header, *typed]


def test_odoo_reads_the_same_from_its_workbook(tmp_path):
    # Sales > Orders > select > Action > Export > XLSX: "Sales Order (sale.order).xlsx", one sheet.
    path = write_xlsx(tmp_path / "Sales Order (sale.order).xlsx", {"Sheet1": odoo_rows()})
    snapshot = served(path)
    assert snapshot.layout == "Odoo sales orders export"
    for _name, order_id, email, text, url in (case for case in LOOKUPS if case[0] == "odoo_sale_orders.csv"):
        assert ask(snapshot, order_id, email) == (200, text, url)


def test_odoo_order_lines_on_rows_of_their_own_never_make_a_short_list(snapshots, capsys):
    # S00042 has two order lines, the second on a row whose order cells Odoo leaves empty. Naming
    # only the first ("It contains 1 x Office Chair") would be a confident wrong answer.
    context = ask(snapshots["odoo_sale_orders.csv"], "S00042", "anna.mueller@example.com")[1]
    assert "1 x [FURN_7777] Office Chair, 2 x [FURN_8888] Desk Lamp." in context
    assert snapshots["odoo_sale_orders.csv"].reading["attached"] == 3
    out = check(capsys, FIXTURES / "odoo_sale_orders.csv")[1]
    assert "rows     8; orders 5" in out and "3 item rows without an order number belong to the order above" in out


def test_odoo_without_the_customer_email_says_how_to_export_it(tmp_path):
    rows = odoo_rows()
    at = rows[0].index("Customer/Email")
    path = write_xlsx(tmp_path / "orders.xlsx", {"Sheet1": [row[:at] + row[at + 1 :] for row in rows]})
    with pytest.raises(app.ExportError) as refused:
        served(path)
    assert "Odoo sales orders export carries no buyer's e-mail address" in str(refused.value)
    assert "Customer > Email" in str(refused.value)


# plentymarkets ####################################################################################


@pytest.mark.parametrize(
    "status, text",
    [
        ("7", "Order 48213 was found and has shipped with DHL (tracking number 00340434161094042557)."),
        ("7.1", "Order 48213 was found and has shipped with DHL"),
        (
            "5",
            f"Order 48213 was found. It was placed on 27 Nov 2026. It contains 1 x Bürostuhl Ergo, 2 x "
            f"Schreibtischlampe Lumen. {NOT_YET}",
        ),
        ("3", f"Order 48213 was found. It contains 1 x Bürostuhl Ergo, 2 x Schreibtischlampe Lumen. {UNPAID}"),
        ("8.1", f"Order 48213 {CANCELLED}"),
        ("Storniert durch Kunden", f"Order 48213 {CANCELLED}"),
        ("Freigabe Versand", "Order 48213 was found. It was placed on 27 Nov 2026."),
        # A status of the shop's own, by ID or name, claims nothing.
        (
            "6",
            "Order 48213 was found. It was placed on 27 Nov 2026. It contains 1 x Bürostuhl Ergo, 2 x "
            'Schreibtischlampe Lumen. The shop\'s records give its status as "6"; they say nothing more',
        ),
    ],
)
def test_plentymarkets_statuses_by_name_or_id(tmp_path, status, text):
    fixture = (FIXTURES / "plentymarkets_orders.csv").read_text(encoding="utf-8")
    path = write(
        tmp_path / "auftraege.csv",
        fixture.replace(";Warenausgang gebucht;Bürostuhl", f";{status};Bürostuhl").replace(
            ";Warenausgang gebucht;Schreibtischlampe", f";{status};Schreibtischlampe"
        ),
    )
    assert ask(served(path), "48213", "anna.mueller@example.com")[1].startswith(text)


# ShipStation ######################################################################################


def test_shipstation_one_order_in_two_shipments_names_both_parcels(snapshots):
    status, context, url = ask(snapshots["shipstation_shipments.csv"], "#1004", "ivy.chen@example.com")
    assert status == 200 and context.startswith("Order #1004 was found and has shipped on 26 Nov 2026 and 27 Nov 2026")
    assert "(tracking number 9400111899223344556677, 9400111899223344556688)" in context
    assert "It contains 1 x Office Chair, 1 x Standing Desk." in context
    assert url == "https://tools.usps.com/go/TrackConfirmAction?tLabels=9400111899223344556677"


def test_shipstation_one_order_in_two_shipments_claims_no_single_ship_date(snapshots):
    # The parcels shipped on 11/26 and 11/27: neither day alone is the whole order's.
    context = ask(snapshots["shipstation_shipments.csv"], "#1004", "ivy.chen@example.com")[1]
    assert "has shipped on 26 Nov 2026 and 27 Nov 2026" in context


def test_an_export_without_status_or_ship_date_claims_nothing(tmp_path):
    # The rule that answers ShipStation's shipments needs both a ship date and a tracking number.
    path = write(
        tmp_path / "o.csv", "Order Number,Email,Tracking Number,Carrier\n7,a@example.com,1Z999AA10123456784,UPS\n"
    )
    context = ask(served(path), "7", "a@example.com")[1]
    assert context == f"Order 7 was found. It contains the items ordered. {NOT_SAID}"


# Exports in Spanish, Italian, Dutch, German and French, served by the default configuration ########

LANGUAGES = {
    "es": (
        "utf-8",
        "\n",
        "Número de pedido;Correo electrónico;Estado;Producto;Cantidad;Número de seguimiento;Transportista",
        [
            "ES-1001;lucia@example.es;Enviado;Cafetera;1;PQ4F6P0703673180128001L;Correos",
            "ES-1001;lucia@example.es;Enviado;Taza;2;PQ4F6P0703673180128001L;Correos",
            "ES-1002;pablo@example.es;Entregado;Tetera;1;;",
            "ES-1003;ana@example.es;Cancelado;Taza;1;;",
            "ES-1004;jorge@example.es;Enviado;Molinillo;1;07752200123456;SEUR",
            "ES-1005;maria@example.es;Procesando;Cafetera;1;;",
        ],
    ),
    "it": (
        "utf-8",
        "\n",
        "Numero ordine;Email;Stato;Prodotto;Quantità;Numero di tracciamento;Corriere",
        [
            "1201;giulia@example.it;Spedito;Moka;1;RR123456789IT;Poste Italiane",
            "1202;luca@example.it;Consegnato;Tazzina;6;;",
            "1203;sara@example.it;Annullato;Moka;1;;",
            "1204;marco@example.it;Spedito;Macinacaffè;1;123456789012;BRT",
            "1205;anna@example.it;In lavorazione;Moka;1;;",
        ],
    ),
    "nl": (
        "utf-8",
        "\n",
        "Bestelnummer;E-mail;Status;Product;Aantal;Track & Trace-code;Vervoerder",
        [
            "NL-501;sanne@example.nl;Verzonden;Fietsbel;2;3SABCD1234567;PostNL",
            "NL-502;daan@example.nl;Geleverd;Zadeltas;1;;",
            "NL-503;emma@example.nl;Geannuleerd;Fietsbel;1;;",
            "NL-504;lars@example.be;Verzonden;Spatbord;1;323212345678901234;bpost",
            "NL-505;noor@example.nl;In behandeling;Fietsbel;1;;",
        ],
    ),
    # German and French ERP-style exports as Excel saves them: Windows-1252, ";" and CRLF.
    "de": (
        "cp1252",
        "\r\n",
        "Bestellnummer;E-Mail;Status;Artikel;Menge;Sendungsnummer;Versanddienstleister",
        [
            "100234;anna@example.de;versendet;Wanderschuhe Größe 42;1;00340434161094042557;DHL Paket",
            "100235;jonas@example.de;zugestellt;Trinkflasche;2;;",
            "100236;lena@example.de;storniert;Rucksack;1;;",
            "100237;max@example.de;versendet;Stirnlampe;1;H1234567890123456789;Hermes",
            "100238;eva@example.at;In Bearbeitung;Grödel;1;;",
            "100239;tim@example.de;versendet;Isomatte;1;RR123456789DE;Deutsche Post",
        ],
    ),
    "fr": (
        "cp1252",
        "\r\n",
        "N° de commande;E-mail;Statut;Produit;Quantité;Numéro de suivi;Transporteur",
        [
            "FR-7001;chloe@example.fr;Expédiée;Théière en fonte;1;6A12345678901;Colissimo",
            "FR-7002;hugo@example.fr;Livrée;Bol à café;4;;",
            "FR-7003;lea@example.fr;Annulée;Théière en fonte;1;;",
            "FR-7004;louis@example.fr;Expédiée;Plateau;1;XW123456785FR;Chronopost",
            "FR-7005;manon@example.fr;En cours;Carafe;1;;",
        ],
    ),
}


def shipped(order_id, carrier, number, items):
    return f"Order {order_id} was found and has shipped with {carrier} (tracking number {number}). {FOLLOW} It contains {items}."


def delivered(order_id, items):
    return f"Order {order_id} was found and has been delivered. It contained {items}. If anything is missing or damaged, the customer can contact support."


def processing(order_id, items):
    return f"Order {order_id} was found. It contains {items}. {NOT_YET}"


LANGUAGE_LOOKUPS = [
    (
        "es",
        "es-1001",
        "Lucia@Example.es",
        shipped("ES-1001", "Correos", "PQ4F6P0703673180128001L", "1 x Cafetera, 2 x Taza"),
        "https://www.correos.es/es/es/herramientas/localizador/envios/detalle?tracking-number=PQ4F6P0703673180128001L",
    ),
    ("es", "ES-1002", "pablo@example.es", delivered("ES-1002", "1 x Tetera"), None),
    ("es", "ES-1003", "ana@example.es", f"Order ES-1003 {CANCELLED}", None),
    (
        "es",
        "ES1004",
        "jorge@example.es",
        shipped("ES-1004", "SEUR", "07752200123456", "1 x Molinillo"),
        "https://www.seur.com/livetracking/?segOnlineIdentificador=07752200123456&segOnlineIdioma=es",
    ),
    ("es", "ES-1005", "maria@example.es", processing("ES-1005", "1 x Cafetera"), None),
    (
        "it",
        "1201",
        "giulia@example.it",
        shipped("1201", "Poste Italiane", "RR123456789IT", "1 x Moka"),
        "https://www.poste.it/cerca/index.html#/risultati-spedizioni/RR123456789IT",
    ),
    ("it", "1202", "luca@example.it", delivered("1202", "6 x Tazzina"), None),
    ("it", "1203", "sara@example.it", f"Order 1203 {CANCELLED}", None),
    (
        "it",
        "1204",
        "marco@example.it",
        shipped("1204", "BRT", "123456789012", "1 x Macinacaffè"),
        "https://vas.brt.it/vas/sped_det_show.hsm?referer=sped_numspe_par.htm&Nspediz=123456789012",
    ),
    ("it", "1205", "anna@example.it", processing("1205", "1 x Moka"), None),
    (
        "nl",
        "NL-501",
        "sanne@example.nl",
        shipped("NL-501", "PostNL", "3SABCD1234567", "2 x Fietsbel"),
        "https://jouw.postnl.nl/track-and-trace/3SABCD1234567",
    ),
    ("nl", "nl502", "daan@example.nl", delivered("NL-502", "1 x Zadeltas"), None),
    ("nl", "NL-503", "emma@example.nl", f"Order NL-503 {CANCELLED}", None),
    (
        "nl",
        "NL-504",
        "lars@example.be",
        shipped("NL-504", "bpost", "323212345678901234", "1 x Spatbord"),
        "https://track.bpost.cloud/btr/web/#/search?itemCode=323212345678901234&lang=en",
    ),
    ("nl", "NL-505", "noor@example.nl", processing("NL-505", "1 x Fietsbel"), None),
    (
        "de",
        "100234",
        "anna@example.de",
        shipped("100234", "DHL Paket", "00340434161094042557", "1 x Wanderschuhe Größe 42"),
        DHL_PAKET.format("00340434161094042557"),
    ),
    ("de", "100235", "jonas@example.de", delivered("100235", "2 x Trinkflasche"), None),
    ("de", "100236", "lena@example.de", f"Order 100236 {CANCELLED}", None),
    (
        "de",
        "100237",
        "max@example.de",
        shipped("100237", "Hermes", "H1234567890123456789", "1 x Stirnlampe"),
        "https://www.myhermes.de/empfangen/sendungsverfolgung/sendungsinformation/#H1234567890123456789",
    ),
    ("de", "100238", "eva@example.at", processing("100238", "1 x Grödel"), None),
    (
        "de",
        "100239",
        "tim@example.de",
        shipped("100239", "Deutsche Post", "RR123456789DE", "1 x Isomatte"),
        "https://deutschepost.de/de/s/sendungsverfolgung.html?piececode=RR123456789DE",
    ),
    (
        "fr",
        "FR-7001",
        "chloe@example.fr",
        shipped("FR-7001", "Colissimo", "6A12345678901", "1 x Théière en fonte"),
        "https://www.laposte.fr/outils/suivre-vos-envois?code=6A12345678901",
    ),
    ("fr", "FR-7002", "hugo@example.fr", delivered("FR-7002", "4 x Bol à café"), None),
    ("fr", "FR-7003", "lea@example.fr", f"Order FR-7003 {CANCELLED}", None),
    (
        "fr",
        "FR-7004",
        "louis@example.fr",
        shipped("FR-7004", "Chronopost", "XW123456785FR", "1 x Plateau"),
        "https://www.chronopost.fr/tracking-no-cms/suivi-page?listeNumerosLT=XW123456785FR",
    ),
    ("fr", "FR-7005", "manon@example.fr", processing("FR-7005", "1 x Carafe"), None),
]


@pytest.fixture(scope="module")
def languages(tmp_path_factory):
    folder = tmp_path_factory.mktemp("languages")
    out = {}
    for language, (encoding, line_end, header, rows) in LANGUAGES.items():
        data = line_end.join([header, *rows, ""]).encode(encoding)
        out[language] = served(write(folder / f"bestellungen_{language}.csv", data))
    return out


@pytest.mark.parametrize("language, order_id, email, text, url", LANGUAGE_LOOKUPS)
def test_exports_in_five_languages_get_the_right_answers(languages, language, order_id, email, text, url):
    assert ask(languages[language], order_id, email) == (200, text, url)


@pytest.mark.parametrize("language", LANGUAGES)
def test_exports_in_five_languages_are_read_by_the_default_configuration(languages, language):
    snapshot = languages[language]
    assert snapshot.layout == "generic export"
    assert set(snapshot.columns) == {
        "order_id",
        "email",
        "status",
        "item_name",
        "item_quantity",
        "tracking_number",
        "carrier",
    }
    assert snapshot.encoding == ("cp1252" if LANGUAGES[language][0] == "cp1252" else None)


# Answers in German ################################################################################

GERMAN = {
    "processing": "Bestellung {order_id} wurde gefunden.[ Sie wurde am {order_date} aufgegeben.] Sie enthält {items}. "
    "Sie ist noch nicht versandt; Bestellungen gehen in der Regel innerhalb von zwei Werktagen raus.",
    "shipped_tracked": "Bestellung {order_id} wurde gefunden und ist versandt[ mit {carrier}][ (Sendungsnummer "
    "{tracking_numbers})]. Sie lässt sich mit dem Link zur Sendungsverfolgung verfolgen. "
    "Sie enthält {items}.",
    "delivered": "Bestellung {order_id} wurde gefunden und ist zugestellt. Sie enthielt {items}.",
    "cancelled": "Bestellung {order_id} wurde gefunden, aber storniert; sie wird nicht versandt.",
    "not_found": "Unter der Nummer {order_id} und dieser E-Mail-Adresse wurde keine Bestellung gefunden. "
    "Bitte prüfen Sie beide Angaben.",
}


@pytest.fixture
def german_contexts(contexts_file):
    lines = []
    for line in contexts_file.read_text(encoding="utf-8").splitlines():
        name = line.split(" = ", 1)[0]
        lines.append(f"{name} = {json.dumps(GERMAN[name], ensure_ascii=False)}" if name in GERMAN else line)
    contexts_file.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return contexts_file


@pytest.mark.parametrize(
    "order_id, email, status, text",
    [
        (
            "100234",
            "anna@example.de",
            200,
            "Bestellung 100234 wurde gefunden und ist versandt mit DHL Paket (Sendungsnummer 00340434161094042557). Sie "
            "lässt sich mit dem Link zur Sendungsverfolgung verfolgen. Sie enthält 1 x Wanderschuhe Größe 42.",
        ),
        (
            "100235",
            "jonas@example.de",
            200,
            "Bestellung 100235 wurde gefunden und ist zugestellt. Sie enthielt 2 x Trinkflasche.",
        ),
        (
            "100236",
            "lena@example.de",
            200,
            "Bestellung 100236 wurde gefunden, aber storniert; sie wird nicht versandt.",
        ),
        (
            "100238",
            "eva@example.at",
            200,
            "Bestellung 100238 wurde gefunden. Sie enthält 1 x Grödel. Sie ist noch nicht versandt; Bestellungen gehen in "
            "der Regel innerhalb von zwei Werktagen raus.",
        ),
        (
            "100299",
            "anna@example.de",
            404,
            "Unter der Nummer 100299 und dieser E-Mail-Adresse wurde keine Bestellung gefunden. Bitte prüfen Sie beide "
            "Angaben.",
        ),
    ],
)
def test_templates_written_in_german_answer_in_german(tmp_path, german_contexts, order_id, email, status, text):
    encoding, line_end, header, rows = LANGUAGES["de"]
    path = write(tmp_path / "bestellungen.csv", line_end.join([header, *rows, ""]).encode(encoding))
    assert ask(served(path, german_contexts), order_id, email)[:2] == (status, text)


# European carriers' tracking links ################################################################

CARRIERS = [
    # name as exported, tracking number, the link the agent gets
    ("DHL Paket", "00340434161094042557", DHL_PAKET.format("00340434161094042557")),
    ("DHL Paket International", "CC123456789DE", DHL_PAKET.format("CC123456789DE")),
    ("dhl_paket", "00340434161094042557", DHL_PAKET.format("00340434161094042557")),
    ("DHL Intraship (DE)", "00340434161094042557", DHL_PAKET.format("00340434161094042557")),
    ("DHL Express", "1234567890", DHL_EXPRESS + "1234567890"),
    ("DHL Express Worldwide", "1234567890", DHL_EXPRESS + "1234567890"),
    ("dhl_express", "1234567890", DHL_EXPRESS + "1234567890"),
    # Plain DHL: Paket for a German shop, Express for some others; this page finds both.
    ("DHL", "00340434161094042557", DHL_PARCEL + "00340434161094042557"),
    ("DHL", "1234567890", DHL_PARCEL + "1234567890"),
    (
        "Deutsche Post DHL",
        "00340434161094042557",
        "https://www.dhl.de/de/privatkunden/pakete-empfangen/verfolgen.html?lang=de&idc=00340434161094042557",
    ),
    ("Deutsche Post", "RR123456789DE", "https://deutschepost.de/de/s/sendungsverfolgung.html?piececode=RR123456789DE"),
    (
        "Deutsche Post Warenpost International",
        "LX123456789DE",
        "https://deutschepost.de/de/s/sendungsverfolgung.html?piececode=LX123456789DE",
    ),
    ("DHL Parcel UK", "1234567890123", "https://track.dhlparcel.co.uk/?con=1234567890123"),
    (
        "Hermes",
        "H1234567890123456789",
        "https://www.myhermes.de/empfangen/sendungsverfolgung/sendungsinformation/#H1234567890123456789",
    ),
    ("Hermes UK", "H01ABC1234567890", "https://www.evri.com/track/parcel/H01ABC1234567890"),
    ("GLS", "12345678901", "https://gls-group.eu/track/12345678901"),
    ("DPD", "01234567890123", "https://tracking.dpd.de/status/en_US/parcel/01234567890123"),
    ("DPD Predict", "01234567890123", "https://tracking.dpd.de/status/en_US/parcel/01234567890123"),
    ("DPD France", "25000123456789", "https://www.dpd.fr/trace/25000123456789"),
    ("DPD UK", "15501234567890", "https://www.dpd.co.uk/apps/tracking/?reference=15501234567890#results"),
    ("DPD.co.uk", "15501234567890", "https://www.dpd.co.uk/apps/tracking/?reference=15501234567890#results"),
    ("DPD Austria", "01234567890123", "https://www.mydpd.at/?f=parcel.load&p=01234567890123"),
    (
        "DPD NL",
        "05212345678901",
        "https://www.dpdgroup.com/nl/mydpd/my-parcels/track?lang=en&parcelNumber=05212345678901",
    ),
    ("Colissimo", "6A12345678901", "https://www.laposte.fr/outils/suivre-vos-envois?code=6A12345678901"),
    ("La Poste", "1A12345678901", "https://www.laposte.fr/outils/suivre-vos-envois?code=1A12345678901"),
    ("La Poste - Colissimo", "6A12345678901", "https://www.laposte.fr/outils/suivre-vos-envois?code=6A12345678901"),
    (
        "Chronopost",
        "XW123456785FR",
        "https://www.chronopost.fr/tracking-no-cms/suivi-page?listeNumerosLT=XW123456785FR",
    ),
    ("Mondial Relay", "123456789012", "https://www.mondialrelay.fr/suivi-de-colis/?numeroExpedition=123456789012"),
    (
        "Correos",
        "PQ4F6P0703673180128001L",
        "https://www.correos.es/es/es/herramientas/localizador/envios/detalle?tracking-number=PQ4F6P0703673180128001L",
    ),
    (
        "SEUR",
        "07752200123456",
        "https://www.seur.com/livetracking/?segOnlineIdentificador=07752200123456&segOnlineIdioma=es",
    ),
    ("Poste Italiane", "RR123456789IT", "https://www.poste.it/cerca/index.html#/risultati-spedizioni/RR123456789IT"),
    (
        "BRT",
        "123456789012",
        "https://vas.brt.it/vas/sped_det_show.hsm?referer=sped_numspe_par.htm&Nspediz=123456789012",
    ),
    (
        "BRT (Bartolini)",
        "123456789012",
        "https://vas.brt.it/vas/sped_det_show.hsm?referer=sped_numspe_par.htm&Nspediz=123456789012",
    ),
    ("bpost", "323212345678901234", "https://track.bpost.cloud/btr/web/#/search?itemCode=323212345678901234&lang=en"),
    ("PostNord", "00370712345678901234", "https://portal.postnord.com/tracking/details/00370712345678901234"),
    (
        "PostNord Sverige AB",
        "00370712345678901234",
        "https://portal.postnord.com/tracking/details/00370712345678901234",
    ),
    ("PostNL", "3SABCD1234567", "https://jouw.postnl.nl/track-and-trace/3SABCD1234567"),
    ("Swiss Post", "99.00.123456.12345678", "https://service.post.ch/ekp-web/ui/entry/search/99.00.123456.12345678"),
    # Swiss Post in French: not France's La Poste.
    (
        "La Poste Suisse",
        "99.00.123456.12345678",
        "https://service.post.ch/ekp-web/ui/entry/search/99.00.123456.12345678",
    ),
    ("Austrian Post", "1234567890123456789012", "https://www.post.at/sv/sendungsdetails?snr=1234567890123456789012"),
    (
        "Österreichische Post",
        "1234567890123456789012",
        "https://www.post.at/sv/sendungsdetails?snr=1234567890123456789012",
    ),
    ("post.at", "1234567890123456789012", "https://www.post.at/sv/sendungsdetails?snr=1234567890123456789012"),
    (
        "Osterreichische Post",
        "1234567890123456789012",  # written without its accent
        "https://www.post.at/sv/sendungsdetails?snr=1234567890123456789012",
    ),
    ("InPost", "612345678901234567890123", "https://inpost.pl/sledzenie-przesylek?number=612345678901234567890123"),
    ("UPS", "1Z999AA10123456784", "https://www.ups.com/track?tracknum=1Z999AA10123456784"),
    ("FedEx", "123456789012", "https://www.fedex.com/fedextrack/?trknbr=123456789012"),
    # A carrier no line names: the number, and no link.
    ("Spedizioni Rossi", "SR-1", None),
    # Names that start with another carrier's: their own page, or none, never the other's.
    ("Correos Express", "3230001234567890", None),
    ("GLS Italy", "TO1234567", None),
    (
        "DPD Nederland",
        "05212345678901",
        "https://www.dpdgroup.com/nl/mydpd/my-parcels/track?lang=en&parcelNumber=05212345678901",
    ),
]


@pytest.mark.parametrize("carrier, number, url", CARRIERS)
def test_each_carrier_gets_its_own_tracking_link(tmp_path, carrier, number, url):
    path = write(
        tmp_path / "orders.csv",
        "Bestellnummer;E-Mail;Status;Artikel;Menge;Sendungsnummer;Versanddienstleister\n"
        f"5001;kim@example.de;versendet;Lampe;1;{number};{carrier}\n",
    )
    status, context, tracking_url = ask(served(path), "5001", "kim@example.de")
    head = f"Order 5001 was found and has shipped with {carrier} (tracking number {number})."
    said = f"{FOLLOW} It contains 1 x Lampe." if url else f"It contains 1 x Lampe. {NO_LINK}"
    assert (status, context, tracking_url) == (200, f"{head} {said}", url)


def test_every_carrier_link_is_https_with_the_tracking_number():
    for name, page in app.load_config(CONTEXTS).carriers:
        assert page == "" or (page.startswith("https://") and page.count("{tracking_number}") == 1), name


def test_check_reports_status_words_of_several_languages_with_their_counts(tmp_path, capsys):
    # A shop whose staff, or whose several shop systems, write the state in their own languages.
    path = write(
        tmp_path / "orders.csv",
        "Order ID;Email;Status;Item\n1;a@example.com;versendet;Hut\n"
        "2;b@example.com;Expédiée;Chapeau\n3;c@example.com;Enviado;Sombrero\n"
        "4;d@example.com;shipped;Hat\n5;e@example.com;versendet;Hut\n"
        "6;f@example.com;geannuleerd;Hoed\n",
    )
    code, out = check(capsys, path)
    assert code == 0
    assert (
        "values   status: versendet 2 (= shipped), expediee 1 (= shipped), enviado 1 (= shipped), shipped 1, "
        "geannuleerd 1 (= cancelled)" in out
    )
    assert "answers  shipped 5, cancelled 1" in out
