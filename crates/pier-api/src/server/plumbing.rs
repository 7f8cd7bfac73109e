//! HTTP plumbing: the error answer ([`Fail`]), JSON bodies in and out, and
//! the parsing of path segments and query parameters.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;
use http::{HeaderValue, Method, Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use pier_model::api::{ErrorBody, Resource};
use pier_model::{Name, Namespace};
use pier_store::StoreError;
use pier_store::writes::WriteError;
use serde::Serialize;
use serde::de::DeserializeOwned;

pub(super) type Body = BoxBody<Bytes, Infallible>;
pub(super) type BoxFut<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// An error answer.
#[derive(Debug)]
pub(super) struct Fail {
    pub(super) status: StatusCode,
    pub(super) message: String,
}

impl Fail {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> Fail {
        Fail {
            status,
            message: message.into(),
        }
    }
    pub(super) fn bad(message: impl Into<String>) -> Fail {
        Fail::new(StatusCode::BAD_REQUEST, message)
    }
    pub(super) fn not_found(message: impl Into<String>) -> Fail {
        Fail::new(StatusCode::NOT_FOUND, message)
    }
    pub(super) fn conflict(message: impl Into<String>) -> Fail {
        Fail::new(StatusCode::CONFLICT, message)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        match e {
            StoreError::Unavailable(_) | StoreError::Closed => Fail::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!("{e}; reads still answer from the last snapshot, writes need the store"),
            ),
            StoreError::Invalid(_) => Fail::bad(e.to_string()),
            _ => Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl From<WriteError> for Fail {
    fn from(e: WriteError) -> Fail {
        match e {
            WriteError::Store(s) => s.into(),
            WriteError::Invalid(_) => Fail::bad(e.to_string()),
            WriteError::NotFound { .. } => Fail::not_found(e.to_string()),
            WriteError::Corrupt { .. } => {
                Fail::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string())
            }
            WriteError::AlreadyExists(_)
            | WriteError::ReplicaSetExists { .. }
            | WriteError::Autoscaled { .. }
            | WriteError::Exhausted(_)
            | WriteError::NodePortTaken { .. }
            | WriteError::Conflict(_) => Fail::conflict(e.to_string()),
        }
    }
}

pub(super) fn full(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

pub(super) fn json<T: Serialize>(status: StatusCode, v: &T) -> Response<Body> {
    let mut b = serde_json::to_vec(v).expect("API responses serialize to JSON");
    b.push(b'\n');
    full(status, "application/json", b)
}

pub(super) fn fail_response(f: Fail) -> Response<Body> {
    json(f.status, &ErrorBody { error: f.message })
}

pub(super) async fn read_json<T: DeserializeOwned>(
    req: Request<Incoming>,
    max: usize,
) -> Result<T, Fail> {
    let too_big = || {
        Fail::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the request body is larger than {max} bytes (max_body_bytes)"),
        )
    };
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
        && len > max as u64
    {
        return Err(too_big());
    }
    let bytes = Limited::new(req.into_body(), max)
        .collect()
        .await
        .map_err(|e| {
            if e.downcast_ref::<LengthLimitError>().is_some() {
                too_big()
            } else {
                Fail::bad(format!("reading the request body: {e}"))
            }
        })?
        .to_bytes();
    if bytes.is_empty() {
        return Err(Fail::bad("the request needs a JSON body"));
    }
    // Strict: the model's types accept fields they do not know (an older
    // agent reads a newer one's records), so a request's unknown fields are
    // caught here, with their paths, as the typos they almost always are.
    let mut track = serde_path_to_error::Track::new();
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    pier_model::deserialize_strict(serde_path_to_error::Deserializer::new(de, &mut track)).map_err(
        |e| match e {
            pier_model::StrictError::Invalid(inner) => {
                let path = track.path().to_string();
                if path == "." || path.is_empty() {
                    Fail::bad(inner.to_string())
                } else {
                    Fail::bad(format!("{path}: {inner}"))
                }
            }
            unknown @ pier_model::StrictError::Unknown(_) => Fail::bad(unknown.to_string()),
        },
    )
}

pub(super) fn parse_ns(s: &str) -> Result<Namespace, Fail> {
    Namespace::new(s).map_err(|e| Fail::bad(format!("namespace: {e}")))
}

pub(super) fn parse_name(s: &str) -> Result<Name, Fail> {
    Name::new(s).map_err(|e| Fail::bad(format!("name: {e}")))
}

pub(super) fn parse_kind(s: &str) -> Result<Resource, Fail> {
    Resource::parse(s).ok_or_else(|| {
        Fail::not_found(format!(
            "unknown resource {:?}; the API serves {}",
            s.chars().take(40).collect::<String>(),
            Resource::VALID
        ))
    })
}

pub(super) fn wants_watch(req: &Request<Incoming>) -> Result<bool, Fail> {
    let Some(q) = req.uri().query() else {
        return Ok(false);
    };
    let mut watch = false;
    for pair in q.split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=').unwrap_or((pair, "true")) {
            ("watch", "true" | "1") => watch = true,
            ("watch", "false" | "0") => watch = false,
            ("watch", v) => {
                return Err(Fail::bad(format!("watch: {v:?} is not true or false")));
            }
            (k, _) => {
                return Err(Fail::bad(format!(
                    "query parameter {:?} is not known; only watch=true is",
                    k.chars().take(40).collect::<String>()
                )));
            }
        }
    }
    Ok(watch)
}

pub(super) fn method_not_allowed(m: &Method, path: &str) -> Fail {
    Fail::new(
        StatusCode::METHOD_NOT_ALLOWED,
        format!("{m} is not allowed on {path}"),
    )
}

pub(super) fn not_found(kind: Resource, ns: Option<&Namespace>, name: Option<&Name>) -> Fail {
    let name = name.map(|n| n.as_str()).unwrap_or("");
    Fail::not_found(match ns {
        Some(ns) => format!("{} {name:?} not found in namespace {ns:?}", kind.singular()),
        None => format!("{} {name:?} not found", kind.singular()),
    })
}
