#!/usr/bin/env python3
"""Captures wire test vectors from real Celery 5.7 for Celerity's Rust tests.

Run with the pinned venv against the local Redis and RabbitMQ (see README.md)::

    "$(scripts/celery-venv.sh | tail -n1)" broker/tests/vectors/capture.py

For each case, Celery publishes a task through its normal producer path (``app.send_task`` or
``signature.apply_async``, default settings: JSON serializer, protocol 2, UTC) and the script reads
back the exact bytes that reached the broker:

* ``redis/<case>.json``: every key the publish created under a unique ``global_keyprefix`` (the list
  holding the kombu envelope, the binding sets, any backend key), and each list element verbatim.
* ``amqp/<case>.json``: each message fetched with py-amqp's ``basic_get`` from a unique queue:
  exchange, routing key, every basic property, the application headers (JSON, plus the AMQP field
  type of every value), the raw property bytes and the body.
* ``backend/<case>.json``: result documents written by Celery's Redis backend API
  (``mark_as_done``, ``mark_as_failure``, …): the stored value, the PUBLISHed payload and the TTL.

Every message also carries ``celery_view``: what Celery's worker-side decoding (``accept.py``)
understood of it at capture time. Everything the script creates is deleted before it exits.
"""

import argparse
import base64
import datetime
import inspect
import json
import os
import platform
import socket
import struct
import sys
import time
import uuid

import amqp
import celery
import kombu
import redis
from amqp.serialization import GenericContent
from billiard.einfo import ExceptionInfo
from celery import Celery, chain, chord, group, states
from celery.app.task import Context
from celery.utils.nodenames import anon_nodename

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import accept  # noqa: E402  (same directory)

REDIS_HOST, REDIS_PORT, REDIS_DB = "127.0.0.1", 6379, 0
REDIS_URL = f"redis://{REDIS_HOST}:{REDIS_PORT}/{REDIS_DB}"
AMQP_HOST, AMQP_USER, AMQP_PASSWORD, AMQP_VHOST = "127.0.0.1:5672", "guest", "guest", "/"
AMQP_URL = f"amqp://{AMQP_USER}:{AMQP_PASSWORD}@{AMQP_HOST}//"

# --------------------------------------------------------------------------------------------
# Keep the raw AMQP property bytes of every message py-amqp receives (to record field types).

_orig_load_properties = GenericContent._load_properties


def _load_properties_keeping_raw(self, class_id, buf, offset):
    self._celerity_raw_properties = bytes(buf[offset:])
    return _orig_load_properties(self, class_id, buf, offset)


GenericContent._load_properties = _load_properties_keeping_raw

_FIXED_SIZES = {"b": 1, "B": 1, "U": 2, "u": 2, "s": 2, "I": 4, "i": 4, "L": 8, "l": 8,
                "f": 4, "d": 8, "D": 5, "t": 1, "T": 8, "V": 0}


def _typed_item(buf, off):
    """AMQP field value at `off` -> (its type: letter | list for 'A' | dict for 'F', next offset)."""
    ftype = chr(buf[off])
    off += 1
    if ftype in ("S", "x"):
        (n,) = struct.unpack_from(">I", buf, off)
        return ftype, off + 4 + n
    if ftype == "F":
        return _typed_table(buf, off)
    if ftype == "A":
        (n,) = struct.unpack_from(">I", buf, off)
        off += 4
        end, items = off + n, []
        while off < end:
            t, off = _typed_item(buf, off)
            items.append(t)
        return items, off
    return ftype, off + _FIXED_SIZES[ftype]


def _typed_table(buf, off):
    (n,) = struct.unpack_from(">I", buf, off)
    off += 4
    end, out = off + n, {}
    while off < end:
        klen = buf[off]
        key = buf[off + 1:off + 1 + klen].decode("utf-8")
        out[key], off = _typed_item(buf, off + 1 + klen)
    return out, off


def header_types(raw_props):
    """The AMQP type letter of every application header value, from raw basic properties."""
    (flags,) = struct.unpack_from(">H", raw_props, 0)
    off = 2
    for bit in (0x8000, 0x4000):  # content_type, content_encoding (short strings)
        if flags & bit:
            off += 1 + raw_props[off]
    if not flags & 0x2000:
        return None
    types, _ = _typed_table(raw_props, off)
    return types


# --------------------------------------------------------------------------------------------
# The app and the tasks.

def add(x, y):
    return x + y


def mul(x, y):
    return x * y


def xsum(numbers):
    return sum(numbers)


def echo(*args, **kwargs):
    return [args, kwargs]


def make_app(broker_url, prefix, default_queue=None, extended=False):
    app = Celery("proj", broker=broker_url, backend=REDIS_URL, set_as_current=False)
    conf = {"result_backend_transport_options": {"global_keyprefix": prefix}}
    if broker_url.startswith("redis"):
        conf["broker_transport_options"] = {"global_keyprefix": prefix}
    if default_queue:
        conf["task_default_queue"] = default_queue
    if extended:
        conf["result_extended"] = True
    app.conf.update(conf)
    tasks = {}
    for fun in (add, mul, xsum, echo):
        tasks[fun.__name__] = app.task(name=f"proj.tasks.{fun.__name__}", shared=False)(fun)
    app.finalize()
    return app, tasks


# --------------------------------------------------------------------------------------------
# Task message cases: (name, expected message count, function(app, t) that publishes).

UNICODE_ARGS = (
    "héllo ☃",
    "emoji 😀🎉 and 中文",
    {"nested": [1, [2, [3, None]], {"deep": {"pi": 3.14159, "half": 0.5, "neg": -2.5,
                                            "flag": True, "off": False, "nothing": None}}],
     "ключ": "значение", "empty_list": [], "empty_obj": {}},
    "ctl: tab\t nl\n quote\" backslash\\ bell\x07 del\x7f",
    [1.5, -7, 0, 2 ** 53],
)
UNICODE_KWARGS = {"name": "Zoë ☕", "tags": ["ä", "ß", "🚀"], "meta": {"n": None, "ok": True}}
FLOAT_ARGS = (1e-07, 1e16, 1e100, 0.1, 123456789.125, -2.5e-10, 1.0, -0.0, 1e15, 1.5e16, 1e-04,
              1e-05, 0.00012345, 1.2345678901234567e+19, 5e-324, 1.7976931348623157e+308,
              9007199254740993, -9223372036854775808, 18446744073709551615)


def case_args(app, t):
    """Positional arguments, sent by name."""
    return app.send_task("proj.tasks.add", args=(2, 3))


def case_kwargs(app, t):
    """Keyword arguments."""
    return t["add"].apply_async(kwargs={"x": 2, "y": 3})


def case_unicode_nested(app, t):
    """Non-ASCII text, emoji, control characters, nested JSON, null, floats, bools."""
    return t["echo"].apply_async(args=UNICODE_ARGS, kwargs=UNICODE_KWARGS)


def case_floats(app, t):
    """Numbers whose JSON spelling differs between languages (exponents, big ints)."""
    return t["echo"].apply_async(args=FLOAT_ARGS)


def case_countdown(app, t):
    """countdown=10: Celery turns it into an `eta` header (now + 10 s, UTC)."""
    return t["add"].apply_async((2, 3), countdown=10)


def case_eta_fixed(app, t):
    """An explicit aware `eta` datetime (deterministic header value)."""
    eta = datetime.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=datetime.timezone.utc)
    return t["add"].apply_async((2, 3), eta=eta)


def case_expires(app, t):
    """expires=60 (seconds): `expires` header (now + 60 s) and `expiration` property "60000"."""
    return t["add"].apply_async((2, 3), expires=60)


def case_priority(app, t):
    """priority=7."""
    return t["add"].apply_async((2, 3), priority=7)


def case_time_limits(app, t):
    """time_limit=10 (int) and soft_time_limit=5.5 (float): `timelimit` = [hard, soft]."""
    return t["add"].apply_async((2, 3), time_limit=10, soft_time_limit=5.5)


def case_chain(app, t):
    """A chain of three; only the first message is sent, `embed.chain` holds the rest reversed."""
    return chain(t["add"].s(2, 2), t["add"].s(4), t["mul"].s(8)).apply_async()


def case_group(app, t):
    """A group of three: one message per member with `group` and `group_index`."""
    return group(t["add"].s(1, 1), t["add"].s(2, 2), t["add"].s(3, 3)).apply_async()


def case_chord(app, t):
    """A chord: each header message has `group`, `group_index` and `embed.chord` = the body."""
    return chord([t["add"].s(1, 1), t["add"].s(2, 2)], t["xsum"].s()).apply_async()


def case_link(app, t):
    """Callbacks and errbacks (`link` / `link_error`) and a shadow name."""
    return t["add"].apply_async((2, 2), link=t["mul"].s(3), link_error=t["echo"].si("failed"),
                                shadow="add-shadowed")


TASK_CASES = [
    ("args", 1, case_args),
    ("kwargs", 1, case_kwargs),
    ("unicode_nested", 1, case_unicode_nested),
    ("floats", 1, case_floats),
    ("countdown", 1, case_countdown),
    ("eta_fixed", 1, case_eta_fixed),
    ("expires", 1, case_expires),
    ("priority", 1, case_priority),
    ("time_limits", 1, case_time_limits),
    ("chain", 1, case_chain),
    ("group", 3, case_group),
    ("chord", 2, case_chord),
    ("link", 1, case_link),
]

# --------------------------------------------------------------------------------------------
# Result backend cases: function(app, task_id) that writes one state through Celery's backend API.


def _raise(exc):
    """Raises and catches `exc`; returns it with its traceback text, as the worker formats it."""
    try:
        raise exc
    except Exception as caught:
        return caught, ExceptionInfo(sys.exc_info()).traceback


def worker_request(tid, name="proj.tasks.add", args=(2, 2), kwargs=None, **headers):
    """The request context the worker's tracer passes to the backend (headers + delivery + body)."""
    request = {
        "lang": "py", "task": name, "id": tid, "shadow": None, "eta": None, "expires": None,
        "group": None, "group_index": None, "retries": 0, "timelimit": [None, None],
        "root_id": tid, "parent_id": None, "argsrepr": repr(tuple(args)), "kwargsrepr": "{}",
        "origin": "gen4242@host1", "ignore_result": False, "replaced_task_nesting": 0,
        "stamped_headers": None, "stamps": {},
    }
    request.update(headers)
    request.update({
        "properties": {"correlation_id": tid, "reply_to": "8f1c2d3e-4a5b-3c6d-8e7f-90a1b2c3d4e5",
                       "delivery_mode": 2, "priority": 0},
        "reply_to": "8f1c2d3e-4a5b-3c6d-8e7f-90a1b2c3d4e5",
        "correlation_id": tid,
        "hostname": "celery@worker1",
        "delivery_info": {"exchange": "", "routing_key": "celery", "priority": 0,
                          "redelivered": False},
        "callbacks": None, "errbacks": None, "chain": None, "chord": None,
    })
    return Context(request, args=list(args), called_directly=False, kwargs=kwargs or {},
                   is_eager=False)


def backend_success_int(app, tid):
    """A SUCCESS with an int, stored as the worker's tracer stores it (mark_as_done with the request)."""
    app.backend.mark_as_done(tid, 4, worker_request(tid))


def backend_success_nested_unicode(app, tid):
    """A SUCCESS with a nested dict holding non-ASCII text (worker path)."""
    result = {"greeting": "héllo ☃", "emoji": "😀", "list": [1, 2.5, None, True],
              "nested": {"ключ": ["значение", {"deep": False}]}}
    app.backend.mark_as_done(tid, result, worker_request(tid, name="proj.tasks.echo"))


def backend_success_no_request(app, tid):
    """store_result called directly, without a request: Celery writes "children": null."""
    app.backend.store_result(tid, 4, states.SUCCESS)


def backend_failure_value_error(app, tid):
    """A FAILURE of ValueError("bad value") with its real traceback (worker path)."""
    exc, tb = _raise(ValueError("bad value"))
    app.backend.mark_as_failure(tid, exc, tb, request=worker_request(tid))


def backend_revoked(app, tid):
    """REVOKED as the worker's `revoke` control command stores it (no request: "children": null)."""
    app.backend.mark_as_revoked(tid, reason="revoked", store_result=True)


def backend_revoked_expired(app, tid):
    """REVOKED as the worker stores it when a message arrives after `expires` (with the request)."""
    app.backend.mark_as_revoked(tid, "expired", request=worker_request(tid))


def backend_retry(app, tid):
    """RETRY with the exception that caused it and its traceback (worker path)."""
    exc, tb = _raise(ConnectionError("service unavailable, retrying"))
    app.backend.mark_as_retry(tid, exc, tb, request=worker_request(tid))


def backend_started(app, tid):
    """STARTED, as the tracer stores it with task_track_started."""
    app.backend.store_result(tid, {"pid": 4242, "hostname": "celery@worker1"}, states.STARTED,
                             request=worker_request(tid))


def backend_success_in_group(app, tid):
    """A SUCCESS of a group member with a parent: the meta gets group_id and parent_id."""
    request = worker_request(tid, group="0f9e8d7c-6b5a-4c3d-8e2f-1a0b9c8d7e6f", group_index=1,
                             parent_id="5b4a3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d",
                             root_id="5b4a3c2d-1e0f-4a9b-8c7d-6e5f4a3b2c1d")
    app.backend.mark_as_done(tid, 8, request)


def backend_success_extended(app, tid):
    """A SUCCESS with result_extended=True: name, args, kwargs, worker, retries, queue."""
    request = worker_request(tid, args=(2, 2), kwargs={"z": "ü"}, retries=1)
    app.backend.mark_as_done(tid, 4, request)


BACKEND_CASES = [
    ("success_int", backend_success_int, False),
    ("success_nested_unicode", backend_success_nested_unicode, False),
    ("success_no_request", backend_success_no_request, False),
    ("failure_value_error", backend_failure_value_error, False),
    ("revoked", backend_revoked, False),
    ("revoked_expired", backend_revoked_expired, False),
    ("retry", backend_retry, False),
    ("started", backend_started, False),
    ("success_in_group", backend_success_in_group, False),
    ("success_extended", backend_success_extended, True),
]

# --------------------------------------------------------------------------------------------
# Helpers.


def text_or_base64(raw, field):
    """{field: text} when `raw` is UTF-8, else {field + "_base64": ...}."""
    try:
        return {field: raw.decode("utf-8")}
    except UnicodeDecodeError:
        return {field + "_base64": base64.b64encode(raw).decode("ascii")}


def celery_view(decoder, item):
    view = decoder.decode(item)
    if not view.get("ok"):
        raise RuntimeError(f"Celery did not accept its own message: {view}")
    view.pop("revoked_on_receipt", None)  # depends on when it is decoded, not on the message
    return json.loads(kombu.utils.json.dumps(view))


def common_fields(case, fn):
    return {
        "case": case,
        "description": inspect.getdoc(fn),
        "python": inspect.getsource(fn),
    }


def redis_client():
    return redis.Redis(host=REDIS_HOST, port=REDIS_PORT, db=REDIS_DB)


def dump_keys(r, prefix):
    """Every key under `prefix`: {relative name: {type, pttl_ms, value}}; lists oldest first."""
    out = {}
    for key in sorted(r.scan_iter(match=prefix.encode() + b"*")):
        kind = r.type(key).decode()
        entry = {"type": kind, "pttl_ms": r.pttl(key)}
        if kind == "list":
            entry["value"] = [v.decode("utf-8") for v in reversed(r.lrange(key, 0, -1))]
        elif kind == "set":
            entry["value"] = sorted(v.decode("utf-8") for v in r.smembers(key))
        elif kind == "string":
            entry["value"] = r.get(key).decode("utf-8")
        elif kind == "zset":
            entry["value"] = [[m.decode("utf-8"), s] for m, s in r.zrange(key, 0, -1, withscores=True)]
        elif kind == "hash":
            entry["value"] = {k.decode(): v.decode() for k, v in r.hgetall(key).items()}
        out[key.decode("utf-8")[len(prefix):]] = entry
    return out


def delete_prefix(r, prefix):
    keys = list(r.scan_iter(match=prefix.encode() + b"*"))
    if keys:
        r.delete(*keys)


def write_json(path, doc):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=2, ensure_ascii=False)
        f.write("\n")


# --------------------------------------------------------------------------------------------
# Capture.


def capture_redis(run, meta, decoder, out_dir, r):
    for case, count, fn in TASK_CASES:
        prefix = f"celerity-vectors:{run}:redis-{case}:"
        app, tasks = make_app(REDIS_URL, prefix)
        try:
            now_before = app.now().isoformat()
            result = fn(app, tasks)
            now_after = app.now().isoformat()
            time.sleep(0.05)
            keys = dump_keys(r, prefix)
            messages = []
            for name, entry in keys.items():
                if entry["type"] != "list":
                    continue
                for envelope in entry["value"]:
                    parsed = json.loads(envelope)
                    body = base64.b64decode(parsed["body"])
                    msg = {"list_key": name, "envelope": envelope}
                    msg.update(text_or_base64(body, "body"))
                    msg["celery_view"] = celery_view(decoder, {"redis_envelope": envelope})
                    messages.append(msg)
            if len(messages) != count:
                raise RuntimeError(f"redis/{case}: expected {count} messages, got {len(messages)}")
            doc = common_fields(case, fn)
            doc.update(meta)
            doc.update({
                "transport": "redis",
                "broker_url": REDIS_URL,
                "global_keyprefix": prefix,
                "now_before": now_before,
                "now_after": now_after,
                "reply_to": app.thread_oid,
                "origin": anon_nodename(),
                "result_id": result.id,
                "keys": keys,
                "messages": messages,
            })
            write_json(os.path.join(out_dir, "redis", f"{case}.json"), doc)
            print(f"redis/{case}: {len(messages)} message(s), {len(keys)} key(s)")
        finally:
            app.close()
            delete_prefix(r, prefix)


def amqp_connection():
    conn = amqp.Connection(host=AMQP_HOST, userid=AMQP_USER, password=AMQP_PASSWORD,
                           virtual_host=AMQP_VHOST)
    conn.connect()
    return conn


def fetch_amqp(channel, queue, count, timeout=10.0):
    got, deadline = [], time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        msg = channel.basic_get(queue, no_ack=True)
        if msg is None:
            time.sleep(0.02)
            continue
        got.append(msg)
    time.sleep(0.1)
    extra = channel.basic_get(queue, no_ack=True)
    if extra is not None:
        got.append(extra)
    return got


def amqp_record(msg):
    props = dict(msg.properties)
    headers = props.pop("application_headers", None)
    raw = msg._celerity_raw_properties
    rec = {
        "exchange": msg.delivery_info["exchange"],
        "routing_key": msg.delivery_info["routing_key"],
        "redelivered": msg.delivery_info["redelivered"],
        "properties": props,
        "headers": headers,
        "header_types": header_types(raw),
        "properties_raw_base64": base64.b64encode(raw).decode("ascii"),
    }
    rec.update(text_or_base64(msg.body, "body"))
    return rec


def capture_amqp(run, meta, decoder, out_dir, r):
    reader = amqp_connection()
    channel = reader.channel()
    channel.auto_decode = False  # keep the body as the exact bytes received
    try:
        for case, count, fn in TASK_CASES:
            queue = f"celerity-vectors.{run}.{case}"
            prefix = f"celerity-vectors:{run}:amqp-{case}:"
            app, tasks = make_app(AMQP_URL, prefix, default_queue=queue)
            try:
                now_before = app.now().isoformat()
                result = fn(app, tasks)
                now_after = app.now().isoformat()
                raw_msgs = fetch_amqp(channel, queue, count)
                if len(raw_msgs) != count:
                    raise RuntimeError(f"amqp/{case}: expected {count} messages, got {len(raw_msgs)}")
                messages = []
                for m in raw_msgs:
                    rec = amqp_record(m)
                    item = {k: rec[k] for k in ("properties", "headers", "exchange", "routing_key")}
                    item.update({k: rec[k] for k in ("body", "body_base64") if k in rec})
                    rec["celery_view"] = celery_view(decoder, item)
                    messages.append(rec)
                doc = common_fields(case, fn)
                doc.update(meta)
                doc.update({
                    "transport": "amqp",
                    "broker_url": f"amqp://{AMQP_USER}:***@{AMQP_HOST}//",
                    "queue": queue,
                    "now_before": now_before,
                    "now_after": now_after,
                    "reply_to": app.thread_oid,
                    "origin": anon_nodename(),
                    "result_id": result.id,
                    "backend_keys": dump_keys(r, prefix),
                    "messages": messages,
                })
                write_json(os.path.join(out_dir, "amqp", f"{case}.json"), doc)
                print(f"amqp/{case}: {len(messages)} message(s)")
            finally:
                app.close()
                delete_prefix(r, prefix)
                channel.queue_delete(queue)
                channel.exchange_delete(queue)
    finally:
        reader.close()


def capture_backend(run, meta, out_dir, r):
    for case, fn, extended in BACKEND_CASES:
        prefix = f"celerity-vectors:{run}:backend-{case}:"
        app, _ = make_app(REDIS_URL, prefix, extended=extended)
        tid = str(uuid.uuid4())
        key = f"{prefix}celery-task-meta-{tid}"
        sub = r.pubsub()
        try:
            sub.subscribe(key)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                m = sub.get_message(timeout=0.5)
                if m and m["type"] == "subscribe":
                    break
            now_before = app.now().isoformat()
            fn(app, tid)
            now_after = app.now().isoformat()
            published = None
            deadline = time.monotonic() + 5
            while published is None and time.monotonic() < deadline:
                m = sub.get_message(timeout=0.5)
                if m and m["type"] == "message":
                    published = m["data"]
            stored = r.get(key)
            if stored is None or published is None:
                raise RuntimeError(f"backend/{case}: nothing stored or published")
            got = app.backend.get_task_meta(tid)
            view = {
                "status": got["status"],
                "result_type": type(got["result"]).__name__,
                "result_repr": repr(got["result"]),
                "traceback": got.get("traceback"),
                "date_done": str(got.get("date_done")) if got.get("date_done") else None,
            }
            doc = common_fields(case, fn)
            doc.update(meta)
            doc.update({
                "backend_url": REDIS_URL,
                "result_extended": extended,
                "global_keyprefix": prefix,
                "task_id": tid,
                "key": f"celery-task-meta-{tid}",
                "channel": key,
                "now_before": now_before,
                "now_after": now_after,
                "ttl_seconds": r.ttl(key),
                "result_expires_seconds": app.backend.expires,
            })
            doc.update(text_or_base64(stored, "stored"))
            doc.update(text_or_base64(published, "published"))
            doc["meta"] = json.loads(stored)
            doc["celery_view"] = view
            write_json(os.path.join(out_dir, "backend", f"{case}.json"), doc)
            print(f"backend/{case}: {doc['meta']['status']}")
        finally:
            sub.close()
            app.close()
            delete_prefix(r, prefix)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Capture Celery wire vectors.")
    parser.add_argument("--out", default=HERE, help="output directory (default: this directory)")
    parser.add_argument("--only", choices=["redis", "amqp", "backend"], action="append",
                        help="capture only these groups (repeatable)")
    opts = parser.parse_args(argv)
    groups = opts.only or ["redis", "amqp", "backend"]
    run = uuid.uuid4().hex[:12]
    meta = {
        "captured_at": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "run_id": run,
        "celery_version": celery.__version__,
        "kombu_version": kombu.__version__,
        "amqp_version": amqp.__version__,
        "redis_py_version": redis.__version__,
        "python_version": platform.python_version(),
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
    }
    decoder = accept.Decoder()
    r = redis_client()
    try:
        if "redis" in groups:
            capture_redis(run, meta, decoder, opts.out, r)
        if "amqp" in groups:
            capture_amqp(run, meta, decoder, opts.out, r)
        if "backend" in groups:
            capture_backend(run, meta, opts.out, r)
    finally:
        delete_prefix(r, f"celerity-vectors:{run}:")
        r.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
