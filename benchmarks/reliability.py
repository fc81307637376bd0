"""The reliability suite and its table.

    python -m benchmarks.reliability [PYTEST ARGS]      (./dev reliability)

Runs ``pytest tests/reliability -q``: real workers, beat, Redis, the Check365 simulator
and webhook receivers on 127.0.0.1, broken on purpose (a worker killed, Redis restarted,
broker messages deleted, Check365 and receivers failing, hostile messages and callback
URLs). At the end the suite prints one row per scenario (jobs, events expected and
delivered, duplicate deliveries, lost events, time to recover) and writes the table to
benchmarks/results/reliability.json. It takes about five minutes on two cores.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "reliability.json"


def main(argv: list[str] | None = None) -> int:
    extra = sys.argv[1:] if argv is None else argv
    # The suite writes its table only where it is told to: ./dev test leaves the committed one alone.
    env = {**os.environ, "RELIABILITY_JSON": str(RESULTS)}
    return subprocess.call([sys.executable, "-m", "pytest", "tests/reliability", "-q", *extra], cwd=ROOT, env=env)


if __name__ == "__main__":
    raise SystemExit(main())
