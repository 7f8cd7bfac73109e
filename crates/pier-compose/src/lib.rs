//! Compose files → pier applications.
//!
//! [`load`] reads one or more Compose files (merged in order, as
//! `docker compose -f a -f b` does), interpolates `${VARS}`, picks the
//! project name, and maps every Compose service onto a pier replica set and
//! (when it has ports) a service of the same name, in the project's
//! namespace: an [`AppSpec`] for the API's apply. Every problem names the
//! key's path (`services.web.ports[1]`). Keys pier cannot honour are errors
//! where running without them would change what the application does, and
//! warnings where it would not; the table is `keys.rs` and README's
//! "Applications" section.
//!
//! It is pure: no network, no store, no files but those read through the
//! `read_file` callback the caller hands in (for `env_file`).
//!
//! The steps, one module each: `merge` reads and merges the files,
//! `service` maps each Compose service (with `ports`, `deploy` and
//! `xpier` for those keys), and `keys` says which keys pier honours.

mod interp;
pub mod util;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use pier_model::app::AppSpec;
use serde_yaml_ng::Value;

mod deploy;
mod keys;
mod merge;
mod ports;
mod service;
mod xpier;

use merge::merge_sources;
use service::build;

/// One Compose file's text.
#[derive(Debug, Clone)]
pub struct Source {
    /// Shown in messages: the path as given, or `-` for stdin.
    pub name: String,
    pub text: String,
}

/// What the caller knows besides the files.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// `-p NAME`.
    pub project: Option<String>,
    /// The base name of the project directory (the first file's
    /// directory), the last resort for the project name.
    pub dir_name: Option<String>,
    /// Variables for interpolation: the environment, over the project
    /// directory's `.env`.
    pub env: BTreeMap<String, String>,
}

/// A message about one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diag {
    /// `services.web.ports[0]`, or the file name for a file-level problem.
    pub path: String,
    pub message: String,
}

impl fmt::Display for Diag {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.path, self.message)
    }
}

/// The result of a load that worked.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub spec: AppSpec,
    pub warnings: Vec<Diag>,
}

/// A load that did not: every error found, and the warnings.
#[derive(Debug, Clone)]
pub struct Failed {
    pub errors: Vec<Diag>,
    pub warnings: Vec<Diag>,
}

impl fmt::Display for Failed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.errors.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Failed {}

#[derive(Default)]
struct Ctx {
    errors: Vec<Diag>,
    warnings: Vec<Diag>,
}

impl Ctx {
    fn err(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.errors.push(Diag {
            path: path.into(),
            message: message.into(),
        });
    }
    fn warn(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Diag {
            path: path.into(),
            message: message.into(),
        });
    }
}

/// Read, merge and map Compose files onto an application.
pub fn load(
    sources: &[Source],
    opts: &Options,
    read_file: &dyn Fn(&str) -> Result<String, String>,
) -> Result<Loaded, Failed> {
    let mut cx = Ctx::default();
    let merged = merge_sources(sources, opts, &mut cx);
    let spec = merged.and_then(|m| build(&m, sources, opts, read_file, &mut cx));
    match spec {
        Some(spec) if cx.errors.is_empty() => Ok(Loaded {
            spec,
            warnings: cx.warnings,
        }),
        _ => Err(Failed {
            errors: cx.errors,
            warnings: cx.warnings,
        }),
    }
}

fn dedup(v: Vec<String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    v.into_iter().filter(|s| seen.insert(s.clone())).collect()
}

fn key_str(k: &Value) -> String {
    match k {
        Value::String(s) => s.clone(),
        Value::Number(n) => n.to_string(),
        Value::Bool(b) => b.to_string(),
        other => format!("{other:?}"),
    }
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests;
