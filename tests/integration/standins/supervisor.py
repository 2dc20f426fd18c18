"""Runs the real Arbiter over stand-in children; the kinds come as JSON in argv[1].

[{"role": "api", "count": 2, "mode": "http", "base_port": 9000, "readiness": "http", "group": "api", "drained": true}, ...]
argv[2] is the run dir. Settings overrides come as JSON in argv[3].
"""

import json
import sys
from pathlib import Path

from appliance.config import Config
from appliance.logs import setup_logging
from appliance.supervisor.arbiter import Arbiter, Settings
from appliance.supervisor.kinds import Kind
from appliance.supervisor.notify import Notifier
from appliance.supervisor.policy import RestartPolicy

HERE = Path(__file__).parent


def make_kind(spec: dict) -> Kind:
    base = spec.get("base_port")
    mode = spec["mode"]

    def command(index: int) -> list[str]:
        argv = [sys.executable, str(HERE / "child.py"), mode]
        if base:
            argv.append(str(base + index))
        if spec.get("arg"):
            argv.append(spec["arg"])
        return argv

    return Kind(
        role=spec["role"],
        count=spec["count"],
        readiness=spec.get("readiness", "heartbeat"),
        command=command,
        port=(lambda i: base + i) if base else None,
        group=spec.get("group"),
        drained=spec.get("drained", False),
        replace=spec.get("replace", "overlap"),
    )


def main() -> int:
    specs = json.loads(sys.argv[1])
    extra = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
    policy = RestartPolicy(**extra.pop("policy", {}))
    setup_logging("supervisor", "json", "info")
    settings = Settings(run_dir=Path(sys.argv[2]), policy=policy, **extra)
    arbiter = Arbiter(Config(), lambda cfg: [make_kind(s) for s in specs], settings, notifier=Notifier())
    return arbiter.run()


if __name__ == "__main__":
    sys.exit(main())
