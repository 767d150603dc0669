//! Restarts of `serve` that the model's readers do not see. The descriptor holder keeps
//! the models' FUSE connection and the listening sockets while the daemon is down, so a
//! daemon killed (SIGKILL) or stopped for a restart (SIGTERM) and started again on the
//! same root serves on: readers of a model view made through a real containerd 2, a
//! container started through its CRI, a podman container reading through the layer
//! store, and calls made to containerd while the daemon is down all see no error. `stop` (a stop for good) leaves no mount, no socket and no
//! holder, also after a crash with no restart.

mod common;

use std::collections::BTreeSet;
use std::io::Read;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::containerd::{containerd2_bin, push_busybox_image_with, Containerd, Flavor};
use common::cri::{cri_prerequisites, image_volume, read_cri_log, spec, Cri};
use common::*;
use k8s_cri::v1 as cri;
use sha2::Digest as _;

const MIB: usize = 1 << 20;

/// Restarts in each reader test.
const RESTARTS: usize = 20;

/// How long a reader may make no progress before it counts as stuck.
const STUCK_AFTER: Duration = Duration::from_secs(60);

/// How long a command that needs the daemon (`status`, `stop`) may take before the test
/// gives up on it.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(60);

/// The daemon's configuration in every test: a short grace for calls in flight at a
/// SIGTERM, every other key (passthrough on, no prefetch) at its default.
const CONFIG: &str = "shutdown_grace_secs = 1\n";

/// How the daemon is ended before it is started again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Restart {
    /// SIGKILL: a crash, or a supervisor that does not wait.
    Kill,
    /// SIGTERM: a restart, which lets calls in flight finish first.
    Term,
}

impl Restart {
    fn signal(self) -> &'static str {
        match self {
            Restart::Kill => "SIGKILL",
            Restart::Term => "SIGTERM",
        }
    }

    /// Ends `serve` this way.
    fn end(self, serve: &mut SnapshotterProcess) {
        match self {
            Restart::Kill => serve.kill(),
            Restart::Term => serve.stop(),
        }
    }
}

/// Restarts the daemon (`restart`) up to 8 times, SIGKILL and SIGTERM in turn, 300 to
/// 900 ms apart (drawn from `seed`), until `done` says the reader finished; returns the
/// signals sent.
fn restart_while_reading(seed: u64, done: impl Fn() -> bool, mut restart: impl FnMut(Restart)) -> Vec<&'static str> {
    let mut rng = Rng(seed);
    let mut during_read = Vec::new();
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(rng.between(300, 900)));
        if done() {
            break;
        }
        let kind = if i % 2 == 0 { Restart::Kill } else { Restart::Term };
        restart(kind);
        during_read.push(kind.signal());
    }
    during_read
}

/// xorshift64: seeded, so that a failing schedule can be replayed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    /// A number in `low..=high`.
    fn between(&mut self, low: u64, high: u64) -> u64 {
        low + self.next() % (high - low + 1)
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn node_prerequisites() -> bool {
    cri_prerequisites(Flavor::V2)
}

/// A registry, the daemon on a root of its own (logging to `<root>.log`), and containerd
/// 2 with the daemon as its `modelpack` snapshotter (for ctr and for CRI), all under one
/// temp dir. Dropped in field order: the daemon is stopped for good while containerd
/// still runs, the temp dir goes last.
struct Node {
    serve: SnapshotterProcess,
    containerd: Containerd,
    registry: TestRegistry,
    tmp: tempfile::TempDir,
}

impl Node {
    fn start() -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let registry = TestRegistry::start();
        let root = tmp.path().join("root");
        let config = write_config(&tmp.path().join("etc"), CONFIG);
        let serve = SnapshotterProcess::start_logged_with(&root, &root.join("snapshotter.sock"), &config);
        let sandbox = format!("{}/library/sandbox:test", registry.addr());
        let containerd = Containerd::start_cri(
            Flavor::V2,
            &tmp.path().join("containerd"),
            &serve.socket,
            &sandbox,
            &[registry.addr()],
        );
        Self { serve, containerd, registry, tmp }
    }

    fn root(&self) -> PathBuf {
        self.serve.root.clone()
    }

    /// `dir` pushed as `models/NAME:v1` (raw layers) and converted: its companion.
    fn push_converted(&self, dir: &Path, name: &str) -> String {
        let source = format!("{}/models/{name}:v1", self.registry.addr());
        push_dir(dir, &source, "raw");
        let (ok, _, stderr) = run_bin(&["convert", &source]);
        assert!(ok, "convert {source}: {stderr}");
        format!("{source}-lazy")
    }

    /// Pulls `image` with ctr into the `modelpack` snapshotter.
    fn pull(&self, image: &str) {
        self.ctr(&["images", "pull", "--plain-http", "--snapshotter", "modelpack", image]);
    }

    /// Runs containerd 2's own `ctr` against it; panics with the output on failure.
    fn ctr(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = ctr(&self.containerd, args);
        assert!(ok, "ctr {args:?} failed:\n{stdout}\n{stderr}\n{}", self.logs());
        stdout
    }

    /// A read-only view of `image`'s model made through containerd and mounted at
    /// `target` by `ctr images mount` (a view under a lease of its own, out of reach of
    /// containerd's garbage collection).
    fn view(&self, image: &str, target: &Path) -> CtrMount {
        std::fs::create_dir_all(target).unwrap();
        let target_arg = target.to_str().unwrap();
        self.ctr(&["images", "mount", "--snapshotter", "modelpack", image, target_arg]);
        assert!(modelpack_snapshotter::fs::is_mountpoint(target), "ctr mounted nothing at {target_arg}");
        CtrMount(target.to_owned())
    }

    /// Unmounts a view made by [`Node::view`] and removes its snapshot, as containerd does
    /// when its container goes.
    fn remove_view(&self, view: CtrMount) {
        self.ctr(&["images", "unmount", "--snapshotter", "modelpack", "--rm", view.0.to_str().unwrap()]);
    }

    /// Ends the daemon as `kind` says and starts it again on the same root and
    /// configuration. (The ended process's handle is forgotten, not dropped: dropping it
    /// would stop the new daemon for good.)
    fn restart(&mut self, kind: Restart) {
        kind.end(&mut self.serve);
        self.start_again();
    }

    /// Starts the daemon on the root and configuration of the one that ended.
    fn start_again(&mut self) {
        let next = SnapshotterProcess::start_logged_with(&self.serve.root, &self.serve.socket, &self.serve.config);
        std::mem::forget(std::mem::replace(&mut self.serve, next));
    }

    /// Waits until the daemon answers `status`: a kept status socket accepts a connection
    /// at once, so only an answer says that the new process serves.
    fn wait_ready(&self) {
        let status = self.root().join("status.sock");
        let mut command = Command::new(BIN);
        command.arg("status").arg("--address").arg(&status);
        match run_for_at_most(&mut command, COMMAND_TIMEOUT) {
            Some(out) if out.status.success() => {}
            Some(out) => panic!("status failed: {}\n{}", String::from_utf8_lossy(&out.stderr), self.logs()),
            None => panic!("the daemon did not answer status within {COMMAND_TIMEOUT:?}\n{}", self.logs()),
        }
    }

    /// Waits until containerd reaches the daemon. Needed after a start that follows a stop
    /// for good only: nothing kept the socket then, so containerd's connection failed and
    /// it reconnects after a backoff of its own (about a second).
    fn wait_for_containerd(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match ctr(&self.containerd, &["snapshots", "--snapshotter", "modelpack", "ls"]) {
                (true, _, _) => return,
                (false, _, err) if Instant::now() < deadline && err.contains("connection") => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                (false, out, err) => panic!("ctr snapshots ls failed: {out}{err}\n{}", self.logs()),
            }
        }
    }

    /// The end of the daemon's and containerd's logs, for failure messages.
    fn logs(&self) -> String {
        format!(
            "daemon log (end):\n{}\ncontainerd log (end):\n{}",
            tail(&self.serve.log(), 60),
            tail(&self.containerd.log(), 30)
        )
    }
}

/// Runs containerd 2's own `ctr` against `containerd`: (success, stdout, stderr).
fn ctr(containerd: &Containerd, args: &[&str]) -> (bool, String, String) {
    containerd.ctr_with(&containerd2_bin().expect("containerd 2.x fetched").join("ctr"), args)
}

impl Drop for Node {
    /// A failed test may leave a daemon that does not answer (stuck, or killed and not
    /// started again): `stop` would wait for it for ever, and readers blocked on the kept
    /// connection would never return. Such a daemon and its holder are killed first; the
    /// fields' own drops then detach what is left.
    fn drop(&mut self) {
        if !std::thread::panicking() {
            return;
        }
        let holder = self.serve.holder_pid();
        let mut stop = Command::new(BIN);
        stop.arg("stop").arg("--root").arg(self.root()).arg("--config").arg(&self.serve.config);
        if run_for_at_most(&mut stop, COMMAND_TIMEOUT).is_some_and(|out| out.status.success()) {
            return;
        }
        eprintln!("`stop` did not stop the daemon of {}: killing it and its holder", self.root().display());
        self.serve.kill();
        if let Some(pid) = holder {
            // SAFETY: signalling a process by id: the holder, alive a moment ago.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
    }
}

/// What process `pid` is doing, from the kernel's view: its state and, for each thread
/// not running, where it waits (its kernel stack when it waits uninterruptibly). Read on
/// a thread of its own: a read of `/proc` can wait on a process stuck in a file system.
fn process_report(pid: u32) -> String {
    let (sender, report) = std::sync::mpsc::channel();
    std::thread::spawn(move || sender.send(read_process_report(pid)));
    report
        .recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| format!("  (/proc/{pid} did not answer within 5 s)\n"))
}

fn read_process_report(pid: u32) -> String {
    let mut report = String::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten() {
        let read = |name: &str| std::fs::read_to_string(task.path().join(name)).unwrap_or_default();
        let stat = read("stat");
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()).unwrap_or("?");
        if state == "R" {
            continue;
        }
        let stack = if state == "D" { read("stack") } else { String::new() };
        report.push_str(&format!(
            "  thread {} ({}) {state} in {}\n{stack}",
            task.file_name().to_string_lossy(),
            read("comm").trim(),
            read("wchan")
        ));
    }
    report
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A mount made by `ctr images mount`, detached on drop if the test has not unmounted it
/// (a failed test).
struct CtrMount(PathBuf);

impl Drop for CtrMount {
    fn drop(&mut self) {
        if modelpack_snapshotter::fs::is_mountpoint(&self.0) {
            let _ = modelpack_snapshotter::fs::detach(&self.0);
        }
    }
}

/// Runs `command`, killing it when it has not exited within `limit`; its output, or
/// `None` when it had to be killed. (Outputs are small: the pipes never fill.)
fn run_for_at_most(command: &mut Command, limit: Duration) -> Option<Output> {
    let mut child = command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + limit;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some(child.wait_with_output().unwrap())
}

/// The mounts under `root`, as (mount point, filesystem type) from
/// `/proc/self/mountinfo`.
fn mounts_under(root: &Path) -> Vec<(String, String)> {
    let root = root.display().to_string();
    std::fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|line| {
            let at = line.split(' ').nth(4)?;
            let fs_type = line.split(" - ").nth(1)?.split(' ').next()?;
            Some((at.to_owned(), fs_type.to_owned()))
        })
        .filter(|(at, _)| at.starts_with(&root))
        .collect()
}

/// Whether process `pid` is gone (or a zombie waiting for its parent), waiting up to
/// 10 s for it to go.
fn process_gone(pid: u32) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // The state follows the command name, which is in parentheses.
        let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
        if matches!(state, None | Some("Z" | "X")) {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Asserts that the daemon of `node` was stopped for good: nothing mounted under its
/// root, its sockets removed, its holder `holder` gone.
fn assert_stopped_for_good(node: &Node, holder: u32, printed: &str) {
    let root = node.root();
    let mounted = mounts_under(&root);
    assert!(mounted.is_empty(), "still mounted after `stop` ({printed}): {mounted:?}\n{}", node.logs());
    for socket in ["snapshotter.sock", "status.sock", "holder.sock"] {
        assert!(!root.join(socket).exists(), "{socket} is left after `stop` ({printed})");
    }
    assert!(process_gone(holder), "the holder (pid {holder}) is still running after `stop` ({printed})");
}

// ---------------------------------------------------------------------------------------
// Readers of a view across restarts.

/// The model the readers read: a large file read at random offsets through one open
/// file, a medium one read whole again and again, and small files.
struct ReaderModel {
    large: Arc<Vec<u8>>,
    medium: Arc<Vec<u8>>,
    /// Relative path and content of each small file.
    small: Arc<Vec<(String, Vec<u8>)>>,
}

const LARGE: &str = "model-large.safetensors";
const MEDIUM: &str = "model-medium.safetensors";

fn write_reader_model(dir: &Path) -> ReaderModel {
    let large = pseudo_random(48 * MIB, 101);
    let medium = pseudo_random(16 * MIB, 102);
    let small = vec![
        ("config.json".to_owned(), br#"{"architectures":["Demo"],"hidden_size":64}"#.to_vec()),
        ("tokenizer.json".to_owned(), pseudo_random(70_000, 103)),
        ("generation_config.json".to_owned(), br#"{"max_length":128}"#.to_vec()),
        ("docs/NOTES.md".to_owned(), b"# notes\n".to_vec()),
    ];
    std::fs::create_dir_all(dir.join("docs")).unwrap();
    std::fs::write(dir.join(LARGE), &large).unwrap();
    std::fs::write(dir.join(MEDIUM), &medium).unwrap();
    for (path, data) in &small {
        std::fs::write(dir.join(path), data).unwrap();
    }
    ReaderModel { large: Arc::new(large), medium: Arc::new(medium), small: Arc::new(small) }
}

/// What one reader did, shared with the test while it runs.
struct Tally {
    name: &'static str,
    /// Rounds completed (a round is a few calls: see each reader).
    rounds: AtomicU64,
    /// When the last round completed, in ms since the readers started.
    last_round_ms: AtomicU64,
    errors: AtomicU64,
    /// The first few errors, described.
    messages: Mutex<Vec<String>>,
    /// The longest single call (open, read, readdir, stat, fadvise, close), in µs.
    longest_us: AtomicU64,
    started: Instant,
}

/// Errors described in full; more are only counted.
const MESSAGES_KEPT: usize = 5;

impl Tally {
    fn new(name: &'static str, started: Instant) -> Self {
        Self {
            name,
            rounds: AtomicU64::new(0),
            last_round_ms: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            messages: Mutex::new(Vec::new()),
            longest_us: AtomicU64::new(0),
            started,
        }
    }

    /// Runs one call, recording how long it took.
    fn time<T>(&self, call: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let result = call();
        self.longest_us.fetch_max(start.elapsed().as_micros() as u64, Ordering::Relaxed);
        result
    }

    fn round_done(&self) {
        self.last_round_ms.store(self.started.elapsed().as_millis() as u64, Ordering::Relaxed);
        self.rounds.fetch_add(1, Ordering::Relaxed);
    }

    fn error(&self, message: String) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let mut messages = self.messages.lock().unwrap();
        if messages.len() < MESSAGES_KEPT {
            messages.push(format!("{} at {:?}: {message}", self.name, self.started.elapsed()));
        }
    }

    fn longest(&self) -> Duration {
        Duration::from_micros(self.longest_us.load(Ordering::Relaxed))
    }

    /// Time since the last round completed (or the readers started).
    fn idle(&self) -> Duration {
        self.started.elapsed().saturating_sub(Duration::from_millis(self.last_round_ms.load(Ordering::Relaxed)))
    }
}

/// Drops a file's pages from the page cache, so that its next read asks the daemon.
fn drop_cached(file: &std::fs::File) -> Result<(), String> {
    // SAFETY: posix_fadvise only reads the descriptor, which `file` keeps open.
    match unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) } {
        0 => Ok(()),
        errno => Err(format!("fadvise DONTNEED: {}", std::io::Error::from_raw_os_error(errno))),
    }
}

/// Where two equally long byte strings first differ.
fn first_difference(got: &[u8], want: &[u8]) -> Option<usize> {
    got.iter().zip(want).position(|(a, b)| a != b).or((got.len() != want.len()).then_some(got.len().min(want.len())))
}

/// Reader A: one file descriptor of the large file, opened before any of its bytes were
/// cached (so its reads go through the daemon, never passthrough), kept the whole test.
/// A round: pread a random 1 MiB range, compare it, drop the pages.
fn read_large(file: std::fs::File, want: &[u8], tally: &Tally, stop: &AtomicBool, seed: u64) {
    let mut rng = Rng(seed);
    let mut buf = vec![0; MIB];
    while !stop.load(Ordering::Relaxed) {
        let offset = rng.between(0, (want.len() - MIB) as u64);
        let at = offset as usize;
        match tally.time(|| file.read_exact_at(&mut buf, offset)) {
            Err(e) => tally.error(format!("pread {MIB} bytes at {offset}: {e}")),
            Ok(()) => {
                if let Some(i) = first_difference(&buf, &want[at..at + MIB]) {
                    tally.error(format!("pread at {offset}: wrong bytes from offset {}", offset + i as u64));
                }
            }
        }
        if let Err(e) = tally.time(|| drop_cached(&file)) {
            tally.error(e);
        }
        tally.round_done();
    }
}

/// Reader B: a round opens the medium file, reads it whole 1 MiB at a time, compares it,
/// drops its pages and closes it. Once its blob is whole in the cache (after the first
/// round), each open is served by kernel passthrough from the cache file, with a backing
/// id the restarts must keep valid.
fn read_medium(path: &Path, want: &[u8], tally: &Tally, stop: &AtomicBool) {
    let mut buf = vec![0; MIB];
    while !stop.load(Ordering::Relaxed) {
        let mut round = || -> Result<(), String> {
            let mut file = tally.time(|| std::fs::File::open(path)).map_err(|e| format!("open {MEDIUM}: {e}"))?;
            let mut got = Vec::with_capacity(want.len());
            loop {
                let n = tally.time(|| file.read(&mut buf)).map_err(|e| format!("read at {}: {e}", got.len()))?;
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            if let Some(i) = first_difference(&got, want) {
                return Err(format!("{MEDIUM}: {} bytes read, wrong from offset {i}", got.len()));
            }
            tally.time(|| drop_cached(&file))?;
            tally.time(|| drop(file));
            Ok(())
        };
        if let Err(e) = round() {
            tally.error(e);
        }
        tally.round_done();
    }
}

/// Reader C: a round lists the view's directories, and stats and reads each small file.
fn read_small(view: &Path, model: &ReaderModel, tally: &Tally, stop: &AtomicBool) {
    let top: BTreeSet<String> =
        [LARGE, MEDIUM, "config.json", "tokenizer.json", "generation_config.json", "docs"].map(str::to_owned).into();
    let docs: BTreeSet<String> = ["NOTES.md".to_owned()].into();
    while !stop.load(Ordering::Relaxed) {
        let round = || -> Result<(), String> {
            for (dir, want) in [(view.to_owned(), &top), (view.join("docs"), &docs)] {
                let names = tally
                    .time(|| {
                        std::fs::read_dir(&dir)?
                            .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
                            .collect::<std::io::Result<BTreeSet<String>>>()
                    })
                    .map_err(|e| format!("readdir {}: {e}", dir.display()))?;
                if names != *want {
                    return Err(format!("readdir {} listed {names:?}", dir.display()));
                }
            }
            for (name, data) in model.small.iter() {
                let path = view.join(name);
                let meta = tally.time(|| std::fs::metadata(&path)).map_err(|e| format!("stat {name}: {e}"))?;
                if meta.len() != data.len() as u64 {
                    return Err(format!("stat {name}: {} bytes, not {}", meta.len(), data.len()));
                }
                let got = tally.time(|| std::fs::read(&path)).map_err(|e| format!("read {name}: {e}"))?;
                if got != *data {
                    return Err(format!("read {name}: wrong bytes"));
                }
            }
            Ok(())
        };
        if let Err(e) = round() {
            tally.error(e);
        }
        tally.round_done();
    }
}

/// The three readers of a mounted view, each on a thread of its own. Dropping them tells
/// them to stop without waiting: a reader blocked on a connection that a failed test
/// left unserved ends once the connection goes.
struct Readers {
    stop: Arc<AtomicBool>,
    tallies: Vec<Arc<Tally>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Readers {
    fn start(view: &Path, model: &ReaderModel) -> Self {
        // Opened before any read: its blob is not whole in the cache, so it is not a
        // passthrough open.
        let large = std::fs::File::open(view.join(LARGE)).unwrap();
        let started = Instant::now();
        let stop = Arc::new(AtomicBool::new(false));
        let tallies: Vec<Arc<Tally>> = ["A (large, one fd)", "B (medium, reopened)", "C (directories, small files)"]
            .map(|name| Arc::new(Tally::new(name, started)))
            .into();
        let mut threads = Vec::new();
        {
            let (tally, stop, want) = (tallies[0].clone(), stop.clone(), model.large.clone());
            threads.push(std::thread::spawn(move || read_large(large, &want, &tally, &stop, 0x05ee_da11)));
        }
        {
            let (tally, stop, want, path) = (tallies[1].clone(), stop.clone(), model.medium.clone(), view.join(MEDIUM));
            threads.push(std::thread::spawn(move || read_medium(&path, &want, &tally, &stop)));
        }
        {
            let (tally, stop, view) = (tallies[2].clone(), stop.clone(), view.to_owned());
            let model =
                ReaderModel { large: model.large.clone(), medium: model.medium.clone(), small: model.small.clone() };
            threads.push(std::thread::spawn(move || read_small(&view, &model, &tally, &stop)));
        }
        Self { stop, tallies, threads }
    }

    fn rounds(&self) -> Vec<u64> {
        self.tallies.iter().map(|t| t.rounds.load(Ordering::Relaxed)).collect()
    }

    /// Waits until every reader has completed a round since `since` (their counts then);
    /// an error names a reader that made no progress for [`STUCK_AFTER`].
    fn wait_for_progress(&self, since: &[u64]) -> Result<(), String> {
        loop {
            let behind: Vec<&Arc<Tally>> = self
                .tallies
                .iter()
                .zip(since)
                .filter(|(t, &s)| t.rounds.load(Ordering::Relaxed) <= s)
                .map(|(t, _)| t)
                .collect();
            if behind.is_empty() {
                return Ok(());
            }
            if let Some(stuck) = behind.iter().find(|t| t.idle() > STUCK_AFTER) {
                return Err(format!("stuck reader: {} made no progress for {:?}", stuck.name, stuck.idle()));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Stops the readers and waits for them.
    fn finish(mut self) -> Vec<Arc<Tally>> {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            thread.join().expect("a reader panicked");
        }
        std::mem::take(&mut self.tallies)
    }
}

impl Drop for Readers {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Readers of a view made through containerd go on reading, with no error, while the
/// daemon is ended as `kind` says and started again [`RESTARTS`] times.
fn readers_see_no_error_across(kind: Restart) {
    if !node_prerequisites() {
        return;
    }
    let mut node = Node::start();
    let dir = node.tmp.path().join("model");
    let model = write_reader_model(&dir);
    let companion = node.push_converted(&dir, "readers");
    node.pull(&companion);
    let target = node.tmp.path().join("view");
    let view = node.view(&companion, &target);
    let readers = Readers::start(&target, &model);
    if let Err(e) = readers.wait_for_progress(&[0, 0, 0]) {
        panic!("{e} before any restart\n{}", node.logs());
    }

    let mut rng = Rng(0x7e57_0000 + kind as u64);
    for restart in 1..=RESTARTS {
        std::thread::sleep(Duration::from_millis(rng.between(50, 400)));
        node.restart(kind);
        let since = readers.rounds();
        if let Err(e) = readers.wait_for_progress(&since) {
            let holder = node.serve.holder_pid().map_or(String::new(), process_report);
            panic!(
                "{e} after {} restart {restart}\ndaemon (pid {}):\n{}holder:\n{holder}this test:\n{}{}",
                kind.signal(),
                node.serve.pid(),
                process_report(node.serve.pid()),
                process_report(std::process::id()),
                node.logs()
            );
        }
    }

    let tallies = readers.finish();
    let longest = tallies.iter().map(|t| t.longest()).max().unwrap();
    eprintln!("longest stall across {RESTARTS} {} restarts: {} ms", kind.signal(), longest.as_millis());
    for t in &tallies {
        eprintln!(
            "  reader {}: {} rounds, {} errors, longest call {} ms",
            t.name,
            t.rounds.load(Ordering::Relaxed),
            t.errors.load(Ordering::Relaxed),
            t.longest().as_millis()
        );
    }
    let errors: u64 = tallies.iter().map(|t| t.errors.load(Ordering::Relaxed)).sum();
    let messages: Vec<String> = tallies.iter().flat_map(|t| t.messages.lock().unwrap().clone()).collect();
    assert_eq!(errors, 0, "the readers saw errors:\n{}\n{}", messages.join("\n"), node.logs());
    if kind == Restart::Term {
        // `stop` sends SIGTERM and SIGKILLs a process still running 20 s later: each
        // restart must have been a SIGTERM one.
        let stopped = node.serve.log().matches("stopped for a restart").count();
        assert_eq!(stopped, RESTARTS, "not every SIGTERM stopped the daemon for a restart\n{}", node.logs());
    }

    node.remove_view(view);
    let holder = node.serve.holder_pid().expect("a holder keeps the models' connection");
    let printed = node.serve.stop_for_good();
    assert_stopped_for_good(&node, holder, &printed);
}

#[test]
fn a_reader_through_a_containerd_view_sees_no_error_across_sigkill_restarts() {
    readers_see_no_error_across(Restart::Kill);
}

#[test]
fn a_reader_through_a_containerd_view_sees_no_error_across_sigterm_restarts() {
    readers_see_no_error_across(Restart::Term);
}

// ---------------------------------------------------------------------------------------
// A container started through CRI.

/// The model file the container reads, 1 MiB at a time.
const CONTAINER_FILE_MIB: usize = 64;

/// A busybox script that reads `/model/weights.bin` 1 MiB at a time, one `dd` each with a
/// pause between (so that the read spans several restarts), and prints the sha256 of what
/// it read and DONE; any `dd` that fails prints FAIL and makes the script exit 1. Each
/// `dd` done prints `read N` on standard error.
fn slow_reader_script() -> String {
    format!(
        r#"echo START
i=0
while [ $i -lt {CONTAINER_FILE_MIB} ]; do
  busybox dd if=/model/weights.bin bs=1048576 skip=$i count=1 2>/tmp/dd.err || {{ echo "FAIL dd skip=$i: $(cat /tmp/dd.err)" >&2; touch /tmp/failed; }}
  echo "read $i" >&2
  sleep 0.12
  i=$((i+1))
done | sha256sum | sed 's/^/sum /'
echo DONE
[ ! -e /tmp/failed ]"#
    )
}

#[test]
fn a_container_started_through_cri_reads_its_model_across_restarts() {
    if !node_prerequisites() {
        return;
    }
    let rt = runtime();
    let mut node = Node::start();
    let dir = node.tmp.path().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let weights = pseudo_random(CONTAINER_FILE_MIB * MIB, 201);
    let want_sum = hex::encode(sha2::Sha256::digest(&weights));
    std::fs::write(dir.join("weights.bin"), &weights).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"architectures":["Demo"]}"#).unwrap();
    let companion = node.push_converted(&dir, "container");
    let busybox = format!("{}/library/busybox:test", node.registry.addr());
    push_busybox_image_with(&busybox, &["/bin/sh"]);
    let sandbox_image = format!("{}/library/sandbox:test", node.registry.addr());
    push_busybox_image_with(&sandbox_image, &["/bin/sleep", "2147483647"]);

    let mut kubelet = rt.block_on(Cri::connect(&node.containerd.socket));
    rt.block_on(kubelet.pull(&companion));
    rt.block_on(kubelet.pull(&busybox));
    let logs = node.tmp.path().join("logs");
    let sandbox = rt.block_on(kubelet.run_sandbox("restart-pod", &logs));
    let script = slow_reader_script();
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "reader".into(), attempt: 0 }),
        image: Some(spec(&busybox)),
        command: vec!["/bin/sh".into(), "-c".into(), script],
        mounts: vec![image_volume(&companion, "/model")],
        log_path: "reader.log".into(),
        ..Default::default()
    };
    let request = cri::CreateContainerRequest {
        pod_sandbox_id: sandbox.0.clone(),
        config: Some(config),
        sandbox_config: Some(sandbox.1.clone()),
    };
    let id = rt.block_on(kubelet.runtime.create_container(request)).unwrap().into_inner().container_id;
    rt.block_on(kubelet.runtime.start_container(cri::StartContainerRequest { container_id: id.clone() })).unwrap();
    let log_path = logs.join("reader.log");
    let deadline = Instant::now() + Duration::from_secs(60);
    while !read_cri_log(&log_path).contains("START") {
        assert!(Instant::now() < deadline, "the container did not start reading\n{}", node.logs());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Restarts, SIGKILL and SIGTERM in turn, while the container reads.
    let done = || read_cri_log(&log_path).contains("DONE");
    let during_read = restart_while_reading(0xc0_47a1, done, |kind| node.restart(kind));
    let code = rt.block_on(kubelet.wait_exited(&id, Duration::from_millis(100)));
    let log = read_cri_log(&log_path);
    eprintln!("restarts while the container read: {during_read:?}");
    node.wait_ready();
    rt.block_on(kubelet.remove_sandbox(&sandbox.0));

    assert!(!log.contains("FAIL"), "a read failed in the container:\n{log}\n{}", node.logs());
    assert_eq!(code, 0, "the container failed:\n{log}\n{}", node.logs());
    let printed = log.lines().find_map(|l| l.strip_prefix("sum ")).map(|s| s.trim_end_matches(" -").trim());
    assert_eq!(printed, Some(want_sum.as_str()), "the container read other bytes:\n{log}");
    assert!(log.contains("DONE"), "{log}");
    assert!(during_read.len() >= 2, "only {during_read:?} restarted the daemon while the container read:\n{log}");
}

// ---------------------------------------------------------------------------------------
// Calls made while the daemon is down.

/// Writes a small model of its own (seeded by `seed`) to `dir`.
fn write_small_model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("weights.safetensors"), pseudo_random(3 * MIB + 123, seed)).unwrap();
    std::fs::write(dir.join("config.json"), format!("{{\"seed\":{seed}}}")).unwrap();
}

#[test]
fn calls_made_while_the_daemon_restarts_succeed_without_retries() {
    if !node_prerequisites() {
        return;
    }
    let rt = runtime();
    let mut node = Node::start();
    let mut models = Vec::new();
    for (i, name) in ["first", "second", "third"].into_iter().enumerate() {
        let dir = node.tmp.path().join(name);
        write_small_model(&dir, 300 + i as u64);
        let companion = node.push_converted(&dir, name);
        let chain = rt.block_on(companion_layer(&companion)).digest;
        models.push((dir, companion, chain));
    }
    let (first, second, third) = (&models[0], &models[1], &models[2]);
    node.pull(&first.1);
    let mut kubelet = rt.block_on(Cri::connect(&node.containerd.socket));

    node.serve.kill();
    let Node { serve, containerd, .. } = &mut node;
    let ((ls, info, pull, cri_pull), early) = std::thread::scope(|s| {
        let ls = s.spawn(|| ctr(containerd, &["snapshots", "--snapshotter", "modelpack", "ls"]));
        let info = s.spawn(|| ctr(containerd, &["snapshots", "--snapshotter", "modelpack", "info", &first.2]));
        let pull =
            s.spawn(|| ctr(containerd, &["images", "pull", "--plain-http", "--snapshotter", "modelpack", &second.1]));
        let cri_pull = s.spawn(|| rt.block_on(kubelet.pull_with(&third.1, None)));
        // Down for less than the second containerd's gRPC client gives a new connection
        // to answer (its first connect backoff): the calls wait for the daemon in the
        // kept socket's backlog. Longer, and they fail (docs/restarts.md, Limits).
        std::thread::sleep(Duration::from_millis(400));
        let early: Vec<&str> =
            [("ls", ls.is_finished()), ("info", info.is_finished()), ("ctr pull", pull.is_finished())]
                .into_iter()
                .chain([("CRI pull", cri_pull.is_finished())])
                .filter_map(|(name, finished)| finished.then_some(name))
                .collect();
        let next = SnapshotterProcess::start_logged_with(&serve.root, &serve.socket, &serve.config);
        std::mem::forget(std::mem::replace(serve, next));
        let joined = (ls.join().unwrap(), info.join().unwrap(), pull.join().unwrap(), cri_pull.join().unwrap());
        (joined, early)
    });
    let logs = node.logs();
    for (name, (ok, stdout, stderr)) in [("ls", &ls), ("info", &info), ("ctr pull", &pull)] {
        assert!(ok, "ctr {name} made while the daemon was down failed:\n{stdout}\n{stderr}\n{logs}");
    }
    let image_ref =
        cri_pull.unwrap_or_else(|e| panic!("CRI PullImage made while the daemon was down failed: {e}\n{logs}"));
    assert!(
        early.is_empty(),
        "{early:?} finished before the daemon was back: they did not need it?\n{ls:?}\n{info:?}\n{pull:?}"
    );

    assert!(
        ls.1.lines().any(|l| l.starts_with(&first.2) && l.contains("Committed")),
        "ls did not list the model snapshot {}:\n{}",
        first.2,
        ls.1
    );
    let info: serde_json::Value =
        serde_json::from_str(&info.1).unwrap_or_else(|e| panic!("info printed {info:?}: {e}"));
    assert_eq!(info["Name"], first.2.as_str(), "{info}");
    assert_eq!(info["Kind"], "Committed", "{info}");
    assert!(!image_ref.is_empty());

    // Both pulls made their model snapshots, which serve the models' files.
    let listed = node.ctr(&["snapshots", "--snapshotter", "modelpack", "ls"]);
    for (dir, image, chain) in [second, third] {
        assert!(listed.lines().any(|l| l.starts_with(chain.as_str()) && l.contains("Committed")), "{chain}:\n{listed}");
        let key = format!("check-{}", dir.file_name().unwrap().to_string_lossy());
        let target = node.tmp.path().join(&key);
        let view = node.view(image, &target);
        assert_same_tree(dir, &target);
        node.remove_view(view);
    }
}

// ---------------------------------------------------------------------------------------
// Stopping for good.

#[test]
fn a_stop_for_good_leaves_no_mount_and_no_holder() {
    if !node_prerequisites() {
        return;
    }
    let mut node = Node::start();
    let dir = node.tmp.path().join("model");
    write_model_dir(&dir, MIB);
    let companion = node.push_converted(&dir, "stop");
    node.pull(&companion);
    let target = node.tmp.path().join("view");
    let view = node.view(&companion, &target);
    assert_same_tree(&dir, &target);
    // A drain removes the containers first.
    node.remove_view(view);
    let holder = node.serve.holder_pid().expect("a holder keeps the models' connection");
    let printed = node.serve.stop_for_good();
    assert_stopped_for_good(&node, holder, &printed);

    // Started again, the daemon serves the model; killed and not started again, it leaves
    // the model mounted (kept by its holder) until `stop` cleans up.
    node.start_again();
    node.wait_ready();
    node.wait_for_containerd();
    let view = node.view(&companion, &target);
    assert_same_tree(&dir, &target);
    node.remove_view(view);
    let holder = node.serve.holder_pid().expect("a holder keeps the models' connection");
    node.serve.kill();
    assert!(!mounts_under(&node.root()).is_empty(), "the holder keeps the model mounted after the crash");
    let mut stop = Command::new(BIN);
    stop.arg("stop").arg("--root").arg(node.root()).arg("--config").arg(&node.serve.config);
    let Some(out) = run_for_at_most(&mut stop, COMMAND_TIMEOUT) else {
        // Let the cleanup's own `stop` find no holder, so that it cannot hang too.
        // SAFETY: signalling a process by id; the holder's, known alive a moment ago.
        unsafe { libc::kill(holder as i32, libc::SIGKILL) };
        panic!(
            "`stop` after a crash did not finish within {COMMAND_TIMEOUT:?} (mounted: {:?})\n{}",
            mounts_under(&node.root()),
            node.logs()
        );
    };
    let printed = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stop after a crash failed ({}): {printed}{}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        node.logs()
    );
    assert_stopped_for_good(&node, holder, &printed);
}

// ---------------------------------------------------------------------------------------
// The layer store (CRI-O, podman).

/// A podman 4 container (containers/storage 1.43, as CRI-O mounts an image volume) reads
/// a model it mounts from the layer store while the daemon is killed and restarted: the
/// store's session is handed over like the snapshots', so the container sees no error,
/// and a stop for good then leaves nothing mounted.
#[test]
fn a_podman_container_reads_its_model_through_the_layer_store_across_restarts() {
    use common::podman::{require_podman, Flavor as PodmanFlavor, Podman};
    if !prerequisites(true) || !require_podman(PodmanFlavor::V4) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let dir = tmp.path().join("model");
    std::fs::create_dir_all(&dir).unwrap();
    let weights = pseudo_random(CONTAINER_FILE_MIB * MIB, 202);
    let want_sum = hex::encode(sha2::Sha256::digest(&weights));
    std::fs::write(dir.join("weights.bin"), &weights).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"architectures":["Demo"]}"#).unwrap();
    let source = format!("{}/models/store:v1", registry.addr());
    push_dir(&dir, &source, "raw");
    let (ok, _, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "convert {source}: {stderr}");
    let companion = format!("{source}-lazy");
    let busybox = format!("{}/library/busybox:1", registry.addr());
    common::containerd::push_busybox_image(&busybox);

    let (root, store) = (tmp.path().join("root"), tmp.path().join("root/store"));
    let config = write_config(&tmp.path().join("etc"), CONFIG);
    let mut serve = SnapshotterProcess::start_layer_store(&root, &store, &config);
    let podman = Podman::with_layer_store(PodmanFlavor::V4, &store);
    podman.pull(&busybox).unwrap();
    podman.pull(&companion).unwrap();

    let mount = format!("type=image,source={companion},destination=/model");
    let script = slow_reader_script();
    let args = Podman::run_args(&["--mount", &mount], &busybox, &["sh", "-c", &script]);
    let mut container =
        podman.command(&args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let printed = Arc::new(Mutex::new(String::new()));
    // When each `read N` line came: the gaps between them are the reads' stalls.
    let reads = Arc::new(Mutex::new(Vec::new()));
    let collect = |stream: Box<dyn Read + Send>| {
        let (printed, reads) = (printed.clone(), reads.clone());
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stream).lines().map_while(Result::ok) {
                if line.starts_with("read ") {
                    reads.lock().unwrap().push(Instant::now());
                }
                let mut all = printed.lock().unwrap();
                all.push_str(&line);
                all.push('\n');
            }
        })
    };
    use std::io::BufRead as _;
    let out = collect(Box::new(container.stdout.take().unwrap()));
    let err = collect(Box::new(container.stderr.take().unwrap()));
    let seen = |text: &str| printed.lock().unwrap().contains(text);
    let deadline = Instant::now() + Duration::from_secs(120);
    while !seen("START") {
        assert!(Instant::now() < deadline, "the container did not start reading\n{}", serve.log());
        std::thread::sleep(Duration::from_millis(50));
    }

    // Restarts, SIGKILL and SIGTERM in turn, while the container reads.
    let during_read = restart_while_reading(
        0x5707e,
        || seen("DONE"),
        |kind| {
            kind.end(&mut serve);
            // The ended process's handle is forgotten, not dropped: dropping it would stop the
            // new daemon for good.
            let next = SnapshotterProcess::start_layer_store(&root, &store, &config);
            std::mem::forget(std::mem::replace(&mut serve, next));
        },
    );
    let deadline = Instant::now() + Duration::from_secs(180);
    let status = loop {
        if let Some(status) = container.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = container.kill();
            panic!("the container did not finish\n{}\n{}", printed.lock().unwrap(), tail(&serve.log(), 60));
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    out.join().unwrap();
    err.join().unwrap();
    let log = printed.lock().unwrap().clone();
    eprintln!("restarts while the container read through the layer store: {during_read:?}");
    let reads = reads.lock().unwrap().clone();
    let mut gaps: Vec<Duration> = reads.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    let (median, longest) = (gaps.get(gaps.len() / 2).copied(), gaps.last().copied());
    eprintln!(
        "time between two 1 MiB reads through the layer store (each followed by a 120 ms pause), over {} reads: median {} ms, longest {} ms",
        reads.len(),
        median.unwrap_or_default().as_millis(),
        longest.unwrap_or_default().as_millis()
    );

    assert!(!log.contains("FAIL"), "a read failed in the container:\n{log}\n{}", tail(&serve.log(), 60));
    assert!(status.success(), "the container failed ({status}):\n{log}\n{}", tail(&serve.log(), 60));
    let printed_sum = log.lines().find_map(|l| l.strip_prefix("sum ")).map(|s| s.trim_end_matches(" -").trim());
    assert_eq!(printed_sum, Some(want_sum.as_str()), "the container read other bytes:\n{log}");
    assert!(during_read.len() >= 2, "only {during_read:?} restarted the daemon while the container read:\n{log}");
    assert!(serve.log().contains("took over the layer store's session"), "{}", tail(&serve.log(), 60));

    // The layer is still served and released as before; a stop for good unmounts the store.
    podman.rmi(&companion).unwrap();
    drop(podman);
    let holder = serve.holder_pid().expect("a holder keeps the store's connection");
    serve.stop_for_good();
    assert!(!modelpack_snapshotter::fs::is_mountpoint(&store), "the store is still mounted after a stop for good");
    assert!(process_gone(holder), "the holder outlived a stop for good");
}
