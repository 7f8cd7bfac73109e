//! The mTLS mesh between agents: a proxy that picks an endpoint on another
//! node reaches it through that node's mesh port.
//!
//! - [`MeshConnector`] (client side): TLS 1.3 with this node's certificate,
//!   the peer verified as `peer_node` against the mesh CA; then the header
//!   naming the target; then the peer's one-byte reply. Sessions resume
//!   with TLS 1.3 tickets, and a small pool of pre-handshaken connections per
//!   peer takes the handshake off the connect path (the proxy warms a
//!   peer's pool as soon as one of its endpoints appears).
//! - [`MeshServer`] (listener): TLS 1.3 only, client certificate required.
//!   The peer's certificate must name a node of the cluster and be neither
//!   revoked nor expired (checked after every handshake, resumed ones
//!   too). The target must be a ready endpoint that this node's own agent
//!   found in its own Docker ([`LocalTargets`]), whatever the store says;
//!   anything else is refused with a reply code and logged at warn. The
//!   mesh is never an open relay.
//!
//! Wire format after the handshake (ALPN `pier-mesh/1`):
//!
//! ```text
//! client → server: version(1)=2 | family(1)=4|6 (+16: UDP) | ip(4|16) | port(2, BE)
//! server → client: code(1): 0 accepted, then the stream both ways;
//!                  non-zero: refused (see RefusalCode), then close.
//! each direction of a stream ends with an empty application_data record;
//! once both have, the client may send the next header on the same tunnel.
//! A UDP target's stream is datagrams, each len(2, BE) | payload, both
//! ways, until either side closes; such a tunnel is not reused.
//! ```
//!
//! The client sends nothing after the header until the reply, and the
//! server writes the reply in a record of its own: at that point both
//! sides hand the connection from rustls to the record layer in
//! [`record`] (see [`stream`]). It is still TLS 1.3 on the wire. A tunnel
//! that ends in the middle of a stream (no end marker) is an error
//! (truncation), not an EOF, and is never reused; a tunnel whose stream
//! ended cleanly both ways carries the next connection to the same peer
//! without a TCP or TLS handshake, as an HTTP/1.1 keep-alive connection
//! would. Each header is checked against this node's own view like the first.
//!
//! Certificates renewed on disk are picked up for new handshakes only;
//! established tunnels are not dropped by a renewal. A new revocation list
//! (`crl.pem` beside `ca.pem`) cuts every tunnel whose peer it revokes,
//! within [`RELOAD_POLL`]; a tunnel carries no new stream after
//! [`MAX_TUNNEL_AGE`] or past its peer certificate's expiry.

mod client;
#[doc(hidden)]
pub mod fuzzing;
mod record;
mod server;
mod stream;

use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

pub use crate::tls::MeshConfig;
pub use client::MeshConnector;
pub use server::MeshServer;
pub(crate) use server::handshake_reason;
pub use stream::MeshStream;
pub(crate) use stream::{peer_cut, reset_on_close};

use pier_model::Protocol;

use crate::tls::TlsError;

/// What a mesh listener may relay to: the `ip:port` of every port of
/// every ready endpoint that this node's agent found in its own Docker
/// (fed by the agent, never read from the store).
pub type LocalTargets = std::collections::HashSet<SocketAddr>;

/// The header's version byte. 2: streams end with an end marker and
/// tunnels are reused (1, before, ended a tunnel with close_notify).
pub const HEADER_VERSION: u8 = 2;
/// The reply byte of an accepted target.
pub const REPLY_OK: u8 = 0;

/// How often the certificate files are checked for a renewal. 2 s: a
/// renewal is noticed well within a handshake timeout, and three `stat`s
/// every 2 s cost nothing.
pub const RELOAD_POLL: Duration = Duration::from_secs(2);
/// A TLS handshake that takes longer than this is abandoned (both sides).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the server waits for the header after the handshake. Longer
/// than [`POOL_IDLE_MAX`] so that pooled connections are still open when
/// the client uses them.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(30);
/// A pooled connection older than this is closed instead of used.
pub const POOL_IDLE_MAX: Duration = Duration::from_secs(10);
/// How long the client waits for the reply byte (the server connects to
/// the target first, with [`TARGET_CONNECT_TIMEOUT`]).
pub const REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The server's connect timeout to the target.
pub const TARGET_CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// After cancel, open tunnels get this long to finish before they are cut.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// A tunnel carries no new stream once it is this old (the stream it
/// carries then goes on: a stream is cut only when its peer's certificate
/// is revoked or expires). 1 h: reuse saves a handshake per connection,
/// an hour of it is plenty, and a tunnel's keys do not live on for days.
pub const MAX_TUNNEL_AGE: Duration = Duration::from_secs(3600);
/// Warm connections kept per peer by default.
pub const DEFAULT_POOL_SIZE: usize = 2;
/// At most this many idle tunnels (whose stream ended cleanly) are kept
/// per peer for the next connects; more are closed.
pub const MAX_IDLE_TUNNELS: usize = 32;

/// Why the server refused a target; the non-zero reply byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RefusalCode {
    /// Unknown version, family or a short header.
    BadHeader = 1,
    /// The target is not an endpoint registered on this node (unknown, or
    /// another node's endpoint, or a static endpoint).
    NotLocalEndpoint = 2,
    /// The target is a local endpoint that is not ready.
    NotReady = 3,
    /// The target is a ready local endpoint but the connect failed.
    ConnectFailed = 4,
    /// The peer's certificate is valid but the listener does not take it:
    /// it names no node of the cluster, or it was revoked or expired.
    /// Sent right after the handshake, before any header is read.
    PeerNotAllowed = 5,
    /// A code this version does not know.
    Other = 255,
}

impl RefusalCode {
    pub fn from_byte(b: u8) -> RefusalCode {
        match b {
            1 => RefusalCode::BadHeader,
            2 => RefusalCode::NotLocalEndpoint,
            3 => RefusalCode::NotReady,
            4 => RefusalCode::ConnectFailed,
            5 => RefusalCode::PeerNotAllowed,
            _ => RefusalCode::Other,
        }
    }
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::BadHeader => "bad_header",
            RefusalCode::NotLocalEndpoint => "not_local_endpoint",
            RefusalCode::NotReady => "not_ready",
            RefusalCode::ConnectFailed => "connect_failed",
            RefusalCode::PeerNotAllowed => "peer_not_allowed",
            RefusalCode::Other => "other",
        }
    }
}

impl fmt::Display for RefusalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MeshError {
    #[error("mesh identity: {0}")]
    Tls(#[from] TlsError),
    #[error("node name {0:?} is not a valid TLS server name")]
    ServerName(String),
    #[error("connect to mesh peer {node} at {peer}: {source}")]
    Connect {
        peer: SocketAddr,
        node: String,
        #[source]
        source: io::Error,
    },
    #[error("TLS handshake with mesh peer {node} at {peer}: {source}")]
    Handshake {
        peer: SocketAddr,
        node: String,
        #[source]
        source: io::Error,
    },
    #[error("mesh peer {node} at {peer}, target {target}: {source}")]
    Io {
        peer: SocketAddr,
        node: String,
        target: SocketAddr,
        #[source]
        source: io::Error,
    },
    #[error("mesh peer {node} at {peer} refused target {target}: {code}")]
    Refused {
        peer: SocketAddr,
        node: String,
        target: SocketAddr,
        code: RefusalCode,
    },
    #[error("mesh peer {node} at {peer}: its certificate is {reason}; not used")]
    PeerRejected {
        peer: SocketAddr,
        node: String,
        reason: &'static str,
    },
    #[error("timed out {what} mesh peer {node} at {peer}")]
    Timeout {
        what: &'static str,
        peer: SocketAddr,
        node: String,
    },
    #[error("mesh listener: {0}")]
    Listener(#[source] io::Error),
}

impl MeshError {
    /// The peer refused the target (as opposed to a transport failure).
    pub fn refusal(&self) -> Option<RefusalCode> {
        match self {
            MeshError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }
}

/// Added to the family byte for a UDP target. A peer of an earlier
/// version refuses it as a bad header (unknown family).
pub const FAMILY_UDP: u8 = 16;

/// The header naming a TCP `target`: at most 20 bytes.
pub fn encode_header(target: SocketAddr) -> Vec<u8> {
    encode_header_proto(target, Protocol::Tcp)
}

/// The header naming `target` over `proto`.
pub fn encode_header_proto(target: SocketAddr, proto: Protocol) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.push(HEADER_VERSION);
    let udp = if proto == Protocol::Udp {
        FAMILY_UDP
    } else {
        0
    };
    match target.ip() {
        IpAddr::V4(ip) => {
            h.push(4 + udp);
            h.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            h.push(6 + udp);
            h.extend_from_slice(&ip.octets());
        }
    }
    h.extend_from_slice(&target.port().to_be_bytes());
    h
}

/// Why a header could not be read.
#[derive(Debug)]
pub(crate) enum HeaderError {
    /// The client closed before sending anything (an unused pooled
    /// connection): not a refusal.
    Closed,
    Bad(&'static str),
    Io(io::Error),
}

/// Where a header is read from: the handshake phase's TLS connection
/// ([`stream::Setup`]), or bytes in tests.
pub(crate) trait ReadPlain {
    /// Up to `out.len()` bytes; 0 at EOF.
    async fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize>;
}

impl ReadPlain for &[u8] {
    async fn read_some(&mut self, out: &mut [u8]) -> io::Result<usize> {
        io::Read::read(self, out)
    }
}

pub(crate) async fn read_exact<R: ReadPlain>(r: &mut R, mut out: &mut [u8]) -> io::Result<()> {
    while !out.is_empty() {
        match r.read_some(out).await? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => out = &mut out[n..],
        }
    }
    Ok(())
}

/// A TCP target's header (the fuzz target's view).
pub(crate) async fn read_header<R: ReadPlain>(r: &mut R) -> Result<SocketAddr, HeaderError> {
    match read_header_proto(r).await? {
        (a, Protocol::Tcp) => Ok(a),
        (_, Protocol::Udp) => Err(HeaderError::Bad("unknown address family")),
    }
}

/// One datagram of a UDP stream: its length, then it.
pub(crate) async fn write_datagram<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    d: &[u8],
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let len = u16::try_from(d.len()).map_err(|_| io::Error::other("datagram over 65535 bytes"))?;
    let mut head = [0u8; 2];
    head.copy_from_slice(&len.to_be_bytes());
    // One write of both, so one record carries the datagram.
    let mut frame = Vec::with_capacity(2 + d.len());
    frame.extend_from_slice(&head);
    frame.extend_from_slice(d);
    w.write_all(&frame).await?;
    w.flush().await
}

/// The next datagram of a UDP stream into `buf`; its length.
pub(crate) async fn read_datagram<R: tokio::io::AsyncRead + Unpin>(
    r: &mut R,
    buf: &mut [u8],
) -> io::Result<usize> {
    use tokio::io::AsyncReadExt;
    let n = usize::from(r.read_u16().await?);
    if n > buf.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "datagram longer than the buffer",
        ));
    }
    r.read_exact(&mut buf[..n]).await?;
    Ok(n)
}

pub(crate) async fn read_header_proto<R: ReadPlain>(
    r: &mut R,
) -> Result<(SocketAddr, Protocol), HeaderError> {
    let mut head = [0u8; 2];
    let n = r.read_some(&mut head[..1]).await.map_err(HeaderError::Io)?;
    if n == 0 {
        return Err(HeaderError::Closed);
    }
    read_exact(r, &mut head[1..]).await.map_err(short)?;
    if head[0] != HEADER_VERSION {
        return Err(HeaderError::Bad("unknown header version"));
    }
    let (family, proto) = if head[1] >= FAMILY_UDP {
        (head[1] - FAMILY_UDP, Protocol::Udp)
    } else {
        (head[1], Protocol::Tcp)
    };
    let ip = match family {
        4 => {
            let mut b = [0u8; 4];
            read_exact(r, &mut b).await.map_err(short)?;
            IpAddr::V4(Ipv4Addr::from(b))
        }
        6 => {
            let mut b = [0u8; 16];
            read_exact(r, &mut b).await.map_err(short)?;
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return Err(HeaderError::Bad("unknown address family")),
    };
    let mut p = [0u8; 2];
    read_exact(r, &mut p).await.map_err(short)?;
    Ok((SocketAddr::new(ip, u16::from_be_bytes(p)), proto))
}

fn short(e: io::Error) -> HeaderError {
    if e.kind() == io::ErrorKind::UnexpectedEof {
        HeaderError::Bad("short header")
    } else {
        HeaderError::Io(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn header_round_trips_v4_and_v6() {
        for t in ["10.1.2.3:8080", "[fd00::1]:443"] {
            let t: SocketAddr = t.parse().unwrap();
            let h = encode_header(t);
            let got = read_header(&mut &h[..]).await.unwrap();
            assert_eq!(got, t);
            let h = encode_header_proto(t, Protocol::Udp);
            let got = read_header_proto(&mut &h[..]).await.unwrap();
            assert_eq!(got, (t, Protocol::Udp));
        }
    }

    #[tokio::test]
    async fn datagrams_keep_their_bounds() {
        let mut wire = Vec::new();
        for d in [&b"one"[..], b"", &[7u8; 1500][..]] {
            write_datagram(&mut wire, d).await.unwrap();
        }
        let mut r = &wire[..];
        let mut buf = vec![0u8; 2000];
        assert_eq!(read_datagram(&mut r, &mut buf).await.unwrap(), 3);
        assert_eq!(&buf[..3], b"one");
        assert_eq!(read_datagram(&mut r, &mut buf).await.unwrap(), 0);
        assert_eq!(read_datagram(&mut r, &mut buf).await.unwrap(), 1500);
        assert!(read_datagram(&mut r, &mut buf).await.is_err());
    }

    #[tokio::test]
    async fn bad_headers_are_rejected() {
        assert!(matches!(
            read_header(&mut &[][..]).await,
            Err(HeaderError::Closed)
        ));
        assert!(matches!(
            read_header(&mut &[1u8, 4, 1, 2, 3, 4, 0, 80][..]).await,
            Err(HeaderError::Bad(_))
        ));
        assert!(matches!(
            read_header(&mut &[2u8, 5, 1, 2, 3, 4, 0, 80][..]).await,
            Err(HeaderError::Bad(_))
        ));
        assert!(matches!(
            read_header(&mut &[2u8, 4, 1, 2][..]).await,
            Err(HeaderError::Bad("short header"))
        ));
    }
}
