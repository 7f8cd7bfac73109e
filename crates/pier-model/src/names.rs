//! Validated newtypes. Each one can only hold a value that passed its check,
//! both when built in code and when deserialized from the store or the API.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Why a value was rejected. The message names the value and the rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    #[error("{what} {value:?} is not valid: {why}")]
    Invalid {
        what: &'static str,
        value: String,
        why: &'static str,
    },
}

impl NameError {
    fn invalid(what: &'static str, value: &str, why: &'static str) -> Self {
        NameError::Invalid {
            what,
            value: value.chars().take(80).collect(),
            why,
        }
    }
}

/// Whether `s` is an RFC 1123 label in any case: 1 to 63 letters, digits
/// and '-', starting and ending with a letter or digit. DNS compares names
/// without case, so a configured domain may be written in capitals; the
/// names pier stores ([`Name`], [`Namespace`]) are the lower-case ones.
pub fn is_dns_label(s: &str) -> bool {
    check_label("label", &s.to_ascii_lowercase()).is_ok()
}

/// Whether `s` can be the target of an ExternalName service's CNAME
/// (`Service.external_name`): a DNS host name of labels as
/// [`is_dns_label`], at most 253 characters, with at least one dot (a
/// bare label would be searched for in the pod's own domain), written
/// without a trailing dot. `Err` says what is wrong.
pub fn check_external_name(s: &str) -> Result<(), &'static str> {
    if s.is_empty() || s.len() > 253 {
        return Err("is not a host name: 1 to 253 characters");
    }
    if !s.contains('.') {
        return Err(
            "needs a domain (e.g. db.example.com): a bare name would be looked up in the pod's own search path",
        );
    }
    if !s.split('.').all(is_dns_label) {
        return Err(
            "is not a host name: each dot-separated part is 1 to 63 letters, digits or '-', not starting or ending with '-'",
        );
    }
    Ok(())
}

/// Check an RFC 1123 label: 1 to 63 characters of `[a-z0-9-]`, starting and
/// ending with an alphanumeric.
fn check_label(what: &'static str, s: &str) -> Result<(), NameError> {
    if s.is_empty() {
        return Err(NameError::invalid(what, s, "it is empty"));
    }
    if s.len() > 63 {
        return Err(NameError::invalid(
            what,
            s,
            "it is longer than 63 characters (RFC 1123 label)",
        ));
    }
    let b = s.as_bytes();
    if !b
        .iter()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
    {
        return Err(NameError::invalid(
            what,
            s,
            "use only lower-case letters, digits and '-' (RFC 1123 label)",
        ));
    }
    if b[0] == b'-' || b[b.len() - 1] == b'-' {
        return Err(NameError::invalid(
            what,
            s,
            "it must start and end with a letter or digit (RFC 1123 label)",
        ));
    }
    Ok(())
}

macro_rules! label_type {
    ($(#[$m:meta])* $ty:ident, $what:literal) => {
        $(#[$m])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(Box<str>);

        impl $ty {
            pub fn new(s: &str) -> Result<Self, NameError> {
                check_label($what, s)?;
                Ok(Self(s.into()))
            }
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }
        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Debug::fmt(&*self.0, f)
            }
        }
        impl FromStr for $ty {
            type Err = NameError;
            fn from_str(s: &str) -> Result<Self, NameError> {
                Self::new(s)
            }
        }
        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
        impl std::borrow::Borrow<str> for $ty {
            fn borrow(&self) -> &str {
                &self.0
            }
        }
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(&self.0)
            }
        }
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                Self::new(&s).map_err(serde::de::Error::custom)
            }
        }
    };
}

label_type!(
    /// A name of an object (service, replica set, pod, node, endpoint id):
    /// an RFC 1123 label of at most 63 characters.
    Name,
    "name"
);
label_type!(
    /// A namespace: an RFC 1123 label of at most 63 characters.
    Namespace,
    "namespace"
);

impl Default for Namespace {
    fn default() -> Self {
        Namespace(crate::DEFAULT_NAMESPACE.into())
    }
}

/// A TCP port, 1 to 65535.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct PortNum(u16);

impl PortNum {
    pub fn new(p: u16) -> Result<Self, NameError> {
        if p == 0 {
            return Err(NameError::invalid("port", "0", "ports are 1 to 65535"));
        }
        Ok(PortNum(p))
    }
    pub fn get(self) -> u16 {
        self.0
    }
}
impl fmt::Display for PortNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl fmt::Debug for PortNum {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl FromStr for PortNum {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let n: u32 = s
            .trim()
            .parse()
            .map_err(|_| NameError::invalid("port", s, "it is not a number"))?;
        if n == 0 || n > 65535 {
            return Err(NameError::invalid("port", s, "ports are 1 to 65535"));
        }
        Ok(PortNum(n as u16))
    }
}
impl<'de> Deserialize<'de> for PortNum {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let n = u32::deserialize(d)?;
        if n == 0 || n > 65535 {
            return Err(serde::de::Error::custom(format!(
                "port {n} is not valid: ports are 1 to 65535"
            )));
        }
        Ok(PortNum(n as u16))
    }
}

/// A replica count, 0 to [`Replicas::MAX`].
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Default)]
#[serde(transparent)]
pub struct Replicas(u32);

impl Replicas {
    /// 1000: far above what one supervisor places on a handful of hosts, and
    /// low enough that a typo (`--replicas 100000`) is caught.
    pub const MAX: u32 = 1000;
    pub fn new(n: u32) -> Result<Self, NameError> {
        if n > Self::MAX {
            return Err(NameError::invalid(
                "replica count",
                &n.to_string(),
                "replicas are 0 to 1000",
            ));
        }
        Ok(Replicas(n))
    }
    pub fn get(self) -> u32 {
        self.0
    }
}
impl fmt::Display for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl fmt::Debug for Replicas {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}
impl FromStr for Replicas {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let n: u32 = s.trim().parse().map_err(|_| {
            NameError::invalid(
                "replica count",
                s,
                "it is not a whole number from 0 to 1000",
            )
        })?;
        Replicas::new(n)
    }
}
impl<'de> Deserialize<'de> for Replicas {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Replicas::new(u32::deserialize(d)?).map_err(serde::de::Error::custom)
    }
}

/// An IP network, `addr/prefix`, with no host bits set.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, NameError> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let text = format!("{addr}/{prefix}");
        if prefix > max {
            return Err(NameError::invalid(
                "CIDR",
                &text,
                "the prefix length is too long for the address family",
            ));
        }
        let c = Cidr { addr, prefix };
        if c.network() != addr {
            return Err(NameError::invalid(
                "CIDR",
                &text,
                "host bits are set; use the network address",
            ));
        }
        Ok(c)
    }
    pub fn addr(&self) -> IpAddr {
        self.addr
    }
    pub fn prefix(&self) -> u8 {
        self.prefix
    }
    fn mask_bits(&self) -> u128 {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        if self.prefix == 0 {
            0
        } else {
            (!0u128 << (bits - self.prefix as u32)) & (if bits == 32 { 0xffff_ffff } else { !0 })
        }
    }
    fn to_bits(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(a) => u32::from(a) as u128,
            IpAddr::V6(a) => u128::from(a),
        }
    }
    fn network(&self) -> IpAddr {
        let b = Self::to_bits(self.addr) & self.mask_bits();
        self.addr_from_bits(b)
    }
    fn addr_from_bits(&self, b: u128) -> IpAddr {
        match self.addr {
            IpAddr::V4(_) => IpAddr::V4((b as u32).into()),
            IpAddr::V6(_) => IpAddr::V6(b.into()),
        }
    }
    /// Whether `ip` lies in this network.
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4()
            && Self::to_bits(ip) & self.mask_bits() == Self::to_bits(self.addr)
    }
    /// The number of addresses in the network, saturating.
    pub fn size(&self) -> u128 {
        let bits = if self.addr.is_ipv4() { 32 } else { 128 };
        let host = bits - self.prefix as u32;
        if host >= 128 {
            u128::MAX
        } else {
            1u128 << host
        }
    }
    /// The `n`th address of the network (0 is the network address), if it
    /// lies inside.
    pub fn nth(&self, n: u128) -> Option<IpAddr> {
        if n >= self.size() {
            return None;
        }
        Some(self.addr_from_bits(Self::to_bits(self.addr) + n))
    }
}
impl fmt::Display for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}
impl fmt::Debug for Cidr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}
impl FromStr for Cidr {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let (a, p) = s.split_once('/').ok_or_else(|| {
            NameError::invalid("CIDR", s, "write it as ADDRESS/PREFIX, e.g. 10.213.0.0/16")
        })?;
        let addr: IpAddr = a
            .parse()
            .map_err(|_| NameError::invalid("CIDR", s, "the address does not parse"))?;
        let prefix: u8 = p
            .parse()
            .map_err(|_| NameError::invalid("CIDR", s, "the prefix length is not a number"))?;
        Cidr::new(addr, prefix)
    }
}
impl Serialize for Cidr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}
impl<'de> Deserialize<'de> for Cidr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn labels() {
        assert!(Name::new("web").is_ok());
        assert!(Name::new("kube-demo-x1z9a").is_ok());
        assert!(Name::new("0abc").is_ok());
        for bad in ["", "-a", "a-", "Web", "a_b", "a.b", &"a".repeat(64)] {
            let e = Name::new(bad).unwrap_err().to_string();
            assert!(e.contains("name"), "{e}");
        }
        assert!(serde_json::from_str::<Name>("\"UPPER\"").is_err());
    }

    #[test]
    fn ports_and_replicas() {
        assert!("0".parse::<PortNum>().is_err());
        assert!("65536".parse::<PortNum>().is_err());
        assert!(
            "http"
                .parse::<PortNum>()
                .unwrap_err()
                .to_string()
                .contains("not a number")
        );
        assert_eq!("8080".parse::<PortNum>().unwrap().get(), 8080);
        assert!(serde_json::from_str::<PortNum>("0").is_err());
        assert!("1001".parse::<Replicas>().is_err());
        assert!("-1".parse::<Replicas>().is_err());
        assert_eq!("3".parse::<Replicas>().unwrap().get(), 3);
    }

    #[test]
    fn cidrs() {
        let c: Cidr = "10.213.0.0/16".parse().unwrap();
        assert!(c.contains("10.213.4.5".parse().unwrap()));
        assert!(!c.contains("10.214.0.1".parse().unwrap()));
        assert_eq!(c.nth(10), Some("10.213.0.10".parse().unwrap()));
        assert_eq!(c.size(), 65536);
        assert!("10.213.0.1/16".parse::<Cidr>().is_err());
        assert!("10.0.0.0/33".parse::<Cidr>().is_err());
        assert!("fd00::/8".parse::<Cidr>().is_ok());
        assert!(
            "0.0.0.0/0"
                .parse::<Cidr>()
                .unwrap()
                .contains("1.2.3.4".parse().unwrap())
        );
    }

    proptest! {
        #[test]
        fn label_round_trip(s in "[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?") {
            let n = Name::new(&s).unwrap();
            let j = serde_json::to_string(&n).unwrap();
            prop_assert_eq!(serde_json::from_str::<Name>(&j).unwrap(), n);
        }
        #[test]
        fn label_never_panics(s in ".*") {
            let _ = Name::new(&s);
        }
        #[test]
        fn cidr_round_trip(a in any::<u32>(), p in 0u8..=32) {
            let mask = if p == 0 { 0 } else { !0u32 << (32 - p) };
            let c = Cidr::new(IpAddr::V4((a & mask).into()), p).unwrap();
            prop_assert_eq!(c.to_string().parse::<Cidr>().unwrap(), c);
        }
    }
}
