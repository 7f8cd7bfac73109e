//! pier's vocabulary, shared by every other crate.
//!
//! This crate holds the validated names ([`Name`], [`Namespace`], [`PortNum`],
//! [`Replicas`], [`Cidr`]), the objects kept in the store ([`Node`],
//! [`Service`], [`ReplicaSet`], [`Pod`], [`PodStatus`], [`Endpoint`],
//! [`Stats`], the autoscaler's [`autoscale::AutoscaleStatus`]), the mergeable
//! latency [`sketch`], the key schema ([`keys`], the only place that formats or
//! parses a store key), and the immutable [`Snapshot`] that every reader
//! works from.
//!
//! It is not a store client and does no I/O: no tokio, no sockets, no files.

mod names;
mod objects;
mod placement;
mod rollout;
mod snapshot;

pub mod addr;
pub mod api;
pub mod app;
pub mod autoscale;
pub mod keys;
pub mod sketch;

pub use names::{
    Cidr, Name, NameError, Namespace, PortNum, Replicas, check_external_name, is_dns_label,
};
pub use objects::*;
pub use placement::{Constraint, ConstraintField, ConstraintOp, Placement, valid_label_key};
pub use rollout::{
    FailureAction, Ratio, Rollout, RolloutState, TemplateRevision, UpdateConfig, UpdateOrder,
};
pub use snapshot::{DiffItem, EndpointKey, EndpointMap, Map, ObjectKey, Snapshot};

/// The default namespace, as in Kubernetes.
pub const DEFAULT_NAMESPACE: &str = "default";

/// Wall-clock milliseconds since the Unix epoch: the timestamps objects
/// carry (`created_at`, `started_at`, `stale_since_ms`, ...); 0 if the
/// clock is set before 1970. The one clock helper every crate uses.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Decode a stored value, naming the key in the error.
///
/// Lenient about fields: a field this version does not know is skipped, so
/// that during a rolling upgrade an older agent still reads the records a
/// newer one writes (every field added since the first release has a
/// default). What a person writes is read with [`deserialize_strict`].
pub fn decode<T: serde::de::DeserializeOwned>(key: &str, value: &[u8]) -> Result<T, DecodeError> {
    serde_json::from_slice(value).map_err(|source| DecodeError {
        key: key.to_owned(),
        source,
    })
}

/// Deserialize what a person wrote (an API request's body, a Compose
/// file's `x-pier` block) strictly: as serde does, and then a field that no
/// type knows is an error naming its path (`template.imagee`), since it is
/// almost always a typo. The model's types themselves accept unknown fields
/// (see [`decode`]), so this is where input is held to them.
pub fn deserialize_strict<'de, D, T>(de: D) -> Result<T, StrictError<D::Error>>
where
    D: serde::Deserializer<'de>,
    T: serde::Deserialize<'de>,
{
    let mut unknown = Vec::new();
    let value = serde_ignored::deserialize(de, |path| unknown.push(path.to_string()))
        .map_err(StrictError::Invalid)?;
    if unknown.is_empty() {
        Ok(value)
    } else {
        Err(StrictError::Unknown(unknown))
    }
}

/// Why [`deserialize_strict`] refused its input.
#[derive(Debug, thiserror::Error)]
pub enum StrictError<E: std::error::Error + 'static> {
    /// The input does not fit the type (serde's own error).
    #[error(transparent)]
    Invalid(E),
    /// The input fits, but carries fields no type knows: their paths.
    #[error("{}", unknown_fields_message(.0))]
    Unknown(Vec<String>),
}

/// "unknown field `x.y`" or "unknown fields `a`, `b`", with what to do.
fn unknown_fields_message(paths: &[String]) -> String {
    let list = paths
        .iter()
        .map(|p| format!("`{p}`"))
        .collect::<Vec<_>>()
        .join(", ");
    let s = if paths.len() == 1 { "" } else { "s" };
    format!(
        "unknown field{s} {list}: check the spelling (this version of pier does not know it), or remove it"
    )
}

/// Encode a value for the store. Model objects always serialize.
pub fn encode<T: serde::Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("model objects serialize to JSON")
}

/// A stored value that could not be parsed.
#[derive(Debug, thiserror::Error)]
#[error("value at key {key:?} does not parse: {source}")]
pub struct DecodeError {
    pub key: String,
    #[source]
    pub source: serde_json::Error,
}
