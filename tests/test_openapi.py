"""/openapi.json describes the API, and the service's real responses conform to it."""

import os
import time

import jsonschema
import pytest
from conftest import KEY, Client, make_settings, orders_csv, write

import app

WRONG = "wrong-key-0123456789abcdef"


@pytest.fixture
def spec(client):
    r = client.get("/openapi.json", key=None)
    assert r.status == 200 and r.headers["Content-Type"] == "application/json"
    return r.json


def conforms(spec, path, response):
    """Check a real response's status, media type and body against the document."""
    described = spec["paths"][path]["get"]["responses"]
    assert str(response.status) in described, f"{path} answered {response.status}, which is not described"
    content = described[str(response.status)]["content"]
    assert response.headers["Content-Type"] in content
    schema = content[response.headers["Content-Type"]]["schema"]
    body = response.body.decode() if response.body == b"" else response.json
    jsonschema.validate(body, schema, cls=jsonschema.Draft202012Validator)


def test_the_document_is_openapi_3_1_with_valid_schemas(spec):
    assert spec["openapi"] == "3.1.0"
    assert spec["components"]["securitySchemes"]["apiKey"] == {"type": "apiKey", "in": "header", "name": "x-api-key"}
    params = {p["name"]: p for p in spec["paths"]["/lookup"]["get"]["parameters"]}
    assert params["order_id"]["required"] and params["customer_email"]["required"]
    for operation in (spec["paths"][p]["get"] for p in spec["paths"]):
        for response in operation["responses"].values():
            for media in response["content"].values():
                jsonschema.Draft202012Validator.check_schema(media["schema"])


@pytest.mark.parametrize(
    "query, key, status",
    [
        ("order_id=1001&customer_email=jane@example.com", "key", 200),
        ("order_id=1002&customer_email=sam@example.com", "key", 200),
        ("order_id=1001", "key", 400),
        ("order_id=" + "9" * 80 + "&customer_email=a@b.c", "key", 400),
        ("order_id=1001&customer_email=nobody@example.com", "key", 404),
        ("order_id=1001&customer_email=jane@example.com", None, 401),
        ("order_id=1001&customer_email=jane@example.com", WRONG, 401),
    ],
)
def test_lookup_responses_conform(client, spec, query, key, status):
    r = client.get("/lookup", query, key=KEY if key == "key" else key)
    assert r.status == status
    conforms(spec, "/lookup", r)


def test_throttled_responses_conform(client, spec):
    for _ in range(11):
        r = client.get("/lookup", "order_id=1&customer_email=a@b.c", key=WRONG)
    assert r.status == 429
    conforms(spec, "/lookup", r)


@pytest.mark.parametrize("key", [True, False])
@pytest.mark.parametrize("stale", [True, False])
def test_healthz_responses_conform(tmp_path, contexts_file, key, stale):
    export = write(tmp_path / "data" / "orders.csv", orders_csv(3))
    if stale:
        os.utime(export, (time.time() - 30 * 3600,) * 2)
    service = app.Service(make_settings(export.parent, contexts_file))
    service.start()
    client = Client(app.create_app(service))
    spec = client.get("/openapi.json").json
    r = client.get("/healthz", key=KEY if key else None)
    assert r.status == (503 if stale else 200)
    conforms(spec, "/healthz", r)
