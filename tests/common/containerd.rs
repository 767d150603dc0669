//! A real containerd for tests: its own root, state, sockets and config under a temp
//! dir, with our snapshotter as the `modelpack` proxy plugin; stopped by PID on drop.
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

impl Containerd {
    /// Starts containerd (1.6 config format, `version = 2`) under `dir`, with the CRI
    /// plugin disabled, talking to the snapshotter at `snapshotter_socket`.
    pub fn start_v2(dir: &Path, snapshotter_socket: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let socket = dir.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]

[grpc]
  address = "{socket}"

[ttrpc]
  address = "{socket}.ttrpc"

[debug]
  address = "{dir}/debug.sock"

[proxy_plugins]
  [proxy_plugins.modelpack]
    type = "snapshot"
    address = "{snapshotter}"
"#,
            root = dir.join("root").display(),
            state = dir.join("state").display(),
            socket = socket.display(),
            dir = dir.display(),
            snapshotter = snapshotter_socket.display(),
        );
        std::fs::write(dir.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
        let child = Command::new("containerd")
            .arg("--config")
            .arg(dir.join("config.toml"))
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
        Self { child: Some(child), dir: dir.to_owned(), socket, namespace: "modelpack-test".to_owned() }
    }

    /// Runs `ctr` against this containerd; returns (success, stdout, stderr).
    pub fn ctr(&self, args: &[&str]) -> (bool, String, String) {
        let out = Command::new("ctr")
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
            // SAFETY: signalling a child we spawned and have not reaped.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline && child.try_wait().unwrap().is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
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
        "config": { "Cmd": ["/bin/sh"], "Env": ["PATH=/bin"] },
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
