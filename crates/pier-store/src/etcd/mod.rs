//! [`EtcdStore`]: the [`Store`] on an etcd cluster (tested against etcd 3.4).
//!
//! - One etcd-client `Client` per endpoint. A call goes to the current
//!   endpoint; when it fails as unavailable (or does not answer within
//!   [`ATTEMPT_TIMEOUT`]) the store moves on to the next endpoint and
//!   retries, backing off between rounds, for at most [`RETRY_BUDGET`].
//!   etcd-client's own balancer keeps sending to a dead member, which is why
//!   the rotation lives here.
//! - A retried write may have been applied by the first attempt if only its
//!   answer was lost (as with any etcd client).
//! - A watch runs in its own task. On a broken stream it yields
//!   `Disconnected`, reopens from the revision after the last one it
//!   delivered (on any endpoint, backing off), then yields `Resumed`. If that
//!   revision was compacted it ends with `Err(Compacted)`.
//! - A lease's keepalives go over one long-lived LeaseKeepAlive stream,
//!   opened at its first renewal and kept between renewals (a renewal is
//!   one message each way on it); it is re-opened only when it breaks or
//!   does not answer in time, on every endpoint at once (the first to
//!   renew wins), each given a quarter of the TTL. Opening a stream per
//!   renewal cost 1,000 hosts their leases under load (issue 17).
//! - A connection that gave a keepalive no answer in time is dropped
//!   (`Inner::redial`): the next call to that endpoint dials a new one.
//!   After a silent cut the old connection would carry nothing until TCP
//!   retransmits (its backoff grows past a second within a short cut) or
//!   the keep-alive gives up (10 s), which cost a healed host its lease.
//! - Lists are paged (at one read revision) so that 100 000 keys never make
//!   one oversized gRPC message.
//! - Over TLS (`https://` endpoints, [`EtcdSecurity::tls`]) etcd's server
//!   certificate is checked against the given CA only (no system roots) and
//!   for the host or IP address written in the endpoint; a client
//!   certificate is presented when given. With a user
//!   ([`EtcdSecurity::user`]) each endpoint's client authenticates when it
//!   is first used (etcd's simple tokens are per member), and a token etcd
//!   no longer accepts is renewed once and the call retried.
//! - Connecting checks more than that a member answers: it reads one key
//!   under pier's root, so a wrong password, a refused certificate or a
//!   user without access to `/pier/` fails at start, with what to do.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{Client, ConnectOptions, GetOptions, WatchOptions};
use tokio::sync::OnceCell;

use crate::etcd_security::EtcdSecurity;
use crate::{KeyValue, LeaseId, Revision, StoreError};

mod convert;
mod errors;
mod ops;
mod watch;

use convert::convert_kv;
use errors::{chain, is_invalid_token, is_lease_not_found, map_err, refusal};
use watch::Opened;

/// How long one attempt on one endpoint may take.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a call keeps retrying across endpoints before giving up.
const RETRY_BUDGET: Duration = Duration::from_secs(6);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// A watch quiet for this long is asked for a progress notification.
const PROBE_IDLE: Duration = Duration::from_secs(1);
/// A progress request unanswered for this long breaks the watch (it is
/// then re-opened, on another endpoint, from the next revision).
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// The watch task's reconnect backoff cap.
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Keys per page of a list.
const LIST_PAGE: i64 = 5_000;
/// A lease's kept keepalive stream unused for this long is closed (when
/// another lease's first renewal comes): its holder stopped renewing it.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(600);

/// The store on etcd. Cheap to clone.
#[derive(Clone)]
pub struct EtcdStore {
    inner: Arc<Inner>,
}

struct Inner {
    endpoints: Vec<String>,
    /// One connection (client) per endpoint, made on first use: with a
    /// user, making it authenticates, which needs that member up. Replaced
    /// by a new one by [`Inner::redial`]. A std Mutex: held only to clone
    /// or swap the Arc.
    clients: Vec<Mutex<Arc<Conn>>>,
    options: ConnectOptions,
    current: AtomicUsize,
    /// Per-endpoint attempt timeout of lease keepalives: a quarter of the
    /// shortest TTL granted (at least 200 ms, at most [`ATTEMPT_TIMEOUT`]).
    keepalive_attempt_ms: AtomicU64,
    /// Each lease's keepalive stream, kept between renewals. A std Mutex:
    /// held only to find or add a slot, never across an await.
    keepalives: Mutex<HashMap<LeaseId, KeepAliveSlot>>,
}

/// A lease's keepalive stream, if open, and when it was last used. A tokio
/// Mutex: one renewal of a lease at a time, held across the round trip.
type KeepAliveSlot = Arc<tokio::sync::Mutex<KeptStream>>;

struct KeptStream {
    chan: Option<KeepAliveChan>,
    used: Instant,
}

/// One connection to an endpoint: its client, made on first use.
#[derive(Default)]
struct Conn {
    cell: OnceCell<Client>,
    /// Whether a call on it has been answered.
    proven: AtomicBool,
}

/// An open LeaseKeepAlive stream of one lease.
struct KeepAliveChan {
    /// The endpoint it was opened on.
    idx: usize,
    /// The connection it runs on.
    conn: Arc<Conn>,
    keeper: etcd_client::LeaseKeeper,
    stream: etcd_client::LeaseKeepAliveStream,
}

impl KeepAliveChan {
    /// One renewal on the stream: the lease's TTL as etcd answers it (0 or
    /// less: no such lease).
    async fn renew(&mut self) -> Result<i64, etcd_client::Error> {
        self.keeper.keep_alive().await?;
        match self.stream.message().await? {
            Some(resp) => Ok(resp.ttl()),
            None => Err(etcd_client::Error::LeaseKeepAliveError(
                "keepalive stream closed without an answer".into(),
            )),
        }
    }
}

impl fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.inner.endpoints)
            .field("current", &self.inner.current.load(Ordering::Relaxed))
            .finish()
    }
}

/// The endpoint as a URL: `http://` or, with TLS, `https://` added to a
/// bare `HOST:PORT`. A scheme that disagrees with the TLS setting is an
/// error (TLS settings would otherwise be dropped, or plaintext sent to a
/// TLS port).
fn normalize(endpoint: &str, tls: bool) -> Result<String, StoreError> {
    let e = endpoint.trim();
    match (e.split_once("://").map(|(s, _)| s), tls) {
        (None, false) => Ok(format!("http://{e}")),
        (None, true) => Ok(format!("https://{e}")),
        (Some("http"), false) | (Some("https"), true) => Ok(e.to_owned()),
        (Some("https"), false) => Err(StoreError::Invalid(format!(
            "etcd endpoint {e} is https:// but no TLS settings were given: give the CA that issued etcd's certificate"
        ))),
        (Some("http"), true) => Err(StoreError::Invalid(format!(
            "etcd endpoint {e} is plain http:// but TLS settings were given: write it as https:// (or HOST:PORT)"
        ))),
        (Some(other), _) => Err(StoreError::Invalid(format!(
            "etcd endpoint {e}: scheme {other}:// is not http:// or https://"
        ))),
    }
}

impl EtcdStore {
    /// `endpoints` like `["127.0.0.1:2379", "http://10.0.0.2:2379"]`, plain
    /// and without a user. Succeeds only when one answers; that one becomes
    /// the current endpoint.
    pub async fn connect(endpoints: &[String]) -> Result<EtcdStore, StoreError> {
        Self::connect_with(endpoints, &EtcdSecurity::default()).await
    }

    /// [`EtcdStore::connect`] with TLS and/or a user. A member that
    /// refuses us (a wrong password, our certificate refused, its
    /// certificate not from our CA) is `Invalid`, with what to do, when
    /// every endpoint refused so; `Unavailable` means none could be reached.
    pub async fn connect_with(
        endpoints: &[String],
        security: &EtcdSecurity,
    ) -> Result<EtcdStore, StoreError> {
        Self::connect_from(endpoints, security, 0).await
    }

    /// [`EtcdStore::connect_with`], trying the endpoints from the one
    /// `spread_key` (the node's name) hashes to, so that a cluster's agents
    /// spread over the members. From the first endpoint, every agent's
    /// watch, reads and keepalives went to one member (issue 17's
    /// simulator: 54 watchers on the first member, 0 on the others).
    pub async fn connect_spread(
        endpoints: &[String],
        security: &EtcdSecurity,
        spread_key: &str,
    ) -> Result<EtcdStore, StoreError> {
        // FNV-1a: stable across processes and versions (std's hasher is not).
        let h = spread_key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
        });
        let n = endpoints.len().max(1) as u64;
        Self::connect_from(endpoints, security, (h % n) as usize).await
    }

    async fn connect_from(
        endpoints: &[String],
        security: &EtcdSecurity,
        start: usize,
    ) -> Result<EtcdStore, StoreError> {
        if endpoints.is_empty() {
            return Err(StoreError::Invalid("no etcd endpoints given".into()));
        }
        // Keep-alive pings every 5 s (etcd's default --grpc-keepalive-min-time;
        // more often and it answers GOAWAY too_many_pings). `hasleader`: a
        // member cut off from its quorum cancels our watches and fails our
        // requests instead of serving a silently frozen view, so a
        // partitioned agent reports itself stale and fails over.
        let mut options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(1))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5))
            .with_keep_alive_while_idle(true)
            .with_require_leader(true);
        if let Some(tls) = &security.tls {
            options = options.with_tls(tls.options());
        }
        if let Some(user) = &security.user {
            options = options
                .with_user(user.name.clone(), user.password.clone())
                .with_auto_token_refresh(true);
        }
        let mut names = Vec::with_capacity(endpoints.len());
        for e in endpoints {
            names.push(normalize(e, security.tls.is_some())?);
        }
        let inner = Inner {
            clients: names
                .iter()
                .map(|_| Mutex::new(Arc::new(Conn::default())))
                .collect(),
            endpoints: names,
            options,
            current: AtomicUsize::new(0),
            keepalive_attempt_ms: AtomicU64::new(ATTEMPT_TIMEOUT.as_millis() as u64),
            keepalives: Mutex::new(HashMap::new()),
        };
        let user = security.user.as_ref().map(|u| u.name.as_str());
        let sent_cert = security.tls.as_ref().map(|t| t.has_client_cert());
        let mut errors = Vec::new();
        let mut refusals = 0;
        let n = inner.endpoints.len();
        for i in (0..n).map(|k| (start + k) % n) {
            let url = &inner.endpoints[i];
            // One read under pier's root: it needs the member up, our
            // certificate and password accepted and read access to /pier/.
            let probe = async {
                let mut c = inner.client(i).await?;
                let opts = GetOptions::new().with_count_only().with_serializable();
                c.get(pier_model::keys::ROOT, Some(opts)).await
            };
            match tokio::time::timeout(ATTEMPT_TIMEOUT, probe).await {
                Ok(Ok(_)) => {
                    inner.conn(i).proven.store(true, Ordering::Relaxed);
                    inner.current.store(i, Ordering::Relaxed);
                    return Ok(EtcdStore {
                        inner: Arc::new(inner),
                    });
                }
                Ok(Err(err)) => {
                    let mut text = chain(&err);
                    if let Some(tls) = &security.tls
                        && refusal(&text, user, sent_cert).is_none()
                    {
                        let (tls, u) = (tls.clone(), url.clone());
                        if let Ok(Some(why)) =
                            tokio::task::spawn_blocking(move || tls.diagnose(&u)).await
                        {
                            text = format!("{text}; a TLS handshake of pier's own: {why}");
                        }
                    }
                    match refusal(&text, user, sent_cert) {
                        Some(why) => {
                            refusals += 1;
                            errors.push(format!("{url}: {why} ({text})"));
                        }
                        None => errors.push(format!("{url}: {text}")),
                    }
                }
                Err(_) => errors.push(format!("{url}: no answer in {ATTEMPT_TIMEOUT:?}")),
            }
        }
        if refusals == errors.len() {
            return Err(StoreError::Invalid(format!(
                "etcd refused pier: {}",
                errors.join("; ")
            )));
        }
        Err(StoreError::Unavailable(format!(
            "connect to etcd: no endpoint answered ({})",
            errors.join("; ")
        )))
    }

    /// The endpoint calls currently go to.
    pub fn current_endpoint(&self) -> &str {
        let i = self.inner.current.load(Ordering::Relaxed);
        &self.inner.endpoints[i]
    }
}

impl Inner {
    /// Endpoint `idx`'s client, made (and, with a user, authenticated) on
    /// first use. A failure leaves it to be made again on the next call.
    async fn client(&self, idx: usize) -> Result<Client, etcd_client::Error> {
        self.client_in(idx, &self.conn(idx)).await
    }

    /// Endpoint `idx`'s current connection.
    fn conn(&self, idx: usize) -> Arc<Conn> {
        self.clients[idx]
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The client of `conn` (endpoint `idx`'s), made if it is not yet.
    async fn client_in(&self, idx: usize, conn: &Conn) -> Result<Client, etcd_client::Error> {
        conn.cell.get_or_try_init(|| self.dial(idx)).await.cloned()
    }

    /// A new client (connection) to endpoint `idx`.
    async fn dial(&self, idx: usize) -> Result<Client, etcd_client::Error> {
        Client::connect([self.endpoints[idx].as_str()], Some(self.options.clone())).await
    }

    /// Replaces endpoint `idx`'s connection, if it is still `conn`, by a
    /// new one to be dialled: `conn` gave no answer in time. Streams open
    /// on the old one keep it until they end.
    fn redial(&self, idx: usize, conn: &Arc<Conn>) {
        let mut slot = self.clients[idx].lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&slot, conn) {
            *slot = Arc::new(Conn::default());
            tracing::debug!(
                endpoint = %self.endpoints[idx],
                "etcd: no answer on this connection; the next call dials a new one"
            );
        }
    }

    /// Makes `client`, which has answered, endpoint `idx`'s connection if
    /// that is still the unproven `old`; returns the connection it is in.
    fn adopt(&self, idx: usize, old: &Arc<Conn>, client: Client) -> Arc<Conn> {
        let conn = Arc::new(Conn {
            cell: OnceCell::new_with(Some(client)),
            proven: AtomicBool::new(true),
        });
        let mut slot = self.clients[idx].lock().unwrap_or_else(|p| p.into_inner());
        if Arc::ptr_eq(&slot, old) {
            *slot = conn.clone();
        }
        conn
    }

    /// Opens `lease`'s keepalive stream on every endpoint at once and
    /// renews once on it: the first endpoint to answer wins (and becomes
    /// the current one), the others are dropped. Each try has `attempt`;
    /// a try without an answer redials its endpoint. `None` with a TTL of
    /// 0: the lease is gone.
    async fn open_keepalive(
        &self,
        lease: LeaseId,
        attempt: Duration,
    ) -> Result<(Option<KeepAliveChan>, i64), StoreError> {
        let n = self.endpoints.len();
        let cur = self.current.load(Ordering::Relaxed);
        let tries = (0..n)
            .map(|k| (cur + k) % n)
            .map(|idx| Box::pin(self.try_keepalive(idx, lease, attempt)));
        let ((chan, ttl), _rest) = futures::future::select_ok(tries).await?;
        if let Some(c) = &chan
            && c.idx != cur
            && self
                .current
                .compare_exchange(cur, c.idx, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::info!(
                from = %self.endpoints[cur],
                to = %self.endpoints[c.idx],
                "etcd endpoint answered a lease keepalive first; switching"
            );
        }
        Ok((chan, ttl))
    }

    /// One try of [`Inner::open_keepalive`] on endpoint `idx`: on its
    /// connection if that has answered before, else on a connection of its
    /// own (kept as the endpoint's if it answers). A connection that has
    /// not answered yet is not shared: after a cut, each try dials anew, so
    /// the first try after the heal gets through at once instead of waiting
    /// behind a connect sent into the cut.
    async fn try_keepalive(
        &self,
        idx: usize,
        lease: LeaseId,
        attempt: Duration,
    ) -> Result<(Option<KeepAliveChan>, i64), StoreError> {
        let endpoint = &self.endpoints[idx];
        let what = format!("lease keepalive {lease} on {endpoint}");
        let mut renewed_token = false;
        loop {
            let conn = self.conn(idx);
            let own = !conn.proven.load(Ordering::Relaxed);
            let once = async {
                let c = if own {
                    self.dial(idx).await?
                } else {
                    self.client_in(idx, &conn).await?
                };
                let (keeper, stream) = c.clone().lease_keep_alive(lease.0).await?;
                let mut chan = KeepAliveChan {
                    idx,
                    conn: conn.clone(),
                    keeper,
                    stream,
                };
                let ttl = chan.renew().await?;
                Ok::<_, etcd_client::Error>((chan, ttl, c))
            };
            let e = match tokio::time::timeout(attempt, once).await {
                Ok(Ok((mut chan, ttl, c))) => {
                    if own {
                        chan.conn = self.adopt(idx, &conn, c);
                    }
                    return Ok((Some(chan), ttl));
                }
                Ok(Err(e)) if is_invalid_token(&e) && !renewed_token => {
                    // Keepalive streams are not covered by etcd-client's
                    // own token refresh: renew it here, once.
                    renewed_token = true;
                    if let Some(c) = conn.cell.get() {
                        let _ = tokio::time::timeout(attempt, c.refresh_token()).await;
                    }
                    continue;
                }
                Ok(Err(e)) => map_err(&what, e),
                Err(_) => {
                    self.redial(idx, &conn);
                    StoreError::Unavailable(format!("{what}: no answer in {attempt:?}"))
                }
            };
            if is_lease_not_found(&e) {
                return Ok((None, 0));
            }
            tracing::debug!("{e}");
            return Err(e);
        }
    }

    /// Moves on from endpoint `from` (if nobody did already).
    fn rotate(&self, from: usize) {
        let next = (from + 1) % self.clients.len();
        if next != from
            && self
                .current
                .compare_exchange(from, next, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(
                from = %self.endpoints[from],
                to = %self.endpoints[next],
                "etcd endpoint unavailable, switching"
            );
        }
    }

    /// Runs `f` on the current endpoint, rotating and retrying with backoff
    /// while it fails as unavailable, for at most `budget`.
    async fn call<T, F, Fut>(&self, what: &str, budget: Duration, f: F) -> Result<T, StoreError>
    where
        F: Fn(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.call_with(what, budget, ATTEMPT_TIMEOUT, |_, c| f(c))
            .await
    }

    /// [`Inner::call`] with its own per-endpoint attempt timeout; `f` is
    /// also given the index of the endpoint it runs on.
    async fn call_with<T, F, Fut>(
        &self,
        what: &str,
        budget: Duration,
        attempt_timeout: Duration,
        f: F,
    ) -> Result<T, StoreError>
    where
        F: Fn(usize, Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let start = Instant::now();
        let mut backoff = BACKOFF_MIN;
        let mut tried_in_round = 0usize;
        let mut renewed_token = false;
        loop {
            let idx = self.current.load(Ordering::Relaxed);
            let endpoint = &self.endpoints[idx];
            let conn = self.conn(idx);
            let attempt = async {
                let client = self.client_in(idx, &conn).await?;
                f(idx, client).await
            };
            let err = match tokio::time::timeout(attempt_timeout, attempt).await {
                Ok(Ok(v)) => {
                    conn.proven.store(true, Ordering::Relaxed);
                    return Ok(v);
                }
                Ok(Err(e)) if is_invalid_token(&e) && !renewed_token => {
                    // Watches and keepalive streams are not covered by
                    // etcd-client's own token refresh: renew it here, once.
                    renewed_token = true;
                    tracing::debug!("{what} on {endpoint}: auth token refused; renewing it");
                    let conn = self.conn(idx);
                    if let Some(c) = conn.cell.get() {
                        let _ = tokio::time::timeout(attempt_timeout, c.refresh_token()).await;
                    }
                    continue;
                }
                Ok(Err(e)) => map_err(&format!("{what} on {endpoint}"), e),
                Err(_) => StoreError::Unavailable(format!(
                    "{what} on {endpoint}: no answer in {attempt_timeout:?}"
                )),
            };
            if !matches!(err, StoreError::Unavailable(_)) {
                return Err(err);
            }
            tracing::debug!("{err}");
            self.rotate(idx);
            if start.elapsed() + backoff > budget {
                return Err(err);
            }
            tried_in_round += 1;
            if tried_in_round >= self.clients.len() {
                tried_in_round = 0;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }

    /// `lease`'s keepalive slot, added if it has none. Adding one closes
    /// the streams of leases nobody renewed for [`KEEPALIVE_IDLE`].
    fn keepalive_slot(&self, lease: LeaseId) -> KeepAliveSlot {
        let mut slots = self.keepalives.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slot) = slots.get(&lease) {
            return slot.clone();
        }
        slots.retain(|_, slot| {
            Arc::strong_count(slot) > 1
                || slot
                    .try_lock()
                    .map_or(true, |k| k.used.elapsed() < KEEPALIVE_IDLE)
        });
        let slot = Arc::new(tokio::sync::Mutex::new(KeptStream {
            chan: None,
            used: Instant::now(),
        }));
        slots.insert(lease, slot.clone());
        slot
    }

    /// Closes `lease`'s keepalive stream (revoked or gone).
    fn forget_keepalive(&self, lease: LeaseId) {
        let mut slots = self.keepalives.lock().unwrap_or_else(|p| p.into_inner());
        slots.remove(&lease);
    }

    async fn list_page(
        &self,
        from_key: Vec<u8>,
        end: Vec<u8>,
        revision: Revision,
    ) -> Result<(Vec<KeyValue>, bool, Revision), StoreError> {
        self.call("list", RETRY_BUDGET, |mut c| {
            let from_key = from_key.clone();
            let end = end.clone();
            async move {
                let mut opts = GetOptions::new().with_range(end).with_limit(LIST_PAGE);
                if revision > 0 {
                    opts = opts.with_revision(revision);
                }
                let mut resp = c.get(from_key, Some(opts)).await?;
                let rev = resp.header().map(|h| h.revision()).unwrap_or(0);
                let more = resp.more();
                let kvs = resp.take_kvs();
                Ok((kvs, more, rev))
            }
        })
        .await
        .map(|(kvs, more, rev)| (kvs.iter().map(convert_kv).collect(), more, rev))
    }

    /// Opens a watch from `from` (0 = now) and waits for etcd to confirm it.
    async fn open_watch(&self, prefix: &str, from: Revision) -> Result<Opened, StoreError> {
        let opened = self
            .call("watch", RETRY_BUDGET, |mut c| {
                let prefix = prefix.to_owned();
                async move {
                    let mut opts = WatchOptions::new().with_prefix();
                    if from > 0 {
                        opts = opts.with_start_revision(from);
                    }
                    let mut stream = c.watch(prefix, Some(opts)).await?;
                    match stream.message().await? {
                        // An expired auth token cancels the watch at
                        // once: an error, so that `call` renews it.
                        Some(resp)
                            if resp.canceled()
                                && resp.cancel_reason().contains("invalid auth token") =>
                        {
                            Err(etcd_client::Error::WatchError(format!(
                                "watch canceled: {}",
                                resp.cancel_reason()
                            )))
                        }
                        Some(resp) => Ok((stream, resp)),
                        None => Err(etcd_client::Error::WatchError(
                            "watch stream closed before it was created".into(),
                        )),
                    }
                }
            })
            .await?;
        let (stream, resp) = opened;
        if resp.compact_revision() > 0 {
            return Ok(Opened::Compacted(resp.compact_revision()));
        }
        if resp.canceled() {
            return Err(StoreError::Unavailable(format!(
                "watch {prefix} from {from}: canceled by etcd: {}",
                resp.cancel_reason()
            )));
        }
        let header_rev = resp.header().map(|h| h.revision()).unwrap_or(0);
        // A created response carries no events; anything else is kept.
        Ok(Opened::Open {
            stream,
            header_rev,
            first: if resp.created() { None } else { Some(resp) },
        })
    }
}
