//! Test harness: a real `docker-registry` on 127.0.0.1, a fault-injecting HTTP proxy in
//! front of it, `mount` processes of the real binary, and artifact builders. Everything
//! runs on its own port and temp dir and is stopped by PID on drop, unmounting even when
//! a test fails.

#![allow(dead_code)]

pub mod containerd;
pub mod cri;
pub mod csi;
pub mod liar;
pub mod podman;
pub mod proxy;

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use modelpack_snapshotter::config::RegistrySettings;
use modelpack_snapshotter::modelpack::Digest;
use modelpack_snapshotter::registry::{parse_reference, Registry};
use serde_json::json;

pub const BIN: &str = env!("CARGO_BIN_EXE_modelpack-snapshotter");

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v == "true")
}

/// Whether the prerequisites of a test are here. Outside CI a missing one skips the
/// test with a printed reason; in CI it fails the test.
pub fn prerequisites(needs_fuse: bool) -> bool {
    let mut missing = Vec::new();
    if registry_binary().is_none() {
        missing.push("docker-registry (Debian package docker-registry)");
    }
    if needs_fuse {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            missing.push("root (to mount FUSE)");
        }
        if !Path::new("/dev/fuse").exists() {
            missing.push("/dev/fuse");
        }
    }
    if missing.is_empty() {
        return true;
    }
    let reason = format!("missing prerequisites: {}", missing.join(", "));
    if in_ci() {
        panic!("{reason} (required when CI=true)");
    }
    eprintln!("skipping: {reason}");
    false
}

/// Whether every program in `tools` is installed (skip outside CI, fail in CI).
pub fn require_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| which(t).is_none()).collect();
    if missing.is_empty() {
        return true;
    }
    let reason = format!("missing programs: {}", missing.join(", "));
    if in_ci() {
        panic!("{reason} (required when CI=true)");
    }
    eprintln!("skipping: {reason}");
    false
}

/// The path of a program on `PATH` (or in the sbin directories, which root's PATH may lack).
pub fn which(tool: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|dir| Path::new(dir).join(tool))
        .find(|p| p.is_file());
    found
}

fn registry_binary() -> Option<PathBuf> {
    ["/usr/bin/docker-registry", "/usr/sbin/docker-registry"].iter().map(PathBuf::from).find(|p| p.exists())
}

/// A free port on loopback (bound then released; the registry binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A CNCF distribution registry on 127.0.0.1, storing under a temp dir.
pub struct TestRegistry {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// The registry process's PID.
    #[allow(dead_code)] // used by the benchmarks only
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("registry running").id()
    }

    pub fn start() -> Self {
        Self::start_with("")
    }

    /// A registry that wants HTTP basic authentication from the users in `htpasswd`
    /// (bcrypt hashes). It reads the file again when it changes.
    pub fn start_with_htpasswd(htpasswd: &Path) -> Self {
        Self::start_with(&format!("auth:\n  htpasswd:\n    realm: test\n    path: {}\n", htpasswd.display()))
    }

    /// A registry whose configuration has `extra` (YAML) appended; `extra` that starts
    /// indented (`  tls: ...`) lands in the `http` section.
    pub fn start_with(extra: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        Self::start_on(dir, &data, extra)
    }

    /// A second registry serving the same storage as `other` (a mirror that holds
    /// everything the origin holds), on a port of its own.
    #[allow(dead_code)] // not every test binary uses it
    pub fn start_sharing(other: &TestRegistry) -> Self {
        Self::start_on(tempfile::tempdir().unwrap(), &other.dir.path().join("data"), "")
    }

    fn start_on(dir: tempfile::TempDir, data: &Path, extra: &str) -> Self {
        let port = free_port();
        let config = dir.path().join("config.yml");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{extra}",
                data.display()
            ),
        )
        .unwrap();
        let mut reg = Self { child: None, port, dir };
        reg.spawn();
        reg
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.path().join("registry.log")).unwrap();
        let child = Command::new(registry_binary().expect("docker-registry installed"))
            .arg("serve")
            .arg(self.dir.path().join("config.yml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        self.child = Some(child);
        wait_for_port(self.port);
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The file holding a blob's bytes in the registry's filesystem storage
    /// (`sha256:<hex>` given); the benchmarks read it to put it in page cache, and a
    /// trust test tampers with it (the registry serves what is there without checking).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2.min(hex.len())])
            .join(hex)
            .join("data")
    }

    /// Starts the registry again after [`Self::stop`], on the same port with the same data.
    pub fn restart(&mut self) {
        if self.child.is_none() {
            self.spawn();
        }
    }

    /// Stops the registry process (the data stays).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("nothing listens on 127.0.0.1:{port}");
}

/// A `modelpack-snapshotter mount` process; dropping it stops it and makes sure the
/// mount is gone.
pub struct MountProcess {
    child: Option<Child>,
    pub mountpoint: PathBuf,
    lines: mpsc::Receiver<String>,
    /// Everything the process printed on stderr, once it has exited.
    stderr: mpsc::Receiver<String>,
    pub ready_line: String,
}

impl MountProcess {
    /// Starts `mount REF DIR ARGS...` and waits for it to say it is ready. On failure
    /// returns what the process printed on stderr.
    pub fn start(reference: &str, mountpoint: &Path, cache_dir: &Path, args: &[&str]) -> Result<Self, String> {
        Self::start_with_env(reference, mountpoint, cache_dir, args, &[])
    }

    /// [`Self::start`] with extra environment variables.
    pub fn start_with_env(
        reference: &str,
        mountpoint: &Path,
        cache_dir: &Path,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> Result<Self, String> {
        // A dead mount left there (by a killed process) makes mkdir fail: leave it to `mount`.
        if !modelpack_snapshotter::fs::is_mountpoint(mountpoint) {
            std::fs::create_dir_all(mountpoint).unwrap();
        }
        let mut child = Command::new(BIN)
            .args(["mount", reference])
            .arg(mountpoint)
            .arg("--cache-dir")
            .arg(cache_dir)
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting mount");
        let (tx, lines) = mpsc::channel();
        let stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut stderr = child.stderr.take().unwrap();
        let (etx, erx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            eprint!("{s}");
            let _ = etx.send(s);
        });
        let mut proc = Self {
            child: Some(child),
            mountpoint: mountpoint.to_owned(),
            lines,
            stderr: erx,
            ready_line: String::new(),
        };
        match proc.lines.recv_timeout(Duration::from_secs(120)) {
            Ok(line) if line.starts_with("ready:") => {
                proc.ready_line = line;
                Ok(proc)
            }
            other => {
                let stderr = proc.stop_with_stderr();
                Err(format!("{other:?}\n{stderr}"))
            }
        }
    }

    /// Stops the process and returns everything it printed on stderr.
    pub fn stop_with_stderr(&mut self) -> String {
        self.stop();
        self.stderr.recv_timeout(Duration::from_secs(10)).unwrap_or_default()
    }

    /// Waits for a stdout line starting with `prefix`.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.starts_with(prefix) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line starting with {prefix:?}: {e}"),
            }
        }
    }

    /// Kills the process with SIGKILL, leaving its mount behind as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process (SIGTERM, then SIGKILL) and returns its last stdout line.
    pub fn stop(&mut self) -> String {
        let mut last = String::new();
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
            while let Ok(line) = self.lines.try_recv() {
                last = line;
            }
        }
        if modelpack_snapshotter::fs::is_mountpoint(&self.mountpoint) {
            let _ = modelpack_snapshotter::fs::detach(&self.mountpoint);
        }
        last
    }
}

impl Drop for MountProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs the binary with `args`, returning (success, stdout, stderr).
pub fn run_bin(args: &[&str]) -> (bool, String, String) {
    run_bin_env(args, &[])
}

/// [`run_bin`] with extra environment variables.
pub fn run_bin_env(args: &[&str], env: &[(&str, &std::ffi::OsStr)]) -> (bool, String, String) {
    let out = Command::new(BIN).args(args).envs(env.iter().copied()).output().expect("running binary");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Deterministic pseudo-random bytes (xorshift), incompressible enough for tests.
pub fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes a small model tree: shards, configs, a nested directory and an empty file.
pub fn write_model_dir(dir: &Path, shard_size: usize) {
    std::fs::create_dir_all(dir.join("docs/extra")).unwrap();
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), pseudo_random(shard_size, 1)).unwrap();
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), pseudo_random(shard_size / 2 + 777, 2)).unwrap();
    std::fs::write(dir.join("config.json"), br#"{"architectures":["Demo"],"hidden_size":64}"#).unwrap();
    std::fs::write(dir.join("tokenizer.json"), pseudo_random(70_000, 3)).unwrap();
    std::fs::write(dir.join("docs/extra/NOTES.md"), b"# notes\n").unwrap();
    std::fs::write(dir.join("docs/empty.txt"), b"").unwrap();
}

/// Every regular file under `dir`, relative path to content.
pub fn read_tree(dir: &Path) -> std::collections::BTreeMap<String, Vec<u8>> {
    let mut out = std::collections::BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            let meta = std::fs::symlink_metadata(&path).unwrap();
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                let rel = path.strip_prefix(dir).unwrap().to_string_lossy().into_owned();
                out.insert(rel, std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display())));
            }
        }
    }
    out
}

/// Asserts two trees hold the same files with the same bytes.
pub fn assert_same_tree(expected: &Path, actual: &Path) {
    let want = read_tree(expected);
    let got = read_tree(actual);
    assert_eq!(want.keys().collect::<Vec<_>>(), got.keys().collect::<Vec<_>>(), "file lists differ");
    for (path, bytes) in &want {
        assert!(got[path] == *bytes, "{path} differs ({} vs {} bytes)", bytes.len(), got[path].len());
    }
}

/// Pushes `dir` with the binary, returning the reference.
pub fn push_dir(dir: &Path, reference: &str, format: &str) {
    let (ok, stdout, stderr) = run_bin(&["push", dir.to_str().unwrap(), reference, "--format", format]);
    assert!(ok, "push failed: {stderr}");
    assert!(stdout.trim().starts_with("sha256:"), "push printed {stdout:?}");
}

/// The model tree of [`write_model_dir`] written to `dir`, pushed as `reference` (raw
/// layers) and converted (`convert REFERENCE ARGS`), its companion at `<reference>-lazy`.
pub fn push_converted(dir: &Path, shard_size: usize, reference: &str, args: &[&str]) {
    write_model_dir(dir, shard_size);
    push_dir(dir, reference, "raw");
    let (ok, _, stderr) = run_bin(&[&["convert", reference], args].concat());
    assert!(ok, "convert {reference}: {stderr}");
}

/// One layer of a hand-built artifact.
pub struct LayerSpec {
    pub media_type: String,
    pub data: Vec<u8>,
    pub annotations: serde_json::Value,
}

/// Pushes blobs and a manifest built from parts, to craft artifacts `push` never makes
/// (legacy media types, compressed tars, hostile paths).
pub fn push_artifact(reference: &str, artifact_type: &str, config_type: &str, config: &[u8], layers: &[LayerSpec]) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let registry = Registry::new(parse_reference(reference).unwrap(), RegistrySettings::default());
        let config_digest = Digest::of(config);
        registry.push_bytes(Bytes::copy_from_slice(config), &config_digest).await.unwrap();
        let mut descs = Vec::new();
        for layer in layers {
            let digest = Digest::of(&layer.data);
            registry.push_bytes(Bytes::copy_from_slice(&layer.data), &digest).await.unwrap();
            descs.push(json!({
                "mediaType": layer.media_type,
                "digest": digest.to_string(),
                "size": layer.data.len(),
                "annotations": layer.annotations,
            }));
        }
        let mut manifest = json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": { "mediaType": config_type, "digest": config_digest.to_string(), "size": config.len() },
            "layers": descs,
        });
        if !artifact_type.is_empty() {
            manifest["artifactType"] = json!(artifact_type);
        }
        registry
            .push_manifest(
                Bytes::from(serde_json::to_vec(&manifest).unwrap()),
                "application/vnd.oci.image.manifest.v1+json",
            )
            .await
            .unwrap();
    });
}

/// Publishes a companion image (one manifest, one index layer) at `target` for the lazy
/// index `json` (taken as it is, so that it may be malformed past its source and version).
pub fn publish_companion(target: &str, json: &[u8]) {
    let index: serde_json::Value = serde_json::from_slice(json).unwrap();
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(json.len() as u64);
    header.set_mode(0o444);
    tar.append_data(&mut header, ".modelpack/index.json", json).unwrap();
    let layer = tar.into_inner().unwrap();
    let layer_digest = Digest::of(&layer);
    let reference = parse_reference(target).unwrap();
    let location = format!("{}/{}@{layer_digest}", reference.registry(), reference.repository());
    let config = serde_json::to_vec(&json!({
        "architecture": "amd64", "os": "linux",
        "rootfs": { "type": "layers", "diff_ids": [layer_digest.to_string()] },
    }))
    .unwrap();
    let layer = LayerSpec {
        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
        data: layer,
        annotations: json!({
            "containerd.io/snapshot/modelpack.source": index["source"]["reference"],
            "containerd.io/snapshot/modelpack.index": location,
            "containerd.io/snapshot/modelpack.version": index["version"].to_string(),
        }),
    };
    push_artifact(target, "", "application/vnd.oci.image.config.v1+json", &config, &[layer]);
}

/// A `modelpack-snapshotter serve` process with its own root and socket.
pub struct SnapshotterProcess {
    child: Option<Child>,
    pub root: PathBuf,
    pub socket: PathBuf,
    /// The configuration it was started with (for `stop`).
    pub config: PathBuf,
}

impl SnapshotterProcess {
    /// Starts `serve` on `root` with the sample configuration (every default) and waits
    /// until the socket accepts connections.
    pub fn start(root: &Path) -> Self {
        Self::start_with(
            root,
            &root.join("snapshotter.sock"),
            &Path::new(env!("CARGO_MANIFEST_DIR")).join("contrib/config.toml"),
        )
    }

    /// Starts `serve` on `root` with its socket at `socket` and configuration `config`,
    /// and waits until the socket accepts connections.
    pub fn start_with(root: &Path, socket: &Path, config: &Path) -> Self {
        let socket = socket.to_owned();
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--root")
            .arg(root)
            .arg("--address")
            .arg(&socket)
            .arg("--config")
            .arg(config)
            .stdout(Stdio::null())
            .spawn()
            .expect("starting serve");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(Instant::now() < deadline, "serve did not listen on {}", socket.display());
            std::thread::sleep(Duration::from_millis(20));
        }
        Self { child: Some(child), root: root.to_owned(), socket, config: config.to_owned() }
    }

    /// [`Self::start_with`], logging to `<root>.log` (see [`SnapshotterProcess::log`]).
    pub fn start_logged_with(root: &Path, socket: &Path, config: &Path) -> Self {
        let args = [OsStr::new("--address"), socket.as_os_str()];
        let mut process =
            Self::start_logged(root, &args, &[], config, || std::os::unix::net::UnixStream::connect(socket).is_ok());
        process.socket = socket.to_owned();
        process
    }

    /// Starts `serve` on `root` serving the layer store alone, mounted at `store`, with
    /// configuration `config`, and waits until the store is mounted. What it logs goes
    /// to `<root>.log` (see [`SnapshotterProcess::log`]).
    pub fn start_layer_store(root: &Path, store: &Path, config: &Path) -> Self {
        let args = [OsStr::new("--layer-store"), store.as_os_str()];
        Self::start_alone(root, &args, config, || modelpack_snapshotter::fs::is_mountpoint(store))
    }

    /// Starts `serve` on `root` serving CSI alone on `socket`, with configuration
    /// `config`, and waits until the socket accepts connections. Logs as
    /// [`SnapshotterProcess::start_layer_store`].
    pub fn start_csi(root: &Path, socket: &Path, config: &Path) -> Self {
        let args = [OsStr::new("--csi-address"), socket.as_os_str()];
        Self::start_alone(root, &args, config, || std::os::unix::net::UnixStream::connect(socket).is_ok())
    }

    /// Starts `serve` on `root` serving the snapshotter on `<root>/snapshotter.sock` and
    /// the CRI image service proxy on `cri_socket`, forwarding to the containerd whose
    /// socket is named in `config`, with `env` added to its environment; waits until both
    /// sockets accept connections. Logs as [`SnapshotterProcess::start_layer_store`].
    pub fn start_cri_proxy(root: &Path, cri_socket: &Path, config: &Path, env: &[(&str, &OsStr)]) -> Self {
        let socket = root.join("snapshotter.sock");
        let args = [OsStr::new("--address"), socket.as_os_str(), OsStr::new("--cri-address"), cri_socket.as_os_str()];
        let connects = |s: &Path| std::os::unix::net::UnixStream::connect(s).is_ok();
        let mut process = Self::start_logged(root, &args, env, config, || connects(&socket) && connects(cri_socket));
        process.socket = socket;
        process
    }

    /// `serve --no-containerd --root ROOT ARGS --config CONFIG`, logging to `<root>.log`,
    /// once `ready` says so.
    fn start_alone(root: &Path, args: &[&OsStr], config: &Path, ready: impl Fn() -> bool) -> Self {
        Self::start_logged(root, &[&[OsStr::new("--no-containerd")], args].concat(), &[], config, ready)
    }

    /// `serve --root ROOT ARGS --config CONFIG` with `env`, logging to `<root>.log`, once
    /// `ready` says so.
    fn start_logged(
        root: &Path,
        args: &[&OsStr],
        env: &[(&str, &OsStr)],
        config: &Path,
        ready: impl Fn() -> bool,
    ) -> Self {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(Self::log_path(root)).unwrap();
        let child = Command::new(BIN)
            .args(["serve", "--root"])
            .arg(root)
            .args(args)
            .arg("--config")
            .arg(config)
            // Plain text, so that tests can look for `key=value` in what it logs.
            .env("NO_COLOR", "1")
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("starting serve");
        let mut process =
            Self { child: Some(child), root: root.to_owned(), socket: PathBuf::new(), config: config.to_owned() };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready() {
            let exited = process.child.as_mut().and_then(|c| c.try_wait().ok().flatten());
            assert!(exited.is_none() && Instant::now() < deadline, "serve {args:?} did not start: {}", process.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        process
    }

    fn log_path(root: &Path) -> PathBuf {
        root.with_extension("log")
    }

    /// What a process started by [`SnapshotterProcess::start_layer_store`] on this root
    /// has logged so far (every run, restarts included).
    pub fn log(&self) -> String {
        std::fs::read_to_string(Self::log_path(&self.root)).unwrap_or_default()
    }

    /// The process's PID.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("serve running").id()
    }

    /// Kills the process with SIGKILL, leaving its mounts behind as a crash (or an
    /// upgrade that does not wait) would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops the process with SIGTERM and waits for it: a restart, which leaves the
    /// models mounted for the next process on this root to take over.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
    }

    /// Stops the daemon of this root for good with `modelpack-snapshotter stop` (also
    /// when it crashed and was not started again), waits for the process, and checks
    /// that no holder is left. Returns what `stop` printed.
    pub fn stop_for_good(&mut self) -> String {
        self.try_stop_for_good().unwrap_or_else(|e| panic!("{e}"))
    }

    fn try_stop_for_good(&mut self) -> Result<String, String> {
        let (ok, out, err) = run_bin(&[
            "stop",
            "--root",
            &self.root.display().to_string(),
            "--config",
            &self.config.display().to_string(),
            "--timeout",
            "30",
        ]);
        if !ok {
            return Err(format!("stop failed: {out}{err}"));
        }
        if let Some(mut child) = self.child.take() {
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        Ok(out)
    }

    /// The process keeping this root's connections and sockets across restarts, if any.
    pub fn holder_pid(&self) -> Option<u32> {
        let holder = modelpack_snapshotter::restart::holder::Holder::connect(&self.root.join("holder.sock"));
        holder.ok().flatten().map(|h| h.pid())
    }
}

impl Drop for SnapshotterProcess {
    /// Stops the daemon for good and detaches whatever it left mounted under its root
    /// (a test that failed may have left a model mounted), and ends its holder: no mount
    /// or process outlives a test.
    fn drop(&mut self) {
        let holder = self.holder_pid();
        if let Err(e) = self.try_stop_for_good() {
            eprintln!("{e}");
            self.stop();
        }
        if let Some(pid) = holder.filter(|pid| Path::new(&format!("/proc/{pid}")).exists()) {
            // SAFETY: signalling a process by id.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        let root = self.root.display().to_string();
        let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let mut left: Vec<&str> =
            info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(&root)).collect();
        left.sort_by_key(|p| std::cmp::Reverse(p.len()));
        for path in left {
            let _ = modelpack_snapshotter::fs::detach(Path::new(path));
        }
    }
}

/// Writes a `serve` configuration file holding `text` (every other key defaults).
pub fn write_config(dir: &Path, text: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

/// A TCP server on loopback that accepts connections and never answers: a registry that
/// hangs. Stops accepting, and drops what it holds, on drop.
pub struct HungServer {
    pub port: u16,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl HungServer {
    /// Listens on 127.0.0.1:`port`.
    pub fn start(port: u16) -> Self {
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
        listener.set_nonblocking(true).unwrap();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut held = Vec::new();
            while !flag.load(Ordering::Relaxed) {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        });
        Self { port, stop, thread: Some(thread) }
    }
}

impl Drop for HungServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

pub type SnapshotsClient =
    modelpack_snapshotter::snapshotter::proto::snapshots::snapshots_client::SnapshotsClient<tonic::transport::Channel>;

/// A gRPC channel over a Unix socket.
pub async fn unix_channel(socket: &Path) -> tonic::transport::Channel {
    let socket = socket.to_owned();
    tonic::transport::Endpoint::try_from("http://localhost")
        .unwrap()
        .connect_with_connector(tower::service_fn(move |_| {
            let socket = socket.clone();
            async move { tokio::net::UnixStream::connect(socket).await.map(hyper_util::rt::TokioIo::new) }
        }))
        .await
        .unwrap_or_else(|e| panic!("connecting over a Unix socket: {e}"))
}

/// A gRPC client of the snapshots API over a Unix socket.
pub async fn snapshots_client(socket: &Path) -> SnapshotsClient {
    SnapshotsClient::new(unix_channel(socket).await)
}

/// The names of the snapshots matching `filter`, from our snapshotter's own API.
pub async fn snapshot_names(socket: &Path, filter: &str) -> Vec<String> {
    use modelpack_snapshotter::snapshotter::proto::snapshots as pb;
    let mut client = snapshots_client(socket).await;
    let request = pb::ListSnapshotsRequest { snapshotter: "modelpack".into(), filters: vec![filter.to_owned()] };
    let mut stream = client.list(request).await.unwrap().into_inner();
    let mut names = Vec::new();
    while let Some(batch) = stream.message().await.unwrap() {
        names.extend(batch.info.into_iter().map(|i| i.name));
    }
    names
}

/// Sends SIGTERM to a child we spawned, waits up to 20 s for it to exit, then kills it.
pub fn terminate(child: &mut Child) {
    // SAFETY: signalling a child we spawned and have not reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline && child.try_wait().ok().flatten().is_none() {
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Mounts what a snapshotter returned at `target` (as containerd would), returning a
/// guard that unmounts.
pub fn mount_all(mounts: &[modelpack_snapshotter::snapshotter::proto::types::Mount], target: &Path) -> Unmount {
    std::fs::create_dir_all(target).unwrap();
    assert_eq!(mounts.len(), 1, "one mount expected: {mounts:?}");
    let m = &mounts[0];
    let mut options = m.options.clone();
    let kind = if m.r#type == "bind" {
        options.retain(|o| o != "rbind");
        options.push("bind".to_owned());
        "none"
    } else {
        m.r#type.as_str()
    };
    let mut cmd = Command::new("mount");
    if kind != "none" {
        cmd.args(["-t", kind]);
    }
    let status = cmd.args(["-o", &options.join(",")]).arg(&m.source).arg(target).status().unwrap();
    assert!(status.success(), "mount {m:?} at {} failed", target.display());
    // A read-only bind needs a remount to take effect on older util-linux.
    if m.r#type == "bind" && m.options.iter().any(|o| o == "ro") {
        let _ = Command::new("mount").args(["-o", "remount,bind,ro"]).arg(target).status();
    }
    Unmount(target.to_owned())
}

/// Unmounts its path on drop.
pub struct Unmount(pub PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
        if modelpack_snapshotter::fs::is_mountpoint(&self.0) {
            let _ = modelpack_snapshotter::fs::detach(&self.0);
        }
    }
}

/// The layer of a companion image (of its first platform, when it is an index): its
/// annotations, digest and bytes.
pub struct CompanionLayer {
    pub annotations: std::collections::HashMap<String, String>,
    pub digest: String,
    pub bytes: Vec<u8>,
}

impl CompanionLayer {
    /// The labels containerd passes to `Prepare` for this layer, with its digest as the
    /// chain ID.
    pub fn prepare_labels(&self) -> std::collections::HashMap<String, String> {
        prepare_labels(&self.annotations, &self.digest)
    }
}

/// The `Prepare` labels containerd passes for a layer annotated with `annotations` whose
/// chain ID is `chain`: the `containerd.io/snapshot/*` annotations and the chain ID.
pub fn prepare_labels(
    annotations: &std::collections::HashMap<String, String>,
    chain: &str,
) -> std::collections::HashMap<String, String> {
    let mut labels = annotations.clone();
    labels.retain(|k, _| k.starts_with("containerd.io/snapshot/"));
    labels.insert("containerd.io/snapshot.ref".into(), chain.into());
    labels
}

/// Prepares the model of the companion `layer` over `client` as containerd does
/// (expecting `AlreadyExists`), then mounts a read-only view of it, `view`, at `target`,
/// as for an image volume.
pub async fn view_model(client: &mut SnapshotsClient, layer: &CompanionLayer, view: &str, target: &Path) -> Unmount {
    use modelpack_snapshotter::snapshotter::proto::snapshots as pb;
    let chain = &layer.digest;
    let prepared = client
        .prepare(pb::PrepareSnapshotRequest {
            snapshotter: "modelpack".into(),
            key: format!("extract-{view} {chain}"),
            parent: String::new(),
            labels: layer.prepare_labels(),
        })
        .await;
    let status = prepared.map(drop).expect_err("a model prepare answers AlreadyExists");
    assert_eq!(status.code(), tonic::Code::AlreadyExists, "{status}");
    let mounts = client
        .view(pb::ViewSnapshotRequest {
            snapshotter: "modelpack".into(),
            key: view.into(),
            parent: chain.clone(),
            labels: std::collections::HashMap::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    mount_all(&mounts, target)
}

/// Fetches the layer of the companion image at `reference`.
pub async fn companion_layer(reference: &str) -> CompanionLayer {
    companion_layer_with(reference, RegistrySettings::default()).await
}

/// Fetches the layer of the companion image at `reference` with `settings` (their
/// credentials).
pub async fn companion_layer_with(reference: &str, settings: RegistrySettings) -> CompanionLayer {
    let parsed = parse_reference(reference).unwrap();
    let registry = Registry::new(parsed.clone(), settings);
    let (mut manifest, _) = registry.fetch_manifest().await.unwrap();
    let top: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    if let Some(first) = top["manifests"][0]["digest"].as_str() {
        manifest =
            registry.with_reference(parsed.clone_with_digest(first.to_owned())).fetch_manifest().await.unwrap().0;
    }
    let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    let layer = &manifest["layers"][0];
    let digest: Digest = layer["digest"].as_str().unwrap().parse().unwrap();
    let bytes = registry.fetch_small_blob(&digest, layer["size"].as_u64().unwrap()).await.unwrap().to_vec();
    CompanionLayer {
        annotations: serde_json::from_value(layer["annotations"].clone()).unwrap(),
        digest: digest.to_string(),
        bytes,
    }
}
