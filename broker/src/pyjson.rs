//! JSON written the way Python's `json.dumps` writes it with default arguments: `", "` between items,
//! `": "` after keys, and every non-ASCII character escaped as `\uXXXX` (`ensure_ascii=True`).
//!
//! Celery and kombu serialize with those defaults, so writing the same way makes our bodies and Redis
//! envelopes byte-for-byte what a Python producer would put on the wire. Any JSON reader accepts
//! both forms; this is about being indistinguishable, not about being readable.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::{Formatter, Serializer};

/// A `serde_json` formatter with Python's separators and ASCII-only output.
#[derive(Debug, Default, Clone, Copy)]
pub struct PyFormatter;

impl Formatter for PyFormatter {
    #[inline]
    fn begin_array_value<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    #[inline]
    fn begin_object_key<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        if first {
            Ok(())
        } else {
            writer.write_all(b", ")
        }
    }

    #[inline]
    fn begin_object_value<W: ?Sized + Write>(&mut self, writer: &mut W) -> io::Result<()> {
        writer.write_all(b": ")
    }

    fn write_string_fragment<W: ?Sized + Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        // Fast path: nothing to escape.
        if fragment.bytes().all(|b| b.is_ascii() && b != 0x7f) {
            return writer.write_all(fragment.as_bytes());
        }
        let mut start = 0;
        for (i, ch) in fragment.char_indices() {
            if ch.is_ascii() && ch != '\x7f' {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..i])?;
            let mut units = [0u16; 2];
            for unit in ch.encode_utf16(&mut units) {
                write!(writer, "\\u{:04x}", unit)?;
            }
            start = i + ch.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

/// Serializes `value` as Python's `json.dumps` would.
pub fn to_vec<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    write(&mut out, value);
    out
}

/// Appends `value`, serialized as Python's `json.dumps` would, to `out`.
pub fn write<T: Serialize + ?Sized>(out: &mut Vec<u8>, value: &T) {
    // Serializing a `serde_json::Value` or our plain structs into a Vec cannot fail: there is no I/O
    // error and no non-string map key. Should a caller pass something that can, write `null`.
    let start = out.len();
    let ok = value
        .serialize(&mut Serializer::with_formatter(&mut *out, PyFormatter))
        .is_ok();
    if !ok {
        out.truncate(start);
        out.extend_from_slice(b"null");
    }
}

/// Serializes `value` as a `String` (the output is always ASCII).
pub fn to_string<T: Serialize + ?Sized>(value: &T) -> String {
    // ASCII-only by construction, so this never replaces anything.
    String::from_utf8_lossy(&to_vec(value)).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn python_separators_and_escapes() {
        let v = json!([[2, 3], {"z": "héllo ☃", "e": "😀", "c": "a\"b\\\n\u{7f}"}, {"callbacks": null}]);
        assert_eq!(
            to_string(&v),
            r#"[[2, 3], {"z": "h\u00e9llo \u2603", "e": "\ud83d\ude00", "c": "a\"b\\\n\u007f"}, {"callbacks": null}]"#
        );
        assert_eq!(to_string(&json!({})), "{}");
        assert_eq!(to_string(&json!([])), "[]");
        assert_eq!(to_string(&json!([1.5, -2, true])), "[1.5, -2, true]");
    }

    #[test]
    fn output_parses_back_to_the_same_value() {
        let v = json!({"a": ["ü", {"b": [1, 2, {"c": null}]}], "ключ": "значение"});
        let back: serde_json::Value = serde_json::from_slice(&to_vec(&v)).unwrap();
        assert_eq!(back, v);
    }
}
