//! A deserializer over a parsed `toml::Value` that knows where it is, so that every error,
//! serde's own (unknown field, missing field, wrong type) or ours, carries the dotted path.

use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

#[derive(Debug)]
pub(super) struct PathError {
    /// Set by the innermost deserializer that saw the error.
    pub(super) path: Option<String>,
    pub(super) message: String,
}

impl fmt::Display for PathError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for PathError {}

impl de::Error for PathError {
    fn custom<T: fmt::Display>(msg: T) -> Self {
        PathError {
            path: None,
            message: msg.to_string(),
        }
    }
}

fn at(path: &str) -> impl FnOnce(PathError) -> PathError + '_ {
    move |mut e| {
        if e.path.is_none() {
            e.path = Some(path.to_owned());
        }
        e
    }
}

/// `parent.key`, quoting the key unless it is a TOML bare key.
fn child_key(parent: &str, key: &str) -> String {
    let bare = !key.is_empty()
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    let key = if bare {
        key.to_owned()
    } else {
        // TOML basic-string escaping, which matches Rust's for what matters here.
        let mut q = String::from("\"");
        for c in key.chars() {
            match c {
                '"' => q.push_str("\\\""),
                '\\' => q.push_str("\\\\"),
                c if c.is_control() => q.push_str(&format!("\\u{:04X}", c as u32)),
                c => q.push(c),
            }
        }
        q.push('"');
        q
    };
    if parent.is_empty() {
        key
    } else {
        format!("{parent}.{key}")
    }
}

pub(super) struct ValueDe<'a> {
    pub(super) value: &'a toml::Value,
    pub(super) path: String,
}

impl<'de> Deserializer<'de> for ValueDe<'_> {
    type Error = PathError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        let path = &self.path;
        match self.value {
            toml::Value::String(s) => visitor.visit_str(s),
            toml::Value::Integer(i) => visitor.visit_i64(*i),
            toml::Value::Float(x) => visitor.visit_f64(*x),
            toml::Value::Boolean(b) => visitor.visit_bool(*b),
            toml::Value::Datetime(d) => visitor.visit_string(d.to_string()),
            toml::Value::Array(a) => visitor.visit_seq(SeqDe {
                iter: a.iter().enumerate(),
                path,
            }),
            toml::Value::Table(t) => visitor.visit_map(MapDe {
                iter: t.iter(),
                pending: None,
                path,
            }),
        }
        .map_err(at(path))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        let path = self.path.clone();
        visitor.visit_some(self).map_err(at(&path))
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, PathError> {
        let path = self.path.clone();
        visitor.visit_newtype_struct(self).map_err(at(&path))
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}

struct SeqDe<'a, I> {
    iter: I,
    path: &'a str,
}

impl<'de, 'a, I: Iterator<Item = (usize, &'a toml::Value)>> SeqAccess<'de> for SeqDe<'a, I> {
    type Error = PathError;

    fn next_element_seed<T: DeserializeSeed<'de>>(
        &mut self,
        seed: T,
    ) -> Result<Option<T::Value>, PathError> {
        let Some((i, value)) = self.iter.next() else {
            return Ok(None);
        };
        let path = format!("{}[{i}]", self.path);
        // `at` here too: `try_from` types fail after the value deserializer returned.
        seed.deserialize(ValueDe {
            value,
            path: path.clone(),
        })
        .map(Some)
        .map_err(at(&path))
    }
}

struct MapDe<'a, I> {
    iter: I,
    pending: Option<(&'a toml::Value, String)>,
    path: &'a str,
}

impl<'de, 'a, I: Iterator<Item = (&'a String, &'a toml::Value)>> MapAccess<'de> for MapDe<'a, I> {
    type Error = PathError;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, PathError> {
        let Some((key, value)) = self.iter.next() else {
            return Ok(None);
        };
        let path = child_key(self.path, key);
        let k = seed.deserialize(KeyDe { key }).map_err(at(&path))?;
        self.pending = Some((value, path));
        Ok(Some(k))
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, PathError> {
        let (value, path) = self
            .pending
            .take()
            .ok_or_else(|| de::Error::custom("value asked before key"))?;
        seed.deserialize(ValueDe {
            value,
            path: path.clone(),
        })
        .map_err(at(&path))
    }
}

struct KeyDe<'a> {
    key: &'a str,
}

impl<'de> Deserializer<'de> for KeyDe<'_> {
    type Error = PathError;

    fn deserialize_any<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, PathError> {
        visitor.visit_str(self.key)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, PathError> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf option unit unit_struct seq tuple tuple_struct map struct enum
        identifier ignored_any
    }
}
