//! The UDP and TCP loops, and the tasks that rebuild the zone and the ACL.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::Cache;
use std::os::fd::AsRawFd;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::engine::{self, Step};
use crate::forward::{CacheKey, owned_name};
use crate::mmsg::{BATCH, Batcher};
use crate::wire::{self, MAX_NAME, Query, rcode};
use crate::{DnsError, DnsServer, Shared, zone};

/// 10 s: RFC 7766 6.2.3 suggests idle TCP timeouts of seconds, not minutes.
const TCP_IDLE: Duration = Duration::from_secs(10);
/// How often a UDP thread blocked in recv looks at the cancel token.
const UDP_POLL: Duration = Duration::from_millis(100);

pub(crate) async fn serve(
    mut srv: DnsServer,
    udp: Vec<UdpSocket>,
    tcp: Vec<TcpListener>,
    cancel: CancellationToken,
) -> Result<(), DnsError> {
    if udp.is_empty() && tcp.is_empty() {
        return Err(DnsError::NothingToServe);
    }
    // The container networks may have come since `new`: the first query is
    // judged by the ACL of now.
    let nets = srv.networks.borrow_and_update().clone();
    srv.shared.set_networks(nets);
    let mut locals: Vec<SocketAddr> = Vec::new();
    for s in &udp {
        locals.push(s.local_addr().map_err(|source| DnsError::Socket {
            what: "udp local_addr",
            source,
        })?);
    }
    for l in &tcp {
        locals.push(l.local_addr().map_err(|source| DnsError::Socket {
            what: "tcp local_addr",
            source,
        })?);
    }
    // Forwarding to ourselves would loop until the timeout.
    if let Some(sh) = Arc::get_mut(&mut srv.shared) {
        sh.fwd.upstreams.retain(|u| {
            let own = locals
                .iter()
                .any(|l| l == u || (l.port() == u.port() && l.ip().is_unspecified()));
            if own {
                warn!(upstream = %u, "dropping an upstream that is this server itself");
            }
            !own
        });
    }
    let span = info_span!("dns");
    // UDP and TCP usually share each address: name each address once.
    let (n_udp, n_tcp) = (udp.len(), tcp.len());
    let mut listen = locals.clone();
    listen.sort();
    listen.dedup();
    info!(parent: &span, ?listen, udp = n_udp, tcp = n_tcp, upstreams = ?srv.shared.fwd.upstreams, "dns serving");

    let tracker = TaskTracker::new();
    // Rebuild the zone when the snapshot changes.
    {
        let shared = srv.shared.clone();
        let mut rx = srv.snapshot.clone();
        let params = srv.cfg.zone_params();
        let mut updater = srv.updater.take();
        let cancel = cancel.clone();
        tracker.spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = rx.changed() => if r.is_err() {
                            debug!("snapshot sender gone: keeping the last zone");
                            return;
                        }
                    }
                    let snap = rx.borrow_and_update().clone();
                    let up = updater.take();
                    let params = params.clone();
                    let t0 = Instant::now();
                    match tokio::task::spawn_blocking(move || match up {
                        Some(mut up) => {
                            let kind = up.update(snap);
                            (up, kind)
                        }
                        None => (zone::ZoneUpdater::new(snap, params), zone::UpdateKind::Full),
                    })
                    .await
                    {
                        Ok((up, kind)) => {
                            let z = up.zone();
                            shared.metrics.zone_rebuilds.inc();
                            shared.metrics.zone_names.set(z.names.len() as i64);
                            debug!(
                                names = z.names.len(),
                                serial = z.serial,
                                ?kind,
                                took_us = t0.elapsed().as_micros() as u64,
                                "zone updated"
                            );
                            shared.zone.store(z);
                            updater = Some(up);
                        }
                        // The updater is gone with the panic: the next
                        // change builds the zone in full.
                        Err(error) => warn!(%error, "zone update failed; the zone stays as it was"),
                    }
                }
            }
            .instrument(span.clone()),
        );
    }
    // Rebuild the ACL when the container networks change.
    {
        let shared = srv.shared.clone();
        let mut rx = srv.networks.clone();
        let cancel = cancel.clone();
        tracker.spawn(
            async move {
                loop {
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        r = rx.changed() => if r.is_err() { return; }
                    }
                    let nets = rx.borrow_and_update().clone();
                    debug!(networks = ?nets, "container networks changed");
                    shared.set_networks(nets);
                }
            }
            .instrument(span.clone()),
        );
    }
    let workers = match srv.cfg.udp_workers {
        0 => std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .min(4),
        n => n,
    };
    let rt = Handle::current();
    for s in udp {
        let s = s.into_std().map_err(|source| DnsError::Socket {
            what: "udp into_std",
            source,
        })?;
        s.set_nonblocking(false)
            .map_err(|source| DnsError::Socket {
                what: "udp set_nonblocking",
                source,
            })?;
        s.set_read_timeout(Some(UDP_POLL))
            .map_err(|source| DnsError::Socket {
                what: "udp set_read_timeout",
                source,
            })?;
        let s = Arc::new(s);
        for _ in 0..workers {
            let (shared, s, cancel, rt, tr) = (
                srv.shared.clone(),
                s.clone(),
                cancel.clone(),
                rt.clone(),
                tracker.clone(),
            );
            let span = span.clone();
            let h = tokio::task::spawn_blocking(move || {
                span.in_scope(|| udp_thread(shared, s, cancel, rt, tr))
            });
            tracker.spawn(async move {
                if let Err(error) = h.await {
                    warn!(%error, "udp thread failed");
                }
            });
        }
    }
    let conns = Arc::new(tokio::sync::Semaphore::new(srv.cfg.max_tcp_connections));
    for l in tcp {
        tracker.spawn(
            tcp_accept(
                srv.shared.clone(),
                l,
                cancel.clone(),
                tracker.clone(),
                conns.clone(),
            )
            .instrument(span.clone()),
        );
    }
    cancel.cancelled().await;
    tracker.close();
    // Connections and forwards end by themselves within the upstream timeout
    // or TCP_IDLE; do not wait longer than that.
    let grace = srv.shared.fwd.timeout + Duration::from_secs(1);
    if tokio::time::timeout(grace, tracker.wait()).await.is_err() {
        debug!("dns tasks still running after the grace period");
    }
    info!(parent: &span, "dns stopped");
    Ok(())
}

/// One UDP receive thread: blocking `recvmmsg` (wait for one datagram, take
/// whatever else is queued), answer the batch, one `sendmmsg`. A plain
/// thread rather than a task: it is what NSD does, and it costs one system
/// call per batch each way with no readiness polling in between. It looks at
/// `cancel` at least every [`UDP_POLL`].
fn udp_thread(
    shared: Arc<Shared>,
    sock: Arc<std::net::UdpSocket>,
    cancel: CancellationToken,
    rt: Handle,
    tracker: TaskTracker,
) {
    let mut b = Batcher::new();
    let mut outs: Vec<Vec<u8>> = (0..BATCH).map(|_| Vec::with_capacity(1024)).collect();
    let mut peers: Vec<SocketAddr> = Vec::with_capacity(BATCH);
    let mut lc = [0u8; MAX_NAME];
    let mut zone = Cache::new(shared.zone.clone());
    let mut acl = Cache::new(shared.acl.clone());
    let fd = sock.as_raw_fd();
    while !cancel.is_cancelled() {
        let n = match b.recv(fd) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock
                        | std::io::ErrorKind::TimedOut
                        | std::io::ErrorKind::Interrupted
                ) =>
            {
                continue;
            }
            Err(error) => {
                // ICMP errors from earlier sends surface here on Linux.
                debug!(%error, "udp recv");
                continue;
            }
        };
        let t0 = Instant::now();
        let zone = zone.load();
        let acl = acl.load();
        peers.clear();
        for i in 0..n {
            let Some(peer) = b.rx[i].peer else { continue };
            let pkt = b.packet(i);
            let out = &mut outs[peers.len()];
            match engine::answer(
                zone,
                pkt,
                acl.allows(peer.ip()) || shared.admit(peer.ip()),
                true,
                shared.our_payload,
                out,
                &mut lc,
            ) {
                Step::Drop => {
                    shared.metrics.dropped.inc();
                }
                Step::Reply { qtype, rcode } => {
                    peers.push(peer);
                    shared.metrics.count(qtype, rcode);
                }
                Step::Forward(q) => {
                    let key = CacheKey::new(&lc[..q.name_len], &q);
                    if cached(&shared, &key, &q, out) {
                        fit_udp(out, &q, shared.our_payload);
                        shared.metrics.count(q.qtype, (out[3] & 0xf) as u16);
                        peers.push(peer);
                        continue;
                    }
                    let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
                        wire::write_error(
                            out,
                            q.id,
                            q.flags,
                            rcode::SERVFAIL as u16,
                            Some(q.question),
                            q.edns,
                            shared.our_payload,
                        );
                        shared.metrics.count(q.qtype, rcode::SERVFAIL as u16);
                        peers.push(peer);
                        continue;
                    };
                    let pkt = pkt.to_vec();
                    let name = owned_name(&lc, q.name_len);
                    let (shared, sock) = (shared.clone(), sock.clone());
                    tracker.spawn_on(
                        async move {
                            let _permit = permit;
                            let mut lc2 = [0u8; MAX_NAME];
                            let wire::Parsed::Query(q) = wire::parse(&pkt, &mut lc2) else {
                                return;
                            };
                            let mut out = forward(&shared, &pkt, &q, &name, key).await;
                            fit_udp(&mut out, &q, shared.our_payload);
                            // One datagram on a UDP socket: blocks only when the
                            // send buffer is full.
                            if let Err(error) = sock.send_to(&out, peer) {
                                debug!(%error, client.addr = %peer, "udp send");
                            }
                            shared.metrics.count(q.qtype, (out[3] & 0xf) as u16);
                            shared.metrics.latency.observe(t0.elapsed().as_secs_f64());
                        },
                        &rt,
                    );
                }
            }
        }
        let k = peers.len();
        let msgs: [&[u8]; BATCH] =
            std::array::from_fn(|i| if i < k { &outs[i][..] } else { &[][..] });
        let mut sent = 0;
        while sent < k {
            match b.send(fd, &msgs[sent..k], &peers[sent..k]) {
                Ok(0) => break,
                Ok(m) => sent += m,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => {
                    // sendmmsg fails only when the first message fails: skip it.
                    debug!(%error, client.addr = %peers[sent], "udp send");
                    sent += 1;
                }
            }
        }
        let took = t0.elapsed().as_secs_f64();
        for _ in 0..k {
            shared.metrics.latency.observe(took);
        }
    }
}

fn cached(shared: &Shared, key: &CacheKey, q: &Query<'_>, out: &mut Vec<u8>) -> bool {
    // A tiny critical section with no await: a std Mutex is right here.
    let hit = match shared.fwd.cache.lock() {
        Ok(mut c) => c.get(key, q, out),
        Err(_) => false,
    };
    if hit {
        shared.metrics.cache_hits.inc();
    }
    hit
}

/// Ask the upstreams and cache the answer; SERVFAIL when none answers in time.
async fn forward(
    shared: &Shared,
    pkt: &[u8],
    q: &Query<'_>,
    name: &[u8],
    key: CacheKey,
) -> Vec<u8> {
    shared.metrics.cache_misses.inc();
    let alias = shared.zone.load().alias(name);
    let resp = match alias {
        Some(a) => crate::chase::chase(shared, pkt, &a.0, a.1).await,
        None => shared.fwd.resolve(pkt, q, name).await,
    };
    match resp {
        Some(resp) => {
            if let Ok(mut c) = shared.fwd.cache.lock() {
                c.put(key, &resp);
            }
            resp
        }
        None => {
            shared.metrics.upstream_failures.inc();
            let mut out = Vec::new();
            wire::write_error(
                &mut out,
                q.id,
                q.flags,
                rcode::SERVFAIL as u16,
                Some(q.question),
                q.edns,
                shared.our_payload,
            );
            out
        }
    }
}

/// A forwarded answer too big for this UDP client becomes a TC answer.
fn fit_udp(out: &mut Vec<u8>, q: &Query<'_>, our_payload: u16) {
    if out.len() > wire::udp_limit(q.edns, our_payload) {
        let aa = out[2] & 0x04 != 0;
        let rc = (out[3] & 0xf) as u16;
        wire::write_truncated(out, q, aa, rc, our_payload);
    }
}

async fn tcp_accept(
    shared: Arc<Shared>,
    l: TcpListener,
    cancel: CancellationToken,
    tracker: TaskTracker,
    conns: Arc<tokio::sync::Semaphore>,
) {
    loop {
        let permit = tokio::select! {
            _ = cancel.cancelled() => return,
            p = conns.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => return },
        };
        let (s, peer) = tokio::select! {
            _ = cancel.cancelled() => return,
            r = l.accept() => match r {
                Ok(x) => x,
                Err(error) => {
                    debug!(%error, "tcp accept");
                    // EMFILE and the like: do not spin.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let (shared, cancel) = (shared.clone(), cancel.clone());
        tracker.spawn(async move {
            let _permit = permit;
            if let Err(error) = tcp_conn(&shared, s, peer, &cancel).await {
                debug!(%error, client.addr = %peer, "tcp connection");
            }
        });
    }
}

async fn tcp_conn(
    shared: &Shared,
    mut s: TcpStream,
    peer: SocketAddr,
    cancel: &CancellationToken,
) -> std::io::Result<()> {
    let _ = s.set_nodelay(true);
    let mut buf = Vec::with_capacity(512);
    let mut out = Vec::with_capacity(512);
    let mut lc = [0u8; MAX_NAME];
    loop {
        let len = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = tokio::time::timeout(TCP_IDLE, s.read_u16()) => match r {
                Ok(Ok(n)) => n as usize,
                Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
                Ok(Err(e)) => return Err(e),
                Err(_) => return Ok(()),
            },
        };
        buf.resize(len, 0);
        match tokio::time::timeout(TCP_IDLE, s.read_exact(&mut buf)).await {
            Ok(r) => r?,
            Err(_) => return Ok(()),
        };
        let t0 = Instant::now();
        let allowed = shared.acl.load().allows(peer.ip()) || shared.admit(peer.ip());
        let step = engine::answer(
            &shared.zone.load(),
            &buf,
            allowed,
            false,
            shared.our_payload,
            &mut out,
            &mut lc,
        );
        match step {
            // Nothing readable: close, as there is no way to resynchronise.
            Step::Drop => {
                shared.metrics.dropped.inc();
                return Ok(());
            }
            Step::Reply { qtype, rcode } => {
                write_framed(&mut s, &out).await?;
                shared.metrics.count(qtype, rcode);
            }
            Step::Forward(q) => {
                let key = CacheKey::new(&lc[..q.name_len], &q);
                if !cached(shared, &key, &q, &mut out) {
                    let name = owned_name(&lc, q.name_len);
                    out = forward(shared, &buf, &q, &name, key).await;
                }
                write_framed(&mut s, &out).await?;
                shared.metrics.count(q.qtype, (out[3] & 0xf) as u16);
            }
        }
        shared.metrics.latency.observe(t0.elapsed().as_secs_f64());
    }
}

async fn write_framed(s: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    let len = u16::try_from(msg.len()).unwrap_or(u16::MAX);
    let mut framed = Vec::with_capacity(msg.len() + 2);
    framed.extend_from_slice(&len.to_be_bytes());
    framed.extend_from_slice(&msg[..len as usize]);
    s.write_all(&framed).await
}
