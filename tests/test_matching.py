"""Matching: order numbers and emails as customers type them."""

import pytest

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


@pytest.mark.parametrize("order_id, email", [
    ("#1001", "jane@example.com"),
    ("1001", " JANE@Example.COM "),
    (" # 1001 ", "jane@example.com"),
    ("1001.0", "Jane@example.com"),
])
def test_lookup_matches_typed_variants(client, order_id, email):
    assert client.lookup(order_id, email).status == 200


def test_mixed_case_email_in_the_export_matches(client):
    assert client.lookup("1002", "sam@example.com").status == 200


@pytest.mark.parametrize("order_id, email", [
    ("1001", "sam@example.com"),      # another customer's email
    ("1002", "jane@example.com"),     # the other way round
    ("10011", "jane@example.com"),
    ("100", "jane@example.com"),
    ("1001", "jane@example.co"),
])
def test_both_must_belong_to_the_same_order(client, order_id, email):
    assert client.lookup(order_id, email).status == 404
