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

    fn write_f64<W: ?Sized + Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        writer.write_all(python_float(value).as_bytes())
    }

    fn write_f32<W: ?Sized + Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        self.write_f64(writer, f64::from(value))
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

/// A float as Python's `repr(float)` spells it: the shortest digits that read back to the same value,
/// in positional form when the decimal exponent is in -4..16 (`0.0001`, `10.0`), otherwise in
/// scientific form with a signed, at least two-digit exponent (`1e-05`, `1.5e+16`).
pub fn python_float(value: f64) -> String {
    if !value.is_finite() {
        // JSON has no spelling for these; Python writes NaN/Infinity, which JSON readers refuse.
        return if value.is_nan() {
            "NaN".into()
        } else if value > 0.0 {
            "Infinity".into()
        } else {
            "-Infinity".into()
        };
    }
    // `{:e}` gives the shortest round-trip digits: "1.5e16", "-1e-7", "0e0".
    let sci = format!("{value:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((sci.as_str(), "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = mantissa
        .strip_prefix('-')
        .map_or(("", mantissa), |m| ("-", m));
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let point = exp + 1; // digits before the decimal point
        let body = if point <= 0 {
            format!("0.{}{}", "0".repeat((-point) as usize), digits)
        } else if (point as usize) >= digits.len() {
            format!("{}{}.0", digits, "0".repeat(point as usize - digits.len()))
        } else {
            format!(
                "{}.{}",
                &digits[..point as usize],
                &digits[point as usize..]
            )
        };
        format!("{sign}{body}")
    } else {
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
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
    fn floats_are_spelled_like_python() {
        for (f, py) in [
            (1e-7, "1e-07"),
            (1e-5, "1e-05"),
            (0.0001, "0.0001"),
            (5.5, "5.5"),
            (10.0, "10.0"),
            (-0.5, "-0.5"),
            (0.0, "0.0"),
            (1e15, "1000000000000000.0"),
            (1e16, "1e+16"),
            (1.5e300, "1.5e+300"),
            (123456.789, "123456.789"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-2.5e-10, "-2.5e-10"),
        ] {
            assert_eq!(python_float(f), py, "{f}");
        }
        assert_eq!(to_string(&json!([1e-7, 2])), "[1e-07, 2]");
    }

    #[test]
    fn output_parses_back_to_the_same_value() {
        let v = json!({"a": ["ü", {"b": [1, 2, {"c": null}]}], "ключ": "значение"});
        let back: serde_json::Value = serde_json::from_slice(&to_vec(&v)).unwrap();
        assert_eq!(back, v);
    }
}
