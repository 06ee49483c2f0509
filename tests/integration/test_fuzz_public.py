"""Hostile and malformed messages on the public subjects (issue 11, "Show it"): several hundred
seeded cases against ringserve.v1.generate, .cancel and .status (wrong types, sizes, nesting
depth, invalid encodings and lone surrogates, both or neither prompt field, huge lists, bodies
that are not objects, Content-Type headers that lie). Every message gets, within ANSWER_S, a
reply of its subject's kind or an error with a code; no service process dies or restarts; a
status request is answered while the largest bodies are handled; a normal request works after.

The stack runs with RINGSERVE_MAX_PROMPT_TOKENS=20000: with the default (1M) and the demo's 1M
context, a *valid* list of a million token ids is accepted and starts a million-token prefill on
the CPU worker (issue 11 item 4, a CPU worker's capacity from its memory, is not built yet).
"""

from __future__ import annotations

import asyncio
import json
import random
import time

import msgpack
import nats
import pytest

from shared import subjects
from shared.messages import ErrorCode
from tests.integration.stack import Stack

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

SEED = 20241129
ANSWER_S = 10.0  # every message is answered within this
CONCURRENCY = 8
MIN_CASES = 300
CODES = {c.value for c in ErrorCode}
JSON, MSGPACK = "application/json", "application/msgpack"
ENV = {"RINGSERVE_MAX_PROMPT_TOKENS": "20000", "RINGSERVE_KV_BLOCK_TOKENS": "64"}
BASE = {"input_ids": [5, 6, 7], "max_new_tokens": 2}
FIELDS = ["prompt", "input_ids", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "stop_token_ids", "ignore_eos", "stream", "logprobs", "request_id", "kv_quant", "attention"]
# Wrong (or edge) values of every JSON type; none makes a valid request run long.
WRONG = ["1", "", "yes", 1.5, -1, 0, 2**63, 2**70, -(2**70), True, False, None, [], {}, [1, "2"], [[1]], {"a": 1},
         [None], ["1"] * 50, [1.0, 2.0], "\u0000", "é" * 10, float("inf"), float("nan"), -0.0, 1e308]
# Values of a wrong type generate accepts, and malformed input answered `internal` (a server
# fault): none (temperature and top_p were lax floats, top_k unbounded, until the fuzz found them).
KNOWN_COERCIONS: set[str] = set()
KNOWN_INTERNAL: set[str] = set()
MAX_NEW = ["2", 2.0, True, -1, 0, 10**6, 2**64, None, [], {}, [2], "∞"]


SCALARS = {"max_new_tokens": int, "top_k": int, "seed": int, "temperature": float, "top_p": float,
           "stream": bool, "logprobs": bool, "prompt": str, "request_id": str, "kv_quant": str}


def _wrong_type(field: str, value) -> bool:
    """True when `value` is of a JSON type the field must refuse (no coercion: issue 11 item 4):
    a boolean, string, list or object for a number, a float for an integer, anything but a
    boolean for a flag, anything but a string for text. None is left out (optional fields)."""
    want = SCALARS.get(field)
    if want is None or value is None:
        return False
    if want is bool:
        return not isinstance(value, bool)
    if want is str:
        return not isinstance(value, str)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return True
    return want is int and isinstance(value, float)


def _msgpack_int(value) -> bool:
    """Integers past 64 bits travel as strings in msgpack (see _mp): then no longer a wrong type."""
    return not (isinstance(value, int) and not -(2**63) <= value < 2**64)


def _nest(depth: int, leaf=1, kind: str = "list"):
    """depth levels of [...] (or {"a": ...}) around leaf, built as text (json.dumps recurses)."""
    if kind == "list":
        return ("[" * depth + json.dumps(leaf) + "]" * depth).encode()
    return ('{"a":' * depth + json.dumps(leaf) + "}" * depth).encode()


def _case(subject: str, data: bytes, content_type: str | None = None, name: str = "") -> dict:
    return {"subject": subject, "data": data, "content_type": content_type, "name": name}


def _json(subject, body, name):
    return _case(subject, json.dumps(body, ensure_ascii=False).encode(), JSON, name)


def _mp(subject, body, name):
    def fit(v):  # msgpack has no integers past 64 bits: those travel as JSON only
        return v if not isinstance(v, int) or -(2**63) <= v < 2**64 else str(v)
    return _case(subject, msgpack.packb({k: fit(v) for k, v in body.items()}, use_bin_type=True), MSGPACK, name)


def _cases(rng: random.Random) -> tuple[list[dict], list[dict]]:
    """(cases, huge cases): the huge ones run one at a time, each beside a status request."""
    G, C, S = subjects.GENERATE, subjects.CANCEL, subjects.STATUS
    cases: list[dict] = []
    # Every field of generate, every wrong value, in JSON and in msgpack.
    for field in FIELDS:
        for value in MAX_NEW if field == "max_new_tokens" else WRONG:
            body = {**BASE, field: value}
            if field == "prompt":
                body.pop("input_ids")
            refuse = _wrong_type(field, value)
            cases.append({**_json(G, body, f"{field}={value!r:.40}"), "field": (field, value), "refuse": refuse})
            cases.append({**_mp(G, body, f"msgpack {field}={value!r:.40}"), "field": (field, value),
                          "refuse": refuse and _msgpack_int(value)})
    # Random bodies: a few random fields with random values of any type.
    for i in range(40):
        body = {f: rng.choice(WRONG + [3, 0.5, "x", [1, 2]]) for f in rng.sample(FIELDS, rng.randint(0, 5))}
        body["max_new_tokens"] = rng.choice([1, 2, 3] + MAX_NEW)
        cases.append(_json(G, body, f"random {i}"))
    # Both, neither, empty prompt fields.
    for body in ({"prompt": "hi", "input_ids": [1]}, {}, {"prompt": None, "input_ids": None}, {"prompt": ""},
                 {"input_ids": []}, {"max_new_tokens": 2}, {"prompt": "hi", "input_ids": None, "max_new_tokens": 2},
                 {"prompt": None, "input_ids": [1, 2], "max_new_tokens": 2}, {"prompt": ["hi"]}, {"input_ids": "1 2 3"}):
        cases.append(_json(G, body, f"prompt fields {body}"))
    # Bodies that are not objects, or not JSON or msgpack at all.
    for data in (b"", b"null", b"[]", b"1", b'"x"', b"true", b"{", b'{"prompt": "a"', b"}{", b"\x00" * 10,
                 b"\xff\xfe\xfd", bytes(range(256)), b'{"prompt": "a"} trailing', b"\xef\xbb\xbf{}",
                 '{"prompt": "hi"}'.encode("utf-16"), b'{"prompt": NaN}', b'{"input_ids": [1e999]}',
                 b'{"input_ids": [1,2,3], "input_ids": "dup"}', b"\xc1", b"\x91\xc1", b"\xd4\x01\x00", b"\xde\xff\xff"):
        for subject in (G, C, S):
            cases.append(_case(subject, data, None, f"raw {data[:20]!r}"))
    # Content-Type headers that lie.
    for subject in (G, C, S):
        cases.append(_case(subject, json.dumps(BASE).encode(), MSGPACK, "json sent as msgpack"))
        cases.append(_case(subject, msgpack.packb(BASE), JSON, "msgpack sent as json"))
        cases.append(_case(subject, json.dumps(BASE).encode(), "text/plain; charset=utf-32", "unknown type"))
    # Invalid text: bytes that are not UTF-8, lone surrogates, in every text field.
    for field in ("prompt", "request_id", "stop", "kv_quant"):
        for raw in (b'"\xff\xfe"', b'"\\ud800"', b'"a\\udfffb"', b'"\\udc00\\ud800"', b'"\xed\xa0\x80"', b'"\xc0\xaf"'):
            value = b"[" + raw + b"]" if field == "stop" else raw
            rest = b'"max_new_tokens": 2' + (b"" if field == "prompt" else b', "input_ids": [5]')
            cases.append(_case(G, b'{"' + field.encode() + b'": ' + value + b", " + rest + b"}", None,
                               f"text {field}={raw!r}"))
        cases.append(_case(G, b"\x82\xa6prompt\xc4\x02\xff\xfe\xaemax_new_tokens\x02", MSGPACK, "msgpack bin prompt"))
        cases.append(_case(G, b"\x81\xa6prompt\xa2\xff\xfe", MSGPACK, "msgpack invalid utf-8"))
    # Nesting depth, in each subject and in each place.
    for depth in (10, 100, 1000, 10_000, 100_000):
        for kind in ("list", "dict"):
            for subject in (G, C, S):
                cases.append(_case(subject, _nest(depth, kind=kind), None, f"{kind} depth {depth}"))
            inner = _nest(depth, kind=kind)
            cases.append(_case(G, b'{"input_ids": ' + inner + b', "max_new_tokens": 2}', None, f"input_ids {kind} {depth}"))
            cases.append(_case(G, b'{"input_ids": [5], "attention": ' + inner + b"}", None, f"attention {kind} {depth}"))
            cases.append(_case(C, b'{"request_id": ' + inner + b"}", None, f"cancel id {kind} {depth}"))
    # Sizes.
    for n in (0, 1, 16, 17, 1000):
        cases.append(_json(G, {**BASE, "stop": ["s"] * n}, f"{n} stop strings"))
    for n in (64, 65, 10_000):
        cases.append(_json(G, {**BASE, "stop_token_ids": [1] * n}, f"{n} stop ids"))
    for n in (1, 128, 129, 10_000):
        cases.append(_json(G, {**BASE, "request_id": "r" * n}, f"request_id of {n}"))
        cases.append(_json(C, {"request_id": "r" * n}, f"cancel id of {n}"))
    for value in (" ", "a b", "../x", "id\n", "é", "a*", ">", "x" * 64 + ".y"):
        cases.append(_json(G, {**BASE, "request_id": value}, f"request_id {value!r}"))
        cases.append(_json(C, {"request_id": value}, f"cancel id {value!r}"))
    for n in (20_001, 50_000):
        cases.append(_json(G, {"input_ids": [7] * n, "max_new_tokens": 2}, f"{n} ids"))
    for n in (300, 258, 257):
        cases.append(_json(G, {"input_ids": [n], "max_new_tokens": 2}, f"token id {n}"))
    # Cancel and status with bodies of every shape.
    for value in WRONG:
        cases.append(_json(C, {"request_id": value}, f"cancel {value!r:.40}"))
        cases.append(_mp(C, {"request_id": value}, f"msgpack cancel {value!r:.40}"))
        cases.append(_json(S, {"x": value}, f"status {value!r:.40}"))
    for body in ({}, {"request_id": "nobody", "extra": 1}, {"id": "x"}, [{"request_id": "x"}]):
        cases.append(_json(C, body, f"cancel {body}"))
        cases.append(_json(S, body, f"status {body}"))
    # A few valid requests among them: they run, and are answered like the rest.
    for i in range(5):
        cases.append(_json(G, {"input_ids": [rng.randrange(3, 250) for _ in range(rng.randint(1, 40))],
                               "max_new_tokens": rng.randint(1, 4)}, f"valid {i}"))
        cases.append(_json(G, {"prompt": "héllo ✓ " * rng.randint(1, 20), "max_new_tokens": 2,
                               "temperature": 0.7, "seed": i}, f"valid prompt {i}"))
    rng.shuffle(cases)

    huge = [
        _json(G, {"input_ids": ["1"] * 1_000_000, "max_new_tokens": 2}, "1M string ids"),
        _json(G, {"input_ids": [1] * 1_000_000, "max_new_tokens": 2}, "1M valid ids (over the limit)"),
        _json(G, {"input_ids": [1.0] * 1_000_000, "max_new_tokens": 2}, "1M float ids"),
        _json(G, {"input_ids": [[1]] * 500_000, "max_new_tokens": 2}, "500K nested ids"),
        # A prompt is tokenized before any length limit applies: issue 11's 5 MB prompt takes 5-7 s
        # on a 2-core machine (inside ANSWER_S, too close to it for CI: 2 MB took 5 s on a loaded
        # one); 1 MB here (docs/RELIABILITY.md).
        _json(G, {"prompt": "a" * 1_000_000, "max_new_tokens": 2}, "1 MB prompt"),
        _json(G, {"prompt": "é" * 500_000, "max_new_tokens": 2}, "1 MB non-ASCII prompt"),
        _json(G, {**BASE, "stop": ["s" * 1_000_000]}, "1 MB stop string"),
        _mp(G, {"input_ids": list(range(1_000_000)), "max_new_tokens": 2}, "1M ids msgpack"),
        _json(C, {"request_id": "r" * 5_000_000}, "5 MB cancel id"),
        _json(S, {"x": "s" * 5_000_000}, "5 MB status body"),
        _case(G, b"[" * 4_000_000 + b"]" * 4_000_000, None, "4M-deep list"),
        _case(C, b"[" * 4_000_000 + b"]" * 4_000_000, None, "4M-deep list on cancel"),
    ]
    return cases, huge


def _decode(msg) -> object:
    ctype = ((msg.headers or {}).get("Content-Type") or "").lower()
    if "msgpack" in ctype:
        return msgpack.unpackb(msg.data, raw=False)
    return json.loads(msg.data)


def _check_reply(case: dict, body: object) -> str:
    """The reply's kind; raises AssertionError when it is neither its subject's reply nor coded."""
    assert isinstance(body, dict), f"{case['name']}: reply is not an object: {body!r:.200}"
    if "error" in body:
        code = body["error"].get("code") if isinstance(body["error"], dict) else None
        assert code in CODES, f"{case['name']}: an error without a known code: {body!r:.300}"
        return code
    subject = case["subject"]
    if subject == subjects.STATUS:
        assert isinstance(body.get("workers"), list), f"{case['name']}: not a status reply: {body!r:.300}"
    elif subject == subjects.CANCEL:
        assert isinstance(body.get("cancelled"), bool), f"{case['name']}: not a cancel reply: {body!r:.300}"
    else:
        kind = body.get("type")
        assert isinstance(body.get("output_ids"), list) or kind in ("progress", "token", "done"), \
            f"{case['name']}: not a generate reply: {body!r:.300}"
    return "ok"


async def _send(nc, case: dict) -> tuple[str, float]:
    headers = {"Content-Type": case["content_type"]} if case["content_type"] else None
    t0 = time.monotonic()
    try:
        msg = await nc.request(case["subject"], case["data"], timeout=ANSWER_S, headers=headers)
    except nats.errors.TimeoutError:
        raise AssertionError(f"{case['name']} on {case['subject']}: no reply within {ANSWER_S} s") from None
    except nats.errors.NoRespondersError:
        raise AssertionError(f"{case['name']} on {case['subject']}: no responders (a service died?)") from None
    elapsed = time.monotonic() - t0
    try:
        body = _decode(msg)
    except Exception as exc:
        raise AssertionError(f"{case['name']}: undecodable reply {msg.data[:200]!r}: {exc}") from None
    kind = _check_reply(case, body)
    if case.get("refuse") and kind != ErrorCode.INVALID_REQUEST.value:
        kind = "coerced"  # a value of the wrong type accepted: checked against KNOWN_COERCIONS
    return kind, elapsed


@pytest.fixture(scope="module")
def fuzz_stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("fuzz"), workers=1, services=("kvstore", "fusion", "scheduler"), env=ENV)
    try:
        asyncio.run(stack.wait_ready(1))
        yield stack
    finally:
        stack.stop()


async def _identity(stack: Stack, nc) -> tuple:
    status = await stack.status(nc)
    return (sorted((s["service"], s["instance"]) for s in status["services"]),
            sorted(w["worker_id"] for w in status["workers"]))


async def test_every_public_message_is_answered_with_a_reply_or_a_code(fuzz_stack):
    stack = fuzz_stack
    cases, huge = _cases(random.Random(SEED))
    assert len(cases) + len(huge) >= MIN_CASES, len(cases) + len(huge)
    nc = await nats.connect(stack.servers.nats_url)
    try:
        before = await _identity(stack, nc)
        outcomes: dict[str, int] = {}
        times: list[tuple[float, str]] = []
        gate = asyncio.Semaphore(CONCURRENCY)

        coerced: set[str] = set()
        internal: set[str] = set()

        async def one(case):
            async with gate:
                kind, elapsed = await _send(nc, case)
            if kind == "coerced":
                coerced.add(("msgpack " if case["content_type"] == MSGPACK else "") + f"{case['field'][0]}="
                            f"{case['field'][1]!r}")
            if kind == ErrorCode.INTERNAL.value:
                internal.add(case["name"])
            outcomes[kind] = outcomes.get(kind, 0) + 1
            times.append((elapsed, case["name"]))

        started = time.monotonic()
        await asyncio.gather(*(one(c) for c in cases))
        # The largest bodies one at a time, each beside a status request: both answered in time
        # (parsing them must not stall the scheduler's event loop).
        for case in huge:
            probe = {**_case(subjects.STATUS, b"{}", JSON), "name": f"status beside {case['name']}"}
            (kind, elapsed), (_, probe_s) = await asyncio.gather(_send(nc, case), _send(nc, probe))
            outcomes[kind] = outcomes.get(kind, 0) + 1
            times += [(elapsed, case["name"]), (probe_s, probe["name"])]
        slowest = ", ".join(f"{name} {t:.2f} s" for t, name in sorted(times, reverse=True)[:5])
        print(f"\n{len(cases) + len(huge)} cases in {time.monotonic() - started:.1f} s; replies {outcomes}; "
              f"slowest: {slowest}")

        # Wrong types are refused, but for the known gaps (pinned: a fix makes this fail, and the
        # set and docs/RELIABILITY.md shrink with it).
        assert coerced == KNOWN_COERCIONS, f"accepted values of a wrong type: {sorted(coerced)}"
        assert internal == KNOWN_INTERNAL, f"malformed input answered `internal`: {sorted(internal)}"

        # No process died; nothing restarted (the same instances and workers as before).
        dead = {label: p.returncode for label, p in stack.procs.items() if p.poll() is not None}
        assert not dead, f"processes died: {dead}\n{stack.logs()}"
        assert await _identity(stack, nc) == before
        # A normal request works after.
        reply = await stack.generate({"prompt": "after the fuzz", "max_new_tokens": 4}, timeout=60)
        assert len(reply.get("output_ids", [])) == 4, reply
        reply = await stack.generate({"input_ids": [5, 6, 7, 8], "max_new_tokens": 3}, timeout=60)
        assert len(reply.get("output_ids", [])) == 3, reply
        # Most of the cases are refused as invalid: the fuzz reached validation, not just the parser.
        assert outcomes.get(ErrorCode.INVALID_REQUEST.value, 0) >= len(cases) // 2, outcomes
    finally:
        await nc.close()
