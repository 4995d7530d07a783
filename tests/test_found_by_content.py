"""Exports whose headers no list knows: columns found by their content, served only when sure,
and the words of other languages (vocabulary.toml, [vocabulary] in contexts.toml).

Headers here are in Finnish and Polish, languages the service ships no words for, so only the
values can tell which column is which.
"""

import base64
import json

import pytest
from conftest import KEY, Client, make_settings, started, write

import app

# Finnish headers: Tilaus (order), Sähköposti (email), Tila (state), Tuote (item), Määrä (quantity), Hinta (price).
FINNISH = (
    "Tilaus;Sähköposti;Tila;Tuote;Määrä;Hinta;Päivä\r\n"
    "FI-5001;aino@example.fi;versendet;Kahvikuppi;2;12,50;01.11.2026\r\n"
    "FI-5001;aino@example.fi;versendet;Teekannu;1;24,90;01.11.2026\r\n"
    "FI-5002;eero@example.fi;storniert;Lautanen;4;8,00;02.11.2026\r\n"
    "FI-5003;liisa@example.fi;offen;Kulho;1;9,50;03.11.2026\r\n"
    "FI-5004;aino@example.fi;versendet;Lusikka;6;3,00;04.11.2026\r\n"
)


def load(tmp_path, text, contexts=None, name="orders.csv", encoding="utf-8"):
    path = write(tmp_path / "data" / name, text, encoding=encoding)
    return app.build_snapshot(app.load_config(contexts or app.HERE / "contexts.toml"), path)


def ask(snapshot, order_id, email):
    status, body = app.answer(snapshot, order_id, email)
    return status, json.loads(body)["context"]


def check(capsys, tmp_path, contexts=None):
    code = app.main(
        ["check", "--data", str(tmp_path / "data"), "--contexts", str(contexts or app.HERE / "contexts.toml")]
    )
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_columns_are_served_from_their_content_when_only_one_fits(tmp_path, capsys):
    snapshot = load(tmp_path, FINNISH, encoding="cp1252")
    assert snapshot.columns["order_id"] == "Tilaus" and snapshot.columns["email"] == "Sähköposti"
    assert snapshot.columns["status"] == "Tila"
    assert ask(snapshot, "fi-5001", "aino@example.fi") == (
        200,
        "Order FI-5001 was found and has shipped. It contains the items ordered. No tracking link is available for it.",
    )
    assert "it was cancelled" in ask(snapshot, "FI-5002", "eero@example.fi")[1]
    code, out = check(capsys, tmp_path)
    assert code == 0
    assert (
        'order_id           <- "Tilaus" (found by its content: 4 distinct values over 5 rows, shaped like '
        "'FI-5001')" in out
    )
    assert "status: versendet 2 (= shipped), storniert 1 (= cancelled), offen 1 (= processing)" in out


def test_serving_from_content_is_logged_and_shown_on_healthz(tmp_path, contexts_file, logs):
    write(tmp_path / "data" / "orders.csv", FINNISH)
    service = started(make_settings(tmp_path / "data", contexts_file))
    assert "column 'Tilaus' read as order_id because of its content" in logs.text
    health = Client(app.create_app(service)).get("/healthz", key=KEY).json
    assert health["columns_found_by_content"] == {"order_id": "Tilaus", "email": "Sähköposti", "status": "Tila"}


# Hungarian, which the vocabulary does not hold: Rendelés (order) and Csomag (parcel) both look like
# order numbers here, and no header's words tell them apart.
AMBIGUOUS = (
    "Rendelés,E-mail klienta,Produkt,Csomag\n"
    "PL-7001,ola@example.pl,Kubek,PP7001\n"
    "PL-7001,ola@example.pl,Talerz,PP7001\n"
    "PL-7002,jan@example.pl,Miska,PP7002\n"
    "PL-7003,ewa@example.pl,Dzbanek,PP7003\n"
)


def test_two_columns_that_fit_are_refused_with_a_block_that_works_when_pasted(tmp_path, contexts_file, capsys):
    write(tmp_path / "data" / "orders.csv", AMBIGUOUS)
    with pytest.raises(app.ExportError) as refused:
        load(tmp_path, AMBIGUOUS)
    assert "By their content, 'Rendelés' or 'Csomag' could be it" in str(refused.value)
    assert "the service does not guess" in str(refused.value)
    code, out = check(capsys, tmp_path, contexts_file)
    assert code == 1
    block = out[out.index("any lines of the same fields):\n") :].splitlines()[1:]
    assert block[0].startswith('order_id = ["Rendelés"')
    # Pasted as the block says: under [columns], each line in place of any line of its field.
    text = contexts_file.read_text()
    for line in block:
        if " = [" in line:
            field = line.split(" = ")[0]
            if f"\n{field} = [" in text:
                start = text.index(f"\n{field} = [") + 1
                text = text[:start] + line + text[text.index("\n", start) :]
            else:
                text = text.replace("\n[columns]\n", f"\n[columns]\n{line}\n", 1)
    contexts_file.write_text(text)
    code, out = check(capsys, tmp_path, contexts_file)
    assert code == 0 and 'order_id           <- "Rendelés"' in out
    assert ask(load(tmp_path, AMBIGUOUS, contexts_file), "PL-7001", "ola@example.pl")[0] == 200


@pytest.mark.parametrize(
    "column, values",
    [
        ("quantity", ["1", "2", "1", "3", "1"]),
        ("price", ["12.50", "8.00", "12.50", "3.10", "9.99"]),
        ("date", ["2026-11-01", "2026-11-01", "2026-11-02", "2026-11-03", "2026-11-04"]),
        ("sku", ["SKU-1", "SKU-2", "SKU-1", "SKU-3", "SKU-2"]),  # an item's code comes back after other items
        ("note", ["please wrap", "", "call first", "", "leave at door"]),
        ("row", ["1", "2", "3", "4", "5"]),  # a row counter: unique, together, digits, and no order's number
    ],
)
def test_columns_that_only_look_like_numbers_are_never_taken_for_the_order(column, values):
    header = ["Kontakt", column]
    rows = [[f"c{n}@example.com", value] for n, value in enumerate(values)]
    config = app.load_config(app.HERE / "contexts.toml")
    assert "order_id" not in app.found_by_content(config, header, rows, {})


def test_a_payment_column_is_not_taken_for_the_orders_state():
    config = app.load_config(app.HERE / "contexts.toml")
    header = ["Kontakt", "Zahlung"]
    rows = [[f"c{n}@example.com", word] for n, word in enumerate(["bezahlt", "bezahlt", "offen", "bezahlt", "bezahlt"])]
    assert "status" not in app.found_by_content(config, header, rows, {"email": 0})


@pytest.mark.parametrize("typed", ["Expédiée", "EXPÉDIÉE", "expediee", "Expediée", " expédiée "])
def test_status_words_compare_without_accents_or_case(typed):
    assert app.status_word(typed) == "expediee"


@pytest.mark.parametrize(
    "header, field",
    [
        ("Numéro de suivi", "tracking_number"),
        ("NUMERO DE SUIVI", "tracking_number"),
        ("N° de commande", "order_id"),
        ("Correo electronico", "email"),
        ("Quantità", "item_quantity"),
        ("Qta", "item_quantity"),
    ],
)
def test_headers_of_other_languages_compare_without_accents(header, field):
    config = app.load_config(app.HERE / "contexts.toml")
    assert config.words.reading(field, app.header_words(header)) is not None


def test_contexts_toml_adds_words_and_headers_of_its_own(tmp_path, contexts_file):
    contexts_file.write_text(
        contexts_file.read_text() + '\n[vocabulary.headers]\norder_id = ["Vorgang"]\n'
        '\n[vocabulary.statuses]\nshipped = ["raus"]\ncancelled = ["versendet"]\n'
    )
    snapshot = load(
        tmp_path, "Vorgang,Mail,Status\nV-1,a@example.com,raus\nV-2,b@example.com,versendet\n", contexts_file
    )
    assert snapshot.columns["order_id"] == "Vorgang"
    assert "has shipped" in ask(snapshot, "V-1", "a@example.com")[1]
    assert "it was cancelled" in ask(snapshot, "V-2", "b@example.com")[1]  # contexts.toml's meaning wins


@pytest.mark.parametrize(
    "text, says",
    [
        ('[vocabulary]\nwordz = ["x"]\n', "contexts.toml: [vocabulary.wordz]: is not a known section"),
        ('[vocabulary.fields.status]\nsays = ["status + of"]\n', "names 'of', which is no group of [words]"),
        ('[vocabulary.statuses]\nshipped = "raus"\n', None),  # a single word is a list of one
        ("[vocabulary.statuses]\nshipped = [1]\n", "[vocabulary.statuses] shipped: should be a list of texts"),
    ],
)
def test_a_mistake_in_vocabulary_is_a_clear_config_error(contexts_file, text, says):
    contexts_file.write_text(contexts_file.read_text() + "\n" + text)
    if says is None:
        assert app.load_config(contexts_file).meanings["raus"] == "shipped"
        return
    with pytest.raises(app.ConfigError) as caught:
        app.load_config(contexts_file)
    assert says in str(caught.value)


# A row counter ("Lfd", running number) beside the order's own number, written with a space.
COUNTED = (
    "Lfd;Beleg;Kontakt;Zustand;Artikel\n"
    "1;AB 10023;k1@example.com;versendet;Tasse\n"
    "2;AB 10023;k1@example.com;versendet;Teller\n"
    "3;AB 10024;k2@example.com;storniert;Kanne\n"
    "4;AB 10025;k3@example.com;versendet;Schale\n"
)


def test_a_row_counter_is_never_served_as_the_order_number(tmp_path):
    snapshot = load(tmp_path, COUNTED)
    assert snapshot.packer.plan.chosen["order_id"] == "Beleg"
    assert ask(snapshot, "AB 10023", "k1@example.com")[0] == 200
    assert ask(snapshot, "1", "k1@example.com")[0] == 404


# Two columns whose headers both say "tracking number": the fuller one tonight is chosen.
TWO_TRACKING = "Order,Email,Status,Tracking Number,Tracking No\n{rows}"
FULLER_FIRST = (
    "1,a@example.com,shipped,1Z999AA10123456784,\n2,b@example.com,shipped,1Z999AA10123456785,\n"
    "3,c@example.com,shipped,,JJD000390007795467\n"
)
FULLER_SECOND = (
    "1,a@example.com,shipped,,1Z999AA10123456784\n2,b@example.com,shipped,,1Z999AA10123456785\n"
    "3,c@example.com,shipped,JJD000390007795467,\n"
)


def test_a_choice_stays_from_night_to_night_while_the_header_row_is_the_same(tmp_path, contexts_file, capsys):
    export = write(tmp_path / "data" / "orders.csv", TWO_TRACKING.format(rows=FULLER_FIRST))
    service = started(make_settings(tmp_path / "data", contexts_file))
    assert service.snapshot.columns["tracking_number"] == "Tracking Number"
    write(export, TWO_TRACKING.format(rows=FULLER_SECOND))  # tonight the other column is fuller
    service.reload()
    assert service.snapshot.columns["tracking_number"] == "Tracking Number"
    assert "JJD000390007795467" in ask(service.snapshot, "3", "c@example.com")[1]
    assert "1Z999AA10123456784" not in ask(service.snapshot, "1", "a@example.com")[1]  # that column's, as before
    service.keep_copy(service.snapshot)  # as after every accepted load: the record keeps the choice for check
    code, out = app.main(["check", "--data", str(export), "--contexts", str(contexts_file)]), capsys.readouterr().out
    assert code == 0 and '"Tracking Number" (as chosen for this header before)' in out


def test_a_changed_header_row_is_shown_where_the_merchant_looks(tmp_path, contexts_file, logs, capsys):
    export = write(tmp_path / "data" / "orders.csv", TWO_TRACKING.format(rows=FULLER_FIRST))
    service = started(make_settings(tmp_path / "data", contexts_file))
    renamed = TWO_TRACKING.replace("Tracking Number", "Internal Ref").replace("Tracking No", "Tracking-Nr.")
    write(export, renamed.format(rows=FULLER_FIRST))
    service.reload()
    assert service.snapshot.columns["tracking_number"] == "Tracking-Nr."
    health = Client(app.create_app(service)).get("/healthz", key=KEY).json
    assert health["columns_changed"] == [{"field": "tracking_number", "was": "Tracking Number", "now": "Tracking-Nr."}]
    assert any("tracking_number is now read from 'Tracking-Nr.'" in note for note in health["notes"])
    assert "the header row changed, and tracking_number is now read from 'Tracking-Nr.'" in logs.text
    auth = {"Authorization": "Basic " + base64.b64encode(f"x:{KEY}".encode()).decode()}
    page = Client(app.create_app(service)).get("/", headers=auth, key=None).body.decode()
    assert "tracking_number is now read from &#039;Tracking-Nr.&#039;" in page


def test_a_columns_line_whose_cells_contradict_it_is_kept_and_check_warns(tmp_path, contexts_file, capsys):
    contexts_file.write_text(contexts_file.read_text().replace("[columns]", '[columns]\nemail = ["Phone"]', 1))
    write(
        tmp_path / "data" / "orders.csv", "Order,Phone,Mail\n1,+49 30 1234567,a@example.com\n2,+49 30 7654321,b@x.de\n"
    )
    code, out = check(capsys, tmp_path, contexts_file)
    assert "[columns] email names 'Phone', whose cells do not look like email (0 of 2 are e-mail addresses)" in out
    assert "it is read as you chose" in out
