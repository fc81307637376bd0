"""Every benchmark, one table: ``python -m benchmarks`` (``./dev bench``).

    python -m benchmarks [--only NAME,...] [--json PATH] [--markdown]

Runs, in this order and each bounded in time:

    schedule     benchmarks.polling     the poll schedule in virtual time (polls, detection lag)
    bigjob       benchmarks.bigjob      memory and latency of a completed job of 100,000 results
    throughput   benchmarks.throughput  small jobs completed and acknowledged per second, at 0 and 250 ms
    capacity     benchmarks.capacity    5,000 watches polled every 30 s on one host: lateness, memory, 0 and 250 ms
    backlog      benchmarks.backlog     due polls next to 1,000 pending deliveries

and prints one table (figure, ours, baseline, ratio = ours / baseline, target, met?).
The table, the machine it ran on and every benchmark's own figures are written to
benchmarks/results/latest.json. A benchmark that fails is reported as a row and
the others still run; the exit status is then 1.

Ratios come from the same run on the same machine; absolute figures depend on the
machine and on whatever else it runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks import backlog, bigjob, capacity, polling, throughput
from benchmarks.common import RESULTS_DIR, Row, format_table, machine, markdown_table, row_json, write_json

# The whole run must stay under this; each benchmark is sized for it on a 2-core machine.
TOTAL_BUDGET_S = 600.0


def _schedule() -> tuple[dict[str, Any], list[Row]]:
    figures = polling.run(10_000, 1)
    mixed, targets = figures["mixed"], figures["targets"]
    rows = [
        Row.compare(
            "schedule: polls per job (mean, mixed jobs)",
            mixed["ours"]["polls_mean"],
            mixed["oracle"]["polls_mean"],
            "",
            target="<= 1.5 x oracle",
            met=targets["polls_within_1_5x_oracle"],
            baseline_name="oracle",
        ),
        Row.compare(
            "schedule: detection lag p95",
            mixed["ours"]["lag_p95_s"],
            mixed["fixed-5s"]["lag_p95_s"],
            "s",
            target="<= fixed 5 s",
            met=targets["lag_p95_no_worse_than_fixed_5s"],
            baseline_name="fixed 5 s",
        ),
    ]
    return figures, rows


def _bigjob() -> tuple[dict[str, Any], list[Row]]:
    figures = bigjob.run()
    ours, base, targets = figures["ours"], figures["baseline"], figures["targets"]
    results = figures["settings"]["results"]
    rows = [
        Row.compare(
            f"big job ({results:,} results): peak memory, x raw answer",
            ours["peak_multiple"],
            base["peak_multiple"],
            "x",
            target="<= 4 x raw",
            met=targets.get("peak_memory_within_4x_raw"),
            baseline_name="whole answer in memory",
        ),
        Row.compare(
            f"big job ({results:,} results): poll to last part acked",
            ours["seconds"],
            base["seconds"],
            "s",
            target="-",
            met=None,
            baseline_name="whole answer in memory",
        ),
    ]
    return figures, rows


def _throughput() -> tuple[dict[str, Any], list[Row]]:
    figures = throughput.run_both(jobs=1500, rounds=2)
    return figures, throughput.rows(figures)


def _capacity() -> tuple[dict[str, Any], list[Row]]:
    figures = capacity.run_both(watches=5_000, interval_s=30.0, workers=2)
    return figures, capacity.rows_both(figures)


def _backlog() -> tuple[dict[str, Any], list[Row]]:
    figures = backlog.run()
    return figures, backlog.rows(figures)


BENCHMARKS: dict[str, Callable[[], tuple[dict[str, Any], list[Row]]]] = {
    "schedule": _schedule,
    "bigjob": _bigjob,
    "throughput": _throughput,
    "capacity": _capacity,
    "backlog": _backlog,
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(BENCHMARKS)}")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "latest.json", help="where to write the results")
    parser.add_argument("--markdown", action="store_true", help="also print the table as markdown")
    args = parser.parse_args(argv)
    chosen = list(BENCHMARKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in BENCHMARKS]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)}")

    info = machine()
    print(f"{info['nproc']} CPUs ({info['cpu_model']}), Python {info['python']}, {info['date']}", flush=True)
    started = time.monotonic()
    rows: list[Row] = []
    figures: dict[str, Any] = {}
    errors: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name in chosen:
        print(f"running {name} ...", flush=True)
        began = time.monotonic()
        try:
            figures[name], produced = BENCHMARKS[name]()
            rows += produced
        except Exception as exc:  # one broken benchmark must not hide the others' figures
            errors[name] = "".join(traceback.format_exception(exc))
            rows.append(Row(f"{name}: FAILED ({type(exc).__name__}: {str(exc)[:80]})", None, None, "", "-", False))
            print(errors[name], file=sys.stderr)
        seconds[name] = time.monotonic() - began
        print(f"  {name} took {seconds[name]:.0f} s", flush=True)
    wall = time.monotonic() - started
    if len(chosen) == len(BENCHMARKS):
        rows.append(Row("whole run: wall time", wall, None, "s", f"< {TOTAL_BUDGET_S:g} s", wall < TOTAL_BUDGET_S))

    print()
    print(format_table(rows))
    if args.markdown:
        print()
        print(markdown_table(rows))
    info["load_average_1m_at_end"] = os.getloadavg()[0]
    write_json(
        args.json,
        {
            "command": "python -m benchmarks" + (f" --only {','.join(chosen)}" if args.only else ""),
            "machine": info,
            "wall_s": wall,
            "seconds": seconds,
            "table": [row_json(r) for r in rows],
            "figures": figures,
            "errors": errors,
        },
    )
    print(f"\nwritten to {args.json}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
