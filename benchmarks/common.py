"""What the benchmarks share: table rows, machine facts, JSON output, worker processes.

Every figure goes into one table with the same columns (figure, ours, baseline,
ratio, target, met?), so that ``python -m benchmarks`` can print and store all of
them together. Worker processes are real ``celery worker`` subprocesses, started
through the integration harness so that they stop with their cluster.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

from tests.support.cluster import WORKER_READY, Cluster, WorkerProcess

T = TypeVar("T")

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Row:
    """One line of the benchmark table.

    ``ratio`` is ours / baseline unless ``ratio_note`` says otherwise; ``met`` is None
    for a figure that has no target (shown for context only).
    """

    figure: str
    ours: float | None
    baseline: float | None
    unit: str
    target: str
    met: bool | None
    ratio: float | None = None
    baseline_name: str = ""
    note: str = ""

    @classmethod
    def compare(
        cls,
        figure: str,
        ours: float | None,
        baseline: float | None,
        unit: str,
        *,
        target: str,
        met: bool | None,
        baseline_name: str = "",
        note: str = "",
    ) -> Row:
        ratio = ours / baseline if ours is not None and baseline not in (None, 0) else None
        return cls(figure, ours, baseline, unit, target, met, ratio, baseline_name, note)


def _number(value: float | None, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    magnitude = abs(value)
    if magnitude >= 1000:
        text = f"{value:,.0f}"
    elif magnitude >= 100:
        text = f"{value:.0f}"
    elif magnitude >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}" if magnitude < 1 else f"{value:.2f}"
    return f"{text} {unit}".rstrip()


def table_cells(row: Row) -> list[str]:
    met = "-" if row.met is None else ("yes" if row.met else "NO")
    ratio = "-" if row.ratio is None else f"{row.ratio:.3g}"
    baseline = _number(row.baseline, row.unit)
    if row.baseline_name and row.baseline is not None:
        baseline = f"{baseline} ({row.baseline_name})"
    return [row.figure, _number(row.ours, row.unit), baseline, ratio, row.target, met]


HEADERS = ("figure", "ours", "baseline", "ratio", "target", "met?")


def format_table(rows: Sequence[Row]) -> str:
    """A plain-text table, readable in a terminal and pasteable into markdown as a code block."""
    cells = [list(HEADERS), *(table_cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADERS))]
    lines = []
    for index, line in enumerate(cells):
        lines.append("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(rows: Sequence[Row]) -> str:
    def escape(text: str) -> str:
        return text.replace("|", "\\|")

    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    lines += ["| " + " | ".join(escape(c) for c in table_cells(r)) + " |" for r in rows]
    return "\n".join(lines)


def row_json(row: Row) -> dict[str, Any]:
    out: dict[str, Any] = json_safe(asdict(row))
    return out


def json_safe(value: Any) -> Any:
    """NaN and infinities (figures that do not exist) become null: JSON has no such numbers."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    """Write atomically: a reader never sees half a file, even if this run is interrupted."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(json_safe(payload), indent=2, allow_nan=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------- the machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    memory_kib = None
    try:
        for line in Path("/proc/meminfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("MemTotal:"):
                memory_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(memory_kib / 2**20, 1) if memory_kib else None,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m_at_start": os.getloadavg()[0],
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- processes


def _group_stats(leader: int) -> list[tuple[Path, list[str]]]:
    """(/proc/PID, stat fields after the command name) of every process in ``leader``'s group."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The command name may hold spaces and parentheses: fields follow the last ')'.
            fields = stat.read_text().rpartition(")")[2].split()
        except OSError:
            continue  # exited meanwhile
        if len(fields) > 12 and fields[2] == str(leader):  # fields: state, ppid, pgrp, ...
            found.append((stat.parent, fields))
    return found


def group_rss_bytes(leader: int) -> int:
    """Resident memory of every process in ``leader``'s process group (a worker and its pool), from /proc."""
    total = 0
    page = os.sysconf("SC_PAGE_SIZE")
    for proc, _ in _group_stats(leader):
        try:
            # statm: size resident shared ...; resident is in pages.
            total += int((proc / "statm").read_text().split()[1]) * page
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile
    return total


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time used so far by one process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def group_cpu_seconds(leader: int) -> float:
    """User + system CPU time used so far by the processes of ``leader``'s group, from /proc."""
    ticks = os.sysconf("SC_CLK_TCK")
    # utime and stime are the 14th and 15th fields of stat, 12th and 13th after the name.
    return sum(int(f[11]) + int(f[12]) for _, f in _group_stats(leader)) / ticks


def baseline_app(name: str, queue: str) -> tuple[Any, Any]:
    """A Celery app for a baseline worker, with exactly the settings ours gets from ``worker.runtime.celeryconfig``.

    Returns (app, settings). Built when ``celery -A`` asks for it, so that importing a
    benchmark module builds nothing.
    """
    from celery import Celery

    from worker.runtime.celeryconfig import celery_config
    from worker.settings import load_settings

    settings = load_settings(process="worker")
    app = Celery(name)
    app.config_from_object(celery_config(settings))
    app.conf.task_default_queue = queue
    return app, settings


def lazy_app(namespace: dict[str, Any], name: str, make: Callable[[], Any]) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds ``name`` on first access.

    ``celery -A module:name`` finds the app, and importing the module (as
    ``python -m benchmarks`` does) builds nothing.
    """

    def module_getattr(attribute: str) -> Any:
        if attribute == name:
            namespace[name] = made = make()
            return made
        raise AttributeError(f"module {namespace['__name__']!r} has no attribute {attribute!r}")

    return module_getattr


def per_process(cache: dict[int, T], make: Callable[[], T]) -> T:
    """The pool process's own ``make()``, made on first use after the fork and kept."""
    pid = os.getpid()
    if pid not in cache:
        cache[pid] = make()
    return cache[pid]


def start_celery_worker(
    cluster: Cluster,
    name: str,
    *,
    app: str,
    queue: str,
    concurrency: int | None,
    env: Mapping[str, str],
    extra_args: Iterable[str] = (),
) -> WorkerProcess:
    """A ``celery -A APP worker`` subprocess in its own session, stopped with ``cluster``.

    Without ``concurrency`` its pool is the one of the app's configuration.
    """
    args = [
        sys.executable, "-m", "celery", "-A", app, "worker", "-Q", queue,
        *(() if concurrency is None else ("--concurrency", str(concurrency))),
        "--hostname", f"{name}@%h", "--without-gossip", "--without-mingle", *extra_args,
    ]  # fmt: skip
    process = WorkerProcess(name, args, env, cluster.directory, WORKER_READY)
    cluster.processes.append(process)
    return process


def stop_worker(cluster: Cluster, process: WorkerProcess) -> None:
    """Stop a worker now (its job is done); SIGKILL is fine, nothing it holds matters any more."""
    process.kill()
    if process in cluster.processes:
        cluster.processes.remove(process)


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)
