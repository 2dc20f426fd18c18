"""/openapi.json states the rules the server enforces (issue 17), checked in-process on both engines.

Each test pairs what the document says with what the server does for the same input.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from appliance import accounts
from tests.api_support import AUTH, bearer, client_for, user_token

EXAMPLE_TASKS = Path(__file__).resolve().parents[2] / "examples" / "tasks"


@pytest.fixture
def db_config(engine, make_config, request):
    sections = {"auth": AUTH, "queue": {"tasks_dir": str(EXAMPLE_TASKS)}}
    if engine == "postgresql":
        sections["database"] = {"url": request.getfixturevalue("pg_url"), "max_connections": 8}
    return make_config(**sections)


@pytest.fixture
def client(db, db_config):
    return client_for(db_config)


@pytest.fixture
def doc(client):
    return client.simulate_get("/openapi.json").json


def _component(doc, name):
    return doc["components"]["schemas"][name]


def _body_schema(doc, path, method="post", media="application/json"):
    ref = doc["paths"][path][method]["requestBody"]["content"][media]["schema"]["$ref"]
    return _component(doc, ref.rsplit("/", 1)[-1])


def test_submit_names_every_known_task_type_operator_types_included(client, doc):
    from appliance.tasks.registry import registry_for

    known = registry_for(client.app.ctx.cfg).names()
    assert "user_specific" in known
    variants = _body_schema(doc, "/tasks/submit")["oneOf"]
    assert sorted(v["properties"]["task_type"]["const"] for v in variants) == known
    mine = next(v for v in variants if v["properties"]["task_type"]["const"] == "user_specific")
    data = mine["properties"]["data"]
    assert data["$ref"].endswith("/UserSpecificInput") and "data" in mine["required"]
    assert _component(doc, "UserSpecificInput")["additionalProperties"] is False
    # batch and chain items are the same per-type schemas
    assert _body_schema(doc, "/tasks/batch")["properties"]["tasks"]["items"]["$ref"].endswith("/SubmitRequest")


def test_register_states_the_user_name_and_email_rules(client, doc):
    props = _body_schema(doc, "/auth/register")["properties"]
    assert props["username"]["pattern"] == accounts.USERNAME_RE.pattern
    assert props["email"]["pattern"] == accounts.EMAIL_RE.pattern
    rules = doc["paths"]["/auth/register"]["post"]["x-unexpressed-rules"]
    assert {(r["field"], r["code"]) for r in rules} == {("password", "weak_password")}
    assert "400" in doc["paths"]["/auth/register"]["post"]["responses"]
    bad = client.simulate_post("/auth/register", json={"username": "a b", "email": "ab@example.com", "password": "Abcdefgh12"})
    assert bad.status_code == 400 and not re.match(props["username"]["pattern"], "a b")


def test_bulk_import_needs_exactly_one_source_and_reserves_route_names(client, doc):
    body = _body_schema(doc, "/api/data/bulk-import")
    assert [v["required"] for v in body["oneOf"]] == [["records"], ["source_file_id"]]
    assert body["properties"]["dataset"]["not"] == {"enum": ["bulk-import"]}
    token = user_token(client, "importer")
    r = client.simulate_post("/api/data/bulk-import", json={"dataset": "bulk-import", "records": [{"a": 1}]}, headers=bearer(token))
    assert r.status_code == 400, r.text
    assert r.json["error"]["code"] == "reserved_dataset_name" and r.json["error"]["details"]["field"] == "dataset"
    assert "another route" in r.json["error"]["message"]
    # the path parameter of GET /api/data/{dataset} says the same, so no client asks for the shadowed name
    (param,) = [p for p in doc["paths"]["/api/data/{dataset}"]["get"]["parameters"] if p["in"] == "path"]
    assert param["schema"]["not"] == {"enum": ["bulk-import"]} and param["schema"]["pattern"].startswith("^[A-Za-z0-9]")


def test_an_integral_number_is_an_integer(client, doc):
    token = user_token(client, "floaty")
    r = client.simulate_post("/tasks/submit", json={"task_type": "sample", "data": {}, "priority": 3.0}, headers=bearer(token))
    assert r.status_code == 200, r.text
    assert r.json["data"]["priority"] == 3
    r = client.simulate_post("/tasks/submit", json={"task_type": "sample", "priority": 3.5}, headers=bearer(token))
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "priority"


def test_nul_is_refused_where_kept_and_the_schema_says_so(client, doc):
    token = user_token(client, "nully")
    kept = client.simulate_post("/tasks/submit", json={"task_type": "sample", "data": {"note": "a\x00b"}}, headers=bearer(token))
    assert kept.status_code == 400 and "NUL" in kept.json["error"]["message"]
    ignored = client.simulate_post("/auth/login", json={"username": "nully", "password": "Correct-horse-9", "x\x00": "y\x00"})
    assert ignored.status_code == 200, ignored.text  # a field the server never reads does not matter
    login = _body_schema(doc, "/auth/login")
    assert login["properties"]["username"]["pattern"] == "^[^\\x00]*$"
    assert re.match(login["properties"]["username"]["pattern"], "a\x00b") is None


def test_path_segments_the_balancer_refuses_are_outside_the_schema(doc):
    (param,) = doc["paths"]["/tasks/status/{task_id}"]["get"]["parameters"]
    pattern = re.compile(param["schema"]["pattern"])
    assert pattern.match("abc") and not pattern.match("a/b") and not pattern.match("a\\b") and not pattern.match("a\x00")
    assert not pattern.match(".") and not pattern.match("..") and pattern.match("...") and pattern.match(".a")


def test_every_operation_lists_rate_limits_and_the_upload_form_its_parts(doc):
    for path, methods in doc["paths"].items():
        for method, op in methods.items():
            if not op.get("x-undocumented"):
                assert "429" in op["responses"], (method, path)
    media = doc["paths"]["/api/data-processing"]["post"]["requestBody"]["content"]["multipart/form-data"]
    form = _component(doc, "ProcessingForm")
    assert form["properties"]["processing_type"] == {"enum": ["csv_profile"]}
    assert form["properties"]["file"]["format"] == "binary" and set(form["required"]) >= {"file", "processing_type"}
    assert media["encoding"] == {"parameters": {"contentType": "application/json"}}
    assert "upload_id" not in form["properties"]["parameters"]["properties"]


def test_a_nul_in_a_query_parameter_is_refused_as_the_schema_says(client, doc):
    token = user_token(client, "querier")
    r = client.simulate_get("/tasks", query_string="task_type=a%00b", headers=bearer(token))
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "task_type"
    (param,) = [p for p in doc["paths"]["/tasks"]["get"]["parameters"] if p["name"] == "task_type"]
    assert param["schema"]["anyOf"][0]["pattern"] == "^[^\\x00]*$"


def test_callback_rules_the_schema_cannot_state_are_listed(doc):
    submit = doc["paths"]["/tasks/submit"]["post"]
    assert {"field": "callbacks.*", "code": "validation_error|callback_refused"}.items() <= submit["x-unexpressed-rules"][0].items()
    assert "internal address" in submit["description"]
    batch = doc["paths"]["/tasks/batch"]["post"]["x-unexpressed-rules"]
    assert batch[0]["field"] == "tasks[].callbacks.*"
    assert _component(doc, "Callbacks")["properties"]["progress_url"]["anyOf"][0]["format"] == "uri"


def test_upload_parameters_sent_as_json_parts_are_read(client, doc):
    """The document says parameters is a JSON part; a part typed application/json is read, not dropped."""
    assert doc["paths"]["/api/data-processing"]["post"]["requestBody"]["content"]["multipart/form-data"]["encoding"]["parameters"] == {
        "contentType": "application/json"
    }
    token = user_token(client, "uploader")
    b = "b0undary17"
    body = (
        f'--{b}\r\nContent-Disposition: form-data; name="processing_type"\r\n\r\ncsv_profile\r\n'
        f'--{b}\r\nContent-Disposition: form-data; name="parameters"\r\nContent-Type: application/json\r\n\r\n{{"delimiter": ";"}}\r\n'
        f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\nContent-Type: text/csv\r\n\r\na;b\r\n1;2\r\n'
        f"--{b}--\r\n"
    ).encode()
    headers = {**bearer(token), "Content-Type": f"multipart/form-data; boundary={b}"}
    r = client.simulate_post("/api/data-processing", body=body, headers=headers)
    assert r.status_code == 200, r.text
    status = client.simulate_get(f"/tasks/status/{r.json['data']['task_id']}", headers=bearer(token))
    assert status.json["data"]["input"]["delimiter"] == ";"
    bad = body.replace(b'{"delimiter": ";"}', b"true")
    r = client.simulate_post("/api/data-processing", body=bad, headers=headers)
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "parameters"


def test_numbers_beyond_64_bits_are_kept_as_numbers_not_a_crash(client, doc):
    token = user_token(client, "bignum")
    r = client.simulate_post(
        "/tasks/submit", body='{"task_type": "sample", "data": {"n": 33169693489754341440349122026536960}}', headers=bearer(token)
    )
    assert r.status_code == 200, r.text
    status = client.simulate_get(f"/tasks/status/{r.json['data']['task_id']}", headers=bearer(token))
    assert status.json["data"]["input"]["n"] == pytest.approx(3.316969348975434e34)
    r = client.simulate_post(
        "/tasks/submit", body='{"task_type": "sample", "priority": 33169693489754341440349122026536960}', headers=bearer(token)
    )
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "priority"
    user_id = _component(doc, "UserSpecificInput")["properties"]["user_id"]
    assert user_id["maximum"] == 2**63 - 1


def test_an_empty_parameters_part_is_not_an_object(client):
    token = user_token(client, "emptyparams")
    b = "b0undary18"
    body = (
        f'--{b}\r\nContent-Disposition: form-data; name="processing_type"\r\n\r\ncsv_profile\r\n'
        f'--{b}\r\nContent-Disposition: form-data; name="parameters"\r\n\r\n\r\n'
        f'--{b}\r\nContent-Disposition: form-data; name="file"; filename="a.csv"\r\n\r\na,b\r\n'
        f"--{b}--\r\n"
    ).encode()
    r = client.simulate_post(
        "/api/data-processing", body=body, headers={**bearer(token), "Content-Type": f"multipart/form-data; boundary={b}"}
    )
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "parameters"


def test_the_security_answers_are_in_the_document(doc):
    paths = doc["paths"]
    login = paths["/auth/login"]["post"]
    assert {"401", "429"} <= set(login["responses"]) and "disabled account" in login["description"]
    for route in ("/auth/mfa/enable", "/auth/mfa/disable"):
        ref = paths[route]["post"]["responses"]["200"]["content"]["application/json"]["schema"]["properties"]["data"]["$ref"]
        assert {"access_token", "refresh_token", "recovery_codes"} <= set(_component(doc, ref.rsplit("/", 1)[-1])["properties"])
    assert "post" in paths["/auth/mfa/recovery-codes"]
    submit = paths["/tasks/submit"]["post"]["responses"]
    assert "admin_only_task_type" in submit["403"]["description"] and "quota_exceeded" in submit["429"]["description"]
    upload = paths["/api/data-processing"]["post"]["responses"]
    assert "quota_exceeded" in upload["413"]["description"] and "quota_exceeded" in upload["429"]["description"]
    assert "json_too_deep" in paths["/tasks/batch"]["post"]["responses"]["400"]["description"]


def test_a_tiny_retry_delay_is_stored_on_both_engines(client):
    token = user_token(client, "tinydelay")
    body = {"task_type": "sample", "retry_config": {"max_retries": 1, "retry_delay": 4.5244170683254284e-147}}
    r = client.simulate_post("/tasks/submit", json=body, headers=bearer(token))
    assert r.status_code == 200, r.text  # PostgreSQL's real column refused the value: a 500


def _patterns(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "pattern" and isinstance(value, str):
                yield value
            else:
                yield from _patterns(value)
    elif isinstance(node, list):
        for item in node:
            yield from _patterns(item)


# Escapes whose set differs between JSON Schema's ECMA-262 regexes and Python's `re` on str: `\s` takes
# U+001C-U+001F and U+0085 in Python only and U+FEFF in ECMA only; `\d` and `\w` take non-ASCII digits and
# letters in Python only. A client validating by the document would then send what the server refuses.
_DIALECT_ESCAPES = re.compile(r"(?<!\\)(?:\\\\)*\\[sSdDwWbB]")


def test_every_published_pattern_means_the_same_in_ecma_and_python(doc):
    patterns = set(_patterns(doc))
    assert accounts.EMAIL_RE.pattern in patterns
    assert [p for p in sorted(patterns) if _DIALECT_ESCAPES.search(p)] == []


def test_an_email_with_a_control_or_a_space_is_refused_and_the_document_agrees(client, doc):
    pattern = _body_schema(doc, "/auth/register")["properties"]["email"]["pattern"]
    for email in ("ab\x1ecd@example.com", "ab\x85cd@example.com", "ab\ufeffcd@example.com"):
        bad = client.simulate_post("/auth/register", json={"username": "dialect_a", "email": email, "password": "Abcdefgh12!x"})
        assert bad.status_code == 400 and bad.json["error"]["details"]["field"] == "email", bad.json
        assert not re.match(pattern, email)
    good = client.simulate_post("/auth/register", json={"username": "dialect_b", "email": "jürgen@example.com", "password": "Abcdefgh12!x"})
    assert good.status_code in (200, 201), good.json
