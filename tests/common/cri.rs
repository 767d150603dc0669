//! A CRI client (the `k8s-cri` crate's generated API) over containerd's socket, doing
//! what kubelet does for one pod: pull, run a host-network sandbox, run a container,
//! wait for it and read its log. Also what every CRI test starts from: its
//! prerequisites, a registry with a model, a busybox image and a sandbox image, and a
//! registry wanting a password with a private model.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{self as cri, ImageSpec};
use sha2::Digest as _;
use tonic::transport::Channel;

use super::containerd::{containerd2_bin, push_busybox_image_with, Flavor};
use super::proxy::FaultProxy;
use super::{prerequisites, push_dir, read_tree, require_tools, run_bin, run_bin_env, write_model_dir, TestRegistry};

/// Whether a CRI test of `flavor` can run here (skip outside CI, fail in CI).
pub fn cri_prerequisites(flavor: Flavor) -> bool {
    if !prerequisites(true) || !require_tools(&["containerd", "runc", "containerd-shim-runc-v2", "busybox"]) {
        return false;
    }
    if flavor == Flavor::V2 && containerd2_bin().is_none() {
        let reason = "containerd 2.x is not in tools/containerd2 (run scripts/fetch-containerd2.sh)";
        assert!(std::env::var("CI").as_deref() != Ok("true"), "{reason} (required when CI=true)");
        eprintln!("skipping: {reason}");
        return false;
    }
    true
}

/// A registry with a model (a plain ModelPack artifact), its companion, a busybox image
/// and a sandbox image, all reached through a counting proxy.
pub struct Fixture {
    _registry: TestRegistry,
    pub proxy: FaultProxy,
    pub src: PathBuf,
    pub model_bytes: u64,
    /// The model as pushed (a plain artifact).
    pub source: String,
    pub companion: String,
    pub busybox: String,
    pub sandbox: String,
}

/// Builds the [`Fixture`], its model's files under `tmp/model`.
pub fn fixture(tmp: &Path) -> Fixture {
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let src = tmp.join("model");
    write_model_dir(&src, 4 << 20);
    let model_bytes = read_tree(&src).values().map(|v| v.len() as u64).sum();
    let source = format!("{}/models/demo:v1", proxy.addr());
    push_dir(&src, &source, "raw");
    let (ok, _, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "convert: {stderr}");
    let busybox = format!("{}/library/busybox:test", proxy.addr());
    push_busybox_image_with(&busybox, &["/bin/sh"]);
    let sandbox = format!("{}/library/sandbox:test", proxy.addr());
    push_busybox_image_with(&sandbox, &["/bin/sleep", "2147483647"]);
    let companion = format!("{source}-lazy");
    Fixture { _registry: registry, proxy, src, model_bytes, source, companion, busybox, sandbox }
}

/// A registry wanting HTTP basic authentication (htpasswd, one user) and a model in it,
/// pushed and converted by the CLI with a Docker configuration of the test's own (given
/// to those commands alone), reached through a counting proxy.
pub struct PrivateModel {
    _registry: TestRegistry,
    pub proxy: FaultProxy,
    pub src: PathBuf,
    pub model_bytes: u64,
    pub companion: String,
    pub user: String,
    pub password: String,
    /// The directory of the Docker configuration holding the password.
    pub docker_config: PathBuf,
    /// Its `auth` value (base64 of `user:password`).
    pub auth: String,
}

/// Builds the [`PrivateModel`] of `user` and `password`, its files under `tmp/private`.
pub fn private_model(tmp: &Path, user: &str, password: &str) -> PrivateModel {
    use base64::Engine as _;
    let htpasswd = tmp.join("htpasswd");
    let out = std::process::Command::new("htpasswd").args(["-nbB", "-C", "4", user, password]).output().unwrap();
    assert!(out.status.success(), "htpasswd: {}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&htpasswd, out.stdout).unwrap();
    let registry = TestRegistry::start_with_htpasswd(&htpasswd);
    let proxy = FaultProxy::start(registry.port);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let docker_config = tmp.join("docker");
    std::fs::create_dir_all(&docker_config).unwrap();
    std::fs::write(
        docker_config.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, proxy.addr()),
    )
    .unwrap();
    let env = [("DOCKER_CONFIG", docker_config.as_os_str())];
    let src = tmp.join("private");
    write_model_dir(&src, 4 << 20);
    let model_bytes = read_tree(&src).values().map(|v| v.len() as u64).sum();
    let source = format!("{}/models/private:v1", proxy.addr());
    let (ok, _, stderr) = run_bin_env(&["push", src.to_str().unwrap(), &source], &env);
    assert!(ok, "push: {stderr}");
    let (ok, _, stderr) = run_bin_env(&["convert", &source], &env);
    assert!(ok, "convert: {stderr}");
    PrivateModel {
        _registry: registry,
        proxy,
        src,
        model_bytes,
        companion: format!("{source}-lazy"),
        user: user.to_owned(),
        password: password.to_owned(),
        docker_config,
        auth,
    }
}

/// sha256 of every file under `dir`, by relative path.
pub fn sums(dir: &Path) -> BTreeMap<String, String> {
    read_tree(dir).into_iter().map(|(p, data)| (p, hex::encode(sha2::Sha256::digest(&data)))).collect()
}

/// A shell script (for busybox) printing `sha256sum` of every file under `dir`, read
/// back by [`printed_sums`].
pub fn sha256_every_file(dir: &str) -> String {
    format!("cd {dir} && find . -type f | sort | while read f; do sha256sum \"$f\"; done")
}

/// The sums a container running [`sha256_every_file`] printed, by relative path.
pub fn printed_sums(log: &str) -> BTreeMap<String, String> {
    log.lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, path)| (path.trim_start_matches("./").to_owned(), sum.to_owned()))
        .collect()
}

/// The uid [`Cri::run_sandbox`] gives the pod named `name` (kubelet's pod directory
/// is named after it).
pub fn pod_uid(name: &str) -> String {
    format!("{name}-uid")
}

/// Both CRI services on one connection.
pub struct Cri {
    pub images: ImageServiceClient<Channel>,
    pub runtime: RuntimeServiceClient<Channel>,
}

impl Cri {
    /// Connects to containerd's CRI over its socket.
    pub async fn connect(socket: &Path) -> Self {
        let channel = super::unix_channel(socket).await;
        Self { images: ImageServiceClient::new(channel.clone()), runtime: RuntimeServiceClient::new(channel) }
    }

    /// Connects as kubelet does with `--image-service-endpoint`: the runtime service at
    /// `runtime`, the image service at `images`.
    pub async fn connect_split(runtime: &Path, images: &Path) -> Self {
        let images = ImageServiceClient::new(super::unix_channel(images).await);
        Self { images, runtime: RuntimeServiceClient::new(super::unix_channel(runtime).await) }
    }

    /// `PullImage`, returning the image ref containerd reports.
    pub async fn pull(&mut self, image: &str) -> String {
        self.pull_with(image, None).await.unwrap_or_else(|e| panic!("PullImage {image}: {e}"))
    }

    /// `PullImage` with the credentials `auth`, as kubelet sends a pod's pull secret.
    pub async fn pull_with(&mut self, image: &str, auth: Option<cri::AuthConfig>) -> Result<String, tonic::Status> {
        let request = cri::PullImageRequest { image: Some(spec(image)), auth, sandbox_config: None };
        Ok(self.images.pull_image(request).await?.into_inner().image_ref)
    }

    /// Runs a host-network pod sandbox logging under `log_dir`; returns its id and config.
    pub async fn run_sandbox(&mut self, name: &str, log_dir: &Path) -> (String, cri::PodSandboxConfig) {
        self.run_sandbox_with_handler(name, log_dir, "").await
    }

    /// [`Self::run_sandbox`] with a runtime handler (a RuntimeClass's `handler`; "" for
    /// the default), as kubelet runs a pod that names a RuntimeClass.
    pub async fn run_sandbox_with_handler(
        &mut self,
        name: &str,
        log_dir: &Path,
        runtime_handler: &str,
    ) -> (String, cri::PodSandboxConfig) {
        std::fs::create_dir_all(log_dir).unwrap();
        let config = cri::PodSandboxConfig {
            metadata: Some(cri::PodSandboxMetadata {
                name: name.into(),
                uid: pod_uid(name),
                namespace: "default".into(),
                attempt: 0,
            }),
            log_directory: log_dir.display().to_string(),
            linux: Some(cri::LinuxPodSandboxConfig {
                security_context: Some(cri::LinuxSandboxSecurityContext {
                    namespace_options: Some(cri::NamespaceOption {
                        network: cri::NamespaceMode::Node as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let request =
            cri::RunPodSandboxRequest { config: Some(config.clone()), runtime_handler: runtime_handler.to_owned() };
        let id = self
            .runtime
            .run_pod_sandbox(request)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}"))
            .into_inner()
            .pod_sandbox_id;
        (id, config)
    }

    /// Creates and starts a container running `command`, with `mounts`; waits for it to
    /// exit and returns (exit code, log text without CRI prefixes).
    pub async fn run_to_exit(
        &mut self,
        sandbox: &(String, cri::PodSandboxConfig),
        name: &str,
        image: &str,
        command: &[&str],
        mounts: Vec<cri::Mount>,
        log_dir: &Path,
    ) -> (i32, String) {
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: name.into(), attempt: 0 }),
            image: Some(spec(image)),
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            mounts,
            log_path: format!("{name}.log"),
            ..Default::default()
        };
        let request = cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.0.clone(),
            config: Some(config),
            sandbox_config: Some(sandbox.1.clone()),
        };
        let id = self
            .runtime
            .create_container(request)
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}"))
            .into_inner()
            .container_id;
        self.runtime
            .start_container(cri::StartContainerRequest { container_id: id.clone() })
            .await
            .unwrap_or_else(|e| panic!("StartContainer: {e}"));
        let exit_code = self.wait_exited(&id, Duration::from_millis(100)).await;
        (exit_code, read_cri_log(&log_dir.join(format!("{name}.log"))))
    }

    /// Polls a container every `every` until it has exited (60 s at most); its exit code.
    pub async fn wait_exited(&mut self, id: &str, every: Duration) -> i32 {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let request = cri::ContainerStatusRequest { container_id: id.to_owned(), verbose: false };
            let status = self.runtime.container_status(request).await.unwrap().into_inner().status.unwrap();
            if status.state == cri::ContainerState::ContainerExited as i32 {
                return status.exit_code;
            }
            assert!(Instant::now() < deadline, "container {id} did not exit: {status:?}");
            tokio::time::sleep(every).await;
        }
    }

    /// Stops and removes a sandbox and its containers.
    pub async fn remove_sandbox(&mut self, id: &str) {
        let _ = self.runtime.stop_pod_sandbox(cri::StopPodSandboxRequest { pod_sandbox_id: id.into() }).await;
        let _ = self.runtime.remove_pod_sandbox(cri::RemovePodSandboxRequest { pod_sandbox_id: id.into() }).await;
    }
}

/// An image spec naming `image`.
pub fn spec(image: &str) -> ImageSpec {
    ImageSpec { image: image.into(), ..Default::default() }
}

/// A CRI image-volume mount of `image` at `path`, read-only.
pub fn image_volume(image: &str, path: &str) -> cri::Mount {
    cri::Mount { container_path: path.into(), readonly: true, image: Some(spec(image)), ..Default::default() }
}

/// The messages of a CRI log file (`<time> <stream> <tag> <message>` lines).
pub fn read_cri_log(path: &PathBuf) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    text.lines().filter_map(|l| l.splitn(4, ' ').nth(3)).map(|m| format!("{m}\n")).collect()
}
