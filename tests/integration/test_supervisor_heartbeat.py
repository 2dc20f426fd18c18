"""The heartbeat of every child on SQLite and PostgreSQL: the row is upserted, the file touched, and a
database that cannot be reached is logged, never raised."""

from __future__ import annotations

import logging
import os

from appliance import heartbeat
from appliance.db.models import NodeHeartbeat


def test_beat_upserts_the_row_and_touches_the_file(db, db_config, tmp_path):
    beat_file = tmp_path / "hb"
    hb = heartbeat.Heartbeat(db_config, "worker", 3, env={heartbeat.FILE_ENV: str(beat_file)})
    hb.beat()
    row = NodeHeartbeat.get_by_id(hb.node_id)
    assert hb.node_id.endswith(":worker:3")
    assert (row.role, row.pid, row.status, row.info) == ("worker", os.getpid(), "starting", {"index": 3})
    assert row.rss > 0
    assert beat_file.exists()
    first = row.last_heartbeat
    heartbeat.set_status("draining")
    try:
        hb.beat()
    finally:
        heartbeat.set_status("starting")
    row = NodeHeartbeat.get_by_id(hb.node_id)
    assert row.status == "draining" and row.last_heartbeat >= first
    assert NodeHeartbeat.select().count() == 1
    hb.stop()
    assert NodeHeartbeat.get_by_id(hb.node_id).status == "stopped"


def test_node_name_from_config(make_config):
    cfg = make_config(server={"node_name": "edge-7"})
    assert heartbeat.node_id(cfg, "api", 1) == "edge-7:api:1"


def test_an_unreachable_database_is_logged_not_raised(make_config, caplog):
    cfg = make_config(database={"url": "postgresql://nobody@127.0.0.1:1/none"})
    hb = heartbeat.Heartbeat(cfg, "api", 0, env={})
    with caplog.at_level(logging.WARNING, logger="appliance.heartbeat"):
        hb.beat()
        hb.beat()
    warnings = [r for r in caplog.records if "cannot write the heartbeat" in r.getMessage()]
    assert len(warnings) == 1  # once per failure streak
