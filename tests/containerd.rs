//! containerd end to end: a real containerd (1.6, Debian) with our snapshotter as its
//! `modelpack` proxy plugin, pulling from and running images of a local registry.

mod common;

use common::containerd::{push_busybox_image, Containerd};
use common::*;

fn containerd_prerequisites() -> bool {
    prerequisites(true) && require_tools(&["containerd", "ctr", "runc", "containerd-shim-runc-v2", "busybox"])
}

#[test]
fn containerd_pulls_and_runs_an_ordinary_image_through_the_snapshotter() {
    if !containerd_prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let serve = SnapshotterProcess::start(&tmp.path().join("snapshotter"));
    let containerd = Containerd::start_v2(&tmp.path().join("containerd"), &serve.socket);
    let image = format!("{}/library/busybox:test", registry.addr());
    push_busybox_image(&image);

    containerd.ctr_ok(&["images", "pull", "--plain-http", "--snapshotter", "modelpack", &image]);
    let snapshots = containerd.ctr_ok(&["snapshots", "--snapshotter", "modelpack", "ls"]);
    assert!(snapshots.contains("Committed"), "the layer was unpacked into our snapshotter:\n{snapshots}");

    let out = containerd.ctr_ok(&[
        "run",
        "--rm",
        "--snapshotter",
        "modelpack",
        &image,
        "busybox-test",
        "/bin/sh",
        "-c",
        "echo hello from $(cat /proc/1/comm) && ls /bin | wc -l",
    ]);
    assert!(out.contains("hello from sh"), "container output: {out}");
    // The container's rootfs was removed with it; only the image layer remains.
    let snapshots = containerd.ctr_ok(&["snapshots", "--snapshotter", "modelpack", "ls"]);
    assert_eq!(snapshots.lines().count(), 2, "header and the committed layer:\n{snapshots}");
}

/// The one committed model snapshot's backend name, from our snapshotter's own API.
async fn model_snapshot(socket: &std::path::Path) -> String {
    let mut names = snapshot_names(socket, "kind==committed").await;
    assert_eq!(names.len(), 1, "one committed snapshot expected, found {names:?}");
    names.remove(0)
}

/// Views `parent` through our snapshotter and checks the files against `src`.
async fn assert_view_matches(
    socket: &std::path::Path,
    parent: &str,
    key: &str,
    target: &std::path::Path,
    src: &std::path::Path,
) {
    use modelpack_snapshotter::snapshotter::proto::snapshots as pb;
    let mut client = snapshots_client(socket).await;
    let mounts = client
        .view(pb::ViewSnapshotRequest {
            snapshotter: "modelpack".into(),
            key: key.into(),
            parent: parent.into(),
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let _m = mount_all(&mounts, target);
    assert_same_tree(src, target);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn containerd_pulls_a_model_companion_lazily_and_serves_it_across_restarts() {
    if !containerd_prerequisites() {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let proxy = common::proxy::FaultProxy::start(registry.port);
    let src = tmp.path().join("model");
    write_model_dir(&src, 4 << 20);
    let model_bytes: u64 = read_tree(&src).values().map(|v| v.len() as u64).sum();
    let source = format!("{}/models/demo:v1", proxy.addr());
    push_dir(&src, &source, "raw");
    let (ok, stdout, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "convert failed: {stderr}");
    let companion = format!("{}/models/demo:v1-lazy", proxy.addr());
    assert!(stdout.starts_with(&companion), "convert printed {stdout}");
    // Converting again gives the same digests.
    let (_, again, _) = run_bin(&["convert", &source]);
    assert_eq!(again, stdout);

    let mut serve = SnapshotterProcess::start(&tmp.path().join("snapshotter"));
    let containerd = Containerd::start_v2(&tmp.path().join("containerd"), &serve.socket);
    proxy.reset_counts();
    containerd.ctr_ok(&["images", "pull", "--plain-http", "--snapshotter", "modelpack", &companion]);
    let (_, fetched) = proxy.blob_counts();
    assert!(fetched < model_bytes / 8, "pulling the companion fetched {fetched} bytes of a {model_bytes}-byte model");

    let name = model_snapshot(&serve.socket).await;
    assert_view_matches(&serve.socket, &name, "view-1", &tmp.path().join("view-1"), &src).await;

    // After a restart the same snapshot is served again.
    serve.stop();
    let serve = SnapshotterProcess::start(&serve.root.clone());
    assert_eq!(model_snapshot(&serve.socket).await, name);
    assert_view_matches(&serve.socket, &name, "view-2", &tmp.path().join("view-2"), &src).await;
    // A writable overlay child (a container rootfs) over the model, whose complete blobs
    // are read by the kernel directly (passthrough) by now.
    {
        use modelpack_snapshotter::snapshotter::proto::snapshots as pb;
        let mut client = snapshots_client(&serve.socket).await;
        let request = pb::PrepareSnapshotRequest {
            snapshotter: "modelpack".into(),
            key: "rootfs".into(),
            parent: name.clone(),
            labels: Default::default(),
        };
        let mounts = client.prepare(request).await.unwrap().into_inner().mounts;
        let target = tmp.path().join("rootfs");
        let _m = mount_all(&mounts, &target);
        assert_same_tree(&src, &target);
    }
    // containerd still knows the image and its snapshot (once its gRPC connection to the
    // restarted snapshotter has reconnected, which takes a backoff of a second or so).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let snapshots = loop {
        match containerd.ctr(&["snapshots", "--snapshotter", "modelpack", "ls"]) {
            (true, out, _) => break out,
            (false, _, err) if std::time::Instant::now() < deadline && err.contains("connection") => {
                std::thread::sleep(std::time::Duration::from_millis(200))
            }
            (false, out, err) => panic!("ctr snapshots ls failed: {out}{err}"),
        }
    };
    assert!(snapshots.contains("Committed"), "{snapshots}");
}
