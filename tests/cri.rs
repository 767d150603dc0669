//! Kubernetes' path, without kubelet: containerd's CRI API driven by a CRI client, with
//! the snapshotter as the node's snapshotter. containerd 1.6 (Debian) pulls a model
//! companion lazily; containerd 2.x runs a pod whose container has the model as an OCI
//! image volume and prints the model files' sha256, which must match the source.

mod common;

use common::containerd::{Containerd, Flavor};
use common::cri::{cri_prerequisites, fixture, image_volume, printed_sums, sha256_every_file, sums, Cri};
use common::*;

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
            &["/bin/sh", "-c", &sha256_every_file("/model")],
            vec![image_volume(&f.companion, "/model")],
            &logs,
        )
        .await;
    cri.remove_sandbox(&sandbox.0).await;
    assert_eq!(code, 0, "container failed:\n{log}\n{}", containerd.log());
    assert_eq!(printed_sums(&log), sums(&f.src), "the container saw the model's files");
}
