//! Keeping a FUSE session for the next process, and taking over the one a previous
//! process kept: what the model sessions ([`super::shared`]) and the layer store
//! ([`super::store`]) share. The journal's format is [`super::handover`]'s.
//!
//! A session is kept under `fuse:<mount point>` and journaled in the keeper's directory.
//! A successor takes it over only when the keeper still holds its connection, its
//! journal is of this build's version and names the same mount point, the device
//! mounted there is still the journaled one, and the kernel can send unanswered requests
//! again (Linux 6.9); otherwise the session is let go and its models mounted afresh.
//!
//! Until a slot's model is back, requests for it wait ([`Pending`]), at most the
//! restore wait.

use std::collections::{BTreeMap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::connection::{self, Connection};
use super::handover::{self, Journal, Keeper, Record, Saved, SavedSlot};
use crate::model::Model;

/// The journal and connection of a session kept for the next process.
#[derive(Debug)]
pub(super) struct Kept {
    pub journal: Arc<Journal>,
    pub dev: Arc<OwnedFd>,
    /// The journal's first record, written again at each rewrite.
    pub header: Record,
}

impl Kept {
    /// Rewrites the journal when it has grown long: the header, then `live()`, the
    /// records of the session's live state (read with appends held off).
    pub fn compact(&self, live: impl FnOnce() -> Vec<Record>) {
        if !self.journal.due() {
            return;
        }
        self.journal.rewrite(|| {
            let mut records = vec![self.header.clone()];
            records.extend(live());
            records
        });
    }

    /// What a model in `slot` journals through.
    pub fn slot(&self, slot: u32) -> super::SlotHandover {
        super::SlotHandover { journal: self.journal.clone(), slot, dev: self.dev.clone() }
    }
}

/// The name a session mounted at `path` is kept under.
pub(super) fn kept_name(path: &Path) -> String {
    format!("fuse:{}", path.display())
}

/// Why a kept session was not taken over; it has been let go (the keeper no longer
/// holds it and its journal is gone).
#[derive(Debug)]
pub(super) struct Refused {
    pub cause: String,
    /// What its journal said, if it could be read: where its models were bound.
    pub saved: Option<Box<Saved>>,
}

/// A kept session, checked and ready to serve again.
#[derive(Debug)]
pub(super) struct Reclaimed {
    pub saved: Saved,
    pub kept: Kept,
}

/// Takes the session a previous process kept at `path` (journaled at `journal`) from
/// `keeper`: `Ok(None)` when none was kept. A session that cannot be taken over is let
/// go, and the error says why.
pub(super) fn reclaim(keeper: &dyn Keeper, path: &Path, journal: &Path) -> Result<Option<Reclaimed>, Refused> {
    let name = kept_name(path);
    let dev = keeper.take(&name);
    let replayed = handover::replay(journal);
    let Some(dev) = dev else {
        // A journal without its connection describes nothing left alive.
        let _ = std::fs::remove_file(journal);
        return Ok(None);
    };
    let refuse = |cause: String, saved: Option<Saved>| {
        keeper.forget(&name);
        let _ = std::fs::remove_file(journal);
        Err(Refused { cause, saved: saved.map(Box::new) })
    };
    let saved = match replayed {
        Ok(Some(saved)) => saved,
        Ok(None) => return refuse("its journal is missing".to_owned(), None),
        Err(e) => return refuse(e.to_string(), None),
    };
    if saved.path != path {
        return refuse(format!("it was mounted at {}", saved.path.display()), Some(saved));
    }
    let found = super::mount_device(path);
    if found.as_deref() != Some(saved.dev.as_str()) {
        let found = found.map_or_else(|| "nothing".to_owned(), |dev| format!("device {dev}"));
        let cause =
            format!("{} is no longer its mount (device {}): {found} is mounted there", path.display(), saved.dev);
        return refuse(cause, Some(saved));
    }
    if !connection::can_resend(&saved.init) {
        return refuse("this kernel cannot send unanswered requests again (Linux 6.9)".to_owned(), Some(saved));
    }
    let header = handover::session_record(&saved.path, &saved.dev, &saved.init, &saved.reply);
    match Journal::create(journal, &handover::records_of(&saved)) {
        Ok(created) => {
            Ok(Some(Reclaimed { kept: Kept { journal: Arc::new(created), dev: Arc::new(dev), header }, saved }))
        }
        Err(e) => refuse(format!("rewriting {}: {e}", journal.display()), Some(saved)),
    }
}

/// Journals the session just mounted at `path` on `conn` (its `INIT` answered with
/// `reply`) at `journal`, and hands its connection to `keeper`.
pub(super) fn keep(
    keeper: &dyn Keeper,
    path: &Path,
    journal: &Path,
    conn: &Connection,
    reply: &[u8],
) -> std::io::Result<Kept> {
    let dev = super::mount_device(path).ok_or_else(|| std::io::Error::other("the session is not mounted"))?;
    let header = handover::session_record(path, &dev, &conn.init, reply);
    let created = Arc::new(Journal::create(journal, std::slice::from_ref(&header))?);
    keeper.keep(&kept_name(path), conn.dev.as_fd())?;
    Ok(Kept { journal: created, dev: Arc::new(conn.dev.try_clone()?), header })
}

/// Lets a kept session go for good: the keeper stops keeping it, its journal goes.
pub(super) fn let_go(keeper: &dyn Keeper, path: &Path, kept: &Kept) {
    keeper.forget(&kept_name(path));
    kept.journal.remove();
}

/// What a model must be for a successor to put it back in its slot: the same inode
/// numbering ([`Tree::fingerprint`](crate::modelpack::tree::Tree::fingerprint)), and the
/// same blobs behind it (two models with the same names and sizes must not pass for each
/// other: the kernel keeps the pages it read).
pub(super) fn fingerprint(model: &Model) -> String {
    use sha2::{Digest as _, Sha256};
    let mut hash = Sha256::new();
    hash.update(model.tree.fingerprint());
    for layer in &model.artifact.layers {
        hash.update(format!("\n{} {}", layer.digest, layer.size));
    }
    format!("sha256:{}", hex::encode(hash.finalize()))
}

/// Slots a previous process served whose models are not back yet.
#[derive(Debug)]
pub(super) struct Pending {
    slots: Mutex<HashMap<u32, SavedSlot>>,
    /// Whether any slot is pending: read without the lock on every request.
    any: AtomicBool,
    /// Told whenever a slot is settled (its model back, or given up).
    settled: tokio::sync::watch::Sender<()>,
    /// How long a request for a pending slot waits.
    wait: Duration,
}

impl Pending {
    pub fn new(wait: Duration) -> Self {
        Self { slots: Mutex::default(), any: AtomicBool::new(false), settled: tokio::sync::watch::channel(()).0, wait }
    }

    pub fn fill(&self, slots: BTreeMap<u32, SavedSlot>) {
        let mut pending = self.slots.lock().expect("pending lock");
        pending.extend(slots);
        self.any.store(!pending.is_empty(), Ordering::Release);
    }

    pub fn contains(&self, slot: u32) -> bool {
        self.any.load(Ordering::Acquire) && self.slots.lock().expect("pending lock").contains_key(&slot)
    }

    pub fn is_empty(&self) -> bool {
        !self.any.load(Ordering::Acquire)
    }

    /// The pending slot whose model was at `target`.
    pub fn at(&self, target: &Path) -> Option<(u32, SavedSlot)> {
        let slots = self.slots.lock().expect("pending lock");
        slots.iter().find(|(_, s)| s.target == target).map(|(slot, saved)| (*slot, saved.clone()))
    }

    /// Every pending slot.
    pub fn all(&self) -> Vec<(u32, SavedSlot)> {
        self.slots.lock().expect("pending lock").iter().map(|(slot, saved)| (*slot, saved.clone())).collect()
    }

    /// Settles `slot`: its model is back, or given up.
    pub fn settle(&self, slot: u32) -> Option<SavedSlot> {
        let saved = {
            let mut pending = self.slots.lock().expect("pending lock");
            let saved = pending.remove(&slot);
            self.any.store(!pending.is_empty(), Ordering::Release);
            saved
        };
        self.settled.send_replace(());
        saved
    }

    /// Settles every slot; returns where their models were.
    pub fn settle_all(&self) -> Vec<PathBuf> {
        let targets = self.slots.lock().expect("pending lock").drain().map(|(_, s)| s.target).collect();
        self.any.store(false, Ordering::Release);
        self.settled.send_replace(());
        targets
    }

    /// The journal records of every pending slot (for a rewrite).
    pub fn records(&self) -> Vec<Record> {
        let slots = self.slots.lock().expect("pending lock");
        slots.iter().flat_map(|(slot, saved)| handover::slot_records(*slot, saved)).collect()
    }

    /// Waits until `slot` is settled, at most the restore wait.
    pub async fn settled(&self, slot: u32) {
        let mut settled = self.settled.subscribe();
        let waiting = settled.wait_for(|()| !self.contains(slot));
        if tokio::time::timeout(self.wait, waiting).await.is_err() {
            tracing::warn!(slot, wait = ?self.wait, "a model served before the restart is not back yet; failing its request");
        }
    }
}
