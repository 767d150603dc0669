//! The snapshotter's durable record of snapshots: which keys exist, their kind, parent,
//! labels, usage, and the numeric id that names each snapshot's directory on disk.
//!
//! containerd's own metadata keeps referring to our snapshots across restarts of either
//! process, so this record lives in an embedded transactional store ([`redb`]) in one
//! file, and every mutating call is exactly one write transaction: a crash leaves either
//! the state before the call or the state after it, never a half-applied one. Commits
//! are flushed to disk before the call returns.
//!
//! # Tables
//!
//! ```text
//! snapshots   key -> JSON of SnapshotRecord   (one row per snapshot, active, view or committed)
//! children    parent key -> child keys        (multimap; makes the "has children" check one lookup)
//! info        "schema_version" -> u64, "last_id" -> u64
//! ```
//!
//! # Invariants
//!
//! - A snapshot's parent exists and is committed for as long as the snapshot exists;
//!   a snapshot with children cannot be removed, and only active snapshots (which have no
//!   children, since parents are committed) are renamed by a commit.
//! - `children` holds `(parent, child)` exactly when record `child` names `parent`.
//! - Ids only grow: `last_id` is never decreased, so an id is never handed out twice,
//!   even after its snapshot is removed or the process restarts. A stale directory left
//!   behind by a removed snapshot can therefore never be mistaken for a new one.
//! - No stored label has an empty key, an empty value, or more than [`MAX_LABEL_SIZE`]
//!   bytes of key and value; no record has more than [`MAX_LABELS`] labels or more than
//!   [`MAX_LABELS_SIZE`] bytes of them.
//!
//! # Concurrency
//!
//! [`MetaStore`] is `Send + Sync`. Write transactions are serialized by the store; reads
//! see a consistent snapshot and never wait for writers. Every call blocks on disk I/O
//! (a write waits for `fsync`), so async callers run it on a blocking thread.

mod labels;
pub mod records;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use redb::{
    Database, MultimapTable, MultimapTableDefinition, ReadableDatabase, ReadableMultimapTable, ReadableTable,
    ReadableTableMetadata, Table, TableDefinition, WriteTransaction,
};

pub use self::labels::{check as check_labels, MAX_LABELS, MAX_LABELS_SIZE, MAX_LABEL_SIZE};

/// The on-disk layout this build reads and writes. A store written by a newer layout is
/// refused rather than misread.
pub const SCHEMA_VERSION: u64 = 1;

const RECORDS: TableDefinition<'_, &str, &[u8]> = TableDefinition::new("snapshots");
const CHILDREN: MultimapTableDefinition<'_, &str, &str> = MultimapTableDefinition::new("children");
const INFO: TableDefinition<'_, &str, u64> = TableDefinition::new("info");
const SCHEMA_VERSION_KEY: &str = "schema_version";
const LAST_ID_KEY: &str = "last_id";

/// What a snapshot is, in containerd's terms.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Kind {
    /// A read-only snapshot of a committed parent; never committed itself.
    View,
    /// A writable snapshot that may be committed.
    Active,
    /// Immutable; the only kind that may be a parent.
    Committed,
}

impl Kind {
    /// The lower-case name containerd uses, e.g. in `kind==committed` filters.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// Disk usage of a committed snapshot's own layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Usage {
    pub size: i64,
    pub inodes: i64,
}

/// Everything the store knows about one snapshot.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SnapshotRecord {
    /// Unique and never reused; names the snapshot's directory on disk.
    pub id: u64,
    /// The snapshot's key, which is its name once committed.
    pub key: String,
    /// The parent's key; the parent is always a committed snapshot.
    pub parent: Option<String>,
    pub kind: Kind,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub created: SystemTime,
    pub updated: SystemTime,
    /// Recorded when the snapshot is committed.
    #[serde(default)]
    pub usage: Option<Usage>,
    /// Opaque JSON the snapshotter attaches to remote (lazily mounted) snapshots.
    #[serde(default)]
    pub remote: Option<String>,
}

/// Why a metadata operation failed.
#[derive(Debug, thiserror::Error)]
pub enum MetadataError {
    /// No snapshot has this key.
    #[error("snapshot {key} does not exist")]
    NotFound { key: String },
    /// The key (or commit name) is taken.
    #[error("snapshot {key} already exists")]
    AlreadyExists { key: String },
    /// The named parent does not exist.
    #[error("parent {parent} of snapshot {key} does not exist")]
    ParentNotFound { key: String, parent: String },
    /// Only committed snapshots can be parents.
    #[error("parent {parent} of snapshot {key} is not committed")]
    ParentNotCommitted { key: String, parent: String },
    /// Only active snapshots can be committed.
    #[error("snapshot {key} is not active")]
    NotActive { key: String },
    /// `create` makes views and active snapshots; committed ones come from a commit or
    /// from `create_committed`.
    #[error("snapshot {key} cannot be created {}: only view and active snapshots can", kind.as_str())]
    InvalidKind { key: String, kind: Kind },
    /// Other snapshots name this one as their parent.
    #[error("snapshot {key} has children and cannot be removed")]
    HasChildren { key: String },
    /// A label breaks containerd's rules; `key` is the label's key.
    #[error("invalid label {key:?}: {reason}")]
    InvalidLabel { key: String, reason: String },
    /// An update named a field other than `labels` or `labels.<key>`.
    #[error("cannot update field {path:?}: only \"labels\" and \"labels.<key>\" can be updated")]
    InvalidField { path: String },
    /// A snapshot key, parent key or commit name is unusable.
    #[error("invalid snapshot key: {reason}")]
    InvalidKey { reason: String },
    /// The embedded database failed.
    #[error("metadata store cannot {context}: {source}")]
    Store { context: String, source: redb::Error },
    /// A stored record does not read back as a snapshot record.
    #[error("stored record of snapshot {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// A record could not be serialized (e.g. a timestamp before 1970 from a broken clock).
    #[error("cannot encode the record of snapshot {key}: {source}")]
    Encode { key: String, source: serde_json::Error },
    /// The file could not be created, or kept, readable by its owner only.
    #[error("cannot make metadata store {path} private (mode 0600): {source}")]
    Private { path: PathBuf, source: std::io::Error },
    /// The file was written by a build with another on-disk layout.
    #[error("metadata store {path} has schema version {found}; this build understands version {SCHEMA_VERSION}")]
    UnsupportedSchema { path: PathBuf, found: u64 },
}

/// Builds the error for a failed database call, for use with `map_err`.
fn store_error<E: Into<redb::Error>>(context: &str) -> impl FnOnce(E) -> MetadataError + '_ {
    move |source| MetadataError::Store { context: context.to_owned(), source: source.into() }
}

fn validate_key(key: &str, what: &str) -> Result<(), MetadataError> {
    if key.is_empty() {
        return Err(MetadataError::InvalidKey { reason: format!("{what} is empty") });
    }
    Ok(())
}

/// The mode of the store's file: it names every snapshot, its labels and its model's
/// source, which are no business of other local users.
pub const FILE_MODE: u32 = 0o600;

/// Creates `path` with [`FILE_MODE`] before the database opens it (an empty file is a
/// new database to redb), or tightens an existing file to it.
pub fn make_private(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let file = std::fs::OpenOptions::new().write(true).create(true).truncate(false).mode(FILE_MODE).open(path)?;
    if file.metadata()?.permissions().mode() & 0o777 != FILE_MODE {
        file.set_permissions(std::fs::Permissions::from_mode(FILE_MODE))?;
        tracing::info!(path = %path.display(), "made the metadata store readable by its owner only");
    }
    Ok(())
}

/// The durable snapshot table. See the module docs for its invariants.
#[derive(Debug)]
pub struct MetaStore {
    db: Database,
    path: PathBuf,
}

impl MetaStore {
    /// Opens the store at `path`, creating the file (not its directory) if it is absent.
    /// The file is readable and writable by its owner only ([`FILE_MODE`]): created so,
    /// or tightened if an earlier build left it open to others.
    ///
    /// Fails with [`MetadataError::Store`] if another `MetaStore` in any process has the
    /// file open.
    pub fn open(path: &Path) -> Result<Self, MetadataError> {
        let context = format!("open {}", path.display());
        make_private(path).map_err(|source| MetadataError::Private { path: path.to_owned(), source })?;
        let db = Database::create(path).map_err(store_error(&context))?;
        let store = MetaStore { db, path: path.to_owned() };
        store.write(&context, |tables| {
            let found = tables.info.get(SCHEMA_VERSION_KEY).map_err(store_error(&context))?.map(|v| v.value());
            match found {
                Some(SCHEMA_VERSION) => Ok(()),
                Some(found) => Err(MetadataError::UnsupportedSchema { path: path.to_owned(), found }),
                None => {
                    tables.info.insert(SCHEMA_VERSION_KEY, SCHEMA_VERSION).map_err(store_error(&context))?;
                    Ok(())
                }
            }
        })?;
        tracing::debug!(path = %path.display(), "opened snapshot metadata");
        Ok(store)
    }

    /// Records a new view or active snapshot. The parent, when given, must exist and be
    /// committed.
    pub fn create(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, MetadataError> {
        if kind == Kind::Committed {
            return Err(MetadataError::InvalidKind { key: key.to_owned(), kind });
        }
        self.insert_new(key, parent, kind, labels, None, None)
    }

    /// Records a snapshot that is committed from the start (a remote snapshot), with the
    /// snapshotter's remote data and the usage to report for it.
    pub fn create_committed(
        &self,
        name: &str,
        parent: Option<&str>,
        labels: BTreeMap<String, String>,
        remote: Option<String>,
        usage: Usage,
    ) -> Result<SnapshotRecord, MetadataError> {
        self.insert_new(name, parent, Kind::Committed, labels, remote, Some(usage))
    }

    fn insert_new(
        &self,
        key: &str,
        parent: Option<&str>,
        kind: Kind,
        labels: BTreeMap<String, String>,
        remote: Option<String>,
        usage: Option<Usage>,
    ) -> Result<SnapshotRecord, MetadataError> {
        validate_key(key, "snapshot key")?;
        if let Some(parent) = parent {
            validate_key(parent, "parent key")?;
        }
        let labels = labels::checked(labels)?;
        let now = SystemTime::now();
        let record = self.write("create a snapshot record", |tables| {
            if tables.get(key)?.is_some() {
                return Err(MetadataError::AlreadyExists { key: key.to_owned() });
            }
            if let Some(parent) = parent {
                tables.require_committed_parent(key, parent)?;
                tables.link(parent, key)?;
            }
            let record = SnapshotRecord {
                id: tables.next_id()?,
                key: key.to_owned(),
                parent: parent.map(str::to_owned),
                kind,
                labels,
                created: now,
                updated: now,
                usage,
                remote,
            };
            tables.put(&record)?;
            Ok(record)
        })?;
        tracing::debug!(key, id = record.id, kind = kind.as_str(), "recorded snapshot");
        Ok(record)
    }

    /// The record of `key`, if it exists.
    pub fn get(&self, key: &str) -> Result<Option<SnapshotRecord>, MetadataError> {
        let txn = self.db.begin_read().map_err(store_error("begin a read"))?;
        let records = txn.open_table(RECORDS).map_err(store_error("open the snapshot table"))?;
        load(&records, key)
    }

    /// Commits active snapshot `key` as `name`. The record keeps its id and parent, becomes
    /// committed, records `usage`, and takes `labels` in place of its own unless `labels`
    /// is empty, in which case it keeps its own. `key` no longer exists afterwards.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
    ) -> Result<SnapshotRecord, MetadataError> {
        self.commit_with(name, key, labels, usage, None)
    }

    /// Commits active snapshot `key` as `name` like [`Self::commit`], attaching the
    /// snapshotter's remote data in the same transaction: the snapshot is never seen
    /// committed without it.
    pub fn commit_remote(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
        remote: String,
    ) -> Result<SnapshotRecord, MetadataError> {
        self.commit_with(name, key, labels, usage, Some(remote))
    }

    fn commit_with(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        usage: Usage,
        remote: Option<String>,
    ) -> Result<SnapshotRecord, MetadataError> {
        validate_key(name, "commit name")?;
        let labels = labels::checked(labels)?;
        let now = SystemTime::now();
        let record = self.write("commit a snapshot record", |tables| {
            let mut record = tables.require(key)?;
            if record.kind != Kind::Active {
                return Err(MetadataError::NotActive { key: key.to_owned() });
            }
            if tables.get(name)?.is_some() {
                return Err(MetadataError::AlreadyExists { key: name.to_owned() });
            }
            tables.records.remove(key).map_err(store_error("remove the active record"))?;
            if let Some(parent) = &record.parent {
                tables.unlink(parent, key)?;
                tables.link(parent, name)?;
            }
            name.clone_into(&mut record.key);
            record.kind = Kind::Committed;
            if !labels.is_empty() {
                record.labels = labels;
            }
            record.usage = Some(usage);
            if let Some(remote) = remote {
                record.remote = Some(remote);
            }
            record.updated = now;
            tables.put(&record)?;
            Ok(record)
        })?;
        tracing::debug!(key, name, id = record.id, "committed snapshot");
        Ok(record)
    }

    /// Removes a snapshot that no other snapshot has as its parent, and returns what it was.
    pub fn remove(&self, key: &str) -> Result<SnapshotRecord, MetadataError> {
        let record = self.write("remove a snapshot record", |tables| {
            let record = tables.require(key)?;
            if has_children(&tables.children, key)? {
                return Err(MetadataError::HasChildren { key: key.to_owned() });
            }
            tables.records.remove(key).map_err(store_error("remove a snapshot record"))?;
            if let Some(parent) = &record.parent {
                tables.unlink(parent, key)?;
            }
            Ok(record)
        })?;
        tracing::debug!(key, id = record.id, "removed snapshot record");
        Ok(record)
    }

    /// Updates labels as containerd's `Update` does. With `paths` empty or containing
    /// `labels`, the labels become `labels`; `labels.<k>` sets label `k` to its value in
    /// `labels`, or deletes it when `labels` has none. Any other path is
    /// [`MetadataError::InvalidField`]. Sets `updated`.
    pub fn update_labels(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotRecord, MetadataError> {
        let paths = labels::parse_paths(paths)?;
        let now = SystemTime::now();
        self.write("update snapshot labels", |tables| {
            let mut record = tables.require(key)?;
            let mut updated = std::mem::take(&mut record.labels);
            labels::apply(&mut updated, &labels, &paths);
            record.labels = labels::checked(updated)?;
            record.updated = now;
            tables.put(&record)?;
            Ok(record)
        })
    }

    /// Every snapshot, ordered by key.
    pub fn list(&self) -> Result<Vec<SnapshotRecord>, MetadataError> {
        let txn = self.db.begin_read().map_err(store_error("begin a read"))?;
        let records = txn.open_table(RECORDS).map_err(store_error("open the snapshot table"))?;
        records
            .iter()
            .map_err(store_error("list snapshot records"))?
            .map(|entry| {
                let (key, bytes) = entry.map_err(store_error("list snapshot records"))?;
                decode(key.value(), bytes.value())
            })
            .collect()
    }

    /// The parents of `key`, nearest first; empty for a snapshot without a parent.
    pub fn ancestors(&self, key: &str) -> Result<Vec<SnapshotRecord>, MetadataError> {
        let txn = self.db.begin_read().map_err(store_error("begin a read"))?;
        let records = txn.open_table(RECORDS).map_err(store_error("open the snapshot table"))?;
        let record = load(&records, key)?.ok_or_else(|| MetadataError::NotFound { key: key.to_owned() })?;
        // A chain longer than the table can only be a loop in a damaged file; stopping
        // there keeps a corrupt record from hanging the caller.
        let limit = records.len().map_err(store_error("count snapshot records"))?;
        let mut chain: Vec<SnapshotRecord> = Vec::new();
        let mut next = record.parent;
        while let Some(parent) = next {
            if chain.len() as u64 >= limit {
                return Err(MetadataError::Corrupt {
                    key: key.to_owned(),
                    reason: "its chain of parents loops".to_owned(),
                });
            }
            let ancestor = load(&records, &parent)?.ok_or_else(|| MetadataError::Corrupt {
                key: chain.last().map_or(key, |child| &child.key).to_owned(),
                reason: format!("its parent {parent} does not exist"),
            })?;
            next = ancestor.parent.clone();
            chain.push(ancestor);
        }
        Ok(chain)
    }

    /// Whether any snapshot has `key` as its parent (false for a key that does not exist).
    pub fn has_children(&self, key: &str) -> Result<bool, MetadataError> {
        let txn = self.db.begin_read().map_err(store_error("begin a read"))?;
        let children = txn.open_multimap_table(CHILDREN).map_err(store_error("open the children table"))?;
        has_children(&children, key)
    }

    /// Runs `f` in one write transaction and commits it if `f` succeeds; on an error
    /// nothing `f` did is kept.
    fn write<T>(
        &self,
        context: &str,
        f: impl FnOnce(&mut WriteTables<'_>) -> Result<T, MetadataError>,
    ) -> Result<T, MetadataError> {
        let txn = self.db.begin_write().map_err(store_error(context))?;
        let value = {
            let mut tables = WriteTables::open(&txn).map_err(store_error(context))?;
            f(&mut tables)?
        };
        txn.commit().map_err(store_error(context))?;
        Ok(value)
    }

    /// Where the store lives, for messages.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The tables of one write transaction.
struct WriteTables<'txn> {
    records: Table<'txn, &'static str, &'static [u8]>,
    children: MultimapTable<'txn, &'static str, &'static str>,
    info: Table<'txn, &'static str, u64>,
}

impl<'txn> WriteTables<'txn> {
    fn open(txn: &'txn WriteTransaction) -> Result<Self, redb::TableError> {
        Ok(WriteTables {
            records: txn.open_table(RECORDS)?,
            children: txn.open_multimap_table(CHILDREN)?,
            info: txn.open_table(INFO)?,
        })
    }

    fn get(&self, key: &str) -> Result<Option<SnapshotRecord>, MetadataError> {
        load(&self.records, key)
    }

    fn require(&self, key: &str) -> Result<SnapshotRecord, MetadataError> {
        self.get(key)?.ok_or_else(|| MetadataError::NotFound { key: key.to_owned() })
    }

    fn put(&mut self, record: &SnapshotRecord) -> Result<(), MetadataError> {
        let bytes = encode(record)?;
        self.records.insert(record.key.as_str(), bytes.as_slice()).map_err(store_error("write a snapshot record"))?;
        Ok(())
    }

    fn require_committed_parent(&self, key: &str, parent: &str) -> Result<(), MetadataError> {
        match self.get(parent)? {
            None => Err(MetadataError::ParentNotFound { key: key.to_owned(), parent: parent.to_owned() }),
            Some(record) if record.kind != Kind::Committed => {
                Err(MetadataError::ParentNotCommitted { key: key.to_owned(), parent: parent.to_owned() })
            }
            Some(_) => Ok(()),
        }
    }

    fn link(&mut self, parent: &str, child: &str) -> Result<(), MetadataError> {
        self.children.insert(parent, child).map_err(store_error("link a snapshot to its parent"))?;
        Ok(())
    }

    fn unlink(&mut self, parent: &str, child: &str) -> Result<(), MetadataError> {
        self.children.remove(parent, child).map_err(store_error("unlink a snapshot from its parent"))?;
        Ok(())
    }

    /// Hands out the next id; it is durable once the transaction commits.
    fn next_id(&mut self) -> Result<u64, MetadataError> {
        let last = self.info.get(LAST_ID_KEY).map_err(store_error("read the id counter"))?.map_or(0, |id| id.value());
        let id = last + 1;
        self.info.insert(LAST_ID_KEY, id).map_err(store_error("advance the id counter"))?;
        Ok(id)
    }
}

fn load(
    records: &impl ReadableTable<&'static str, &'static [u8]>,
    key: &str,
) -> Result<Option<SnapshotRecord>, MetadataError> {
    match records.get(key).map_err(store_error("read a snapshot record"))? {
        Some(bytes) => decode(key, bytes.value()).map(Some),
        None => Ok(None),
    }
}

fn has_children(
    children: &impl ReadableMultimapTable<&'static str, &'static str>,
    key: &str,
) -> Result<bool, MetadataError> {
    let values = children.get(key).map_err(store_error("read the children of a snapshot"))?;
    Ok(!values.is_empty())
}

fn encode(record: &SnapshotRecord) -> Result<Vec<u8>, MetadataError> {
    serde_json::to_vec(record).map_err(|source| MetadataError::Encode { key: record.key.clone(), source })
}

fn decode(key: &str, bytes: &[u8]) -> Result<SnapshotRecord, MetadataError> {
    let record: SnapshotRecord = serde_json::from_slice(bytes)
        .map_err(|err| MetadataError::Corrupt { key: key.to_owned(), reason: err.to_string() })?;
    if record.key != key {
        return Err(MetadataError::Corrupt {
            key: key.to_owned(),
            reason: format!("it is stored under this key but names snapshot {}", record.key),
        });
    }
    Ok(record)
}
