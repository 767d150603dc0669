//! Where each model snapshot of this process stands: mounted, being mounted, waiting
//! for a retry, or broken. [`super::remote`] asks it before it answers anything that
//! would hand containerd a model's directory, so that an unmounted model is an error and
//! never an empty `lowerdir`.
//!
//! The table is one mutex and one condition variable: callers run on blocking threads,
//! and a caller asking about a model that is being mounted waits (bounded) for the
//! state to change rather than polling.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;

use super::SnapshotError;
use crate::fs::shared::Attached;

/// One model snapshot's state.
#[derive(Debug)]
pub enum State {
    /// Being mounted (after a restart, before its first attempt ends); callers wait.
    Mounting,
    /// Served.
    Mounted(Attached),
    /// The last attempt failed with `cause`; the next one starts at `retry_at`.
    Retrying { cause: String, retry_at: Instant },
    /// Cannot be mounted by this process, whatever is retried (its record is unreadable).
    Broken { cause: String },
}

/// A model snapshot's entry: its record's id (a removed and re-created snapshot of the
/// same name is another entry), its state, and the task that keeps mounting it.
#[derive(Debug)]
pub struct Entry {
    pub id: u64,
    pub state: State,
    pub task: Option<AbortHandle>,
}

/// The states of every model snapshot, by name.
#[derive(Debug, Default)]
pub struct ModelTable {
    entries: Mutex<HashMap<String, Entry>>,
    changed: Condvar,
}

impl ModelTable {
    /// Locks the table. Held only for short work (a metadata write, a FUSE mount call),
    /// never across a registry request.
    pub fn lock(&self) -> MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().expect("model table lock")
    }

    /// Sets the state of `name` if its entry is still the one with `id`; says whether it
    /// was (a snapshot removed meanwhile has no entry). Wakes waiting callers.
    pub fn set(&self, entries: &mut HashMap<String, Entry>, name: &str, id: u64, state: State) -> bool {
        let Some(entry) = entries.get_mut(name).filter(|e| e.id == id) else { return false };
        if matches!(state, State::Mounted(_)) {
            entry.task = None;
        }
        entry.state = state;
        self.changed.notify_all();
        true
    }

    /// Ok when model `name` is mounted. While it is being mounted, waits for up to
    /// `wait`; otherwise answers at once why it is not served.
    pub fn require_mounted(&self, name: &str, wait: Duration) -> Result<(), SnapshotError> {
        let deadline = Instant::now() + wait;
        let mut entries = self.lock();
        loop {
            let reason = match entries.get(name).map(|e| &e.state) {
                Some(State::Mounted(_)) => return Ok(()),
                Some(State::Mounting) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if !left.is_zero() {
                        entries = self.changed.wait_timeout(entries, left).expect("model table lock").0;
                        continue;
                    }
                    format!("it is still being mounted (waited {} s)", wait.as_secs())
                }
                Some(State::Retrying { cause, retry_at }) => {
                    let next = retry_at.saturating_duration_since(Instant::now()).as_secs();
                    format!("{cause}; next attempt in {next} s")
                }
                Some(State::Broken { cause }) => {
                    return Err(SnapshotError::Remote { name: name.to_owned(), detail: cause.clone() })
                }
                None => "it is not mounted".to_owned(),
            };
            return Err(SnapshotError::Unavailable { name: name.to_owned(), reason });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, state: State) -> Entry {
        Entry { id, state, task: None }
    }

    #[test]
    fn answers_without_waiting_unless_a_model_is_being_mounted() {
        let table = ModelTable::default();
        {
            let mut entries = table.lock();
            let retry_at = Instant::now() + Duration::from_secs(30);
            entries.insert("retrying".into(), entry(1, State::Retrying { cause: "registry down".into(), retry_at }));
            entries.insert("broken".into(), entry(2, State::Broken { cause: "unreadable".into() }));
            entries.insert("mounting".into(), entry(3, State::Mounting));
        }
        let started = Instant::now();
        let e = table.require_mounted("retrying", Duration::from_secs(60)).unwrap_err();
        assert!(matches!(e, SnapshotError::Unavailable { .. }), "{e}");
        assert!(e.to_string().contains("registry down") && e.to_string().contains("next attempt"), "{e}");
        let e = table.require_mounted("broken", Duration::from_secs(60)).unwrap_err();
        assert!(matches!(e, SnapshotError::Remote { .. }), "{e}");
        assert!(matches!(
            table.require_mounted("absent", Duration::from_secs(60)),
            Err(SnapshotError::Unavailable { .. })
        ));
        assert!(started.elapsed() < Duration::from_secs(30), "none of these waited");
        let e = table.require_mounted("mounting", Duration::from_millis(50)).unwrap_err();
        assert!(e.to_string().contains("still being mounted"), "{e}");
    }

    #[test]
    fn a_waiting_caller_sees_the_attempt_end() {
        let table = std::sync::Arc::new(ModelTable::default());
        table.lock().insert("m".into(), entry(7, State::Mounting));
        let waiter = {
            let table = table.clone();
            std::thread::spawn(move || table.require_mounted("m", Duration::from_secs(60)))
        };
        std::thread::sleep(Duration::from_millis(50));
        {
            let mut entries = table.lock();
            assert!(!table.set(&mut entries, "m", 8, State::Broken { cause: "other id".into() }), "a stale id");
            let retry_at = Instant::now() + Duration::from_secs(1);
            assert!(table.set(&mut entries, "m", 7, State::Retrying { cause: "refused".into(), retry_at }));
        }
        let e = waiter.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("refused"), "{e}");
    }
}
