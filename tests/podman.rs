//! The layer store's real clients: podman 4.3 (Debian 12; containers/storage 1.43, which
//! looks a layer up by its blob digest) and podman 5.4 (Debian 13, in a chroot;
//! containers/storage 1.57, which looks it up by its TOC digest, as CRI-O >= 1.31 does).
//! Each pulls a companion through the store fetching a few kilobytes of a 40 MiB model,
//! reads every file of the model in a container that mounts the companion as an image
//! (as CRI-O mounts an image volume), reads it again in a new container after the daemon
//! restarts, and releases it with `podman rmi`; and each pulls the companion normally
//! where no store is configured.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::containerd::push_busybox_image;
use common::podman::{require_podman, Flavor, Podman};
use common::proxy::FaultProxy;
use common::*;
use modelpack_snapshotter::modelpack::Digest;

/// What the store may fetch from the registry for a pull: the index layer and configs.
const PULL_BUDGET: u64 = 8 << 20;

/// `sha256sum` of every file under `dir` in a container: path (relative) → hex digest.
const HASH_ALL: &str = "cd /model && for f in $(find . -type f); do sha256sum \"$f\"; done";

fn parse_sums(out: &str) -> BTreeMap<String, String> {
    out.lines()
        .filter_map(|line| line.split_once("  "))
        .map(|(sum, path)| (path.trim_start_matches("./").to_owned(), sum.to_owned()))
        .collect()
}

fn expected_sums(dir: &Path) -> BTreeMap<String, String> {
    read_tree(dir).into_iter().map(|(path, data)| (path, Digest::of(&data).hex())).collect()
}

fn listed(store: &Path) -> Vec<String> {
    std::fs::read_dir(store).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
}

fn serves_a_companion_to(flavor: Flavor) {
    if !prerequisites(true) || !require_podman(flavor) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let src = tmp.path().join("src");
    let source = format!("{}/models/m:v1", proxy.addr());
    push_converted(&src, 24 << 20, &source, &[]);
    let companion = format!("{source}-lazy");
    let busybox = format!("{}/library/busybox:1", proxy.addr());
    push_busybox_image(&busybox);
    let expected = expected_sums(&src);

    let (root, store) = (tmp.path().join("root"), tmp.path().join("root/store"));
    let config = write_config(&tmp.path().join("etc"), "");
    let serve = SnapshotterProcess::start_layer_store(&root, &store, &config);
    let podman = Podman::with_layer_store(flavor, &store);
    podman.pull(&busybox).unwrap();

    // The pull takes the companion's layer from the store: a few kilobytes fetched.
    proxy.reset_counts();
    podman.pull(&companion).unwrap();
    let (_, fetched) = proxy.blob_counts();
    assert!(fetched < PULL_BUDGET, "{flavor:?}: the pull fetched {fetched} bytes");
    assert!(!listed(&store).is_empty(), "{flavor:?}: the layer did not come from the store: {}", serve.log());

    // Every file of the model, read in a container with the companion as an image mount.
    let out = podman.run_with_image_mount(&busybox, &companion, "/model", &["sh", "-c", HASH_ALL]).unwrap();
    assert_eq!(parse_sums(&out), expected, "{flavor:?}");

    // The daemon restarts: a new container reads the model again through the same paths.
    // (Dropped first: a stopped process's drop detaches what is mounted under its root.)
    drop(serve);
    let serve = SnapshotterProcess::start_layer_store(&root, &store, &config);
    podman.refresh_store(&store);
    let out = podman
        .run_with_image_mount(&busybox, &companion, "/model", &["sh", "-c", HASH_ALL])
        .unwrap_or_else(|e| panic!("{e}\n{}", serve.log()));
    assert_eq!(parse_sums(&out), expected, "{flavor:?} after a restart");

    // `podman rmi` releases the layer: the store drops it.
    podman.rmi(&companion).unwrap();
    assert!(listed(&store).is_empty(), "{flavor:?}: still listed after rmi: {:?}", listed(&store));
    assert!(serve.log().contains("layer released by every user; dropped"), "{}", serve.log());
    drop(podman);

    // Where no store is configured the companion pulls as an ordinary image: its one
    // layer is the index file.
    let plain = Podman::new(flavor);
    plain.pull(&busybox).unwrap();
    plain.pull(&companion).unwrap();
    let out = plain.run_with_image_mount(&busybox, &companion, "/model", &["sh", "-c", HASH_ALL]).unwrap();
    assert_eq!(parse_sums(&out).into_keys().collect::<Vec<_>>(), [".modelpack/index.json"], "{flavor:?}");
}

#[test]
fn podman_4_takes_a_companion_from_the_store_by_its_blob_digest() {
    serves_a_companion_to(Flavor::V4);
}

#[test]
fn podman_5_takes_a_companion_from_the_store_by_its_toc_digest() {
    serves_a_companion_to(Flavor::V5);
}
