"""Drives canvas_app from the Python side for celerity/tests/canvas_interop.rs; prints one JSON line.

  canvas_driver.py build     builds a chain, a group (saved), a chord and a failing chord with Python
                             Celery, sends them, waits with AsyncResult/GroupResult and prints what
                             Python read (the workflows are run by whichever worker consumes the queue)
  canvas_driver.py read ID.. reads results by id (AsyncResult) and prints them
  canvas_driver.py restore GID   GroupResult.restore(GID) and its results in order
"""

import json
import sys

from celery import chain, chord, group
from celery.result import AsyncResult, GroupResult

from canvas_app import add, app, echo, fail, mul

TIMEOUT = 60


def build():
    out = {}
    c = chain(add.s(1, 2), mul.s(10), add.s(5)).apply_async()
    out["chain"] = c.get(timeout=TIMEOUT)
    out["chain_parent"] = c.parent.get(timeout=TIMEOUT)
    g = group(add.s(i, i) for i in range(5)).apply_async()
    out["group"] = g.get(timeout=TIMEOUT)
    g.save()
    out["group_id"] = g.id
    out["group_ids"] = [r.id for r in g.results]
    ch = chord([add.s(i, 1) for i in range(8)], echo.s("tail")).apply_async()
    out["chord"] = ch.get(timeout=TIMEOUT)
    bad = chord([add.s(1, 1), fail.si("member broke"), add.s(2, 2)], echo.s()).apply_async()
    try:
        # The body's own stored result: the ChordError the worker stored.
        AsyncResult(bad.id, app=app).get(timeout=TIMEOUT)
        out["bad_chord"] = "no error"
    except Exception as e:
        out["bad_chord"] = f"{type(e).__name__}: {e}"
    try:
        # Its parent is the header, whose failed member raises its own error. Checked once the
        # body has finished: `bad.get()` races the two errors (it looks at the parents between
        # polls, so the body's ChordError can win).
        bad.parent.maybe_throw()
        out["bad_chord_parent"] = "no error"
    except Exception as e:
        out["bad_chord_parent"] = f"{type(e).__name__}: {e}"
    linked = add.s(2, 3).set(link=mul.s(10)).apply_async()
    out["linked"] = linked.get(timeout=TIMEOUT)
    failing = chain(add.s(1, 2), fail.si("boom"), mul.s(2)).apply_async()
    try:
        failing.get(timeout=TIMEOUT)
        out["failing_chain"] = "no error"
    except Exception as e:
        out["failing_chain"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out))


def read(ids):
    out = {}
    for i in ids:
        r = AsyncResult(i, app=app)
        try:
            out[i] = {"state": "SUCCESS", "result": r.get(timeout=TIMEOUT)}
        except Exception as e:
            out[i] = {"state": r.state, "error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))


def restore(gid):
    g = GroupResult.restore(gid, app=app)
    print(json.dumps({"ids": [r.id for r in g.results], "results": g.get(timeout=TIMEOUT)}))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "build":
        build()
    elif cmd == "read":
        read(sys.argv[2:])
    elif cmd == "restore":
        restore(sys.argv[2])
    else:
        sys.exit(f"unknown command {cmd}")
