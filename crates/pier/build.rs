//! Sets PIER_GIT_REVISION: the commit this build is from (`git rev-parse`,
//! else read from .git directly, so a host without git still gets it), or
//! "unknown" outside a git checkout (a tarball). PIER_GIT_REVISION in the
//! environment wins (packaging from an export).

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=PIER_GIT_REVISION");
    let manifest = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets it"));
    let rev = std::env::var("PIER_GIT_REVISION")
        .ok()
        .filter(|r| !r.is_empty())
        .or_else(|| from_git_command(&manifest))
        .or_else(|| find_git_dir(&manifest).and_then(|g| from_git_files(&g)))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=PIER_GIT_REVISION={rev}");
    // Rebuild when HEAD moves: HEAD itself, the branch it names, packed refs.
    // Only files that exist: a missing one would rerun this every build.
    if let Some(git) = find_git_dir(&manifest) {
        let common = common_dir(&git);
        let mut watch = vec![git.join("HEAD"), common.join("packed-refs")];
        if let Some(r) = head_ref(&git) {
            watch.push(git.join(&r));
            if common != git {
                watch.push(common.join(&r));
            }
        }
        for p in watch {
            if p.is_file() {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

fn from_git_command(dir: &Path) -> Option<String> {
    let o = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()?;
    let s = String::from_utf8(o.stdout).ok()?.trim().to_owned();
    (o.status.success() && is_hex(&s)).then_some(s)
}

/// The `.git` directory above `dir` (a `.git` file, as in a worktree,
/// names it with `gitdir: PATH`).
fn find_git_dir(dir: &Path) -> Option<PathBuf> {
    let mut d = Some(dir);
    while let Some(cur) = d {
        let g = cur.join(".git");
        if g.is_dir() {
            return Some(g);
        }
        if g.is_file() {
            let text = std::fs::read_to_string(&g).ok()?;
            let p = PathBuf::from(text.strip_prefix("gitdir:")?.trim());
            return Some(if p.is_absolute() { p } else { cur.join(p) });
        }
        d = cur.parent();
    }
    None
}

fn common_dir(git: &Path) -> PathBuf {
    match std::fs::read_to_string(git.join("commondir")) {
        Ok(c) => git.join(c.trim()),
        Err(_) => git.to_path_buf(),
    }
}

/// `refs/heads/main` when HEAD is a symbolic ref.
fn head_ref(git: &Path) -> Option<String> {
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    head.trim()
        .strip_prefix("ref:")
        .map(|r| r.trim().to_owned())
}

fn from_git_files(git: &Path) -> Option<String> {
    let head = std::fs::read_to_string(git.join("HEAD")).ok()?;
    let head = head.trim();
    let full = match head_ref(git) {
        None => head.to_owned(),
        Some(r) => {
            let common = common_dir(git);
            [git.join(&r), common.join(&r)]
                .iter()
                .find_map(|p| std::fs::read_to_string(p).ok())
                .map(|s| s.trim().to_owned())
                .or_else(|| {
                    let packed = std::fs::read_to_string(common.join("packed-refs")).ok()?;
                    packed.lines().find_map(|l| {
                        let (hash, name) = l.split_once(' ')?;
                        (name == r).then(|| hash.to_owned())
                    })
                })?
        }
    };
    (full.len() >= 12 && is_hex(&full)).then(|| full[..12].to_owned())
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_hexdigit())
}
