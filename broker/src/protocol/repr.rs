//! Python `repr()` of JSON values, for the `argsrepr`/`kwargsrepr` headers that monitors display.
//!
//! Celery writes `saferepr(args)` of a tuple — `(2, 3)`, `('a',)` — and of a dict — `{'x': 1}` — cut at
//! 1,024 characters. Display only: nothing parses it back.

use serde_json::{Map, Value};

/// Longest repr Celery sends.
pub const MAX_REPR: usize = 1024;

/// `repr(tuple(args))`.
pub fn args_repr(args: &[Value]) -> String {
    let mut out = String::from("(");
    for (i, v) in args.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_value(&mut out, v);
    }
    if args.len() == 1 {
        out.push(',');
    }
    out.push(')');
    truncate(out)
}

/// `repr(dict(kwargs))`.
pub fn kwargs_repr(kwargs: &Map<String, Value>) -> String {
    let mut out = String::new();
    write_map(&mut out, kwargs);
    truncate(out)
}

/// `repr()` of one value (null → `None`, true → `True`, strings single-quoted, …).
pub fn value_repr(v: &Value) -> String {
    let mut out = String::new();
    write_value(&mut out, v);
    truncate(out)
}

fn truncate(mut s: String) -> String {
    if s.chars().count() > MAX_REPR {
        let cut = s
            .char_indices()
            .nth(MAX_REPR - 3)
            .map_or(s.len(), |(i, _)| i);
        s.truncate(cut);
        s.push_str("...");
    }
    s
}

fn write_map(out: &mut String, m: &Map<String, Value>) {
    out.push('{');
    for (i, (k, v)) in m.iter().enumerate() {
        if i > 0 {
            out.push_str(", ");
        }
        write_str(out, k);
        out.push_str(": ");
        write_value(out, v);
    }
    out.push('}');
}

fn write_value(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("None"),
        Value::Bool(true) => out.push_str("True"),
        Value::Bool(false) => out.push_str("False"),
        Value::Number(n) => {
            if let Some(f) = n.as_f64().filter(|_| n.is_f64()) {
                if f.fract() == 0.0 && f.abs() < 1e16 {
                    out.push_str(&format!("{f:.1}"));
                } else {
                    out.push_str(&n.to_string());
                }
            } else {
                out.push_str(&n.to_string());
            }
        }
        Value::String(s) => write_str(out, s),
        Value::Array(a) => {
            out.push('[');
            for (i, v) in a.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_value(out, v);
            }
            out.push(']');
        }
        Value::Object(m) => write_map(out, m),
    }
}

/// Python's string repr: single quotes unless the text has `'` and no `"`.
fn write_str(out: &mut String, s: &str) {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reprs_like_python() {
        assert_eq!(args_repr(&[json!(2), json!(3)]), "(2, 3)");
        assert_eq!(args_repr(&[json!("a")]), "('a',)");
        assert_eq!(args_repr(&[]), "()");
        assert_eq!(
            args_repr(&[json!(null), json!(true), json!(1.5), json!(10.0)]),
            "(None, True, 1.5, 10.0)"
        );
        let kw = json!({"z": "héllo ☃", "q": "it's", "l": [1, {"a": false}]});
        assert_eq!(
            kwargs_repr(kw.as_object().unwrap()),
            r#"{'z': 'héllo ☃', 'q': "it's", 'l': [1, {'a': False}]}"#
        );
        assert_eq!(kwargs_repr(&Map::new()), "{}");
        assert_eq!(value_repr(&json!("a\nb")), r"'a\nb'");
    }

    #[test]
    fn long_reprs_are_cut() {
        let big = json!("x".repeat(5000));
        let r = args_repr(&[big]);
        assert_eq!(r.chars().count(), MAX_REPR);
        assert!(r.ends_with("..."));
    }
}
