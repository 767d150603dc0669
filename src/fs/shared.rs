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
//! **Restarts.** With a [`Keeper`], the session's connection is kept for the next
//! process and journaled ([`super::handover`]); [`SharedMounts::new`] takes it over: the
//! mount, every bind and every open file stay as they are, and each slot waits for its
//! model to be attached again ([`SharedMounts::attach`] at the same target, with the same
//! tree). Until then, requests for the slot wait (at most the restore wait) instead of
//! failing. A kernel before 6.9, a journal of another version, or a session the keeper
//! does not hold, is not taken over: its mount is detached, and each model's bind when
//! its model is attached again, in a new session.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, OpenFlags,
    ReplyAttr, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, Request, SessionACL,
};
use tokio::runtime::Handle;

use super::handover::{Keeper, Record, Saved};
use super::takeover::{self, fingerprint, Kept, Pending, Reclaimed, Refused};
use super::{bind_read_only, connection, detach, is_mountpoint, negotiate, FsError, ModelFs, Mounted, BLOCK_SIZE};
use crate::model::Model;

/// The session's root directory.
const ROOT: u64 = 1;
/// The root's entries (one per model) are asked for again on every walk.
const NO_TTL: Duration = Duration::ZERO;

/// The models of one session, by slot.
#[derive(Debug)]
struct Table {
    models: RwLock<HashMap<u32, Arc<ModelFs>>>,
    /// Where each model is bound and its tree's fingerprint (for the journal).
    bound: Mutex<HashMap<u32, (PathBuf, String)>>,
    /// Slots a previous process served whose models are not attached again yet.
    pending: Pending,
    /// The next slot; slot 0 is the root's range.
    next: AtomicU32,
    /// Whether passthrough is wanted, and whether the kernel accepted it at init.
    wanted: bool,
    passthrough: AtomicBool,
    /// The journal and connection of a session kept for the next process.
    kept: OnceLock<Kept>,
    runtime: Handle,
}

impl Table {
    fn new(wanted: bool, runtime: Handle, wait: Duration) -> Self {
        Self {
            models: RwLock::new(HashMap::new()),
            bound: Mutex::default(),
            pending: Pending::new(wait),
            next: AtomicU32::new(1),
            wanted,
            passthrough: AtomicBool::new(false),
            kept: OnceLock::new(),
            runtime,
        }
    }

    fn slot_of(ino: INodeNo) -> Option<u32> {
        u32::try_from(ino.0 >> 32).ok().filter(|s| *s != 0)
    }

    fn model(&self, slot: u32) -> Option<Arc<ModelFs>> {
        self.models.read().expect("models lock").get(&slot).cloned()
    }

    /// Calls `serve` with the model of `slot` (None when there is none): at once, or, for
    /// a slot a previous process served whose model is not attached again yet, once it
    /// is (or the wait is over), on the runtime.
    fn with_slot(self: &Arc<Self>, slot: Option<u32>, serve: impl FnOnce(Option<&ModelFs>) + Send + 'static) {
        let Some(slot) = slot else { return serve(None) };
        if let Some(fs) = self.model(slot) {
            return serve(Some(&fs));
        }
        if !self.pending.contains(slot) {
            return serve(None);
        }
        let table = self.clone();
        self.runtime.spawn(async move {
            table.pending.settled(slot).await;
            serve(table.model(slot).as_deref());
        });
    }

    fn with_model(self: &Arc<Self>, ino: INodeNo, serve: impl FnOnce(Option<&ModelFs>) + Send + 'static) {
        self.with_slot(Self::slot_of(ino), serve);
    }

    fn is_idle(&self) -> bool {
        self.models.read().expect("models lock").is_empty() && self.pending.is_empty()
    }

    fn journal(&self, record: &Record) {
        if let Some(kept) = self.kept.get() {
            kept.journal.append(record);
        }
    }

    /// Rewrites the journal from the live state when it has grown long.
    fn compact(&self) {
        let Some(kept) = self.kept.get() else { return };
        kept.compact(|| {
            let mut records = Vec::new();
            let bound = self.bound.lock().expect("bound lock").clone();
            for (slot, fs) in self.models.read().expect("models lock").iter() {
                let Some((target, fingerprint)) = bound.get(slot) else { continue };
                records.push(Record::Attach { slot: *slot, target: target.clone(), fingerprint: fingerprint.clone() });
                records.extend(fs.open_records(*slot));
            }
            records.extend(self.pending.records());
            records
        });
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

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent.0 != ROOT {
            let name = name.to_owned();
            return self.table.with_model(parent, move |fs| match fs {
                Some(fs) => fs.serve_lookup(parent, &name, reply),
                None => reply.error(Errno::ENOENT),
            });
        }
        // Only a slot's own name: "07" is not slot 7. Slot 0 is never given out.
        let slot = name.to_str().and_then(|n| n.parse::<u32>().ok().filter(|s| s.to_string() == n));
        self.table.with_slot(slot.filter(|s| *s != 0), move |fs| match fs {
            Some(fs) => reply.entry(&NO_TTL, &fs.root_attr(), Generation(0)),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino.0 == ROOT {
            return reply.attr(&NO_TTL, &root_attr());
        }
        self.table.with_model(ino, move |fs| match fs {
            Some(fs) => fs.serve_getattr(ino, fh, reply),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        self.table.with_model(ino, move |fs| match fs {
            Some(fs) => fs.serve_readlink(ino, reply),
            None => reply.error(Errno::EINVAL),
        });
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            return reply.error(Errno::EISDIR);
        }
        let unique = req.unique().0;
        self.table.with_model(ino, move |fs| match fs {
            Some(fs) => fs.serve_open(unique, ino, flags, reply),
            None => reply.error(Errno::ENOENT),
        });
        self.table.compact();
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
        self.table.with_model(ino, move |fs| match fs {
            Some(fs) => fs.serve_read(ino, fh, offset, size, reply),
            None => reply.error(Errno::EIO),
        });
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
        self.table.with_model(ino, move |fs| match fs {
            Some(fs) => fs.serve_release(ino, fh, reply),
            None => reply.ok(),
        });
        self.table.compact();
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if ino.0 == ROOT {
            return reply.opened(FileHandle(0), FopenFlags::empty());
        }
        self.table.with_model(ino, move |fs| match fs {
            Some(fs) => fs.serve_opendir(ino, flags, reply),
            None => reply.error(Errno::ENOENT),
        });
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        if ino.0 != ROOT {
            return self.table.with_model(ino, move |fs| match fs {
                Some(fs) => fs.serve_readdir(ino, fh, offset, reply),
                None => reply.error(Errno::ENOENT),
            });
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

    fn statfs(&self, _req: &Request, ino: INodeNo, reply: ReplyStatfs) {
        self.table.with_model(ino, move |fs| match fs {
            Some(fs) => fs.serve_statfs(ino, reply),
            None => reply.statfs(0, 0, 0, 0, 0, BLOCK_SIZE, 255, BLOCK_SIZE),
        });
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: fuser::ReplyXattr) {
        let name = name.to_owned();
        self.table.with_model(ino, move |fs| match fs {
            Some(fs) => fs.serve_getxattr(ino, &name, size, reply),
            None => reply.error(Errno::ENODATA),
        });
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: fuser::ReplyXattr) {
        self.table.with_model(ino, move |fs| match fs {
            Some(fs) => fs.serve_listxattr(ino, size, reply),
            None if size == 0 => reply.size(0),
            None => reply.data(&[]),
        });
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
    /// Names the session: its file system (`modelpack-<name>`) and its journal.
    name: &'static str,
    runtime: Handle,
    passthrough: bool,
    threads: usize,
    /// How long a request for a model served before a restart waits for it.
    wait: Duration,
    keeper: Option<Arc<dyn Keeper>>,
    session: Mutex<Option<Session>>,
}

impl SharedMounts {
    /// Models served from a session at `path` (created when needed; its parent must be
    /// private to root), reading on `runtime`, with FUSE passthrough if `passthrough` and
    /// the kernel accepts it, and `threads` threads taking the kernel's requests. With a
    /// `keeper`, the session is kept for the next process, and the one a previous process
    /// kept is taken over, its models waiting at most `wait` to be attached again; any
    /// other session a previous process left at `path` is detached. `name` names the
    /// session's file system (`modelpack-<name>`) and journal (`<name>.journal`).
    pub fn new(
        path: &Path,
        name: &'static str,
        runtime: Handle,
        passthrough: bool,
        threads: usize,
        wait: Duration,
        keeper: Option<Arc<dyn Keeper>>,
    ) -> Result<Self, FsError> {
        let this = Self {
            path: path.to_owned(),
            name,
            runtime,
            passthrough,
            threads: threads.max(1),
            wait,
            keeper,
            session: Mutex::new(None),
        };
        if let Some(keeper) = &this.keeper {
            match this.take_over(keeper.as_ref()) {
                Ok(Some(session)) => {
                    *this.session.lock().expect("session lock") = Some(session);
                    return Ok(this);
                }
                Ok(None) => {}
                Err(cause) => {
                    tracing::warn!(path = %path.display(), %cause, "cannot take over the model session; its models are mounted again");
                }
            }
        }
        if is_mountpoint(path) {
            tracing::warn!(path = %path.display(), "detaching the model session a previous process left");
            detach(path).map_err(|source| FsError::Mount { path: path.display().to_string(), source })?;
        }
        Ok(this)
    }

    fn journal_path(&self, keeper: &dyn Keeper) -> PathBuf {
        keeper.state_dir().join(format!("{}.journal", self.name))
    }

    /// Whether `target` is where a model the previous process served waits to be
    /// attached again (its bind is then the session's to keep or replace).
    pub fn is_pending(&self, target: &Path) -> bool {
        let session = self.session.lock().expect("session lock");
        session.as_ref().is_some_and(|s| s.table.pending.at(target).is_some())
    }

    /// Takes over the session a previous process kept: None when there is none. An
    /// error says why one could not be taken over; it is then let go, and the binds of
    /// its models are detached.
    fn take_over(&self, keeper: &dyn Keeper) -> Result<Option<Session>, String> {
        let detach_binds = |saved: &Option<Box<Saved>>| {
            let targets = saved.iter().flat_map(|s| s.slots.values().map(|slot| &slot.target));
            for target in targets.filter(|t| t.is_absolute() && is_mountpoint(t)) {
                let _ = detach(target);
            }
        };
        let Reclaimed { saved, kept } = match takeover::reclaim(keeper, &self.path, &self.journal_path(keeper)) {
            Ok(Some(reclaimed)) => reclaimed,
            Ok(None) => return Ok(None),
            Err(Refused { cause, saved }) => {
                detach_binds(&saved);
                return Err(cause);
            }
        };
        let table = Arc::new(Table::new(self.passthrough, self.runtime.clone(), self.wait));
        let next = saved.slots.keys().max().map_or(1, |s| s + 1);
        table.next.store(next, Ordering::Relaxed);
        let dev = kept.dev.clone();
        table.kept.set(kept).expect("a new table");
        table.pending.fill(saved.slots.clone());
        let fs = SharedFs { table: table.clone() };
        let (session, _) = match connection::serve(fs, &dev, &saved.init, true, self.threads, SessionACL::All) {
            Ok(served) => served,
            Err(e) => {
                takeover::let_go(keeper, &self.path, table.kept.get().expect("set above"));
                detach_binds(&Some(Box::new(saved)));
                return Err(format!("serving it: {e}"));
            }
        };
        // What the kernel was told at INIT stands, whatever this process would ask.
        table.passthrough.store(connection::reply_passthrough(&saved.reply), Ordering::Relaxed);
        tracing::info!(path = %self.path.display(), models = saved.slots.len(), "took over the model session");
        Ok(Some(Session {
            table,
            mounted: Mounted { session: Some(session), mountpoint: self.path.clone(), model: None },
        }))
    }

    /// Serves `model` at `target` (an existing directory): mounts the session if no
    /// model is served yet, adds the model to it and bind-mounts its directory at
    /// `target`, replacing a mount an earlier process left there. A model the process
    /// before a restart served at `target`, with the same tree, is taken over as it is.
    pub fn attach(self: &Arc<Self>, model: Arc<Model>, target: &Path) -> Result<Attached, FsError> {
        let err = |path: &Path| {
            let path = path.display().to_string();
            move |source| FsError::Mount { path, source }
        };
        let mut session = self.session.lock().expect("session lock");
        if let Some(adopted) = session.as_ref().and_then(|s| self.adopt(s, &model, target)) {
            return adopted;
        }
        if is_mountpoint(target) {
            tracing::warn!(path = %target.display(), "detaching a stale mount");
            detach(target).map_err(err(target))?;
        }
        if session.is_none() {
            *session = Some(self.mount_session()?);
        }
        let Session { table, .. } = session.as_ref().expect("mounted above");
        let slot = table
            .next
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |s| s.checked_add(1))
            .map_err(|_| err(&self.path)(std::io::Error::other("no model slot left in this session")))?;
        let fingerprint = if table.kept.get().is_some() { fingerprint(&model) } else { String::new() };
        let fs = self.model_fs(table, model, slot);
        table.models.write().expect("models lock").insert(slot, Arc::new(fs));
        table.bound.lock().expect("bound lock").insert(slot, (target.to_owned(), fingerprint.clone()));
        table.journal(&Record::Attach { slot, target: target.to_owned(), fingerprint });
        let table = table.clone();
        if let Err(e) = bind_read_only(&self.path.join(slot.to_string()), target) {
            table.models.write().expect("models lock").remove(&slot);
            table.bound.lock().expect("bound lock").remove(&slot);
            table.journal(&Record::Detach { slot });
            self.unmount_if_idle(&mut session);
            return Err(err(target)(e));
        }
        Ok(Attached { owner: self.clone(), table, slot, target: target.to_owned(), attached: true })
    }

    /// Attaches `model` again in the slot the process before a restart served it in at
    /// `target`, if there is one and the model's tree is the same; a slot whose model
    /// changed is given up (its open files fail) and None returned.
    fn adopt(
        self: &Arc<Self>,
        session: &Session,
        model: &Arc<Model>,
        target: &Path,
    ) -> Option<Result<Attached, FsError>> {
        let table = &session.table;
        let (slot, saved) = table.pending.at(target)?;
        let fingerprint = fingerprint(model);
        if fingerprint != saved.fingerprint {
            tracing::warn!(path = %target.display(), "the model served here before the restart has another tree now; mounting it afresh (files open in it fail)");
            table.pending.settle(slot);
            table.journal(&Record::Detach { slot });
            return None;
        }
        let fs = self.model_fs(table, model.clone(), slot);
        fs.adopt_opens(&saved.opens);
        table.models.write().expect("models lock").insert(slot, Arc::new(fs));
        table.bound.lock().expect("bound lock").insert(slot, (target.to_owned(), fingerprint));
        table.pending.settle(slot);
        if !is_mountpoint(target) {
            // Killed between journaling the slot and binding it.
            if let Err(e) = bind_read_only(&self.path.join(slot.to_string()), target) {
                let path = target.display().to_string();
                return Some(Err(FsError::Mount { path, source: e }));
            }
        }
        tracing::debug!(path = %target.display(), slot, open = saved.opens.len(), "took over a model");
        Some(Ok(Attached {
            owner: self.clone(),
            table: table.clone(),
            slot,
            target: target.to_owned(),
            attached: true,
        }))
    }

    fn model_fs(&self, table: &Table, model: Arc<Model>, slot: u32) -> ModelFs {
        let passthrough = table.passthrough.load(Ordering::Relaxed);
        let fs = ModelFs::within(model, self.runtime.clone(), u64::from(slot) << 32, ROOT, passthrough);
        match table.kept.get() {
            Some(kept) => fs.handed_over(kept.slot(slot)),
            None => fs,
        }
    }

    fn mount_session(&self) -> Result<Session, FsError> {
        let err = |source| FsError::Mount { path: self.path.display().to_string(), source };
        std::fs::create_dir_all(&self.path).map_err(err)?;
        let table = Arc::new(Table::new(self.passthrough, self.runtime.clone(), self.wait));
        let conn = connection::mount(&self.path, &format!("modelpack-{}", self.name), true, true).map_err(err)?;
        let fs = SharedFs { table: table.clone() };
        let served = connection::serve(fs, &conn.dev, &conn.init, false, self.threads, SessionACL::All);
        let (session, reply) = match served {
            Ok(served) => served,
            Err(e) => {
                let _ = detach(&self.path);
                return Err(err(e));
            }
        };
        let mounted = Mounted { session: Some(session), mountpoint: self.path.clone(), model: None };
        if let Err(e) = super::widen_read_ahead(&self.path, super::MAX_READAHEAD) {
            tracing::debug!(path = %self.path.display(), error = %e, "kernel read-ahead left at its default");
        }
        if let Some(keeper) = &self.keeper {
            if connection::can_resend(&conn.init) {
                match takeover::keep(keeper.as_ref(), &self.path, &self.journal_path(keeper.as_ref()), &conn, &reply) {
                    Ok(kept) => table.kept.set(kept).expect("a new table"),
                    Err(e) => {
                        tracing::warn!(path = %self.path.display(), error = %e, "cannot keep the model session for a restart")
                    }
                }
            } else {
                tracing::info!("this kernel cannot send unanswered requests again (Linux 6.9): models are mounted again after a restart");
            }
        }
        tracing::info!(path = %self.path.display(), threads = self.threads, kept = table.kept.get().is_some(), "model session mounted");
        Ok(Session { table, mounted })
    }

    /// Unmounts the session when it serves no model any more (nor waits for one).
    fn unmount_if_idle(&self, session: &mut Option<Session>) {
        if session.as_ref().is_some_and(|s| s.table.is_idle()) {
            if let Some(idle) = session.take() {
                tracing::info!(path = %self.path.display(), "model session unmounted: it serves no model");
                self.unmount(idle);
            }
        }
    }

    /// Unmounts `session`: the keeper lets it go first, so that no successor takes over a
    /// connection being unmounted.
    fn unmount(&self, session: Session) {
        if let (Some(keeper), Some(kept)) = (&self.keeper, session.table.kept.get()) {
            takeover::let_go(keeper.as_ref(), &self.path, kept);
        }
        for target in session.table.pending.settle_all().iter().filter(|t| is_mountpoint(t)) {
            let _ = detach(target);
        }
        session.mounted.unmount();
    }

    /// Whether the session (if any) is kept for the next process: a restart then leaves
    /// it mounted.
    pub fn is_kept(&self) -> bool {
        self.session.lock().expect("session lock").as_ref().is_none_or(|s| s.table.kept.get().is_some())
    }

    /// Unmounts the session and everything waiting in it (a stop for good). Models still
    /// attached should be detached first.
    pub fn shut(&self) {
        if let Some(session) = self.session.lock().expect("session lock").take() {
            self.unmount(session);
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
        self.table.bound.lock().expect("bound lock").remove(&self.slot);
        self.table.journal(&Record::Detach { slot: self.slot });
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
