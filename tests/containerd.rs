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
