//! Kubernetes' path, without kubelet: containerd's CRI API driven by a CRI client, with
//! the snapshotter as the node's snapshotter. containerd 1.6 (Debian) pulls a model
//! companion lazily; containerd 2.x runs a pod whose container has the model as an OCI
//! image volume and prints the model files' sha256, which must match the source.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::containerd::{containerd2_bin, push_busybox_image_with, Containerd, Flavor};
use common::cri::{image_volume, Cri};
use common::proxy::FaultProxy;
use common::*;
use sha2::Digest as _;

fn cri_prerequisites(flavor: Flavor) -> bool {
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

/// A registry with a model, its companion, a busybox image and a sandbox image, all
/// reached through a counting proxy.
struct Fixture {
    _registry: TestRegistry,
    proxy: FaultProxy,
    src: std::path::PathBuf,
    model_bytes: u64,
    companion: String,
    busybox: String,
    sandbox: String,
}

fn fixture(tmp: &Path) -> Fixture {
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
    Fixture { _registry: registry, proxy, src, model_bytes, companion: format!("{source}-lazy"), busybox, sandbox }
}

/// sha256 of every file under `dir`, by relative path.
fn sums(dir: &Path) -> BTreeMap<String, String> {
    read_tree(dir).into_iter().map(|(p, data)| (p, hex::encode(sha2::Sha256::digest(&data)))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_16_cri_pulls_a_model_companion_lazily() {
    if !cri_prerequisites(Flavor::V16) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tokio::task::block_in_place(|| fixture(tmp.path()));
    let serve = SnapshotterProcess::start(&tmp.path().join("snapshotter"));
    let containerd = Containerd::start_cri(
        Flavor::V16,
        &tmp.path().join("containerd"),
        &serve.socket,
        &f.sandbox,
        &[f.proxy.addr()],
    );
    let mut cri = Cri::connect(&containerd.socket).await;

    f.proxy.reset_counts();
    cri.pull(&f.companion).await;
    let (_, fetched) = f.proxy.blob_counts();
    assert!(fetched < f.model_bytes / 8, "PullImage fetched {fetched} bytes of a {}-byte model", f.model_bytes);

    // The model is mounted as the companion's layer snapshot.
    let mut client = snapshots_client(&serve.socket).await;
    use modelpack_snapshotter::snapshotter::proto::snapshots as pb;
    let names = snapshot_names(&serve.socket, "labels.\"containerd.io/snapshot/modelpack.source\"").await;
    assert_eq!(names.len(), 1, "one model snapshot, made from labels: {names:?}\n{}", containerd.log());
    let mounts = client
        .view(pb::ViewSnapshotRequest {
            snapshotter: "modelpack".into(),
            key: "check".into(),
            parent: names[0].clone(),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let target = tmp.path().join("view");
    let _m = mount_all(&mounts, &target);
    assert_eq!(sums(&target), sums(&f.src));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_2_runs_a_pod_with_the_model_as_an_image_volume() {
    if !cri_prerequisites(Flavor::V2) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let f = tokio::task::block_in_place(|| fixture(tmp.path()));
    let serve = SnapshotterProcess::start(&tmp.path().join("snapshotter"));
    let containerd =
        Containerd::start_cri(Flavor::V2, &tmp.path().join("containerd"), &serve.socket, &f.sandbox, &[f.proxy.addr()]);
    let mut cri = Cri::connect(&containerd.socket).await;

    f.proxy.reset_counts();
    cri.pull(&f.companion).await;
    let (_, fetched) = f.proxy.blob_counts();
    assert!(
        fetched < f.model_bytes / 8,
        "PullImage fetched {fetched} bytes of a {}-byte model\n{}",
        f.model_bytes,
        containerd.log()
    );
    cri.pull(&f.busybox).await;

    let logs = tmp.path().join("logs");
    let sandbox = cri.run_sandbox("model-pod", &logs).await;
    let (code, log) = cri
        .run_to_exit(
            &sandbox,
            "reader",
            &f.busybox,
            &["/bin/sh", "-c", "cd /model && find . -type f | sort | while read f; do sha256sum \"$f\"; done"],
            vec![image_volume(&f.companion, "/model")],
            &logs,
        )
        .await;
    cri.remove_sandbox(&sandbox.0).await;
    assert_eq!(code, 0, "container failed:\n{log}\n{}", containerd.log());
    let printed: BTreeMap<String, String> = log
        .lines()
        .filter_map(|l| l.split_once("  "))
        .map(|(sum, path)| (path.trim_start_matches("./").to_owned(), sum.to_owned()))
        .collect();
    assert_eq!(printed, sums(&f.src), "the container saw the model's files");
}
