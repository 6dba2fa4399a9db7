//! Maps Celery's call arguments (`args` list + `kwargs` dict) onto a task's typed arguments.
//!
//! So that a Python caller's `add.delay(2, 3)`, `add.delay(x=2, y=3)` and `add.delay(2, y=3)` all reach
//! a Rust `add` whose arguments are a tuple `(i64, i64)` or a struct `{ x: i64, y: i64 }`:
//!
//! - only positional: the list is read as a tuple, a tuple struct, a sequence or a struct (fields in
//!   declaration order); a single argument is also tried as the value itself (`u64`, a map, …);
//! - only keywords: the dict is read as a struct (fields by name) or a map;
//! - both: positional ones fill the struct's fields in order, then keywords by name (a keyword that
//!   names a field already given positionally is an error, as in Python).
//!
//! Errors name the task and say what did not fit.

use serde::de::{self, DeserializeOwned, Visitor};
use serde_json::{Map, Value};

/// Why arguments did not fit a task's argument type.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ArgsError(pub String);

/// Reads `args`/`kwargs` as `T`.
pub fn from_call<T: DeserializeOwned>(
    args: &[Value],
    kwargs: &Map<String, Value>,
) -> Result<T, ArgsError> {
    if kwargs.is_empty() {
        let as_list = serde_json::from_value::<T>(Value::Array(args.to_vec()));
        return match (as_list, args) {
            (Ok(v), _) => Ok(v),
            (Err(e), []) => {
                serde_json::from_value::<T>(Value::Null).map_err(|_| fit_error("positional", &e))
            }
            (Err(e), [single]) => {
                serde_json::from_value::<T>(single.clone()).map_err(|_| fit_error("positional", &e))
            }
            (Err(e), _) => Err(fit_error("positional", &e)),
        };
    }
    if args.is_empty() {
        return serde_json::from_value::<T>(Value::Object(kwargs.clone()))
            .map_err(|e| fit_error("keyword", &e));
    }
    let fields = struct_fields::<T>().ok_or_else(|| {
        ArgsError(
            "this task takes positional arguments only, but keyword arguments were given".into(),
        )
    })?;
    if args.len() > fields.len() {
        return Err(ArgsError(format!(
            "takes {} arguments but {} positional were given",
            fields.len(),
            args.len()
        )));
    }
    let mut merged = Map::with_capacity(fields.len());
    for (name, v) in fields.iter().zip(args) {
        merged.insert((*name).to_owned(), v.clone());
    }
    for (k, v) in kwargs {
        if merged.contains_key(k) {
            return Err(ArgsError(format!("got multiple values for argument `{k}`")));
        }
        merged.insert(k.clone(), v.clone());
    }
    serde_json::from_value::<T>(Value::Object(merged)).map_err(|e| fit_error("mixed", &e))
}

fn fit_error(kind: &str, e: &serde_json::Error) -> ArgsError {
    ArgsError(format!(
        "{kind} arguments do not fit the task's signature: {e}"
    ))
}

/// The field names of `T` if it deserializes as a struct with named fields.
fn struct_fields<T: DeserializeOwned>() -> Option<&'static [&'static str]> {
    let mut probe = FieldProbe { fields: None };
    let _ = T::deserialize(&mut probe);
    probe.fields.filter(|f| !f.is_empty())
}

/// A deserializer that only records the field list `deserialize_struct` is called with, then stops.
struct FieldProbe {
    fields: Option<&'static [&'static str]>,
}

#[derive(Debug)]
struct Stop;

impl std::fmt::Display for Stop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("probe")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<M: std::fmt::Display>(_: M) -> Self {
        Stop
    }
}

impl<'de> de::Deserializer<'de> for &mut FieldProbe {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(Stop)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        _: V,
    ) -> Result<V::Value, Stop> {
        self.fields = Some(fields);
        Err(Stop)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf option unit
        unit_struct newtype_struct seq tuple tuple_struct map enum identifier ignored_any
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use serde_json::json;

    #[derive(Debug, Deserialize, PartialEq)]
    struct Add {
        x: i64,
        y: i64,
    }

    fn kw(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn positional_keyword_and_mixed_calls_reach_a_struct() {
        assert_eq!(
            from_call::<Add>(&[json!(2), json!(3)], &Map::new()),
            Ok(Add { x: 2, y: 3 })
        );
        assert_eq!(
            from_call::<Add>(&[], &kw(json!({"y": 3, "x": 2}))),
            Ok(Add { x: 2, y: 3 })
        );
        assert_eq!(
            from_call::<Add>(&[json!(2)], &kw(json!({"y": 3}))),
            Ok(Add { x: 2, y: 3 })
        );
    }

    #[test]
    fn tuples_single_values_and_unit() {
        assert_eq!(
            from_call::<(i64, i64)>(&[json!(2), json!(3)], &Map::new()),
            Ok((2, 3))
        );
        assert_eq!(from_call::<u64>(&[json!(7)], &Map::new()), Ok(7));
        assert_eq!(
            from_call::<Vec<i64>>(&[json!(1), json!(2)], &Map::new()),
            Ok(vec![1, 2])
        );
        assert_eq!(from_call::<()>(&[], &Map::new()), Ok(()));
        assert_eq!(
            from_call::<Map<String, Value>>(&[], &kw(json!({"a": 1}))).map(|m| m.len()),
            Ok(1)
        );
    }

    #[test]
    fn mismatches_are_clear_errors() {
        let e = from_call::<Add>(&[json!("two"), json!(3)], &Map::new()).unwrap_err();
        assert!(e.0.contains("positional arguments do not fit"), "{e}");
        let e =
            from_call::<Add>(&[json!(1), json!(2), json!(3)], &kw(json!({"z": 1}))).unwrap_err();
        assert!(e.0.contains("takes 2 arguments"), "{e}");
        let e = from_call::<Add>(&[json!(1)], &kw(json!({"x": 1}))).unwrap_err();
        assert!(e.0.contains("multiple values for argument `x`"), "{e}");
        let e = from_call::<(i64, i64)>(&[json!(1)], &kw(json!({"y": 1}))).unwrap_err();
        assert!(e.0.contains("positional arguments only"), "{e}");
        assert!(from_call::<Add>(&[], &kw(json!({"x": 1}))).is_err());
    }
}
