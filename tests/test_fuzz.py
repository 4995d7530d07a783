"""Property-based tests: whatever a caller sends, the answer is one of the contract's, in JSON."""

import json
from urllib.parse import quote, urlencode

from conftest import KEY
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import app

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@given(st.text())
def test_normalising_is_idempotent_and_leaves_letters_and_digits(text):
    once = app.normalise_order_id(text)
    assert app.normalise_order_id(once) == once
    assert all(c.isalnum() for c in once)
    assert once == once.casefold()


@given(st.from_regex(r"[A-Za-z0-9]{1,12}", fullmatch=True))
def test_hash_spaces_and_case_never_change_an_order_number(number):
    wanted = app.normalise_order_id(number)
    for typed in (f"#{number}", f" # {number} ", number.upper(), number.lower()):
        assert app.normalise_order_id(typed) == wanted


@FUZZ
@given(order_id=st.text(max_size=100), email=st.text(max_size=300))
def test_any_text_gets_200_400_or_404_in_json(client, order_id, email):
    r = client.get("/lookup", urlencode({"order_id": order_id, "customer_email": email}))
    assert r.status in (200, 400, 404)
    assert r.headers["Content-Type"] == "application/json"
    assert isinstance(json.loads(r.body)["context"], str)


@FUZZ
@given(st.binary(max_size=200))
def test_any_bytes_in_the_query_string_never_make_a_500(client, raw):
    r = client.get("/lookup", quote(raw, safe="=&%+"))
    assert r.status in (200, 400, 404)
    assert "context" in json.loads(r.body)


@FUZZ
@given(st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=255), max_size=80))
def test_any_wrong_key_gets_401_or_429(client, key):
    r = client.lookup("1001", "jane@example.com", key=key)
    assert r.status in (401, 429) if key != KEY else r.status == 200
    assert r.headers["Content-Type"] == "application/json"


def decoded_in_full(query):
    """The lookup's two parameters as the general decoding reads them: the first of each, strict UTF-8."""
    from urllib.parse import unquote_plus, unquote_to_bytes

    found = {}
    for pair in query.split("&"):
        name, _, value = pair.partition("=")
        name = unquote_plus(name) if "%" in name or "+" in name else name
        if name in ("order_id", "customer_email") and name not in found:
            try:
                found[name] = unquote_to_bytes(value.encode("latin-1").replace(b"+", b" ")).decode("utf-8")
            except UnicodeError:
                found[name] = None
    return found.get("order_id", ""), found.get("customer_email", "")


# Pieces of query values, the usual escapes among them and the ones that must not be taken for them.
PIECES = st.sampled_from(
    [
        "%23",
        "%40",
        "%25",
        "%2540",
        "%2523",
        "%",
        "%4",
        "%g1",
        "+",
        "%2B",
        "%C3%A9",
        "%FF",
        "é",
        "a",
        "1",
        "#",
        "@",
        " ",
        "%0A",
        "&",
        "=",
    ]
)


@given(st.lists(PIECES, max_size=6).map("".join), st.lists(PIECES, max_size=6).map("".join))
@settings(max_examples=2000, deadline=None)
def test_the_quick_reading_of_a_query_gives_what_the_full_decoding_gives(order_id, email):
    query = f"order_id={order_id}&customer_email={email}"
    assert app.lookup_params(query) == decoded_in_full(query)
