//! `pier label node NODE k=v k2-`: set and remove node labels (as kubectl
//! does), laid over the node's own `[node] labels`.

use std::collections::BTreeMap;

use anyhow::Result;
use pier_model::api::Resource;

use super::args::{client, name_arg, resource_arg, usage};
use super::output::labels_str;

#[derive(Debug, clap::Args)]
pub struct LabelArgs {
    /// The kind: node.
    pub(super) kind: String,
    /// The node's name (`pier get nodes`).
    pub(super) name: String,
    /// `KEY=VALUE` sets a label; `KEY-` removes one (also one the node's
    /// config sets).
    #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
    pub(super) labels: Vec<String>,
}

pub(super) async fn run(server: &str, a: LabelArgs) -> Result<()> {
    match resource_arg(&a.kind)? {
        Resource::Nodes => {}
        other => return usage(format!("cannot label {other}; only nodes take labels here")),
    }
    let node = name_arg("node name", &a.name)?;
    let mut labels: BTreeMap<String, Option<String>> = BTreeMap::new();
    for l in &a.labels {
        let (k, v) = match l.split_once('=') {
            Some((k, v)) => (k, Some(v.to_owned())),
            None => match l.strip_suffix('-') {
                Some(k) => (k, None),
                None => {
                    return usage(format!(
                        "{l:?}: write KEY=VALUE to set a label or KEY- to remove it"
                    ));
                }
            },
        };
        if !pier_model::valid_label_key(k) {
            return usage(format!(
                "{l:?}: {k:?} is not a label key (letters, digits, '.', '-', '_', '/')"
            ));
        }
        labels.insert(k.to_owned(), v);
    }
    let c = client(server)?;
    let out = c.label_node(&node, labels).await?;
    let now: pier_model::Labels = out
        .get("labels")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    outln!("node/{node} labelled; its labels: {}", labels_str(&now));
    Ok(())
}
