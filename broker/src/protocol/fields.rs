//! Typed reads of JSON fields with errors that name the field and what was found.

use chrono::{DateTime, FixedOffset};
use serde_json::{Map, Value};

use super::time::parse_iso;
use crate::error::{BrokerError, Result};

/// A short description of a JSON value's kind, for error messages.
pub(crate) fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn wrong(what: &str, name: &str, expected: &str, got: &Value) -> BrokerError {
    BrokerError::malformed(format_args!(
        "{what} `{name}`: expected {expected}, got {}",
        kind(got)
    ))
}

/// Reads optional/nullable fields of one JSON object; `what` names the object in errors ("header").
pub(crate) struct Fields<'a> {
    pub map: &'a Map<String, Value>,
    pub what: &'static str,
}

impl<'a> Fields<'a> {
    fn get(&self, name: &str) -> Option<&'a Value> {
        match self.map.get(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    pub fn required_str(&self, name: &str) -> Result<String> {
        match self.get(name) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            Some(Value::String(_)) => Err(BrokerError::malformed(format_args!(
                "{} `{name}` is empty",
                self.what
            ))),
            Some(v) => Err(wrong(self.what, name, "a string", v)),
            None => Err(BrokerError::malformed(format_args!(
                "missing {} `{name}`",
                self.what
            ))),
        }
    }

    pub fn opt_str(&self, name: &str) -> Result<Option<String>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.clone())),
            Some(v) => Err(wrong(self.what, name, "a string or null", v)),
        }
    }

    pub fn opt_bool(&self, name: &str) -> Result<Option<bool>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(wrong(self.what, name, "a boolean or null", v)),
        }
    }

    pub fn opt_i64(&self, name: &str) -> Result<Option<i64>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_i64() {
                Some(i) => Ok(Some(i)),
                None => match n.as_f64() {
                    Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => Ok(Some(f as i64)),
                    _ => Err(BrokerError::malformed(format_args!(
                        "{} `{name}`: {n} is not an integer",
                        self.what
                    ))),
                },
            },
            Some(v) => Err(wrong(self.what, name, "an integer or null", v)),
        }
    }

    pub fn u32_or_zero(&self, name: &str) -> Result<u32> {
        match self.opt_i64(name)? {
            None => Ok(0),
            Some(i) => u32::try_from(i).map_err(|_| {
                BrokerError::malformed(format_args!("{} `{name}`: {i} is out of range", self.what))
            }),
        }
    }

    pub fn opt_time(&self, name: &str) -> Result<Option<DateTime<FixedOffset>>> {
        match self.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => parse_iso(s).map(Some).map_err(|_| {
                BrokerError::malformed(format_args!(
                    "{} `{name}`: `{s}` is not an ISO-8601 time",
                    self.what
                ))
            }),
            Some(v) => Err(wrong(self.what, name, "an ISO-8601 string or null", v)),
        }
    }
}

/// A JSON number (or a numeric string, as some producers send) as f64.
pub(crate) fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Writes a float the way a Python producer that passed an int would: integral values as integers.
pub(crate) fn number_value(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9.0e15 {
        Value::from(f as i64)
    } else {
        serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)
    }
}
