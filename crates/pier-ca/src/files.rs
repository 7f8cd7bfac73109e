//! The CA's file writes: new files that must not exist yet, and
//! replacements through a temporary file with a random name.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

use pier_proxy::tls::{TlsError, pem_error, provider};
use rustls::pki_types::CertificateRevocationListDer;
use rustls::pki_types::pem::PemObject;

use crate::{CaError, hex};

pub(crate) fn read_crls(
    path: &Path,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    CertificateRevocationListDer::pem_file_iter(path)
        .map_err(|e| pem_error(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(path, e))
}

pub(crate) fn random_serial() -> Result<[u8; 16], CaError> {
    let mut b = [0u8; 16];
    provider()
        .secure_random
        .fill(&mut b)
        .map_err(|_| CaError::Validity("no randomness for a serial number".into()))?;
    b[0] &= 0x7f; // positive
    b[0] |= 0x01; // no leading zero byte
    Ok(b)
}

pub(crate) fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    fs::read(path).map_err(|source| TlsError::Io {
        path: path.to_owned(),
        source,
    })
}

pub(crate) fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<(), CaError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(mode)
        .open(path)
        .map_err(|e| {
            if e.kind() == io::ErrorKind::AlreadyExists {
                CaError::Exists {
                    path: path.to_owned(),
                }
            } else {
                io(e).into()
            }
        })?;
    f.write_all(data).map_err(io)?;
    Ok(f.sync_all().map_err(io)?)
}

/// Creates `tmp` for writing, mode `mode`: `O_CREAT|O_EXCL|O_NOFOLLOW`,
/// so an existing file or a symlink planted at that name is an error,
/// never followed or reused.
pub(crate) fn create_temp(tmp: &Path, mode: u32) -> io::Result<fs::File> {
    let f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .mode(mode)
        .open(tmp)?;
    // The umask may have taken bits `mode` asked for; never adds any.
    f.set_permissions(fs::Permissions::from_mode(mode))?;
    Ok(f)
}

/// Write `path` atomically: a temp file with a random name in the same
/// directory ([`create_temp`]), then rename over `path` (rename replaces a
/// symlink at `path`, it does not follow it).
pub(crate) fn write_replace(path: &Path, data: &[u8], mode: u32) -> Result<(), TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_owned(),
        source,
    };
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let mut attempt = 0;
    let (tmp, mut f) = loop {
        let mut r = [0u8; 12];
        provider()
            .secure_random
            .fill(&mut r)
            .map_err(|_| io(io::Error::other("no randomness for a temporary file name")))?;
        let tmp = path.with_file_name(format!(".{name}.{}.tmp", hex(&r)));
        match create_temp(&tmp, mode) {
            Ok(f) => break (tmp, f),
            // 96 random bits taken: someone is planting names. Retry a few
            // times, then give up.
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists && attempt < 8 => attempt += 1,
            Err(e) => return Err(io(e)),
        }
    };
    let done = (|| {
        f.write_all(data)?;
        f.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if let Err(e) = done {
        let _ = fs::remove_file(&tmp);
        return Err(io(e));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use pier_proxy::tls::{CA_CERT_FILE, NODE_CERT_FILE, NODE_KEY_FILE};

    use super::*;
    use crate::{ca_init, ca_issue};

    /// Attack (S1): a symlink or a file planted at the temporary name is
    /// never opened: creation fails, the target is untouched.
    #[test]
    fn temp_files_refuse_planted_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let victim = dir.path().join("victim");
        fs::write(&victim, b"precious").expect("victim");
        let link = dir.path().join(".node-key.pem.planted.tmp");
        std::os::unix::fs::symlink(&victim, &link).expect("symlink");
        let e = create_temp(&link, 0o600).expect_err("followed a planted symlink");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        let dangling = dir.path().join(".dangling.tmp");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).expect("symlink");
        assert!(
            create_temp(&dangling, 0o600).is_err(),
            "created through a dangling symlink"
        );
        assert!(!dir.path().join("nowhere").exists());
        let e = create_temp(&victim, 0o600).expect_err("reused an existing file");
        assert_eq!(e.kind(), io::ErrorKind::AlreadyExists, "{e}");
        assert_eq!(fs::read(&victim).expect("read"), b"precious");
        // A fresh name works, with exactly the mode asked for.
        let ok = dir.path().join(".fresh.tmp");
        create_temp(&ok, 0o600).expect("fresh");
        let mode = fs::metadata(&ok).expect("meta").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    /// Attack (S1): symlinks planted at the names the old code used
    /// (`.NAME.tmpPID`) to catch the node key. Issuing ignores them: the
    /// victim is untouched and the key is a new 0600 file.
    #[test]
    fn issuing_ignores_symlinks_at_predictable_temp_names() {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca = dir.path().join("ca");
        ca_init(&ca).expect("ca");
        let out = dir.path().join("n1");
        fs::create_dir_all(&out).expect("out");
        let victim = dir.path().join("stolen-key");
        fs::write(&victim, b"").expect("victim");
        for f in [NODE_KEY_FILE, NODE_CERT_FILE, CA_CERT_FILE] {
            let old = out.join(format!(".{f}.tmp{}", std::process::id()));
            std::os::unix::fs::symlink(&victim, old).expect("plant");
        }
        ca_issue(&pier_model::Name::new("n1").expect("name"), &ca, &out, 1).expect("issue");
        assert_eq!(
            fs::read(&victim).expect("victim"),
            b"",
            "the key went through a symlink"
        );
        let key = out.join(NODE_KEY_FILE);
        let md = fs::symlink_metadata(&key).expect("key");
        assert!(md.file_type().is_file(), "the key is a regular file");
        assert_eq!(md.permissions().mode() & 0o777, 0o600);
        // No temporary file is left behind (only the planted links).
        let left: Vec<_> = fs::read_dir(&out)
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "{left:?}");
    }
}
