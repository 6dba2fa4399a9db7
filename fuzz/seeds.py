#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into fuzz/corpus/<target>/seed-*.

Real messages come from the Celery wire vectors (broker/tests/vectors: bytes Celery 5.7 put on
Redis and RabbitMQ); hostile ones are written here. Each file is named seed-<sha1 of its bytes>;
`cargo fuzz cmin` renames what it keeps to the bare sha1, so run cmin again after re-seeding (README,
"Fuzzing"). Run from the repository root: `python3 fuzz/seeds.py`. The input layouts are those of
broker/src/fuzzing.rs.
"""

import base64
import hashlib
import json
import pathlib
import struct

ROOT = pathlib.Path(__file__).resolve().parent.parent
VECTORS = ROOT / "broker" / "tests" / "vectors"
CORPUS = ROOT / "fuzz" / "corpus"
MAX_SIZE = 64 * 1024


def put(target, data):
    if isinstance(data, str):
        data = data.encode()
    if len(data) > MAX_SIZE:
        raise SystemExit(f"{target}: seed of {len(data)} bytes is over 64 KiB")
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / ("seed-" + hashlib.sha1(data).hexdigest())).write_bytes(data)


def vectors(transport):
    for path in sorted((VECTORS / transport).glob("*.json")):
        yield from json.loads(path.read_text())["messages"]


def task_seeds():
    for m in vectors("amqp"):
        put("task_message", json.dumps(m["headers"]).encode() + b"\0" + m["body"].encode())
    headers = {"lang": "py", "task": "demo.add", "id": "6f1c0c5e-1d5b-4b8e-9f0e-2a0a7c1e9d11"}
    h = json.dumps(headers).encode() + b"\0"
    body = b'[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'
    put("task_message", body)  # no headers: protocol v1 path
    put("task_message", b'{"task": "demo.add", "id": "x", "args": [1], "kwargs": {}, "eta": "2030-01-01T00:00:00"}')
    for odd in [
        {"eta": "9999-12-31T23:59:59.999999+00:00"},
        {"eta": "not a time"},
        {"expires": 1e308},
        {"timelimit": [1e19, -1]},
        {"timelimit": ["10", None]},
        {"retries": -1},
        {"retries": 1e300},
        {"group_index": 2**64},
        {"replaced_task_nesting": 4294967296},
        {"compression": "zlib"},
        {"task": "", "id": ""},
        {"task": 5},
        {"stamps": [1, 2], "stamped_headers": {"a": 1}},
        {"argsrepr": "\ud800", "kwargsrepr": None},
    ]:
        put("task_message", json.dumps({**headers, **odd}).encode() + b"\0" + body)
    for b in [
        b"", b"[", b"null", b"[]", b"[1, 2, 3]", b"[[], {}, []]", b"[null, null, null]",
        b'[[], {}, {"chain": {"task": "t"}}]',
        b'[[], {}, {"chain": [{"args": []}]}]',
        b'[[], {}, {"chord": {"task": "t", "args": "x"}}]',
        b'[[], {}, {"callbacks": [{"task": "t", "options": {"link": [{"task": "u"}]}}]}]',
        b"[[" + b"[" * 200 + b"]" * 200 + b"], {}, null]",
        b'[[1e400, -0.0, 18446744073709551616, "\\ud800"], {"k": NaN}, null]',
        b"[[\xff\xfe], {}, null]",
    ]:
        put("task_message", h + b)


def envelope_seeds():
    for m in vectors("redis"):
        env = m["envelope"]
        put("redis_envelope", env)
        put("redis_envelope", json.dumps([json.loads(env), "", "celery"]))
    for e in [
        b"", b"[]", b"null", b'{"body": null}',
        b'{"body": "aGk", "properties": {"body_encoding": "base64", "priority": "7", "delivery_info": {"redelivered": true}}}',
        b'{"body": "!!", "properties": {"body_encoding": "base64"}}',
        b'{"body": [1, 2], "properties": {}}',
        b'{"body": "x", "properties": {"body_encoding": "rot13"}}',
        b'{"body": "x", "properties": {"delivery_mode": 1e300, "priority": -1e300, "expiration": 5e-324}}',
        b'{"body": "x", "properties": {"delivery_mode": "2"}, "headers": []}',
        b'{"body": "x", "content-type": 1}',
        b'[{"headers": {}, "properties": {"priority": "9", "delivery_info": {}}}, 1, null]',
        b'[{"headers": {}, "properties": {"priority": 1e19}}, "ex", "rk", "extra"]',
    ]:
        put("redis_envelope", e)


def amqp_short(s):
    s = s.encode()
    return bytes([len(s)]) + s


def amqp_table(items):
    raw = b"".join(amqp_short(k) + v for k, v in items)
    return struct.pack(">I", len(raw)) + raw


def amqp_seeds():
    for m in vectors("amqp"):
        put("amqp_properties", base64.b64decode(m["properties_raw_base64"]) + m["body"].encode())
    ct = amqp_short("application/json") + amqp_short("utf-8")
    flags = struct.pack(">H", 0xE000)  # content type, encoding, headers
    body = b'[[2, 3], {}, {"callbacks": null, "errbacks": null, "chain": null, "chord": null}]'

    def task(extra):
        base = [("task", b"S" + struct.pack(">I", 8) + b"demo.add"), ("id", b"S" + struct.pack(">I", 1) + b"x")]
        return flags + ct + amqp_table(base + extra) + body

    put("amqp_properties", task([("dec", b"D\x02\xff\xff\xff\xff"), ("ts", b"T" + struct.pack(">Q", 2**64 - 1))]))
    put("amqp_properties", task([("f", b"f" + struct.pack(">f", float("nan"))), ("d", b"d" + struct.pack(">d", float("inf")))]))
    put("amqp_properties", task([("b", b"x" + struct.pack(">I", 3) + b"\xff\xfe\x00"), ("v", b"V"), ("s", b"s\x00\x05")]))
    put("amqp_properties", task([("timelimit", b"A" + struct.pack(">I", 18) + b"d" + struct.pack(">d", 1e19) + b"l" + struct.pack(">q", -1))]))
    put("amqp_properties", task([("eta", b"S" + struct.pack(">I", 4) + b"9999")]))
    deep = b"t\x01"
    for i in range(200):
        key = b"\x01a"
        if i % 2:
            deep = b"A" + struct.pack(">I", len(deep)) + deep
        else:
            deep = b"F" + struct.pack(">I", len(key + deep)) + key + deep
    put("amqp_properties", task([("deep", deep)]))
    put("amqp_properties", b"\xff\xff")
    put("amqp_properties", flags + ct + struct.pack(">I", 2**32 - 1))
    put("amqp_properties", flags + amqp_short("text/plain") + amqp_short("") + amqp_table([]) + b"pickled")


def control_seeds():
    def req(method, arguments=None, **rest):
        body = {"method": method, "arguments": arguments or {}, "destination": None, "pattern": None, "matcher": None}
        body.update(rest)
        return json.dumps(body)

    reply = {"exchange": "reply.celery.pidbox", "routing_key": "8f4b"}
    for b in [
        req("revoke", {"task_id": "t1", "terminate": True, "signal": "SIGTERM"}),
        req("ping", ticket="t-1", reply_to=reply, destination=["celerity@host-1"]),
        req("ping", pattern="celerity-*@h[0-9]", matcher="glob"),
        req("ping", pattern="[!a-", matcher="glob"),
        req("ping", pattern="*" * 2000 + "x", matcher="glob"),
        req("ping", pattern="*a" * 300 + "!", matcher="glob"),
        req("ping", pattern="a", matcher="pcre"),
        req("rate_limit", {"task_name": "demo.add", "rate_limit": "1e-17/h"}),
        req("pool_grow", {"n": 1e300}),
        req("shutdown", destination="celerity@host-1"),
        req("ping", ticket=5, reply_to=[1]),
        '{"method": "", "arguments": []}', '{"arguments": 1}', "[]", "null", "", "{",
        '{"type": "worker-heartbeat", "hostname": "w@h", "timestamp": 1.5, "clock": 3}',
        '[{"type": "task-succeeded", "uuid": "x"}, 1, null]',
    ]:
        put("control_request", b)


if __name__ == "__main__":
    task_seeds()
    envelope_seeds()
    amqp_seeds()
    control_seeds()
