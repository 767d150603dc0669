//! One FUSE session serving many models: the snapshotter's model snapshots. The session
//! is mounted at a private directory; each model is a directory of its root,
//! `<session>/<slot>`, served by its own [`ModelFs`] inside the session, and is
//! bind-mounted read-only (nosuid, nodev) where it is used (a snapshot's `fs`
//! directory). A session per model cost two threads and a 16 MiB request buffer each;
//! one session costs that once, however many models it serves.
//!
//! The session is mounted with the first model and unmounted after the last, so a daemon
//! serving no model keeps no session. Inodes: the root is 1; a model's inodes are its
//! tree's, offset by `slot << 32`. Slots are never reused within a session, so an inode
//! never changes meaning, and the root's entries expire at once: a detached model is
//! never reached through a stale entry. A model leaves the session when its bind is
//! detached; a file still open through it (containerd removes a model snapshot only
//! after its children, so only a leaked mount can hold one) then fails.
//!
//! After a crash the session's mount and every bind of it are dead ("transport endpoint
//! is not connected"): [`SharedMounts::new`] detaches the session's, and each bind is
//! detached when its model is attached again ([`SharedMounts::attach`]).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, MountOption,
    OpenFlags, ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request,
    SessionACL,
};
use tokio::runtime::Handle;

use super::{bind_read_only, detach, is_dead, is_mountpoint, negotiate, FsError, ModelFs, Mounted, BLOCK_SIZE};
use crate::model::Model;

/// The session's root directory.
const ROOT: u64 = 1;
/// The root's entries (one per model) are asked for again on every walk.
const NO_TTL: Duration = Duration::ZERO;

/// The models of one session, by slot.
#[derive(Debug)]
struct Table {
    models: RwLock<HashMap<u32, Arc<ModelFs>>>,
    /// The next slot; slot 0 is the root's range.
    next: AtomicU32,
    /// Whether passthrough is wanted, and whether the kernel accepted it at init.
    wanted: bool,
    passthrough: AtomicBool,
}

impl Table {
    fn model(&self, ino: INodeNo) -> Option<Arc<ModelFs>> {
        let slot = u32::try_from(ino.0 >> 32).ok().filter(|s| *s != 0)?;
        self.models.read().expect("models lock").get(&slot).cloned()
    }

    fn is_empty(&self) -> bool {
        self.models.read().expect("models lock").is_empty()
    }
}

/// The session's filesystem: the root, and every model's below it.
#[derive(Debug)]
struct SharedFs {
    table: Arc<Table>,
}

fn root_attr() -> FileAttr {
    FileAttr {
        ino: INodeNo(ROOT),
        size: 0,
        blocks: 0,
        atime: SystemTime::UNIX_EPOCH,
        mtime: SystemTime::UNIX_EPOCH,
        ctime: SystemTime::UNIX_EPOCH,
        crtime: SystemTime::UNIX_EPOCH,
        kind: FileType::Directory,
        perm: 0o755,
        nlink: 2,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: BLOCK_SIZE,
        flags: 0,
    }
}

impl Filesystem for SharedFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        self.table.passthrough.store(negotiate(config, self.table.wanted), Ordering::Relaxed);
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            return match self.table.model(parent) {
                Some(fs) => fs.lookup(req, parent, name, reply),
                None => reply.error(Errno::ENOENT),
            };
        }
        // Only a slot's own name: "07" is not slot 7. Slot 0 is never given out.
        let slot = name.to_str().and_then(|n| n.parse::<u32>().ok().filter(|s| s.to_string() == n));
        let model = slot.and_then(|slot| self.table.models.read().expect("models lock").get(&slot).cloned());
        match model {
            Some(fs) => reply.entry(&NO_TTL, &fs.root_attr(), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&NO_TTL, &root_attr());
        }
        match self.table.model(ino) {
            Some(fs) => fs.getattr(req, ino, fh, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readlink(&self, req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.table.model(ino) {
            Some(fs) => fs.readlink(req, ino, reply),
            None => reply.error(Errno::EINVAL),
        }
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.table.model(ino) {
            Some(fs) => fs.open(req, ino, flags, reply),
            None if ino.0 == ROOT => reply.error(Errno::EISDIR),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        lock_owner: Option<fuser::LockOwner>,
        reply: ReplyData,
    ) {
        match self.table.model(ino) {
            Some(fs) => fs.read(req, ino, fh, offset, size, flags, lock_owner, reply),
            None => reply.error(Errno::EIO),
        }
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: fuser::LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn release(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        flags: OpenFlags,
        lock_owner: Option<fuser::LockOwner>,
        flush: bool,
        reply: ReplyEmpty,
    ) {
        match self.table.model(ino) {
            Some(fs) => fs.release(req, ino, fh, flags, lock_owner, flush, reply),
            None => reply.ok(),
        }
    }

    fn opendir(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            return reply.opened(FileHandle(0), FopenFlags::empty());
        }
        match self.table.model(ino) {
            Some(fs) => fs.opendir(req, ino, flags, reply),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn readdir(&self, req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != ROOT {
            return match self.table.model(ino) {
                Some(fs) => fs.readdir(req, ino, fh, offset, reply),
                None => reply.error(Errno::ENOENT),
            };
        }
        let mut slots: Vec<(u32, INodeNo)> = {
            let models = self.table.models.read().expect("models lock");
            models.iter().map(|(slot, fs)| (*slot, fs.root_attr().ino)).collect()
        };
        slots.sort_unstable();
        let dots = [(".".to_owned(), INodeNo(ROOT)), ("..".to_owned(), INodeNo(ROOT))];
        let entries = dots.into_iter().chain(slots.into_iter().map(|(slot, ino)| (slot.to_string(), ino)));
        for (i, (name, child)) in entries.enumerate().skip(offset as usize) {
            if reply.add(child, i as u64 + 1, FileType::Directory, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        match self.table.model(ino) {
            Some(fs) => fs.statfs(req, ino, reply),
            None => reply.statfs(0, 0, 0, 0, 0, BLOCK_SIZE, 255, BLOCK_SIZE),
        }
    }

    fn getxattr(&self, req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        match self.table.model(ino) {
            Some(fs) => fs.getxattr(req, ino, name, size, reply),
            None => reply.error(Errno::ENODATA),
        }
    }

    fn listxattr(&self, req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        match self.table.model(ino) {
            Some(fs) => fs.listxattr(req, ino, size, reply),
            None if size == 0 => reply.size(0),
            None => reply.data(&[]),
        }
    }
}

/// The session while it is mounted.
#[derive(Debug)]
struct Session {
    table: Arc<Table>,
    mounted: Mounted,
}

/// Models served through one FUSE session mounted at a private directory, each
/// bind-mounted where it is used. See the module documentation.
#[derive(Debug)]
pub struct SharedMounts {
    path: PathBuf,
    runtime: Handle,
    passthrough: bool,
    threads: usize,
    session: Mutex<Option<Session>>,
}

impl SharedMounts {
    /// Models served from a session at `path` (created when needed; its parent must be
    /// private to root), reading on `runtime`, with FUSE passthrough if `passthrough` and
    /// the kernel accepts it, and `threads` threads taking the kernel's requests. A dead
    /// session a crashed process left at `path` is detached.
    pub fn new(path: &Path, runtime: Handle, passthrough: bool, threads: usize) -> Result<Self, FsError> {
        if is_mountpoint(path) {
            tracing::warn!(path = %path.display(), "detaching the model session a previous process left");
            detach(path).map_err(|source| FsError::Mount { path: path.display().to_string(), source })?;
        }
        Ok(Self { path: path.to_owned(), runtime, passthrough, threads: threads.max(1), session: Mutex::new(None) })
    }

    /// Serves `model` at `target` (an existing directory): mounts the session if no
    /// model is served yet, adds the model to it and bind-mounts its directory at
    /// `target`, replacing a dead mount an earlier process left there.
    pub fn attach(self: &Arc<Self>, model: Arc<Model>, target: &Path) -> Result<Attached, FsError> {
        let err = |path: &Path| {
            let path = path.display().to_string();
            move |source| FsError::Mount { path, source }
        };
        if is_mountpoint(target) && is_dead(target) {
            tracing::warn!(path = %target.display(), "detaching a stale mount");
            detach(target).map_err(err(target))?;
        }
        let mut session = self.session.lock().expect("session lock");
        if session.is_none() {
            *session = Some(self.mount_session()?);
        }
        let Session { table, .. } = session.as_ref().expect("mounted above");
        let slot = table
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_add(1))
            .map_err(|_| err(&self.path)(std::io::Error::other("no model slot left in this session")))?;
        let fs = ModelFs::within(
            model,
            self.runtime.clone(),
            u64::from(slot) << 32,
            ROOT,
            table.passthrough.load(Ordering::Relaxed),
        );
        table.models.write().expect("models lock").insert(slot, Arc::new(fs));
        let table = table.clone();
        if let Err(e) = bind_read_only(&self.path.join(slot.to_string()), target) {
            table.models.write().expect("models lock").remove(&slot);
            self.unmount_if_idle(&mut session);
            return Err(err(target)(e));
        }
        Ok(Attached { owner: self.clone(), table, slot, target: target.to_owned(), attached: true })
    }

    fn mount_session(&self) -> Result<Session, FsError> {
        let err = |source| FsError::Mount { path: self.path.display().to_string(), source };
        std::fs::create_dir_all(&self.path).map_err(err)?;
        let table = Arc::new(Table {
            models: RwLock::new(HashMap::new()),
            next: AtomicU32::new(1),
            wanted: self.passthrough,
            passthrough: AtomicBool::new(false),
        });
        let options = vec![
            MountOption::FSName("modelpack-models".to_owned()),
            MountOption::Subtype("modelpack".to_owned()),
            MountOption::RO,
            MountOption::NoSuid,
            MountOption::NoDev,
            MountOption::DefaultPermissions,
        ];
        let fs = SharedFs { table: table.clone() };
        let mounted = super::spawn_with_threads(fs, &self.path, options, SessionACL::All, self.threads)?;
        tracing::info!(path = %self.path.display(), threads = self.threads, "model session mounted");
        Ok(Session { table, mounted })
    }

    /// Unmounts the session when it serves no model any more.
    fn unmount_if_idle(&self, session: &mut Option<Session>) {
        if session.as_ref().is_some_and(|s| s.table.is_empty()) {
            if let Some(idle) = session.take() {
                tracing::info!(path = %self.path.display(), "model session unmounted: it serves no model");
                idle.mounted.unmount();
            }
        }
    }
}

/// A model served through a [`SharedMounts`] session and bound at its target; dropping
/// it detaches the bind and takes the model out of the session.
#[derive(Debug)]
pub struct Attached {
    owner: Arc<SharedMounts>,
    table: Arc<Table>,
    slot: u32,
    target: PathBuf,
    attached: bool,
}

impl Attached {
    /// The model served, while it is attached.
    pub fn model(&self) -> Option<Arc<Model>> {
        self.table.models.read().expect("models lock").get(&self.slot).map(|fs| fs.model.clone())
    }

    /// Detaches the model's bind (lazily, if files are still open) and takes the model
    /// out of the session; the session goes with its last model.
    pub fn unmount(mut self) {
        self.detach();
    }

    fn detach(&mut self) {
        if !std::mem::take(&mut self.attached) {
            return;
        }
        if is_mountpoint(&self.target) {
            if let Err(e) = detach(&self.target) {
                tracing::warn!(path = %self.target.display(), error = %e, "cannot detach a model");
            }
        }
        let gone = self.table.models.write().expect("models lock").remove(&self.slot);
        if let Some(fs) = gone {
            fs.model.stop_prefetch();
        }
        let mut session = self.owner.session.lock().expect("session lock");
        // Only the session this model was in: another may have been mounted since.
        if session.as_ref().is_some_and(|s| Arc::ptr_eq(&s.table, &self.table)) {
            self.owner.unmount_if_idle(&mut session);
        }
    }
}

impl Drop for Attached {
    fn drop(&mut self) {
        self.detach();
    }
}
