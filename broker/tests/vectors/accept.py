#!/usr/bin/env python3
"""Asks real Celery 5.7 whether it accepts task messages, and prints what it understood.

Used by Celerity's Rust tests to prove that messages written by our encoder are messages a Python
Celery worker would take. Run it with the venv from ``scripts/celery-venv.sh``.

Input (stdin): a JSON list. Each item is one message, in one of two forms:

* AMQP form, as our Rust side publishes it::

      {"properties": {"content_type": ..., "content_encoding": ..., "correlation_id": ...,
                      "reply_to": ..., "delivery_mode": 2, "priority": 0, "expiration": "60000"},
       "headers": {"lang": "py", "task": ..., "id": ..., ...},
       "body": "<body text>",            # or "body_base64": "<base64>" for non-text bodies
       "exchange": "", "routing_key": "celery", "redelivered": false}   # optional

  The properties and headers are first encoded as AMQP 0-9-1 basic properties with py-amqp and
  decoded back (what crossing RabbitMQ does to them), then wrapped in a ``kombu.transport.pyamqp``
  message, exactly like a worker consuming from RabbitMQ.

* Redis form: ``{"redis_envelope": "<the list element text>"}``. The envelope is parsed the way
  kombu's Redis transport does after BRPOP and turned into a message by kombu's virtual transport
  (which base64-decodes the body).

Each message then goes through the worker's own path: the consumer's protocol dispatch (``task``
header, else protocol 1 body), the task's execution strategy (``celery.worker.strategy.default``,
which builds a ``celery.worker.request.Request``: accept-content check, ETA/expires parsing, …), and
finally the body/embed decoding the pool does before running the task (``trace_task_ret``), with
every signature in ``embed`` rebuilt by ``celery.canvas.signature`` as the tracer does when it
sends callbacks and chain steps.

Output (stdout): one JSON object per input message, one per line, in input order::

    {"index": 0, "ok": true, "task": ..., "id": ..., "name": ..., "args": [...], "kwargs": {...},
     "eta": iso|null, "expires": iso|null, "retries": 0, "timelimit": [hard, soft], ...}
    {"index": 1, "ok": false, "error": "InvalidTaskError: ..."}

``revoked_on_receipt`` tells whether the worker would discard the message at once because its
``expires`` has passed (the message was still understood, so ``ok`` stays true).

Task names: ``proj.tasks.add``, ``mul``, ``xsum`` and ``echo`` are registered up front; any other
name is registered on the fly (pass ``--strict`` to reject unknown names as a worker would).

Exit status: 0 when the input was well formed (whatever Celery thought of the messages), 2 when the
input is not a JSON list of objects in one of the forms above.

Live mode: instead of reading stdin, take real messages off a real broker, the way a worker does::

    accept.py --fetch-redis redis://127.0.0.1:6379/0 --prefix <global_keyprefix> --queue Q \\
              [--count N]
    accept.py --fetch-amqp amqp://guest:guest@127.0.0.1:5672// --queue Q [--count N]

A ``kombu.Connection`` (for Redis with ``transport_options={'global_keyprefix': ...}``) declares
queue ``Q`` as a worker started with ``-Q Q`` does (the app's own missing-queue entity: a direct
exchange ``Q``, a durable queue ``Q`` bound with key ``Q``; RabbitMQ refuses a declaration that
differs from an existing one), then a ``kombu.Consumer`` with ``no_ack=False`` and an
``on_message`` callback, as the worker's task consumer, drains up to N messages (default 1),
stopping early once the queue stays quiet for ``--idle`` seconds. Each message goes through the
same worker path as above and is then acked (or rejected without requeue when Celery refused it,
as the worker does). Output: the same lines as the stdin mode, plus ``"settled": "ack"|"reject"``
and, on Redis, kombu's ack bookkeeping under the prefix: ``"unacked_before_settle"`` (the
delivery tag was in ``<prefix>unacked`` and ``<prefix>unacked_index`` while the message was being
handled) and ``"unacked_after_settle"`` (entries left in both after settling: 0 when kombu could
remove our message's records). Exit status 0; 1 if the broker could not be reached or the
bookkeeping is not empty once the connection is closed.
"""

import argparse
import base64
import json
import socket
import sys
from types import SimpleNamespace

import amqp
from amqp.serialization import decode_properties_basic
from celery import Celery, Task
from celery.app.task import Context
from celery.canvas import maybe_signature, signature
from celery.exceptions import InvalidTaskError
from celery.worker import state as worker_state
from celery.worker.request import Request
from kombu import Connection, Consumer
from kombu.exceptions import ContentDisallowed, DecodeError
from kombu.serialization import loads as loads_message
from kombu.serialization import prepare_accept_content
from kombu.transport.pyamqp import Message as AmqpMessage
from kombu.transport.virtual import Message as VirtualMessage
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

KNOWN_TASKS = ("proj.tasks.add", "proj.tasks.mul", "proj.tasks.xsum", "proj.tasks.echo")

_created = []


class CapturingRequest(Request):
    """The worker's Request, remembering each instance the strategy builds."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _created.append(self)


class CapturingTask(Task):
    Request = CapturingRequest


def _noop(*args, **kwargs):
    return None


class _Timer:
    def call_at(self, eta, fun, args=(), priority=0):
        return SimpleNamespace(cancel=_noop)


class MalformedInput(Exception):
    pass


class Decoder:
    """A Celery app plus just enough of a worker consumer to run the real strategy."""

    def __init__(self, strict=False):
        self.strict = strict
        self.app = Celery("celerity-accept", broker="memory://", set_as_current=False)
        self.app.conf.accept_content = ["json"]
        for name in KNOWN_TASKS:
            self._register(name)
        self.app.finalize()
        self.accept = prepare_accept_content(self.app.conf.accept_content)
        self.consumer = SimpleNamespace(
            hostname="celery@celerity-accept",
            connection_errors=(),
            event_dispatcher=None,
            timer=_Timer(),
            apply_eta_task=_noop,
            disable_rate_limits=True,
            task_buckets={},
            on_task_request=_noop,
            _limit_task=_noop,
            _limit_post_eta=_noop,
            pool=SimpleNamespace(apply_async=_noop),
            controller=SimpleNamespace(state=worker_state),
            qos=SimpleNamespace(increment_eventually=_noop),
        )
        self.strategies = {}
        # A memory:// channel is a kombu virtual channel, the same base the Redis transport uses.
        self._virtual_conn = Connection("memory://")
        self.virtual_channel = self._virtual_conn.default_channel

    def _register(self, name):
        self.app.task(name=name, base=CapturingTask, shared=False)(_noop)

    def strategy(self, name):
        if name not in self.strategies:
            if name not in self.app.tasks:
                if self.strict:
                    raise KeyError(name)
                self._register(name)
            task = self.app.tasks[name]
            self.strategies[name] = task.start_strategy(self.app, self.consumer)
        return self.strategies[name]

    # -- building kombu messages -------------------------------------------------------------

    def amqp_message(self, item):
        props = item.get("properties", {})
        headers = item.get("headers", {})
        if not isinstance(props, dict) or not (headers is None or isinstance(headers, dict)):
            raise MalformedInput("`properties` must be an object and `headers` an object or null")
        if isinstance(item.get("body"), str):
            body = item["body"].encode("utf-8")
        elif isinstance(item.get("body_base64"), str):
            body = base64.b64decode(item["body_base64"], validate=True)
        else:
            raise MalformedInput("an AMQP message needs `body` (text) or `body_base64`")
        sent = amqp.Message(body, application_headers=headers, **props)
        # What RabbitMQ delivers: the properties after an AMQP encode/decode round trip.
        raw = sent._serialize_properties()
        wire_props, _ = decode_properties_basic(raw, 0)
        received = amqp.Message(body, **wire_props)
        received.delivery_info = {
            "exchange": item.get("exchange", ""),
            "routing_key": item.get("routing_key", "celery"),
            "delivery_tag": 1,
            "redelivered": bool(item.get("redelivered", False)),
        }
        return AmqpMessage(received, channel=None)

    def redis_message(self, text):
        # kombu's Redis transport: loads(bytes_to_str(item)) then virtual Message(payload, channel).
        payload = kombu_loads(text)
        return VirtualMessage(payload, channel=self.virtual_channel)

    # -- the worker path ---------------------------------------------------------------------

    def decode(self, item):
        """Returns what Celery understood of one input item (a dict with `ok`)."""
        if not isinstance(item, dict):
            raise MalformedInput("each message must be a JSON object")
        try:
            if "redis_envelope" in item:
                if not isinstance(item["redis_envelope"], str):
                    raise MalformedInput("`redis_envelope` must be a string")
                message = self.redis_message(item["redis_envelope"])
            elif "properties" in item or "headers" in item:
                message = self.amqp_message(item)
            else:
                raise MalformedInput("a message needs `redis_envelope` or `properties`/`headers`")
        except MalformedInput:
            raise
        except Exception as exc:  # kombu/py-amqp refused to even build the message
            return _fail("building the message", exc)
        message.accept = self.accept
        return self.run_worker_path(message)

    def run_worker_path(self, message):
        _created.clear()
        worker_state.revoked.clear()
        payload = None
        # Consumer.on_task_received: protocol 2 has a `task` header, protocol 1 a `task` body key.
        try:
            type_ = message.headers["task"]
        except TypeError:
            return {"ok": False, "error": "unknown message: headers are not a mapping"}
        except KeyError:
            try:
                payload = message.decode()
            except Exception as exc:
                return _fail("decoding the body", exc)
            try:
                type_, payload = payload["task"], payload
            except (TypeError, KeyError):
                return {"ok": False, "error": "unknown message: no `task` header or body key"}
        try:
            strategy = self.strategy(type_)
        except (KeyError, TypeError) as exc:
            return _fail("unknown task", exc)
        try:
            strategy(message, payload, _noop, _noop, [])
        except (InvalidTaskError, ContentDisallowed, DecodeError) as exc:
            return _fail("rejected by the worker", exc)
        except Exception as exc:
            return _fail("worker strategy raised", exc)
        if not _created:
            return {"ok": False, "error": "the strategy built no request"}
        req = _created[-1]
        try:
            return self.describe(req, protocol=2 if payload is None else 1)
        except Exception as exc:
            return _fail("preparing the task call", exc)

    def describe(self, req, protocol):
        # trace_task_ret: decode the body in the pool, merge embed into the request context.
        if req.content_type:
            args, kwargs, embed = loads_message(
                req.body, req.content_type, req.content_encoding, accept=self.accept,
            )
        else:
            args, kwargs, embed = req.body
        if not isinstance(args, (list, tuple)):
            raise InvalidTaskError("args is not a list")
        if not isinstance(kwargs, dict):
            raise InvalidTaskError("kwargs is not a mapping")
        embed = embed or {}
        request = dict(req.request_dict)
        request.update({"args": args, "kwargs": kwargs, "is_eager": False}, **embed)
        ctx = Context(request)
        # Rebuild signatures the way the tracer does when it sends callbacks and the chain.
        callbacks = [signature(s, app=self.app) for s in (ctx.callbacks or [])]
        errbacks = [signature(s, app=self.app) for s in (ctx.errbacks or [])]
        chain = [signature(s, app=self.app) for s in (ctx.chain or [])]
        chord = maybe_signature(ctx.chord, app=self.app) if ctx.chord else None
        return {
            "ok": True,
            "protocol": protocol,
            "task": req.type,
            "name": req.name,
            "id": req.id,
            "args": list(args),
            "kwargs": kwargs,
            "eta": req.eta.isoformat() if req.eta else None,
            "expires": req.expires.isoformat() if req.expires else None,
            "retries": ctx.retries,
            "timelimit": list(req.time_limits),
            "root_id": req.root_id,
            "parent_id": req.parent_id,
            "group": ctx.group,
            "group_index": ctx.group_index,
            "shadow": request.get("shadow"),
            "origin": ctx.origin,
            "ignore_result": req.ignore_result,
            "argsrepr": req.argsrepr,
            "kwargsrepr": req.kwargsrepr,
            "replaced_task_nesting": req.replaced_task_nesting,
            "stamped_headers": ctx.stamped_headers,
            "stamps": ctx.stamps,
            "reply_to": req.reply_to,
            "correlation_id": request.get("correlation_id"),
            "delivery_info": req.delivery_info,
            "content_type": req.content_type,
            "utc": req.utc,
            "callbacks": [_sig_info(s) for s in callbacks] if ctx.callbacks is not None else None,
            "errbacks": [_sig_info(s) for s in errbacks] if ctx.errbacks is not None else None,
            "chain": [_sig_info(s) for s in chain] if ctx.chain is not None else None,
            "chord": _sig_info(chord) if chord is not None else None,
            "revoked_on_receipt": bool(req._already_revoked or req.id in worker_state.revoked),
        }


def _sig_info(sig):
    return {
        "task": sig.task,
        "args": list(sig.args),
        "kwargs": dict(sig.kwargs),
        "task_id": sig.options.get("task_id"),
        "subtask_type": sig.subtask_type,
        "immutable": sig.immutable,
    }


def _fail(stage, exc):
    return {"ok": False, "error": f"{stage}: {type(exc).__name__}: {exc}"}


class Fetcher:
    """Takes live messages off a broker queue with kombu, as a worker's task consumer does."""

    def __init__(self, decoder, opts):
        self.decoder = decoder
        self.opts = opts
        self.out = []
        self.redis = None
        if opts.fetch_redis:
            import redis as redis_py

            self.url = opts.fetch_redis
            self.transport_options = {"global_keyprefix": opts.prefix}
            # A plain client (no kombu prefixing) to look at kombu's keys under the prefix.
            self.redis = redis_py.Redis.from_url(opts.fetch_redis)
        else:
            self.url = opts.fetch_amqp
            self.transport_options = {}

    def unacked(self, tag=None):
        """(entries in unacked, entries in unacked_index) or, with `tag`, whether both hold it."""
        hash_key = self.opts.prefix + "unacked"
        index_key = self.opts.prefix + "unacked_index"
        if tag is not None:
            return bool(self.redis.hexists(hash_key, tag)) and (
                self.redis.zscore(index_key, tag) is not None
            )
        return self.redis.hlen(hash_key), self.redis.zcard(index_key)

    def on_message(self, message):
        tag = message.delivery_tag
        result = self.decoder.run_worker_path(message)
        extra = {}
        if self.redis is not None:
            extra["unacked_before_settle"] = self.unacked(tag)
        if result.get("ok"):
            message.ack()
            extra["settled"] = "ack"
        else:
            message.reject(requeue=False)
            extra["settled"] = "reject"
        if self.redis is not None:
            extra["unacked_after_settle"] = sum(self.unacked())
        line = dict({"index": len(self.out)}, **result)
        line.update(extra)
        self.out.append(kombu_dumps(line))

    def run(self):
        opts = self.opts
        queue = self.decoder.app.amqp.queues[opts.queue]
        with Connection(self.url, transport_options=self.transport_options) as conn:
            channel = conn.channel()
            consumer = Consumer(
                channel,
                queues=[queue],
                no_ack=False,
                accept=self.decoder.accept,
                on_message=self.on_message,
            )
            consumer.qos(prefetch_count=min(opts.count, 65535))
            with consumer:
                while len(self.out) < opts.count:
                    try:
                        conn.drain_events(timeout=opts.idle)
                    except socket.timeout:
                        break
            channel.close()
        if self.redis is not None:
            left = self.unacked()
            if any(left):
                print(f"accept.py: kombu bookkeeping not empty after close: unacked={left[0]} "
                      f"unacked_index={left[1]}", file=sys.stderr)
                return 1
        return 0


def _live(opts):
    if opts.count < 1:
        print("accept.py: --count must be at least 1", file=sys.stderr)
        return 2
    if opts.fetch_redis and opts.prefix is None:
        print("accept.py: --fetch-redis needs --prefix (use --prefix '' for none)",
              file=sys.stderr)
        return 2
    if opts.fetch_amqp and opts.prefix:
        print("accept.py: --prefix is for --fetch-redis only", file=sys.stderr)
        return 2
    fetcher = Fetcher(Decoder(strict=opts.strict), opts)
    try:
        code = fetcher.run()
    finally:
        sys.stdout.write("".join(line + "\n" for line in fetcher.out))
        sys.stdout.flush()
    return code


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--strict", action="store_true",
                        help="do not register unknown task names on the fly")
    live = parser.add_mutually_exclusive_group()
    live.add_argument("--fetch-redis", metavar="URL",
                      help="take messages off this Redis broker instead of reading stdin")
    live.add_argument("--fetch-amqp", metavar="URL",
                      help="take messages off this RabbitMQ broker instead of reading stdin")
    parser.add_argument("--prefix", help="kombu's global_keyprefix (Redis)")
    parser.add_argument("--queue", help="queue to consume from (live mode)")
    parser.add_argument("--count", type=int, default=1,
                        help="take at most this many messages (live mode; default 1)")
    parser.add_argument("--idle", type=float, default=1.0,
                        help="stop when no message came for this many seconds (live mode)")
    opts = parser.parse_args(argv)
    if opts.fetch_redis or opts.fetch_amqp:
        if not opts.queue:
            parser.error("live mode needs --queue")
        return _live(opts)
    if opts.queue or opts.prefix is not None:
        parser.error("--queue/--prefix need --fetch-redis or --fetch-amqp")
    try:
        items = json.loads(sys.stdin.read())
    except ValueError as exc:
        print(f"accept.py: input is not JSON: {exc}", file=sys.stderr)
        return 2
    if not isinstance(items, list):
        print("accept.py: input must be a JSON list of messages", file=sys.stderr)
        return 2
    decoder = Decoder(strict=opts.strict)
    out = []
    for index, item in enumerate(items):
        try:
            result = decoder.decode(item)
        except MalformedInput as exc:
            print(f"accept.py: message {index}: {exc}", file=sys.stderr)
            return 2
        out.append(kombu_dumps(dict({"index": index}, **result)))
    sys.stdout.write("".join(line + "\n" for line in out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
