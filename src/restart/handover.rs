//! The daemon's side of a restart: at start it takes what the holder kept for it (FUSE
//! connections, listening sockets), and while it runs it keeps there what the next
//! process will need. A stop for good ([`stop_for_good`]) lets everything go.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::holder::Holder;
use crate::fs::handover::Keeper;

/// What a restart keeps, through the holder.
#[derive(Debug)]
pub struct Handover {
    holder: Holder,
    /// Whether this process started the holder (none ran).
    started: bool,
    socket: PathBuf,
    dir: PathBuf,
    /// What the previous process kept, until claimed.
    taken: Mutex<HashMap<String, OwnedFd>>,
}

impl Handover {
    /// Connects to the holder listening at `socket`, starting one if none does, and
    /// takes what it holds; journals are written in `dir` (created private).
    pub fn open(socket: &Path, dir: &Path) -> std::io::Result<Self> {
        crate::snapshotter::private_dir(dir).map_err(std::io::Error::other)?;
        let (holder, started) = match Holder::connect(socket)? {
            Some(holder) => (holder, false),
            None => (Holder::start(socket, Path::new("/proc/self/exe"))?, true),
        };
        let taken: HashMap<String, OwnedFd> = holder.take()?.into_iter().collect();
        tracing::info!(holder = holder.pid(), started, kept = taken.len(), "descriptor holder ready");
        Ok(Self { holder, started, socket: socket.to_owned(), dir: dir.to_owned(), taken: Mutex::new(taken) })
    }

    /// Undoes [`Handover::open`] for a start that failed: a holder this process started
    /// keeps only what this process kept, which goes with it, so it is stopped. One a
    /// previous process left keeps that process's models for the next start.
    pub fn abandon(&self) {
        if self.started {
            tracing::info!(holder = self.holder.pid(), "the start failed: stopping the descriptor holder it started");
            self.quit();
        }
    }

    /// The holder's process id.
    pub fn holder_pid(&self) -> u32 {
        self.holder.pid()
    }

    /// The Unix socket listening at `address`: the one the previous process kept (so
    /// that a client connecting during the restart waited instead of being refused),
    /// else one `bind` makes, kept from now on.
    pub fn listener<E>(
        &self,
        address: &Path,
        bind: impl FnOnce() -> Result<tokio::net::UnixListener, E>,
    ) -> Result<tokio::net::UnixListener, E> {
        let name = listener_name(address);
        if let Some(fd) = self.take(&name) {
            match adopt_listener(fd, address) {
                Ok(listener) => {
                    tracing::debug!(address = %address.display(), "listening on the socket kept across the restart");
                    return Ok(listener);
                }
                Err(e) => {
                    tracing::warn!(address = %address.display(), error = %e, "cannot take over the kept socket; binding it again")
                }
            }
        }
        let listener = bind()?;
        if let Err(e) = self.keep(&name, listener.as_fd()) {
            tracing::warn!(address = %address.display(), error = %e, "cannot keep the socket for a restart");
        }
        Ok(listener)
    }

    /// Lets go of whatever the previous process kept that this one did not claim (a
    /// socket no longer configured, say).
    pub fn release_unclaimed(&self) {
        let unclaimed: Vec<String> = self.taken.lock().expect("taken lock").drain().map(|(name, _)| name).collect();
        for name in unclaimed {
            tracing::info!(%name, "letting go of what the previous process kept and this one does not serve");
            self.forget(&name);
        }
    }

    /// Tells the holder to let everything go and exit (a stop for good).
    pub fn quit(&self) {
        if let Err(e) = self.holder.quit() {
            tracing::warn!(socket = %self.socket.display(), error = %e, "cannot stop the descriptor holder");
        }
    }
}

impl Keeper for Handover {
    fn take(&self, name: &str) -> Option<OwnedFd> {
        self.taken.lock().expect("taken lock").remove(name)
    }

    fn keep(&self, name: &str, fd: BorrowedFd<'_>) -> std::io::Result<()> {
        self.holder.put(name, fd)
    }

    fn forget(&self, name: &str) {
        if let Err(e) = self.holder.remove(name) {
            tracing::warn!(%name, error = %e, "cannot tell the descriptor holder to let go");
        }
    }

    fn state_dir(&self) -> &Path {
        &self.dir
    }
}

fn listener_name(address: &Path) -> String {
    format!("listen:{}", address.display())
}

/// `fd` as the listener of `address`, if it is a listening Unix socket bound there whose
/// file is still in place.
fn adopt_listener(fd: OwnedFd, address: &Path) -> std::io::Result<tokio::net::UnixListener> {
    let listener = std::os::unix::net::UnixListener::from(fd);
    let bound = listener.local_addr()?;
    if bound.as_pathname() != Some(address) {
        return Err(std::io::Error::other(format!("it is bound at {bound:?}")));
    }
    let meta = std::fs::symlink_metadata(address)?;
    if !std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) {
        return Err(std::io::Error::other("its file was replaced"));
    }
    listener.set_nonblocking(true)?;
    tokio::net::UnixListener::from_std(listener)
}

/// Where `serve` writes its process id, in its root.
fn pid_file(root: &Path) -> PathBuf {
    root.join("serve.pid")
}

/// Records this process as the `serve` of `root` (read by [`stop_for_good`]).
pub fn write_pid(root: &Path) -> std::io::Result<()> {
    std::fs::write(pid_file(root), format!("{}\n", std::process::id()))
}

/// Forgets this process as the `serve` of `root` (a stop for good).
pub fn remove_pid(root: &Path) {
    let _ = std::fs::remove_file(pid_file(root));
}

/// The process id of the `serve` of `root`, if one runs: its socket may be kept by the
/// holder, so that a connection to it proves nothing.
fn running_daemon(root: &Path) -> Option<u32> {
    let pid: u32 = std::fs::read_to_string(pid_file(root)).ok()?.trim().parse().ok()?;
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    let mut args = cmdline.split(|b| *b == 0);
    let program = args.next()?;
    let ours = program.ends_with(b"modelpack-snapshotter") && args.any(|a| a == b"serve");
    (ours && alive(pid)).then_some(pid)
}

/// Whether process `pid` runs (a zombie, exited but not yet reaped by its parent, does
/// not).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // The state follows the command name, which is in parentheses and may hold spaces.
    stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).is_some_and(|state| state != "Z")
}

/// Stops the daemon of `root` for good: asks it over its status socket `status` when it
/// runs (it unmounts every model, removes its sockets and stops its holder) and waits at
/// most `wait` for it to exit; when none runs but a holder still keeps what a stopped or
/// crashed one served, unmounts that and stops the holder. Returns what was done.
pub async fn stop_for_good(status: &Path, root: &Path, holder: &Path, wait: Duration) -> anyhow::Result<String> {
    use anyhow::Context as _;
    let deadline = Instant::now() + wait;
    if let Some(pid) = running_daemon(root) {
        loop {
            match crate::daemon::http::post(status, "/stop").await {
                // The daemon may close the connection as it stops, before its answer is read.
                Ok(_) | Err(crate::daemon::http::HttpError::Protocol { .. }) => break,
                // Still starting: its socket is not there yet.
                Err(crate::daemon::http::HttpError::Connect { .. }) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(e.into()),
            }
        }
        while alive(pid) || holder.exists() {
            if Instant::now() > deadline {
                anyhow::bail!("the daemon of {} (process {pid}) did not stop within {wait:?}", root.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        return Ok("stopped the daemon: nothing is mounted and nothing is kept".to_owned());
    }
    let Some(kept) = Holder::connect(holder).with_context(|| format!("asking {}", holder.display()))? else {
        return Ok("no daemon runs and nothing is kept".to_owned());
    };
    let taken = kept.take()?;
    let mut detached = 0;
    for journal in std::fs::read_dir(root.join("restart")).into_iter().flatten().flatten() {
        let Ok(Some(saved)) = crate::fs::handover::replay(&journal.path()) else { continue };
        // A layer store's slots are named by their paths within the store, not bound.
        let targets = saved.slots.values().map(|s| &s.target).filter(|t| t.is_absolute());
        for path in targets.chain([&saved.path]) {
            if crate::fs::is_mountpoint(path) && crate::fs::detach(path).is_ok() {
                detached += 1;
            }
        }
        let _ = std::fs::remove_file(journal.path());
    }
    for (name, _) in &taken {
        if let Some(address) = name.strip_prefix("listen:") {
            let _ = std::fs::remove_file(address);
        }
    }
    drop(taken);
    kept.quit()?;
    remove_pid(root);
    Ok(format!("no daemon ran: detached {detached} mounts it had left and stopped its holder"))
}
