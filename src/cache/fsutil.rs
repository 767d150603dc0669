//! The few file-system steps that make cache writes crash-safe and keep the cache root
//! to one process.

use std::fs::{self, DirBuilder, File, OpenOptions, Permissions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of every directory of the cache: cached weights may be proprietary, so no other
/// local user may list or read them.
pub(super) const DIR_MODE: u32 = 0o700;
/// Mode of every file the cache writes.
pub(super) const FILE_MODE: u32 = 0o600;

/// Options that create (or open) a cache file readable by its owner only.
pub(super) fn private_file() -> OpenOptions {
    let mut options = OpenOptions::new();
    options.mode(FILE_MODE);
    options
}

/// Creates `path` and its missing parents with [`DIR_MODE`], and tightens `path` itself
/// to it if it existed with a looser mode.
pub(super) fn private_dir_all(path: &Path) -> io::Result<()> {
    DirBuilder::new().recursive(true).mode(DIR_MODE).create(path)?;
    tighten(path)
}

/// Sets a directory's mode to [`DIR_MODE`] unless it already is.
fn tighten(path: &Path) -> io::Result<()> {
    if fs::metadata(path)?.permissions().mode() & 0o7777 != DIR_MODE {
        fs::set_permissions(path, Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Writes `data` to a new file at `path` and flushes it to stable storage. The file must
/// not exist yet. On failure the partial file is removed (best effort: anything left
/// behind sits in the temporary directory, which `open` empties).
pub(super) fn write_synced(path: &Path, data: &[u8]) -> io::Result<()> {
    let result = private_file().write(true).create_new(true).open(path).and_then(|mut file| {
        file.write_all(data)?;
        file.sync_data()
    });
    if result.is_err() {
        let _ = fs::remove_file(path);
    }
    result
}

/// Flushes a file's data to stable storage.
pub(super) fn sync_file(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_data()
}

/// This boot's identity (`/proc/sys/kernel/random/boot_id`), or None when it cannot be
/// read: data written without `fsync` is only known to be intact within one boot.
pub(super) fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_owned())
}

/// Flushes a directory's entries, so that a rename or unlink inside it survives a crash.
pub(super) fn sync_dir(path: &Path) -> io::Result<()> {
    File::open(path)?.sync_all()
}

/// Creates `path` (whose parent must exist) with [`DIR_MODE`] unless it is already there,
/// then tightened to it. Returns whether it was created, i.e. whether the parent now
/// needs a `sync_dir` to make it durable.
pub(super) fn ensure_dir(path: &Path) -> io::Result<bool> {
    match DirBuilder::new().mode(DIR_MODE).create(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists && path.is_dir() => tighten(path).map(|()| false),
        Err(e) => Err(e),
    }
}

/// Takes an exclusive advisory lock on `file` without waiting. Returns `false` when
/// another open file description holds it (another process, or another `ChunkCache` on
/// the same root in this process). The lock lasts as long as the file stays open.
pub(super) fn try_lock_exclusive(file: &File) -> io::Result<bool> {
    // SAFETY: `flock` only reads its arguments; the descriptor is valid for the duration
    // of the call because `file` is borrowed.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}
