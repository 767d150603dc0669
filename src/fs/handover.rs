//! What a FUSE session leaves for the process that takes it over after a restart.
//!
//! The kernel remembers a connection's inodes, open files and passthrough backing ids
//! across the restart; the new process must answer for them exactly as the old one
//! would. Inode numbers follow from the models themselves (checked by each tree's
//! [`fingerprint`](crate::modelpack::tree::Tree::fingerprint)); the rest is written to a
//! journal as it happens, one line of JSON per event, appended with one `write` so that
//! a process killed at any point leaves whole lines (a torn last line is ignored):
//!
//! - `session`: the mount point, its device, the kernel's `INIT` request and the reply
//!   it was given (what was negotiated, which the kernel never sends again);
//! - `directory`: a directory the session numbered itself (the layer store's reference
//!   directories), by inode and name;
//! - `attach`/`detach`: a model's slot, where it is bound (or, in the layer store, the
//!   layer's path within the store) and its tree's fingerprint;
//! - `open`/`release`: a file handle given out, for which inode, with which passthrough
//!   backing id (the kernel refuses a second id, or a cached open, on an inode a
//!   passthrough open still reads), and the request it answered (a request the kernel
//!   sends again after the restart gets the same handle).
//!
//! The journal is rewritten from the live state when it grows long, and by each process
//! that takes it over. A journal of another [`VERSION`] is not taken over: its session
//! is unmounted and the models are mounted afresh.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine;
use serde::{Deserialize, Serialize};

/// Where a session's connection is kept across restarts (the daemon's descriptor
/// holder, [`crate::restart`]), and where its journal is written.
pub trait Keeper: Send + Sync + std::fmt::Debug {
    /// The descriptor a previous process kept under `name`, once.
    fn take(&self, name: &str) -> Option<std::os::fd::OwnedFd>;
    /// Keeps `fd` under `name` for the next process.
    fn keep(&self, name: &str, fd: std::os::fd::BorrowedFd<'_>) -> std::io::Result<()>;
    /// Stops keeping `name`.
    fn forget(&self, name: &str);
    /// The private directory journals are written in.
    fn state_dir(&self) -> &Path;
}

/// The journal's format; a successor takes over only its own.
pub const VERSION: u32 = 1;
/// Records after which the journal is rewritten from the live state.
const COMPACT_AFTER: usize = 100_000;

/// One event of a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Record {
    Session { version: u32, path: PathBuf, dev: String, init: String, reply: String },
    Directory { ino: u64, name: String },
    Attach { slot: u32, target: PathBuf, fingerprint: String },
    Detach { slot: u32 },
    Open { slot: u32, ino: u64, fh: u64, unique: u64, backing: Option<u32> },
    Release { slot: u32, fh: u64 },
}

/// A session as its journal left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Saved {
    pub path: PathBuf,
    /// `major:minor` of the session's mount.
    pub dev: String,
    pub init: Vec<u8>,
    pub reply: Vec<u8>,
    /// Directories the session numbered itself, by inode.
    pub directories: BTreeMap<u64, String>,
    pub slots: BTreeMap<u32, SavedSlot>,
}

/// A model's slot as its journal left it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedSlot {
    pub target: PathBuf,
    pub fingerprint: String,
    /// Open file handles.
    pub opens: BTreeMap<u64, SavedOpen>,
}

/// An open file handle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SavedOpen {
    /// The model's own inode (without the slot's offset).
    pub ino: u64,
    /// The `OPEN` request it answered.
    pub unique: u64,
    /// Its passthrough backing id; none for a file read through this process.
    pub backing: Option<u32>,
}

/// Why a journal cannot be taken over.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("reading {path}: {source}")]
    Io { path: String, source: std::io::Error },
    #[error("{path} line {line}: {detail}")]
    Malformed { path: String, line: usize, detail: String },
    #[error("{path} is version {found}, this build takes over version {VERSION} only")]
    Version { path: String, found: u32 },
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The session header record.
pub fn session_record(path: &Path, dev: &str, init: &[u8], reply: &[u8]) -> Record {
    Record::Session { version: VERSION, path: path.to_owned(), dev: dev.to_owned(), init: b64(init), reply: b64(reply) }
}

/// Reads the journal at `path`: None when there is none.
pub fn replay(path: &Path) -> Result<Option<Saved>, JournalError> {
    let shown = || path.display().to_string();
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(JournalError::Io { path: shown(), source }),
    };
    let lines: Vec<&str> = text.split_inclusive('\n').collect();
    let mut saved: Option<Saved> = None;
    for (i, line) in lines.iter().enumerate() {
        let malformed = |detail: String| JournalError::Malformed { path: shown(), line: i + 1, detail };
        // A process killed in the middle of a write leaves at most its last line torn.
        if !line.ends_with('\n') && i + 1 == lines.len() {
            break;
        }
        let record: Record = match serde_json::from_str(line) {
            Ok(record) => record,
            Err(e) => {
                // A newer build's events are not ours to guess at.
                return Err(if i == 0 {
                    match serde_json::from_str::<serde_json::Value>(line).ok().and_then(|v| v["version"].as_u64()) {
                        Some(found) if found != u64::from(VERSION) => {
                            JournalError::Version { path: shown(), found: found as u32 }
                        }
                        _ => malformed(e.to_string()),
                    }
                } else {
                    malformed(e.to_string())
                });
            }
        };
        match (record, &mut saved) {
            (Record::Session { version, path: at, dev, init, reply }, None) => {
                if version != VERSION {
                    return Err(JournalError::Version { path: shown(), found: version });
                }
                let decode = |s: &str| base64::engine::general_purpose::STANDARD.decode(s);
                let (init, reply) = match (decode(&init), decode(&reply)) {
                    (Ok(init), Ok(reply)) => (init, reply),
                    _ => return Err(malformed("INIT is not base64".to_owned())),
                };
                saved =
                    Some(Saved { path: at, dev, init, reply, directories: BTreeMap::new(), slots: BTreeMap::new() });
            }
            (Record::Session { .. }, Some(_)) => return Err(malformed("a second session header".to_owned())),
            (_, None) => return Err(malformed("no session header first".to_owned())),
            (Record::Directory { ino, name }, Some(saved)) => {
                saved.directories.insert(ino, name);
            }
            (Record::Attach { slot, target, fingerprint }, Some(saved)) => {
                saved.slots.insert(slot, SavedSlot { target, fingerprint, opens: BTreeMap::new() });
            }
            (Record::Detach { slot }, Some(saved)) => {
                saved.slots.remove(&slot);
            }
            (Record::Open { slot, ino, fh, unique, backing }, Some(saved)) => {
                if let Some(slot) = saved.slots.get_mut(&slot) {
                    slot.opens.insert(fh, SavedOpen { ino, unique, backing });
                }
            }
            (Record::Release { slot, fh }, Some(saved)) => {
                if let Some(slot) = saved.slots.get_mut(&slot) {
                    slot.opens.remove(&fh);
                }
            }
        }
    }
    Ok(saved)
}

/// The records that make up `saved` again (for a rewrite).
pub fn records_of(saved: &Saved) -> Vec<Record> {
    let mut records = vec![session_record(&saved.path, &saved.dev, &saved.init, &saved.reply)];
    records.extend(saved.directories.iter().map(|(ino, name)| Record::Directory { ino: *ino, name: name.clone() }));
    for (slot, saved_slot) in &saved.slots {
        records.extend(slot_records(*slot, saved_slot));
    }
    records
}

/// The records of one slot.
pub fn slot_records(slot: u32, saved: &SavedSlot) -> impl Iterator<Item = Record> + '_ {
    let attach = Record::Attach { slot, target: saved.target.clone(), fingerprint: saved.fingerprint.clone() };
    std::iter::once(attach).chain(saved.opens.iter().map(move |(fh, open)| Record::Open {
        slot,
        ino: open.ino,
        fh: *fh,
        unique: open.unique,
        backing: open.backing,
    }))
}

/// A session's journal, appended to as the session changes.
#[derive(Debug)]
pub struct Journal {
    path: PathBuf,
    file: Mutex<Appending>,
}

#[derive(Debug)]
struct Appending {
    file: std::fs::File,
    records: usize,
}

impl Journal {
    /// Writes a journal of `records` at `path`, replacing whatever was there at once
    /// (written beside it, then renamed).
    pub fn create(path: &Path, records: &[Record]) -> std::io::Result<Self> {
        let file = write_whole(path, records)?;
        Ok(Self { path: path.to_owned(), file: Mutex::new(Appending { file, records: records.len() }) })
    }

    /// Appends `record`. A journal that cannot be written is logged, not fatal: the
    /// session goes on serving, and only a restart would find it incomplete.
    pub fn append(&self, record: &Record) {
        let mut line = serde_json::to_vec(record).expect("a record serializes");
        line.push(b'\n');
        let mut appending = self.file.lock().expect("journal lock");
        if let Err(e) = appending.file.write_all(&line) {
            tracing::error!(path = %self.path.display(), error = %e, "cannot write the session journal; a restart will remount its models");
        }
        appending.records += 1;
    }

    /// Whether the journal has grown long enough to be rewritten.
    pub fn due(&self) -> bool {
        self.file.lock().expect("journal lock").records > COMPACT_AFTER
    }

    /// Rewrites the journal from `records()`, called with appends held off, so that no
    /// event falls between the state read and the new file.
    pub fn rewrite(&self, records: impl FnOnce() -> Vec<Record>) {
        let mut appending = self.file.lock().expect("journal lock");
        let records = records();
        match write_whole(&self.path, &records) {
            Ok(file) => *appending = Appending { file, records: records.len() },
            Err(e) => tracing::error!(path = %self.path.display(), error = %e, "cannot rewrite the session journal"),
        }
    }

    /// Deletes the journal (its session is gone).
    pub fn remove(&self) {
        let _held = self.file.lock().expect("journal lock");
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Writes `records` to a new file beside `path`, renames it to `path`, and returns it
/// open for appending.
fn write_whole(path: &Path, records: &[Record]) -> std::io::Result<std::fs::File> {
    let next = path.with_extension("next");
    let mut text = Vec::new();
    for record in records {
        serde_json::to_writer(&mut text, record).expect("a record serializes");
        text.push(b'\n');
    }
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&next)?;
        file.write_all(&text)?;
    }
    std::fs::rename(&next, path)?;
    std::fs::OpenOptions::new().append(true).open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(slot: u32, ino: u64, fh: u64, backing: Option<u32>) -> Record {
        Record::Open { slot, ino, fh, unique: fh * 2, backing }
    }

    #[test]
    fn replay_follows_the_events_and_ignores_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("models.journal");
        let header = session_record(Path::new("/m"), "0:55", b"init", b"reply");
        let attach =
            |slot, target: &str| Record::Attach { slot, target: target.into(), fingerprint: format!("f{slot}") };
        let directory = Record::Directory { ino: 2, name: "cmVm".to_owned() };
        let journal = Journal::create(&path, &[header, directory, attach(1, "/a"), attach(2, "/b")]).unwrap();
        journal.append(&open(1, 5, 1, Some(3)));
        journal.append(&open(1, 6, 2, None));
        journal.append(&Record::Release { slot: 1, fh: 2 });
        journal.append(&open(2, 5, 1, None));
        journal.append(&Record::Detach { slot: 2 });
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(br#"{"event":"release","slot":1,"#).unwrap();

        let saved = replay(&path).unwrap().unwrap();
        assert_eq!(
            (saved.dev.as_str(), saved.init.as_slice(), saved.reply.as_slice()),
            ("0:55", &b"init"[..], &b"reply"[..])
        );
        assert_eq!(saved.slots.keys().copied().collect::<Vec<_>>(), [1]);
        assert_eq!(saved.directories, BTreeMap::from([(2, "cmVm".to_owned())]));
        let slot = &saved.slots[&1];
        assert_eq!(slot.target, Path::new("/a"));
        assert_eq!(slot.opens.len(), 1);
        assert_eq!(slot.opens[&1], SavedOpen { ino: 5, unique: 2, backing: Some(3) });

        // A rewrite keeps the same state.
        let again = Journal::create(&path, &records_of(&saved)).unwrap();
        drop(again);
        assert_eq!(replay(&path).unwrap().unwrap(), saved);
    }

    #[test]
    fn another_version_or_a_broken_line_is_not_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j");
        assert!(replay(&path).unwrap().is_none());
        std::fs::write(&path, "{\"event\":\"session\",\"version\":99,\"path\":\"/m\",\"dev\":\"0:1\",\"init\":\"\",\"reply\":\"\",\"more\":1}\n").unwrap();
        let err = replay(&path).unwrap_err().to_string();
        assert!(err.contains("version 99"), "{err}");
        let header = serde_json::to_string(&session_record(Path::new("/m"), "0:1", b"", b"")).unwrap();
        std::fs::write(&path, format!("{header}\n{{\"event\":\"mystery\"}}\n")).unwrap();
        assert!(replay(&path).unwrap_err().to_string().contains("line 2"));
        std::fs::write(&path, "{\"event\":\"detach\",\"slot\":1}\n").unwrap();
        assert!(replay(&path).unwrap_err().to_string().contains("no session header"));
    }
}
