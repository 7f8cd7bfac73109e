//! The store key schema. This module is the only place that formats or
//! parses a key; everything else calls these functions.
//!
//! ```text
//! /pier/v1/nodes/<node>
//! /pier/v1/services/<ns>/<svc>
//! /pier/v1/replicasets/<ns>/<rs>
//! /pier/v1/pods/<ns>/<pod>
//! /pier/v1/podstatus/<ns>/<pod>
//! /pier/v1/endpoints/<ns>/<svc>/<node>/<id>
//! /pier/v1/alloc/vip/<ip>
//! /pier/v1/alloc/nodeport/<port>
//! /pier/v1/stats/<ns>/<svc>/<node>
//! /pier/v1/autoscale/<ns>/<rs>
//! /pier/v1/election/<name>
//! /pier/v1/problems/<ns>/<rs>
//! /pier/v1/rollouts/<ns>/<rs>
//! /pier/v1/nodelabels/<node>
//! /pier/v1/apps/<ns>/<app>
//! /pier/v1/sync/<node>
//! ```

use std::fmt;
use std::net::IpAddr;

use crate::names::{Name, NameError, Namespace, PortNum};

/// Everything pier stores lives under this prefix.
pub const ROOT: &str = "/pier/v1/";

/// Prefixes for listing and watching one kind of key.
pub mod prefix {
    pub const NODES: &str = "/pier/v1/nodes/";
    pub const SERVICES: &str = "/pier/v1/services/";
    pub const REPLICASETS: &str = "/pier/v1/replicasets/";
    pub const PODS: &str = "/pier/v1/pods/";
    pub const POD_STATUSES: &str = "/pier/v1/podstatus/";
    pub const ENDPOINTS: &str = "/pier/v1/endpoints/";
    pub const VIP_ALLOCS: &str = "/pier/v1/alloc/vip/";
    pub const NODE_PORT_ALLOCS: &str = "/pier/v1/alloc/nodeport/";
    pub const STATS: &str = "/pier/v1/stats/";
    pub const ELECTIONS: &str = "/pier/v1/election/";
    pub const PROBLEMS: &str = "/pier/v1/problems/";
    pub const ROLLOUTS: &str = "/pier/v1/rollouts/";
    pub const NODE_LABELS: &str = "/pier/v1/nodelabels/";
    pub const AUTOSCALE: &str = "/pier/v1/autoscale/";
    pub const APPS: &str = "/pier/v1/apps/";
    pub const SYNC: &str = "/pier/v1/sync/";

    /// Every replica set of one namespace.
    pub fn replicasets_in(ns: &Namespace) -> String {
        format!("{REPLICASETS}{ns}/")
    }

    /// Every service of one namespace.
    pub fn services_in(ns: &Namespace) -> String {
        format!("{SERVICES}{ns}/")
    }

    /// Every application of one namespace.
    pub fn apps_in(ns: &Namespace) -> String {
        format!("{APPS}{ns}/")
    }

    use crate::names::{Name, Namespace};

    /// All endpoints of one service, on every node.
    pub fn endpoints_of(ns: &Namespace, svc: &Name) -> String {
        format!("{ENDPOINTS}{ns}/{svc}/")
    }

    /// Every node's stats of one service.
    pub fn stats_of(ns: &Namespace, svc: &Name) -> String {
        format!("{STATS}{ns}/{svc}/")
    }
}

/// A parsed key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    Node(Name),
    Service(Namespace, Name),
    ReplicaSet(Namespace, Name),
    Pod(Namespace, Name),
    PodStatus(Namespace, Name),
    Endpoint {
        namespace: Namespace,
        service: Name,
        node: Name,
        id: Name,
    },
    VipAlloc(IpAddr),
    NodePortAlloc(PortNum),
    Stats {
        namespace: Namespace,
        service: Name,
        node: Name,
    },
    Election(Name),
    /// What keeps a replica set from its desired state.
    Problem(Namespace, Name),
    /// A replica set's rollout progress.
    Rollout(Namespace, Name),
    /// Labels set on a node through the API.
    NodeLabels(Name),
    /// The autoscaler's decisions for a replica set.
    Autoscale(Namespace, Name),
    /// An application (`pier apply`) and the objects it owns.
    App(Namespace, Name),
    /// A node's reflector's sync barrier: written after its watch reopens,
    /// seen again on that watch once every change before it has arrived,
    /// then deleted.
    Sync(Name),
}

/// A key that is not in pier's schema.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("store key {key:?} is not a pier key: {why}")]
pub struct KeyError {
    pub key: String,
    pub why: String,
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use prefix::*;
        match self {
            Key::Node(n) => write!(f, "{NODES}{n}"),
            Key::Service(ns, n) => write!(f, "{SERVICES}{ns}/{n}"),
            Key::ReplicaSet(ns, n) => write!(f, "{REPLICASETS}{ns}/{n}"),
            Key::Pod(ns, n) => write!(f, "{PODS}{ns}/{n}"),
            Key::PodStatus(ns, n) => write!(f, "{POD_STATUSES}{ns}/{n}"),
            Key::Endpoint {
                namespace,
                service,
                node,
                id,
            } => write!(f, "{ENDPOINTS}{namespace}/{service}/{node}/{id}"),
            Key::VipAlloc(ip) => write!(f, "{VIP_ALLOCS}{ip}"),
            Key::NodePortAlloc(p) => write!(f, "{NODE_PORT_ALLOCS}{p}"),
            Key::Stats {
                namespace,
                service,
                node,
            } => write!(f, "{STATS}{namespace}/{service}/{node}"),
            Key::Election(n) => write!(f, "{ELECTIONS}{n}"),
            Key::Problem(ns, n) => write!(f, "{PROBLEMS}{ns}/{n}"),
            Key::Rollout(ns, n) => write!(f, "{ROLLOUTS}{ns}/{n}"),
            Key::NodeLabels(n) => write!(f, "{NODE_LABELS}{n}"),
            Key::Autoscale(ns, n) => write!(f, "{AUTOSCALE}{ns}/{n}"),
            Key::App(ns, n) => write!(f, "{APPS}{ns}/{n}"),
            Key::Sync(n) => write!(f, "{SYNC}{n}"),
        }
    }
}

impl Key {
    /// Parse a full store key.
    pub fn parse(key: &str) -> Result<Key, KeyError> {
        let err = |why: &str| KeyError {
            key: key.chars().take(200).collect(),
            why: why.to_owned(),
        };
        let name_err = |e: NameError| err(&e.to_string());
        let rest = key
            .strip_prefix(ROOT)
            .ok_or_else(|| err("it does not start with /pier/v1/"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let n = |s: &str| Name::new(s).map_err(name_err);
        let ns = |s: &str| Namespace::new(s).map_err(name_err);
        match parts.as_slice() {
            ["nodes", node] => Ok(Key::Node(n(node)?)),
            ["services", a, b] => Ok(Key::Service(ns(a)?, n(b)?)),
            ["replicasets", a, b] => Ok(Key::ReplicaSet(ns(a)?, n(b)?)),
            ["pods", a, b] => Ok(Key::Pod(ns(a)?, n(b)?)),
            ["podstatus", a, b] => Ok(Key::PodStatus(ns(a)?, n(b)?)),
            ["endpoints", a, b, c, d] => Ok(Key::Endpoint {
                namespace: ns(a)?,
                service: n(b)?,
                node: n(c)?,
                id: n(d)?,
            }),
            ["alloc", "vip", ip] => ip
                .parse()
                .map(Key::VipAlloc)
                .map_err(|_| err("the VIP does not parse as an IP address")),
            ["alloc", "nodeport", p] => p.parse().map(Key::NodePortAlloc).map_err(name_err),
            ["stats", a, b, c] => Ok(Key::Stats {
                namespace: ns(a)?,
                service: n(b)?,
                node: n(c)?,
            }),
            ["election", e] => Ok(Key::Election(n(e)?)),
            ["problems", a, b] => Ok(Key::Problem(ns(a)?, n(b)?)),
            ["rollouts", a, b] => Ok(Key::Rollout(ns(a)?, n(b)?)),
            ["nodelabels", a] => Ok(Key::NodeLabels(n(a)?)),
            ["autoscale", a, b] => Ok(Key::Autoscale(ns(a)?, n(b)?)),
            ["apps", a, b] => Ok(Key::App(ns(a)?, n(b)?)),
            ["sync", a] => Ok(Key::Sync(n(a)?)),
            _ => Err(err("unknown kind or wrong number of parts")),
        }
    }
}

pub fn node(name: &Name) -> String {
    Key::Node(name.clone()).to_string()
}
pub fn service(ns: &Namespace, name: &Name) -> String {
    Key::Service(ns.clone(), name.clone()).to_string()
}
pub fn replicaset(ns: &Namespace, name: &Name) -> String {
    Key::ReplicaSet(ns.clone(), name.clone()).to_string()
}
pub fn pod(ns: &Namespace, name: &Name) -> String {
    Key::Pod(ns.clone(), name.clone()).to_string()
}
pub fn pod_status(ns: &Namespace, name: &Name) -> String {
    Key::PodStatus(ns.clone(), name.clone()).to_string()
}
pub fn endpoint(ns: &Namespace, svc: &Name, node: &Name, id: &Name) -> String {
    Key::Endpoint {
        namespace: ns.clone(),
        service: svc.clone(),
        node: node.clone(),
        id: id.clone(),
    }
    .to_string()
}
pub fn vip_alloc(ip: IpAddr) -> String {
    Key::VipAlloc(ip).to_string()
}
pub fn node_port_alloc(port: PortNum) -> String {
    Key::NodePortAlloc(port).to_string()
}
pub fn stats(ns: &Namespace, svc: &Name, node: &Name) -> String {
    Key::Stats {
        namespace: ns.clone(),
        service: svc.clone(),
        node: node.clone(),
    }
    .to_string()
}
/// The supervisor's problem report for replica set `rs`.
pub fn problem(ns: &Namespace, rs: &Name) -> String {
    Key::Problem(ns.clone(), rs.clone()).to_string()
}
/// The supervisor's rollout record for replica set `rs`.
pub fn rollout(ns: &Namespace, rs: &Name) -> String {
    Key::Rollout(ns.clone(), rs.clone()).to_string()
}
/// The labels set on `node` through the API.
pub fn node_labels(node: &Name) -> String {
    Key::NodeLabels(node.clone()).to_string()
}
/// The autoscaler leader's decisions for replica set `rs`.
pub fn autoscale(ns: &Namespace, rs: &Name) -> String {
    Key::Autoscale(ns.clone(), rs.clone()).to_string()
}
/// The application `app` (`pier apply`).
pub fn app(ns: &Namespace, app: &Name) -> String {
    Key::App(ns.clone(), app.clone()).to_string()
}
pub fn election(name: &Name) -> String {
    Key::Election(name.clone()).to_string()
}
/// `node`'s reflector's sync barrier (written and deleted by that
/// reflector only).
pub fn sync(node: &Name) -> String {
    Key::Sync(node.clone()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn label() -> impl Strategy<Value = String> {
        "[a-z0-9]([a-z0-9-]{0,20}[a-z0-9])?"
    }

    fn nm() -> impl Strategy<Value = Name> {
        label().prop_map(|s| Name::new(&s).unwrap())
    }
    fn ns() -> impl Strategy<Value = Namespace> {
        label().prop_map(|s| Namespace::new(&s).unwrap())
    }

    fn any_key() -> impl Strategy<Value = Key> {
        prop_oneof![
            nm().prop_map(Key::Node),
            (ns(), nm()).prop_map(|(a, b)| Key::Service(a, b)),
            (ns(), nm()).prop_map(|(a, b)| Key::ReplicaSet(a, b)),
            (ns(), nm()).prop_map(|(a, b)| Key::Pod(a, b)),
            (ns(), nm()).prop_map(|(a, b)| Key::PodStatus(a, b)),
            (ns(), nm(), nm(), nm()).prop_map(|(a, b, c, d)| {
                Key::Endpoint {
                    namespace: a,
                    service: b,
                    node: c,
                    id: d,
                }
            }),
            any::<u32>().prop_map(|a| Key::VipAlloc(IpAddr::V4(a.into()))),
            any::<u128>().prop_map(|a| Key::VipAlloc(IpAddr::V6(a.into()))),
            (1u16..).prop_map(|p| Key::NodePortAlloc(PortNum::new(p).unwrap())),
            (ns(), nm(), nm()).prop_map(|(a, b, c)| Key::Stats {
                namespace: a,
                service: b,
                node: c
            }),
            nm().prop_map(Key::Election),
            (ns(), nm()).prop_map(|(a, b)| Key::Problem(a, b)),
            (ns(), nm()).prop_map(|(a, b)| Key::Rollout(a, b)),
            nm().prop_map(Key::NodeLabels),
            (ns(), nm()).prop_map(|(a, b)| Key::Autoscale(a, b)),
            (ns(), nm()).prop_map(|(a, b)| Key::App(a, b)),
            nm().prop_map(Key::Sync),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(k in any_key()) {
            prop_assert_eq!(Key::parse(&k.to_string()).unwrap(), k);
        }

        #[test]
        fn parse_never_panics(s in "(/pier/v1/)?[a-z/0-9.:-]{0,40}") {
            let _ = Key::parse(&s);
        }
    }

    #[test]
    fn malformed_keys_name_themselves() {
        for bad in [
            "/other/x",
            "/pier/v1/nodes/",
            "/pier/v1/nodes/A",
            "/pier/v1/services/default",
            "/pier/v1/endpoints/default/web/n1",
            "/pier/v1/alloc/vip/300.1.1.1",
            "/pier/v1/alloc/nodeport/0",
            "/pier/v1/bogus/x",
        ] {
            let e = Key::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn builders_match_parse() {
        let ns = Namespace::default();
        let n = Name::new("web").unwrap();
        assert_eq!(service(&ns, &n), "/pier/v1/services/default/web");
        assert_eq!(
            Key::parse(&endpoint(&ns, &n, &n, &n)).unwrap(),
            Key::Endpoint {
                namespace: ns.clone(),
                service: n.clone(),
                node: n.clone(),
                id: n.clone()
            }
        );
        assert!(endpoint(&ns, &n, &n, &n).starts_with(&prefix::endpoints_of(&ns, &n)));
    }
}
