"""Big answers: spooled to a file and read back in slices, classified exactly as whole.

Every answer here is fetched twice through a MockTransport that streams it in
pieces: once with the default threshold (parsed whole when small) and once forced
through the spool (``in_memory_max=0``). Both must give the same outcome, and a
spooled ``Completed`` must give back exactly Check365's results. The spool is read
in blocks of ``_BLOCK_BYTES`` and checked ``_BATCH`` results at a time; tests make
both tiny so that every boundary case is met on small answers.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.settings import make_settings
from worker.delivery.events import completed_events
from worker.errors import Check365Rejected, Check365Throttled, Check365Unavailable
from worker.local.simulator import generate_results
from worker.polling import check365
from worker.polling.check365 import (
    Completed,
    Incomplete,
    PollOutcome,
    Running,
    SpooledResults,
    fetch_status,
    make_client,
)

API_KEY = "ck365_live_9fQ2xZrT7wLmB4vK"
JOB_ID = "J-42"
WHOLE = 1 << 30


SETTINGS = make_settings(CHECK365_API_KEY=API_KEY, CHECK365_BASE_URL="https://api.test")


def pieces(body: bytes, size: int) -> Iterator[bytes]:
    for start in range(0, len(body), size):
        yield body[start : start + size]


def fetch(
    body: bytes, *, chunk: int = WHOLE, in_memory_max: int = 0, status_code: int = 200, **limits: int
) -> PollOutcome:
    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status_code, content=pieces(body, chunk))

    with make_client(SETTINGS, transport=httpx.MockTransport(handler)) as client:
        return fetch_status(client, SETTINGS, JOB_ID, in_memory_max=in_memory_max, **limits)


def results_of(outcome: Completed, loads: Any = orjson.loads) -> list[Any]:
    """The results, read back one by one from a spool and parsed by ``loads``.

    orjson by default, to compare with an answer parsed whole (which orjson did);
    ``json.loads`` keeps every number exact, to compare with what Check365 sent.
    """
    results = outcome.data["results"]
    if isinstance(results, SpooledResults):
        return [item for raw in results.json_slices(1) for item in loads(raw)]
    return list(results)


def outcome_or_error(body: bytes, **kwargs: Any) -> tuple[str, Any]:
    """A comparable summary: the error (type, message), or the outcome with its results
    read back twice: parsed by orjson, and parsed exactly."""
    try:
        outcome = fetch(body, **kwargs)
    except (Check365Unavailable, Check365Rejected, Check365Throttled) as exc:
        return type(exc).__name__, str(exc)
    if isinstance(outcome, Completed):
        try:
            fields = {k: v for k, v in outcome.data.items() if k != "results"}
            return "Completed", (fields, results_of(outcome), results_of(outcome, json.loads))
        finally:
            outcome.close()
    return type(outcome).__name__, outcome


def same(spooled: tuple[str, Any], whole: tuple[str, Any]) -> bool:
    """Same outcome; for Completed, the same fields and results as orjson parses them."""
    if spooled[0] != "Completed" or whole[0] != "Completed":
        return spooled == whole
    return bool(spooled[1][:2] == whole[1][:2])


@pytest.fixture
def small_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of 7 bytes and checks of 3 results: every cut and batch boundary is met."""
    monkeypatch.setattr(check365, "_BLOCK_BYTES", 7)
    monkeypatch.setattr(check365, "_BATCH", 3)


def envelope(data: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"success": True, "message": "Job has been completed", "data": data, **extra}


def job(results: list[Any], **fields: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "jobId": JOB_ID,
        "status": "completed",
        "creditsUsed": len(results),
        "progress": 100,
        "total": len(results),
        "results": results,
    }
    data.update(fields)
    return data


RESULTS = generate_results(JOB_ID, 12)
ODD = [
    {
        "email": "caf\u00e9@exempl\u00e4.com",
        "note": '\U0001f600 "quoted" back\\slash / tab\t nl\n \u2028',
        "zero": "\u0000",
        "status": "valid",
    },
    {"email": "tricky@company.com", "text": '}, {"x": 1}], ] }]', "brace": "}", "status": "valid"},
    {
        "big": 123456789012345678901234567890,
        "neg": -9223372036854775808,
        "u64": 18446744073709551615,
        "float": 1.5e-300,
        "exp": 6.02e23,
        "negzero": -0.0,
        "int": -17,
        "status": "valid",
    },
    {"nested": {"mx": [{"host": "a"}, {"host": "b"}], "deep": [[{"x": [{}]}]]}, "empty": {}, "list": []},
    {"": "empty key", "results": [1], "data": {"results": "not these"}, "status": "unknown"},
]


def dumps_variants(payload: Any) -> dict[str, bytes]:
    """The same document compact, ASCII-escaped, and pretty-printed with odd whitespace."""
    return {
        "compact": json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode(),
        "ascii": json.dumps(payload, ensure_ascii=True).encode(),
        "pretty": json.dumps(payload, indent=3, ensure_ascii=False).replace("\n", "\r\n").encode(),
    }


# --- the spooled path gives what the whole path gives ---------------------------------------


@pytest.mark.usefixtures("small_reads")
@pytest.mark.parametrize("chunk", [1, 7, WHOLE])
@pytest.mark.parametrize("style", ["compact", "ascii", "pretty"])
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(job(RESULTS), id="simulator-results"),
        pytest.param(job(ODD), id="odd-results"),
        pytest.param(job(RESULTS + ODD + RESULTS), id="mixed"),
        pytest.param(job([]), id="empty"),
        pytest.param(job(RESULTS[:1]), id="one"),
        pytest.param(job(RESULTS[:3]), id="one-batch"),
    ],
)
def test_spooled_completed_answer_matches_the_whole_one(data: dict[str, Any], style: str, chunk: int) -> None:
    body = dumps_variants(envelope(data))[style]
    whole = outcome_or_error(body, chunk=chunk, in_memory_max=WHOLE)
    spooled = outcome_or_error(body, chunk=chunk)
    assert whole[0] == "Completed"
    assert same(spooled, whole)
    # Exactly Check365's results, in order, every number as sent (parsed exactly here).
    assert spooled[1][2] == json.loads(body)["data"]["results"]


@pytest.mark.usefixtures("small_reads")
def test_status_and_total_after_the_results() -> None:
    data = {
        "results": ODD + RESULTS,
        "unknownField": {"nested": [1, 2.5, None]},
        "total": 17,
        "status": "completed",
        "progress": 100,
        "jobId": JOB_ID,
        "creditsUsed": 17,
    }
    body = json.dumps({"data": data, "message": "done", "success": True}).encode()
    outcome = fetch(body, chunk=7)
    assert isinstance(outcome, Completed)
    try:
        assert [k for k in outcome.data if k != "results"] == [
            "unknownField",
            "total",
            "status",
            "progress",
            "jobId",
            "creditsUsed",
        ]
        assert outcome.data["unknownField"] == {"nested": [1, 2.5, None]}
        assert results_of(outcome, json.loads) == ODD + RESULTS
    finally:
        outcome.close()


@pytest.mark.usefixtures("small_reads")
@pytest.mark.parametrize(("total", "received"), [(13, 12), (11, 12), (0, 12)])
def test_total_mismatch_is_incomplete(total: int, received: int) -> None:
    body = orjson.dumps(envelope(job(RESULTS, total=total, progress=99)))
    assert fetch(body, chunk=7) == Incomplete(status="completed", progress=99.0, total=total, received=received)


@pytest.mark.usefixtures("small_reads")
@pytest.mark.parametrize(
    "body",
    [
        pytest.param(orjson.dumps(envelope(job(RESULTS)))[:-1], id="cut-at-the-end"),
        pytest.param(orjson.dumps(envelope(job(RESULTS)))[:900], id="cut-in-the-results"),
        pytest.param(
            orjson.dumps(envelope(job(RESULTS))).replace(b'"risk":"low"', b'"risk":low', 1), id="bad-token-in-a-result"
        ),
        pytest.param(orjson.dumps(envelope(job(RESULTS))).replace(b"},{", b"},,{", 1), id="double-comma"),
        pytest.param(orjson.dumps(envelope(job(RESULTS))).replace(b"},{", b"}{", 1), id="missing-comma"),
        pytest.param(orjson.dumps(envelope(job(RESULTS))).replace(b"}]", b"},]", 1), id="trailing-comma"),
        pytest.param(orjson.dumps(envelope(job(RESULTS))).replace(b"}]", b"}x]", 1), id="garbage-before-the-end"),
        pytest.param(orjson.dumps(envelope(job(RESULTS))).replace(b"[{", b"[x{", 1), id="garbage-after-the-start"),
        pytest.param(orjson.dumps(envelope(job(RESULTS))).replace(b'"valid"', b'"\\ud800"', 1), id="lone-surrogate"),
        pytest.param(orjson.dumps(envelope(job(RESULTS))).replace(b'"valid"', b'"\xffvalid"', 1), id="not-utf8"),
        pytest.param(orjson.dumps(envelope(job(RESULTS))).replace(b'"risk":', b'"risk":\x0c', 1), id="form-feed"),
        pytest.param(orjson.dumps(envelope(job(RESULTS))) + b"x", id="trailing-garbage"),
        pytest.param(
            orjson.dumps(envelope(job(RESULTS))).replace(b'"total":12', b'"total":1e400'), id="infinite-number"
        ),
        pytest.param(orjson.dumps(envelope(job([*RESULTS, 1]))), id="a-number-result"),
        pytest.param(orjson.dumps(envelope(job([*RESULTS, "x", *RESULTS]))), id="a-string-result"),
        pytest.param(orjson.dumps(envelope(job([[RESULTS[0]], *RESULTS]))), id="an-array-result"),
        pytest.param(orjson.dumps(envelope(job({"0": RESULTS[0]}))), id="results-object"),
        pytest.param(b"<html>" + b"x" * 5000 + b"</html>", id="html"),
        pytest.param(b"[" * 5000, id="deep-nesting"),
    ],
)
def test_malformed_answers_are_unavailable_as_whole(body: bytes) -> None:
    assert body != orjson.dumps(envelope(job(RESULTS)))  # the breakage took place
    whole = outcome_or_error(body, in_memory_max=WHOLE)
    # A broken object is a cut or garbled answer; anything else is not Check365's at all.
    assert whole[0] == ("Check365Unavailable" if body.startswith(b"{") else "Check365Misconfigured")
    assert outcome_or_error(body, chunk=7) == whole


@pytest.mark.usefixtures("small_reads")
@pytest.mark.parametrize("separator", [b"", b" ", b",,", b"x,", b", x"])
@pytest.mark.parametrize("results", [RESULTS, [ODD[1], *RESULTS]], ids=["quick-cut", "exact-cut"])
def test_a_broken_separator_between_two_checks_is_malformed(results: list[Any], separator: bytes) -> None:
    # Results are checked three at a time here: the separator after the third lies
    # between two checks, where only the cutting itself can see it.
    items = [orjson.dumps(r) for r in results]
    array = b"[" + b",".join(items[:3]) + separator + b",".join(items[3:]) + b"]"
    body = orjson.dumps(envelope(job([]))).replace(b'"results":[]', b'"results":' + array)
    assert outcome_or_error(body, chunk=7) == ("Check365Unavailable", "malformed answer: the body is not a JSON object")


@pytest.mark.parametrize(
    ("message", "error"),
    [("Job not found", Check365Rejected), ("Invalid API key", Check365Rejected), ("Try again", Check365Unavailable)],
)
def test_success_false_is_classified_as_whole(message: str, error: type[Exception]) -> None:
    body = orjson.dumps({"success": False, "message": message, "data": job(RESULTS)})
    whole = outcome_or_error(body, in_memory_max=WHOLE)
    assert whole[0] == error.__name__
    assert outcome_or_error(body, chunk=7) == whole


def test_error_statuses_are_classified_as_whole() -> None:
    body = orjson.dumps({"success": False, "message": "Too many requests"}) + b" " * 5000
    with pytest.raises(Check365Throttled):
        fetch(body, chunk=7, status_code=429)
    not_found = orjson.dumps({"success": False, "message": "Job not found"}) + b" " * 5000
    with pytest.raises(Check365Rejected, match="HTTP 404"):
        fetch(not_found, status_code=404)


@pytest.mark.usefixtures("small_reads")
@pytest.mark.parametrize(
    "data",
    [
        pytest.param(job(RESULTS, status="processing", progress=40), id="running"),
        pytest.param(job(RESULTS, status="failed"), id="failed"),
        pytest.param(job(RESULTS, jobId="J-other"), id="another-job"),
        pytest.param(job(RESULTS, total="12"), id="total-string"),
        pytest.param({"status": "completed", "total": 0}, id="no-results"),
        pytest.param({"status": "processing", "padding": ["x" * 100] * 50}, id="running-without-results"),
    ],
)
def test_other_answers_are_classified_as_whole(data: dict[str, Any]) -> None:
    body = orjson.dumps(envelope(data))
    assert same(outcome_or_error(body, chunk=7), outcome_or_error(body, in_memory_max=WHOLE))


@pytest.mark.usefixtures("small_reads")
@pytest.mark.parametrize(
    "body",
    [
        # A repeated key: orjson keeps the last one, and so must a spooled answer.
        pytest.param(
            b'{"success":true,"data":'
            + orjson.dumps(job(RESULTS))
            + b',"data":'
            + orjson.dumps(job([], total=0))
            + b"}",
            id="data-twice",
        ),
        pytest.param(orjson.dumps(envelope(job(RESULTS)))[:-2] + b',"results":[]}}', id="results-twice"),
        pytest.param(
            b'{"success":true,"data":{"res\\u0075lts":' + orjson.dumps(RESULTS) + b',"status":"completed","total":12}}',
            id="escaped-key",
        ),
        pytest.param(
            b'{"success":true,"data":{"status":"completed","total":12,"results.item":[{}],"results":'
            + orjson.dumps(RESULTS)
            + b"}}",
            id="dotted-key",
        ),
    ],
)
def test_oddly_keyed_answers_are_classified_as_whole(body: bytes) -> None:
    whole = outcome_or_error(body, in_memory_max=WHOLE)
    assert same(outcome_or_error(body, chunk=7), whole)


@pytest.mark.usefixtures("small_reads")
@pytest.mark.parametrize(
    ("results", "exact"),
    [
        pytest.param(RESULTS, False, id="plain-results-cut-quickly"),
        pytest.param(RESULTS + ODD[1:2] + RESULTS, True, id="braces-in-strings"),
        pytest.param(ODD[3:4] + RESULTS, True, id="nested-arrays-of-objects"),
    ],
)
def test_results_that_fool_the_quick_cut_are_cut_exactly(
    results: list[Any], exact: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[int] = []
    exact_slicing = check365._slice_exact

    def spy(spool: Any, first: int) -> Any:
        calls.append(first)
        return exact_slicing(spool, first)

    monkeypatch.setattr(check365, "_slice_exact", spy)
    for payload in (job(results), job(results[:4]), job([*results, {}])):
        body = orjson.dumps(envelope(payload))
        outcome = fetch(body, chunk=7)
        assert isinstance(outcome, Completed)
        try:
            assert isinstance(outcome.data["results"], SpooledResults)
            assert results_of(outcome) == payload["results"]
        finally:
            outcome.close()
    assert bool(calls) == exact


@pytest.mark.usefixtures("small_reads")
def test_an_escaped_results_key_is_still_spooled() -> None:
    head = rb'{"success":true,"data":{"st\u0061tus":"completed","total":12,"res\u0075lts":'
    body = head + orjson.dumps(RESULTS) + b"}}"
    outcome = fetch(body, chunk=5)
    assert isinstance(outcome, Completed)
    try:
        assert isinstance(outcome.data["results"], SpooledResults)
        assert results_of(outcome) == RESULTS
    finally:
        outcome.close()


def test_small_answers_are_not_spooled() -> None:
    # The default threshold keeps a small completed answer whole: its results are a list.
    outcome = fetch(orjson.dumps(envelope(job(RESULTS))), chunk=7, in_memory_max=check365.IN_MEMORY_MAX_BYTES)
    assert isinstance(outcome, Completed)
    assert outcome.data["results"] == RESULTS


def test_spooled_parts_are_byte_identical_to_parts_built_whole() -> None:
    # orjson's compact output is what orjson writes back: the spooled parts, made of
    # Check365's own bytes, must then be exactly the parts built from parsed results.
    data = job(generate_results(JOB_ID, 2_500))
    body = orjson.dumps(envelope(data))
    outcome = fetch(body, chunk=65_536)
    assert isinstance(outcome, Completed)
    assert isinstance(outcome.data["results"], SpooledResults)
    try:
        spooled = completed_events("w_1", JOB_ID, outcome.data, {"order": 17}, per_part=1_000, now=0.0)
    finally:
        outcome.close()
    whole = completed_events("w_1", JOB_ID, data, {"order": 17}, per_part=1_000, now=0.0)
    assert [e.body for e in spooled] == [e.body for e in whole]
    assert [e.part_count for e in spooled] == [3, 3, 3]


@pytest.fixture
def spools(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every temporary file the client opens for an answer, in order."""
    made: list[Any] = []
    original = check365._Spool

    def recording() -> Any:
        spool = original()
        made.append(spool)
        return spool

    monkeypatch.setattr(check365, "_Spool", recording)
    return made


def test_the_spool_is_closed_unless_an_outcome_keeps_it_for_its_results(spools: list[Any]) -> None:
    fetch(orjson.dumps(envelope(job(RESULTS, status="processing"))))
    with pytest.raises(Check365Unavailable):
        fetch(orjson.dumps(envelope(job(RESULTS)))[:-3])
    assert len(spools) == 2
    assert all(s.file.closed for s in spools)
    # A completed answer short of its total keeps its results, for a caller that waited enough.
    short = fetch(orjson.dumps(envelope(job(RESULTS, total=99))))
    assert isinstance(short, Incomplete)
    assert short.answer is not None
    assert not spools[-1].file.closed
    short.close()
    assert spools[-1].file.closed
    outcome = fetch(orjson.dumps(envelope(job(RESULTS))))
    assert isinstance(outcome, Completed)
    assert not spools[-1].file.closed
    outcome.close()
    assert spools[-1].file.closed


def test_errors_of_spooled_answers_do_not_reveal_the_key() -> None:
    body = orjson.dumps({"success": False, "message": f"bad key {API_KEY}", "data": job(RESULTS)})
    with pytest.raises(Check365Unavailable) as caught:
        fetch(body, chunk=7)
    assert API_KEY not in str(caught.value)
    assert caught.value.__context__ is None


# --- the same, for generated answers ---------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    # Braces, brackets, commas and quotes inside strings are what could fool the cutting.
    | st.text(alphabet=st.sampled_from('}{][,:"\\ ax\u00e9\U0001f600\n'), max_size=12)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=12,
)
result_objects = st.dictionaries(
    st.sampled_from(["email", "status", "}]", "a,{", ""]) | st.text(max_size=6), json_values, max_size=5
)


@st.composite
def answers(draw: st.DrawFn) -> bytes:
    rows = draw(st.lists(result_objects, max_size=9))
    data: dict[str, Any] = {
        "jobId": JOB_ID,
        "status": draw(st.sampled_from(["completed", "Completed", "processing", "failed"])),
        "progress": draw(st.integers(0, 100)),
        "total": draw(st.just(len(rows)) | st.integers(0, 10)),
        "results": rows,
        "extra": draw(json_values),
    }
    keys = draw(st.permutations(list(data)))
    payload = {
        "success": draw(st.booleans() | st.just(True)),
        "message": draw(st.text(max_size=20)),
        "data": {k: data[k] for k in keys},
    }
    body = draw(st.sampled_from(sorted(dumps_variants(payload).items())))[1]
    if draw(st.integers(0, 9)) == 0:
        body = body[: draw(st.integers(0, len(body)))]  # cut short
    return body


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(answers(), st.sampled_from([1, 7, 64]), st.sampled_from([1, 2, 1000]), st.sampled_from([1, 5, WHOLE]))
def test_generated_answers_are_classified_as_whole(body: bytes, block: int, batch: int, chunk: int) -> None:
    whole = outcome_or_error(body, in_memory_max=WHOLE)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(check365, "_BLOCK_BYTES", block)
        patch.setattr(check365, "_BATCH", batch)
        spooled = outcome_or_error(body, chunk=chunk)
    assert same(spooled, whole)
    if spooled[0] == "Completed":
        assert spooled[1][2] == json.loads(body)["data"]["results"]


def test_an_answer_larger_than_the_limit_is_refused_and_its_file_removed(spools: list[Any]) -> None:
    body = orjson.dumps(envelope(job(generate_results(JOB_ID, 1_000))))  # several 64 KiB reads
    with pytest.raises(Check365Unavailable, match="larger than"):
        fetch(body, chunk=65_536, max_answer=len(body) // 2)
    assert len(spools) == 1
    assert spools[0].file.closed
    outcome = fetch(body, chunk=65_536, max_answer=len(body))
    assert isinstance(outcome, Completed)
    outcome.close()


def test_an_oversized_answer_that_cannot_be_sliced_is_not_read_whole() -> None:
    # A running job's answer is a few hundred bytes; one padded to megabytes (a gzip
    # bomb inflates that far from a few kilobytes) would be parsed at several times its size.
    running = {"jobId": JOB_ID, "status": "processing", "creditsUsed": 0, "progress": 10, "total": 12}
    body = orjson.dumps({"success": True, "message": "Job is running" + " " * 200_000, "data": running})
    with pytest.raises(Check365Unavailable, match="too large to read"):
        fetch(body, chunk=65_536, whole_read_max=100_000)
    assert isinstance(fetch(body, chunk=65_536, whole_read_max=len(body)), Running)


def test_a_long_string_before_the_results_is_scanned_in_linear_time(monkeypatch: pytest.MonkeyPatch) -> None:
    # The scanner matches a token cut by the end of what it has read again from the
    # token's start; with a fixed read size a 16 MiB string was scanned 136 MiB deep
    # (23 s), an 8 MiB one 36 MiB deep. What each match may scan is the window it is given: count that.
    scanned: list[int] = []
    original = check365._Window.more

    def counting(window: Any) -> bool:
        grew = bool(original(window))
        scanned.append(len(window.buf))
        return grew

    monkeypatch.setattr(check365._Window, "more", counting)
    body = orjson.dumps({"success": True, "message": "x" * (8 << 20), "data": job(RESULTS)})
    outcome = fetch(body, chunk=65_536)
    assert isinstance(outcome, Completed)
    outcome.close()
    assert sum(scanned) <= 3 * len(body)
