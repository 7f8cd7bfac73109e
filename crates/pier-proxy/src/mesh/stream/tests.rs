use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use super::setup::{Send, Step};
use super::*;
use crate::Side;
use crate::copy::Counters;
use crate::mesh::read_exact;
use crate::mesh::record::tests::configs;
use rustls::client::UnbufferedClientConnection;
use rustls::server::UnbufferedServerConnection;

/// Both ends handshaken over loopback.
async fn handshaken() -> (Setup, Setup) {
    let (ccfg, scfg, name) = configs();
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
    let client = UnbufferedClientConnection::new(ccfg, name).expect("client");
    let server = UnbufferedServerConnection::new(scfg).expect("server");
    let mut c = Setup::new(c.expect("connect"), client);
    let mut s = Setup::new(s.expect("accept").0, server);
    let (a, b) = tokio::join!(c.handshake(), s.handshake());
    a.expect("client handshake");
    b.expect("server handshake");
    (c, s)
}

/// [`handshaken`], then the client's first message (`header`) read by
/// the server; the reply not yet sent.
async fn set_up(header: &[u8]) -> (Setup, Setup) {
    let (mut c, mut s) = handshaken().await;
    c.write_all(header).await.expect("header");
    let mut got = vec![0u8; header.len()];
    read_exact(&mut s, &mut got)
        .await
        .expect("server reads the header");
    assert_eq!(got, header);
    (c, s)
}

/// The reply, then both ends hand over to the record layer.
async fn tunnel(header: &[u8]) -> (MeshStream, MeshStream) {
    let (mut c, mut s) = set_up(header).await;
    s.write_all(&[0]).await.expect("reply");
    let s = s.into_stream().expect("server hands over");
    let mut b = [9u8];
    read_exact(&mut c, &mut b)
        .await
        .expect("client reads the reply");
    assert_eq!(b, [0]);
    (c.into_stream().expect("client hands over"), s)
}

#[tokio::test]
async fn both_ends_hand_over_and_close_cleanly() {
    let (mut c, mut s) = tunnel(b"header").await;
    let up: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
    c.write_all(&up).await.expect("write");
    c.shutdown().await.expect("close_notify + FIN");
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .await
        .expect("clean EOF at close_notify");
    assert_eq!(got, up);
    s.write_all(b"bye").await.expect("the other way still open");
    s.shutdown().await.expect("shutdown");
    let mut got = Vec::new();
    c.read_to_end(&mut got).await.expect("clean EOF");
    assert_eq!(got, b"bye");
}

#[tokio::test]
async fn a_tunnel_cut_mid_stream_is_an_error_not_an_eof() {
    let (mut c, mut s) = tunnel(b"header").await;
    s.write_all(b"partial").await.expect("write");
    s.flush().await.expect("flush");
    drop(s); // FIN without the end marker: a truncation
    let mut got = Vec::new();
    let e = c
        .read_to_end(&mut got)
        .await
        .expect_err("truncation must not look like EOF");
    assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    assert_eq!(got, b"partial");
}

#[tokio::test]
async fn records_sent_before_the_handover_are_kept() {
    // The client pipelines a second record right behind the header;
    // rustls never sees it, the record layer opens it.
    let (mut c, mut s) = set_up(b"header").await;
    c.write_all(b"early").await.expect("early data");
    s.write_all(&[0]).await.expect("reply");
    let mut s = s.into_stream().expect("server hands over");
    let mut b = [0u8; 1];
    read_exact(&mut c, &mut b).await.expect("reply");
    let mut c = c.into_stream().expect("client hands over");
    let mut got = [0u8; 5];
    s.read_exact(&mut got)
        .await
        .expect("early record read after the handover");
    assert_eq!(&got, b"early");
    c.write_all(b"late").await.expect("write");
    c.flush().await.expect("flush");
    let mut got = [0u8; 4];
    s.read_exact(&mut got)
        .await
        .expect("sequence numbers carried over");
    assert_eq!(&got, b"late");
}

#[tokio::test]
async fn data_in_the_header_record_is_a_protocol_error() {
    // One record: a 6-byte header and 2 bytes the server never asked
    // for; handing over would lose them, so it is refused.
    let (mut c, mut s) = handshaken().await;
    c.write_all(b"headerxx").await.expect("write");
    let mut header = [0u8; 6];
    read_exact(&mut s, &mut header).await.expect("header");
    s.write_all(&[0]).await.expect("reply");
    let e = s.into_stream().expect_err("leftover plaintext refused");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
}

/// An echo server for one connection; it half-closes after EOF.
async fn echo_once() -> (std::net::SocketAddr, tokio::task::JoinHandle<()>) {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let h = tokio::spawn(async move {
        let (mut t, _) = l.accept().await.expect("accept");
        let (mut r, mut w) = t.split();
        tokio::io::copy(&mut r, &mut w).await.expect("echo");
        w.shutdown().await.expect("fin");
    });
    (addr, h)
}

/// Sends `data` through the client end (then its end marker) and
/// returns what comes back until the server's end marker.
async fn round_trip(c: &mut MeshStream, data: &[u8]) -> Vec<u8> {
    let (mut r, mut w) = tokio::io::split(c);
    let send = async {
        for chunk in data.chunks(70_000) {
            w.write_all(chunk).await.expect("send");
        }
        w.shutdown().await.expect("end marker");
    };
    let mut got = Vec::new();
    let (_, n) = tokio::join!(send, r.read_to_end(&mut got));
    n.expect("clean end of the stream back through the relay");
    got
}

#[tokio::test]
async fn relay_carries_a_stream_then_the_tunnel_carries_the_next() {
    let (mut c, mut s) = tunnel(b"header").await;
    let counter = prometheus_client::metrics::counter::Counter::default();
    let cnt = Counters {
        svc: &counter,
        ep: None,
        first_byte: None,
    };
    let data: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
    for round in 0..2 {
        // The server end relays each stream to an echo target, as the
        // mesh server does.
        let (addr, echo) = echo_once().await;
        let plain = TcpStream::connect(addr).await.expect("connect");
        let (got, relayed) = tokio::join!(
            round_trip(&mut c, &data),
            s.relay(&plain, Side::Upstream, Side::Downstream, cnt, cnt)
        );
        relayed.expect("relay ended cleanly");
        assert_eq!(got, data, "round {round}");
        echo.await.expect("echo");
        assert!(c.reusable() && s.reusable(), "round {round}");
        c.next_stream().expect("client: next stream");
        s.next_stream().expect("server: next stream");
    }
    assert_eq!((c.streams(), s.streams()), (3, 3));
    assert_eq!(counter.get(), 4 * data.len() as u64);
}

#[tokio::test]
async fn a_stream_that_breaks_leaves_the_tunnel_unusable() {
    let (mut c, mut s) = tunnel(b"header").await;
    let counter = prometheus_client::metrics::counter::Counter::default();
    let cnt = Counters {
        svc: &counter,
        ep: None,
        first_byte: None,
    };
    // The target resets the connection mid-stream.
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let target = tokio::spawn(async move {
        let (t, _) = l.accept().await.expect("accept");
        let mut b = [0u8; 4];
        let mut t = t;
        t.read_exact(&mut b).await.expect("read");
        socket2::SockRef::from(&t)
            .set_linger(Some(std::time::Duration::ZERO))
            .expect("linger");
        drop(t); // RST
    });
    let plain = TcpStream::connect(addr).await.expect("connect");
    c.write_all(b"ping").await.expect("write");
    c.flush().await.expect("flush");
    let r = s
        .relay(&plain, Side::Upstream, Side::Downstream, cnt, cnt)
        .await;
    target.await.expect("target");
    assert!(r.is_err(), "a reset target ends the stream with an error");
    assert!(!s.reusable());
    assert!(s.next_stream().is_err());
}

/// Both directions of the current stream end cleanly (end markers).
async fn end_both(c: &mut MeshStream, s: &mut MeshStream) {
    c.shutdown().await.expect("client end marker");
    let mut v = Vec::new();
    s.read_to_end(&mut v).await.expect("server sees the end");
    s.shutdown().await.expect("server end marker");
    c.read_to_end(&mut v).await.expect("client sees the end");
}

/// R1: a tunnel whose keys have used a quarter of the AES-GCM record
/// limit carries no further stream, though it ended cleanly.
#[tokio::test]
async fn a_tunnel_past_its_key_budget_is_not_reused() {
    let (mut c, mut s) = tunnel(b"header").await;
    end_both(&mut c, &mut s).await;
    assert!(
        c.reusable() && s.reusable(),
        "control: a fresh tunnel is reused"
    );
    c.next_stream().expect("next");
    s.next_stream().expect("next");
    // Both ends jump to the budget (their sequence numbers must agree).
    let at = record::RETIRE_AT;
    c.tx.set_used(at);
    s.rx.set_used(at);
    end_both(&mut c, &mut s).await;
    assert_eq!(c.retired(), Some("key_use"));
    assert_eq!(s.retired(), Some("key_use"));
    assert!(!c.reusable() && !s.reusable());
    assert!(c.next_stream().is_err());
}

/// Attack (R2): the peer sends an inner plaintext of 2^14 + 2 bytes on
/// an established tunnel. The reader fails, and the peer gets a
/// record_overflow alert (22), not a silent close.
#[tokio::test]
async fn an_oversized_record_is_answered_with_record_overflow() {
    let (mut c, mut s) = tunnel(b"header").await;
    let mut inner = vec![1u8; MAX_PLAIN + 1];
    inner.push(APPLICATION_DATA);
    let rec = record::tests::seal_inner(&mut s.tx, &inner);
    AsyncWriteExt::write_all(&mut s.tcp, &rec)
        .await
        .expect("raw write");
    let mut buf = vec![0u8; 1 << 16];
    let e = c.read(&mut buf).await.expect_err("oversized record read");
    assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
    let e = s.read(&mut buf).await.expect_err("the alert arrives");
    assert_eq!(e.kind(), io::ErrorKind::ConnectionAborted, "{e}");
    assert!(e.to_string().contains("alert 22"), "{e}");
}

/// R2: the handover refuses while rustls still has output queued (it
/// would be lost, or sent after records sealed with later sequence
/// numbers).
#[tokio::test]
async fn no_handover_while_rustls_has_output_queued() {
    let (_c, mut s) = set_up(b"header").await;
    // The reply encoded but not yet sent.
    let mut send = Some(Send::Data(&[0]));
    assert_eq!(s.turn(&mut send).expect("encrypt"), Step::Transmit);
    assert!(!s.out.is_empty());
    let e = s.into_stream().expect_err("handover with output queued");
    assert!(e.to_string().contains("queued"), "{e}");
}

/// R1/R2: both ends pass half of the AES-GCM limit in the middle of a
/// stream (their sequence numbers moved there by hand, in step). Each
/// sends a KeyUpdate and moves to the next key (derived by rustls'
/// kernel connection); the stream goes on intact through the relay,
/// and the tunnel can carry the next one.
#[tokio::test]
async fn key_updates_keep_a_long_stream_going() {
    let (mut c, mut s) = tunnel(b"header").await;
    let counter = prometheus_client::metrics::counter::Counter::default();
    let cnt = Counters {
        svc: &counter,
        ep: None,
        first_byte: None,
    };
    let at = c.tx.update_at();
    c.tx.set_used(at);
    s.rx.set_used(at);
    s.tx.set_used(at);
    c.rx.set_used(at);
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 253) as u8).collect();
    let (addr, echo) = echo_once().await;
    let plain = TcpStream::connect(addr).await.expect("connect");
    let (got, relayed) = tokio::join!(
        round_trip(&mut c, &data),
        s.relay(&plain, Side::Upstream, Side::Downstream, cnt, cnt)
    );
    relayed.expect("relay across key updates");
    assert_eq!(got, data);
    echo.await.expect("echo");
    // 1 MB is 62 full records and an end marker, give or take the
    // chunking of the writes: far below `at` only after a new key.
    for (side, used) in [
        ("c.tx", c.tx.used()),
        ("s.tx", s.tx.used()),
        ("c.rx", c.rx.used()),
        ("s.rx", s.rx.used()),
    ] {
        assert!(used < 100, "{side} is still on the old key: {used}");
    }
    assert!(c.reusable() && s.reusable());
}

/// Interop (R2): a rustls peer (the buffered API, as any TLS 1.3 stack)
/// sends a KeyUpdate asking for ours in the middle of the tunnel. Our
/// end follows it, answers with its own before its next record, and
/// rustls reads that record.
#[tokio::test]
async fn a_rustls_peer_key_update_is_followed_and_answered() {
    let (ccfg, scfg, name) = configs();
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    let peer = std::thread::spawn(move || {
        let tcp = std::net::TcpStream::connect(addr).expect("connect");
        tcp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
            .expect("timeout");
        let conn = rustls::ClientConnection::new(ccfg, name).expect("client");
        let mut t = rustls::StreamOwned::new(conn, tcp);
        std::io::Write::write_all(&mut t, b"h").expect("header");
        let mut b = [0u8; 1];
        std::io::Read::read_exact(&mut t, &mut b).expect("reply");
        t.conn.refresh_traffic_keys().expect("key update");
        std::io::Write::write_all(&mut t, b"after-update").expect("write");
        std::io::Write::flush(&mut t).expect("flush");
        let mut got = [0u8; 5];
        std::io::Read::read_exact(&mut t, &mut got).expect("rustls reads our record");
        got
    });
    let (tcp, _) = l.accept().await.expect("accept");
    let mut setup = Setup::new(tcp, UnbufferedServerConnection::new(scfg).expect("server"));
    setup.handshake().await.expect("handshake");
    let mut h = [0u8; 1];
    read_exact(&mut setup, &mut h).await.expect("header");
    setup.write_all(&[0]).await.expect("reply");
    let mut s = setup.into_stream().expect("hand over");
    let mut got = [0u8; 12];
    s.read_exact(&mut got)
        .await
        .expect("read across the peer's KeyUpdate");
    assert_eq!(&got, b"after-update");
    // rustls' KeyUpdate restarted the sequence: one record since.
    assert_eq!(s.rx.used(), 1, "rx did not move to the peer's new key");
    s.write_all(b"reply").await.expect("write");
    s.flush().await.expect("flush");
    // Ours went first (rustls asked for it: update_requested), so the
    // reply is record 0 of the new key.
    assert_eq!(s.tx.used(), 1, "no KeyUpdate of ours before the reply");
    let back = tokio::task::spawn_blocking(move || peer.join().expect("peer"))
        .await
        .expect("join");
    assert_eq!(&back, b"reply");
}

/// A TLS 1.3 NewSessionTicket message (RFC 8446 §4.6.1), its length
/// and extensions filled in by the test: lifetime 60 s, age_add 1, an
/// empty nonce, a 4-byte ticket.
const TICKET: [u8; 19] = [
    record::NEW_SESSION_TICKET,
    0,
    0,
    0,
    0,
    0,
    0,
    60,
    0,
    0,
    0,
    1,
    0,
    0,
    4,
    1,
    2,
    3,
    4,
];

/// A late session ticket from the listener (after the handover) goes to
/// rustls' session store and the stream goes on; the same message from
/// a client is refused with unexpected_message (attack: a client
/// posing as a server).
#[tokio::test]
async fn late_tickets_are_taken_from_a_server_and_refused_from_a_client() {
    let mut ticket = TICKET.to_vec();
    ticket.extend_from_slice(&[0, 0]); // the extensions' length
    ticket[3] = (ticket.len() - 4) as u8;
    let (mut c, mut s) = tunnel(b"header").await;
    let mut wire = Vec::new();
    record::push_record(&mut s.tx, &mut wire, &ticket, record::HANDSHAKE).expect("seal");
    record::push_record(&mut s.tx, &mut wire, b"ok", APPLICATION_DATA).expect("seal");
    AsyncWriteExt::write_all(&mut s.tcp, &wire)
        .await
        .expect("raw write");
    let mut b = [0u8; 2];
    c.read_exact(&mut b)
        .await
        .expect("the ticket is taken, the stream goes on");
    assert_eq!(&b, b"ok");

    let mut wire = Vec::new();
    record::push_record(&mut c.tx, &mut wire, &ticket, record::HANDSHAKE).expect("seal");
    AsyncWriteExt::write_all(&mut c.tcp, &wire)
        .await
        .expect("raw write");
    let mut buf = [0u8; 16];
    let e = s.read(&mut buf).await.expect_err("a ticket from a client");
    assert_eq!(
        record::alert_for(&e),
        Some(record::alert::UNEXPECTED_MESSAGE),
        "{e}"
    );
    let e = c.read(&mut buf).await.expect_err("the alert arrives");
    assert!(e.to_string().contains("alert 10"), "{e}");
}
