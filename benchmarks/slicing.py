"""Slicing a big completed answer: our slicer against ijson's C backend (yajl2_c).

    pip install ijson && python -m benchmarks.slicing [--results N] [--runs N]

Not part of ``./dev bench``: ijson is not a dependency; this is the measurement that
decided it would not be (docs/design.md, "Big answers: why not ijson"). Both sides
read the same answer from a spooled temporary file, as the worker does:

    ours   ``_classify_spool``: the results cut at item boundaries, every byte
           checked by orjson, then every part's results read back as JSON arrays
           of Check365's own bytes (``SpooledResults.json_slices``)
    ijson  ``ijson.items(file, "data.results.item")`` with the yajl2_c backend,
           every result re-serialised by orjson into a second spool, as a
           replacement would have to (ijson gives values, not byte offsets); the
           rest of the answer is not even read, so this is ijson's lower bound

Figures: median wall time and tracemalloc's peak of Python allocations, per
variant, and how many results of a hostile sample (numbers written as Check365 may
write them, escapes, an integer past 64 bits) would not reach the receiver byte
for byte, or not at all.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import orjson

from worker.local.simulator import generate_results
from worker.polling import check365

PER_PART = 1000
# Results as a server may legitimately write them, which a parse-and-serialise
# path cannot give back as written.
ODD_RESULTS = [
    b'{"email":"a@example.com","score":1.50}',
    b'{"email":"b@example.com","score":1e2}',
    b'{"email":"caf\\u00e9@example.com","score":1}',
    b'{"email":"d@example.com","id":123456789012345678901234}',
    b'{"email":"e@example.com", "score": 2}',
]


def answer(results: int) -> bytes:
    data = {"jobId": "J-1", "status": "completed", "total": results, "results": generate_results("J-1", results)}
    return orjson.dumps({"success": True, "data": data})


def _spool(body: bytes) -> Any:
    spool = check365._Spool()
    spool.write(body)
    spool.finish()
    return spool


def ours(body: bytes) -> int:
    outcome = check365._classify_spool(_spool(body), "J-1", (), 1 << 30)
    assert isinstance(outcome, check365.Completed)
    results = outcome.data["results"]
    assert isinstance(results, check365.SpooledResults)
    size = sum(len(s) for s in results.json_slices(PER_PART))
    results.close()
    return size


def with_ijson(body: bytes) -> int:
    import ijson  # type: ignore[import-not-found,unused-ignore]

    spool = _spool(body)
    out = tempfile.TemporaryFile()  # noqa: SIM115 - closed below
    offsets = []
    spool.file.seek(0)
    for item in ijson.items(spool.file, "data.results.item", use_float=True):
        offsets.append(out.tell())
        out.write(orjson.dumps(item))
    size = out.tell()
    out.close()
    spool.close()
    return size


def measure(fn: Callable[[bytes], int], body: bytes, runs: int) -> tuple[float, float]:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(body)
        times.append(time.perf_counter() - start)
    tracemalloc.start()
    fn(body)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return statistics.median(times), peak / len(body)


def fidelity() -> tuple[int, int]:
    """(results ours changes, results ijson + orjson change or refuses) among ODD_RESULTS."""
    import ijson

    body = b'{"success":true,"data":{"status":"completed","total":5,"results":[' + b",".join(ODD_RESULTS) + b"]}}"
    theirs_changed = 0
    for raw in ODD_RESULTS:
        try:
            item = next(ijson.items(raw, "", use_float=True))
            theirs_changed += orjson.dumps(item) != raw
        except (ijson.JSONError, orjson.JSONEncodeError):  # yajl: "integer overflow" past 64 bits
            theirs_changed += 1
    outcome = check365._classify_spool(_spool(body), "J-1", (), 1 << 30)
    assert isinstance(outcome, check365.Completed)
    results = outcome.data["results"]
    assert isinstance(results, check365.SpooledResults)
    # json_slices wraps each result in brackets: compare the inside.
    ours_changed = sum(s[1:-1] != raw for s, raw in zip(results.json_slices(1), ODD_RESULTS, strict=True))
    results.close()
    return ours_changed, theirs_changed


def main(argv: list[str] | None = None) -> None:
    import ijson

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args(argv)
    body = answer(args.results)
    print(f"answer: {args.results:,} results, {len(body) / 1e6:.1f} MB; ijson {ijson.__version__} ({ijson.backend})")
    base_t, base_m = measure(ours, body, args.runs)
    for name, fn in (("ours", ours), ("ijson", with_ijson)):
        t, m = (base_t, base_m) if fn is ours else measure(fn, body, args.runs)
        rate = len(body) / t / 1e6
        print(f"{name:6} {t:7.3f} s  ({t / base_t:4.2f} x ours)  peak {m:5.2f} x answer  ({rate:6.1f} MB/s)")
    ours_changed, theirs_changed = fidelity()
    n = len(ODD_RESULTS)
    print(f"odd results not passed on byte for byte: ours {ours_changed}/{n}, ijson {theirs_changed}/{n}")


if __name__ == "__main__":
    main()
