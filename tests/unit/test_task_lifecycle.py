"""appliance.tasks.lifecycle owns every write to a task's status, checked on the source with ast.

A status written elsewhere (a `Task.update(status=...)`, an UPDATE of "task" setting "status",
a new row dict carrying "status") would be a transition that skips the conditional
updates and the history of lifecycle.py: the drift issue 11 found in six places.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "appliance"
OWNER = ROOT / "tasks" / "lifecycle.py"


def _status_writes(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "update":
            target = node.func.value
            if isinstance(target, ast.Name) and target.id == "Task" and any(k.arg == "status" for k in node.keywords):
                found.append(f"{path.name}:{node.lineno} Task.update(status=...)")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            sql = node.value.replace(" ", "")
            if sql.startswith('UPDATE"task"SET') and '"status"=' in sql:
                found.append(f"{path.name}:{node.lineno} UPDATE task SET status")
        elif isinstance(node, ast.Dict) and path.parent.name == "tasks":
            keys = {k.value for k in node.keys if isinstance(k, ast.Constant)}
            if {"status", "task_type", "owner"} <= keys:  # a new task row, not an answer
                found.append(f"{path.name}:{node.lineno} new row with a status")
    return found


def test_the_walk_sees_the_lifecycle_writes() -> None:
    writes = _status_writes(OWNER)
    assert any("Task.update(status" in w for w in writes) and any("UPDATE task SET status" in w for w in writes)


def test_only_the_lifecycle_writes_a_task_status() -> None:
    elsewhere = [w for p in sorted(ROOT.rglob("*.py")) if p != OWNER for w in _status_writes(p)]
    assert elsewhere == []


def test_the_runner_and_the_reaper_share_one_retry_or_fail_step() -> None:
    for name in ("runner.py", "reaper.py"):
        source = (ROOT / "queue" / name).read_text()
        assert "lifecycle.attempt_failed(" in source, name
        assert "to_retry(" not in source and not re.search(r'finish\([^)]*"failed"', source), name


def test_the_runner_takes_its_runtime_as_an_object() -> None:
    """No module globals for the worker to patch (it once assigned runner.stopping)."""
    from appliance.queue import runner

    assert not hasattr(runner, "stopping") and not hasattr(runner, "set_runtime")
    rt = runner.Runtime(cfg=None, node_id="h:worker:2", stopping=lambda: True)
    assert rt.stopping() and rt.worker_id().startswith("h:worker:2#")
    assert "runner.stopping" not in (ROOT / "queue" / "worker.py").read_text()
