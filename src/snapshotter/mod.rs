//! The containerd-facing snapshotter: a complete overlayfs snapshotter for ordinary
//! image layers, whose records live in [`crate::metadata`] and whose directories live
//! under `<root>/snapshots/<id>/{fs,work}`.
//!
//! [`Snapshotter`] holds the logic in plain Rust types; [`grpc`] is the thin adapter that
//! serves it as containerd's `containerd.services.snapshots.v1.Snapshots` API and the one
//! place where errors become gRPC codes. Only this module knows tonic and containerd
//! types.
//!
//! Mounts follow containerd's overlay snapshotter: a snapshot without parents is a bind
//! mount of its own `fs` directory (read-only for a view); an active snapshot with
//! parents is an overlay with the parents' `fs` directories as `lowerdir` (nearest first)
//! and its own `fs`/`work` as `upperdir`/`workdir`; a view of one parent is a read-only
//! bind of it, a view of several a read-only overlay of lowerdirs only.

pub mod filter;
pub mod grpc;
pub mod labels;
mod models;
pub mod proto;
pub mod remote;

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use crate::metadata::{Kind, MetaStore, MetadataError, SnapshotRecord, Usage};
use filter::{Filter, FilterError};

/// Why a snapshot operation failed. [`grpc::status_of`] maps each to a gRPC code.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The metadata store refused or failed.
    #[error(transparent)]
    Metadata(#[from] MetadataError),
    /// A `List` filter did not parse.
    #[error(transparent)]
    Filter(#[from] FilterError),
    /// The operation does not apply to a snapshot of this kind.
    #[error("snapshot {key} is {kind}, {what}")]
    WrongKind { key: String, kind: &'static str, what: &'static str },
    /// A request field is missing or malformed.
    #[error("{0}")]
    InvalidArgument(String),
    /// Labels asking for a model are malformed.
    #[error(transparent)]
    Labels(#[from] labels::LabelError),
    /// The model is mounted and committed as `name`: the protocol's way of telling
    /// containerd to skip download and unpack.
    #[error("snapshot {name} already exists (model mounted lazily for {key})")]
    RemoteReady { key: String, name: String },
    /// The model could not be opened.
    #[error("model snapshot {name}: {source}")]
    Model { name: String, source: Box<crate::model::ModelError> },
    /// The lazy index could not be loaded.
    #[error("model snapshot {name}: {source}")]
    Index { name: String, source: Box<crate::companion::CompanionError> },
    /// The model mount failed, or the model cannot be served.
    #[error("model snapshot {name}: {detail}")]
    Remote { name: String, detail: String },
    /// A model snapshot exists but is not mounted (yet): answered rather than handing
    /// out its directory empty.
    #[error("model snapshot {name} is not mounted: {reason}")]
    Unavailable { name: String, reason: String },
    /// Creating, measuring or removing snapshot directories failed.
    #[error("{op} {path}: {source}")]
    Io { op: &'static str, path: String, source: std::io::Error },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { op, path: path.display().to_string(), source }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::View => "a view",
        Kind::Active => "active",
        Kind::Committed => "committed",
    }
}

/// A mount containerd should perform, as `mount -t <kind> <source> -o <options>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// Filesystem type: `bind` or `overlay`.
    pub kind: String,
    /// Source directory (or `overlay`).
    pub source: String,
    /// Options, e.g. `ro`, `rbind`, `lowerdir=...`.
    pub options: Vec<String>,
}

/// The overlayfs snapshotter. Cheap to share behind an `Arc`; every method is
/// synchronous and does short file-system work, so async callers run it on blocking
/// threads.
#[derive(Debug)]
pub struct Snapshotter {
    root: PathBuf,
    meta: MetaStore,
    overlay_index_off: bool,
}

impl Snapshotter {
    /// Opens (creating) the snapshotter state under `root`: `metadata.redb` and
    /// `snapshots/`. `root` and `snapshots/` are private to their owner ([`STATE_MODE`]):
    /// created so, or tightened if they exist.
    pub fn open(root: &Path) -> Result<Self, SnapshotError> {
        private_dir(root)?;
        let snapshots = root.join("snapshots");
        private_dir(&snapshots)?;
        let meta = MetaStore::open(&root.join("metadata.redb"))?;
        // `index=off` keeps overlay from tying upper dirs to lower inodes; only kernels
        // with the parameter accept it.
        let overlay_index_off = Path::new("/sys/module/overlay/parameters/index").exists();
        Ok(Self { root: root.to_owned(), meta, overlay_index_off })
    }

    /// The metadata store (for the remote-snapshot layer above).
    pub fn metadata(&self) -> &MetaStore {
        &self.meta
    }

    /// The directory holding a snapshot's files: the `fs` dir of its id.
    pub fn fs_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("fs")
    }

    /// Where the FUSE session serving every model snapshot is mounted (each model's `fs`
    /// directory is a bind of a directory inside it).
    pub fn models_dir(&self) -> PathBuf {
        self.root.join("models")
    }

    fn snapshot_dir(&self, id: u64) -> PathBuf {
        self.root.join("snapshots").join(id.to_string())
    }

    fn work_dir(&self, id: u64) -> PathBuf {
        self.snapshot_dir(id).join("work")
    }

    /// A new active snapshot on `parent` (a committed snapshot, or none).
    pub fn prepare(
        &self,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        self.create(key, parent, Kind::Active, labels)
    }

    /// A new read-only view of `parent`.
    pub fn view(&self, key: &str, parent: &str, labels: BTreeMap<String, String>) -> Result<Vec<Mount>, SnapshotError> {
        self.create(key, parent, Kind::View, labels)
    }

    fn create(
        &self,
        key: &str,
        parent: &str,
        kind: Kind,
        labels: BTreeMap<String, String>,
    ) -> Result<Vec<Mount>, SnapshotError> {
        let parent = (!parent.is_empty()).then_some(parent);
        let record = self.meta.create(key, parent, kind, labels)?;
        if let Err(e) = self.make_dirs(&record) {
            // Keep records and directories in step: no record without its directory.
            if let Err(undo) = self.meta.remove(key) {
                tracing::error!(key, error = %undo, "cannot undo snapshot record after a failed prepare");
            }
            return Err(e);
        }
        self.mounts_of(&record)
    }

    fn make_dirs(&self, record: &SnapshotRecord) -> Result<(), SnapshotError> {
        let fs = self.fs_dir(record.id);
        std::fs::create_dir_all(&fs).map_err(io_err("creating", &fs))?;
        if record.kind == Kind::Active {
            let work = self.work_dir(record.id);
            std::fs::create_dir_all(&work).map_err(io_err("creating", &work))?;
        }
        Ok(())
    }

    /// The mounts of an active snapshot or view.
    pub fn mounts(&self, key: &str) -> Result<Vec<Mount>, SnapshotError> {
        let record = self.stat(key)?;
        self.mounts_of(&record)
    }

    fn mounts_of(&self, record: &SnapshotRecord) -> Result<Vec<Mount>, SnapshotError> {
        if record.kind == Kind::Committed {
            return Err(SnapshotError::WrongKind {
                key: record.key.clone(),
                kind: "committed",
                what: "which has no mounts (prepare or view a child of it)",
            });
        }
        let lowers: Vec<String> =
            self.meta.ancestors(&record.key)?.iter().map(|p| self.fs_dir(p.id).display().to_string()).collect();
        let own = self.fs_dir(record.id).display().to_string();
        let bind = |source: String, ro: bool| Mount {
            kind: "bind".to_owned(),
            source,
            options: vec![if ro { "ro" } else { "rw" }.to_owned(), "rbind".to_owned()],
        };
        let mount = match (record.kind, lowers.len()) {
            (Kind::Active, 0) => bind(own, false),
            (Kind::View, 0) => bind(own, true),
            (Kind::View, 1) => bind(lowers[0].clone(), true),
            (Kind::View, _) => Mount {
                kind: "overlay".to_owned(),
                source: "overlay".to_owned(),
                options: vec![format!("lowerdir={}", lowers.join(":"))],
            },
            _ => {
                let mut options = Vec::new();
                if self.overlay_index_off {
                    options.push("index=off".to_owned());
                }
                options.push(format!("workdir={}", self.work_dir(record.id).display()));
                options.push(format!("upperdir={own}"));
                options.push(format!("lowerdir={}", lowers.join(":")));
                Mount { kind: "overlay".to_owned(), source: "overlay".to_owned(), options }
            }
        };
        Ok(vec![mount])
    }

    /// Commits active snapshot `key` as `name`, recording its disk usage.
    pub fn commit(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<SnapshotRecord, SnapshotError> {
        let record = self.stat(key)?;
        if record.kind != Kind::Active {
            return Err(SnapshotError::WrongKind {
                key: key.to_owned(),
                kind: kind_name(record.kind),
                what: "not active: only active snapshots commit",
            });
        }
        let usage = disk_usage(&self.fs_dir(record.id))?;
        Ok(self.meta.commit(name, key, labels, usage)?)
    }

    /// Commits active snapshot `key` as `name`, a model snapshot: `remote` (what is
    /// needed to mount it again) and `usage` are recorded in the same transaction.
    pub fn commit_remote(
        &self,
        name: &str,
        key: &str,
        labels: BTreeMap<String, String>,
        remote: String,
        usage: Usage,
    ) -> Result<SnapshotRecord, SnapshotError> {
        Ok(self.meta.commit_remote(name, key, labels, usage, remote)?)
    }

    /// Removes a snapshot without children, and its directory.
    pub fn remove(&self, key: &str) -> Result<SnapshotRecord, SnapshotError> {
        let record = self.meta.remove(key)?;
        let dir = self.snapshot_dir(record.id);
        // Out of sight in one rename, so a crash mid-delete leaves nothing that looks live;
        // `cleanup` removes what is left.
        let trash = self.root.join("snapshots").join(format!("removed-{}", record.id));
        match std::fs::rename(&dir, &trash) {
            Ok(()) => {
                if let Err(e) = std::fs::remove_dir_all(&trash) {
                    tracing::warn!(path = %trash.display(), error = %e, "cannot delete removed snapshot; cleanup will retry");
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(path = %dir.display(), error = %e, "cannot move removed snapshot aside; cleanup will retry")
            }
        }
        Ok(record)
    }

    /// The record of `key`.
    pub fn stat(&self, key: &str) -> Result<SnapshotRecord, SnapshotError> {
        self.meta.get(key)?.ok_or_else(|| MetadataError::NotFound { key: key.to_owned() }.into())
    }

    /// Updates labels (`paths`: `labels` or `labels.<key>`; empty means all).
    pub fn update(
        &self,
        key: &str,
        labels: BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<SnapshotRecord, SnapshotError> {
        Ok(self.meta.update_labels(key, labels, paths)?)
    }

    /// Every snapshot matching any of `filters` (all when there are none).
    pub fn list(&self, filters: &[String]) -> Result<Vec<SnapshotRecord>, SnapshotError> {
        let filter = Filter::parse_all(filters)?;
        Ok(self.meta.list()?.into_iter().filter(|r| filter.matches(&|path: &[&str]| field_of(r, path))).collect())
    }

    /// Disk usage: recorded at commit for committed snapshots, measured now otherwise.
    pub fn usage(&self, key: &str) -> Result<Usage, SnapshotError> {
        let record = self.stat(key)?;
        match (record.kind, record.usage) {
            (Kind::Committed, Some(usage)) => Ok(usage),
            _ => disk_usage(&self.fs_dir(record.id)),
        }
    }

    /// Deletes snapshot directories no record refers to (left by crashes or failed
    /// removals).
    pub fn cleanup(&self) -> Result<(), SnapshotError> {
        let live: std::collections::HashSet<String> = self.meta.list()?.iter().map(|r| r.id.to_string()).collect();
        let dir = self.root.join("snapshots");
        for entry in std::fs::read_dir(&dir).map_err(io_err("reading", &dir))? {
            let entry = entry.map_err(io_err("reading", &dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if live.contains(&name) {
                continue;
            }
            let path = entry.path();
            if crate::fs::is_mountpoint(&path.join("fs")) {
                tracing::warn!(path = %path.display(), "not removing an unreferenced snapshot that is still mounted");
                continue;
            }
            tracing::info!(path = %path.display(), "removing unreferenced snapshot directory");
            std::fs::remove_dir_all(&path).map_err(io_err("removing", &path))?;
        }
        Ok(())
    }
}

/// The mode of the state root and `snapshots/`. Snapshot directories hold unpacked
/// layers, setuid binaries among them: a local user who could reach them could run those
/// (containerd moved its own roots to 0700 for this, CVE-2021-41103). Containers reach
/// their layers through the mounts containerd makes, not through these paths.
pub const STATE_MODE: u32 = 0o700;

/// Creates `dir` with [`STATE_MODE`] (its missing parents as usual), or tightens an
/// existing one to it.
pub fn private_dir(dir: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    if let Some(parent) = dir.parent() {
        std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
    }
    match std::fs::DirBuilder::new().mode(STATE_MODE).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(io_err("creating", dir)(e)),
    }
    let meta = std::fs::metadata(dir).map_err(io_err("checking", dir))?;
    if !meta.is_dir() {
        return Err(io_err("using", dir)(std::io::Error::new(std::io::ErrorKind::AlreadyExists, "not a directory")));
    }
    // Set even when just created: the umask may have taken more than group and others.
    if meta.permissions().mode() & 0o7777 != STATE_MODE {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(STATE_MODE)).map_err(io_err("securing", dir))?;
        tracing::info!(path = %dir.display(), mode = format!("{STATE_MODE:o}"), "made a state directory private");
    }
    Ok(())
}

/// A snapshot's fields as containerd's filters see them.
fn field_of(record: &SnapshotRecord, path: &[&str]) -> Option<String> {
    match path {
        ["name"] => Some(record.key.clone()),
        ["parent"] => Some(record.parent.clone().unwrap_or_default()),
        ["kind"] => Some(
            match record.kind {
                Kind::View => "view",
                Kind::Active => "active",
                Kind::Committed => "committed",
            }
            .to_owned(),
        ),
        ["labels", key] => record.labels.get(*key).cloned(),
        _ => None,
    }
}

/// Bytes and inodes under `dir`, counting each inode once (hard links) and not crossing
/// into other file systems.
pub fn disk_usage(dir: &Path) -> Result<Usage, SnapshotError> {
    let root_dev = std::fs::symlink_metadata(dir).map_err(io_err("measuring", dir))?.dev();
    let mut seen = std::collections::HashSet::new();
    let mut usage = Usage::default();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = match std::fs::read_dir(&d) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err("measuring", &d)(e)),
        };
        for entry in entries {
            let entry = entry.map_err(io_err("measuring", &d))?;
            let Ok(meta) = entry.metadata() else { continue };
            if meta.dev() != root_dev || !seen.insert(meta.ino()) {
                continue;
            }
            usage.inodes += 1;
            usage.size += (meta.blocks() * 512) as i64;
            if meta.is_dir() {
                stack.push(entry.path());
            }
        }
    }
    Ok(usage)
}
