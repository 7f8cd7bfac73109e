//! etcd's and tonic's errors as [`StoreError`]s: the cause chain, what a
//! refusal (password, certificate, permission) says to fix, and which
//! errors mean an expired token or a lease not found.

use crate::StoreError;

/// An error with its sources, deduplicated: tonic's "transport error"
/// alone says nothing; the rustls or etcd cause is further down.
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut cur = Some(e);
    while let Some(err) = cur {
        let s = err.to_string();
        if !s.is_empty() && !parts.iter().any(|p| p.contains(&s)) {
            parts.push(s);
        }
        cur = err.source();
    }
    parts.join(": ")
}

/// Whether `text` (an error [`chain`]) is etcd or the TLS layer refusing
/// us, rather than etcd being unreachable: what was refused and what to do.
/// `sent_cert`: whether pier presented a client certificate (None: no TLS).
pub(crate) fn refusal(text: &str, user: Option<&str>, sent_cert: Option<bool>) -> Option<String> {
    let t = text.to_ascii_lowercase();
    if t.contains("invalid peer certificate") {
        return Some(
            "etcd's server certificate is not trusted: it was not issued by the CA pier was given, or does not name the host or IP address of the endpoint; give the CA that issued it, and an endpoint its certificate names"
                .into(),
        );
    }
    let bad_cert = t.contains("badcertificate") || t.contains("bad certificate");
    if t.contains("certificaterequired")
        || t.contains("certificate required")
        || (bad_cert && sent_cert == Some(false))
    {
        return Some(
            "etcd requires a client certificate (--client-cert-auth) and pier sent none; give pier a client certificate and key issued by etcd's --trusted-ca-file"
                .into(),
        );
    }
    if bad_cert
        || t.contains("unknownca")
        || t.contains("unknown ca")
        || t.contains("unsupportedcertificate")
        || t.contains("certificateexpired")
    {
        return Some(
            "etcd refused pier's client certificate: it must be issued by etcd's --trusted-ca-file CA, valid now, and usable for client authentication"
                .into(),
        );
    }
    if t.contains("authentication failed") {
        let u = user.unwrap_or("");
        return Some(format!(
            "etcd refused the user {u:?} or its password; check the user exists (`etcdctl user get {u}`) and the password"
        ));
    }
    if t.contains("user name is empty") || t.contains("user name not found") {
        return Some(match user {
            None => "etcd has authentication enabled and pier gave no user; give pier an etcd user and its password".into(),
            Some(u) => format!("etcd does not know the user {u:?}; add it with `etcdctl user add {u}`"),
        });
    }
    if t.contains("permission denied") {
        return Some(match user {
            Some(u) => format!(
                "the etcd user {u:?} may not read or write pier's keys; grant it a role with `etcdctl role grant-permission ROLE --prefix=true readwrite /pier/`"
            ),
            None => "etcd has authentication on and pier gave no user (etcd took the client certificate's CN as the user, and that user may not read /pier/); give pier an etcd user and its password, or grant the CN's user `readwrite /pier/`".into(),
        });
    }
    if t.contains("http2") && t.contains("frame") || t.contains("corrupt message") {
        return Some(
            "the endpoint does not speak what pier sent: plaintext to a TLS port, or TLS to a plaintext one; write https:// endpoints (etcds://) for a TLS etcd and http:// (etcd://) for a plain one"
                .into(),
        );
    }
    None
}

/// etcd's answer to a token it no longer accepts (expired, or another
/// member's).
pub(crate) fn is_invalid_token(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::GRpcStatus(s) => {
            format!("{:?}", s.code()) == "Unauthenticated"
                || s.message().contains("invalid auth token")
        }
        etcd_client::Error::WatchError(m) => m.contains("invalid auth token"),
        _ => false,
    }
}

/// Maps an etcd-client error to a `StoreError` naming what was being done.
pub(crate) fn map_err(what: &str, e: etcd_client::Error) -> StoreError {
    if e.to_string().contains("lease not found") {
        // Not retryable; the caller turns it into `LeaseNotFound(id)`.
        return StoreError::NoSuchLease {
            what: what.to_owned(),
        };
    }
    match e {
        etcd_client::Error::GRpcStatus(status) => {
            let msg = status.message();
            let code = format!("{:?}", status.code());
            if msg.contains("required revision has been compacted") {
                // The caller fills in the revisions it knows.
                return StoreError::Compacted {
                    requested: 0,
                    compact_revision: 0,
                };
            }
            if msg.contains("future revision") {
                return StoreError::Invalid(format!("{what}: {msg}"));
            }
            match code.as_str() {
                "Unavailable" | "DeadlineExceeded" | "Cancelled" | "Aborted" | "Unknown"
                | "ResourceExhausted" => {
                    let cause = std::error::Error::source(&status)
                        .map(|c| format!(" ({})", chain(c)))
                        .unwrap_or_default();
                    StoreError::Unavailable(format!("{what}: {code}: {msg}{cause}"))
                }
                "InvalidArgument" | "FailedPrecondition" | "OutOfRange" => {
                    StoreError::Invalid(format!("{what}: {msg}"))
                }
                _ => StoreError::Refused {
                    what: what.to_owned(),
                    code,
                    message: msg.to_owned(),
                },
            }
        }
        etcd_client::Error::TransportError(err) => {
            StoreError::Unavailable(format!("{what}: transport: {}", chain(&err)))
        }
        etcd_client::Error::IoError(err) => StoreError::Unavailable(format!("{what}: io: {err}")),
        etcd_client::Error::WatchError(err) | etcd_client::Error::LeaseKeepAliveError(err) => {
            StoreError::Unavailable(format!("{what}: {err}"))
        }
        other => StoreError::Client {
            what: what.to_owned(),
            message: other.to_string(),
        },
    }
}

pub(crate) fn is_lease_not_found(e: &StoreError) -> bool {
    matches!(e, StoreError::NoSuchLease { .. })
}
