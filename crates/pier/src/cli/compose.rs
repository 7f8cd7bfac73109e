//! Compose files for `apply`, `diff` and `delete -f`: read (`-` is
//! stdin), with the project directory's `.env` and the environment for
//! interpolation, and mapped by pier-compose. Warnings go to stderr.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use pier_model::app::AppSpec;

use super::args::Usage;

#[derive(Debug, clap::Args)]
pub struct FileArgs {
    /// A Compose file; repeat to merge them in order; `-` reads stdin.
    #[arg(short = 'f', long = "file", value_name = "FILE", required = true)]
    pub(super) files: Vec<String>,
    /// The project name, which becomes the namespace; else the file's
    /// `name:`, else the directory's name.
    #[arg(short = 'p', long = "project-name", value_name = "NAME")]
    pub(super) project: Option<String>,
}

/// Read the files and map them; warnings go to stderr, errors are one
/// line each.
pub(super) fn load(f: &FileArgs) -> Result<AppSpec> {
    let mut sources = Vec::new();
    let mut stdin_used = false;
    for name in &f.files {
        let text = if name == "-" {
            if stdin_used {
                return Err(Usage("-f -: stdin can be read once".into()).into());
            }
            stdin_used = true;
            let mut s = String::new();
            std::io::stdin()
                .read_to_string(&mut s)
                .context("reading the Compose file from stdin")?;
            s
        } else {
            std::fs::read_to_string(name).with_context(|| format!("-f {name}: cannot read it"))?
        };
        sources.push(pier_compose::Source {
            name: name.clone(),
            text,
        });
    }
    // The project directory: the first file's, as Compose does.
    let dir: PathBuf = match f.files.first().filter(|n| *n != "-") {
        Some(first) => {
            let p = Path::new(first);
            let parent = p.parent().filter(|d| !d.as_os_str().is_empty());
            parent
                .map(Path::to_path_buf)
                .unwrap_or_else(|| PathBuf::from("."))
        }
        None => PathBuf::from("."),
    };
    let abs = std::fs::canonicalize(&dir).unwrap_or_else(|_| dir.clone());
    let mut env: BTreeMap<String, String> = BTreeMap::new();
    if let Ok(text) = std::fs::read_to_string(dir.join(".env")) {
        let none = |_: &str| None;
        match pier_compose::util::env_file(&text, &none) {
            Ok(kv) => env.extend(kv),
            Err(e) => bail!("{}: {e}", dir.join(".env").display()),
        }
    }
    env.extend(std::env::vars());
    let opts = pier_compose::Options {
        project: f.project.clone(),
        dir_name: abs.file_name().map(|n| n.to_string_lossy().into_owned()),
        env,
    };
    let read = |rel: &str| -> Result<String, String> {
        std::fs::read_to_string(dir.join(rel)).map_err(|e| e.to_string())
    };
    match pier_compose::load(&sources, &opts, &read) {
        Ok(l) => {
            for w in &l.warnings {
                eprintln!("warning: {w}");
            }
            Ok(l.spec)
        }
        Err(failed) => {
            for w in &failed.warnings {
                eprintln!("warning: {w}");
            }
            let n = failed.errors.len();
            for e in &failed.errors[..n.saturating_sub(1)] {
                eprintln!("error: {e}");
            }
            // The last one is the command's own error line.
            let last = failed
                .errors
                .last()
                .map(|e| e.to_string())
                .unwrap_or_default();
            Err(Usage(if n > 1 {
                format!("{last} ({n} errors; nothing was applied)")
            } else {
                format!("{last} (nothing was applied)")
            })
            .into())
        }
    }
}
