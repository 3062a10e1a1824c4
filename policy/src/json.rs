//! Parsing JSON bodies the way a security check must: an object with the
//! same member twice is refused, because parsers disagree on which copy
//! counts (serde_json keeps the last, many backends the first), and a check
//! that reads one copy while the app reads the other checks nothing.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, Error as _, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

/// Parses `bytes` as one JSON value, refusing duplicate object members.
pub fn parse_unambiguous(bytes: &[u8]) -> Result<Value, serde_json::Error> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = UniqueKeys.deserialize(&mut de)?;
    de.end()?;
    Ok(value)
}

struct UniqueKeys;

impl<'de> DeserializeSeed<'de> for UniqueKeys {
    type Value = Value;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Value, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for UniqueKeys {
    type Value = Value;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_bool<E>(self, v: bool) -> Result<Value, E> {
        Ok(Value::Bool(v))
    }
    fn visit_i64<E>(self, v: i64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_u64<E>(self, v: u64) -> Result<Value, E> {
        Ok(Value::from(v))
    }
    fn visit_f64<E>(self, v: f64) -> Result<Value, E> {
        Ok(serde_json::Number::from_f64(v).map_or(Value::Null, Value::Number))
    }
    fn visit_str<E>(self, v: &str) -> Result<Value, E> {
        Ok(Value::String(v.to_owned()))
    }
    fn visit_string<E>(self, v: String) -> Result<Value, E> {
        Ok(Value::String(v))
    }
    fn visit_unit<E>(self) -> Result<Value, E> {
        Ok(Value::Null)
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Value, A::Error> {
        let mut items = Vec::new();
        while let Some(item) = seq.next_element_seed(UniqueKeys)? {
            items.push(item);
        }
        Ok(Value::Array(items))
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Value, A::Error> {
        let mut object = Map::new();
        while let Some(key) = map.next_key::<String>()? {
            let value = map.next_value_seed(UniqueKeys)?;
            if object.insert(key, value).is_some() {
                return Err(A::Error::custom("an object has the same member twice"));
            }
        }
        Ok(Value::Object(object))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_like_serde_json() {
        let text = br#"{"a": [1, -2, 3.5, "x", null, true], "b": {"c": {}}}"#;
        let expected: Value = serde_json::from_slice(text).unwrap();
        assert_eq!(parse_unambiguous(text).unwrap(), expected);
    }

    #[test]
    fn refuses_duplicate_members_at_any_depth() {
        assert!(parse_unambiguous(br#"{"amount": 1, "amount": 99999}"#).is_err());
        assert!(parse_unambiguous(br#"{"a": [{"k": 1, "k": 2}]}"#).is_err());
        // The same name in different objects is fine.
        assert!(parse_unambiguous(br#"[{"k": 1}, {"k": 2}]"#).is_ok());
    }

    #[test]
    fn refuses_trailing_data_and_deep_nesting() {
        assert!(parse_unambiguous(br#"{"a": 1} {"b": 2}"#).is_err());
        let deep = "[".repeat(10_000);
        assert!(parse_unambiguous(deep.as_bytes()).is_err());
    }
}
