//! Plain references and their companions, found among the manifest's referrers: the
//! referrers tag `convert` maintains on a registry without the referrers API (the test
//! registry, distribution 2.8, has none), chunks checked against the found index under a
//! registry that corrupts bodies, forged referrers ignored, and `--require-lazy-index`.

mod common;

use std::path::Path;

use bytes::Bytes;
use common::liar::WeightForgery;
use common::proxy::{Fault, FaultProxy};
use common::*;
use modelpack_snapshotter::companion::index_from_tar;
use modelpack_snapshotter::config::RegistrySettings;
use modelpack_snapshotter::convert::add_referrers;
use modelpack_snapshotter::modelpack::index::LazyIndex;
use modelpack_snapshotter::modelpack::referrers::{Referrer, ReferrersList};
use modelpack_snapshotter::modelpack::Digest;
use modelpack_snapshotter::registry::{parse_reference, Registry};
use serde_json::json;

/// A shard of several 4 MiB chunks, so that no single chunk is the blob.
const WEIGHT: &str = "model-00001-of-00002.safetensors";
const SHARD: usize = 9 << 20;

fn registry_of(reference: &str) -> Registry {
    Registry::new(parse_reference(reference).unwrap(), RegistrySettings::default())
}

async fn manifest_digest(reference: &str) -> Digest {
    registry_of(reference).fetch_manifest().await.unwrap().1
}

async fn referrers_tag(reference: &str) -> ReferrersList {
    let digest = manifest_digest(reference).await;
    registry_of(reference).referrers_tag(&digest).await.unwrap()
}

/// `inspect REF ARGS...` with a cache of its own under `tmp`: (success, stdout, stderr).
fn inspect(reference: &str, cache: &Path, args: &[&str]) -> (bool, String, String) {
    let mut all = vec!["inspect", reference, "--cache-dir", cache.to_str().unwrap()];
    all.extend_from_slice(args);
    run_bin(&all)
}

/// The number in `unmounted: ..., N verification failures, ...`.
fn verification_failures(line: &str) -> u64 {
    let before = line.split(" verification failures").next().unwrap();
    before.rsplit(' ').next().unwrap().parse().unwrap_or_else(|_| panic!("no count in {line:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_reference_is_checked_against_the_companion_it_finds() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let src = tmp.path().join("src");
    write_model_dir(&src, SHARD);
    // Everything through the proxy: the companion's index location names its address.
    let source = format!("{}/models/m:v1", proxy.addr());
    push_dir(&src, &source, "raw");
    let (_, out, _) = inspect(&source, &tmp.path().join("c0"), &[]);
    assert!(out.contains("lazy index: none"), "{out}");
    let (ok, _, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "{stderr}");
    let (ok, out, stderr) = inspect(&source, &tmp.path().join("c1"), &[]);
    assert!(ok && out.contains("lazy index: sha256:"), "{out}{stderr}");

    let mountpoint = tmp.path().join("mnt");
    let mut m = MountProcess::start(&source, &mountpoint, &tmp.path().join("cache"), &[]).unwrap();
    // The registry now flips bits in blob bodies: every byte served is right, or the
    // read fails; none is wrong.
    proxy.set_fault(Fault::Corrupt, 3);
    let want = read_tree(&src);
    for (path, bytes) in &want {
        match std::fs::read(mountpoint.join(path)) {
            Ok(got) => assert!(got == *bytes, "{path}: wrong bytes served ({} bytes)", got.len()),
            Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{path}: {e}"),
        }
    }
    proxy.clear_fault();
    assert_same_tree(&src, &mountpoint);
    let last = m.stop();
    assert!(verification_failures(&last) >= 1, "the corrupt bodies were caught by chunk digests: {last}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn converting_twice_lists_the_companion_once() {
    if !prerequisites(false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let src = tmp.path().join("src");
    write_model_dir(&src, 1 << 20);
    let source = format!("{}/models/m:v1", registry.addr());
    push_dir(&src, &source, "raw");

    let (ok, first, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("referrers tag sha256-"), "{stderr}");
    let listed = referrers_tag(&source).await;
    let companion: Digest = first.trim().rsplit_once('@').unwrap().1.parse().unwrap();
    assert_eq!(listed.len(), 3, "the companion's index and its two platform manifests");
    assert_eq!(listed.referrers()[0].digest, companion);
    assert_eq!(listed.referrers()[0].artifact_type, None, "an index without an artifact type is listed without");
    for manifest in &listed.referrers()[1..] {
        assert_eq!(manifest.artifact_type.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
    }

    let (ok, second, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "{stderr}");
    assert_eq!(first, second, "convert is deterministic");
    let (ok, _, stderr) = run_bin(&["convert", &source, "--target", &format!("{}/models/m:other", registry.addr())]);
    assert!(ok, "{stderr}");
    assert_eq!(referrers_tag(&source).await, listed, "converting again lists nothing twice");

    // A companion in another repository is not a referrer there.
    let elsewhere = format!("{}/companions/m:v1", registry.addr());
    let (ok, _, stderr) = run_bin(&["convert", &source, "--target", &elsewhere]);
    assert!(ok, "{stderr}");
    assert!(stderr.contains("not listed among its referrers"), "{stderr}");
    assert_eq!(referrers_tag(&source).await, listed);
}

/// Publishes a companion image for `index` in `repo` (`registry/repository`) with
/// `subject` as its subject, and returns its referrer descriptor.
async fn publish_referrer(repo: &str, index: &LazyIndex, subject: &Digest) -> Referrer {
    let json = index.to_json();
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(json.len() as u64);
    header.set_mode(0o444);
    tar.append_data(&mut header, ".modelpack/index.json", &json[..]).unwrap();
    let layer = Bytes::from(tar.into_inner().unwrap());
    let layer_digest = Digest::of(&layer);
    let registry = registry_of(&format!("{repo}:unused"));
    registry.push_bytes(layer.clone(), &layer_digest).await.unwrap();
    let config = Bytes::from(
        serde_json::to_vec(&json!({
            "architecture": "amd64", "os": "linux",
            "rootfs": { "type": "layers", "diff_ids": [layer_digest.to_string()] },
        }))
        .unwrap(),
    );
    let config_digest = Digest::of(&config);
    registry.push_bytes(config.clone(), &config_digest).await.unwrap();
    let subject_size = registry_of(&format!("{repo}@{subject}")).fetch_manifest().await.unwrap().0.len();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": { "mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest.to_string(), "size": config.len() },
        "layers": [{
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer_digest.to_string(),
            "size": layer.len(),
            "annotations": {
                "containerd.io/snapshot/modelpack.source": index.source.reference,
                "containerd.io/snapshot/modelpack.index": format!("{repo}@{layer_digest}"),
                "containerd.io/snapshot/modelpack.version": "1",
            },
        }],
        "subject": { "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": subject.to_string(), "size": subject_size },
    }))
    .unwrap();
    let digest = Digest::of(&manifest);
    let size = manifest.len() as u64;
    registry_of(&format!("{repo}@{digest}"))
        .push_manifest(Bytes::from(manifest), "application/vnd.oci.image.manifest.v1+json")
        .await
        .unwrap();
    Referrer {
        media_type: "application/vnd.oci.image.manifest.v1+json".into(),
        digest,
        size,
        artifact_type: Some("application/vnd.oci.image.config.v1+json".into()),
    }
}

/// The lazy index of the companion at `companion` (its first platform).
async fn index_of(companion: &str) -> LazyIndex {
    let layer = companion_layer(companion).await;
    serde_json::from_slice(&index_from_tar(&layer.bytes).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_referrers_are_ignored() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let repo = format!("{}/models/m", registry.addr());
    let (src_a, src_b) = (tmp.path().join("a"), tmp.path().join("b"));
    write_model_dir(&src_a, SHARD);
    write_model_dir(&src_b, SHARD + 4096);
    let (model_a, model_b) = (format!("{repo}:a"), format!("{repo}:b"));
    push_dir(&src_a, &model_a, "raw");
    push_dir(&src_b, &model_b, "raw");
    let digest_a = manifest_digest(&model_a).await;
    // B's companion, listed among B's referrers, and A's honest index, made elsewhere.
    let (ok, _, stderr) = run_bin(&["convert", &model_b]);
    assert!(ok, "{stderr}");
    let honest_elsewhere = format!("{}/elsewhere/m:a-lazy", registry.addr());
    let (ok, _, stderr) = run_bin(&["convert", &model_a, "--target", &honest_elsewhere]);
    assert!(ok, "{stderr}");

    // Forgery 1: B's companion listed among A's referrers (its index's source is B).
    let b_companions = referrers_tag(&model_b).await.referrers().to_vec();
    // Forgery 2: A's manifest, but the source in the attacker's registry, which answers
    // A's weight with other bytes, and chunk digests of those bytes.
    let forgery = WeightForgery::start(&src_a, WEIGHT);
    let mut forged = index_of(&honest_elsewhere).await;
    forgery.forge(&mut forged, "models/m");
    let liars = publish_referrer(&repo, &forged, &digest_a).await;
    let mut listed = b_companions.clone();
    listed.push(liars);
    assert!(add_referrers(&registry_of(&model_a), &digest_a, &listed).await.unwrap());

    let (ok, out, stderr) = inspect(&model_a, &tmp.path().join("c1"), &[]);
    assert!(ok && out.contains("lazy index: none"), "{out}{stderr}");
    assert!(stderr.contains("describes manifest"), "forgery 1 named: {stderr}");
    assert!(stderr.contains("outside"), "forgery 2 named: {stderr}");
    let (ok, _, stderr) = inspect(&model_a, &tmp.path().join("c2"), &["--require-lazy-index"]);
    assert!(!ok && stderr.contains("modelpack-snapshotter convert"), "{stderr}");

    let mountpoint = tmp.path().join("mnt");
    let mut m = MountProcess::start(&model_a, &mountpoint, &tmp.path().join("cache"), &[]).unwrap();
    assert_same_tree(&src_a, &mountpoint);
    m.stop();

    // Forgery 3: A's manifest in A's repository, with wrong chunk digests: it is used,
    // and the reads it cannot vouch for fail; nothing wrong is served.
    let mut wrong = index_of(&honest_elsewhere).await;
    forgery.vouch(&mut wrong);
    wrong.source.reference = format!("{repo}@{digest_a}");
    let wrong = publish_referrer(&repo, &wrong, &digest_a).await;
    assert!(add_referrers(&registry_of(&model_a), &digest_a, &[wrong]).await.unwrap());
    let mountpoint = tmp.path().join("mnt2");
    let mut m = MountProcess::start(&model_a, &mountpoint, &tmp.path().join("cache2"), &[]).unwrap();
    let err = std::fs::read(mountpoint.join(WEIGHT)).map(|d| d.len()).unwrap_err();
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    assert_eq!(
        std::fs::read(mountpoint.join("config.json")).unwrap(),
        std::fs::read(src_a.join("config.json")).unwrap()
    );
    m.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn require_lazy_index_refuses_a_plain_artifact_without_one() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut registry = TestRegistry::start();
    let src = tmp.path().join("src");
    write_model_dir(&src, 1 << 20);
    let source = format!("{}/models/m:v1", registry.addr());
    push_dir(&src, &source, "raw");
    let cache = tmp.path().join("cache");

    let (ok, _, stderr) = inspect(&source, &cache, &["--require-lazy-index"]);
    assert!(!ok, "refused");
    assert!(stderr.contains("require_lazy_index") && stderr.contains("modelpack-snapshotter convert"), "{stderr}");
    let err =
        MountProcess::start(&source, &tmp.path().join("mnt"), &cache, &["--require-lazy-index"]).map(drop).unwrap_err();
    assert!(err.contains("modelpack-snapshotter convert"), "{err}");

    let (ok, _, stderr) = run_bin(&["convert", &source]);
    assert!(ok, "{stderr}");
    let (ok, out, stderr) = inspect(&source, &cache, &["--require-lazy-index"]);
    assert!(ok && out.contains("lazy index: sha256:"), "{out}{stderr}");
    // With the registry gone, the companion found before is used again.
    registry.stop();
    let (ok, out, stderr) = inspect(&source, &cache, &["--require-lazy-index", "--retries", "0"]);
    assert!(ok && out.contains("lazy index: sha256:"), "{out}{stderr}");
    let mut m =
        MountProcess::start(&source, &tmp.path().join("mnt"), &cache, &["--require-lazy-index", "--retries", "0"])
            .unwrap();
    assert!(m.ready_line.contains("offline"), "{}", m.ready_line);
    m.stop();
}
