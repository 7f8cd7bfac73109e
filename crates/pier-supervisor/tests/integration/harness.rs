//! A real store (embedded in a temp dir, or etcd), the real reflector, fake
//! nodes registered under leases the test controls, and a fake node agent
//! that answers each pod placed on a live fake node with a PodStatus.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use pier_model::{
    Name, Namespace, Node, ObjectKey, Placement, Pod, PodPhase, PodStatus, PodTemplate, ReplicaSet,
    Replicas, Resources, Snapshot, encode, keys,
};
use pier_store::lease::LeaseKeeper;
use pier_store::reflector::Reflector;
use pier_store::{EmbeddedStore, LeaseId, Store, Ttl};
use pier_supervisor::{Problems, Supervisor, SupervisorConfig};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Images whose name contains this fail on the fake nodes, as a missing
/// image fails on a real one.
pub const MISSING: &str = "missing";

pub fn n(s: &str) -> Name {
    Name::new(s).expect("valid name")
}

pub fn key(s: &str) -> ObjectKey {
    (Namespace::default(), n(s))
}

pub fn replicaset(name: &str, replicas: u32) -> ReplicaSet {
    ReplicaSet {
        name: n(name),
        namespace: Namespace::default(),
        template: PodTemplate {
            image: "pier-test/httpd:latest".into(),
            ..Default::default()
        },
        replicas: Replicas::new(replicas).expect("replicas"),
        placement: Placement::default(),
        min_replicas: None,
        max_replicas: None,
        sla: None,
        created_at: 0,
        update_config: Default::default(),
        rollback_config: Default::default(),
        revision: 0,
        history: Vec::new(),
    }
}

struct FakeNode {
    lease: LeaseId,
    /// Cancelling stops the keepalive without revoking: the node "dies".
    stop: CancellationToken,
}

pub struct Cluster {
    pub store: Arc<dyn Store>,
    pub reflector: Reflector,
    pub cancel: CancellationToken,
    nodes: Arc<Mutex<BTreeMap<Name, FakeNode>>>,
    tasks: Vec<JoinHandle<()>>,
    _dir: Option<tempfile::TempDir>,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.cancel.cancel();
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Cluster {
    /// An embedded store in a fresh temp dir.
    pub async fn embedded() -> Result<Cluster> {
        let dir = tempfile::tempdir()?;
        let store = EmbeddedStore::open(dir.path())?;
        Ok(Cluster::with_store(Arc::new(store), Some(dir)).await)
    }

    pub async fn with_store(store: Arc<dyn Store>, dir: Option<tempfile::TempDir>) -> Cluster {
        let cancel = CancellationToken::new();
        let reflector = Reflector::spawn(store.clone(), cancel.child_token());
        reflector.synced().await;
        let nodes: Arc<Mutex<BTreeMap<Name, FakeNode>>> = Arc::default();
        let agent = tokio::spawn(fake_agent(
            store.clone(),
            reflector.subscribe(),
            nodes.clone(),
            cancel.child_token(),
        ));
        Cluster {
            store,
            reflector,
            cancel,
            nodes,
            tasks: vec![agent],
            _dir: dir,
        }
    }

    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.reflector.snapshot()
    }

    /// Registers a node under a fresh 2 s lease (etcd's minimum), kept alive
    /// until [`Cluster::kill_node`].
    pub async fn add_node(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        capacity: Resources,
    ) -> Result<()> {
        let stop = self.cancel.child_token();
        let keeper =
            LeaseKeeper::start(self.store.clone(), Ttl::from_secs(2)?, stop.clone()).await?;
        let lease = keeper.current().context("lease")?;
        let node = Node {
            name: n(name),
            addr: IpAddr::V4(Ipv4Addr::LOCALHOST),
            mesh_port: 0,
            dns_addr: None,
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            capacity,
            version: "test".into(),
            started_at: 0,
            refused: Vec::new(),
            runtime_down_since: None,
        };
        self.store
            .put(&keys::node(&node.name), encode(&node), Some(lease))
            .await?;
        self.nodes
            .lock()
            .expect("nodes lock")
            .insert(n(name), FakeNode { lease, stop });
        Ok(())
    }

    /// Stops renewing the node's lease: after its TTL the store deletes the
    /// node and its pod statuses, as when a host dies.
    pub fn kill_node(&self, name: &str) {
        if let Some(node) = self.nodes.lock().expect("nodes lock").remove(&n(name)) {
            node.stop.cancel();
        }
    }

    pub async fn put_rs(&self, rs: &ReplicaSet) -> Result<()> {
        self.store
            .put(&keys::replicaset(&rs.namespace, &rs.name), encode(rs), None)
            .await?;
        Ok(())
    }

    pub async fn delete_rs(&self, name: &str) -> Result<()> {
        self.store
            .delete(&keys::replicaset(&Namespace::default(), &n(name)))
            .await?;
        Ok(())
    }

    pub async fn delete_pod(&self, name: &Name) -> Result<()> {
        self.store
            .delete(&keys::pod(&Namespace::default(), name))
            .await?;
        Ok(())
    }

    /// Overwrites a pod's status, as its node's agent would.
    pub async fn set_status(
        &self,
        pod: &Pod,
        phase: PodPhase,
        ready: bool,
        message: &str,
    ) -> Result<()> {
        let lease = self
            .nodes
            .lock()
            .expect("nodes lock")
            .get(&pod.node)
            .map(|n| n.lease)
            .context("pod's node is not a live fake node")?;
        let st = status_for(pod, phase, ready, message);
        self.store
            .put(
                &keys::pod_status(&pod.namespace, &pod.name),
                encode(&st),
                Some(lease),
            )
            .await?;
        Ok(())
    }

    /// Starts a supervisor for `node` with its own cancel token.
    pub fn supervisor(&self, node: &str, cfg: SupervisorConfig) -> Result<RunningSupervisor> {
        let sup = Supervisor::new(cfg, n(node), self.store.clone(), self.reflector.subscribe())?;
        let leader = sup.is_leader();
        let problems = sup.problems();
        let cancel = self.cancel.child_token();
        let task = tokio::spawn(sup.run(cancel.clone()));
        Ok(RunningSupervisor {
            leader,
            problems,
            cancel,
            task: Some(task),
        })
    }

    /// Waits until `f` holds on a snapshot; returns that snapshot.
    pub async fn wait_for<F>(&self, what: &str, within: Duration, mut f: F) -> Result<Arc<Snapshot>>
    where
        F: FnMut(&Snapshot) -> bool,
    {
        let mut rx = self.reflector.subscribe();
        let res = tokio::time::timeout(within, rx.wait_for(|s| f(s))).await;
        match res {
            Ok(Ok(s)) => Ok(s.clone()),
            Ok(Err(_)) => bail!("reflector stopped while waiting for {what}"),
            Err(_) => bail!(
                "timed out after {within:?} waiting for {what}; pods now: {:?}",
                describe(&self.snapshot())
            ),
        }
    }
}

pub struct RunningSupervisor {
    pub leader: watch::Receiver<bool>,
    pub problems: watch::Receiver<Problems>,
    pub cancel: CancellationToken,
    pub task: Option<JoinHandle<Result<(), pier_supervisor::SupervisorError>>>,
}

impl RunningSupervisor {
    /// Kills the supervisor as a crash would: the task is dropped, its lease
    /// is not revoked (it expires after the TTL). Returns once the task is
    /// gone: `abort` only marks it, and a task still being polled on another
    /// worker would see a `cancel` fired meanwhile (by `Drop`) and resign
    /// gracefully instead of crashing.
    pub async fn crash(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
            let _ = t.await;
        }
    }

    pub fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }
}

impl Drop for RunningSupervisor {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// The pods of a replica set in `snap`.
pub fn pods_of(snap: &Snapshot, rs: &str) -> Vec<Arc<Pod>> {
    snap.pods
        .values()
        .filter(|p| p.replicaset.as_str() == rs)
        .cloned()
        .collect()
}

pub fn phase_of(snap: &Snapshot, pod: &Pod) -> Option<(PodPhase, bool)> {
    snap.pod_statuses
        .get(&(pod.namespace.clone(), pod.name.clone()))
        .map(|s| (s.phase, s.ready))
}

/// `count` pods of `rs`, each Running and ready.
pub fn all_ready(snap: &Snapshot, rs: &str, count: usize) -> bool {
    let pods = pods_of(snap, rs);
    pods.len() == count
        && pods
            .iter()
            .all(|p| phase_of(snap, p) == Some((PodPhase::Running, true)))
}

pub fn per_node(snap: &Snapshot, rs: &str) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for p in pods_of(snap, rs) {
        *m.entry(p.node.to_string()).or_default() += 1;
    }
    m
}

fn describe(snap: &Snapshot) -> Vec<String> {
    snap.pods
        .values()
        .map(|p| format!("{}@{}:{:?}", p.name, p.node, phase_of(snap, p)))
        .collect()
}

fn status_for(pod: &Pod, phase: PodPhase, ready: bool, message: &str) -> PodStatus {
    PodStatus {
        name: Some(pod.name.clone()),
        namespace: pod.namespace.clone(),
        node: Some(pod.node.clone()),
        phase,
        ready,
        container_id: None,
        ip: None,
        started_at: None,
        restarts: 0,
        message: message.into(),
    }
}

/// The node agents of every live fake node: a new pod gets Running+ready at
/// once (Failed when its image contains [`MISSING`]); a deleted pod's status
/// is deleted.
async fn fake_agent(
    store: Arc<dyn Store>,
    mut rx: watch::Receiver<Arc<Snapshot>>,
    nodes: Arc<Mutex<BTreeMap<Name, FakeNode>>>,
    cancel: CancellationToken,
) {
    let mut written: BTreeSet<ObjectKey> = BTreeSet::new();
    loop {
        let snap = rx.borrow_and_update().clone();
        // A std Mutex held only to copy the leases, never across an await.
        let leases: BTreeMap<Name, LeaseId> = nodes
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.lease)).collect())
            .unwrap_or_default();
        for (k, pod) in snap.pods.iter() {
            let Some(lease) = leases.get(&pod.node) else {
                continue;
            };
            if snap.pod_statuses.contains_key(k) || written.contains(k) {
                continue;
            }
            let st = if pod.template.image.contains(MISSING) {
                status_for(
                    pod,
                    PodPhase::Failed,
                    false,
                    &format!("image {:?} not found", pod.template.image),
                )
            } else {
                status_for(pod, PodPhase::Running, true, "")
            };
            if let Err(e) = store
                .put(&keys::pod_status(&k.0, &k.1), encode(&st), Some(*lease))
                .await
            {
                tracing::warn!(error = %e, "fake agent: writing status failed");
                continue;
            }
            written.insert(k.clone());
        }
        for (k, st) in snap.pod_statuses.iter() {
            let ours = st.node.as_ref().is_some_and(|n| leases.contains_key(n));
            if ours && !snap.pods.contains_key(k) {
                if let Err(e) = store.delete(&keys::pod_status(&k.0, &k.1)).await {
                    tracing::warn!(error = %e, "fake agent: deleting status failed");
                }
            }
        }
        written.retain(|k| snap.pods.contains_key(k));
        tokio::select! {
            _ = cancel.cancelled() => return,
            r = rx.changed() => if r.is_err() { return },
        }
    }
}

/// Quick settings for tests: a 2 s lease (etcd's minimum), a 1 s requeue.
pub fn test_config() -> SupervisorConfig {
    SupervisorConfig {
        enabled: true,
        lease_ttl_secs: 2,
        requeue_interval_ms: 1000,
        node_grace_ms: 0,
        autoscale_interval_ms: 1000,
    }
}

pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
