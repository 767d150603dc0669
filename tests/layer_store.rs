//! The containers/storage additional layer store, driven through the filesystem the way
//! containers/storage drives it (lookups of `<base64(ref)>/<key>/{diff,info,blob}`,
//! `create(<layer>/use)`, `rmdir(<layer>)`), against a real registry and a real FUSE
//! mount: both lookup keys, ordinary images and unknown keys, use counts across a
//! restart with the registry gone, and the attacker — forged TOC annotations and index
//! locations, a registry that lies about the index layer, a registry that hangs, a user
//! who is not root, a tag moved while no daemon ran. `tests/podman.rs` runs the
//! real clients.

mod common;

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use common::containerd::push_busybox_image;
use common::liar::LyingRegistry;
use common::proxy::FaultProxy;
use common::*;
use modelpack_snapshotter::layerstore::encode_reference;
use modelpack_snapshotter::modelpack::labels;
use modelpack_snapshotter::modelpack::Digest;
use modelpack_snapshotter::registry::{parse_reference, Registry};

/// A model and its companion on a registry (reached through a counting proxy), and a
/// daemon serving the layer store.
struct Scene {
    registry: TestRegistry,
    proxy: FaultProxy,
    src: PathBuf,
    companion: String,
    layer: CompanionLayer,
    root: PathBuf,
    store: PathBuf,
    config: PathBuf,
    serve: Option<SnapshotterProcess>,
}

impl Scene {
    async fn build(tmp: &Path, config: &str) -> Self {
        let registry = TestRegistry::start();
        let proxy = FaultProxy::start(registry.port);
        let src = tmp.join("src");
        let source = format!("{}/models/m:v1", proxy.addr());
        push_converted(&src, 9 << 20, &source, &[]);
        let companion = format!("{source}-lazy");
        let layer = companion_layer(&companion).await;
        let (root, store) = (tmp.join("root"), tmp.join("root/store"));
        let config = write_config(&tmp.join("etc"), config);
        let serve = Some(SnapshotterProcess::start_layer_store(&root, &store, &config));
        Self { registry, proxy, src, companion, layer, root, store, config, serve }
    }

    /// `<store>/<base64(reference)>/<key>`.
    fn layer_dir(&self, reference: &str, key: &str) -> PathBuf {
        self.store.join(encode_reference(reference)).join(key)
    }

    fn toc(&self) -> String {
        self.layer.annotations[labels::TOC_DIGEST].clone()
    }

    fn restart(&mut self) {
        self.serve.take().unwrap().stop();
        self.serve = Some(SnapshotterProcess::start_layer_store(&self.root, &self.store, &self.config));
    }

    fn log(&self) -> String {
        self.serve.as_ref().unwrap().log()
    }
}

/// The companion is what CRI-O (>= 1.33) pulls as an image, not as an OCI artifact for
/// its artifact store: an image index whose manifests have image configs and no
/// `artifactType` (their `subject` does not count).
async fn assert_plain_image(registry: &Registry, top: &[u8]) {
    let top: serde_json::Value = serde_json::from_slice(top).unwrap();
    assert_eq!(top["mediaType"], "application/vnd.oci.image.index.v1+json");
    for entry in top["manifests"].as_array().unwrap() {
        let pinned = registry.reference().clone_with_digest(entry["digest"].as_str().unwrap().to_owned());
        let (manifest, _) = registry.with_reference(pinned).fetch_manifest().await.unwrap();
        let manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
        assert!(manifest.get("artifactType").is_none(), "{manifest}");
        assert_eq!(manifest["config"]["mediaType"], "application/vnd.oci.image.config.v1+json");
        assert!(manifest["subject"]["digest"].is_string(), "the companion still names its model");
    }
}

/// containers/storage's `use` notice: creating the file fails with `ENOENT`.
fn notify_use(layer: &Path) {
    let e = std::fs::File::create(layer.join("use")).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
}

/// containers/storage's release: removing the layer directory fails with `ENOENT`.
fn release(layer: &Path) {
    let e = std::fs::remove_dir(layer).unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");
}

fn not_found(path: &Path) {
    match std::fs::metadata(path) {
        Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{}: {e}", path.display()),
        Ok(_) => panic!("{} is served", path.display()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_companion_is_served_under_both_keys_and_nothing_else_is() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = Scene::build(tmp.path(), "").await;
    let by_blob = scene.layer_dir(&scene.companion, &scene.layer.digest);
    let by_toc = scene.layer_dir(&scene.companion, &scene.toc());
    for dir in [&by_blob, &by_toc] {
        assert_same_tree(&scene.src, &dir.join("diff"));
        let info: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join("info")).unwrap()).unwrap();
        assert_eq!(info["diff-digest"], scene.layer.digest);
        assert_eq!(info["compressed-diff-digest"], scene.layer.digest);
        assert_eq!(info["toc-digest"], scene.toc());
        assert_eq!(info["flags"]["expected-layer-diffid"], scene.layer.digest);
        assert_eq!(std::fs::read(dir.join("blob")).unwrap(), scene.layer.bytes);
    }
    // The TOC digest names the index JSON inside the layer.
    let json = modelpack_snapshotter::companion::index_from_tar(&scene.layer.bytes).unwrap();
    assert_eq!(Digest::of(&json).to_string(), scene.toc());
    // The same model under a digest reference too: opened once for all three.
    let registry = Registry::new(parse_reference(&scene.companion).unwrap(), Default::default());
    let (top, index_digest) = registry.fetch_manifest().await.unwrap();
    assert_plain_image(&registry, &top).await;
    let pinned = format!("{}/models/m@{index_digest}", scene.proxy.addr());
    assert_same_tree(&scene.src, &scene.layer_dir(&pinned, &scene.toc()).join("diff"));
    assert_eq!(scene.log().matches("opened a model for the layer store").count(), 1, "{}", scene.log());

    // An ordinary image: its layers are not in the store, so containers/storage pulls them.
    let busybox = format!("{}/library/busybox:1", scene.registry.addr());
    tokio::task::block_in_place(|| push_busybox_image(&busybox));
    let busybox_layer = companion_layer(&busybox).await.digest;
    not_found(&scene.layer_dir(&busybox, &busybox_layer));
    // Keys the companion does not have, malformed keys and names.
    not_found(&scene.layer_dir(&scene.companion, &Digest::of(b"another layer").to_string()));
    not_found(&scene.layer_dir(&busybox, &scene.toc()));
    not_found(&scene.layer_dir(&scene.companion, "use"));
    not_found(&scene.store.join("not base64").join(&scene.layer.digest));
    not_found(&scene.store.join(encode_reference("../../etc")).join(&scene.layer.digest));
    not_found(&by_blob.join("use"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uses_survive_a_restart_without_the_registry_and_the_last_release_drops_the_layer() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut scene = Scene::build(tmp.path(), "").await;
    let layer = scene.layer_dir(&scene.companion, &scene.toc());
    // A pull: looked up and used, then used again by the layer it creates, then the
    // pull's own use released.
    notify_use(&layer);
    notify_use(&layer);
    release(&layer);
    assert_same_tree(&scene.src, &layer.join("diff"));
    let listed = |store: &Path| -> Vec<String> {
        std::fs::read_dir(store).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect()
    };
    assert_eq!(listed(&scene.store), [encode_reference(&scene.companion)]);

    // The daemon restarts while its registry is gone: the layer containers/storage
    // still links to is served again, from the cache.
    scene.registry.stop();
    scene.restart();
    assert_same_tree(&scene.src, &layer.join("diff"));
    assert_eq!(std::fs::read(layer.join("blob")).unwrap(), scene.layer.bytes);

    // `podman rmi`: the last release drops the layer; nothing is listed, nothing is
    // restored by the next start.
    release(&layer);
    assert!(listed(&scene.store).is_empty(), "{:?}", listed(&scene.store));
    scene.restart();
    assert!(listed(&scene.store).is_empty());
    assert!(scene.log().contains("layer released by every user; dropped"), "{}", scene.log());
}

/// Pushes, under `tag` of the companion's repository, a copy of its platform manifest
/// whose layer annotations `edit` changed.
async fn push_forged(
    companion: &str,
    tag: &str,
    edit: impl FnOnce(&mut serde_json::Map<String, serde_json::Value>),
) -> String {
    let parsed = parse_reference(companion).unwrap();
    let registry = Registry::new(parsed.clone(), Default::default());
    let (top, _) = registry.fetch_manifest().await.unwrap();
    let top: serde_json::Value = serde_json::from_slice(&top).unwrap();
    let first = top["manifests"][0]["digest"].as_str().unwrap().to_owned();
    let (manifest, _) = registry.with_reference(parsed.clone_with_digest(first)).fetch_manifest().await.unwrap();
    let mut manifest: serde_json::Value = serde_json::from_slice(&manifest).unwrap();
    edit(manifest["layers"][0]["annotations"].as_object_mut().unwrap());
    let forged = format!("{}/{}:{tag}", parsed.registry(), parsed.repository());
    let target = Registry::new(parse_reference(&forged).unwrap(), Default::default());
    target
        .push_manifest(serde_json::to_vec(&manifest).unwrap().into(), "application/vnd.oci.image.manifest.v1+json")
        .await
        .unwrap();
    forged
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_annotations_lying_or_hung_registries_and_other_users_get_nothing() {
    if !prerequisites(true) || !require_tools(&["setpriv"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hung = HungServer::start(free_port());
    let config = "[registry]\nrequest_timeout_secs = 1\nretries = 0\n[layer_store]\nlookup_timeout_secs = 3\n";
    let scene = Scene::build(tmp.path(), config).await;
    let (layer, toc) = (scene.layer.digest.clone(), scene.toc());
    let other_toc = Digest::of(b"another index").to_string();

    // First, while the honest index layer is not cached yet: an index location on a
    // registry that answers the index layer's digest with other bytes of its length.
    let mut forged_tar = scene.layer.bytes.clone();
    let at = forged_tar.len() / 2;
    forged_tar[at] ^= 0x01;
    let liar = LyingRegistry::start(HashMap::from([(layer.clone(), forged_tar)]));
    let lied = push_forged(&scene.companion, "lied", |a| {
        a.insert(labels::INDEX.into(), format!("{}/models/m@{layer}", liar.addr()).into());
    })
    .await;
    not_found(&scene.layer_dir(&lied, &toc));
    not_found(&scene.layer_dir(&lied, &layer));
    let refused = scene.log().lines().any(|l| l.contains(&liar.addr()) && l.contains("digest"));
    assert!(refused, "the refusal names the lying registry and the digest: {}", scene.log());

    // A TOC digest that is not the digest of the index inside the layer: refused under
    // either key (containers/storage >= 1.54 would record the layer under a TOC its
    // content does not have).
    let forged = push_forged(&scene.companion, "forged-toc", |a| {
        a.insert(labels::TOC_DIGEST.into(), other_toc.clone().into());
    })
    .await;
    not_found(&scene.layer_dir(&forged, &other_toc));
    not_found(&scene.layer_dir(&forged, &layer));
    // Both TOC annotations, which containers/image refuses too.
    let both = push_forged(&scene.companion, "both-tocs", |a| {
        a.insert(labels::ZSTD_CHUNKED_TOC_DIGEST.into(), toc.clone().into());
    })
    .await;
    not_found(&scene.layer_dir(&both, &toc));
    // An index location naming another layer than the one the manifest lists.
    let elsewhere = push_forged(&scene.companion, "elsewhere", |a| {
        let other = format!("{}/models/m@{}", scene.proxy.addr(), Digest::of(b"x"));
        a.insert(labels::INDEX.into(), other.into());
    })
    .await;
    not_found(&scene.layer_dir(&elsewhere, &layer));

    // A registry that never answers: the lookup gives up (its pull would download the
    // layer), and the daemon keeps serving the honest layer meanwhile.
    let hung_ref = format!("127.0.0.1:{}/models/m:v1-lazy", hung.port);
    let hung_dir = scene.layer_dir(&hung_ref, &toc);
    let waiting = std::thread::spawn(move || std::fs::metadata(hung_dir).map(|_| ()));
    assert_same_tree(&scene.src, &scene.layer_dir(&scene.companion, &toc).join("diff"));
    let e = waiting.join().unwrap().unwrap_err();
    assert_eq!(e.kind(), std::io::ErrorKind::NotFound, "{e}");

    // Only root reaches the store: a lookup would fetch with the node's credentials.
    let out = std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "ls"])
        .arg(scene.layer_dir(&scene.companion, &toc).join("diff"))
        .output()
        .unwrap();
    assert!(!out.status.success(), "an unprivileged user listed the model");
    assert!(String::from_utf8_lossy(&out.stderr).contains("Permission denied"), "{out:?}");
    assert!(scene.log().contains("TOC digest"), "{}", scene.log());
}

/// Writes a one-file model whose bytes follow from `seed`: two seeds give models with
/// the same names and sizes and other bytes.
fn write_seeded_model(dir: &Path, seed: u64) -> Vec<u8> {
    std::fs::create_dir_all(dir).unwrap();
    let weights = pseudo_random(3 << 20, seed);
    std::fs::write(dir.join("weights.bin"), &weights).unwrap();
    weights
}

/// The attacker moves a tag while no daemon runs, to a model with the same names and
/// sizes. A layer looked up under that tag (read, not used: nothing recorded) kept its
/// mount and its open file across the restart; the next daemon asks the registry again
/// and finds the tag leading elsewhere. The file opened before must never read the other
/// model's bytes (its slot is given up: its reads fail), the old key is gone, and the new
/// key serves the new model.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tag_moved_while_no_daemon_ran_never_serves_other_bytes_under_kept_inodes() {
    use std::os::unix::fs::FileExt;
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let source = format!("{}/models/moved:v1", registry.addr());
    let companion = format!("{source}-lazy");
    let first = write_seeded_model(&tmp.path().join("first"), 31);
    push_dir(&tmp.path().join("first"), &source, "raw");
    assert!(run_bin(&["convert", &source]).0);
    let old_key = companion_layer(&companion).await.annotations[labels::TOC_DIGEST].clone();

    let (root, store) = (tmp.path().join("root"), tmp.path().join("root/store"));
    let config = write_config(&tmp.path().join("etc"), "[models]\nrestore_wait_secs = 20\n");
    let mut serve = SnapshotterProcess::start_layer_store(&root, &store, &config);
    let old_layer = store.join(encode_reference(&companion)).join(&old_key);
    let file = std::fs::File::open(old_layer.join("diff/weights.bin")).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    file.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, first[..1 << 20]);

    serve.kill();
    let second = write_seeded_model(&tmp.path().join("second"), 32);
    push_dir(&tmp.path().join("second"), &source, "raw");
    assert!(run_bin(&["convert", &source]).0);
    let new_key = companion_layer(&companion).await.annotations[labels::TOC_DIGEST].clone();
    assert_ne!(new_key, old_key);
    let next = SnapshotterProcess::start_layer_store(&root, &store, &config);
    std::mem::forget(std::mem::replace(&mut serve, next));

    // The kernel is made to ask again for what it cached of the open file.
    // SAFETY: advice on an open file's cached pages.
    unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    for offset in [0, 1 << 20, 2 << 20] {
        let mut buf = vec![0u8; 1 << 20];
        match file.read_at(&mut buf, offset as u64) {
            Ok(n) => {
                assert_ne!(buf[..n], second[offset..offset + n], "the old file read the moved tag's bytes");
                assert_eq!(buf[..n], first[offset..offset + n], "the old file read other bytes");
            }
            Err(e) => eprintln!("the file opened before the restart fails as it should: {e}"),
        }
    }
    drop(file);
    let log = serve.log();
    assert!(log.contains("cannot be served again"), "{log}");
    not_found(&old_layer.join("diff"));
    let new_layer = store.join(encode_reference(&companion)).join(&new_key);
    assert_eq!(std::fs::read(new_layer.join("diff/weights.bin")).unwrap(), second);
}
