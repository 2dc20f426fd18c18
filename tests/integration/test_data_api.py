"""The data endpoints on both backends: streamed upload + csv_profile, bulk import, reading a dataset."""

from __future__ import annotations

import io
import uuid

import orjson
import pytest

from appliance.db.models import DataRecord, Upload
from tests.integration import test_tasks_support as support
from tests.integration.test_tasks_contract import run_next

tenv = support.tenv  # the fixture


def multipart(fields: dict[str, str], filename: str, content: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    out = io.BytesIO()
    for name, value in fields.items():
        out.write(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    out.write(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\nContent-Type: text/csv\r\n\r\n'.encode()
    )
    out.write(content)
    out.write(f"\r\n--{boundary}--\r\n".encode())
    return out.getvalue(), f"multipart/form-data; boundary={boundary}"


def upload(env, content: bytes, filename: str = "data.csv", ptype: str = "csv_profile", params: str = "{}", who: str = "alice"):
    body, ctype = multipart({"processing_type": ptype, "parameters": params}, filename, content)
    return env.client.simulate_post("/api/data-processing", body=body, headers={**env.headers[who], "Content-Type": ctype})


def test_upload_streams_to_disk_and_profiles_the_csv(tenv):
    rows = ["id,name,score,joined,flag"] + [
        f"{i},user{i % 7},{i * 1.5 if i % 10 else ''},2024-01-{(i % 28) + 1:02d},{'true' if i % 2 else 'false'}" for i in range(1, 5001)
    ]
    content = ("\n".join(rows) + "\n").encode()
    r = upload(tenv, content, filename="../../evil name.csv")
    assert r.status_code == 200, r.text
    d = r.json["data"]
    assert d["status"] == "queued" and d["upload"]["size"] == len(content) and d["upload"]["filename"] == "evil_name.csv"
    assert r.json["links"]["status"] == f"/tasks/status/{d['task_id']}"
    up = Upload.get_by_id(d["upload"]["upload_id"])
    assert up.path.startswith(str(tenv.cfg.path("uploads"))) and open(up.path, "rb").read() == content
    assert run_next(tenv) == d["task_id"]
    s = tenv.status(d["task_id"])
    assert s["status"] == "succeeded", s
    res = s["result"]
    assert res["rows"] == 5000 and res["columns"] == 5
    cols = {c["name"]: c for c in res["column_profiles"]}
    assert cols["id"]["type"] == "integer" and cols["id"]["min"] == 1 and cols["id"]["max"] == 5000 and cols["id"]["distinct"] == 5000
    assert cols["name"]["type"] == "string" and cols["name"]["distinct"] == 7
    assert cols["score"]["nulls"] == 500 and cols["score"]["type"] == "float"
    assert cols["joined"]["type"] == "date" and cols["flag"]["type"] == "boolean"


def test_upload_errors(tenv, make_config):
    assert upload(tenv, b"a\n1\n", ptype="nope").json["error"]["code"] == "unknown_task_type"
    r = upload(tenv, b"a\n1\n", params="[1]")
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "parameters"
    r = upload(tenv, b"a\n1\n", params='{"delimiter": ";;"}')
    assert r.status_code == 400 and r.json["error"]["details"]["field"] == "data.delimiter"
    r = tenv.post("/api/data-processing", {"x": 1})
    assert r.status_code == 415
    tenv.cfg.api.upload_max_bytes = 2048
    r = upload(tenv, b"x" * 5000)
    assert r.status_code == 413 and r.json["error"]["code"] == "payload_too_large"
    assert Upload.select().count() == 0
    assert not any(p.is_file() for p in tenv.cfg.path("uploads").rglob("*")) if tenv.cfg.path("uploads").exists() else True


def test_bulk_import_records_skip_and_stop(tenv):
    rules = [
        {"field": "email", "required": True, "type": "string", "pattern": r"[^@]+@[^@]+"},
        {"field": "age", "type": "integer", "min": 0},
    ]
    records = [{"email": f"u{i}@x.io", "age": i} for i in range(25)] + [{"email": "bad"}, {"age": 3}, {"email": "a@b.c", "age": -1}]
    r = tenv.post("/api/data/bulk-import", {"dataset": "people", "records": records, "batch_size": 10, "validation_rules": rules})
    assert r.status_code == 200, r.text
    tid = r.json["data"]["task_id"]
    run_next(tenv)
    res = tenv.status(tid)["result"]
    assert (res["imported"], res["skipped"], res["failed"]) == (25, 3, 0)
    assert [x["reason"] for x in res["skipped_reasons"]] == ["email: does not match [^@]+@[^@]+", "email: required", "age: below 0"]
    page = tenv.get("/api/data/people", params={"per_page": 10, "page": 3}).json
    assert page["metadata"]["total"] == 25 and len(page["data"]) == 5 and page["data"][0]["data"]["email"] == "u20@x.io"
    assert tenv.get("/api/data/people", who="bob").json["metadata"]["total"] == 0
    assert tenv.get("/api/data/people", who="admin").json["metadata"]["total"] == 25
    r = tenv.post("/api/data/bulk-import", {"dataset": "p2", "records": records[24:], "error_handling": "stop", "validation_rules": rules})
    run_next(tenv)
    res = tenv.status(r.json["data"]["task_id"])["result"]
    assert res["stopped"] and res["imported"] == 1 and res["failed"] == 1
    assert DataRecord.select().where(DataRecord.dataset == "p2").count() == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"dataset": "bad name!", "records": []}, "dataset"),
        ({"dataset": "d", "records": [], "error_handling": "explode"}, "error_handling"),
        ({"dataset": "d", "records": [], "callback_url": "ftp://x/"}, "callback_url"),
        ({"dataset": "d"}, None),
        ({"dataset": "d", "records": [], "validation_rules": [{"field": "a", "pattern": "("}]}, None),
    ],
)
def test_bulk_import_validation(tenv, body, field):
    r = tenv.post("/api/data/bulk-import", body)
    assert r.status_code == 400, r.text
    if field:
        assert r.json["error"]["details"]["field"] == field


def test_bulk_import_from_an_uploaded_file(tenv):
    lines = b"\n".join(orjson.dumps({"n": i}) for i in range(7)) + b"\n"
    r = upload(tenv, b"n\n1\n", filename="x.csv")
    run_next(tenv)
    up = tenv.status(r.json["data"]["task_id"])["input"]["upload_id"]
    r = tenv.post("/api/data/bulk-import", {"dataset": "nums", "source_file_id": up})
    run_next(tenv)
    assert tenv.status(r.json["data"]["task_id"])["result"]["imported"] == 1
    path = tenv.cfg.path("n.jsonl")
    path.write_bytes(lines)
    Upload.create(id="jsonl1", owner=tenv.user_ids["alice"], filename="n.jsonl", path=str(path), size=len(lines))
    r = tenv.post("/api/data/bulk-import", {"dataset": "nums", "source_file_id": "jsonl1"})
    run_next(tenv)
    assert tenv.status(r.json["data"]["task_id"])["result"]["imported"] == 7
    assert tenv.get("/api/data/nums").json["metadata"]["total"] == 8
    assert tenv.post("/api/data/bulk-import", {"dataset": "nums", "source_file_id": up}, who="bob").status_code == 404


def _failed_naming(env, task_id, setting):
    s = env.status(task_id)
    assert s["status"] == "failed", s
    assert s["error"]["code"] == "limit_exceeded" and setting in s["error"]["message"], s["error"]
    return s["error"]["message"]


def test_csv_profile_caps_columns_field_size_and_line_length(tenv):
    # a 1 MB line of commas: a million columns, each of which used to get its own profile (about 0.5 GB)
    r = upload(tenv, b"," * 1_000_000 + b"\n1\n")
    assert run_next(tenv) == r.json["data"]["task_id"]
    assert "1000001 columns" in _failed_naming(tenv, r.json["data"]["task_id"], "[queue] csv_max_columns")
    # one quoted field larger than the field cap (its line is within the record cap)
    r = upload(tenv, b'a,b\n1,"' + b"x" * 300_000 + b'"\n')
    run_next(tenv)
    _failed_naming(tenv, r.json["data"]["task_id"], "[queue] csv_max_field_bytes")
    # 2 MB without a newline is never held whole
    r = upload(tenv, b"a" * 2_000_000)
    run_next(tenv)
    _failed_naming(tenv, r.json["data"]["task_id"], "[queue] data_max_record_bytes")
    # within the caps all is as before
    r = upload(tenv, b"a,b\n" + b"1,2\n" * 10)
    run_next(tenv)
    assert tenv.status(r.json["data"]["task_id"])["result"]["columns"] == 2


def _file(env, name: str, content: bytes, upload_id: str) -> str:
    path = env.cfg.path(name)
    path.write_bytes(content)
    Upload.create(id=upload_id, owner=env.user_ids["alice"], filename=name, path=str(path), size=len(content))
    return upload_id


def _import(env, source: str, **extra) -> dict:
    r = env.post("/api/data/bulk-import", {"dataset": "streamed", "source_file_id": source, "batch_size": 100, **extra})
    assert r.status_code == 200, r.text
    assert run_next(env) == r.json["data"]["task_id"]
    return env.status(r.json["data"]["task_id"])


def test_bulk_import_reads_a_json_array_file_one_record_at_a_time(tenv):
    records = [{"n": i, "text": "x" * (i % 500), "nested": {"list": [i, None, True]}} for i in range(3000)]
    s = _import(tenv, _file(tenv, "big.json", b"  \n" + orjson.dumps(records), "arr1"))
    assert s["status"] == "succeeded" and s["result"]["imported"] == 3000, s
    stored = tenv.get("/api/data/streamed", params={"per_page": 1, "page": 2999}).json["data"][0]["data"]
    assert stored == records[2998]
    # one element larger than the record cap ends the task naming the cap
    tenv.cfg.queue.data_max_record_bytes = 65536
    s = _import(tenv, _file(tenv, "long.json", b'[{"a": 1}, "' + b"y" * 200_000 + b'"]', "arr2"))
    _failed_naming(tenv, s["task_id"], "[queue] data_max_record_bytes")
    s = _import(tenv, _file(tenv, "deep.json", b"[" + b"[" * 100 + b"]" * 100 + b"]", "arr3"))
    _failed_naming(tenv, s["task_id"], "[api] json_max_depth")
    s = _import(tenv, _file(tenv, "bad.json", b'[{"a": 1}, nope]', "arr4"))
    assert s["status"] == "failed" and "not a valid array" in s["error"]["message"], s
    s = _import(tenv, _file(tenv, "long.jsonl", b'{"a": 1}\n' + b" " * 70_000 + b"\n", "lines1"))
    _failed_naming(tenv, s["task_id"], "[queue] data_max_record_bytes")


def test_user_patterns_cannot_backtrack(tenv):
    # (a+)+$ against "a" * 40 + "b" takes Python's re longer than anyone waits; RE2 answers at once
    values = [{"v": "a" * 40 + "b"}, {"v": "a" * 5000}, {"v": "ab"}]
    rules = [{"field": "v", "pattern": "(a+)+$"}]
    r = tenv.post("/api/data/bulk-import", {"dataset": "re", "records": values, "validation_rules": rules})
    assert r.status_code == 200, r.text
    run_next(tenv)
    res = tenv.status(r.json["data"]["task_id"])["result"]
    assert res["imported"] == 1 and res["skipped"] == 2, res
    # constructs that need backtracking are refused at submit, naming the rule
    for pattern in (r"(a)\1", "(?=a)a", "x" * 1001):
        r = tenv.post("/api/data/bulk-import", {"dataset": "re", "records": [], "validation_rules": [{"field": "v", "pattern": pattern}]})
        assert r.status_code == 400, (pattern, r.text)
