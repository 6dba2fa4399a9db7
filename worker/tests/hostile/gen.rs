//! The hostile messages: a deterministic generator (xorshift seeded per run) of task messages that
//! are broken in one way each, the good `demo.add` jobs mixed in between, and what each kind may end
//! as.

use serde_json::{json, Map, Value};

use celerity_broker::message::Message;
use celerity_broker::protocol::TaskMessage;

/// A small xorshift64*: enough to vary the cases, and the same seed gives the same run.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.max(1))
    }

    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

/// What a hostile message may end as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Dead-lettered or stored as FAILURE (a decode error, a type error, a refused field).
    Refused,
    /// FAILURE `NotRegistered`.
    NotRegistered,
    /// A valid job with an odd field (priority 255, 1e9 retries): it may also run.
    Tolerated,
}

/// One generated message, tagged so its end can be found.
pub struct Case {
    pub kind: &'static str,
    /// The task id where the message has one (results are looked up under it).
    pub id: Option<String>,
    /// `x-hostile` header (and, on Redis, text in the raw envelope): finds it in a dead-letter queue.
    pub tag: String,
    pub payload: Payload,
    pub expect: Expect,
}

/// How a case is published.
pub enum Payload {
    /// Through `Broker::publish` (every transport).
    Message(Message),
    /// Bytes pushed as they are onto the Redis list (not a kombu envelope, or a broken one).
    RedisRaw(Vec<u8>),
    /// Published raw with lapin (headers as given).
    Amqp(crate::amqp::RawAmqp),
}

/// A good job: `demo.add(a, b)` with its answer.
pub struct Good {
    pub a: i64,
    pub b: i64,
}

/// The shared parts of a run: the tag prefix, a counter for tags.
pub struct Gen {
    pub rng: Rng,
    pub run: String,
    n: u64,
    /// Size of the huge bodies (5 MiB: over the worker's `max_message_size` of 1 MiB).
    pub huge: usize,
    /// Depth of the deeply nested values.
    pub deep: usize,
    /// Members of the huge group in an embed.
    pub fan_out: usize,
}

/// Kinds every transport gets (through `Broker::publish`).
pub const KINDS: &[&str] = &[
    "broken-json",
    "bad-utf8-body",
    "content-type",
    "missing-header",
    "wrong-type-header",
    "absurd-value",
    "wrong-arg-types",
    "unknown-task",
    "body-shape",
    "deep-nesting",
    "bad-embed",
    "deep-chain",
    "cyclic-chain",
];

impl Gen {
    pub fn new(seed: u64, run: &str) -> Gen {
        Gen {
            rng: Rng::new(seed),
            run: run.to_owned(),
            n: 0,
            huge: 5 * 1024 * 1024,
            deep: 10_000,
            fan_out: 100_000,
        }
    }

    pub fn tag(&mut self) -> String {
        self.n += 1;
        format!("{}-h{}.", self.run, self.n)
    }

    pub fn good(&mut self) -> Good {
        Good {
            a: self.rng.below(1_000_000) as i64,
            b: self.rng.below(1_000_000) as i64,
        }
    }

    /// A valid `demo.add` message with a fresh id and the case's tag header.
    pub fn base(&mut self, tag: &str) -> (String, Message) {
        let t = TaskMessage::new("demo.add", vec![json!(1), json!(2)], Map::new());
        let id = t.id().to_owned();
        let mut m = t.encode();
        m.headers
            .insert("x-hostile".into(), Value::String(tag.into()));
        (id, m)
    }

    fn case(
        &mut self,
        kind: &'static str,
        expect: Expect,
        f: impl FnOnce(&mut Gen, &mut Message),
    ) -> Case {
        let tag = self.tag();
        let (id, mut m) = self.base(&tag);
        f(self, &mut m);
        let id = m.task_id().map(str::to_owned).filter(|i| *i == id);
        Case {
            kind,
            id,
            tag,
            payload: Payload::Message(m),
            expect,
        }
    }

    /// One message of `kind` (one of [`KINDS`]).
    pub fn one(&mut self, kind: &'static str) -> Case {
        use Expect::*;
        match kind {
            "broken-json" => self.case(kind, Refused, |g, m| {
                let cut = g.rng.below(m.body.len() as u64) as usize;
                let junk: &[&[u8]] = &[b"", b"{", b"]]]", b"\"", b",", b"nul", b"\\u12"];
                m.body.truncate(cut);
                let j: &[u8] = g.rng.pick::<&[u8]>(junk);
                m.body.extend_from_slice(j);
                if m.body.is_empty() || serde_json::from_slice::<Value>(&m.body).is_ok() {
                    m.body = b"[[1, 2], {}, {".to_vec();
                }
            }),
            "bad-utf8-body" => self.case(kind, Refused, |g, m| {
                let bad: &[&[u8]] = &[b"\xff\xfe", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"];
                let mut body = b"[[\"".to_vec();
                let b: &[u8] = g.rng.pick::<&[u8]>(bad);
                body.extend_from_slice(b);
                body.extend_from_slice(b"\", 2], {}, {}]");
                m.body = body;
            }),
            "content-type" => self.case(kind, Refused, |g, m| {
                let (ct, enc, body): (&str, &str, &[u8]) = *g.rng.pick(&[
                    ("application/x-python-serialize", "binary", &b"\x80\x04\x95\x0b\x00\x00\x00\x00\x00\x00\x00\x8c\x02os\x94\x8c\x06system\x94\x93\x94."[..]),
                    ("application/x-yaml", "utf-8", &b"- [1, 2]\n- {}\n- {}\n"[..]),
                    ("application/x-msgpack", "binary", &b"\x93\x92\x01\x02\x80\x80"[..]),
                    ("application/octet-stream", "binary", &b"\x00\x01\x02"[..]),
                    ("text/plain", "utf-8", &b"[[1, 2], {}, {}]"[..]),
                    ("", "", &b"[[1, 2], {}, {}]"[..]),
                    ("application/json", "utf-16", &b"\xff\xfe[\x00]\x00"[..]),
                    ("application/json", "gzip", &b"\x1f\x8b\x08\x00"[..]),
                ]);
                m.properties.content_type = ct.into();
                m.properties.content_encoding = enc.into();
                m.body = body.to_vec();
            }),
            "missing-header" => {
                let which = *self.rng.pick(&["id", "task", "both"]);
                let mut c = self.case(kind, Refused, |_, m| {
                    if which != "task" {
                        m.headers.remove("id");
                        m.properties.correlation_id = None;
                    }
                    if which != "id" {
                        m.headers.remove("task");
                    }
                });
                if which == "task" {
                    // Without `task` it reads as protocol v1 and fails on the body's shape; the id stays.
                    c.expect = Refused;
                }
                c
            }
            "wrong-type-header" => self.case(kind, Refused, |g, m| {
                let field = *g.rng.pick(&[
                    "task", "eta", "expires", "retries", "timelimit", "group", "parent_id", "root_id",
                    "group_index", "ignore_result", "lang", "argsrepr",
                ]);
                let bad = g.rng.pick(&[
                    json!({"a": 1}),
                    json!([1, [2, [3]]]),
                    json!(true),
                    json!(-1.5e300),
                    json!("not a date \u{0}"),
                ]).clone();
                let bad = match (field, &bad) {
                    // A string is a fine type for these; give them a number.
                    ("eta" | "expires", Value::String(_)) => json!("2024-13-45T99:99:99"),
                    ("task" | "group" | "parent_id" | "root_id" | "lang" | "argsrepr", Value::String(_)) => json!(42),
                    ("ignore_result", Value::Bool(_)) => json!("yes"),
                    _ => bad,
                };
                m.headers.insert(field.into(), bad);
            }),
            "absurd-value" => {
                let (field, value, expect) = self.rng.pick(&[
                    ("eta", json!("9999-12-31T23:59:59+00:00"), Refused),
                    ("eta", json!("0001-01-01T00:00:00"), Tolerated),
                    ("expires", json!("9999-12-31T23:59:59"), Tolerated),
                    ("expires", json!("1970-01-01T00:00:00"), Tolerated),
                    ("timelimit", json!([1e19, 1e19]), Tolerated),
                    ("timelimit", json!([-5, -1]), Tolerated),
                    ("timelimit", json!([1e308, null]), Tolerated),
                    ("retries", json!(4_294_967_295u64), Tolerated),
                    ("retries", json!(1e30), Refused),
                    ("retries", json!(-3), Refused),
                    ("group_index", json!(9_223_372_036_854_775_807i64), Tolerated),
                    ("replaced_task_nesting", json!(4_294_967_295u64), Tolerated),
                    ("priority", json!(1e300), Tolerated),
                    ("countdown", json!(1e15), Tolerated),
                ]).clone();
                // The field in the kind, so the table shows which one did what.
                let kind: &'static str = Box::leak(format!("absurd-{field}").into_boxed_str());
                self.case(kind, expect, |_, m| {
                    m.headers.insert(field.into(), value);
                    m.properties.priority = 255;
                })
            }
            "wrong-arg-types" => self.case(kind, Refused, |g, m| {
                let args = g.rng.pick(&[
                    json!([[1, 2], {}, {}]).to_string(),
                    json!([["a", {}], {}, {}]).to_string(),
                    json!([[1], {}, {}]).to_string(),
                    json!([[1, 2, 3, 4], {}, {}]).to_string(),
                    json!([[1, "2"], {}, {}]).to_string(),
                    json!([[null, null], {}, {}]).to_string(),
                ]).clone();
                m.body = args.into_bytes();
                // The first one is the right shape and right types: make it overflow instead.
                if m.body.starts_with(b"[[1, 2]") || m.body.starts_with(b"[[1,2]") {
                    m.body = json!([[i64::MAX, i64::MAX], {}, {}]).to_string().into_bytes();
                }
            }),
            "unknown-task" => self.case(kind, NotRegistered, |g, m| {
                let name = g.rng.pick(&["no.such.task", "", "demo.add ", "DEMO.ADD", "celery.chord_unlock\u{0}", "a/../../etc/passwd"]);
                if name.is_empty() {
                    m.headers.insert("task".into(), json!("x".repeat(10_000)));
                } else {
                    m.headers.insert("task".into(), json!(name));
                }
            }),
            "body-shape" => self.case(kind, Refused, |g, m| {
                let body = g.rng.pick(&[
                    "null", "1", "\"x\"", "{}", "[]", "[[1, 2]]", "[[1, 2], {}, {}, {}]", "[{}, {}, {}]",
                    "[[1, 2], [], {}]", "[[1, 2], {}, []]", "[[1, 2], {}, 7]",
                ]);
                m.body = body.as_bytes().to_vec();
            }),
            "deep-nesting" => self.case(kind, Refused, |g, m| {
                let deep = g.deep;
                let mut body = String::with_capacity(2 * deep + 20);
                body.push_str("[[");
                for _ in 0..deep {
                    body.push_str(if g.rng.below(2) == 0 { "[" } else { "{\"a\":" });
                }
                // An unclosed nest is fine too: the depth is the point.
                body.push('1');
                m.body = body.into_bytes();
            }),
            "bad-embed" => self.case(kind, Refused, |g, m| {
                let embed = g.rng.pick(&[
                    json!({"chain": "x"}),
                    json!({"chain": [1, 2, 3]}),
                    json!({"chain": [{"task": 5}]}),
                    json!({"callbacks": {"a": 1}}),
                    json!({"chord": [1]}),
                    json!({"chord": {"task": null}}),
                    json!({"errbacks": [{"options": "x"}]}),
                    json!(17),
                ]).clone();
                m.body = json!([["1", 2], {}, embed]).to_string().into_bytes();
            }),
            "deep-chain" => {
                let (steps, fan) = (self.deep, self.fan_out);
                self.case(kind, Refused, move |g, m| {
                    let step = |i: usize| json!({"task": "demo.add", "args": [i, 1], "kwargs": {}, "options": {}, "subtask_type": null, "immutable": false});
                    let embed = if g.n % 2 == 0 {
                        json!({"chain": (0..steps).map(step).collect::<Vec<_>>()})
                    } else {
                        json!({"chain": [{"task": "celery.group", "args": [], "kwargs": {"tasks": (0..fan).map(step).collect::<Vec<_>>()}, "options": {}, "subtask_type": "group", "immutable": false}]})
                    };
                    // The head fails on its arguments, so the workflow never starts.
                    m.body = json!([["x", "y"], {}, embed]).to_string().into_bytes();
                })
            }
            "cyclic-chain" => {
                // The next steps carry the head's own id (and each other's): they must end, once.
                let tag = self.tag();
                let (id, mut m) = self.base(&tag);
                let step = json!({"task": "no.such.task", "args": [], "kwargs": {}, "options": {"task_id": id, "parent_id": id, "root_id": id}, "subtask_type": null, "immutable": true});
                m.headers.insert("parent_id".into(), json!(id));
                m.headers.insert("root_id".into(), json!(id));
                m.body = json!([[1, 2], {}, {"chain": [step.clone(), step], "callbacks": null, "errbacks": null, "chord": null}]).to_string().into_bytes();
                Case { kind, id: Some(id), tag, payload: Payload::Message(m), expect: Tolerated }
            }
            other => panic!("no generator for {other}"),
        }
    }

    /// A few huge bodies (5 MiB, over the worker's limit): garbage, a huge valid-JSON argument.
    pub fn huge(&mut self) -> Vec<Case> {
        let n = self.huge;
        vec![
            self.case("huge-body", Expect::Refused, move |_, m| {
                m.body = vec![b'['; n];
            }),
            self.case("huge-body", Expect::Refused, move |_, m| {
                m.body = json!([["x".repeat(n), 2], {}, {}]).to_string().into_bytes();
            }),
        ]
    }
}
