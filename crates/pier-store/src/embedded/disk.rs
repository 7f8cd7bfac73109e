//! The redb file: its tables, the key/value encoding, the file and directory
//! modes, and loading the committed state when the store opens.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{KeyValue, LeaseId, Revision, StoreError, Ttl};

/// The file under the store's dir.
pub(crate) const DB_FILE: &str = "store.redb";
pub(crate) const KV: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("kv");
pub(crate) const LEASES: TableDefinition<'_, i64, u32> = TableDefinition::new("leases");
pub(crate) const META: TableDefinition<'_, &str, i64> = TableDefinition::new("meta");
pub(crate) const META_REVISION: &str = "revision";
/// A KV record: create_revision, mod_revision, version, lease (0 = none), each
/// i64 little-endian, then the value.
pub(crate) const KV_HEADER: usize = 32;

/// The store dir at 0700 and the database file at 0600 (created so if
/// missing, tightened if open, refused if a symlink or not a file).
pub(crate) fn secure_files(dir: &Path, path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| unavailable(dir, "create dir", e))?;
    let tighten = |p: &Path, want: u32| -> Result<(), StoreError> {
        let md = std::fs::metadata(p).map_err(|e| unavailable(p, "stat", e))?;
        let mode = md.permissions().mode() & 0o7777;
        if mode != want {
            std::fs::set_permissions(p, std::fs::Permissions::from_mode(want)).map_err(|e| {
                unavailable(
                    p,
                    &format!(
                        "it is mode {mode:04o}, open to other users, and setting {want:04o} failed"
                    ),
                    format!("{e}; chown it to the agent's user or chmod it {want:04o}"),
                )
            })?;
            tracing::warn!(path = %p.display(), was = %format!("{mode:04o}"), now = %format!("{want:04o}"), "tightened the embedded store's mode");
        }
        Ok(())
    };
    tighten(dir, 0o700)?;
    match std::fs::symlink_metadata(path) {
        Ok(md) if md.file_type().is_symlink() => {
            return Err(unavailable(
                path,
                "open",
                "it is a symbolic link, which is refused; move the real file here",
            ));
        }
        Ok(md) if !md.is_file() => {
            return Err(unavailable(path, "open", "it is not a regular file"));
        }
        Ok(_) => tighten(path, 0o600)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // Empty: redb initialises a database in an empty file.
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(path)
                .map_err(|e| unavailable(path, "create", e))?;
            tighten(path, 0o600)?;
        }
        Err(e) => return Err(unavailable(path, "stat", e)),
    }
    Ok(())
}

pub(crate) fn unavailable(path: &Path, what: &str, e: impl fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("embedded store {}: {what}: {e}", path.display()))
}

pub(crate) fn encode(kv: &KeyValue) -> Vec<u8> {
    let mut out = Vec::with_capacity(KV_HEADER + kv.value.len());
    out.extend_from_slice(&kv.create_revision.to_le_bytes());
    out.extend_from_slice(&kv.mod_revision.to_le_bytes());
    out.extend_from_slice(&kv.version.to_le_bytes());
    out.extend_from_slice(&kv.lease.map_or(0, |l| l.0).to_le_bytes());
    out.extend_from_slice(&kv.value);
    out
}

pub(crate) fn decode(key: &str, bytes: &[u8]) -> Option<KeyValue> {
    let field = |i: usize| -> Option<i64> {
        let b: [u8; 8] = bytes.get(i * 8..i * 8 + 8)?.try_into().ok()?;
        Some(i64::from_le_bytes(b))
    };
    let lease = field(3)?;
    Some(KeyValue {
        key: key.to_owned(),
        value: bytes.get(KV_HEADER..)?.to_vec(),
        create_revision: field(0)?,
        mod_revision: field(1)?,
        version: field(2)?,
        lease: (lease != 0).then_some(LeaseId(lease)),
    })
}

/// What `open` loads from disk.
pub(crate) struct Loaded {
    pub(crate) kvs: BTreeMap<String, KeyValue>,
    pub(crate) leases: Vec<(LeaseId, Ttl)>,
    pub(crate) revision: Option<Revision>,
}

pub(crate) fn load(db: &Database, path: &Path) -> Result<Loaded, StoreError> {
    let err = |what: &str, e: &dyn fmt::Display| unavailable(path, what, e);
    // Create the tables on first open.
    let wtx = db.begin_write().map_err(|e| err("begin", &e))?;
    {
        wtx.open_table(KV).map_err(|e| err("open table kv", &e))?;
        wtx.open_table(LEASES)
            .map_err(|e| err("open table leases", &e))?;
        wtx.open_table(META)
            .map_err(|e| err("open table meta", &e))?;
    }
    wtx.commit().map_err(|e| err("commit", &e))?;

    let rtx = db.begin_read().map_err(|e| err("begin read", &e))?;
    let mut kvs = BTreeMap::new();
    let table = rtx.open_table(KV).map_err(|e| err("open table kv", &e))?;
    for entry in table.iter().map_err(|e| err("read kv", &e))? {
        let (k, v) = entry.map_err(|e| err("read kv", &e))?;
        let key = k.value();
        let kv = decode(key, v.value()).ok_or_else(|| StoreError::Corrupt {
            path: path.display().to_string(),
            key: key.to_owned(),
        })?;
        kvs.insert(key.to_owned(), kv);
    }
    let mut leases = Vec::new();
    let table = rtx
        .open_table(LEASES)
        .map_err(|e| err("open table leases", &e))?;
    for entry in table.iter().map_err(|e| err("read leases", &e))? {
        let (id, ttl) = entry.map_err(|e| err("read leases", &e))?;
        let ttl = Ttl::from_secs(ttl.value()).map_err(|e| err("lease ttl", &e))?;
        leases.push((LeaseId(id.value()), ttl));
    }
    let table = rtx
        .open_table(META)
        .map_err(|e| err("open table meta", &e))?;
    let revision = table
        .get(META_REVISION)
        .map_err(|e| err("read revision", &e))?
        .map(|g| g.value());
    Ok(Loaded {
        kvs,
        leases,
        revision,
    })
}
