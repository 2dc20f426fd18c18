"""Pure logic of the task queue: schemas, priorities, backoff, cron slots, signatures, validation rules, profiling."""

from __future__ import annotations

import datetime as dt

import pytest

from appliance.errors import BadRequest, Forbidden, ValidationFailed
from appliance.queue.reaper import parse_worker_id
from appliance.tasks import schedules
from appliance.tasks.broker import huey_priority
from appliance.tasks.dataprocs import Rule, _Column, check_record
from appliance.tasks.lifecycle import retry_delay
from appliance.tasks.registry import build_registry, field_of


def test_unknown_task_type_lists_known_ones():
    reg = build_registry("")
    with pytest.raises(BadRequest) as err:
        reg.get("nope")
    assert err.value.details["known"] == sorted(["sample", "sleep", "database_cleanup", "report", "csv_profile", "bulk_import"])
    assert "sample" in err.value.message


@pytest.mark.parametrize(
    ("data", "field"),
    [({"duration": "long"}, "data.duration"), ({"duration": -1}, "data.duration"), ({"steps": 0}, "data.steps")],
)
def test_submit_validation_names_the_field(data, field):
    with pytest.raises(ValidationFailed) as err:
        build_registry("").get("sample").parse(data)
    assert err.value.details["field"] == field


def test_missing_and_nested_fields_are_named():
    assert field_of("Object missing required field `dataset`") == "dataset"
    assert field_of("Object missing required field `field` - at `$.validation_rules[0]`") == "validation_rules[0].field"
    assert field_of("Expected `int`, got `str` - at `$.a.b`") == "a.b"
    with pytest.raises(ValidationFailed) as err:
        build_registry("").get("bulk_import").parse({"dataset": "d", "records": [], "validation_rules": [{"required": True}]})
    assert err.value.details["field"] == "data.validation_rules[0].field"


def test_operator_task_types_load_from_a_directory(tmp_path):
    (tmp_path / "mine.py").write_text(
        "import msgspec\nfrom appliance.tasks.registry import task_type\n"
        "class In(msgspec.Struct, forbid_unknown_fields=True):\n    n: int\n"
        "@task_type('double', schema=In)\ndef double(ctx, data):\n    return {'n': data.n * 2}\n"
    )
    (tmp_path / "broken.py").write_text("raise RuntimeError('boom')\n")
    reg = build_registry(str(tmp_path))
    t = reg.get("double")
    assert t(None, t.parse({"n": 4})) == {"n": 8}
    with pytest.raises(ValidationFailed) as err:
        t.parse({"n": 1, "x": 2})
    assert err.value.details["field"] == "data.x"


def test_operator_task_files_of_earlier_releases_still_load(tmp_path):
    """The registry moved to appliance.tasks; files importing task_type from appliance.queue keep working."""
    (tmp_path / "old.py").write_text(
        "from appliance.queue.registry import task_type\n@task_type('legacy')\ndef legacy(ctx, data):\n    return 'ok'\n"
    )
    t = build_registry(str(tmp_path)).get("legacy")
    assert t(None, t.parse({})) == "ok"


def test_task_types_declare_who_may_run_them():
    reg = build_registry("")
    for name in ("database_cleanup", "report"):
        with pytest.raises(Forbidden) as err:
            reg.get(name).admit({"days": 0}, user_id=7, admin=False, where="tasks[1].")
        assert err.value.status == 403 and err.value.code == "admin_only_task_type"
        assert err.value.details == {"task_type": name, "field": "tasks[1].task_type"} and repr(name) in err.value.message
        reg.get(name).admit({}, user_id=1, admin=True)
    sleep = reg.get("sleep")
    sleep.admit({"seconds": 60}, user_id=7, admin=False)  # a minute is anyone's
    with pytest.raises(Forbidden) as err:
        sleep.admit({"seconds": 60.5}, user_id=7, admin=False)
    assert "longer than 60 seconds" in err.value.message
    sleep.admit({"seconds": 3600}, user_id=1, admin=True)
    kinds = {t["name"]: (t["admin_only"], t["admin_only_when"]) for t in reg.describe()}
    assert kinds["database_cleanup"] == (True, None) and kinds["sample"] == (False, None)
    assert kinds["sleep"] == (False, "longer than 60 seconds")


def test_operator_task_types_can_be_admin_only(tmp_path):
    (tmp_path / "ops.py").write_text(
        "from appliance.tasks.registry import task_type\n"
        "@task_type('purge', admin_only=True)\ndef purge(ctx, data):\n    return {}\n"
        "def big(data):\n    return data.get('n', 0) > 10\n"
        "@task_type('count', admin_only_when=big)\ndef count(ctx, data):\n    return {}\n"
    )
    reg = build_registry(str(tmp_path))
    with pytest.raises(Forbidden):
        reg.get("purge").admit({}, user_id=3, admin=False)
    reg.get("count").admit({"n": 10}, user_id=3, admin=False)
    with pytest.raises(Forbidden) as err:
        reg.get("count").admit({"n": 11}, user_id=3, admin=False)
    assert "with this input" in err.value.message


def test_sample_keeps_fields_it_does_not_know_and_validates_those_it_does():
    sample = build_registry("").get("sample")
    parsed = sample.parse({"test": "health_check", "duration": 0.5})
    assert parsed["test"] == "health_check" and parsed["duration"] == 0.5 and parsed["steps"] == 5
    with pytest.raises(ValidationFailed) as err:
        sample.parse({"test": "health_check", "duration": "long"})
    assert err.value.details["field"] == "data.duration"


def test_priority_one_is_most_urgent_in_huey():
    assert huey_priority(1) > huey_priority(5) > huey_priority(10) >= 1


def test_backoff_doubles_per_attempt():
    class T:
        retry_delay = 1.5
        exponential_backoff = True

    assert [retry_delay(T, a) for a in (1, 2, 3)] == [1.5, 3.0, 6.0]
    T.exponential_backoff = False
    assert retry_delay(T, 3) == 1.5


def test_cron_slots_in_a_time_zone_across_dst():
    # 02:30 local does not exist on 2024-03-31 in Berlin: that day fires once, at 03:00 local (01:00 UTC).
    slot = schedules.next_slot("30 2 * * *", "Europe/Berlin", dt.datetime(2024, 3, 30, 12, 0))
    assert slot == dt.datetime(2024, 3, 31, 1, 0)
    assert schedules.next_slot("30 2 * * *", "Europe/Berlin", slot) == dt.datetime(2024, 4, 1, 0, 30)
    # 09:00 New York in winter is 14:00 UTC
    assert schedules.next_slot("0 9 * * *", "America/New_York", dt.datetime(2024, 1, 10, 15, 0)) == dt.datetime(2024, 1, 11, 14, 0)


def test_cron_slot_in_the_repeated_autumn_hour_fires_once():
    # 2024-10-27 Berlin: 03:00 CEST -> 02:00 CET, so 02:30 local happens at 00:30 and again at 01:30 UTC.
    slot = schedules.next_slot("30 2 * * *", "Europe/Berlin", dt.datetime(2024, 10, 26, 12, 0))
    assert slot == dt.datetime(2024, 10, 27, 0, 30)
    assert schedules.next_slot("30 2 * * *", "Europe/Berlin", slot) == dt.datetime(2024, 10, 28, 1, 30)
    # created, or catching up, inside the second pass of the hour: 02:30 already happened today
    assert schedules.next_slot("30 2 * * *", "Europe/Berlin", dt.datetime(2024, 10, 27, 1, 5)) == dt.datetime(2024, 10, 28, 1, 30)
    assert schedules.latest_slot("30 2 * * *", "Europe/Berlin", dt.datetime(2024, 10, 27, 1, 40)) == dt.datetime(2024, 10, 27, 0, 30)
    # a clock stepping minute by minute through the night sees one slot, once
    clock, fired, due = (
        dt.datetime(2024, 10, 26, 22, 0),
        [],
        schedules.next_slot("30 2 * * *", "Europe/Berlin", dt.datetime(2024, 10, 26, 22, 0)),
    )
    while clock < dt.datetime(2024, 10, 27, 4, 0):
        if due <= clock:
            fired.append(schedules.latest_slot("30 2 * * *", "Europe/Berlin", clock))
            due = schedules.next_slot("30 2 * * *", "Europe/Berlin", max(clock, fired[-1]))
        clock += dt.timedelta(minutes=1)
    assert fired == [dt.datetime(2024, 10, 27, 0, 30)]
    # every wall-clock time once: the repeated hour's slots are not fired again
    t, seen = dt.datetime(2024, 10, 26, 23, 30), []
    for _ in range(8):
        t = schedules.next_slot("*/20 * * * *", "Europe/Berlin", t)
        seen.append(t.strftime("%H:%M"))
    assert seen == ["23:40", "00:00", "00:20", "00:40", "02:00", "02:20", "02:40", "03:00"]
    # a zone without DST is untouched
    assert schedules.next_slot("30 2 * * *", "UTC", dt.datetime(2024, 10, 27, 2, 30)) == dt.datetime(2024, 10, 28, 2, 30)


def test_latest_slot_after_downtime_is_one_slot():
    now = dt.datetime(2024, 1, 1, 12, 7, 30)
    assert schedules.latest_slot("*/5 * * * *", "UTC", now) == dt.datetime(2024, 1, 1, 12, 5)
    assert schedules.latest_slot("*/5 * * * *", "UTC", dt.datetime(2024, 1, 1, 12, 5)) == dt.datetime(2024, 1, 1, 12, 5)


def test_latest_slot_never_returns_a_slot_still_ahead():
    """Just before a slot the latest one is the previous: firing early made the next tick find nothing due."""
    assert schedules.latest_slot("* * * * *", "UTC", dt.datetime(2024, 1, 1, 12, 2, 59, 500000)) == dt.datetime(2024, 1, 1, 12, 2)
    assert schedules.latest_slot("* * * * *", "UTC", dt.datetime(2024, 1, 1, 12, 2, 59, 999999)) == dt.datetime(2024, 1, 1, 12, 2)
    assert schedules.latest_slot("* * * * *", "UTC", dt.datetime(2024, 1, 1, 12, 3)) == dt.datetime(2024, 1, 1, 12, 3)


@pytest.mark.parametrize(("expr", "tz", "field"), [("* * *", "UTC", "schedule.expression"), ("* * * * * *", "UTC", "schedule.expression"),
                                                    ("* * * * *", "Mars/Base", "schedule.timezone")])  # fmt: skip
def test_bad_cron_is_a_400_naming_the_field(expr, tz, field):
    with pytest.raises(ValidationFailed) as err:
        schedules.check_cron(expr, tz)
    assert err.value.details["field"] == field


def test_validation_rules():
    rules = [
        Rule(field="name", required=True, type="string", max_length=5),
        Rule(field="age", type="integer", min=0, max=150),
        Rule(field="code", pattern=r"[A-Z]{2}"),
        Rule(field="kind", choices=["a", "b"]),
    ]
    assert check_record({"name": "bob", "age": 3, "code": "AB", "kind": "a"}, rules) is None
    assert check_record({"age": 3}, rules) == "name: required"
    assert check_record({"name": "bob", "age": True}, rules) == "age: expected integer"
    assert check_record({"name": "bob", "age": 200}, rules) == "age: above 150"
    assert check_record({"name": "toolong"}, rules) == "name: longer than 5"
    assert check_record({"name": "x", "code": "abc"}, rules).startswith("code: does not match")
    assert check_record({"name": "x", "kind": "z"}, rules) == "kind: not one of the allowed values"
    assert check_record([1], rules) == "record is not an object"


def test_column_profile_types_and_stats():
    col = _Column("v")
    for v in ["1", "2", "", "3.5", "NA", "2"]:
        col.add(v, max_distinct=10)
    s = col.summary()
    assert s["type"] == "float" and s["nulls"] == 2 and s["count"] == 6
    assert s["min"] == 1 and s["max"] == 3.5 and s["mean"] == pytest.approx(2.125) and s["distinct"] == 3
    text = _Column("t")
    for v in ["a", "b", "c"]:
        text.add(v, max_distinct=2)
    assert text.summary()["type"] == "string" and text.summary()["distinct_is_lower_bound"] is True


def test_worker_id_parsing():
    assert parse_worker_id("host-1:worker:0#123") == ("host-1:worker:0", "host-1", 123)
    assert parse_worker_id("") == ("", "", None)


def test_the_bulk_import_body_and_task_input_are_one_schema():
    """POST /api/data/bulk-import adds only its HTTP extras to the task's own fields (defined once, in dataprocs)."""
    import msgspec

    from appliance.api.data import BulkImportRequest
    from appliance.tasks.dataprocs import BulkImportFields, BulkImportInput

    assert issubclass(BulkImportRequest, BulkImportFields) and issubclass(BulkImportInput, BulkImportFields)
    task_fields = {f.name for f in msgspec.structs.fields(BulkImportInput)}
    assert {f.name for f in msgspec.structs.fields(BulkImportRequest)} == task_fields | {"callback_url", "priority"}
