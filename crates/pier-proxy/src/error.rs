//! The crate's error type.

use std::io;
use std::net::SocketAddr;

/// Which side of a proxied connection an error came from. Retry decisions
/// and metrics read it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The client that connected to a VIP or node port.
    Downstream,
    /// The endpoint (or the mesh hop towards it).
    Upstream,
    /// The proxy itself (pipes, file descriptors, configuration).
    Internal,
}

impl std::fmt::Display for Side {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        })
    }
}

/// Why a connect to an endpoint failed; the `cause` label of the
/// connect-error metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectCause {
    Timeout,
    Refused,
    Unreachable,
    Mesh,
    Other,
}

impl ConnectCause {
    pub const ALL: [ConnectCause; 5] = [
        ConnectCause::Timeout,
        ConnectCause::Refused,
        ConnectCause::Unreachable,
        ConnectCause::Mesh,
        ConnectCause::Other,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectCause::Timeout => "timeout",
            ConnectCause::Refused => "refused",
            ConnectCause::Unreachable => "unreachable",
            ConnectCause::Mesh => "mesh",
            ConnectCause::Other => "other",
        }
    }
    pub(crate) fn of_io(e: &io::Error) -> ConnectCause {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => ConnectCause::Refused,
            io::ErrorKind::TimedOut => ConnectCause::Timeout,
            io::ErrorKind::HostUnreachable | io::ErrorKind::NetworkUnreachable => {
                ConnectCause::Unreachable
            }
            _ => ConnectCause::Other,
        }
    }
}

impl std::fmt::Display for ConnectCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("proxy config: {field}: {why}")]
    Config { field: &'static str, why: String },
    #[error("interface {iface}: {op}: {source}")]
    Netlink {
        iface: String,
        op: String,
        #[source]
        source: rtnetlink::Error,
    },
    #[error("interface {iface}: {why}")]
    Iface { iface: String, why: String },
    #[error("bind {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("connect {endpoint} ({cause}): {source}")]
    Connect {
        endpoint: SocketAddr,
        cause: ConnectCause,
        #[source]
        source: io::Error,
    },
    #[error("{side} i/o: {source}")]
    Io {
        side: Side,
        #[source]
        source: io::Error,
    },
}
