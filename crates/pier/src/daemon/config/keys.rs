//! Every key the config parser accepts, found by asking serde itself (not a
//! hand-written list): a recording `Deserializer` hands each struct's
//! `Deserialize` one key at a time and notes the field names serde's derive
//! passes to `deserialize_struct`. Used to check that config/pier.toml
//! documents every key.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, IntoDeserializer, MapAccess, Visitor};

/// A key path (`["dns", "upstreams"]`) and whether it holds a struct of its
/// own (its keys are listed too) or a value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Key {
    pub path: Vec<String>,
    pub is_struct: bool,
}

#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("recorded")
    }
}
impl std::error::Error for Stop {}
impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

/// What one run found at the end of its path.
#[derive(Debug, Default)]
enum Found {
    #[default]
    Nothing,
    Fields(Vec<&'static str>),
    Value,
}

/// Deserializes along `path` (one key per struct level), then records what
/// sits at its end and stops.
struct Recorder<'a> {
    path: &'a [String],
    found: &'a RefCell<Found>,
}

impl<'de> Deserializer<'de> for Recorder<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        if self.path.is_empty() {
            *self.found.borrow_mut() = Found::Value;
        }
        Err(Stop)
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.path.split_first() {
            None => {
                *self.found.borrow_mut() = Found::Fields(fields.to_vec());
                Err(Stop)
            }
            Some((key, rest)) => visitor.visit_map(OneKey {
                key: Some(key),
                rest,
                found: self.found,
            }),
        }
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct map enum
        identifier ignored_any
    }
}

/// A map with one key, the next on the path; its value goes on down.
struct OneKey<'a> {
    key: Option<&'a String>,
    rest: &'a [String],
    found: &'a RefCell<Found>,
}

impl<'de> MapAccess<'de> for OneKey<'_> {
    type Error = Stop;

    fn next_key_seed<K: DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(k) => {
                let d: de::value::StrDeserializer<'_, Stop> = k.as_str().into_deserializer();
                seed.deserialize(d).map(Some)
            }
            None => Ok(None),
        }
    }

    fn next_value_seed<V: DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        seed.deserialize(Recorder {
            path: self.rest,
            found: self.found,
        })
    }
}

/// Every key of `T` and of the structs below it, depth first.
pub fn accepted_keys<T: for<'de> serde::Deserialize<'de>>() -> Vec<Key> {
    let mut out = Vec::new();
    let mut todo: Vec<Vec<String>> = vec![Vec::new()];
    while let Some(path) = todo.pop() {
        let found = RefCell::new(Found::Nothing);
        let _ = T::deserialize(Recorder {
            path: &path,
            found: &found,
        });
        match found.into_inner() {
            Found::Fields(fields) => {
                if !path.is_empty() {
                    out.push(Key {
                        path: path.clone(),
                        is_struct: true,
                    });
                }
                for f in fields.iter().rev() {
                    let mut p = path.clone();
                    p.push((*f).to_owned());
                    todo.push(p);
                }
            }
            Found::Value | Found::Nothing => out.push(Key {
                path,
                is_struct: false,
            }),
        }
    }
    out
}
