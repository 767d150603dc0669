//! The FUSE adapter of the containers/storage additional layer store
//! ([`crate::layerstore`]): one session serving
//! `<store>/<base64(image reference)>/<key>/{diff,info,blob}`, where `diff` is the
//! model itself (served by a [`ModelFs`] inside this session, so a store bind-mounted
//! into a container or chroot carries its models along).
//!
//! containers/storage counts users through the filesystem: creating `<layer>/use` is one
//! more user, removing `<layer>` one fewer; both answer `ENOENT`, as it expects. Only
//! root reaches the store (no `allow_other`): a lookup makes the daemon fetch with the
//! node's credentials, so nobody else may ask. Overlay mounts over a layer read it with
//! the credentials of whoever mounted them.
//!
//! No FUSE passthrough here: a passthrough mount counts as one more filesystem in the
//! kernel's stack (at most two above a disk filesystem), and podman's image mounts stack
//! two overlays on a layer (the image's, and the container's on top of it), which the
//! kernel then refuses. Warm reads come from the cache through the daemon.
//!
//! Inodes: the root is 1, reference directories follow it; every layer gets the range
//! `id << 32` (its directory, `info` and `blob` above `1 << 31`, the model's own inodes
//! below). Layer ids are never reused, so an inode never changes meaning. Entries above
//! the models expire at once: each walk asks again, so a dropped or replaced layer is
//! never reached through a stale entry.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, MountOption,
    OpenFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    Request, SessionACL,
};
use tokio::runtime::Handle;

use super::{negotiate, spawn, store_errno, FsError, ModelFs, Mounted, BLOCK_SIZE};
use crate::layerstore::{encode_reference, LayerPath, LayerStore, Released, StoreLayer};

/// Control entries are asked for again on every walk.
const NO_TTL: Duration = Duration::ZERO;
const ROOT: u64 = 1;
/// Within a layer's range: its directory, `info` and `blob`.
const LAYER_DIR: u64 = 1 << 31;
const INFO: u64 = LAYER_DIR + 1;
const BLOB: u64 = LAYER_DIR + 2;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Root,
    Reference(u64),
    LayerDir(u32),
    Info(u32),
    Blob(u32),
    Model(u32),
}

fn node_of(ino: u64) -> Node {
    let (id, local) = ((ino >> 32) as u32, ino & 0xffff_ffff);
    match (id, local) {
        (0, ROOT) => Node::Root,
        (0, _) => Node::Reference(ino),
        (_, LAYER_DIR) => Node::LayerDir(id),
        (_, INFO) => Node::Info(id),
        (_, BLOB) => Node::Blob(id),
        _ => Node::Model(id),
    }
}

fn layer_ino(id: u32, local: u64) -> u64 {
    (u64::from(id) << 32) | local
}

/// A served layer, as this session shows it.
#[derive(Debug)]
struct Slot {
    layer: Arc<StoreLayer>,
    /// Its reference directory.
    parent: u64,
    fs: ModelFs,
}

/// Reference directories by name and by inode.
#[derive(Debug, Default)]
struct References {
    by_name: HashMap<String, u64>,
    by_ino: HashMap<u64, (String, String)>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<LayerStore>,
    runtime: Handle,
    references: Mutex<References>,
    slots: Mutex<HashMap<u32, Arc<Slot>>>,
}

impl Inner {
    fn slot(&self, id: u32) -> Option<Arc<Slot>> {
        self.slots.lock().expect("slots lock").get(&id).cloned()
    }

    /// The slot of `layer`, made on first sight, under reference directory `parent`.
    fn slot_for(&self, layer: Arc<StoreLayer>, parent: u64) -> Arc<Slot> {
        let mut slots = self.slots.lock().expect("slots lock");
        slots
            .entry(layer.id)
            .or_insert_with(|| {
                let base = layer_ino(layer.id, 0);
                let fs = ModelFs::within(
                    layer.model.clone(),
                    self.runtime.clone(),
                    base,
                    layer_ino(layer.id, LAYER_DIR),
                    false,
                );
                Arc::new(Slot { layer, parent, fs })
            })
            .clone()
    }

    /// The reference directory `name` (base64 of a reference), numbered on first sight.
    fn reference_ino(&self, name: &str, reference: &str) -> u64 {
        let mut refs = self.references.lock().expect("references lock");
        if let Some(ino) = refs.by_name.get(name) {
            return *ino;
        }
        let ino = ROOT + 1 + refs.by_name.len() as u64;
        refs.by_name.insert(name.to_owned(), ino);
        refs.by_ino.insert(ino, (name.to_owned(), reference.to_owned()));
        ino
    }

    /// (directory name, reference) of a reference directory.
    fn reference_of(&self, ino: u64) -> Option<(String, String)> {
        self.references.lock().expect("references lock").by_ino.get(&ino).cloned()
    }

    fn path_of(&self, parent: u64, key: &OsStr) -> Option<LayerPath> {
        let (name, _) = self.reference_of(parent)?;
        LayerPath::parse(&name, key.to_str()?).ok()
    }
}

/// The layer store's filesystem.
#[derive(Debug)]
pub struct StoreFs {
    inner: Arc<Inner>,
}

fn dir_attr(ino: u64) -> FileAttr {
    attr(ino, FileType::Directory, 0o755, 0)
}

fn attr(ino: u64, kind: FileType, perm: u16, size: u64) -> FileAttr {
    FileAttr {
        ino: INodeNo(ino),
        size,
        blocks: size.div_ceil(512),
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind,
        perm,
        nlink: if kind == FileType::Directory { 2 } else { 1 },
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

impl StoreFs {
    /// The filesystem of `store`, reading on `runtime`.
    pub fn new(store: Arc<LayerStore>, runtime: Handle) -> Self {
        let inner =
            Inner { store, runtime, references: Mutex::new(References::default()), slots: Mutex::new(HashMap::new()) };
        Self { inner: Arc::new(inner) }
    }

    /// The attributes of a control inode, if it exists.
    fn control_attr(&self, node: Node) -> Option<FileAttr> {
        match node {
            Node::Root => Some(dir_attr(ROOT)),
            Node::Reference(ino) => self.inner.reference_of(ino).map(|_| dir_attr(ino)),
            Node::LayerDir(id) => self.inner.slot(id).map(|_| dir_attr(layer_ino(id, LAYER_DIR))),
            Node::Info(id) => self
                .inner
                .slot(id)
                .map(|s| attr(layer_ino(id, INFO), FileType::RegularFile, 0o444, s.layer.info.len() as u64)),
            Node::Blob(id) => self
                .inner
                .slot(id)
                .map(|s| attr(layer_ino(id, BLOB), FileType::RegularFile, 0o444, s.layer.blob.len() as u64)),
            Node::Model(_) => None,
        }
    }

    /// The bytes of `info` or `blob`.
    fn file_bytes(&self, node: Node) -> Option<bytes::Bytes> {
        match node {
            Node::Info(id) => self.inner.slot(id).map(|s| s.layer.info.clone()),
            Node::Blob(id) => self.inner.slot(id).map(|s| s.layer.blob.clone()),
            _ => None,
        }
    }

    /// The model slot an inode belongs to.
    fn model_slot(&self, ino: INodeNo) -> Option<Arc<Slot>> {
        match node_of(ino.0) {
            Node::Model(id) => self.inner.slot(id),
            _ => None,
        }
    }

    /// Entries of a control directory: (name, inode, kind).
    fn entries(&self, node: Node) -> Option<Vec<(String, u64, FileType)>> {
        let layers = self.inner.store.served_layers();
        let mut out = Vec::new();
        match node {
            Node::Root => {
                out.push((".".to_owned(), ROOT, FileType::Directory));
                out.push(("..".to_owned(), ROOT, FileType::Directory));
                // Sorted by reference, so each reference's layers are adjacent.
                let mut references: Vec<&str> = layers.iter().map(|l| l.path.reference.as_str()).collect();
                references.dedup();
                for reference in references {
                    let name = encode_reference(reference);
                    let ino = self.inner.reference_ino(&name, reference);
                    out.push((name, ino, FileType::Directory));
                }
            }
            Node::Reference(ino) => {
                let (_, reference) = self.inner.reference_of(ino)?;
                out.push((".".to_owned(), ino, FileType::Directory));
                out.push(("..".to_owned(), ROOT, FileType::Directory));
                for layer in layers.into_iter().filter(|l| l.path.reference == reference) {
                    let id = self.inner.slot_for(layer.clone(), ino).layer.id;
                    out.push((layer.path.key.to_string(), layer_ino(id, LAYER_DIR), FileType::Directory));
                }
            }
            Node::LayerDir(id) => {
                let slot = self.inner.slot(id)?;
                out.push((".".to_owned(), layer_ino(id, LAYER_DIR), FileType::Directory));
                out.push(("..".to_owned(), slot.parent, FileType::Directory));
                out.push(("diff".to_owned(), slot.fs.root_attr().ino.0, FileType::Directory));
                out.push(("info".to_owned(), layer_ino(id, INFO), FileType::RegularFile));
                out.push(("blob".to_owned(), layer_ino(id, BLOB), FileType::RegularFile));
            }
            _ => return None,
        }
        Some(out)
    }
}

impl Filesystem for StoreFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        negotiate(config, false);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match node_of(parent.0) {
            Node::Root => {
                let Some(text) = name.to_str() else { return reply.error(Errno::ENOENT) };
                match crate::layerstore::decode_reference(text) {
                    Ok(reference) => {
                        let ino = self.inner.reference_ino(text, &reference);
                        reply.entry(&NO_TTL, &dir_attr(ino), Generation(0));
                    }
                    Err(_) => reply.error(Errno::ENOENT),
                }
            }
            Node::Reference(ino) => {
                let Some(path) = self.inner.path_of(ino, name) else {
                    tracing::debug!(parent = ino, ?name, "not a layer key");
                    return reply.error(Errno::ENOENT);
                };
                let inner = self.inner.clone();
                let answer = move |found: Result<Arc<StoreLayer>, crate::layerstore::StoreError>| match found {
                    Ok(layer) => {
                        let id = inner.slot_for(layer, ino).layer.id;
                        reply.entry(&NO_TTL, &dir_attr(layer_ino(id, LAYER_DIR)), Generation(0));
                    }
                    Err(e) => {
                        log_miss(&e);
                        reply.error(store_errno(&e));
                    }
                };
                if let Some(layer) = self.inner.store.served(&path) {
                    return answer(Ok(layer));
                }
                let store = self.inner.store.clone();
                self.inner.runtime.spawn(async move { answer(store.layer(&path).await) });
            }
            Node::LayerDir(id) => {
                let Some(slot) = self.inner.slot(id) else { return reply.error(Errno::ENOENT) };
                let attr = match name.to_str() {
                    Some("diff") => slot.fs.root_attr(),
                    Some("info") => {
                        attr(layer_ino(id, INFO), FileType::RegularFile, 0o444, slot.layer.info.len() as u64)
                    }
                    Some("blob") => {
                        attr(layer_ino(id, BLOB), FileType::RegularFile, 0o444, slot.layer.blob.len() as u64)
                    }
                    _ => return reply.error(Errno::ENOENT),
                };
                reply.entry(&NO_TTL, &attr, Generation(0));
            }
            Node::Model(_) => match self.model_slot(parent) {
                Some(slot) => slot.fs.serve_lookup(parent, name, reply),
                None => reply.error(Errno::ENOENT),
            },
            Node::Info(_) | Node::Blob(_) => reply.error(Errno::ENOTDIR),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(slot) = self.model_slot(ino) {
            return slot.fs.serve_getattr(ino, fh, reply);
        }
        match self.control_attr(node_of(ino.0)) {
            Some(attr) => reply.attr(&NO_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.model_slot(ino) {
            Some(slot) => slot.fs.serve_readlink(ino, reply),
            None => reply.error(Errno::EINVAL),
        }
    }

    /// `<layer>/use`: one more user of the layer. Answers `ENOENT` as containers/storage
    /// expects; nothing is created.
    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        _flags: i32,
        reply: ReplyCreate,
    ) {
        let Node::LayerDir(id) = node_of(parent.0) else { return reply.error(Errno::EROFS) };
        if name != "use" {
            return reply.error(Errno::EROFS);
        }
        if req.uid() != 0 {
            return reply.error(Errno::EACCES);
        }
        let Some(slot) = self.inner.slot(id) else { return reply.error(Errno::ENOENT) };
        if let Err(e) = self.inner.store.use_layer(&slot.layer.path) {
            tracing::warn!(error = %e, "cannot count a use of a layer");
        }
        reply.error(Errno::ENOENT);
    }

    /// `rmdir <layer>`: one user fewer. Answers `ENOENT` as containers/storage expects;
    /// a layer nobody uses any more is dropped.
    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        let Node::Reference(ino) = node_of(parent.0) else { return reply.error(Errno::EROFS) };
        if req.uid() != 0 {
            return reply.error(Errno::EACCES);
        }
        let Some(path) = self.inner.path_of(ino, name) else { return reply.error(Errno::ENOENT) };
        match self.inner.store.release(&path) {
            Ok(Released::Dropped(id)) => {
                self.inner.slots.lock().expect("slots lock").remove(&id);
            }
            Ok(Released::Used(_) | Released::Unknown) => {}
            Err(e) => tracing::warn!(error = %e, "cannot count a release of a layer"),
        }
        reply.error(Errno::ENOENT);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Some(slot) = self.model_slot(ino) {
            return slot.fs.serve_open(req.unique().0, ino, flags, reply);
        }
        match self.file_bytes(node_of(ino.0)) {
            Some(_) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            None => reply.error(Errno::EISDIR),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        if let Some(slot) = self.model_slot(ino) {
            return slot.fs.serve_read(ino, fh, offset, size, reply);
        }
        let Some(bytes) = self.file_bytes(node_of(ino.0)) else { return reply.error(Errno::EBADF) };
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        reply.data(&bytes[start..end]);
    }

    /// As [`ModelFs`]'s: no `FLUSH` is wanted on this connection.
    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.error(Errno::ENOSYS);
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<fuser::LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.model_slot(ino) {
            Some(slot) => slot.fs.serve_release(ino, fh, reply),
            None => reply.ok(),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Some(slot) = self.model_slot(ino) {
            return slot.fs.serve_opendir(ino, flags, reply);
        }
        match self.control_attr(node_of(ino.0)) {
            Some(attr) if attr.kind == FileType::Directory => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if let Some(slot) = self.model_slot(ino) {
            return slot.fs.serve_readdir(ino, fh, offset, reply);
        }
        let Some(entries) = self.entries(node_of(ino.0)) else { return reply.error(Errno::ENOENT) };
        for (i, (name, child, kind)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(child), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.model_slot(ino) {
            Some(slot) => slot.fs.serve_statfs(ino, reply),
            None => reply.statfs(0, 0, 0, 0, 0, BLOCK_SIZE, 255, BLOCK_SIZE),
        }
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        match self.model_slot(ino) {
            Some(slot) => slot.fs.serve_getxattr(ino, name, size, reply),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        match self.model_slot(ino) {
            Some(slot) => slot.fs.serve_listxattr(ino, size, reply),
            None if size == 0 => reply.size(0),
            None => reply.data(&[]),
        }
    }
}

/// Logs why a lookup found nothing: ordinary images quietly, real failures loudly.
fn log_miss(e: &crate::layerstore::StoreError) {
    use crate::layerstore::StoreError;
    match e {
        StoreError::NotCompanion { .. }
        | StoreError::NoSuchLayer { .. }
        | StoreError::BadReference { .. }
        | StoreError::BadKey { .. } => {
            tracing::debug!(error = %e, "layer not in the store");
        }
        _ => tracing::warn!(error = %e, "layer lookup failed; containers/storage will download the layer"),
    }
}

/// Mounts the layer store at `mountpoint` (created if missing): nosuid, nodev, for root
/// only, writable only in the ways containers/storage counts users.
pub fn mount_store(store: Arc<LayerStore>, mountpoint: &Path, runtime: Handle) -> Result<Mounted, FsError> {
    std::fs::create_dir_all(mountpoint)
        .map_err(|source| FsError::Mount { path: mountpoint.display().to_string(), source })?;
    let options = vec![
        MountOption::FSName("modelpack-layer-store".to_owned()),
        MountOption::Subtype("modelpack".to_owned()),
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::DefaultPermissions,
    ];
    spawn(StoreFs::new(store, runtime), mountpoint, options, SessionACL::Owner)
}
