//! The CSI node plugin over its socket, driven by a client compiled from the same
//! `proto/csi/v1/csi.proto` (the specification's field numbers), against a real registry
//! and real FUSE and bind mounts: identity, lazy publish of a plain artifact and of a
//! companion, both attribute spellings, one model mount shared by two volumes, idempotent
//! publish and unpublish, and every error code the specification assigns. Then kubelet's
//! whole path, without kubelet: a volume published under a kubelet-like pods directory
//! and read by containers that containerd 2.x runs through the CRI API.

mod common;

use std::path::{Path, PathBuf};

use common::containerd::{Containerd, Flavor};
use common::cri::{cri_prerequisites, fixture, pod_uid, printed_sums, sha256_every_file, sums, Cri};
use common::csi::{capability, node_client, publish, unpublish, Kubelet, NodeClient};
use common::proxy::{Fault, FaultProxy};
use common::*;
use k8s_cri::v1 as cri;
use modelpack_snapshotter::csi::proto::v1 as csi;
use tonic::Code;

/// A model on a registry behind a counting proxy, and a daemon serving CSI alone.
struct Scene {
    _registry: TestRegistry,
    proxy: FaultProxy,
    src: PathBuf,
    plain: String,
    companion: String,
    serve: Option<SnapshotterProcess>,
    root: PathBuf,
    config: PathBuf,
    socket: PathBuf,
    targets: PathBuf,
}

impl Scene {
    fn build(tmp: &Path, config: &str) -> Self {
        let registry = TestRegistry::start();
        let proxy = FaultProxy::start(registry.port);
        let src = tmp.join("src");
        let plain = format!("{}/models/m:v1", proxy.addr());
        push_converted(&src, 9 << 20, &plain, &[]);
        let socket = tmp.join("plugin/csi.sock");
        let config = write_config(&tmp.join("etc"), config);
        let root = tmp.join("root");
        let serve = Some(SnapshotterProcess::start_csi(&root, &socket, &config));
        let targets = tmp.join("root/pods");
        let companion = format!("{plain}-lazy");
        Self { _registry: registry, proxy, src, plain, companion, serve, root, config, socket, targets }
    }

    fn log(&self) -> String {
        self.serve.as_ref().unwrap().log()
    }

    /// Stops the daemon and starts it again (dropped first: a stopped process's drop
    /// detaches what is mounted under its root); returns once the new one says it serves
    /// (its socket accepts connections a moment before).
    fn restart(&mut self) {
        let starts = |log: &str| log.matches("serving CSI").count();
        let before = starts(&self.log());
        drop(self.serve.take());
        self.serve = Some(SnapshotterProcess::start_csi(&self.root, &self.socket, &self.config));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while starts(&self.log()) <= before {
            assert!(std::time::Instant::now() < deadline, "the daemon did not start serving: {}", self.log());
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    async fn node(&self) -> NodeClient {
        node_client(&self.socket).await
    }

    fn target(&self, name: &str) -> PathBuf {
        self.targets.join(name).join("mount")
    }
}

/// The mount options of the mount at `path` (per-mount and superblock).
fn mount_options(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = path.display().to_string();
    info.lines().find(|l| l.split(' ').nth(4) == Some(wanted.as_str())).map(|l| l.to_owned())
}

/// Models mounted for volumes under the daemon's `root`: each is bound once at
/// `<root>/csi/models/<key>`, however many volumes share it.
fn model_mounts(root: &Path) -> usize {
    let models = root.join("csi/models").display().to_string() + "/";
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(&models)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_and_node_info() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = Scene::build(tmp.path(), "[csi]\nnode_id = \"node-7\"\n");
    let channel = unix_channel(&scene.socket).await;
    let mut identity = csi::identity_client::IdentityClient::new(channel.clone());
    let info = identity.get_plugin_info(csi::GetPluginInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.name, "model.csi.modelpack.org");
    assert!(!info.vendor_version.is_empty());
    let probe = identity.probe(csi::ProbeRequest {}).await.unwrap().into_inner();
    assert_eq!(probe.ready, Some(true));
    let caps = identity.get_plugin_capabilities(csi::GetPluginCapabilitiesRequest {}).await.unwrap().into_inner();
    assert!(caps.capabilities.is_empty(), "no controller service: {caps:?}");
    let mut node = csi::node_client::NodeClient::new(channel);
    let info = node.node_get_info(csi::NodeGetInfoRequest {}).await.unwrap().into_inner();
    assert_eq!(info.node_id, "node-7");
    let caps = node.node_get_capabilities(csi::NodeGetCapabilitiesRequest {}).await.unwrap().into_inner();
    assert!(caps.capabilities.is_empty(), "no staging: {caps:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_is_published_lazily_once_for_every_volume() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = Scene::build(tmp.path(), "");
    let mut node = scene.node().await;
    let (a, b) = (scene.target("pod-a"), scene.target("pod-b"));

    // Publish fetches the manifest and config, not the weights.
    scene.proxy.reset_counts();
    node.node_publish_volume(publish("vol-a", &a, &[("modelRef", &scene.plain)])).await.unwrap();
    let (_, fetched) = scene.proxy.blob_counts();
    assert!(fetched < 64 << 10, "publish fetched {fetched} bytes");
    let options = mount_options(&a).expect("the target is a mount");
    for flag in ["ro", "nosuid", "nodev"] {
        assert!(options.split([' ', ',']).any(|o| o == flag), "{flag} missing: {options}");
    }
    // Again, as kubelet may: the same volume at the same target is published already.
    node.node_publish_volume(publish("vol-a", &a, &[("modelRef", &scene.plain)])).await.unwrap();
    // A second volume, with the Model CSI driver's spelling, shares the model's mount.
    let other = [("model.csi.modelpack.org/reference", scene.plain.as_str())];
    node.node_publish_volume(publish("vol-b", &b, &other)).await.unwrap();
    assert_eq!(model_mounts(&scene.root), 1);
    assert_same_tree(&scene.src, &a);
    assert_same_tree(&scene.src, &b);
    let e = std::fs::write(a.join("config.json"), b"{}").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");

    // The same volume and target with another model is refused.
    let e = node.node_publish_volume(publish("vol-a", &a, &[("modelRef", &scene.companion)])).await.unwrap_err();
    assert_eq!(e.code(), Code::AlreadyExists, "{e:?}");

    // Unpublish one: the other still reads; the last one takes the model's mount away.
    node.node_unpublish_volume(unpublish("vol-a", &a)).await.unwrap();
    assert!(!a.exists(), "the target directory is removed");
    assert_same_tree(&scene.src, &b);
    node.node_unpublish_volume(unpublish("vol-b", &b)).await.unwrap();
    assert_eq!(model_mounts(&scene.root), 0);
    // Unpublishing what is not published succeeds.
    node.node_unpublish_volume(unpublish("vol-b", &b)).await.unwrap();
    node.node_unpublish_volume(unpublish("never", &scene.target("never"))).await.unwrap();

    // A companion reference serves its model too, every chunk checked against its index.
    let c = scene.target("pod-c");
    node.node_publish_volume(publish("vol-c", &c, &[("modelRef", &scene.companion)])).await.unwrap();
    assert_same_tree(&scene.src, &c);
    node.node_unpublish_volume(unpublish("vol-c", &c)).await.unwrap();
    assert!(scene.log().contains("volume published"), "{}", scene.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_the_codes_the_specification_gives() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hung = HungServer::start(free_port());
    let scene = Scene::build(tmp.path(), "[registry]\nrequest_timeout_secs = 1\nretries = 0\n");
    let mut node = scene.node().await;
    let target = scene.target("pod");
    let model = [("modelRef", scene.plain.as_str())];
    let code = |r: Result<tonic::Response<csi::NodePublishVolumeResponse>, tonic::Status>| r.unwrap_err().code();

    let mut r = publish("", &target, &model);
    assert_eq!(code(node.node_publish_volume(r).await), Code::InvalidArgument, "no volume id");
    r = publish("v", &target, &model);
    r.target_path.clear();
    assert_eq!(code(node.node_publish_volume(r).await), Code::InvalidArgument, "no target");
    r = publish("v", &target, &model);
    r.volume_capability = None;
    assert_eq!(code(node.node_publish_volume(r).await), Code::InvalidArgument, "no capability");
    r = publish("v", &target, &model);
    r.volume_capability.as_mut().unwrap().access_type =
        Some(csi::volume_capability::AccessType::Block(Default::default()));
    assert_eq!(code(node.node_publish_volume(r).await), Code::InvalidArgument, "block access");
    for mode in [
        csi::volume_capability::access_mode::Mode::MultiNodeMultiWriter,
        csi::volume_capability::access_mode::Mode::MultiNodeSingleWriter,
        csi::volume_capability::access_mode::Mode::Unknown,
    ] {
        r = publish("v", &target, &model);
        r.volume_capability = Some(capability(mode));
        assert_eq!(code(node.node_publish_volume(r).await), Code::InvalidArgument, "{mode:?}");
    }
    let r = publish("v", &target, &[]);
    assert_eq!(code(node.node_publish_volume(r).await), Code::InvalidArgument, "no model named");
    let r = publish("v", &target, &[("modelRef", &scene.plain), ("model.csi.modelpack.org/reference", "a/b:c")]);
    assert_eq!(code(node.node_publish_volume(r).await), Code::InvalidArgument, "two models named");
    let e = node.node_unpublish_volume(unpublish("", &target)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);

    // A reference that does not resolve, and a registry that does not answer.
    let missing = format!("{}/models/nothing-here:v1", scene.proxy.addr());
    let e = node.node_publish_volume(publish("v", &target, &[("modelRef", &missing)])).await.unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let down = format!("127.0.0.1:{}/models/m:v1", hung.port);
    let e = node.node_publish_volume(publish("v", &target, &[("modelRef", &down)])).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable, "{e:?}");
    assert!(e.message().contains(&down), "the cause names the reference: {}", e.message());
    assert!(!target.exists() || mount_options(&target).is_none(), "a failed publish leaves no mount");

    // A path kubelet names that holds somebody else's mount is neither replaced by a
    // publish nor unmounted by the unpublish of a volume this plugin does not know.
    let foreign = scene.target("foreign");
    let other = tmp.path().join("other-mount");
    std::fs::create_dir_all(&foreign).unwrap();
    std::fs::create_dir_all(&other).unwrap();
    modelpack_snapshotter::fs::bind_read_only(&other, &foreign).unwrap();
    let e = node.node_publish_volume(publish("f", &foreign, &model)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    node.node_unpublish_volume(unpublish("f", &foreign)).await.unwrap();
    assert!(mount_options(&foreign).is_some(), "an unknown volume's unpublish unmounted somebody's mount");
    modelpack_snapshotter::fs::detach(&foreign).unwrap();

    // require_lazy_index refuses a plain artifact with no companion, naming convert.
    let bare = format!("{}/models/bare:v1", scene.proxy.addr());
    push_dir(&scene.src, &bare, "raw");
    let config = write_config(&tmp.path().join("strict"), "[cache]\nrequire_lazy_index = true\n");
    let strict_socket = tmp.path().join("strict-plugin/csi.sock");
    let _strict = SnapshotterProcess::start_csi(&tmp.path().join("strict-root"), &strict_socket, &config);
    let mut strict = node_client(&strict_socket).await;
    let e = strict.node_publish_volume(publish("s", &target, &[("modelRef", &bare)])).await.unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    assert!(e.message().contains("convert"), "{}", e.message());
    // A plain artifact that has a companion (found among its referrers) is published.
    strict.node_publish_volume(publish("s", &target, &model)).await.unwrap();
    assert_same_tree(&scene.src, &target);
    strict.node_unpublish_volume(unpublish("s", &target)).await.unwrap();

    // The daemon serves the next request as usual.
    node.node_publish_volume(publish("v", &target, &model)).await.unwrap();
    node.node_unpublish_volume(unpublish("v", &target)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exclusions_hide_files_and_volumes_come_back_after_a_restart() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut scene = Scene::build(tmp.path(), "");
    let mut node = scene.node().await;
    let listed = |dir: &Path| -> Vec<String> { read_tree(dir).into_keys().collect() };

    // Weights left out; then by pattern, the last match deciding.
    let a = scene.target("no-weights");
    let attributes = [("modelRef", scene.plain.as_str()), ("model.csi.modelpack.org/exclude-model-weights", "true")];
    node.node_publish_volume(publish("a", &a, &attributes)).await.unwrap();
    let served = listed(&a);
    assert!(served.iter().all(|p| !p.ends_with(".safetensors")), "{served:?}");
    assert!(served.contains(&"config.json".to_owned()), "{served:?}");
    let b = scene.target("patterns");
    let patterns = r#"["*.json", "!config.json", "*.md"]"#;
    let attributes = [("modelRef", scene.plain.as_str()), ("model.csi.modelpack.org/exclude-file-patterns", patterns)];
    node.node_publish_volume(publish("b", &b, &attributes)).await.unwrap();
    let mut expected: Vec<String> = listed(&scene.src)
        .into_iter()
        .filter(|p| p == "config.json" || !(p.ends_with(".json") || p.ends_with(".md")))
        .collect();
    expected.sort();
    assert_eq!(listed(&b), expected);
    // Exclusions that are malformed, or that leave nothing.
    for (key, value) in [
        ("model.csi.modelpack.org/exclude-model-weights", "yes"),
        ("model.csi.modelpack.org/exclude-file-patterns", "*.json"),
        ("model.csi.modelpack.org/exclude-file-patterns", r#"["*"]"#),
    ] {
        let attributes = [("modelRef", scene.plain.as_str()), (key, value)];
        let e = node.node_publish_volume(publish("c", &scene.target("c"), &attributes)).await.unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{key}={value}: {e:?}");
    }

    // The daemon restarts: both volumes are published again at their targets.
    scene.restart();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while mount_options(&b).is_none() || std::fs::read_dir(&b).is_err() {
        assert!(std::time::Instant::now() < deadline, "not published again: {}", scene.log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(listed(&b), expected);
    let served = listed(&a);
    assert!(served.iter().all(|p| !p.ends_with(".safetensors")) && !served.is_empty(), "{served:?}");
    let mut node = scene.node().await;
    node.node_unpublish_volume(unpublish("a", &a)).await.unwrap();
    node.node_unpublish_volume(unpublish("b", &b)).await.unwrap();
    assert!(mount_options(&a).is_none() && mount_options(&b).is_none());
    // Unpublished volumes stay unpublished across the next restart: none is recorded.
    scene.restart();
    let log = scene.log();
    let last_start = log.lines().rev().find(|l| l.contains("serving CSI")).unwrap_or_default();
    assert!(last_start.contains("restoring=0"), "{last_start}");
    assert!(!a.exists() && !b.exists(), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pull_secret_opens_a_private_model_and_is_never_shown() {
    if !prerequisites(true) || !require_tools(&["htpasswd"]) {
        return;
    }
    use base64::Engine;
    const PASSWORD: &str = "csi-Secret-4b1d";
    let tmp = tempfile::tempdir().unwrap();
    let htpasswd = tmp.path().join("htpasswd");
    let out = std::process::Command::new("htpasswd").args(["-nbB", "-C", "4", "carol", PASSWORD]).output().unwrap();
    std::fs::write(&htpasswd, out.stdout).unwrap();
    let registry = TestRegistry::start_with_htpasswd(&htpasswd);
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("carol:{PASSWORD}"));
    let docker_config = format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr());
    let docker = tmp.path().join("docker");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::write(docker.join("config.json"), &docker_config).unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, 2 << 20);
    let reference = format!("{}/models/private:v1", registry.addr());
    let (ok, _, stderr) =
        run_bin_env(&["push", src.to_str().unwrap(), &reference], &[("DOCKER_CONFIG", docker.as_os_str())]);
    assert!(ok, "{stderr}");

    let socket = tmp.path().join("plugin/csi.sock");
    let config = write_config(&tmp.path().join("etc"), "log_level = \"modelpack_snapshotter=debug\"\n");
    let serve = SnapshotterProcess::start_csi(&tmp.path().join("root"), &socket, &config);
    let mut node = node_client(&socket).await;
    let target = tmp.path().join("root/pods/private/mount");
    let model = [("modelRef", reference.as_str())];

    // Without the pod's secret the registry refuses the node.
    let e = node.node_publish_volume(publish("p", &target, &model)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // With it, the model is served.
    let mut request = publish("p", &target, &model);
    request.secrets.insert(".dockerconfigjson".into(), docker_config.clone());
    node.node_publish_volume(request).await.unwrap();
    assert_same_tree(&src, &target);
    // A second pod naming the same model without the secret does not share the first
    // one's mount: the registry refuses it.
    let other = tmp.path().join("root/pods/other/mount");
    let e = node.node_publish_volume(publish("q", &other, &model)).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A secret that is not a Docker configuration is refused as such.
    let mut request = publish("r", &other, &model);
    request.secrets.insert(".dockerconfigjson".into(), "not json".into());
    let e = node.node_publish_volume(request).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(!e.message().contains("not json"), "{}", e.message());
    node.node_unpublish_volume(unpublish("p", &target)).await.unwrap();

    let log = serve.log();
    assert!(log.contains("source=the request's pull secret"), "{log}");
    for secret in [PASSWORD, &auth, &docker_config] {
        assert!(!log.contains(secret), "the log shows the secret");
    }
    let state = std::fs::read(tmp.path().join("root/csi/volumes.redb")).unwrap_or_default();
    assert!(!state.windows(auth.len()).any(|w| w == auth.as_bytes()), "the secret reached the disk");
}

/// Mount points at or under `dir`.
fn mounts_under(dir: &Path) -> Vec<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let dir = dir.display().to_string();
    info.lines().filter_map(|l| l.split(' ').nth(4)).filter(|p| p.starts_with(&dir)).map(str::to_owned).collect()
}

/// The `/proc/self/mountinfo` line of mount point `path` among `lines` (as a container
/// printed them).
fn mountinfo_line<'a>(lines: &'a str, path: &str) -> Option<&'a str> {
    lines.lines().find(|l| l.split(' ').nth(4) == Some(path))
}

/// kubelet's path for a pod with a CSI inline volume, step by step, against containerd
/// 2.x through CRI with its own overlayfs snapshotter (the model reaches the pod only
/// through the volume). As kubelet: its root a recursively shared mount, the volume
/// published at `pods/<uid>/volumes/kubernetes.io~csi/<volume>/mount` under kubelet's
/// volume id before the sandbox runs, the target handed to each container as a CRI host
/// path mount, read-only, with the propagation kubelet sends for a `volumeMount` without
/// `mountPropagation` (private) and for `HostToContainer` (rslave); each container prints
/// the sha256 of every file of the model. The volume is unpublished once the pod is
/// stopped, and then nothing is left mounted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pod_reads_a_published_model_through_containerd_2_cri() {
    if !cri_prerequisites(Flavor::V2) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tokio::task::block_in_place(|| fixture(tmp.path()));
    let socket = tmp.path().join("plugin/csi.sock");
    let config = write_config(&tmp.path().join("etc"), "");
    let serve = SnapshotterProcess::start_csi(&tmp.path().join("root"), &socket, &config);
    let kubelet = Kubelet::start(&tmp.path().join("kubelet"));
    let containerd =
        Containerd::start_cri_overlayfs(Flavor::V2, &tmp.path().join("containerd"), &f.sandbox, &[f.proxy.addr()]);
    let mut cri = Cri::connect(&containerd.socket).await;
    cri.pull(&f.busybox).await;
    let mut node = node_client(&socket).await;

    // kubelet mounts a pod's volumes before it runs the pod's sandbox.
    let pod = "model-pod";
    let uid = pod_uid(pod);
    let volume = Kubelet::volume_id(&uid, "model");
    let target = kubelet.target(&uid, "model");
    f.proxy.reset_counts();
    node.node_publish_volume(publish(&volume, &target, &[("modelRef", &f.source)])).await.unwrap();
    let (_, fetched) = f.proxy.blob_counts();
    assert!(fetched < f.model_bytes / 8, "publish fetched {fetched} bytes of a {}-byte model", f.model_bytes);

    let logs = tmp.path().join("logs");
    let sandbox = cri.run_sandbox(pod, &logs).await;
    let script = format!("{} && cat /proc/self/mountinfo", sha256_every_file("/model"));
    use cri::MountPropagation::{PropagationHostToContainer, PropagationPrivate};
    for (name, propagation, rslave) in
        [("private", PropagationPrivate, false), ("host-to-container", PropagationHostToContainer, true)]
    {
        let mount = cri::Mount {
            container_path: "/model".into(),
            host_path: target.display().to_string(),
            readonly: true,
            propagation: propagation as i32,
            ..Default::default()
        };
        let (code, log) =
            cri.run_to_exit(&sandbox, name, &f.busybox, &["/bin/sh", "-c", &script], vec![mount], &logs).await;
        assert_eq!(code, 0, "{name}: container failed:\n{log}\n{}\n{}", containerd.log(), serve.log());
        assert_eq!(printed_sums(&log), sums(&f.src), "{name}: the container saw the model's files");
        let line = mountinfo_line(&log, "/model").unwrap_or_else(|| panic!("{name}: /model is not a mount:\n{log}"));
        let fields: Vec<&str> = line.split(' ').collect();
        assert!(fields[5].split(',').any(|o| o == "ro"), "{name}: /model is not read-only: {line}");
        let optional = &fields[6..fields.iter().position(|f| *f == "-").unwrap()];
        let slave = optional.iter().any(|f| f.starts_with("master:"));
        assert_eq!(slave, rslave, "{name}: propagation of /model: {line}");
    }

    // kubelet tears the volume down once the pod's containers have stopped.
    let stop = cri::StopPodSandboxRequest { pod_sandbox_id: sandbox.0.clone() };
    cri.runtime.stop_pod_sandbox(stop).await.unwrap();
    node.node_unpublish_volume(unpublish(&volume, &target)).await.unwrap();
    assert!(!target.exists(), "the target directory is removed");
    assert_eq!(model_mounts(&tmp.path().join("root")), 0, "the model's own mount is gone with its last volume");
    assert_eq!(mounts_under(&kubelet.root), [kubelet.root.display().to_string()], "only kubelet's root is mounted");
    let remove = cri::RemovePodSandboxRequest { pod_sandbox_id: sandbox.0.clone() };
    cri.runtime.remove_pod_sandbox(remove).await.unwrap();
    let pods = cri.runtime.list_pod_sandbox(cri::ListPodSandboxRequest { filter: None }).await.unwrap();
    assert!(pods.into_inner().items.is_empty(), "the pod is removed");
    let containers = cri.runtime.list_containers(cri::ListContainersRequest { filter: None }).await.unwrap();
    assert!(containers.into_inner().containers.is_empty(), "the containers are removed");
    assert!(serve.log().contains("volume unpublished"), "{}", serve.log());

    drop((cri, node, containerd, kubelet, serve));
    assert_eq!(mounts_under(tmp.path()), Vec::<String>::new(), "nothing is left mounted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_reference_is_served_through_the_companion_its_referrers_name() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // Scene::build converts the model: its referrers tag names the companion.
    let scene = Scene::build(tmp.path(), "");
    let mut node = scene.node().await;
    let target = scene.target("checked");
    node.node_publish_volume(publish("v", &target, &[("modelRef", &scene.plain)])).await.unwrap();
    // The registry now flips bits in blob bodies: every byte served is right, or the read
    // fails; none is wrong.
    // The largest file first: its blob spans chunks, which only the index can check
    // one by one.
    scene.proxy.set_fault(Fault::Corrupt, 3);
    let mut files: Vec<(String, Vec<u8>)> = read_tree(&scene.src).into_iter().collect();
    files.sort_by_key(|(_, bytes)| std::cmp::Reverse(bytes.len()));
    for (path, bytes) in files {
        match std::fs::read(target.join(&path)) {
            Ok(got) => assert!(got == bytes, "{path}: wrong bytes served ({} bytes)", got.len()),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{path}: {e}"),
        }
    }
    scene.proxy.clear_fault();
    assert_same_tree(&scene.src, &target);
    node.node_unpublish_volume(unpublish("v", &target)).await.unwrap();
    let log = scene.log();
    assert!(log.contains("serving the model through the lazy index"), "{log}");
    assert!(log.contains("failed verification"), "the corrupt bodies were caught: {log}");
}
