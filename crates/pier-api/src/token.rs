//! The API token file: made by the agent on first start, read by the CLI on
//! the same host.
//!
//! `<data_dir>/api-token` holds 32 random bytes from the thread CSPRNG
//! (ChaCha, seeded by the OS), hex-encoded, and a newline. It is mode 0600
//! and owned by the agent's user, or 0640 with `[api] token_group` as its
//! group (the data dir is then 0710 with that group, so members can open
//! the file by name but not list the dir). It is written once, atomically:
//! a temp file opened with `O_CREAT|O_EXCL|O_NOFOLLOW` at mode 0600 is
//! filled, synced and hard-linked to the final name (a link never replaces
//! an existing file), so a crash leaves either no token or a whole one, and
//! two agents racing on one data dir end up with the same token.
//!
//! On later starts the file is reused. A file that is not a regular file
//! (a symlink, say), is owned by another user, or grants anything to
//! others or write to its group is **refused**: the token may have been
//! read or replaced, so the error says to delete it (a new one is made on
//! the next start). Group read that the config no longer wants, or wants
//! for another group, is **fixed** (chmod/chown), since only the group the
//! operator chose could have read it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// The token file's name inside the data dir.
pub const TOKEN_FILE: &str = "api-token";

/// A token file problem, with what to do about it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TokenError(pub String);

/// `<data_dir>/api-token`.
pub fn token_path(data_dir: &Path) -> PathBuf {
    data_dir.join(TOKEN_FILE)
}

fn euid() -> u32 {
    rustix::process::geteuid().as_raw()
}

fn nofollow() -> i32 {
    rustix::fs::OFlags::NOFOLLOW.bits() as i32
}

/// The gid of `group`: a numeric gid, or a name looked up in /etc/group.
pub fn resolve_group(group: &str) -> Result<u32, TokenError> {
    resolve_group_in(group, Path::new("/etc/group"))
}

fn resolve_group_in(group: &str, etc_group: &Path) -> Result<u32, TokenError> {
    let g = group.trim();
    if let Ok(gid) = g.parse::<u32>() {
        return Ok(gid);
    }
    let text = std::fs::read_to_string(etc_group).map_err(|e| {
        TokenError(format!(
            "api.token_group {g:?}: cannot read {} to look it up ({e}); give a numeric gid",
            etc_group.display()
        ))
    })?;
    for line in text.lines() {
        let mut f = line.split(':');
        if f.next() == Some(g)
            && let Some(gid) = f.nth(1).and_then(|x| x.parse().ok())
        {
            return Ok(gid);
        }
    }
    Err(TokenError(format!(
        "api.token_group {g:?}: no such group in {}; create it (groupadd {g}) or give a numeric gid",
        etc_group.display()
    )))
}

fn mode_str(m: u32) -> String {
    format!("{:04o}", m & 0o7777)
}

/// Make the data dir if it is missing (mode 0700, or 0710 with `gid` as
/// its group), and tighten an existing one to that. A data dir owned by
/// another user is refused.
pub fn prepare_data_dir(dir: &Path, gid: Option<u32>) -> Result<(), TokenError> {
    match std::fs::metadata(dir) {
        Err(e) if e.kind() == ErrorKind::NotFound => {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| {
                    TokenError(format!(
                        "cannot create the data dir {}: {e}; create it (mode 0700) or set [network] data_dir",
                        dir.display()
                    ))
                })?;
        }
        Err(e) => {
            return Err(TokenError(format!(
                "cannot read the data dir {}: {e}",
                dir.display()
            )));
        }
        Ok(md) if !md.is_dir() => {
            return Err(TokenError(format!(
                "the data dir {} is not a directory; set [network] data_dir to a directory",
                dir.display()
            )));
        }
        Ok(_) => {}
    }
    let md = std::fs::metadata(dir)
        .map_err(|e| TokenError(format!("cannot read the data dir {}: {e}", dir.display())))?;
    if md.uid() != euid() {
        return Err(TokenError(format!(
            "the data dir {} is owned by uid {}, not by this agent's uid {}; chown it to the agent's user or use another data dir",
            dir.display(),
            md.uid(),
            euid()
        )));
    }
    if let Some(g) = gid
        && md.gid() != g
    {
        std::os::unix::fs::chown(dir, None, Some(g)).map_err(|e| {
            TokenError(format!(
                "cannot give the data dir {} to group {g} (api.token_group): {e}",
                dir.display()
            ))
        })?;
    }
    let want = if gid.is_some() { 0o710 } else { 0o700 };
    if md.mode() & 0o777 != want {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(want)).map_err(|e| {
            TokenError(format!(
                "cannot set the data dir {} to mode {}: {e}",
                dir.display(),
                mode_str(want)
            ))
        })?;
        if md.mode() & 0o077 & !want != 0 {
            tracing::warn!(
                dir = %dir.display(),
                was = %mode_str(md.mode()),
                now = %mode_str(want),
                "the data dir was open to other users; tightened it"
            );
        }
    }
    Ok(())
}

/// The agent's token: read from `<data_dir>/api-token`, or made there on
/// first start. `gid` is `[api] token_group`, resolved.
pub fn ensure(data_dir: &Path, gid: Option<u32>) -> Result<String, TokenError> {
    prepare_data_dir(data_dir, gid)?;
    let path = token_path(data_dir);
    // Two attempts: a racing agent may link its token between our open and
    // our link.
    for _ in 0..2 {
        match open_existing(&path) {
            Ok(f) => return reuse(&path, f, gid),
            Err(e) if e.kind() == ErrorKind::NotFound => {}
            Err(e) => return Err(open_error(&path, e)),
        }
        match create(data_dir, &path, gid)? {
            Some(t) => return Ok(t),
            None => continue,
        }
    }
    Err(TokenError(format!(
        "the API token file {} keeps appearing and vanishing; is another agent using this data dir?",
        path.display()
    )))
}

fn open_existing(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nofollow())
        .open(path)
}

fn open_error(path: &Path, e: std::io::Error) -> TokenError {
    // ELOOP: the final component is a symlink (O_NOFOLLOW).
    if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
        return TokenError(format!(
            "the API token file {} is a symbolic link, which is refused; delete it and restart the agent to make a new token",
            path.display()
        ));
    }
    TokenError(format!(
        "cannot open the API token file {}: {e}",
        path.display()
    ))
}

fn reuse(path: &Path, mut f: File, gid: Option<u32>) -> Result<String, TokenError> {
    let md = f
        .metadata()
        .map_err(|e| TokenError(format!("cannot stat {}: {e}", path.display())))?;
    let remake =
        "delete it and restart the agent to make a new token (then give clients the new one)";
    if !md.is_file() {
        return Err(TokenError(format!(
            "the API token file {} is not a regular file; {remake}",
            path.display()
        )));
    }
    if md.uid() != euid() {
        return Err(TokenError(format!(
            "the API token file {} is owned by uid {}, not by this agent's uid {}, so someone else may have written it; {remake}",
            path.display(),
            md.uid(),
            euid()
        )));
    }
    let mode = md.mode() & 0o7777;
    if mode & 0o7027 != 0 {
        return Err(TokenError(format!(
            "the API token file {} is mode {}: other users could have read or changed it; {remake}",
            path.display(),
            mode_str(mode)
        )));
    }
    // Group read only: fix it to what the config says.
    let want = if gid.is_some() { 0o640 } else { 0o600 };
    if let Some(g) = gid
        && md.gid() != g
    {
        std::os::unix::fs::fchown(&f, None, Some(g)).map_err(|e| {
            TokenError(format!(
                "cannot give {} to group {g} (api.token_group): {e}",
                path.display()
            ))
        })?;
    }
    if mode != want {
        f.set_permissions(std::fs::Permissions::from_mode(want))
            .map_err(|e| TokenError(format!("cannot chmod {}: {e}", path.display())))?;
    }
    let mut s = String::new();
    (&mut f)
        .take(4096)
        .read_to_string(&mut s)
        .map_err(|e| TokenError(format!("cannot read {}: {e}", path.display())))?;
    let t = s.trim();
    if t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(TokenError(format!(
            "the API token file {} does not hold a token (one line, no spaces); {remake}",
            path.display()
        )));
    }
    Ok(t.to_owned())
}

/// Write a new token; `Ok(None)` if another process linked one first.
fn create(dir: &Path, path: &Path, gid: Option<u32>) -> Result<Option<String>, TokenError> {
    let bytes: [u8; 32] = rand::random();
    let token: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let suffix: u64 = rand::random();
    let tmp = dir.join(format!(".{TOKEN_FILE}.{suffix:016x}.tmp"));
    let fail = |what: &str, e: std::io::Error| {
        TokenError(format!(
            "cannot {what} the API token file {}: {e}",
            tmp.display()
        ))
    };
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nofollow())
        .open(&tmp)
        .map_err(|e| fail("create", e))?;
    let r = (|| -> Result<(), TokenError> {
        if let Some(g) = gid {
            std::os::unix::fs::fchown(&f, None, Some(g)).map_err(|e| fail("chown", e))?;
            f.set_permissions(std::fs::Permissions::from_mode(0o640))
                .map_err(|e| fail("chmod", e))?;
        } else {
            // Whatever the umask did, 0600.
            f.set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(|e| fail("chmod", e))?;
        }
        f.write_all(format!("{token}\n").as_bytes())
            .map_err(|e| fail("write", e))?;
        f.sync_all().map_err(|e| fail("sync", e))?;
        Ok(())
    })();
    let linked = r.and_then(|()| match std::fs::hard_link(&tmp, path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(TokenError(format!(
            "cannot publish the API token file {}: {e}",
            path.display()
        ))),
    });
    let _ = std::fs::remove_file(&tmp);
    if linked? {
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        tracing::info!(path = %path.display(), "made a new API token");
        Ok(Some(token))
    } else {
        Ok(None)
    }
}

/// Why the CLI could not read the token, with what to do.
fn read_error(path: &Path, e: &std::io::Error) -> TokenError {
    let dir = path.parent().unwrap_or(Path::new("/"));
    let fix = "or set PIER_TOKEN to the agent's token";
    TokenError(match e.kind() {
        ErrorKind::PermissionDenied => format!(
            "cannot read the API token {}: permission denied; run the CLI as root, or set [api] token_group = \"GROUP\" in the agent's config, restart it and add yourself to GROUP (then log in again), {fix}",
            path.display()
        ),
        ErrorKind::NotFound => format!(
            "there is no API token at {}: is the agent running with data dir {}? Point the CLI at the agent's config with `pier --config FILE` (or PIER_CONFIG), {fix}",
            path.display(),
            dir.display()
        ),
        _ => format!("cannot read the API token {}: {e}; {fix}", path.display()),
    })
}

/// The CLI's side: the token in `<data_dir>/api-token`, if this user may
/// read it. Symlinks are not followed.
pub fn read(data_dir: &Path) -> Result<String, TokenError> {
    let path = token_path(data_dir);
    let mut f = open_existing(&path).map_err(|e| {
        if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) {
            open_error(&path, e)
        } else {
            read_error(&path, &e)
        }
    })?;
    let mut s = String::new();
    (&mut f)
        .take(4096)
        .read_to_string(&mut s)
        .map_err(|e| read_error(&path, &e))?;
    let t = s.trim();
    if t.is_empty() {
        return Err(TokenError(format!(
            "the API token file {} is empty; restart the agent after deleting it",
            path.display()
        )));
    }
    Ok(t.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn mode(p: &Path) -> u32 {
        std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
    }

    #[test]
    fn first_start_makes_a_0600_token_and_later_starts_reuse_it() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().join("data");
        let t = ensure(&dir, None).unwrap();
        assert_eq!(t.len(), 64, "{t}");
        assert!(t.chars().all(|c| c.is_ascii_hexdigit()), "{t}");
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&token_path(&dir)), 0o600);
        assert_eq!(ensure(&dir, None).unwrap(), t);
        assert_eq!(read(&dir).unwrap(), t);
        // No temp files left behind.
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(TOKEN_FILE)]);
        // Two data dirs, two different tokens.
        let other = ensure(&d.path().join("other"), None).unwrap();
        assert_ne!(other, t);
    }

    #[test]
    fn an_open_data_dir_is_tightened() {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        ensure(d.path(), None).unwrap();
        assert_eq!(mode(d.path()), 0o700);
    }

    #[test]
    fn attack_world_readable_token_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let t = ensure(d.path(), None).unwrap();
        let p = token_path(d.path());
        for bad in [0o644, 0o604, 0o660, 0o602] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(bad)).unwrap();
            let e = ensure(d.path(), None).unwrap_err().0;
            assert!(
                e.contains(&format!("mode {bad:04o}")) && e.contains("delete it"),
                "{e}"
            );
        }
        // Group read alone is fixed, not refused.
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        assert_eq!(ensure(d.path(), None).unwrap(), t);
        assert_eq!(mode(&p), 0o600);
    }

    #[test]
    fn attack_symlinked_token_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let target = d.path().join("elsewhere");
        std::fs::write(&target, "attacker-chosen-token\n").unwrap();
        let dir = d.path().join("data");
        std::fs::create_dir(&dir).unwrap();
        symlink(&target, token_path(&dir)).unwrap();
        let e = ensure(&dir, None).unwrap_err().0;
        assert!(e.contains("symbolic link"), "{e}");
        let e = read(&dir).unwrap_err().0;
        assert!(e.contains("symbolic link"), "{e}");
    }

    #[test]
    fn token_group_makes_0640_and_0710() {
        let d = tempfile::tempdir().unwrap();
        // Our own primary group: chown to it needs no privilege.
        let gid = rustix::process::getegid().as_raw();
        let t = ensure(d.path(), Some(gid)).unwrap();
        assert_eq!(mode(d.path()), 0o710);
        let p = token_path(d.path());
        assert_eq!(mode(&p), 0o640);
        assert_eq!(std::fs::metadata(&p).unwrap().gid(), gid);
        // Dropping the group tightens both again.
        assert_eq!(ensure(d.path(), None).unwrap(), t);
        assert_eq!(mode(d.path()), 0o700);
        assert_eq!(mode(&p), 0o600);
    }

    /// Files another user made: a token owned by someone else could have
    /// been chosen by them; a data dir owned by someone else could have
    /// anything planted in it. Both are refused (chown needs root).
    #[test]
    fn attack_token_or_data_dir_owned_by_another_user_is_refused() {
        if !rustix::process::geteuid().is_root() {
            panic!("this test chowns files to nobody: run it as root (tests/run.sh does)");
        }
        let nobody = 65534;
        let d = tempfile::tempdir().unwrap();
        ensure(d.path(), None).unwrap();
        let p = token_path(d.path());
        std::os::unix::fs::chown(&p, Some(nobody), None).unwrap();
        let e = ensure(d.path(), None).unwrap_err().0;
        assert!(
            e.contains("owned by uid 65534") && e.contains("delete it"),
            "{e}"
        );
        let d = tempfile::tempdir().unwrap();
        std::os::unix::fs::chown(d.path(), Some(nobody), None).unwrap();
        let e = ensure(d.path(), None).unwrap_err().0;
        assert!(
            e.contains("data dir") && e.contains("owned by uid 65534"),
            "{e}"
        );
        assert!(!token_path(d.path()).exists());
    }

    /// Two agents starting on one data dir at once end up with one token.
    #[test]
    fn racing_first_starts_agree_on_one_token() {
        let d = tempfile::tempdir().unwrap();
        let dir = d.path().to_owned();
        let tokens: Vec<String> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..8)
                .map(|_| s.spawn(|| ensure(&dir, None).unwrap()))
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(tokens.iter().all(|t| t == &tokens[0]), "{tokens:?}");
        assert_eq!(read(&dir).unwrap(), tokens[0]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
    }

    #[test]
    fn missing_token_says_what_to_do() {
        let d = tempfile::tempdir().unwrap();
        let e = read(d.path()).unwrap_err().0;
        assert!(
            e.contains("pier --config") && e.contains("PIER_TOKEN"),
            "{e}"
        );
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("group");
        std::fs::write(&f, "root:x:0:\npier:x:998:alice,bob\n").unwrap();
        assert_eq!(resolve_group_in("pier", &f).unwrap(), 998);
        assert_eq!(resolve_group_in("1234", &f).unwrap(), 1234);
        let e = resolve_group_in("nope", &f).unwrap_err().0;
        assert!(e.contains("groupadd nope"), "{e}");
    }
}
