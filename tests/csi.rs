//! The CSI node plugin over its socket, driven by a client compiled from the same
//! `proto/csi/v1/csi.proto` (the specification's field numbers), against a real registry
//! and real FUSE and bind mounts: identity, lazy publish of a plain artifact and of a
//! companion, both attribute spellings, one model mount shared by two volumes, idempotent
//! publish and unpublish, and every error code the specification assigns.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use common::proxy::FaultProxy;
use common::*;
use modelpack_snapshotter::csi::proto::v1 as csi;
use tonic::Code;

type NodeClient = csi::node_client::NodeClient<tonic::transport::Channel>;

/// A model on a registry behind a counting proxy, and a daemon serving CSI alone.
struct Scene {
    _registry: TestRegistry,
    proxy: FaultProxy,
    src: PathBuf,
    plain: String,
    companion: String,
    serve: SnapshotterProcess,
    socket: PathBuf,
    targets: PathBuf,
}

impl Scene {
    fn build(tmp: &Path, config: &str) -> Self {
        let registry = TestRegistry::start();
        let proxy = FaultProxy::start(registry.port);
        let src = tmp.join("src");
        write_model_dir(&src, 9 << 20);
        let plain = format!("{}/models/m:v1", proxy.addr());
        push_dir(&src, &plain, "raw");
        let (ok, _, stderr) = run_bin(&["convert", &plain]);
        assert!(ok, "{stderr}");
        let socket = tmp.join("plugin/csi.sock");
        let config = write_config(&tmp.join("etc"), config);
        let serve = SnapshotterProcess::start_csi(&tmp.join("root"), &socket, &config);
        let targets = tmp.join("root/pods");
        Self { _registry: registry, proxy, src, companion: format!("{plain}-lazy"), plain, serve, socket, targets }
    }

    async fn node(&self) -> NodeClient {
        NodeClient::new(unix_channel(&self.socket).await)
    }

    fn target(&self, name: &str) -> PathBuf {
        self.targets.join(name).join("mount")
    }
}

fn read_only_mount() -> csi::VolumeCapability {
    capability(csi::volume_capability::access_mode::Mode::SingleNodeWriter)
}

fn capability(mode: csi::volume_capability::access_mode::Mode) -> csi::VolumeCapability {
    csi::VolumeCapability {
        access_type: Some(csi::volume_capability::AccessType::Mount(Default::default())),
        access_mode: Some(csi::volume_capability::AccessMode { mode: mode as i32 }),
    }
}

/// What kubelet sends for an inline volume with these attributes.
fn publish(volume: &str, target: &Path, attributes: &[(&str, &str)]) -> csi::NodePublishVolumeRequest {
    let mut context: HashMap<String, String> = attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    context.insert("csi.storage.k8s.io/ephemeral".into(), "true".into());
    context.insert("csi.storage.k8s.io/pod.name".into(), "model-server".into());
    csi::NodePublishVolumeRequest {
        volume_id: volume.into(),
        target_path: target.display().to_string(),
        volume_capability: Some(read_only_mount()),
        readonly: true,
        volume_context: context,
        ..Default::default()
    }
}

fn unpublish(volume: &str, target: &Path) -> csi::NodeUnpublishVolumeRequest {
    csi::NodeUnpublishVolumeRequest { volume_id: volume.into(), target_path: target.display().to_string() }
}

/// The mount options of the mount at `path` (per-mount and superblock).
fn mount_options(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let wanted = path.display().to_string();
    info.lines().find(|l| l.split(' ').nth(4) == Some(wanted.as_str())).map(|l| l.to_owned())
}

/// FUSE filesystems (distinct devices; binds of one share its device) serving `reference`.
fn model_mounts(reference: &str) -> usize {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    let devices: std::collections::BTreeSet<&str> = info
        .lines()
        .filter(|l| l.contains(&format!("modelpack:{reference} ")))
        .filter_map(|l| l.split(' ').nth(2))
        .collect();
    devices.len()
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
    assert_eq!(model_mounts(&scene.plain), 1);
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
    assert_eq!(model_mounts(&scene.plain), 0);
    // Unpublishing what is not published succeeds.
    node.node_unpublish_volume(unpublish("vol-b", &b)).await.unwrap();
    node.node_unpublish_volume(unpublish("never", &scene.target("never"))).await.unwrap();

    // A companion reference serves its model too, every chunk checked against its index.
    let c = scene.target("pod-c");
    node.node_publish_volume(publish("vol-c", &c, &[("modelRef", &scene.companion)])).await.unwrap();
    assert_same_tree(&scene.src, &c);
    node.node_unpublish_volume(unpublish("vol-c", &c)).await.unwrap();
    assert!(scene.serve.log().contains("volume published"), "{}", scene.serve.log());
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

    // The daemon serves the next request as usual.
    node.node_publish_volume(publish("v", &target, &model)).await.unwrap();
    node.node_unpublish_volume(unpublish("v", &target)).await.unwrap();
}
