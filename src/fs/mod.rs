//! The only module that knows FUSE: serves an opened [`Model`] as a read-only
//! filesystem through `fuser`.
//!
//! Content never changes, so attributes and entries carry long timeouts and the kernel
//! page cache is kept across opens (`FOPEN_KEEP_CACHE`): a byte is asked of us once.
//! Reads run on the tokio runtime and reply from there, so one slow fetch never blocks
//! the session loop or other readers. A read whose bytes cannot be fetched or verified
//! gets `EIO` (errors become errno here and nowhere else). [`store`] serves
//! containers/storage's additional layer store, with models inside it.

pub mod connection;
pub mod handover;
pub mod shared;
pub mod store;
mod takeover;

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use fuser::{
    Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig,
    MountOption, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen,
    ReplyStatfs, Request, SessionACL,
};
use tokio::runtime::Handle;

use crate::blob::BlobError;
use crate::metrics;
use crate::model::{LayerData, Model};
use crate::modelpack::safetensors::{self, TensorSpans};
use crate::modelpack::tree::{FileSource, Node, NodeKind, ROOT_INO};

/// Entries and attributes never change while mounted.
const TTL: Duration = Duration::from_secs(365 * 24 * 3600);
/// The kernel's read-ahead window and largest read request we ask for. The kernel offers
/// at most its default window (128 KiB) at `INIT`, so the window is widened after the
/// mount through the connection's `read_ahead_kb` (see [`widen_read_ahead`]): 1 MiB reads
/// (the most one FUSE request carries) cost an eighth of the requests, thread hand-offs
/// and replies of 128 KiB ones, and overshoot a random read by at most 1 MiB.
const MAX_READAHEAD: u32 = 1 << 20;
const BLOCK_SIZE: u32 = 4096;
/// Largest safetensors header read for its tensor spans (a read-ahead hint).
const MAX_HINT_HEADER: u64 = 16 << 20;

/// Why mounting failed.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    /// The kernel refused the mount.
    #[error("mounting at {path}: {source}")]
    Mount { path: String, source: std::io::Error },
}

/// Per open file: where the last read ended and how many bytes the reader has read
/// contiguously up to there, to recognise sequential readers; and whether the kernel
/// reads it directly (passthrough).
#[derive(Debug, Default)]
struct OpenFile {
    next_offset: AtomicU64,
    streak: AtomicU64,
    passthrough: bool,
    /// The model's inode, the `OPEN` request answered and, for a raw passthrough
    /// backing id, that id: what a successor must know of it (see [`handover`]).
    ino: u64,
    unique: u64,
    backing: Option<u32>,
}

impl OpenFile {
    /// Records a read of `size` bytes at `offset`; returns how many contiguous bytes the
    /// reader has now read in a row.
    fn record(&self, offset: u64, size: u64) -> u64 {
        let end = offset + size;
        if self.next_offset.swap(end, Ordering::Relaxed) == offset && offset > 0 {
            self.streak.fetch_add(size, Ordering::Relaxed) + size
        } else {
            self.streak.store(size, Ordering::Relaxed);
            size
        }
    }
}

/// Bytes a reader reads in a row before it is a stream: read-ahead starts there, and a
/// reader that jumped to a tensor is read ahead past its end only once it has read this
/// far past it. 4 MiB: four of the kernel's 1 MiB requests, more than `mmap` reads
/// around one fault, so a header, a small tensor or a random read fetches only the
/// chunks it touches, whatever the chunk size.
const STREAM_AFTER: u64 = 4 << 20;

/// How far ahead of a reader to fetch: nothing until it has read [`STREAM_AFTER`] bytes
/// in a row (a header, a small tensor or a random read fetches only what it needs), then
/// the full window, so that a stream keeps several ranged requests in flight.
fn read_ahead_window(streak: u64, max: u64) -> u64 {
    if streak < STREAM_AFTER {
        0
    } else {
        max
    }
}

/// Where read-ahead of a read ending at `end` must stop, when the file's tensor spans are
/// known. A reader whose streak of `streak` bytes began in one tensor (a loader that
/// jumped to it) gets read-ahead up to that tensor's end and no further, until it has
/// read `grace` bytes past it: the kernel's own read-ahead runs on past the reader by up
/// to a couple of its windows, and only a reader that keeps going is a stream. A streak
/// that began in the last kernel window of the tensor before counts as beginning in the
/// next one (the kernel reads whole pages, and reads around an `mmap` fault from before
/// it); one that began outside every tensor (the header) is a stream from the start.
fn read_ahead_stop(spans: Option<&TensorSpans>, end: u64, streak: u64, grace: u64) -> Option<u64> {
    let spans = spans?;
    let began = end.saturating_sub(streak);
    let (_, mut jumped_end) = spans.span_at(began)?;
    if jumped_end - began <= u64::from(MAX_READAHEAD) {
        if let Some((_, next_end)) = spans.span_at(jumped_end) {
            jumped_end = next_end;
        }
    }
    (end <= jumped_end.saturating_add(grace)).then_some(jumped_end)
}

/// The filesystem served for one model.
#[derive(Debug)]
pub struct ModelFs {
    model: Arc<Model>,
    runtime: Handle,
    open_files: Mutex<HashMap<u64, Arc<OpenFile>>>,
    next_fh: AtomicU64,
    readahead_bytes: u64,
    /// Whether the kernel accepted FUSE passthrough at init.
    passthrough: bool,
    /// Where this model's inodes sit among the session's: the kernel's inode number is
    /// `base` + the tree's. 0 for a model mounted on its own; the layer store serves
    /// many models in one session, each in a range of its own.
    base: u64,
    /// The inode `..` of the model's root names (the root itself when mounted alone).
    root_parent: u64,
    /// Per inode: open files served by us (cached) and by the kernel (passthrough), and
    /// the backing file of the latter. The kernel refuses to mix the two modes on one
    /// inode, so an inode switches to passthrough only when no cached open remains.
    modes: Mutex<HashMap<u64, InodeMode>>,
    /// Per safetensors file: its tensor spans, read from its header after the first read
    /// at its start (`None` while being read, or when it could not be).
    tensors: Arc<Mutex<TensorMap>>,
    /// Where this model's opens and releases are journaled, when its session is one a
    /// restarted daemon takes over; passthrough backing ids are then opened on `dev`.
    handover: Option<SlotHandover>,
    /// Handles given out by the process this session was taken over from, by the
    /// `OPEN` request they answered: that request, sent again, gets the same handle.
    resent: Mutex<HashMap<u64, u64>>,
}

/// See [`ModelFs::handover`].
#[derive(Debug)]
pub(crate) struct SlotHandover {
    pub journal: Arc<handover::Journal>,
    pub slot: u32,
    pub dev: Arc<std::os::fd::OwnedFd>,
}

/// The bit the kernel sets in the `unique` of a request it sends again.
const RESENT: u64 = 1 << 63;

/// See [`ModelFs::tensors`].
type TensorMap = HashMap<u64, Option<Arc<TensorSpans>>>;

/// See [`ModelFs::modes`].
#[derive(Debug, Default)]
struct InodeMode {
    cached: usize,
    passthrough: usize,
    backing: Option<Backing>,
}

/// A passthrough backing file registered with the kernel; dropping it closes it.
#[derive(Debug)]
enum Backing {
    /// Registered through `fuser`'s session (a session never handed over).
    Session(fuser::BackingId),
    /// Registered by id on a connection a successor may take over, which then closes it.
    Raw { id: u32, dev: Arc<std::os::fd::OwnedFd> },
}

impl Drop for Backing {
    fn drop(&mut self) {
        if let Backing::Raw { id, dev } = self {
            if let Err(e) = connection::close_backing(dev, *id) {
                tracing::warn!(id = *id, error = %e, "cannot close a passthrough backing file");
            }
        }
    }
}

impl ModelFs {
    /// A filesystem for `model`, running reads on `runtime`.
    pub fn new(model: Arc<Model>, runtime: Handle) -> Self {
        Self::within(model, runtime, 0, ROOT_INO, false)
    }

    /// A filesystem for `model` served inside another one's session: its inodes start at
    /// `base`, its root's `..` is `root_parent`, and `passthrough` is what that session's
    /// kernel accepted.
    pub(crate) fn within(model: Arc<Model>, runtime: Handle, base: u64, root_parent: u64, passthrough: bool) -> Self {
        let readahead_bytes = model.store.chunk_size() * model.store.readahead_chunks();
        Self {
            model,
            runtime,
            open_files: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            readahead_bytes,
            passthrough,
            modes: Mutex::new(HashMap::new()),
            tensors: Arc::default(),
            base,
            root_parent,
            handover: None,
            resent: Mutex::default(),
        }
    }

    /// Journals this model's opens and releases as slot `slot` of a session a restarted
    /// daemon takes over, with passthrough backing ids opened on `dev`.
    pub(crate) fn handed_over(mut self, handover: SlotHandover) -> Self {
        self.handover = Some(handover);
        self
    }

    /// Takes over the file handles a previous process gave out in this model's slot
    /// (and the passthrough backing ids they read through).
    pub(crate) fn adopt_opens(&self, opens: &std::collections::BTreeMap<u64, handover::SavedOpen>) {
        let Some(dev) = self.handover.as_ref().map(|h| h.dev.clone()) else { return };
        let mut files = self.open_files.lock().expect("open files lock");
        let mut modes = self.modes.lock().expect("modes lock");
        let mut resent = self.resent.lock().expect("resent lock");
        for (fh, open) in opens {
            let file = OpenFile {
                passthrough: open.backing.is_some(),
                ino: open.ino,
                unique: open.unique,
                backing: open.backing,
                ..OpenFile::default()
            };
            files.insert(*fh, Arc::new(file));
            let mode = modes.entry(open.ino).or_default();
            match open.backing {
                Some(id) => {
                    mode.passthrough += 1;
                    if mode.backing.is_none() {
                        mode.backing = Some(Backing::Raw { id, dev: dev.clone() });
                    }
                }
                None => mode.cached += 1,
            }
            resent.insert(open.unique, *fh);
            self.next_fh.fetch_max(fh + 1, Ordering::Relaxed);
        }
    }

    /// The journal records of this model's open handles (for a journal rewrite).
    pub(crate) fn open_records(&self, slot: u32) -> Vec<handover::Record> {
        let files = self.open_files.lock().expect("open files lock");
        files
            .iter()
            .map(|(fh, open)| handover::Record::Open {
                slot,
                ino: open.ino,
                fh: *fh,
                unique: open.unique,
                backing: open.backing,
            })
            .collect()
    }

    fn journal(&self, record: impl FnOnce(u32) -> handover::Record) {
        if let Some(handover) = &self.handover {
            handover.journal.append(&record(handover.slot));
        }
    }

    /// The tree's inode for the kernel's `ino`.
    fn local(&self, ino: INodeNo) -> u64 {
        ino.0.wrapping_sub(self.base)
    }

    /// The kernel's inode for the tree's `ino`.
    fn global(&self, ino: u64) -> INodeNo {
        INodeNo(self.base + ino)
    }

    /// The attributes of the model's root directory.
    pub(crate) fn root_attr(&self) -> FileAttr {
        self.attr(self.model.tree.get(ROOT_INO).expect("a tree has a root"))
    }

    fn attr(&self, node: &Node) -> FileAttr {
        let kind = match node.kind {
            NodeKind::Dir { .. } => FileType::Directory,
            NodeKind::File(_) => FileType::RegularFile,
            NodeKind::Symlink(_) => FileType::Symlink,
        };
        let nlink = match &node.kind {
            NodeKind::Dir { children } => {
                2 + children.values().filter(|c| self.model.tree.get(**c).is_some_and(is_dir)).count() as u32
            }
            _ => 1,
        };
        FileAttr {
            ino: self.global(node.ino),
            size: node.size,
            blocks: node.size.div_ceil(512),
            atime: node.mtime,
            mtime: node.mtime,
            ctime: node.mtime,
            crtime: node.mtime,
            kind,
            perm: node.mode as u16,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }
}

impl ModelFs {
    /// The complete, verified blob file behind inode `ino`, if it is a whole raw-layer
    /// blob that has one.
    fn complete_file(&self, ino: u64) -> Option<std::fs::File> {
        let Some(NodeKind::File(source)) = self.model.tree.get(ino).map(|n| &n.kind) else { return None };
        let LayerData::Remote(blob) = &self.model.layers[source.layer] else { return None };
        if source.offset != 0 || source.size != blob.size {
            return None;
        }
        let path = self.model.store.cache().complete_path(&blob.digest)?;
        std::fs::File::open(path).ok()
    }
}

/// How a file is opened: its page cache kept across opens, and no `FLUSH` at its closes
/// (nothing is ever written; Linux 5.16 and later), so that a close never waits for the
/// daemon.
pub(crate) const OPEN_FLAGS: FopenFlags = FopenFlags::FOPEN_KEEP_CACHE.union(FopenFlags::FOPEN_NOFLUSH);
/// [`OPEN_FLAGS`] for a file the kernel reads through a passthrough backing file (whose
/// own page cache serves it).
const OPEN_FLAGS_PASSTHROUGH: FopenFlags = FopenFlags::FOPEN_NOFLUSH;

/// Answers an `OPEN` with handle `fh` read by the kernel through backing id `id`, which
/// stays open (it is closed by id when its last open is released).
fn reply_passthrough(reply: ReplyOpen, fh: u64, id: u32) {
    // SAFETY: `id` is open on this reply's connection (registered by this process or the
    // one it took the connection over from, and not closed while an open uses it); the
    // wrapper is released below without closing it.
    let backing = unsafe { reply.wrap_backing(id) };
    reply.opened_passthrough(FileHandle(fh), OPEN_FLAGS_PASSTHROUGH, &backing);
    backing.into_raw();
}

fn is_dir(node: &Node) -> bool {
    matches!(node.kind, NodeKind::Dir { .. })
}

/// Sets up a session with the kernel: the read-ahead window, and passthrough if `wanted`
/// and the kernel accepts it (returned).
fn negotiate(config: &mut KernelConfig, wanted: bool) -> bool {
    // Older kernels offer less; take what they give.
    let _ = config.set_max_readahead(MAX_READAHEAD);
    // Passthrough backing files live on a plain file system (depth 0); depth 1 leaves
    // room for an overlay mounted on top of this one (container rootfs, volumes).
    wanted
        && config.add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH).is_ok()
        && config.set_max_stack_depth(1).is_ok()
}

/// The one place errors become errno.
fn errno_of(e: &BlobError) -> Errno {
    match e {
        BlobError::OutOfRange { .. } => Errno::EINVAL,
        _ => Errno::EIO,
    }
}

/// The errno of a layer store lookup that serves nothing: always "not there", whatever
/// the cause, since that is what makes containers/storage download the layer itself.
fn store_errno(_e: &crate::layerstore::StoreError) -> Errno {
    Errno::ENOENT
}

/// Reads `size` bytes at `offset` of a file.
async fn read_file(model: &Model, source: &FileSource, offset: u64, size: u64) -> Result<Bytes, BlobError> {
    if offset >= source.size {
        return Ok(Bytes::new());
    }
    let len = size.min(source.size - offset);
    match &model.layers[source.layer] {
        LayerData::Remote(blob) => model.store.read(blob, source.offset + offset, len).await,
        LayerData::Local(file) => {
            let file = file.clone();
            let at = source.offset + offset;
            tokio::task::spawn_blocking(move || {
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, at).map(|()| Bytes::from(buf))
            })
            .await
            .map_err(|e| BlobError::Task(e.to_string()))?
            .map_err(|e| BlobError::Task(format!("reading unpacked layer: {e}")))
        }
    }
}

/// Reads the tensor spans of file `ino` (see [`tensor_spans`]) into `tensors`.
async fn load_tensor_spans(model: Arc<Model>, source: FileSource, ino: u64, tensors: Arc<Mutex<TensorMap>>) {
    let spans = tensor_spans(&model, &source).await.map(Arc::new);
    tensors.lock().expect("tensors lock").insert(ino, spans);
}

/// The tensor spans of a safetensors file, from its header (read through the cache,
/// which holds it once the reader has read it); None when the header is not one.
async fn tensor_spans(model: &Model, source: &FileSource) -> Option<TensorSpans> {
    let prefix = read_file(model, source, 0, 8).await.ok()?;
    let len = safetensors::header_len(prefix[..].try_into().ok()?, source.size).ok()?;
    // A hint is not worth fetching more than this for (real headers are a few MiB at
    // most, while the format allows 100 MB).
    if len > MAX_HINT_HEADER {
        return None;
    }
    let header = read_file(model, source, 8, len).await.ok()?;
    match TensorSpans::parse(&header, source.size) {
        Ok(spans) => Some(spans),
        Err(e) => {
            tracing::debug!(reference = %model.reference, error = %e, "no tensor spans: read-ahead ignores tensors");
            None
        }
    }
}

impl ModelFs {
    pub(crate) fn serve_lookup(&self, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str() else { return reply.error(Errno::ENOENT) };
        match self.model.tree.lookup(self.local(parent), name) {
            Some(node) => reply.entry(&TTL, &self.attr(node), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    pub(crate) fn serve_getattr(&self, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.model.tree.get(self.local(ino)) {
            Some(node) => reply.attr(&TTL, &self.attr(node)),
            None => reply.error(Errno::ENOENT),
        }
    }

    pub(crate) fn serve_readlink(&self, ino: INodeNo, reply: ReplyData) {
        match self.model.tree.get(self.local(ino)).map(|n| &n.kind) {
            Some(NodeKind::Symlink(target)) => reply.data(target.as_bytes()),
            Some(_) => reply.error(Errno::EINVAL),
            None => reply.error(Errno::ENOENT),
        }
    }

    pub(crate) fn serve_open(&self, unique: u64, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let ino = self.local(ino);
        match self.model.tree.get(ino).map(|n| &n.kind) {
            Some(NodeKind::File(_)) => {}
            Some(NodeKind::Dir { .. }) => return reply.error(Errno::EISDIR),
            Some(NodeKind::Symlink(_)) => return reply.error(Errno::ELOOP),
            None => return reply.error(Errno::ENOENT),
        }
        if flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        if let Err(e) = self.model.store.check_serving() {
            return reply.error(errno_of(&e));
        }
        if unique & RESENT != 0 {
            // An open the previous process answered too late: the same handle again.
            let answered = self.resent.lock().expect("resent lock").remove(&(unique & !RESENT));
            let open =
                answered.and_then(|fh| Some((fh, self.open_files.lock().expect("open files lock").get(&fh)?.clone())));
            if let Some((fh, open)) = open {
                return match open.backing {
                    Some(id) => reply_passthrough(reply, fh, id),
                    None => reply.opened(FileHandle(fh), OPEN_FLAGS),
                };
            }
        }
        let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
        let mut modes = self.modes.lock().expect("modes lock");
        let mode = modes.entry(ino).or_default();
        let mut raw = None;
        if self.passthrough && mode.cached == 0 {
            if mode.backing.is_none() {
                mode.backing = self.complete_file(ino).and_then(|file| match self.open_backing(&reply, &file) {
                    Ok(backing) => Some(backing),
                    Err(e) => {
                        tracing::debug!(ino, error = %e, "passthrough unavailable; serving reads");
                        None
                    }
                });
            }
            if let Some(backing) = &mode.backing {
                mode.passthrough += 1;
                self.model.store.stats().passthrough_opens.fetch_add(1, Ordering::Relaxed);
                metrics::passthrough_open();
                match backing {
                    Backing::Session(id) => {
                        let open = OpenFile { passthrough: true, ino, unique, ..OpenFile::default() };
                        self.open_files.lock().expect("open files lock").insert(fh, Arc::new(open));
                        return reply.opened_passthrough(FileHandle(fh), OPEN_FLAGS_PASSTHROUGH, id);
                    }
                    Backing::Raw { id, .. } => raw = Some(*id),
                }
            }
        }
        if raw.is_none() {
            mode.cached += 1;
        }
        drop(modes);
        let open = OpenFile { passthrough: raw.is_some(), ino, unique, backing: raw, ..OpenFile::default() };
        self.open_files.lock().expect("open files lock").insert(fh, Arc::new(open));
        // Journaled before the kernel has the handle, with no lock held (a journal
        // rewrite reads the handles under its own lock).
        self.journal(|slot| handover::Record::Open { slot, ino, fh, unique, backing: raw });
        match raw {
            Some(id) => reply_passthrough(reply, fh, id),
            None => reply.opened(FileHandle(fh), OPEN_FLAGS),
        }
    }

    /// Registers `file` as a passthrough backing file: by id on a connection a successor
    /// may take over, else through the session.
    fn open_backing(&self, reply: &ReplyOpen, file: &std::fs::File) -> std::io::Result<Backing> {
        match &self.handover {
            Some(handover) => {
                let id = connection::open_backing(&handover.dev, file)?;
                Ok(Backing::Raw { id, dev: handover.dev.clone() })
            }
            None => reply.open_backing(file).map(Backing::Session),
        }
    }

    pub(crate) fn serve_read(&self, ino: INodeNo, fh: FileHandle, offset: u64, size: u32, reply: ReplyData) {
        // Recorded when dropped: after the reply, on whichever thread sends it.
        let timer = metrics::fuse_read();
        let ino = self.local(ino);
        let Some(node) = self.model.tree.get(ino) else { return reply.error(Errno::EBADF) };
        let NodeKind::File(source) = node.kind else { return reply.error(Errno::EBADF) };
        let open = self.open_files.lock().expect("open files lock").get(&fh.0).cloned();
        let model = self.model.clone();
        let end = offset + u64::from(size);
        // Recorded here, in the order the kernel sent the reads: the tasks below may run
        // in any order.
        let streak = open.map_or(0, |open| open.record(offset, u64::from(size)));
        let ahead = read_ahead_window(streak, self.readahead_bytes);
        // Tensor spans matter only to a read that starts read-ahead, or that may load them.
        let load_spans = offset == 0 && node.name.ends_with(".safetensors");
        let (stop, load_spans) = if ahead > 0 || load_spans {
            let mut tensors = self.tensors.lock().expect("tensors lock");
            let known = tensors.get(&ino).and_then(|spans| spans.clone());
            let stop = if ahead > 0 { read_ahead_stop(known.as_deref(), end, streak, STREAM_AFTER) } else { None };
            let load = load_spans && !tensors.contains_key(&ino);
            if load {
                tensors.insert(ino, None);
            }
            (stop, load)
        } else {
            (None, false)
        };
        let tensors = self.tensors.clone();
        if let LayerData::Remote(blob) = &model.layers[source.layer] {
            if ahead > 0 && end < source.size {
                let until = stop.unwrap_or(source.size).min(end.saturating_add(ahead)).min(source.size);
                if until > end {
                    // Starts fetches on the runtime; waits for none of them.
                    let _runtime = self.runtime.enter();
                    model.store.read_ahead(blob, source.offset + end, until - end, stop.is_none());
                }
            }
            // Bytes a fetch for a reader left in memory are answered from this thread:
            // no hand-off to another one, no read of the cache file.
            let len = u64::from(size).min(source.size.saturating_sub(offset));
            if let Some(data) = model.store.read_in_memory(blob, source.offset + offset, len) {
                reply.data(&data);
                if load_spans {
                    self.runtime.spawn(load_tensor_spans(model, source, ino, tensors));
                }
                return;
            }
        }
        self.runtime.spawn(async move {
            match read_file(&model, &source, offset, u64::from(size)).await {
                Ok(data) => reply.data(&data),
                Err(e) => {
                    tracing::error!(reference = %model.reference, ino, offset, size, error = %e, "read failed");
                    reply.error(errno_of(&e));
                }
            }
            drop(timer);
            if load_spans {
                load_tensor_spans(model, source, ino, tensors).await;
            }
        });
    }

    pub(crate) fn serve_release(&self, ino: INodeNo, fh: FileHandle, reply: ReplyEmpty) {
        let ino = self.local(ino);
        let open = self.open_files.lock().expect("open files lock").remove(&fh.0);
        if open.is_some() {
            // Journaled before the backing id may close: a successor must never reuse
            // an id this process closed.
            self.journal(|slot| handover::Record::Release { slot, fh: fh.0 });
        }
        let mut modes = self.modes.lock().expect("modes lock");
        if let (Some(open), Some(mode)) = (open, modes.get_mut(&ino)) {
            if open.passthrough {
                mode.passthrough = mode.passthrough.saturating_sub(1);
            } else {
                mode.cached = mode.cached.saturating_sub(1);
            }
            if mode.passthrough == 0 && mode.cached == 0 {
                // Dropping the backing id closes it in the kernel.
                modes.remove(&ino);
            }
        }
        reply.ok();
    }

    pub(crate) fn serve_opendir(&self, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.model.tree.get(self.local(ino)) {
            Some(node) if is_dir(node) => {
                reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_CACHE_DIR)
            }
            Some(_) => reply.error(Errno::ENOTDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    pub(crate) fn serve_readdir(&self, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(node) = self.model.tree.get(self.local(ino)) else { return reply.error(Errno::ENOENT) };
        let Some(children) = self.model.tree.children(node.ino) else { return reply.error(Errno::ENOTDIR) };
        let parent = if node.ino == ROOT_INO { INodeNo(self.root_parent) } else { self.global(node.parent) };
        let dots = [(".", self.global(node.ino), FileType::Directory), ("..", parent, FileType::Directory)];
        let entries = dots.into_iter().chain(children.filter_map(|(name, child)| {
            let kind = match self.model.tree.get(child)?.kind {
                NodeKind::Dir { .. } => FileType::Directory,
                NodeKind::File(_) => FileType::RegularFile,
                NodeKind::Symlink(_) => FileType::Symlink,
            };
            Some((name, self.global(child), kind))
        }));
        for (i, (name, child, kind)) in entries.enumerate().skip(offset as usize) {
            if reply.add(child, i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    pub(crate) fn serve_statfs(&self, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.model.tree.total_file_bytes().div_ceil(u64::from(BLOCK_SIZE));
        reply.statfs(blocks, 0, 0, self.model.tree.len() as u64, 0, BLOCK_SIZE, 255, BLOCK_SIZE);
    }

    pub(crate) fn serve_getxattr(&self, _ino: INodeNo, _name: &OsStr, _size: u32, reply: fuser::ReplyXattr) {
        reply.error(Errno::ENODATA);
    }

    pub(crate) fn serve_listxattr(&self, _ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }
}

impl Filesystem for ModelFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.passthrough = negotiate(config, self.model.store.passthrough_wanted());
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.serve_lookup(parent, name, reply);
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        self.serve_getattr(ino, fh, reply);
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.serve_readlink(ino, reply);
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.serve_open(req.unique().0, ino, flags, reply);
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
        self.serve_read(ino, fh, offset, size, reply);
    }

    /// Nothing is ever written, so a close has nothing to flush: every open says so
    /// ([`OPEN_FLAGS`]), and a kernel before 5.16, which does not know that flag, is told
    /// `ENOSYS`, after which it sends no `FLUSH` again on this connection. A close then
    /// never waits for the daemon, above all while a restart has it down (a process that
    /// forks and execs closes every file it holds open here).
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
        self.serve_release(ino, fh, reply);
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.serve_opendir(ino, flags, reply);
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, reply: ReplyDirectory) {
        self.serve_readdir(ino, fh, offset, reply);
    }

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.serve_statfs(ino, reply);
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        self.serve_getxattr(ino, name, size, reply);
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        self.serve_listxattr(ino, size, reply);
    }
}

/// A mounted model; dropping it unmounts, and stops the model's background prefetch.
#[derive(Debug)]
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    mountpoint: std::path::PathBuf,
    /// The model mounted alone here (none for the layer store's session). Its prefetch is
    /// stopped at unmount: a mount detached while files are still open keeps the model
    /// serving them, but nothing more is fetched for it.
    model: Option<std::sync::Weak<Model>>,
}

impl Mounted {
    /// Unmounts, detaching lazily if files are still open.
    pub fn unmount(mut self) {
        self.do_unmount();
    }

    fn do_unmount(&mut self) {
        if let Some(model) = self.model.take().and_then(|m| m.upgrade()) {
            model.stop_prefetch();
        }
        if let Some(session) = self.session.take() {
            drop(session);
        }
        // The session's own unmount fails while files are open; detach then.
        if is_mountpoint(&self.mountpoint) {
            let _ = detach(&self.mountpoint);
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        self.do_unmount();
    }
}

/// Mounts `model` at `mountpoint`: read-only, nosuid, nodev, visible to every user with
/// the kernel checking permissions.
pub fn mount(model: Arc<Model>, mountpoint: &Path, runtime: Handle) -> Result<Mounted, FsError> {
    let options = vec![
        MountOption::FSName(format!("modelpack:{}", model.reference)),
        MountOption::Subtype("modelpack".to_owned()),
        MountOption::RO,
        MountOption::NoSuid,
        MountOption::NoDev,
        MountOption::DefaultPermissions,
    ];
    let weak = Arc::downgrade(&model);
    let mut mounted = spawn(ModelFs::new(model, runtime), mountpoint, options, SessionACL::All)?;
    mounted.model = Some(weak);
    Ok(mounted)
}

/// Mounts `fs` at `mountpoint` with `options`, replacing a dead mount an earlier
/// process left there.
fn spawn(
    fs: impl Filesystem + 'static,
    mountpoint: &Path,
    options: Vec<MountOption>,
    acl: SessionACL,
) -> Result<Mounted, FsError> {
    spawn_with_threads(fs, mountpoint, options, acl, 1)
}

/// [`spawn`], with `threads` threads taking the kernel's requests (each with its own
/// descriptor when there are several).
fn spawn_with_threads(
    fs: impl Filesystem + 'static,
    mountpoint: &Path,
    options: Vec<MountOption>,
    acl: SessionACL,
    threads: usize,
) -> Result<Mounted, FsError> {
    let err = |source| FsError::Mount { path: mountpoint.display().to_string(), source };
    // A daemon killed earlier leaves a dead FUSE mount ("transport endpoint is not connected").
    if is_mountpoint(mountpoint) && is_dead(mountpoint) {
        tracing::warn!(path = %mountpoint.display(), "detaching a stale mount");
        detach(mountpoint).map_err(err)?;
    }
    let mut config = Config::default();
    config.mount_options = options;
    config.acl = acl;
    config.n_threads = Some(threads.max(1));
    config.clone_fd = threads > 1;
    let session = fuser::spawn_mount(fs, mountpoint, &config).map_err(err)?;
    let mounted = Mounted { session: Some(session), mountpoint: mountpoint.to_owned(), model: None };
    if let Err(e) = widen_read_ahead(mountpoint, MAX_READAHEAD) {
        tracing::debug!(path = %mountpoint.display(), error = %e, "kernel read-ahead left at its default");
    }
    Ok(mounted)
}

/// Sets the kernel's read-ahead window of the FUSE connection mounted at `mountpoint`
/// to `bytes`, through `/sys/class/bdi/<major>:<minor>/read_ahead_kb` (root only). The
/// `stat` waits for the session's `INIT`, which would otherwise lower it again.
fn widen_read_ahead(mountpoint: &Path, bytes: u32) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dev = std::fs::metadata(mountpoint)?.dev();
    let path = format!("/sys/class/bdi/{}:{}/read_ahead_kb", libc::major(dev), libc::minor(dev));
    std::fs::write(path, (bytes / 1024).to_string())
}

/// Whether the file system mounted at `path` no longer answers: `statfs` always asks
/// the server, where `stat` may be answered from attributes the kernel cached.
fn is_dead(path: &Path) -> bool {
    let Ok(c) = c_path(path) else { return false };
    let mut buf = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: `c` is a valid NUL-terminated path and `buf` is writable for one `statfs`,
    // both outliving the call.
    let rc = unsafe { libc::statfs(c.as_ptr(), buf.as_mut_ptr()) };
    rc != 0 && std::io::Error::last_os_error().raw_os_error() == Some(libc::ENOTCONN)
}

/// Whether `path` is listed as a mount point in `/proc/self/mountinfo`.
pub fn is_mountpoint(path: &Path) -> bool {
    mount_device(path).is_some()
}

/// The device (`major:minor`) of the topmost mount at `path`, from
/// `/proc/self/mountinfo`: asks nothing of the file system mounted there, which may be
/// one nobody serves yet.
pub fn mount_device(path: &Path) -> Option<String> {
    mount_entry(path).map(|(device, _)| device)
}

/// The device and the root within it (`/` for a whole file system, the directory a bind
/// shows) of the topmost mount at `path`, as [`mount_device`] reads them.
pub fn mount_entry(path: &Path) -> Option<(String, String)> {
    // The parent is resolved, never the mount itself: a `stat` of a FUSE root would wait
    // for its server.
    let absolute = std::path::absolute(path).ok()?;
    let canonical = match (absolute.parent(), absolute.file_name()) {
        (Some(parent), Some(name)) => std::fs::canonicalize(parent).unwrap_or_else(|_| parent.to_owned()).join(name),
        _ => absolute,
    };
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = canonical.to_string_lossy().replace(' ', "\\040");
    info.lines().rev().find_map(|line| {
        let mut fields = line.split(' ');
        let device = fields.nth(2)?;
        let root = fields.next()?;
        (fields.next()? == wanted).then(|| (device.to_owned(), root.to_owned()))
    })
}

/// Bind-mounts `source` at `target`, read-only, nosuid and nodev (a bind takes its flags
/// from a remount of the bind itself).
pub fn bind_read_only(source: &Path, target: &Path) -> std::io::Result<()> {
    let (source, target) = (c_path(source)?, c_path(target)?);
    // SAFETY: both are valid NUL-terminated paths that outlive the calls; null fstype and
    // data are allowed for bind mounts and remounts.
    unsafe {
        if libc::mount(source.as_ptr(), target.as_ptr(), std::ptr::null(), libc::MS_BIND, std::ptr::null()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let flags = libc::MS_REMOUNT | libc::MS_BIND | libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV;
        if libc::mount(std::ptr::null(), target.as_ptr(), std::ptr::null(), flags, std::ptr::null()) != 0 {
            let e = std::io::Error::last_os_error();
            libc::umount2(target.as_ptr(), libc::MNT_DETACH);
            return Err(e);
        }
    }
    Ok(())
}

fn c_path(path: &Path) -> std::io::Result<std::ffi::CString> {
    use std::os::unix::ffi::OsStrExt;
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))
}

/// Lazily detaches a mount (`umount2(MNT_DETACH)`).
pub fn detach(path: &Path) -> std::io::Result<()> {
    let c = c_path(path)?;
    // SAFETY: `c` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_ahead_stops_at_the_end_of_a_tensor_jumped_to() {
        const MIB: u64 = 1 << 20;
        let h = format!(
            r#"{{"a":{{"data_offsets":[0,{}]}},"b":{{"data_offsets":[{},{}]}},"c":{{"data_offsets":[{},{}]}}}}"#,
            8 * MIB,
            8 * MIB,
            24 * MIB,
            24 * MIB,
            40 * MIB
        );
        let base = 8 + h.len() as u64;
        let spans = TensorSpans::parse(h.as_bytes(), base + 40 * MIB).unwrap();
        let (b_start, b_end) = (base + 8 * MIB, base + 24 * MIB);
        let stop = |end, streak| read_ahead_stop(Some(&spans), end, streak, 4 * MIB);
        // A reader that jumped to tensor b: read-ahead stops at b's end...
        assert_eq!(stop(b_start + 5 * MIB, 5 * MIB), Some(b_end));
        // ...also when the kernel began a page, or half a read-around window, before it...
        assert_eq!(stop(b_start + 5 * MIB, 5 * MIB + MIB / 2), Some(b_end));
        // ...and while the kernel reads on past b's end; a reader that keeps going streams.
        assert_eq!(stop(b_end + 2 * MIB, 18 * MIB), Some(b_end));
        assert_eq!(stop(b_end + 5 * MIB, 21 * MIB), None);
        // A reader that began in a's middle and streams on into b: read-ahead past a's end
        // only once it is well into b.
        assert_eq!(stop(base + 6 * MIB, 4 * MIB), Some(b_start));
        assert_eq!(stop(b_start + 5 * MIB, 11 * MIB), None);
        // From the header (a copy of the whole file), or spans unknown: no stop.
        assert_eq!(stop(base + 5 * MIB, base + 5 * MIB), None);
        assert_eq!(read_ahead_stop(None, b_start + 5 * MIB, 5 * MIB, 4 * MIB), None);
    }

    #[test]
    fn read_ahead_starts_after_four_mib_in_a_row() {
        let open = OpenFile::default();
        let max = 32 << 20;
        // A header read at the start, then a jump: no read-ahead.
        assert_eq!(read_ahead_window(open.record(0, 1 << 20), max), 0);
        assert_eq!(read_ahead_window(open.record(1 << 30, 1 << 20), max), 0);
        // A sequential stream: full read-ahead once 4 MiB were read in a row.
        let mut offset = 1 << 30;
        let mut windows = Vec::new();
        for _ in 0..8 {
            offset += 1 << 20;
            windows.push(read_ahead_window(open.record(offset, 1 << 20), max));
        }
        assert_eq!(windows, [0, 0, max, max, max, max, max, max]);
    }
}
