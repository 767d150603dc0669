//! Real podmans for the tests of the additional layer store: Debian 12's podman 4.3
//! (containers/storage 1.43, which looks a layer up in the store by its blob digest) and
//! podman 5.4 from the Debian trixie root `scripts/fetch-podman5.sh` builds in
//! `tools/podman5` (containers/storage 1.57, which looks it up by its TOC digest), run
//! through chroot. Each instance keeps its storage, runtime state, locks and temporary
//! files under a temp dir of its own and may name an additional layer store. Dropping it
//! removes its containers and images, kills what is left of its processes and detaches
//! every mount under its dir, even when a test fails.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long one podman command may take before it is killed (a pull of a test image
/// takes a second or two).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(180);
/// How long each cleanup command may take on drop.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(60);

/// Where podman 5's root sees this instance's state, and the store.
const STATE_IN_ROOT: &str = "/test";
const STORE_IN_ROOT: &str = "/store";

/// Which podman.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Debian 12's podman 4.3.1 (containers/storage 1.43): store entries keyed by the
    /// layer's blob digest.
    V4,
    /// Debian 13's podman 5.4 in `tools/podman5`, through chroot (containers/storage
    /// 1.57): store entries keyed by the layer's TOC digest.
    V5,
}

/// The Debian trixie root holding podman 5, if `scripts/fetch-podman5.sh` built it.
pub fn podman5_root() -> Option<PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/podman5");
    root.join("usr/bin/podman").is_file().then_some(root)
}

/// Whether podman `flavor` can run here: root (podman's storage mounts overlays, podman 5
/// needs chroot), and the podman with its runc. Outside CI a missing one skips the test
/// with a printed reason; in CI it fails the test (as [`super::prerequisites`]).
pub fn require_podman(flavor: Flavor) -> bool {
    let mut missing = Vec::new();
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        missing.push("root (podman's storage mounts overlays)".to_owned());
    }
    match flavor {
        Flavor::V4 => {
            for tool in ["podman", "conmon", "runc"] {
                if super::which(tool).is_none() {
                    missing.push(format!("{tool} (Debian package {tool})"));
                }
            }
        }
        Flavor::V5 => match podman5_root() {
            Some(root) if root.join("usr/sbin/runc").is_file() => {}
            _ => missing.push("podman 5 in tools/podman5 (scripts/fetch-podman5.sh)".to_owned()),
        },
    }
    if missing.is_empty() {
        return true;
    }
    let reason = format!("missing prerequisites for podman {flavor:?}: {}", missing.join(", "));
    if super::in_ci() {
        panic!("{reason} (required when CI=true)");
    }
    eprintln!("skipping: {reason}");
    false
}

/// One podman with storage of its own under a temp dir.
pub struct Podman {
    pub flavor: Flavor,
    /// Everything of this instance; `None` once dropped, or kept when something under it
    /// could not be detached (so that removing it never reaches into a mount).
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    /// For podman 5: the root it chroots into (a bind of `tools/podman5`, under `path`).
    chroot: Option<PathBuf>,
    /// This instance's state directory as podman sees it.
    state: String,
    /// The additional layer store as podman sees it.
    store: Option<String>,
}

impl Podman {
    /// A podman with empty storage of its own and no additional layer store.
    pub fn new(flavor: Flavor) -> Self {
        Self::start(flavor, None)
    }

    /// A podman with empty storage of its own that takes layers from the additional
    /// layer store at `store` (on this machine; podman 5 sees it at `/store`). Podman 5's
    /// root gets a bind of what is at `store` now: mount the store before this (and make
    /// a new `Podman` after mounting it again).
    pub fn with_layer_store(flavor: Flavor, store: &Path) -> Self {
        Self::start(flavor, Some(store))
    }

    fn start(flavor: Flavor, store: Option<&Path>) -> Self {
        let dir = tempfile::Builder::new().prefix("podman-").tempdir().unwrap();
        let path = dir.path().to_owned();
        let state_dir = path.join("state");
        std::fs::create_dir_all(&state_dir).unwrap();
        let mut podman = Self {
            flavor,
            dir: Some(dir),
            path: path.clone(),
            chroot: None,
            state: state_dir.display().to_string(),
            store: store.map(|s| s.display().to_string()),
        };
        if flavor == Flavor::V5 {
            // Set on `podman` before any mount, so that its drop undoes whatever part of
            // this was done when a step fails.
            let chroot = path.join("root");
            podman.chroot = Some(chroot.clone());
            podman.state = STATE_IN_ROOT.to_owned();
            podman.store = store.map(|_| STORE_IN_ROOT.to_owned());
            mount_root(&chroot, &state_dir, store);
        }
        // Locks in files under `--tmpdir`, not in the one shared-memory segment every
        // podman of the machine uses whatever its root: an instance then shares no lock
        // with another test's, and a lock its deleted state still held is not left
        // allocated in the segment for good.
        std::fs::write(state_dir.join("containers.conf"), "[engine]\nlock_type = \"file\"\n").unwrap();
        // Nothing from the machine's storage.conf; containers/storage wants both roots in
        // the file even when the flags set them.
        let s = &podman.state;
        std::fs::write(
            state_dir.join("storage.conf"),
            format!("[storage]\ndriver = \"overlay\"\ngraphroot = \"{s}/root\"\nrunroot = \"{s}/runroot\"\n"),
        )
        .unwrap();
        std::fs::create_dir_all(state_dir.join("tmp")).unwrap();
        podman
    }

    /// After the store at `store` was mounted again (the daemon restarted): podman 5's
    /// root binds the new mount in place of the old one, as a node's own podman or CRI-O
    /// sees it at once. Nothing to do for podman 4, which runs on the machine itself.
    pub fn refresh_store(&self, store: &Path) {
        let Some(chroot) = &self.chroot else { return };
        let inside = chroot.join(&STORE_IN_ROOT[1..]);
        for mount in mounts_under(&inside) {
            let _ = modelpack_snapshotter::fs::detach(&mount);
        }
        mount(&["--rbind"], store, &inside, "--make-rslave");
    }

    /// The additional layer store as podman sees it (the path in its `--storage-opt`).
    pub fn store_path(&self) -> Option<&str> {
        self.store.as_deref()
    }

    /// The flags every command of this instance takes: its own storage and state (runc's
    /// too, so a container killed on drop leaves nothing in the machine's `/run/runc`),
    /// the store, and what podman needs on these machines (runc, since crun refuses their
    /// hybrid cgroups; cgroupfs and a file for events, since PID 1 is not systemd).
    pub fn global_flags(&self) -> Vec<String> {
        let s = &self.state;
        let mut flags: Vec<String> = [
            "--root",
            &format!("{s}/root"),
            "--runroot",
            &format!("{s}/runroot"),
            "--tmpdir",
            &format!("{s}/libpod"),
            "--storage-driver",
            "overlay",
            "--runtime",
            "/usr/sbin/runc",
            "--runtime-flag",
            &format!("root={s}/runc"),
            "--cgroup-manager",
            "cgroupfs",
            "--events-backend",
            "file",
        ]
        .iter()
        .map(|f| f.to_string())
        .collect();
        if let Some(store) = &self.store {
            flags.push("--storage-opt".into());
            flags.push(format!("overlay.additionallayerstore={store}:ref"));
        }
        flags
    }

    /// The command `podman ARGS` with the global flags and environment of this instance,
    /// for a caller that runs it itself.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut cmd = match &self.chroot {
            None => Command::new(super::which("podman").expect("podman installed")),
            Some(root) => {
                let mut cmd = Command::new("chroot");
                cmd.arg(root).arg("/usr/bin/podman");
                cmd
            }
        };
        let s = &self.state;
        cmd.args(self.global_flags())
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("HOME", "/root")
            .env("TMPDIR", format!("{s}/tmp"))
            .env("CONTAINERS_CONF", format!("{s}/containers.conf"))
            .env("CONTAINERS_STORAGE_CONF", format!("{s}/storage.conf"))
            // trixie's podman warns on every command on a machine with cgroups v1.
            .env("PODMAN_IGNORE_CGROUPSV1_WARNING", "1")
            .stdin(Stdio::null());
        cmd
    }

    /// Runs `podman ARGS` (after the global flags), returning (success, stdout, stderr).
    /// A command still running after `timeout` is killed and counts as a failure.
    pub fn output_within(&self, args: &[&str], timeout: Duration) -> (bool, String, String) {
        let (status, stdout, stderr) = run_within(self.command(args), timeout);
        (status.is_ok_and(|s| s.success()), stdout, stderr)
    }

    /// Runs `podman ARGS`: its stdout, or on failure a message with stdout and stderr.
    pub fn cmd(&self, args: &[&str]) -> Result<String, String> {
        let (status, stdout, stderr) = run_within(self.command(args), COMMAND_TIMEOUT);
        match status {
            Ok(s) if s.success() => Ok(stdout),
            Ok(s) => Err(format!("podman {:?} {args:?}: {s}\nstdout:\n{stdout}\nstderr:\n{stderr}", self.flavor)),
            Err(e) => Err(format!("podman {:?} {args:?}: {e}\nstdout:\n{stdout}\nstderr:\n{stderr}", self.flavor)),
        }
    }

    /// podman's version (`podman version --format {{.Client.Version}}`).
    pub fn version(&self) -> Result<String, String> {
        self.cmd(&["version", "--format", "{{.Client.Version}}"]).map(|v| v.trim().to_owned())
    }

    /// Pulls `image` from a registry on loopback (plain HTTP).
    pub fn pull(&self, image: &str) -> Result<String, String> {
        self.cmd(&["pull", "--tls-verify=false", image])
    }

    /// Removes `image`.
    pub fn rmi(&self, image: &str) -> Result<String, String> {
        self.cmd(&["rmi", image])
    }

    /// Runs `cmd` in a new container of `image` (removed when it exits): its stdout.
    pub fn run(&self, image: &str, cmd: &[&str]) -> Result<String, String> {
        self.run_with(&[], image, cmd)
    }

    /// Runs `cmd` in a new container of `run_image` with `mounted_image` mounted at
    /// `dest` (`--mount type=image`, as CRI-O mounts an image volume): its stdout.
    pub fn run_with_image_mount(
        &self,
        run_image: &str,
        mounted_image: &str,
        dest: &str,
        cmd: &[&str],
    ) -> Result<String, String> {
        let mount = format!("type=image,source={mounted_image},destination={dest}");
        self.run_with(&["--mount", &mount], run_image, cmd)
    }

    /// Runs `cmd` in a new container of `image` (removed when it exits), with `extra`
    /// options of `podman run`: its stdout.
    pub fn run_with(&self, extra: &[&str], image: &str, cmd: &[&str]) -> Result<String, String> {
        self.cmd(&Self::run_args(extra, image, cmd))
    }

    /// [`Self::run_with`] that fails nothing: (success, stdout, stderr), for a command
    /// whose failure or messages are what a test looks at.
    pub fn run_output(&self, extra: &[&str], image: &str, cmd: &[&str]) -> (bool, String, String) {
        self.output_within(&Self::run_args(extra, image, cmd), COMMAND_TIMEOUT)
    }

    /// The arguments of `podman run` for `cmd` in a new container of `image`, removed
    /// when it exits, with `extra` options.
    pub fn run_args<'a>(extra: &[&'a str], image: &'a str, cmd: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec![
            "run",
            "--rm",
            "--tls-verify=false",
            "--network",
            "none",
            "--ulimit",
            "nofile=1024:1024",
            "--ulimit",
            "nproc=1024:1024",
        ];
        args.extend_from_slice(extra);
        args.push(image);
        args.extend_from_slice(cmd);
        args
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        let Some(dir) = self.dir.take() else { return };
        // Only while the root is there: without it these would run the machine's podman.
        if self.chroot.as_ref().is_none_or(|root| root.join("usr/bin/podman").is_file()) {
            let _ = self.output_within(&["rm", "--all", "--force", "--time", "0"], CLEANUP_TIMEOUT);
            let _ = self.output_within(&["rmi", "--all", "--force"], CLEANUP_TIMEOUT);
        }
        kill_processes_of(&self.path);
        for _ in 0..3 {
            let left = mounts_under(&self.path);
            if left.is_empty() {
                break;
            }
            for mount in left {
                let _ = modelpack_snapshotter::fs::detach(&mount);
            }
        }
        let left = mounts_under(&self.path);
        if left.is_empty() {
            drop(dir);
        } else {
            // Removing the dir would reach into what is still mounted (the machine's /dev
            // and /sys for podman 5): keep it.
            eprintln!("podman harness: still mounted, keeping {}: {left:?}", dir.keep().display());
        }
    }
}

/// Makes `chroot` a root for podman 5: a bind of `tools/podman5` (a root that is itself a
/// mount point: else podman fails to unpack any layer with `remount /, flags: 0x44000:
/// invalid argument`), the machine's `/proc`, `/sys` and `/dev`, this instance's
/// `state` at [`STATE_IN_ROOT`] and the `store` at [`STORE_IN_ROOT`]. Every mount is
/// private or a slave, so nothing mounted or unmounted in there reaches the machine.
fn mount_root(chroot: &Path, state: &Path, store: Option<&Path>) {
    let source = podman5_root().expect("podman 5 fetched by scripts/fetch-podman5.sh");
    for dir in [STATE_IN_ROOT, STORE_IN_ROOT] {
        std::fs::create_dir_all(source.join(&dir[1..])).unwrap();
    }
    std::fs::create_dir_all(chroot).unwrap();
    mount(&["--bind"], &source, chroot, "--make-private");
    for dir in ["proc", "sys", "dev"] {
        mount(&["--rbind"], &Path::new("/").join(dir), &chroot.join(dir), "--make-rslave");
    }
    mount(&["--bind"], state, &chroot.join(&STATE_IN_ROOT[1..]), "--make-private");
    if let Some(store) = store {
        // rbind: a store that is a FUSE mount under a directory comes along.
        mount(&["--rbind"], store, &chroot.join(&STORE_IN_ROOT[1..]), "--make-rslave");
    }
}

/// `mount OPTIONS SOURCE TARGET`, then `mount PROPAGATION TARGET`; panics on failure.
fn mount(options: &[&str], source: &Path, target: &Path, propagation: &str) {
    let out = Command::new("mount").args(options).arg(source).arg(target).output().unwrap();
    assert!(
        out.status.success(),
        "mount {options:?} {} {}: {}",
        source.display(),
        target.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new("mount").arg(propagation).arg(target).output().unwrap();
    assert!(out.status.success(), "mount {propagation} {}: {}", target.display(), String::from_utf8_lossy(&out.stderr));
}

/// Runs `cmd` for at most `timeout` (then kills it): its exit status (or why it has
/// none), stdout and stderr.
pub fn run_within(mut cmd: Command, timeout: Duration) -> (Result<std::process::ExitStatus, String>, String, String) {
    let mut child = match cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => return (Err(format!("cannot start {cmd:?}: {e}")), String::new(), String::new()),
    };
    let read = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    };
    let stdout = read(Box::new(child.stdout.take().unwrap()));
    let stderr = read(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Ok(status),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                break Err(format!("killed after {timeout:?}"));
            }
            Err(e) => break Err(format!("waiting: {e}")),
        }
    };
    // A process the command left running may hold the pipes open: don't wait for it.
    let collect = |handle: std::thread::JoinHandle<String>| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !handle.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        if handle.is_finished() {
            handle.join().unwrap_or_default()
        } else {
            String::new()
        }
    };
    (status, collect(stdout), collect(stderr))
}

/// Every mount point under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let mut found: Vec<PathBuf> = info
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(p.replace("\\040", " ")))
        .filter(|p| p.starts_with(dir))
        .collect();
    found.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    found.dedup();
    found
}

/// Kills (SIGKILL) every process of the podman whose files are under `dir`: conmons and
/// podmans (whose command line names `dir`, or whose root is podman 5's under `dir`) and
/// their descendants (the containers' processes), then waits up to 10 s for them to go.
fn kill_processes_of(dir: &Path) {
    let me = std::process::id();
    let needle = dir.display().to_string();
    // (pid, parent pid, ours)
    let mut procs: Vec<(u32, u32, bool)> = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
        if pid == me {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // The parent is the second field after the command name, which may hold spaces.
        let Some(ppid) = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().nth(1)?.parse().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let names_dir = String::from_utf8_lossy(&cmdline).contains(&needle);
        let rooted_here = std::fs::read_link(entry.path().join("root")).is_ok_and(|root| root.starts_with(dir));
        procs.push((pid, ppid, names_dir || rooted_here));
    }
    let mut ours: std::collections::HashSet<u32> = procs.iter().filter(|p| p.2).map(|p| p.0).collect();
    loop {
        let before = ours.len();
        for &(pid, ppid, _) in &procs {
            if ours.contains(&ppid) {
                ours.insert(pid);
            }
        }
        if ours.len() == before {
            break;
        }
    }
    for &pid in &ours {
        // SAFETY: kill has no memory preconditions; these are processes this instance's
        // podman started.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    // A zombie is gone enough: its parent (perhaps PID 1, which may not reap) has it.
    let alive = |pid: &u32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    };
    while Instant::now() < deadline && ours.iter().any(alive) {
        std::thread::sleep(Duration::from_millis(20));
    }
}
