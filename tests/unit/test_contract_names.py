"""The names the supervisor and its children share are spelt once, in appliance/contract.py.

A second spelling elsewhere (an environment variable or a run file written out as a literal)
is how one side ends up reading what the other no longer writes; this walks the package with
`ast` and fails on any such literal outside contract.py.
"""

from __future__ import annotations

import ast
from pathlib import Path

from appliance import contract

PACKAGE = Path(contract.__file__).parent
SHARED = {
    contract.LISTEN_FDS_ENV,
    contract.ADDRESS_FILE_ENV,
    contract.CONFIG_ENV,
    contract.HEARTBEAT_FILE_ENV,
    contract.SUPERVISOR_PID_ENV,
    contract.UPSTREAMS_FILE,
    contract.BALANCER_STATE_FILE,
}


def _literals(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
    ]


def test_shared_names_are_spelt_only_in_the_contract_module():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name == "contract.py" and path.parent == PACKAGE:
            continue
        for line, text in _literals(path):
            for name in SHARED:
                if name in text:
                    found.append(f"{path.relative_to(PACKAGE.parent)}:{line}: {name!r}")
    assert found == [], "import these from appliance.contract instead:\n" + "\n".join(found)


def test_both_sides_resolve_the_same_run_files(make_config):
    from appliance.balancer.upstreams import UpstreamTable
    from appliance.supervisor.channel import Channel
    from appliance.supervisor.main import run_dir

    cfg = make_config(monitor={"enabled": False})
    channel, table = Channel(run_dir(cfg)), UpstreamTable(cfg)
    assert channel.upstreams_path == table.control_path == cfg.data_dir / contract.RUN_DIR / contract.UPSTREAMS_FILE
    assert channel.state_path == table.state_path == cfg.data_dir / contract.RUN_DIR / contract.BALANCER_STATE_FILE
