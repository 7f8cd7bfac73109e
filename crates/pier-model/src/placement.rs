//! Where a replica set's pods may go: node constraints (Swarm's
//! `node.hostname==H`, `node.labels.K!=V`), spread, and affinity and
//! anti-affinity between replica sets. The supervisor's scheduler reads
//! these; the API checks them; Compose's `deploy.placement` maps onto them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::names::{Name, NameError};
use crate::objects::Labels;

/// What a constraint looks at on a node.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConstraintField {
    /// `node.hostname` (also `node.name`): the node's name in pier.
    Hostname,
    /// `node.labels.KEY`: the node's label (its `[node] labels` in the
    /// config, overlaid by `pier label node`).
    Label(String),
}

/// `==` or `!=`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ConstraintOp {
    Eq,
    Ne,
}

/// One hard placement rule, written as Swarm writes it:
/// `node.hostname==h1`, `node.labels.zone!=a`. Stored as that string.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Constraint {
    pub field: ConstraintField,
    pub op: ConstraintOp,
    pub value: String,
}

impl Constraint {
    /// Whether a node with this name and these (effective) labels passes.
    /// A label the node lacks is unequal to every value, as in Swarm.
    pub fn matches(&self, node: &Name, labels: &Labels) -> bool {
        let have: Option<&str> = match &self.field {
            ConstraintField::Hostname => Some(node.as_str()),
            ConstraintField::Label(k) => labels.get(k).map(String::as_str),
        };
        let eq = have == Some(self.value.as_str());
        match self.op {
            ConstraintOp::Eq => eq,
            ConstraintOp::Ne => !eq,
        }
    }
}

impl fmt::Display for Constraint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.field {
            ConstraintField::Hostname => f.write_str("node.hostname")?,
            ConstraintField::Label(k) => write!(f, "node.labels.{k}")?,
        }
        f.write_str(match self.op {
            ConstraintOp::Eq => "==",
            ConstraintOp::Ne => "!=",
        })?;
        f.write_str(&self.value)
    }
}

impl From<Constraint> for String {
    fn from(c: Constraint) -> String {
        c.to_string()
    }
}

impl TryFrom<String> for Constraint {
    type Error = NameError;
    fn try_from(s: String) -> Result<Self, NameError> {
        s.parse()
    }
}

impl FromStr for Constraint {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let bad = |why: &'static str| NameError::Invalid {
            what: "placement constraint",
            value: s.chars().take(120).collect(),
            why,
        };
        let (lhs, op, rhs) = if let Some((l, r)) = s.split_once("!=") {
            (l, ConstraintOp::Ne, r)
        } else if let Some((l, r)) = s.split_once("==") {
            (l, ConstraintOp::Eq, r)
        } else {
            return Err(bad(
                "write it as node.hostname==H, node.labels.KEY==VALUE, or with != (one = is not an operator)",
            ));
        };
        let (lhs, value) = (lhs.trim(), rhs.trim());
        if value.is_empty() || value.contains(['=', '!']) || value.contains(char::is_whitespace) {
            return Err(bad(
                "the value after == or != must be one word, without = ! or spaces",
            ));
        }
        let field = match lhs {
            "node.hostname" | "node.name" => ConstraintField::Hostname,
            _ => match lhs.strip_prefix("node.labels.") {
                Some(k) if valid_label_key(k) => ConstraintField::Label(k.to_owned()),
                Some(_) => {
                    return Err(bad(
                        "the label key must be letters, digits, '.', '-', '_' or '/'",
                    ));
                }
                None if lhs == "node.role"
                    || lhs == "node.id"
                    || lhs.starts_with("node.platform.")
                    || lhs.starts_with("engine.labels.") =>
                {
                    return Err(bad(
                        "pier has no node roles, ids, platforms or engine labels: use node.hostname or node.labels.KEY (set with `pier label node`)",
                    ));
                }
                None => {
                    return Err(bad("use node.hostname or node.labels.KEY"));
                }
            },
        };
        Ok(Constraint {
            field,
            op,
            value: value.to_owned(),
        })
    }
}

/// A node label key: what `pier label node` and `[node] labels` accept.
pub fn valid_label_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 253
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '/'))
}

/// Where a replica set's pods may go. Every field is a hard rule except
/// `spread` and `spread_by`, which only rank the nodes that pass. A pod no
/// node passes stays unplaced, and the set's problem names the rule.
///
/// New fields are left out of the stored JSON when unset, so agents of an
/// older version still read the record.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Placement {
    /// Only nodes whose labels include all of these.
    pub node_selector: Labels,
    /// Swarm-style rules, all of which a node must pass
    /// (Compose `deploy.placement.constraints`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub constraints: Vec<Constraint>,
    /// At most this many of the set's pods on one node
    /// (Compose `deploy.placement.max_replicas_per_node`).
    pub max_per_node: Option<u32>,
    /// Spread the pods across nodes (the default).
    pub spread: bool,
    /// Spread the pods across the values of this node label first (Compose
    /// `deploy.placement.preferences: [{spread: node.labels.KEY}]`, stored
    /// as `KEY`); nodes without the label count as one more value.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub spread_by: Option<String>,
    /// Replica sets (in the same namespace) whose pods this set's pods never
    /// share a node with. Hard and two-way: a pod of a set named here is not
    /// placed beside this set's pods either, whichever set came first
    /// (Compose `x-pier: anti_affinity`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub anti_affinity: Vec<Name>,
    /// Replica sets (in the same namespace) beside whose pods this set's
    /// pods must go: only nodes that run a pod of every set named here
    /// (Compose `x-pier: affinity`). One-way.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub affinity: Vec<Name>,
}

impl Default for Placement {
    fn default() -> Self {
        Placement {
            node_selector: Labels::new(),
            constraints: Vec::new(),
            max_per_node: None,
            spread: true,
            spread_by: None,
            anti_affinity: Vec::new(),
            affinity: Vec::new(),
        }
    }
}

impl Placement {
    /// Checks what serde cannot, naming the field: `placement.<field>`.
    /// `own` is the replica set's own name.
    pub fn validate(&self, own: &Name) -> Result<(), String> {
        if self.max_per_node == Some(0) {
            return Err(
                "placement.max_per_node: 0 places nothing; leave it out for no limit".into(),
            );
        }
        if let Some(k) = &self.spread_by
            && !valid_label_key(k)
        {
            return Err(format!(
                "placement.spread_by: {k:?} is not a node label key (letters, digits, '.', '-', '_', '/')"
            ));
        }
        for k in self.node_selector.keys() {
            if !valid_label_key(k) {
                return Err(format!(
                    "placement.node_selector: {k:?} is not a node label key"
                ));
            }
        }
        for (i, a) in self.anti_affinity.iter().enumerate() {
            if a == own {
                return Err(format!(
                    "placement.anti_affinity[{i}]: {a:?} is the set itself; use max_per_node: 1 to keep its pods apart"
                ));
            }
            if self.affinity.contains(a) {
                return Err(format!(
                    "placement.anti_affinity[{i}]: {a:?} is also in placement.affinity"
                ));
            }
        }
        for (i, a) in self.affinity.iter().enumerate() {
            if a == own {
                return Err(format!("placement.affinity[{i}]: {a:?} is the set itself"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn n(s: &str) -> Name {
        Name::new(s).unwrap()
    }

    #[test]
    fn constraints_parse_and_print_as_swarm_writes_them() {
        for s in [
            "node.hostname==h1",
            "node.hostname!=h1",
            "node.labels.zone==a",
            "node.labels.disk!=ssd",
        ] {
            let c: Constraint = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
        }
        let c: Constraint = " node.name == h2 ".parse().unwrap();
        assert_eq!(c.to_string(), "node.hostname==h2");
        let json = serde_json::to_string(&c).unwrap();
        assert_eq!(json, r#""node.hostname==h2""#);
        assert_eq!(serde_json::from_str::<Constraint>(&json).unwrap(), c);
    }

    #[test]
    fn bad_constraints_say_what_to_write() {
        for (s, want) in [
            ("node.hostname=h1", "one = is not an operator"),
            ("node.role==manager", "no node roles"),
            ("node.labels.==a", "label key"),
            ("zone==a", "node.labels.KEY"),
            ("node.hostname==", "one word"),
        ] {
            let e = s.parse::<Constraint>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
            assert!(e.contains(s.trim()), "{s}: {e}");
        }
        let e = serde_json::from_str::<Placement>(r#"{"constraints":["node.ip==1"]}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("node.ip==1"), "{e}");
    }

    #[test]
    fn constraint_matching() {
        let labels: Labels = [("zone".to_string(), "a".to_string())].into();
        let m = |s: &str, node: &str| s.parse::<Constraint>().unwrap().matches(&n(node), &labels);
        assert!(m("node.hostname==h1", "h1"));
        assert!(!m("node.hostname==h1", "h2"));
        assert!(m("node.hostname!=h1", "h2"));
        assert!(m("node.labels.zone==a", "h1"));
        assert!(!m("node.labels.zone!=a", "h1"));
        // A missing label is unequal to every value.
        assert!(!m("node.labels.disk==ssd", "h1"));
        assert!(m("node.labels.disk!=ssd", "h1"));
    }

    #[test]
    fn old_records_read_and_defaults_are_left_out() {
        let p: Placement =
            serde_json::from_str(r#"{"node_selector":{},"max_per_node":null,"spread":true}"#)
                .unwrap();
        assert_eq!(p, Placement::default());
        let out = serde_json::to_string(&Placement::default()).unwrap();
        assert_eq!(
            out,
            r#"{"node_selector":{},"max_per_node":null,"spread":true}"#
        );
    }

    #[test]
    fn validate_names_the_field() {
        let p = Placement {
            anti_affinity: vec![n("web")],
            ..Default::default()
        };
        let e = p.validate(&n("web")).unwrap_err();
        assert!(e.contains("placement.anti_affinity[0]"), "{e}");
        let p = Placement {
            anti_affinity: vec![n("db")],
            affinity: vec![n("db")],
            ..Default::default()
        };
        assert!(p.validate(&n("web")).unwrap_err().contains("also in"));
        let p = Placement {
            max_per_node: Some(0),
            ..Default::default()
        };
        assert!(p.validate(&n("web")).unwrap_err().contains("max_per_node"));
    }
}
