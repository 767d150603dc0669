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
//! Inodes: the root is 1, reference directories follow it; every layer served gets a
//! slot, and the slot the range `slot << 32` (its directory, `info` and `blob` above
//! `1 << 31`, the model's own inodes below). Slots are never reused within a session, so
//! an inode never changes meaning. Entries above the models expire at once: each walk
//! asks again, so a dropped or replaced layer is never reached through a stale entry.
//!
//! **Restarts.** With a [`Keeper`], the session is kept for the next process and
//! journaled as the model sessions are ([`super::takeover`]): the reference directories'
//! numbers, each slot's layer path and model fingerprint, and the files open in it. The
//! successor takes the mount over as it is, and serves each slot again once the store
//! has its layer back (from its record, else by asking the registry again) with the same
//! model; a slot whose layer now leads to another model, or cannot be served, is given
//! up and its open files fail. Requests for a slot not back yet wait, at most the
//! restore wait.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, OpenFlags,
    ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
    SessionACL,
};
use tokio::runtime::Handle;

use super::handover::{Keeper, Record};
use super::takeover::{self, fingerprint, Kept, Pending, Reclaimed};
use super::{connection, detach, is_mountpoint, negotiate, store_errno, FsError, ModelFs, Mounted, BLOCK_SIZE};
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
    /// Its number: its inodes are `number << 32` on.
    number: u32,
    layer: Arc<StoreLayer>,
    /// Its reference directory.
    parent: u64,
    fs: ModelFs,
    /// Its path within the store, and its model's fingerprint (for the journal).
    target: PathBuf,
    fingerprint: String,
}

/// Reference directories by name and by inode.
#[derive(Debug)]
struct References {
    by_name: HashMap<String, u64>,
    by_ino: HashMap<u64, (String, String)>,
    next: u64,
}

impl Default for References {
    fn default() -> Self {
        Self { by_name: HashMap::new(), by_ino: HashMap::new(), next: ROOT + 1 }
    }
}

/// The slots of the layers served.
#[derive(Debug, Default)]
struct Slots {
    by_slot: HashMap<u32, Arc<Slot>>,
    /// Each served layer's slot, by the store's layer id.
    by_layer: HashMap<u32, u32>,
}

#[derive(Debug)]
struct Inner {
    store: Arc<LayerStore>,
    runtime: Handle,
    references: Mutex<References>,
    slots: Mutex<Slots>,
    /// Held while a slot is made: one slot per layer, journaled before anyone can reach it.
    making: Mutex<()>,
    /// The next slot; slot 0 is the range of the root and the reference directories.
    next: AtomicU32,
    /// Slots a previous process served whose layers are not back yet.
    pending: Pending,
    /// The journal and connection of a session kept for the next process.
    kept: OnceLock<Kept>,
}

/// A layer's path within the store, as journaled.
fn target_of(path: &LayerPath) -> PathBuf {
    PathBuf::from(format!("{}/{}", encode_reference(&path.reference), path.key))
}

impl Inner {
    fn new(store: Arc<LayerStore>, runtime: Handle, wait: Duration) -> Self {
        Self {
            store,
            runtime,
            references: Mutex::default(),
            slots: Mutex::default(),
            making: Mutex::new(()),
            next: AtomicU32::new(1),
            pending: Pending::new(wait),
            kept: OnceLock::new(),
        }
    }

    fn slot(&self, slot: u32) -> Option<Arc<Slot>> {
        self.slots.lock().expect("slots lock").by_slot.get(&slot).cloned()
    }

    fn slot_of_layer(&self, layer: &StoreLayer) -> Option<Arc<Slot>> {
        let slots = self.slots.lock().expect("slots lock");
        slots.by_layer.get(&layer.id).and_then(|slot| slots.by_slot.get(slot)).cloned()
    }

    fn journal(&self, record: &Record) {
        if let Some(kept) = self.kept.get() {
            kept.journal.append(record);
        }
    }

    /// The slot of `layer`, made on first sight, under reference directory `parent`: the
    /// slot a previous process served it in, if it waits for this very model.
    fn slot_for(&self, layer: Arc<StoreLayer>, parent: u64) -> Arc<Slot> {
        if let Some(slot) = self.slot_of_layer(&layer) {
            return slot;
        }
        let _making = self.making.lock().expect("making lock");
        if let Some(slot) = self.slot_of_layer(&layer) {
            return slot;
        }
        let target = target_of(&layer.path);
        let fingerprint = self.kept.get().map(|_| fingerprint(&layer.model)).unwrap_or_default();
        let adopted = match self.pending.at(&target) {
            Some((slot, saved)) if saved.fingerprint == fingerprint => Some((slot, saved)),
            Some((slot, _)) => {
                tracing::warn!(layer = %target.display(), "the layer served here before the restart leads to another model now; serving it afresh (files open in it fail)");
                self.pending.settle(slot);
                self.journal(&Record::Detach { slot });
                None
            }
            None => None,
        };
        let number = adopted.as_ref().map_or_else(|| self.next.fetch_add(1, Ordering::Relaxed), |(slot, _)| *slot);
        let fs = ModelFs::within(
            layer.model.clone(),
            self.runtime.clone(),
            layer_ino(number, 0),
            layer_ino(number, LAYER_DIR),
            false,
        );
        let fs = match self.kept.get() {
            Some(kept) => fs.handed_over(kept.slot(number)),
            None => fs,
        };
        match &adopted {
            Some((_, saved)) => fs.adopt_opens(&saved.opens),
            // Journaled before anyone has the slot's inodes (no lock a rewrite takes is held).
            None => {
                self.journal(&Record::Attach { slot: number, target: target.clone(), fingerprint: fingerprint.clone() })
            }
        }
        let id = layer.id;
        let slot = Arc::new(Slot { number, layer, parent, fs, target, fingerprint });
        {
            let mut slots = self.slots.lock().expect("slots lock");
            slots.by_slot.insert(number, slot.clone());
            slots.by_layer.insert(id, number);
        }
        if let Some((number, saved)) = adopted {
            self.pending.settle(number);
            tracing::debug!(layer = %slot.target.display(), slot = number, open = saved.opens.len(), "took over a layer");
        }
        slot
    }

    /// Takes the slot of dropped layer `id` away.
    fn drop_layer(&self, id: u32) {
        let gone = {
            let mut slots = self.slots.lock().expect("slots lock");
            slots.by_layer.remove(&id).and_then(|slot| slots.by_slot.remove(&slot).map(|_| slot))
        };
        if let Some(slot) = gone {
            self.journal(&Record::Detach { slot });
        }
    }

    /// The reference directory `name` (base64 of a reference), numbered on first sight.
    fn reference_ino(&self, name: &str, reference: &str) -> u64 {
        let ino = {
            let mut refs = self.references.lock().expect("references lock");
            if let Some(ino) = refs.by_name.get(name) {
                return *ino;
            }
            let ino = refs.next;
            refs.next += 1;
            refs.by_name.insert(name.to_owned(), ino);
            refs.by_ino.insert(ino, (name.to_owned(), reference.to_owned()));
            ino
        };
        self.journal(&Record::Directory { ino, name: name.to_owned() });
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

    /// The pending slot `ino` belongs to, if it is one.
    fn pending_slot(&self, ino: u64) -> Option<u32> {
        let slot = (ino >> 32) as u32;
        (slot != 0 && self.pending.contains(slot) && self.slot(slot).is_none()).then_some(slot)
    }

    /// Rewrites the journal from the live state when it has grown long.
    fn compact(&self) {
        let Some(kept) = self.kept.get() else { return };
        kept.compact(|| {
            let mut records = Vec::new();
            let refs = self.references.lock().expect("references lock");
            records
                .extend(refs.by_ino.iter().map(|(ino, (name, _))| Record::Directory { ino: *ino, name: name.clone() }));
            drop(refs);
            for (number, slot) in &self.slots.lock().expect("slots lock").by_slot {
                let (target, fingerprint) = (slot.target.clone(), slot.fingerprint.clone());
                records.push(Record::Attach { slot: *number, target, fingerprint });
                records.extend(slot.fs.open_records(*number));
            }
            records.extend(self.pending.records());
            records
        });
    }

    /// Brings every pending slot back: each layer is served again, from its record or
    /// the registry, and put back in its slot if it leads to the same model; a slot whose
    /// layer cannot be served, or leads elsewhere now, is given up.
    fn restore_pending(self: &Arc<Self>) {
        for (number, saved) in self.pending.all() {
            let inner = self.clone();
            self.runtime.spawn(async move {
                let shown = saved.target.display().to_string();
                let parsed = shown.split_once('/').and_then(|(name, key)| Some((name, LayerPath::parse(name, key).ok()?)));
                let failure = match parsed {
                    None => Some(format!("{shown} is not a layer path")),
                    Some((name, path)) => {
                        let parent = inner.reference_ino(name, &path.reference);
                        match inner.store.layer(&path).await {
                            Ok(layer) => {
                                inner.slot_for(layer, parent);
                                None
                            }
                            Err(e) => Some(e.to_string()),
                        }
                    }
                };
                if let Some(cause) = failure {
                    tracing::warn!(layer = %shown, %cause, "a layer served before the restart cannot be served again; its open files fail");
                }
                if inner.pending.settle(number).is_some() {
                    inner.journal(&Record::Detach { slot: number });
                }
            });
        }
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
    /// Calls `serve` at once, or, for an inode of a slot a previous process served whose
    /// layer is not back yet, once it is (or the wait is over), on the runtime.
    fn when_ready(&self, ino: INodeNo, serve: impl FnOnce(&StoreFs) + Send + 'static) {
        let Some(slot) = self.inner.pending_slot(ino.0) else { return serve(self) };
        let this = StoreFs { inner: self.inner.clone() };
        self.inner.runtime.spawn(async move {
            this.inner.pending.settled(slot).await;
            serve(&this);
        });
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
                    let dir = self.inner.slot_for(layer.clone(), ino).layer_dir();
                    out.push((layer.path.key.to_string(), dir, FileType::Directory));
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

impl StoreFs {
    fn lookup_now(&self, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
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
                        let slot = inner.slot_for(layer, ino);
                        reply.entry(&NO_TTL, &dir_attr(slot.layer_dir()), Generation(0));
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

    fn getattr_now(&self, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if let Some(slot) = self.model_slot(ino) {
            return slot.fs.serve_getattr(ino, fh, reply);
        }
        match self.control_attr(node_of(ino.0)) {
            Some(attr) => reply.attr(&NO_TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn open_now(&self, unique: u64, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Some(slot) = self.model_slot(ino) {
            return slot.fs.serve_open(unique, ino, flags, reply);
        }
        match self.file_bytes(node_of(ino.0)) {
            Some(_) => reply.opened(FileHandle(0), super::OPEN_FLAGS),
            None => reply.error(Errno::EISDIR),
        }
    }

    fn read_now(&self, ino: INodeNo, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
        if let Some(slot) = self.model_slot(ino) {
            return slot.fs.serve_read(ino, fh, offset, size, reply);
        }
        let Some(bytes) = self.file_bytes(node_of(ino.0)) else {
            // A model's file whose layer is gone (given up after a restart) cannot be read.
            return reply.error(if matches!(node_of(ino.0), Node::Model(_)) { Errno::EIO } else { Errno::EBADF });
        };
        let start = (offset as usize).min(bytes.len());
        let end = start.saturating_add(size as usize).min(bytes.len());
        reply.data(&bytes[start..end]);
    }

    fn opendir_now(&self, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if let Some(slot) = self.model_slot(ino) {
            return slot.fs.serve_opendir(ino, flags, reply);
        }
        match self.control_attr(node_of(ino.0)) {
            Some(attr) if attr.kind == FileType::Directory => reply.opened(FileHandle(0), FopenFlags::empty()),
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir_now(&self, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
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
}

impl Slot {
    fn layer_dir(&self) -> u64 {
        layer_ino(self.number, LAYER_DIR)
    }
}

impl Filesystem for StoreFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        negotiate(config, false);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let name: OsString = name.to_owned();
        self.when_ready(parent, move |fs| fs.lookup_now(parent, &name, reply));
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.when_ready(ino, move |fs| fs.getattr_now(ino, fh, reply));
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.when_ready(ino, move |fs| match fs.model_slot(ino) {
            Some(slot) => slot.fs.serve_readlink(ino, reply),
            None => reply.error(Errno::EINVAL),
        });
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
        self.when_ready(parent, move |fs| {
            let Some(slot) = fs.inner.slot(id) else { return reply.error(Errno::ENOENT) };
            if let Err(e) = fs.inner.store.use_layer(&slot.layer.path) {
                tracing::warn!(error = %e, "cannot count a use of a layer");
            }
            reply.error(Errno::ENOENT);
        });
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
            Ok(Released::Dropped(id)) => self.inner.drop_layer(id),
            Ok(Released::Used(_) | Released::Unknown) => {}
            Err(e) => tracing::warn!(error = %e, "cannot count a release of a layer"),
        }
        reply.error(Errno::ENOENT);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let unique = req.unique().0;
        self.when_ready(ino, move |fs| fs.open_now(unique, ino, flags, reply));
        self.inner.compact();
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
        self.when_ready(ino, move |fs| fs.read_now(ino, fh, offset, size, reply));
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
        self.when_ready(ino, move |fs| match fs.model_slot(ino) {
            Some(slot) => slot.fs.serve_release(ino, fh, reply),
            None => reply.ok(),
        });
        self.inner.compact();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.when_ready(ino, move |fs| fs.opendir_now(ino, flags, reply));
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.when_ready(ino, move |fs| fs.readdir_now(ino, fh, offset, reply));
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.when_ready(ino, move |fs| match fs.model_slot(ino) {
            Some(slot) => slot.fs.serve_statfs(ino, reply),
            None => reply.statfs(0, 0, 0, 0, 0, BLOCK_SIZE, 255, BLOCK_SIZE),
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        let name: OsString = name.to_owned();
        self.when_ready(ino, move |fs| match fs.model_slot(ino) {
            Some(slot) => slot.fs.serve_getxattr(ino, &name, size, reply),
            None => reply.error(Errno::ENODATA),
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        self.when_ready(ino, move |fs| match fs.model_slot(ino) {
            Some(slot) => slot.fs.serve_listxattr(ino, size, reply),
            None if size == 0 => reply.size(0),
            None => reply.data(&[]),
        });
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

/// The layer store's session while it is mounted.
#[derive(Debug)]
pub struct StoreMount {
    inner: Arc<Inner>,
    mounted: Mounted,
    keeper: Option<Arc<dyn Keeper>>,
}

impl StoreMount {
    /// Whether the session is kept for the next process: a restart then leaves it
    /// mounted.
    pub fn is_kept(&self) -> bool {
        self.inner.kept.get().is_some()
    }

    /// Unmounts the store (a stop for good, or a restart that cannot hand it over): the
    /// keeper lets it go first, so that no successor takes over a connection being
    /// unmounted.
    pub fn unmount(self) {
        if let (Some(keeper), Some(kept)) = (&self.keeper, self.inner.kept.get()) {
            takeover::let_go(keeper.as_ref(), &self.mounted.mountpoint, kept);
        }
        self.inner.pending.settle_all();
        self.mounted.unmount();
    }
}

/// The journal of the layer store's session.
fn journal_path(keeper: &dyn Keeper) -> PathBuf {
    keeper.state_dir().join("store.journal")
}

/// Mounts the layer store at `mountpoint` (created if missing): nosuid, nodev, for root
/// only, writable only in the ways containers/storage counts users. With a `keeper`, the
/// session a previous process kept there is taken over (its layers waiting at most
/// `wait` to be served again), and the new one is kept for the next process; a mount
/// left there otherwise is detached.
pub fn mount_store(
    store: Arc<LayerStore>,
    mountpoint: &Path,
    runtime: Handle,
    keeper: Option<Arc<dyn Keeper>>,
    wait: Duration,
) -> Result<StoreMount, FsError> {
    let err = |source| FsError::Mount { path: mountpoint.display().to_string(), source };
    let inner = Arc::new(Inner::new(store, runtime, wait));
    if let Some(keeper) = &keeper {
        match take_over(&inner, keeper.as_ref(), mountpoint) {
            Ok(Some(mounted)) => return Ok(StoreMount { inner, mounted, keeper: Some(keeper.clone()) }),
            Ok(None) => {}
            Err(cause) => {
                tracing::warn!(path = %mountpoint.display(), %cause, "cannot take over the layer store's session; mounting it again")
            }
        }
    }
    // Whatever an earlier process left here is nobody's now (never asked anything: a
    // stat of a mount nobody serves would wait for ever).
    if is_mountpoint(mountpoint) {
        tracing::warn!(path = %mountpoint.display(), "detaching the layer store a previous process left");
        detach(mountpoint).map_err(err)?;
    }
    std::fs::create_dir_all(mountpoint).map_err(err)?;
    let conn = connection::mount(mountpoint, "modelpack-layer-store", false, false).map_err(err)?;
    let fs = StoreFs { inner: inner.clone() };
    let (session, reply) = match connection::serve(fs, &conn.dev, &conn.init, false, 1, SessionACL::Owner) {
        Ok(served) => served,
        Err(e) => {
            let _ = detach(mountpoint);
            return Err(err(e));
        }
    };
    let mounted = Mounted { session: Some(session), mountpoint: mountpoint.to_owned(), model: None };
    if let Some(keeper) = &keeper {
        if connection::can_resend(&conn.init) {
            match takeover::keep(keeper.as_ref(), mountpoint, &journal_path(keeper.as_ref()), &conn, &reply) {
                Ok(kept) => inner.kept.set(kept).expect("a new store"),
                Err(e) => {
                    tracing::warn!(path = %mountpoint.display(), error = %e, "cannot keep the layer store for a restart")
                }
            }
        } else {
            tracing::info!("this kernel cannot send unanswered requests again (Linux 6.9): the layer store is mounted again after a restart");
        }
    }
    Ok(StoreMount { inner, mounted, keeper })
}

/// Takes over the layer store's session a previous process kept at `mountpoint`: None
/// when there is none; an error says why it could not be (it is then let go).
fn take_over(inner: &Arc<Inner>, keeper: &dyn Keeper, mountpoint: &Path) -> Result<Option<Mounted>, String> {
    let Reclaimed { saved, kept } = match takeover::reclaim(keeper, mountpoint, &journal_path(keeper)) {
        Ok(Some(reclaimed)) => reclaimed,
        Ok(None) => return Ok(None),
        Err(refused) => return Err(refused.cause),
    };
    {
        let mut refs = inner.references.lock().expect("references lock");
        for (ino, name) in &saved.directories {
            // A directory whose name this build does not take is not served again.
            let Ok(reference) = crate::layerstore::decode_reference(name) else { continue };
            refs.by_name.insert(name.clone(), *ino);
            refs.by_ino.insert(*ino, (name.clone(), reference));
            refs.next = refs.next.max(ino + 1);
        }
    }
    inner.next.store(saved.slots.keys().max().map_or(1, |s| s + 1), Ordering::Relaxed);
    let dev = kept.dev.clone();
    inner.kept.set(kept).expect("a new store");
    inner.pending.fill(saved.slots.clone());
    let fs = StoreFs { inner: inner.clone() };
    let session = match connection::serve(fs, &dev, &saved.init, true, 1, SessionACL::Owner) {
        Ok((session, _)) => session,
        Err(e) => {
            takeover::let_go(keeper, mountpoint, inner.kept.get().expect("set above"));
            return Err(format!("serving it: {e}"));
        }
    };
    inner.restore_pending();
    tracing::info!(path = %mountpoint.display(), layers = saved.slots.len(), "took over the layer store's session");
    Ok(Some(Mounted { session: Some(session), mountpoint: mountpoint.to_owned(), model: None }))
}
