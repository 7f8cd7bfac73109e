//! The agent's config file: a struct of per-subsystem configs, loaded with
//! `deny_unknown_fields`, then overridden by flags, then validated as a
//! whole before anything is bound.

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};

use pier_model::{Cidr, Labels, Name, Resources};
use pier_proxy::tls::{self, TlsError};
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub store: StoreConfig,
    pub network: NetworkConfig,
    pub api: pier_api::ApiConfig,
    pub dns: pier_dns::DnsConfig,
    pub proxy: pier_proxy::ProxyConfig,
    pub agent: pier_agent::AgentConfig,
    pub supervisor: pier_supervisor::SupervisorConfig,
    /// The mTLS mesh between hosts; off when absent.
    pub mesh: Option<pier_proxy::tls::MeshConfig>,
    /// This agent serves as a watch relay for others; off when absent.
    pub relay: Option<RelayConfig>,
}

/// `[relay]`: this agent watches etcd and fans the watch out to the agents
/// that name it in their `store.relays` (ARCHITECTURE "Watch relays").
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayConfig {
    /// Where the relay listens (TLS, mesh client certificates), e.g.
    /// `0.0.0.0:7444`; an address the other hosts reach.
    #[serde(deserialize_with = "relay_listen")]
    pub listen: SocketAddr,
}

/// `relay.listen`, with an error that names it and shows the form.
fn relay_listen<'de, D: serde::Deserializer<'de>>(d: D) -> Result<SocketAddr, D::Error> {
    let s = String::deserialize(d)?;
    s.parse().map_err(|_| {
        serde::de::Error::custom(format!(
            "relay.listen {s:?} is not IP:PORT; write the address to listen on, e.g. \"0.0.0.0:7444\" (\"[::]:7444\" for IPv6)"
        ))
    })
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Required (here or `--node`): containers in network namespaces share
    /// the host's hostname, so the name never comes from `hostname`.
    pub name: Option<String>,
    /// The address other hosts reach this one at. Default: the source
    /// address of the default route, else 127.0.0.1.
    pub addr: Option<IpAddr>,
    pub labels: Labels,
    pub capacity: Resources,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `embedded`, `etcd://HOST:PORT[,HOST:PORT...]` (plain) or
    /// `etcds://HOST:PORT[,...]` (TLS; needs `ca`).
    pub url: String,
    /// The node lease: a dead agent's endpoints go after this many seconds.
    pub lease_ttl_secs: u32,
    /// etcds://: the CA (PEM) that issued etcd's server certificates. Only
    /// it is trusted, not the system's roots.
    pub ca: Option<PathBuf>,
    /// etcds://: pier's client certificate (PEM), for etcd's
    /// `--client-cert-auth`. With `key`.
    pub cert: Option<PathBuf>,
    /// etcds://: the client certificate's private key (PEM).
    pub key: Option<PathBuf>,
    /// The etcd user to log in as (etcd's `auth enable`). With
    /// `password_file`.
    pub user: Option<String>,
    /// A file holding only the user's password (mode 0600 or 0400), so that
    /// the password is neither in the config nor on the command line.
    pub password_file: Option<PathBuf>,
    /// Watch relays (`HOST:PORT` of agents with `[relay]`) this agent lists
    /// and watches the store through, first that answers; etcd directly
    /// when none does. Leases and writes still go to etcd. Needs `[mesh]`.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub relays: Vec<String>,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "embedded".into(),
            // 5 s: short enough that a dead host's endpoints leave quickly,
            // long enough to ride out a GC pause or a slow etcd fsync.
            lease_ttl_secs: 5,
            ca: None,
            cert: None,
            key: None,
            user: None,
            password_file: None,
            relays: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NetworkConfig {
    /// VIPs come from here; `.10` is the DNS server's VIP.
    pub service_cidr: Cidr,
    /// Dual stack: the IPv6 CIDR IPv6 VIPs come from. Each service given a
    /// VIP also gets one from here, served on pier0 and answered as AAAA.
    /// Off by default (a ULA prefix is the site's to choose: a fixed
    /// default could collide with the site's own). The same on every agent.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub service_cidr6: Option<Cidr>,
    pub node_port_min: u16,
    pub node_port_max: u16,
    /// Serve DNS on the DNS VIP (`.10` of service_cidr) on pier0.
    pub serve_dns_vip: bool,
    /// Extra DNS listen addresses (UDP and TCP).
    pub dns_listen: Vec<SocketAddr>,
    /// Where state lives: the embedded store and the API token. Made mode
    /// 0700 (0710 with `[api] token_group`); an open one is tightened.
    pub data_dir: PathBuf,
    /// Static endpoints inside these CIDRs are accepted even if they are
    /// loopback, link-local, unspecified, multicast, in the service CIDR or
    /// one of a host's own addresses (all refused by default: every host's
    /// proxy would connect to its own such address).
    pub static_endpoint_allow: Vec<Cidr>,
}

impl Default for NetworkConfig {
    fn default() -> Self {
        NetworkConfig {
            service_cidr: "10.213.0.0/16".parse().expect("valid CIDR"),
            service_cidr6: None,
            node_port_min: 30000,
            node_port_max: 32767,
            serve_dns_vip: true,
            dns_listen: Vec::new(),
            data_dir: PathBuf::from("/var/lib/pier"),
            static_endpoint_allow: Vec::new(),
        }
    }
}

/// A config problem, with what to do about it.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Config {
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError(format!("cannot read config {}: {e}", path.display())))?;
        Self::parse(&text).map_err(|e| ConfigError(format!("config {}: {}", path.display(), e.0)))
    }

    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        // Strict all the way down: `capacity` and `labels` are the model's
        // types, which accept unknown fields in stored records.
        let de = toml::Deserializer::parse(text)
            .map_err(|e| ConfigError(e.to_string().trim().to_owned()))?;
        pier_model::deserialize_strict(de).map_err(|e| ConfigError(e.to_string().trim().to_owned()))
    }

    /// The node name, validated.
    pub fn node_name(&self) -> Result<Name, ConfigError> {
        let raw = self.node.name.as_deref().ok_or_else(|| {
            ConfigError(
                "no node name: pass --node NAME or set node.name in the config (an RFC 1123 label, e.g. host-1)"
                    .into(),
            )
        })?;
        Name::new(raw).map_err(|e| ConfigError(format!("node.name: {e}")))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        self.node_name()?;
        let n = &self.network;
        if n.node_port_min == 0 || n.node_port_min > n.node_port_max {
            return Err(ConfigError(format!(
                "network.node_port_min..node_port_max ({}..{}) is not a range of ports",
                n.node_port_min, n.node_port_max
            )));
        }
        if n.service_cidr.size() < 16 {
            return Err(ConfigError(format!(
                "network.service_cidr {} is too small; use at least a /28",
                n.service_cidr
            )));
        }
        if let Some(c6) = &n.service_cidr6 {
            check_service_cidr6(c6)?;
        }
        if self.store.lease_ttl_secs < 2 {
            return Err(ConfigError(format!(
                "store.lease_ttl_secs = {} is below etcd's minimum of 2",
                self.store.lease_ttl_secs
            )));
        }
        self.check_store_settings()?;
        self.check_relays()?;
        // Each subsystem's own checks, in section order; the first problem wins.
        let sections = [
            ("api", self.api.validate().map_err(|e| e.to_string())),
            ("dns", self.dns.validate().map_err(|e| e.to_string())),
            ("proxy", self.proxy.validate().map_err(|e| e.to_string())),
            ("agent", self.agent.validate().map_err(|e| e.to_string())),
            (
                "supervisor",
                self.supervisor.validate().map_err(|e| e.to_string()),
            ),
        ];
        for (section, r) in sections {
            r.map_err(|e| ConfigError(format!("{section}: {e}")))?;
        }
        Ok(())
    }
}

/// An IPv6 service CIDR must be IPv6 unicast that can hold VIPs: inside
/// fc00::/7 (unique local) or 2000::/3 (global unicast), which leaves out
/// loopback, link-local, multicast and IPv4-mapped space, and at least a
/// /124 (16 addresses).
fn check_service_cidr6(c: &Cidr) -> Result<(), ConfigError> {
    let ok_space = match c.addr() {
        IpAddr::V6(a) => {
            let top = a.segments()[0];
            (top & 0xfe00 == 0xfc00 && c.prefix() >= 7)
                || (top & 0xe000 == 0x2000 && c.prefix() >= 3)
        }
        IpAddr::V4(_) => false,
    };
    if !ok_space {
        return Err(ConfigError(format!(
            "network.service_cidr6 {c} is not IPv6 unicast space; use a unique local prefix of your own, such as fdXX:XXXX:XXXX:XXXX::/112 with random X (RFC 4193), or one of your global prefixes"
        )));
    }
    if c.size() < 16 {
        return Err(ConfigError(format!(
            "network.service_cidr6 {c} is too small; use at least a /124 (a /112 is usual)"
        )));
    }
    Ok(())
}

impl Config {
    /// Checks the `[mesh]` files as the mesh loads them at start: each one
    /// present, the certificates valid now, the key matching the
    /// certificate, and the certificate issued for this node. Separate from
    /// [`Config::validate`] because it reads files: the agent runs it before
    /// binding anything, so a bad certificate is a config error (exit 64).
    pub fn check_mesh(&self) -> Result<(), ConfigError> {
        let Some(m) = &self.mesh else {
            return Ok(());
        };
        let node = self.node_name()?;
        let make = format!(
            "make this node's mesh files with `pier ca issue {node} --ca CA_DIR --out DIR` (ca.pem, node.pem, node-key.pem) and point [mesh] ca, cert and key at them"
        );
        for (field, path) in [("ca", &m.ca), ("cert", &m.cert), ("key", &m.key)] {
            let problem = match std::fs::metadata(path) {
                Ok(md) if md.is_file() => continue,
                Ok(_) => "is not a file".to_owned(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => "does not exist".to_owned(),
                Err(e) => format!("cannot be read ({e})"),
            };
            return Err(ConfigError(format!(
                "mesh.{field} {} {problem}; {make}",
                path.display()
            )));
        }
        let renew = format!("`pier ca issue {node} --ca CA_DIR --out DIR`");
        let (crl, crl_required) = m.crl_path();
        let id = tls::load_identity_with_crl(&m.ca, &m.cert, &m.key, &crl, crl_required)
            .map_err(|e| {
            ConfigError(match e {
                TlsError::Expired {
                    path, not_after, ..
                } if path == m.ca => format!(
                    "mesh.ca {}: the mesh CA expired at {not_after}; make a new one with `pier ca init` and issue every node's certificate again",
                    path.display()
                ),
                TlsError::Expired {
                    path,
                    not_after,
                    now,
                } => format!(
                    "mesh.cert {}: the certificate expired at {not_after} (now {now}); renew it with {renew}",
                    path.display()
                ),
                e @ TlsError::NotYetValid { .. } => format!("mesh: {e}"),
                e => format!("mesh: {e}; {make}"),
            })
        })?;
        tls::check_issued_by_ca(&id, &m.ca, &m.cert).map_err(|e| {
            ConfigError(match e {
                TlsError::NotFromCa { cert, ca, reason } => format!(
                    "mesh.cert {}: not issued by the mesh CA {} ({reason}); issue it from that CA with `pier ca issue {node} --ca CA_DIR --out DIR`, or point mesh.ca at the CA that issued it",
                    cert.display(),
                    ca.display()
                ),
                e => format!("mesh: {e}"),
            })
        })?;
        tls::check_node(&id, &m.cert, &node).map_err(|e| {
            ConfigError(match e {
                TlsError::WrongNode { path, found, .. } => format!(
                    "mesh.cert {}: the certificate is for node {found:?}, not this node {:?}; issue this node's with {renew}",
                    path.display(),
                    node.as_str()
                ),
                e => format!("mesh: {e}"),
            })
        })
    }
}

impl Config {
    /// `[relay]` and `store.relays`: an etcd store (the embedded store is
    /// one host), `[mesh]` (relays and their clients authenticate each
    /// other with the mesh certificates), not both on one node, and
    /// addresses that are addresses.
    fn check_relays(&self) -> Result<(), ConfigError> {
        let relays = &self.store.relays;
        let what = match (&self.relay, relays.is_empty()) {
            (None, true) => return Ok(()),
            (Some(_), false) => {
                return Err(ConfigError(
                    "[relay] and store.relays are both set: a relay watches etcd itself; remove store.relays on this node or remove [relay]".into(),
                ));
            }
            (Some(_), true) => "[relay]",
            (None, false) => "store.relays",
        };
        if store_url(&self.store.url)? == StoreUrl::Embedded {
            return Err(ConfigError(format!(
                "{what} is set but store.url is `embedded`: watch relays fan out an etcd cluster's watches to many hosts, the embedded store is one host's; remove {what}, or set store.url to etcd://HOST:PORT[,...]"
            )));
        }
        let Some(mesh) = &self.mesh else {
            let why = if self.relay.is_some() {
                "the relay accepts only clients with a node certificate of the mesh CA"
            } else {
                "the agent dials its relays with its mesh node certificate"
            };
            return Err(ConfigError(format!(
                "{what} needs [mesh]: {why}; add [mesh] with this node's certificates (README \"More than one host\")"
            )));
        };
        if let Some(r) = &self.relay {
            let a = r.listen;
            if a.port() == 0 {
                return Err(ConfigError(format!(
                    "relay.listen {a} has port 0; give the port the other agents' store.relays name (7444 is usual)"
                )));
            }
            let m = mesh.listen;
            let overlap = a.ip() == m.ip() || a.ip().is_unspecified() || m.ip().is_unspecified();
            if a.port() == m.port() && overlap {
                return Err(ConfigError(format!(
                    "relay.listen {a} and mesh.listen {m} are the same port; give the relay its own (7444 is usual)"
                )));
            }
        }
        for (i, r) in relays.iter().enumerate() {
            let ok = r.rsplit_once(':').is_some_and(|(h, p)| {
                let inner = h.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
                // An IPv6 address needs its brackets: `::1:7444` is ambiguous.
                let host_ok = match inner {
                    Some(v6) => v6.parse::<std::net::Ipv6Addr>().is_ok(),
                    None => !h.is_empty() && !h.contains([':', '/', '[', ']']),
                };
                host_ok
                    && !h.chars().any(char::is_whitespace)
                    && p.parse::<u16>().is_ok_and(|p| p > 0)
            });
            if !ok {
                return Err(ConfigError(format!(
                    "store.relays: {r:?} is not HOST:PORT (an address of an agent with [relay], e.g. \"10.0.0.1:7444\"; [IPV6]:PORT for IPv6)"
                )));
            }
            if relays[..i].contains(r) {
                return Err(ConfigError(format!(
                    "store.relays names {r:?} twice; list each relay once"
                )));
            }
        }
        Ok(())
    }

    /// The `[store]` settings that need no file: the URL, and TLS and
    /// user settings that fit it and each other.
    fn check_store_settings(&self) -> Result<(), ConfigError> {
        let s = &self.store;
        let url = store_url(&s.url)?;
        let tls =
            matches!(&url, StoreUrl::Etcd(eps) if eps.iter().any(|e| e.starts_with("https://")));
        let tls_set = [("ca", &s.ca), ("cert", &s.cert), ("key", &s.key)]
            .into_iter()
            .find(|(_, v)| v.is_some());
        match (&url, tls, tls_set) {
            (StoreUrl::Embedded, _, _) => {
                let set = tls_set.map(|(k, _)| k).or_else(|| {
                    [
                        ("user", s.user.is_some()),
                        ("password_file", s.password_file.is_some()),
                    ]
                    .into_iter()
                    .find(|(_, v)| *v)
                    .map(|(k, _)| k)
                });
                if let Some(k) = set {
                    return Err(ConfigError(format!(
                        "store.{k} is set but store.url is `embedded`; it is for etcd: remove it, or set store.url to etcds://HOST:PORT"
                    )));
                }
            }
            (StoreUrl::Etcd(_), false, Some((k, _))) => {
                return Err(ConfigError(format!(
                    "store.{k} is set but store.url {:?} is plain etcd://; write etcds://HOST:PORT[,...] to speak TLS to etcd",
                    s.url
                )));
            }
            (StoreUrl::Etcd(_), true, _) if s.ca.is_none() => {
                return Err(ConfigError(format!(
                    "store.url {:?} is etcds:// (TLS) but store.ca is not set; point store.ca at the CA (PEM) that issued etcd's server certificate (etcd's --trusted-ca-file CA if it is the same)",
                    s.url
                )));
            }
            _ => {}
        }
        if s.cert.is_some() != s.key.is_some() {
            let (set, unset) = if s.cert.is_some() {
                ("cert", "key")
            } else {
                ("key", "cert")
            };
            return Err(ConfigError(format!(
                "store.{set} is set without store.{unset}; a client certificate needs both the certificate and its key"
            )));
        }
        match (&s.user, &s.password_file) {
            (Some(u), None) => Err(ConfigError(format!(
                "store.user {u:?} is set without store.password_file; put the password alone in a file (chmod 600) and point store.password_file at it"
            ))),
            (None, Some(p)) => Err(ConfigError(format!(
                "store.password_file {} is set without store.user; name the etcd user",
                p.display()
            ))),
            (Some(u), Some(_)) if u.is_empty() => Err(ConfigError(
                "store.user is empty; name the etcd user".into(),
            )),
            _ => Ok(()),
        }
    }

    /// The `[store]` files read and checked as the store uses them: the
    /// CA, the client certificate and key (PEM, valid now, the key the
    /// certificate's), the password file (0600). Separate from
    /// [`Config::validate`] because it reads files; the agent runs it
    /// before binding anything, so a bad file is a config error (exit 64).
    pub fn etcd_security(&self) -> Result<pier_store::EtcdSecurity, ConfigError> {
        let s = &self.store;
        let field = |p: &Path| {
            [("ca", &s.ca), ("cert", &s.cert), ("key", &s.key)]
                .into_iter()
                .find(|(_, v)| v.as_deref() == Some(p))
                .map_or("ca", |(k, _)| k)
        };
        let tls = match &s.ca {
            None => None,
            Some(ca) => {
                let client = s.cert.as_deref().zip(s.key.as_deref());
                Some(pier_store::EtcdTls::from_files(ca, client).map_err(|e| {
                    ConfigError(format!(
                        "store.{} {e}; see README \"etcd over TLS\" for making etcd's and pier's certificates",
                        field(&e.path)
                    ))
                })?)
            }
        };
        let user = match (&s.user, &s.password_file) {
            (Some(u), Some(p)) => Some(
                pier_store::EtcdUser::from_password_file(u, p)
                    .map_err(|e| ConfigError(format!("store.password_file {e}")))?,
            ),
            _ => None,
        };
        Ok(pier_store::EtcdSecurity { tls, user })
    }
}

/// Where the store lives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    Embedded,
    /// `etcds://` endpoints are written `https://HOST:PORT`.
    Etcd(Vec<String>),
}

pub fn store_url(url: &str) -> Result<StoreUrl, ConfigError> {
    if url == "embedded" {
        return Ok(StoreUrl::Embedded);
    }
    let (rest, tls) = match (url.strip_prefix("etcd://"), url.strip_prefix("etcds://")) {
        (Some(r), _) => (r, false),
        (None, Some(r)) => (r, true),
        (None, None) => {
            return Err(ConfigError(format!(
                "store {url:?} is not understood: use `embedded`, `etcd://HOST:PORT[,HOST:PORT...]` or, for TLS, `etcds://HOST:PORT[,...]`"
            )));
        }
    };
    let eps: Vec<String> = rest
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect();
    if eps.is_empty() {
        return Err(ConfigError(format!("store {url:?} names no etcd endpoint")));
    }
    for e in &eps {
        let ok = e
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !ok {
            return Err(ConfigError(format!(
                "store endpoint {e:?} is not HOST:PORT"
            )));
        }
    }
    if tls {
        return Ok(StoreUrl::Etcd(
            eps.into_iter().map(|e| format!("https://{e}")).collect(),
        ));
    }
    Ok(StoreUrl::Etcd(eps))
}

#[cfg(test)]
mod keys;

#[cfg(test)]
mod tests {
    use super::*;

    /// The keys config/pier.toml writes, set or commented out (`# key =`),
    /// with the section they are in: `["dns", "upstreams"]`. A key inside
    /// an inline table (`capacity = { pods = 0 }`) is found as
    /// `["node", "capacity", "pods"]`.
    fn documented_keys(text: &str) -> Vec<Vec<String>> {
        let ident = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        };
        let mut section: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for raw in text.lines() {
            let line = raw.trim();
            let line = line.strip_prefix('#').map_or(line, str::trim);
            if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
                if name.split('.').all(ident) {
                    section = name.split('.').map(str::to_owned).collect();
                }
                continue;
            }
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            let key = key.trim();
            if !ident(key) {
                continue;
            }
            let mut path = section.clone();
            path.push(key.to_owned());
            // Inline table: its keys too.
            if let Some(inner) = value.trim().strip_prefix('{') {
                for kv in inner.trim_end_matches('}').split(',') {
                    if let Some((k, _)) = kv.split_once('=')
                        && ident(k.trim())
                    {
                        let mut p = path.clone();
                        p.push(k.trim().to_owned());
                        out.push(p);
                    }
                }
            }
            out.push(path);
        }
        out
    }

    /// config/pier.toml says it documents every option: every key the
    /// parser accepts (found by serde itself, see `keys`) must be in it,
    /// set or commented out. A key added to any section's config struct
    /// without a line in the file fails here, naming it.
    #[test]
    fn pier_toml_documents_every_accepted_key() {
        let accepted = keys::accepted_keys::<Config>();
        // The recorder itself: it must see the sections and keys of every
        // subsystem, Option-wrapped ones ([mesh]) included.
        for want in [
            &["node", "name"][..],
            &["store", "url"],
            &["dns", "upstreams"],
            &["proxy", "splice"],
            &["agent", "resync_interval_ms"],
            &["supervisor", "enabled"],
            &["mesh", "cert"],
            &["node", "capacity", "pods"],
        ] {
            assert!(
                accepted.iter().any(|k| k.path == want),
                "the key recorder missed {}: {accepted:?}",
                want.join(".")
            );
        }
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config/pier.toml");
        let text = std::fs::read_to_string(&path).expect("config/pier.toml");
        let documented = documented_keys(&text);
        let missing: Vec<String> = accepted
            .iter()
            .filter(|k| !k.is_struct && !documented.contains(&k.path))
            .map(|k| k.path.join("."))
            .collect();
        assert!(
            missing.is_empty(),
            "config/pier.toml does not document {} key(s) the parser accepts: {}; add each (with its default, commented out if it has none) to its section",
            missing.len(),
            missing.join(", ")
        );
        // And the file documents nothing the parser would refuse.
        let unknown: Vec<String> = documented
            .iter()
            .filter(|d| !accepted.iter().any(|k| &k.path == *d))
            .map(|d| d.join("."))
            .collect();
        assert!(
            unknown.is_empty(),
            "config/pier.toml documents keys the parser does not accept: {}",
            unknown.join(", ")
        );
    }

    /// Every shipped config parses and validates: config/*.toml as they
    /// are, and docker/pier.toml as docker/compose.yaml runs it.
    #[test]
    fn shipped_examples_parse() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../config");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).expect("config dir") {
            let p = e.expect("entry").path();
            if p.extension().and_then(|s| s.to_str()) == Some("toml") {
                let c = Config::load(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                c.validate()
                    .unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                n += 1;
            }
        }
        assert!(n >= 1, "no example config found in {}", dir.display());
        docker_config_as_compose_runs_it();
    }

    /// A compose volume `HOST:CONTAINER[:MODE]`, where HOST may be
    /// `${VAR:-default}` (which has a colon of its own): the host path as
    /// compose resolves it with VAR unset, and the container path.
    fn compose_volume(v: &str) -> (String, String) {
        let (host, rest) = match v.strip_prefix("${") {
            Some(r) => {
                let end = r.find('}').expect("closing brace");
                let default = r[..end].split_once(":-").map_or("", |(_, d)| d);
                (default.to_owned(), &r[end + 2..])
            }
            None => {
                let (h, r) = v.split_once(':').expect("HOST:CONTAINER");
                (h.to_owned(), r)
            }
        };
        let container = rest.split(':').next().expect("container path");
        (host, container.to_owned())
    }

    /// docker/pier.toml leaves the node name to `--node ${PIER_NODE}` and
    /// names the mesh files under the directory compose mounts `$PIER_CERTS`
    /// at. So: read compose.yaml's command and volumes, check that they
    /// mount this file where `--config` looks and pass `--node`; load the
    /// file, set the node as `--node host-a` does, validate; then issue
    /// host-a's files with `pier ca issue`'s code into a temp dir standing
    /// for the mounted one and check the mesh as the agent does at start.
    fn docker_config_as_compose_runs_it() {
        let docker = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docker");
        let compose: serde_yaml_ng::Value = serde_yaml_ng::from_str(
            &std::fs::read_to_string(docker.join("compose.yaml")).expect("compose.yaml"),
        )
        .expect("compose.yaml is YAML");
        let svc = &compose["services"]["pier"];
        let cmd: Vec<&str> = svc["command"]
            .as_sequence()
            .expect("command is a list")
            .iter()
            .map(|a| a.as_str().expect("string argument"))
            .collect();
        assert_eq!(cmd.first(), Some(&"agent"), "{cmd:?}");
        let flag = |f: &str| {
            let i = cmd.iter().position(|a| *a == f);
            i.and_then(|i| cmd.get(i + 1).copied())
                .unwrap_or_else(|| panic!("compose command has no {f} VALUE: {cmd:?}"))
        };
        let config_in = Path::new(flag("--config"));
        assert!(flag("--node").starts_with("${PIER_NODE"), "{cmd:?}");
        let vols: Vec<(String, String)> = svc["volumes"]
            .as_sequence()
            .expect("volumes is a list")
            .iter()
            .map(|v| compose_volume(v.as_str().expect("short volume syntax")))
            .collect();
        let mounted = |container: &Path| {
            vols.iter()
                .find(|(_, c)| container.starts_with(c))
                .unwrap_or_else(|| panic!("compose mounts nothing at {}", container.display()))
        };
        let (host_cfg, _) = mounted(config_in);
        let path = docker.join(host_cfg);
        assert_eq!(
            path.canonicalize().expect("the mounted config exists"),
            docker
                .join("pier.toml")
                .canonicalize()
                .expect("docker/pier.toml"),
            "compose mounts another file at {}",
            config_in.display()
        );

        let mut c = Config::load(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(
            c.node.name.is_none(),
            "docker/pier.toml must leave the node name to --node"
        );
        c.node.name = Some("host-a".into());
        c.validate()
            .unwrap_or_else(|e| panic!("{} with --node host-a: {e}", path.display()));

        // The mesh files, under the mounted certificates directory.
        let mesh = c
            .mesh
            .as_mut()
            .expect("docker/pier.toml has a [mesh] section");
        let (_, certs_in) = mounted(&mesh.cert);
        let certs_in = PathBuf::from(certs_in);
        let tmp = tempfile::tempdir().expect("tempdir");
        let (ca_dir, out) = (tmp.path().join("ca"), tmp.path().join("certs"));
        pier_ca::ca_init(&ca_dir).expect("ca init");
        let node = Name::new("host-a").expect("name");
        pier_ca::ca_issue(&node, &ca_dir, &out, 1).expect("ca issue");
        for p in [&mut mesh.ca, &mut mesh.cert, &mut mesh.key] {
            let rel = p.strip_prefix(&certs_in).unwrap_or_else(|_| {
                panic!(
                    "{} is not under the mounted {}",
                    p.display(),
                    certs_in.display()
                )
            });
            *p = out.join(rel);
        }
        c.check_mesh()
            .unwrap_or_else(|e| panic!("{}'s [mesh] with issued files: {e}", path.display()));
    }

    /// `[network] service_cidr6`: IPv6 unicast space that can hold VIPs,
    /// or a clear refusal naming the key and what to use.
    #[test]
    fn service_cidr6_must_be_ipv6_unicast_and_big_enough() {
        let check = |c6: &str| {
            Config::parse(&format!(
                "[node]\nname = \"n1\"\n[network]\nservice_cidr6 = \"{c6}\"\n"
            ))
            .unwrap()
            .validate()
            .map_err(|e| e.0)
        };
        for ok in ["fd8e:7a1c:53b2:1::/112", "fc00::/7", "2001:db8:5::/120"] {
            check(ok).unwrap_or_else(|e| panic!("{ok}: {e}"));
        }
        for (bad, says) in [
            ("10.214.0.0/16", "not IPv6 unicast"),
            ("::1/128", "not IPv6 unicast"),
            ("::/0", "not IPv6 unicast"),
            ("::ffff:0:0/96", "not IPv6 unicast"),
            ("fe80::/64", "not IPv6 unicast"),
            ("ff05::/112", "not IPv6 unicast"),
            ("fd8e:7a1c:53b2:1::/126", "too small"),
        ] {
            let e = check(bad).unwrap_err();
            assert!(
                e.contains("network.service_cidr6") && e.contains(says),
                "{bad}: {e}"
            );
        }
        assert!(Config::default().network.service_cidr6.is_none());
    }

    #[test]
    fn unknown_key_rejected() {
        let e = Config::parse("[node]\nname = \"a\"\nbogus = 1\n").unwrap_err();
        assert!(e.0.contains("bogus"), "{e}");
        // Inside the model's own types too (which accept unknown fields
        // in stored records).
        let e = Config::parse("[node]\nname = \"a\"\n[node.capacity]\ncpus = 2\n").unwrap_err();
        assert!(e.0.contains("`node.capacity.cpus`"), "{e}");
        let e = Config::parse("[dns]\nttl = 3\n").unwrap_err();
        assert!(e.0.contains("ttl"), "{e}");
    }

    #[test]
    fn missing_node_name_is_a_clear_error() {
        let e = Config::default().validate().unwrap_err();
        assert!(e.0.contains("--node"), "{e}");
        let mut c = Config::default();
        c.node.name = Some("Host_1".into());
        assert!(c.validate().unwrap_err().0.contains("node.name"));
    }

    #[test]
    fn store_urls() {
        assert_eq!(store_url("embedded").unwrap(), StoreUrl::Embedded);
        assert_eq!(
            store_url("etcd://127.0.0.1:2379,10.0.0.2:2379").unwrap(),
            StoreUrl::Etcd(vec!["127.0.0.1:2379".into(), "10.0.0.2:2379".into()])
        );
        assert!(store_url("etcd://").is_err());
        assert!(store_url("etcd://host").is_err());
        assert!(store_url("redis://x:1").unwrap_err().0.contains("embedded"));
        assert_eq!(
            store_url("etcds://etcd-1:2379,10.0.0.2:2379").unwrap(),
            StoreUrl::Etcd(vec![
                "https://etcd-1:2379".into(),
                "https://10.0.0.2:2379".into()
            ])
        );
        assert!(store_url("etcds://host").is_err());
    }

    /// `[store]` TLS and user settings that do not fit the URL or each
    /// other are refused, naming the key and what to write instead.
    #[test]
    fn store_tls_and_user_settings_must_fit() {
        let base = "[node]\nname = \"n1\"\n[store]\n";
        let check = |extra: &str| {
            Config::parse(&format!("{base}{extra}"))
                .unwrap()
                .validate()
                .map_err(|e| e.0)
        };
        for (extra, says) in [
            (
                "url = \"etcd://127.0.0.1:2379\"\nca = \"/x/ca.pem\"",
                "store.ca is set but store.url \"etcd://127.0.0.1:2379\" is plain etcd://; write etcds://",
            ),
            ("url = \"etcds://127.0.0.1:2379\"", "store.ca is not set"),
            (
                "url = \"etcds://127.0.0.1:2379\"\nca = \"/x/ca.pem\"\ncert = \"/x/c.pem\"",
                "store.cert is set without store.key",
            ),
            (
                "url = \"etcd://127.0.0.1:2379\"\nuser = \"pier\"",
                "without store.password_file",
            ),
            (
                "url = \"etcd://127.0.0.1:2379\"\npassword_file = \"/x/pw\"",
                "without store.user",
            ),
            (
                "url = \"embedded\"\nuser = \"pier\"",
                "store.user is set but store.url is `embedded`",
            ),
        ] {
            let e = check(extra).expect_err(extra);
            assert!(e.contains(says), "{extra}: {e}");
        }
        check("url = \"etcds://127.0.0.1:2379\"\nca = \"/x/ca.pem\"\ncert = \"/x/c.pem\"\nkey = \"/x/k.pem\"\nuser = \"pier\"\npassword_file = \"/x/pw\"").unwrap();
    }

    /// `[relay]` and `store.relays`: refused with the embedded store,
    /// without `[mesh]`, both on one node, and with bad addresses, each
    /// naming the key and what to do; the two shapes of the README pass.
    #[test]
    fn relay_settings_must_fit() {
        let mesh = "[mesh]\nlisten = \"0.0.0.0:7443\"\nca = \"/x/ca.pem\"\ncert = \"/x/node.pem\"\nkey = \"/x/node-key.pem\"\n";
        let etcd = "url = \"etcd://10.0.0.1:2379\"\n";
        let check = |store: &str, rest: &str| {
            Config::parse(&format!("[node]\nname = \"n1\"\n[store]\n{store}{rest}"))
                .map_err(|e| e.0)
                .and_then(|c| c.validate().map_err(|e| e.0))
        };
        let relay = "[relay]\nlisten = \"0.0.0.0:7444\"\n";
        let relays = "relays = [\"10.0.0.1:7444\", \"relay-2.example:7444\", \"[fd00::1]:7444\"]\n";
        // What the README shows: a relay host, and a host using relays.
        check(etcd, &format!("{relay}{mesh}")).unwrap();
        check(&format!("{etcd}{relays}"), mesh).unwrap();
        for (store, rest, says) in [
            (
                "url = \"embedded\"\n".to_owned(),
                format!("{relay}{mesh}"),
                "[relay] is set but store.url is `embedded`",
            ),
            (
                format!("url = \"embedded\"\n{relays}"),
                mesh.to_owned(),
                "store.relays is set but store.url is `embedded`",
            ),
            (
                etcd.to_owned(),
                relay.to_owned(),
                "[relay] needs [mesh]: the relay accepts only clients with a node certificate of the mesh CA",
            ),
            (
                format!("{etcd}{relays}"),
                String::new(),
                "store.relays needs [mesh]: the agent dials its relays with its mesh node certificate",
            ),
            (
                format!("{etcd}{relays}"),
                format!("{relay}{mesh}"),
                "a relay watches etcd itself; remove store.relays on this node or remove [relay]",
            ),
            (
                etcd.to_owned(),
                format!("[relay]\nlisten = \"10.0.0.1:7443\"\n{mesh}"),
                "relay.listen 10.0.0.1:7443 and mesh.listen 0.0.0.0:7443 are the same port",
            ),
            (
                etcd.to_owned(),
                format!("[relay]\nlisten = \"10.0.0.1:0\"\n{mesh}"),
                "relay.listen 10.0.0.1:0 has port 0",
            ),
            (
                etcd.to_owned(),
                format!("[relay]\nlisten = \"10.0.0.1\"\n{mesh}"),
                "relay.listen \"10.0.0.1\" is not IP:PORT",
            ),
            (
                format!("{etcd}relays = [\"10.0.0.1:7444\", \"10.0.0.1:7444\"]\n"),
                mesh.to_owned(),
                "store.relays names \"10.0.0.1:7444\" twice",
            ),
        ] {
            let e = check(&store, &rest).expect_err(&format!("{store}{rest}"));
            assert!(e.contains(says), "{store}{rest}: {e}");
        }
        for bad in [
            "10.0.0.1",
            "10.0.0.1:0",
            ":7444",
            "fd00::1:7444",
            "[zz]:7444",
            "a b:7444",
            "h:port",
        ] {
            let e = check(&format!("{etcd}relays = [\"{bad}\"]\n"), mesh).expect_err(bad);
            assert!(
                e.contains(&format!("store.relays: {bad:?} is not HOST:PORT")),
                "{bad}: {e}"
            );
        }
        // Unknown keys in [relay] are refused as everywhere.
        let e = check(
            etcd,
            &format!("[relay]\nlisten = \"0.0.0.0:7444\"\nport = 1\n{mesh}"),
        )
        .unwrap_err();
        assert!(e.contains("port"), "{e}");
    }
}
