//! A real containerd for tests: its own root, state, sockets and config under a temp
//! dir, with our snapshotter as the `modelpack` proxy plugin (or, for CSI volumes,
//! containerd's own overlayfs); stopped by PID on drop.
//! Also builds a tiny real container image from the static busybox binary.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

use super::LayerSpec;

/// A running containerd.
pub struct Containerd {
    child: Option<Child>,
    pub dir: PathBuf,
    pub socket: PathBuf,
    pub namespace: String,
}

/// Which containerd, and with which configuration format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Debian bookworm's containerd 1.6, config `version = 2`.
    V16,
    /// containerd 2.x unpacked into `tools/containerd2` by `scripts/fetch-containerd2.sh`,
    /// config `version = 3`.
    V2,
}

/// The containerd 2.x binary directory, if it was fetched.
pub fn containerd2_bin() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tools/containerd2/usr/bin");
    dir.join("containerd").is_file().then_some(dir)
}

/// Writes `certs.d/<host>/hosts.toml` files that send each loopback registry over plain HTTP.
fn write_hosts(dir: &Path, registries: &[String]) -> PathBuf {
    let certs = dir.join("certs.d");
    for host in registries {
        std::fs::create_dir_all(certs.join(host)).unwrap();
        std::fs::write(
            certs.join(host).join("hosts.toml"),
            format!(
                "server = \"http://{host}\"\n\n[host.\"http://{host}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
        .unwrap();
    }
    certs
}

/// The config lines every test containerd shares: its own root, state and sockets.
fn state_and_sockets(dir: &Path, socket: &Path) -> String {
    format!(
        r#"root = "{root}"
state = "{state}"

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = "{dir}/debug.sock"
"#,
        root = dir.join("root").display(),
        state = dir.join("state").display(),
        socket = socket.display(),
        dir = dir.display(),
    )
}

/// The config lines that make the snapshotter at `socket` containerd's `modelpack`
/// proxy plugin (with remote snapshot annotations for containerd 2.x).
fn proxy_plugin(socket: &Path, annotations_export: bool) -> String {
    let exports = if annotations_export {
        "    [proxy_plugins.modelpack.exports]\n      enable_remote_snapshot_annotations = \"true\"\n"
    } else {
        ""
    };
    format!(
        "\n[proxy_plugins]\n  [proxy_plugins.modelpack]\n    type = \"snapshot\"\n    address = \"{}\"\n{exports}",
        socket.display()
    )
}

impl Containerd {
    /// Starts containerd with the CRI plugin, our snapshotter as the CRI snapshotter
    /// with snapshot annotations on, `sandbox` as the pod sandbox image, and plain HTTP
    /// for `registries`.
    pub fn start_cri(
        flavor: Flavor,
        dir: &Path,
        snapshotter_socket: &Path,
        sandbox: &str,
        registries: &[String],
    ) -> Self {
        Self::start_cri_with(flavor, dir, Some(snapshotter_socket), sandbox, registries, &[])
    }

    /// [`Self::start_cri`] with containerd's own overlayfs snapshotter, as on a node
    /// whose models come through CSI volumes only.
    pub fn start_cri_overlayfs(flavor: Flavor, dir: &Path, sandbox: &str, registries: &[String]) -> Self {
        Self::start_cri_with(flavor, dir, None, sandbox, registries, &[])
    }

    /// [`Self::start_cri_overlayfs`] with a main config that imports `imports` (drop-ins),
    /// as a node's config does.
    pub fn start_cri_importing(
        flavor: Flavor,
        dir: &Path,
        sandbox: &str,
        registries: &[String],
        imports: &[PathBuf],
    ) -> Self {
        Self::start_cri_with(flavor, dir, None, sandbox, registries, imports)
    }

    fn start_cri_with(
        flavor: Flavor,
        dir: &Path,
        snapshotter_socket: Option<&Path>,
        sandbox: &str,
        registries: &[String],
        imports: &[PathBuf],
    ) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let certs = write_hosts(dir, registries);
        let imports: Vec<String> = imports.iter().map(|p| format!("{:?}", p.display().to_string())).collect();
        let common = format!("imports = [{}]\n{}", imports.join(", "), state_and_sockets(dir, &socket));
        let (proxy, snapshotter) = match snapshotter_socket {
            Some(s) => (proxy_plugin(s, flavor == Flavor::V2), "modelpack"),
            None => (String::new(), "overlayfs"),
        };
        let config = match flavor {
            Flavor::V16 => format!(
                r#"version = 2
{common}{proxy}
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{sandbox}"
  restrict_oom_score_adj = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "{snapshotter}"
    disable_snapshot_annotations = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{certs}"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{dir}/cni/bin"
    conf_dir = "{dir}/cni/conf"
"#,
                certs = certs.display(),
                dir = dir.display(),
            ),
            Flavor::V2 => format!(
                r#"version = 3
{common}{proxy}
[plugins.'io.containerd.cri.v1.images']
  snapshotter = "{snapshotter}"
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = "{sandbox}"
  [plugins.'io.containerd.cri.v1.images'.registry]
    config_path = "{certs}"

[plugins.'io.containerd.cri.v1.runtime']
  restrict_oom_score_adj = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
    runtime_type = "io.containerd.runc.v2"
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
      BinaryName = "{runc}"
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ["{dir}/cni/bin"]
    conf_dir = "{dir}/cni/conf"

[plugins.'io.containerd.transfer.v1.local']
  config_path = "{certs}"
  unpack_config = [{{ platform = "linux/{arch}", snapshotter = "{snapshotter}" }}]
"#,
                certs = certs.display(),
                dir = dir.display(),
                runc = super::which("runc").expect("runc installed").display(),
                arch = oci_arch(),
            ),
        };
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let (binary, path) = match flavor {
            Flavor::V16 => (PathBuf::from("containerd"), std::env::var("PATH").unwrap_or_default()),
            Flavor::V2 => {
                let bin = containerd2_bin().expect("containerd 2.x fetched by scripts/fetch-containerd2.sh");
                (bin.join("containerd"), format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default()))
            }
        };
        Self::spawn(dir, socket, &binary, &path)
    }

    fn spawn(dir: &Path, socket: PathBuf, binary: &Path, path: &str) -> Self {
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new(binary)
            .arg("--config")
            .arg(dir.join("config.toml"))
            .env("PATH", path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting containerd");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::os::unix::net::UnixStream::connect(&socket).is_err() {
            assert!(
                Instant::now() < deadline,
                "containerd did not start; log:\n{}",
                std::fs::read_to_string(dir.join("containerd.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child: Some(child), dir: dir.to_owned(), socket, namespace: "k8s.io".to_owned() }
    }

    /// Starts containerd (1.6 config format, `version = 2`) under `dir`, with the CRI
    /// plugin disabled, talking to the snapshotter at `snapshotter_socket`.
    pub fn start_v2(dir: &Path, snapshotter_socket: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
disabled_plugins = ["io.containerd.grpc.v1.cri"]
{common}{proxy}"#,
            common = state_and_sockets(dir, &socket),
            proxy = proxy_plugin(snapshotter_socket, false),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let mut c = Self::spawn(dir, socket, Path::new("containerd"), &std::env::var("PATH").unwrap_or_default());
        c.namespace = "modelpack-test".to_owned();
        c
    }

    /// Runs `ctr` against this containerd; returns (success, stdout, stderr).
    pub fn ctr(&self, args: &[&str]) -> (bool, String, String) {
        self.ctr_with(Path::new("ctr"), args)
    }

    /// [`Containerd::ctr`] with the `ctr` at `program` (containerd 2's own, say).
    pub fn ctr_with(&self, program: &Path, args: &[&str]) -> (bool, String, String) {
        let out = Command::new(program)
            .arg("--address")
            .arg(&self.socket)
            .args(["--namespace", &self.namespace])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("running ctr");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Like [`Self::ctr`], panicking with the output on failure.
    pub fn ctr_ok(&self, args: &[&str]) -> String {
        let (ok, stdout, stderr) = self.ctr(args);
        assert!(ok, "ctr {args:?} failed:\n{stdout}\n{stderr}\ncontainerd log:\n{}", self.log());
        stdout
    }

    /// The containerd log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("containerd.log")).unwrap_or_default()
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            super::terminate(&mut child);
        }
        // Shims outlive containerd; end the ones of this instance and their mounts.
        let _ = Command::new("pkill").arg("-f").arg(format!("containerd-shim.*{}", self.dir.display())).status();
        let _ = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "grep -o ' {}[^ ]*' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l",
                self.dir.display()
            ))
            .status();
    }
}

/// The OCI architecture name of this machine.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Pushes a one-layer image holding the static busybox binary and a few applet links,
/// with `/bin/sh` as its command.
pub fn push_busybox_image(reference: &str) {
    push_busybox_image_with(reference, &["/bin/sh"]);
}

/// Like [`push_busybox_image`], with `cmd` as the image's command (a pod sandbox image
/// runs `sleep`).
pub fn push_busybox_image_with(reference: &str, cmd: &[&str]) {
    let busybox = std::fs::read(super::which("busybox").expect("busybox installed")).unwrap();
    let mut builder = tar::Builder::new(Vec::new());
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o755);
    dir.set_size(0);
    for d in ["bin/", "tmp/", "proc/", "sys/", "dev/", "etc/"] {
        builder.append_data(&mut dir.clone(), d, &[][..]).unwrap();
    }
    let mut file = tar::Header::new_gnu();
    file.set_mode(0o755);
    file.set_size(busybox.len() as u64);
    builder.append_data(&mut file, "bin/busybox", &busybox[..]).unwrap();
    for applet in ["sh", "echo", "cat", "ls", "sha256sum", "sleep", "find", "stat", "head", "wc"] {
        let mut link = tar::Header::new_gnu();
        link.set_entry_type(tar::EntryType::Symlink);
        link.set_mode(0o777);
        link.set_size(0);
        builder.append_link(&mut link, format!("bin/{applet}"), "busybox").unwrap();
    }
    let layer = builder.into_inner().unwrap();
    let diff_id = modelpack_snapshotter::modelpack::Digest::of(&layer).to_string();
    let config = json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": { "Cmd": cmd, "Env": ["PATH=/bin"] },
        "rootfs": { "type": "layers", "diff_ids": [diff_id] },
    });
    let spec =
        LayerSpec { media_type: "application/vnd.oci.image.layer.v1.tar".into(), data: layer, annotations: json!({}) };
    super::push_artifact(
        reference,
        "",
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
        &[spec],
    );
}

/// An ordinary image with one uncompressed tar layer per file of `dir`, under `model/`:
/// the same bytes as a model, for benchmarks to compare with its companion.
pub fn push_ordinary_image(reference: &str, dir: &Path) {
    let mut layers = Vec::new();
    let mut diff_ids = Vec::new();
    for (path, data) in super::read_tree(dir) {
        let mut builder = tar::Builder::new(Vec::with_capacity(data.len() + 4096));
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        builder.append_data(&mut header, format!("model/{path}"), &data[..]).unwrap();
        let layer = builder.into_inner().unwrap();
        diff_ids.push(modelpack_snapshotter::modelpack::Digest::of(&layer).to_string());
        layers.push(super::LayerSpec {
            media_type: "application/vnd.oci.image.layer.v1.tar".into(),
            data: layer,
            annotations: json!({}),
        });
    }
    let config = json!({
        "architecture": oci_arch(),
        "os": "linux",
        "config": {},
        "rootfs": { "type": "layers", "diff_ids": diff_ids },
    });
    super::push_artifact(
        reference,
        "",
        "application/vnd.oci.image.config.v1+json",
        &serde_json::to_vec(&config).unwrap(),
        &layers,
    );
}

/// A benchmark's model: a generated safetensors model of `size` bytes in two shards in
/// `dir`, pushed to the registry at `addr` as `models/bench:v1` and converted, and an
/// ordinary image of the same bytes (`models/bench-image:v1`): (companion, ordinary).
pub fn push_bench_model(dir: &Path, addr: &str, size: u64) -> (String, String) {
    make_bench_model(dir, size);
    let (_, companion) = push_bench_artifact(dir, addr);
    let ordinary = format!("{addr}/models/bench-image:v1");
    push_ordinary_image(&ordinary, dir);
    (companion, ordinary)
}

/// Writes a generated safetensors model of `size` bytes in two shards
/// (`model-0000{1,2}-of-00002.safetensors`) into `dir`, with `scripts/make_model.py`.
pub fn make_bench_model(dir: &Path, size: u64) {
    let status = std::process::Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make_model.py"))
        .arg(dir)
        .args(["--size", &size.to_string(), "--shards", "2"])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Pushes the model in `dir` to the registry at `addr` as the plain artifact
/// `models/bench:v1` and converts it: (artifact, companion).
pub fn push_bench_artifact(dir: &Path, addr: &str) -> (String, String) {
    let source = format!("{addr}/models/bench:v1");
    super::push_dir(dir, &source, "raw");
    let (ok, _, err) = super::run_bin(&["convert", &source]);
    assert!(ok, "{err}");
    let companion = format!("{source}-lazy");
    (source, companion)
}
