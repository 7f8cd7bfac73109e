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
//!   one message each way on it); it is re-opened, on the current endpoint,
//!   only when it breaks or does not answer in time. Opening a stream per
//!   renewal cost 1,000 hosts their leases under load (issue 17).
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
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use etcd_client::{
    Client, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    WatchOptions,
};
use tokio::sync::{OnceCell, mpsc};

use crate::etcd_security::EtcdSecurity;
use crate::{
    Compare, KeyValue, LeaseId, ListResult, Revision, Store, StoreError, Ttl, Txn, TxnOp,
    TxnResult, WatchEvent, WatchItem, WatchStream,
};

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
    /// One client per endpoint, made on first use: with a user, making it
    /// authenticates, which needs that member up.
    clients: Vec<OnceCell<Client>>,
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

/// An open LeaseKeepAlive stream of one lease.
struct KeepAliveChan {
    /// The endpoint it was opened on.
    idx: usize,
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
            clients: names.iter().map(|_| OnceCell::new()).collect(),
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
        self.clients[idx]
            .get_or_try_init(|| {
                Client::connect([self.endpoints[idx].as_str()], Some(self.options.clone()))
            })
            .await
            .cloned()
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
            let attempt = async {
                let client = self.client(idx).await?;
                f(idx, client).await
            };
            let err = match tokio::time::timeout(attempt_timeout, attempt).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) if is_invalid_token(&e) && !renewed_token => {
                    // Watches and keepalive streams are not covered by
                    // etcd-client's own token refresh: renew it here, once.
                    renewed_token = true;
                    tracing::debug!("{what} on {endpoint}: auth token refused; renewing it");
                    if let Some(c) = self.clients[idx].get() {
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

// Built once per watch (re)open; boxing would buy nothing.
#[allow(clippy::large_enum_variant)]
enum Opened {
    Open {
        stream: etcd_client::WatchStream,
        header_rev: Revision,
        first: Option<etcd_client::WatchResponse>,
    },
    Compacted(Revision),
}

/// An error with its sources, deduplicated: tonic's "transport error"
/// alone says nothing; the rustls or etcd cause is further down.
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
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
fn refusal(text: &str, user: Option<&str>, sent_cert: Option<bool>) -> Option<String> {
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
fn is_invalid_token(e: &etcd_client::Error) -> bool {
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
fn map_err(what: &str, e: etcd_client::Error) -> StoreError {
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

fn is_lease_not_found(e: &StoreError) -> bool {
    matches!(e, StoreError::NoSuchLease { .. })
}

/// Keys under pier's prefixes are ASCII; a foreign non-UTF-8 key is kept
/// (lossily) so that the reflector logs and skips it rather than the watch
/// failing.
fn convert_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: kv.create_revision(),
        mod_revision: kv.mod_revision(),
        version: kv.version(),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    }
}

/// The end of the range of keys starting with `prefix` (etcd's convention).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

fn convert_op(op: &TxnOp) -> etcd_client::TxnOp {
    match op {
        TxnOp::Put { key, value, lease } => etcd_client::TxnOp::put(
            key.as_str(),
            value.clone(),
            lease.map(|l| PutOptions::new().with_lease(l.0)),
        ),
        TxnOp::Delete { key } => etcd_client::TxnOp::delete(key.as_str(), None),
    }
}

fn convert_compare(c: &Compare) -> etcd_client::Compare {
    match c {
        Compare::ModRevision(k, rev) => {
            etcd_client::Compare::mod_revision(k.as_str(), CompareOp::Equal, *rev)
        }
        Compare::Absent(k) => {
            etcd_client::Compare::create_revision(k.as_str(), CompareOp::Equal, 0)
        }
        Compare::Exists(k) => {
            etcd_client::Compare::create_revision(k.as_str(), CompareOp::Greater, 0)
        }
    }
}

fn convert_events(resp: &etcd_client::WatchResponse) -> Vec<WatchEvent> {
    let mut out = Vec::with_capacity(resp.events().len());
    for ev in resp.events() {
        let Some(kv) = ev.kv() else { continue };
        let kv = convert_kv(kv);
        out.push(match ev.event_type() {
            EventType::Put => WatchEvent::Put(kv),
            EventType::Delete => WatchEvent::Delete {
                key: kv.key,
                mod_revision: kv.mod_revision,
            },
        });
    }
    out
}

#[async_trait::async_trait]
impl Store for EtcdStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        let kvs = self
            .inner
            .call(&format!("get {key}"), RETRY_BUDGET, |mut c| async move {
                let mut resp = c.get(key, None).await?;
                Ok(resp.take_kvs())
            })
            .await?;
        Ok(kvs.first().map(convert_kv))
    }

    async fn list(&self, prefix: &str) -> Result<ListResult, StoreError> {
        let end = prefix_end(prefix.as_bytes());
        let mut kvs = Vec::new();
        let mut from = prefix.as_bytes().to_vec();
        let mut revision = 0;
        loop {
            let (page, more, rev) = self
                .inner
                .list_page(from.clone(), end.clone(), revision)
                .await
                .map_err(|e| compacted_at(e, revision))?;
            if revision == 0 {
                revision = rev;
            }
            let last = page.last().map(|kv| kv.key.clone());
            kvs.extend(page);
            match (more, last) {
                (true, Some(last)) => {
                    from = last.into_bytes();
                    from.push(0);
                }
                _ => break,
            }
        }
        Ok(ListResult { kvs, revision })
    }

    async fn put(
        &self,
        key: &str,
        value: Vec<u8>,
        lease: Option<LeaseId>,
    ) -> Result<Revision, StoreError> {
        let res = self
            .inner
            .call(&format!("put {key}"), RETRY_BUDGET, |mut c| {
                let value = value.clone();
                async move {
                    let opts = lease.map(|l| PutOptions::new().with_lease(l.0));
                    let resp = c.put(key, value, opts).await?;
                    Ok(resp.header().map(|h| h.revision()).unwrap_or(0))
                }
            })
            .await;
        match (res, lease) {
            (Err(e), Some(l)) if is_lease_not_found(&e) => Err(StoreError::LeaseNotFound(l)),
            (r, _) => r,
        }
    }

    async fn delete(&self, key: &str) -> Result<(bool, Revision), StoreError> {
        self.inner
            .call(&format!("delete {key}"), RETRY_BUDGET, |mut c| async move {
                let resp = c.delete(key, None::<DeleteOptions>).await?;
                Ok((
                    resp.deleted() > 0,
                    resp.header().map(|h| h.revision()).unwrap_or(0),
                ))
            })
            .await
    }

    async fn txn(&self, txn: Txn) -> Result<TxnResult, StoreError> {
        let compares: Vec<_> = txn.compares.iter().map(convert_compare).collect();
        let success: Vec<_> = txn.success.iter().map(convert_op).collect();
        let failure: Vec<_> = txn.failure.iter().map(convert_op).collect();
        let res = self
            .inner
            .call("txn", RETRY_BUDGET, |mut c| {
                let t = etcd_client::Txn::new()
                    .when(compares.clone())
                    .and_then(success.clone())
                    .or_else(failure.clone());
                async move {
                    let resp = c.txn(t).await?;
                    Ok(TxnResult {
                        succeeded: resp.succeeded(),
                        revision: resp.header().map(|h| h.revision()).unwrap_or(0),
                    })
                }
            })
            .await;
        match res {
            Err(e) if is_lease_not_found(&e) => {
                let lease = txn
                    .success
                    .iter()
                    .chain(&txn.failure)
                    .find_map(|op| match op {
                        TxnOp::Put { lease, .. } => *lease,
                        TxnOp::Delete { .. } => None,
                    });
                match lease {
                    Some(l) => Err(StoreError::LeaseNotFound(l)),
                    None => Err(e),
                }
            }
            r => r,
        }
    }

    async fn lease_grant(&self, ttl: Ttl) -> Result<LeaseId, StoreError> {
        let id = self
            .inner
            .call("lease grant", RETRY_BUDGET, |mut c| async move {
                let resp = c.lease_grant(ttl.secs() as i64, None).await?;
                Ok(LeaseId(resp.id()))
            })
            .await?;
        // A keepalive must be able to give up on a silent member and reach
        // another well within the shortest TTL granted.
        let ms = (ttl.as_duration() / 4).as_millis() as u64;
        self.inner
            .keepalive_attempt_ms
            .fetch_min(ms.max(200), Ordering::Relaxed);
        Ok(id)
    }

    async fn lease_keepalive(&self, lease: LeaseId) -> Result<Ttl, StoreError> {
        let attempt =
            Duration::from_millis(self.inner.keepalive_attempt_ms.load(Ordering::Relaxed));
        let slot = self.inner.keepalive_slot(lease);
        let mut kept = slot.lock().await;
        kept.used = Instant::now();
        // The kept stream first: one message each way.
        let mut answer = None;
        if let Some(mut chan) = kept.chan.take() {
            let endpoint = &self.inner.endpoints[chan.idx];
            match tokio::time::timeout(attempt, chan.renew()).await {
                Ok(Ok(ttl)) => {
                    answer = Some(ttl);
                    kept.chan = Some(chan);
                }
                Ok(Err(e)) => {
                    tracing::debug!(
                        "lease keepalive {lease} on {endpoint}: stream broken ({}); opening another",
                        chain(&e)
                    );
                    self.inner.rotate(chan.idx);
                }
                Err(_) => {
                    tracing::debug!(
                        "lease keepalive {lease} on {endpoint}: no answer in {attempt:?}; opening another stream"
                    );
                    self.inner.rotate(chan.idx);
                }
            }
        }
        // None, or it broke: open one (etcd-client's open renews once and
        // swallows the answer; the renewal after it gives the TTL).
        let ttl = match answer {
            Some(ttl) => ttl,
            None => {
                let opened = self
                    .inner
                    .call_with(
                        &format!("lease keepalive {lease}"),
                        RETRY_BUDGET,
                        attempt,
                        |idx, mut c| async move {
                            let (keeper, stream) = c.lease_keep_alive(lease.0).await?;
                            let mut chan = KeepAliveChan {
                                idx,
                                keeper,
                                stream,
                            };
                            let ttl = chan.renew().await?;
                            Ok((chan, ttl))
                        },
                    )
                    .await;
                match opened {
                    Ok((chan, ttl)) => {
                        kept.chan = Some(chan);
                        ttl
                    }
                    Err(e) if is_lease_not_found(&e) => 0,
                    Err(e) => return Err(e),
                }
            }
        };
        if ttl <= 0 {
            kept.chan = None;
            drop(kept);
            self.inner.forget_keepalive(lease);
            return Err(StoreError::LeaseNotFound(lease));
        }
        // etcd never reports less than the minimum TTL for a live lease,
        // but be lenient with rounding.
        Ttl::from_secs((ttl as u32).max(Ttl::MIN))
    }

    async fn lease_revoke(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.inner.forget_keepalive(lease);
        self.inner
            .call(
                &format!("lease revoke {lease}"),
                RETRY_BUDGET,
                |mut c| async move {
                    c.lease_revoke(lease.0).await?;
                    Ok(())
                },
            )
            .await
            .map_err(|e| {
                if is_lease_not_found(&e) {
                    StoreError::LeaseNotFound(lease)
                } else {
                    e
                }
            })
    }

    async fn watch(&self, prefix: &str, from: Revision) -> Result<WatchStream, StoreError> {
        let (stream, header_rev, first) = match self.inner.open_watch(prefix, from).await? {
            Opened::Open {
                stream,
                header_rev,
                first,
            } => (stream, header_rev, first),
            Opened::Compacted(c) => {
                return Err(StoreError::Compacted {
                    requested: from,
                    compact_revision: c,
                });
            }
        };
        let next = if from > 0 { from } else { header_rev + 1 };
        let (tx, rx) = mpsc::channel(256);
        let task = WatchTask {
            inner: self.inner.clone(),
            prefix: prefix.to_owned(),
            next,
            tx,
        };
        tokio::spawn(task.run(stream, first));
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx)))
    }

    async fn compact(&self, revision: Revision) -> Result<(), StoreError> {
        self.inner
            .call(
                &format!("compact {revision}"),
                RETRY_BUDGET,
                |mut c| async move {
                    c.compact(revision, None).await?;
                    Ok(())
                },
            )
            .await
            .map_err(|e| compacted_at(e, revision))
    }
}

/// One watch: feeds `tx` until the receiver goes away or the revision to
/// resume from is compacted.
struct WatchTask {
    inner: Arc<Inner>,
    prefix: String,
    /// The revision to resume from: one past the last delivered.
    next: Revision,
    tx: mpsc::Sender<Result<WatchItem, StoreError>>,
}

enum Step {
    /// The stream broke; reopen.
    Broken(String),
    /// The receiver is gone or the watch ended for good.
    Done,
}

impl WatchTask {
    async fn run(
        mut self,
        stream: etcd_client::WatchStream,
        first: Option<etcd_client::WatchResponse>,
    ) {
        let mut current = Some((stream, first));
        let mut disconnected = false;
        let mut backoff = BACKOFF_MIN;
        loop {
            let (stream, first) = match current.take() {
                Some(s) => s,
                None => {
                    let opened = tokio::select! {
                        _ = self.tx.closed() => return,
                        r = self.inner.open_watch(&self.prefix, self.next) => r,
                    };
                    match opened {
                        Ok(Opened::Open { stream, first, .. }) => {
                            backoff = BACKOFF_MIN;
                            if disconnected {
                                disconnected = false;
                                tracing::info!(prefix = %self.prefix, from = self.next, "watch resumed");
                                if self.tx.send(Ok(WatchItem::Resumed)).await.is_err() {
                                    return;
                                }
                            }
                            (stream, first)
                        }
                        Ok(Opened::Compacted(c)) => {
                            self.send_compacted(c).await;
                            return;
                        }
                        Err(e) => {
                            if !disconnected {
                                disconnected = true;
                                if !self.send_disconnected(e.to_string()).await {
                                    return;
                                }
                            }
                            tokio::select! {
                                _ = self.tx.closed() => return,
                                _ = tokio::time::sleep(backoff) => {}
                            }
                            backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
                            continue;
                        }
                    }
                }
            };
            match self.pump(stream, first).await {
                Step::Done => return,
                Step::Broken(reason) => {
                    tracing::warn!(prefix = %self.prefix, from = self.next, "watch broken: {reason}");
                    let idx = self.inner.current.load(Ordering::Relaxed);
                    self.inner.rotate(idx);
                    if !disconnected {
                        disconnected = true;
                        if !self.send_disconnected(reason).await {
                            return;
                        }
                    }
                }
            }
        }
    }

    async fn send_disconnected(&self, reason: String) -> bool {
        self.tx
            .send(Ok(WatchItem::Disconnected { reason }))
            .await
            .is_ok()
    }

    async fn send_compacted(&self, compact_revision: Revision) {
        let _ = self
            .tx
            .send(Err(StoreError::Compacted {
                requested: self.next,
                compact_revision,
            }))
            .await;
    }

    /// Delivers responses until the stream breaks.
    async fn pump(
        &mut self,
        mut stream: etcd_client::WatchStream,
        first: Option<etcd_client::WatchResponse>,
    ) -> Step {
        let mut pending = first;
        // When the stream has been quiet for PROBE_IDLE, ask for a progress
        // notification; no answer within PROBE_TIMEOUT means the member or
        // the path to it is gone (the connection's keep-alive would take
        // 5 s + 5 s to say so).
        let mut probing = false;
        loop {
            let resp = match pending.take() {
                Some(r) => r,
                None => {
                    let quiet = if probing { PROBE_TIMEOUT } else { PROBE_IDLE };
                    let msg = tokio::select! {
                        _ = self.tx.closed() => return Step::Done,
                        m = stream.message() => m,
                        _ = tokio::time::sleep(quiet) => {
                            if probing {
                                return Step::Broken(format!(
                                    "no answer to a progress request in {PROBE_TIMEOUT:?}"
                                ));
                            }
                            match tokio::time::timeout(PROBE_TIMEOUT, stream.request_progress()).await {
                                Ok(Ok(())) => probing = true,
                                Ok(Err(e)) => return Step::Broken(map_err("watch progress request", e).to_string()),
                                Err(_) => return Step::Broken("could not send a progress request".into()),
                            }
                            continue;
                        }
                    };
                    probing = false;
                    match msg {
                        Ok(Some(r)) => r,
                        Ok(None) => return Step::Broken("watch stream ended".into()),
                        Err(e) => return Step::Broken(map_err("watch", e).to_string()),
                    }
                }
            };
            if resp.compact_revision() > 0 {
                self.send_compacted(resp.compact_revision()).await;
                return Step::Done;
            }
            if resp.canceled() {
                return Step::Broken(format!("watch canceled by etcd: {}", resp.cancel_reason()));
            }
            let events = convert_events(&resp);
            let Some(last) = events.last() else { continue };
            let revision = match last {
                WatchEvent::Put(kv) => kv.mod_revision,
                WatchEvent::Delete { mod_revision, .. } => *mod_revision,
            };
            if self
                .tx
                .send(Ok(WatchItem::Events { revision, events }))
                .await
                .is_err()
            {
                return Step::Done;
            }
            self.next = revision + 1;
        }
    }
}

/// A `Compacted` error names the revision asked for (etcd's error does not
/// say which); any other error is left as it is.
fn compacted_at(e: StoreError, revision: Revision) -> StoreError {
    match e {
        StoreError::Compacted { .. } => StoreError::Compacted {
            requested: revision,
            compact_revision: revision,
        },
        other => other,
    }
}
