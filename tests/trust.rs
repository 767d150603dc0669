//! The cache's trust model, played by an attacker on a shared node. The attacker
//! publishes a forged companion: the honest model's manifest and config (they hash
//! correctly), but a lazy index whose chunk digests describe other bytes of the same
//! length, with its source on a registry that answers the honest weight blob's digest
//! with those bytes. Whatever order the forged and the honest models are mounted in,
//! through `mount` (one cache directory) or through `serve` (one daemon), the honest
//! model reads honest bytes, and once the forged index is caught (its whole blob does
//! not hash to its digest) its own reads fail with EIO.
//!
//! And the two index formats: a companion of version 1 (sha256 chunk digests, written by
//! earlier releases) is still served and checked with sha256, and an index of either
//! version refuses bytes its chunk digests do not match. `convert` publishes no index
//! for a blob whose bytes are not its digest's.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::liar::WeightForgery;
use common::*;
use modelpack_snapshotter::companion::index_from_tar;
use modelpack_snapshotter::modelpack::index::{ChunkAlgorithm, LazyIndex};
use modelpack_snapshotter::modelpack::Digest;

/// The shard the attacker forges: several 4 MiB chunks, so no single chunk is the blob.
const WEIGHT: &str = "model-00001-of-00002.safetensors";
const SHARD: usize = 9 << 20;

/// An honest model with its companion, and the attacker's forged companion.
struct Scene {
    registry: TestRegistry,
    /// The liar, which also answers honestly for every other blob of the model.
    forgery: WeightForgery,
    /// The honest model's files.
    src: PathBuf,
    /// The honest artifact.
    source: String,
    honest_companion: String,
    forged_companion: String,
    forged_weight: Vec<u8>,
    /// The digest of the forged index JSON: the name it is condemned under.
    forged_index: Digest,
}

impl Scene {
    async fn build(tmp: &Path) -> Self {
        let registry = TestRegistry::start();
        let src = tmp.join("src");
        let source = format!("{}/models/honest:v1", registry.addr());
        push_converted(&src, SHARD, &source, &[]);
        let honest_companion = format!("{source}-lazy");

        // The liar answers every other blob of the model honestly; the honest index gets
        // the forged bytes' chunk digests and the liar as source.
        let forgery = WeightForgery::start(&src, WEIGHT);
        let mut index = honest_index(&honest_companion).await;
        forgery.forge(&mut index, "evil/model");
        let forged_companion = format!("{}/evil/companion:v1", registry.addr());
        tokio::task::block_in_place(|| publish_companion(&forged_companion, &index.to_json()));
        let forged_index = Digest::of(&index.to_json());
        Self {
            registry,
            forged_weight: forgery.forged.clone(),
            forgery,
            src,
            source,
            honest_companion,
            forged_companion,
            forged_index,
        }
    }

    fn honest_weight(&self) -> Vec<u8> {
        std::fs::read(self.src.join(WEIGHT)).unwrap()
    }
}

/// The lazy index of a companion (its first platform).
async fn honest_index(companion: &str) -> LazyIndex {
    let layer = companion_layer(companion).await;
    serde_json::from_slice(&index_from_tar(&layer.bytes).unwrap()).unwrap()
}

/// Mounts `reference` with the shared cache, reads the weight file whole, unmounts.
fn read_through_mount(reference: &str, tmp: &Path) -> std::io::Result<Vec<u8>> {
    let mountpoint = tmp.join("mnt");
    let mut m = MountProcess::start(reference, &mountpoint, &tmp.join("cache"), &[]).unwrap();
    let read = std::fs::read(mountpoint.join(WEIGHT));
    m.stop();
    read
}

/// Waits until `path` exists (a record the daemon writes in its own time), failing with
/// `what` after a minute.
fn wait_for_file(path: &Path, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !path.exists() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Waits until the cache at `cache` records `index` as condemned.
fn wait_for_condemned(cache: &Path, index: &Digest) {
    let name = format!("condemned-index:{index}");
    wait_for_file(&cache.join("meta").join(Digest::of(name.as_bytes()).hex()), "condemning the forged index");
}

/// Waits until the cache at `cache` has verified `blob` (its marker is written).
fn wait_for_verified(cache: &Path, blob: &Digest) {
    wait_for_file(&cache.join("blobs/sha256").join(format!("{}.verified", blob.hex())), "verifying the honest blob");
}

/// Reads a file that was not read before (nothing of it in the page cache) and expects
/// EIO: a condemned index serves nothing more.
fn assert_refused(path: &Path) {
    match std::fs::read(path) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{}: {e}", path.display()),
        Ok(data) => panic!("{} was served ({} bytes) by a condemned index", path.display(), data.len()),
    }
}

/// Asserts that `read` is the honest weight, without printing megabytes when it is not.
fn assert_honest(read: std::io::Result<Vec<u8>>, honest: &[u8], what: &str) {
    match read {
        Ok(data) => assert!(data == honest, "{what}: wrong bytes served ({} bytes)", data.len()),
        Err(e) => panic!("{what}: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_companion_never_poisons_the_honest_model_through_mount() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = Scene::build(tmp.path()).await;
    let honest = scene.honest_weight();

    // Forged first, read whole: its reader gets what its index describes, until the
    // whole blob's hash gives the index away; the cache keeps nothing anyone else trusts.
    let cache = tmp.path().join("cache");
    {
        let mountpoint = tmp.path().join("mnt");
        let mut m = MountProcess::start(&scene.forged_companion, &mountpoint, &cache, &[]).unwrap();
        let forged = std::fs::read(mountpoint.join(WEIGHT)).unwrap();
        assert!(forged == scene.forged_weight, "the forger's own reader gets what its index says");
        wait_for_condemned(&cache, &scene.forged_index);
        assert_refused(&mountpoint.join("tokenizer.json"));
        m.stop();
    }
    assert_honest(read_through_mount(&scene.source, tmp.path()), &honest, "the plain artifact");
    assert_honest(read_through_mount(&scene.honest_companion, tmp.path()), &honest, "the honest companion");
    // Caught once, the forged index stays refused, in a new process too.
    let err = read_through_mount(&scene.forged_companion, tmp.path()).map(|d| d.len());
    assert_eq!(err.map_err(|e| e.raw_os_error()), Err(Some(libc::EIO)));

    // The other order, with a fresh cache: honest first, then the forger (served the
    // verified honest blob, whose bytes are the blob whoever asks), then honest again.
    std::fs::remove_dir_all(&cache).unwrap();
    assert_honest(read_through_mount(&scene.honest_companion, tmp.path()), &honest, "honest first");
    assert_honest(read_through_mount(&scene.forged_companion, tmp.path()), &honest, "a verified blob");
    assert_honest(read_through_mount(&scene.source, tmp.path()), &honest, "the plain artifact after");
    assert_honest(read_through_mount(&scene.honest_companion, tmp.path()), &honest, "the honest companion after");

    // And a forger that read part of the blob: its chunks are trusted by nobody else.
    std::fs::remove_dir_all(&cache).unwrap();
    {
        let mountpoint = tmp.path().join("mnt");
        let mut m = MountProcess::start(&scene.forged_companion, &mountpoint, &cache, &[]).unwrap();
        let mut file = std::fs::File::open(mountpoint.join(WEIGHT)).unwrap();
        let mut head = vec![0u8; 5 << 20];
        std::io::Read::read_exact(&mut file, &mut head).unwrap();
        assert!(head[..] == scene.forged_weight[..5 << 20]);
        m.stop();
    }
    assert_honest(read_through_mount(&scene.source, tmp.path()), &honest, "plain after a partial forgery");
    assert_honest(read_through_mount(&scene.honest_companion, tmp.path()), &honest, "honest after a partial forgery");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_companion_never_poisons_the_honest_model_through_serve() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = Scene::build(tmp.path()).await;
    let honest = scene.honest_weight();

    for (round, forger_first) in [(0, true), (1, false)] {
        let root = tmp.path().join(format!("root-{round}"));
        let serve = SnapshotterProcess::start(&root);
        let mut c = snapshots_client(&serve.socket).await;
        if !forger_first {
            read_honest_view(&mut c, &scene, &format!("honest-a{round}"), tmp.path()).await;
            // Verification finishes in the background; until then the forger's reader
            // would fetch its own bytes, which is no test of a verified blob.
            wait_for_verified(&root.join("cache"), &Digest::of(&honest));
        }
        let forged_dir = tmp.path().join(format!("forged-{round}"));
        let forged = companion_layer(&scene.forged_companion).await;
        let forged_view = view_model(&mut c, &forged, &format!("forged-{round}"), &forged_dir).await;
        let forged = std::fs::read(forged_dir.join(WEIGHT)).unwrap();
        if forger_first {
            assert!(forged == scene.forged_weight, "the forger's own reader gets what its index says");
            // The forged blob was read whole: its hash gives the index away.
            wait_for_condemned(&root.join("cache"), &scene.forged_index);
            assert_refused(&forged_dir.join("tokenizer.json"));
        } else {
            assert!(forged == honest, "a verified blob is the blob, whoever asks");
        }
        read_honest_view(&mut c, &scene, &format!("honest-b{round}"), tmp.path()).await;
        drop(forged_view);
    }
}

/// Reads the honest model's weight through a fresh view and checks every byte.
async fn read_honest_view(c: &mut SnapshotsClient, scene: &Scene, view: &str, tmp: &Path) {
    let dir = tmp.join(view);
    let _m = view_model(c, &companion_layer(&scene.honest_companion).await, view, &dir).await;
    assert_eq!(std::fs::read(dir.join(WEIGHT)).unwrap(), scene.honest_weight(), "the honest model ({view})");
}

/// Mounts `reference` with the cache `cache` under `tmp` and reads the weight file: whole
/// (`None`), or its first `Some(n)` bytes.
fn read_weight(reference: &str, tmp: &Path, cache: &str, first: Option<usize>) -> std::io::Result<Vec<u8>> {
    let mountpoint = tmp.join("mnt");
    let mut m = MountProcess::start(reference, &mountpoint, &tmp.join(cache), &[]).unwrap();
    let read = match first {
        None => std::fs::read(mountpoint.join(WEIGHT)),
        Some(n) => std::fs::File::open(mountpoint.join(WEIGHT)).and_then(|mut f| {
            let mut head = vec![0u8; n];
            std::io::Read::read_exact(&mut f, &mut head).map(|()| head)
        }),
    };
    m.stop();
    read
}

/// Expects a read to fail with EIO, without printing megabytes when it did not.
fn assert_eio(read: std::io::Result<Vec<u8>>, what: &str) {
    match read {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "{what}: {e}"),
        Ok(data) => panic!("{what}: {} bytes were served", data.len()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_1_companion_is_still_served_and_checked_with_sha256() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = Scene::build(tmp.path()).await;
    let honest = scene.honest_weight();
    let current = honest_index(&scene.honest_companion).await;
    assert_eq!(current.version, 2, "convert writes version 2");
    assert!(current.blobs.iter().flat_map(|b| &b.chunks).all(|c| c.starts_with("blake3:")));

    // The index an earlier release wrote for the same model: sha256 chunk digests.
    let blobs: std::collections::HashMap<String, Vec<u8>> =
        read_tree(&scene.src).into_values().map(|data| (Digest::of(&data).to_string(), data)).collect();
    let mut v1 = current.clone();
    v1.version = 1;
    for blob in &mut v1.blobs {
        blob.chunks = blobs[&blob.digest].chunks(v1.chunk_size as usize).map(|c| Digest::of(c).to_string()).collect();
    }
    let v1_companion = format!("{}/models/honest:v1-lazy-v1", scene.registry.addr());
    tokio::task::block_in_place(|| publish_companion(&v1_companion, &v1.to_json()));
    assert_honest(read_weight(&v1_companion, tmp.path(), "cache-v1", None), &honest, "a version 1 companion");

    // Its digests are checked: the same index with its source on the liar serves no byte
    // of the liar's weight, and the other files (answered honestly) as usual.
    v1.source.reference = format!("{}/evil/model@{}", scene.forgery.liar.addr(), v1.source.manifest_digest);
    let lied_to = format!("{}/models/honest:v1-lazy-v1-liar", scene.registry.addr());
    tokio::task::block_in_place(|| publish_companion(&lied_to, &v1.to_json()));
    assert_eio(read_weight(&lied_to, tmp.path(), "cache-v1-liar", None), "a version 1 index, lied to");
    let mountpoint = tmp.path().join("mnt");
    let mut m = MountProcess::start(&lied_to, &mountpoint, &tmp.path().join("cache-v1-liar"), &[]).unwrap();
    let tokenizer = std::fs::read(mountpoint.join("tokenizer.json"));
    m.stop();
    assert_honest(tokenizer, &std::fs::read(scene.src.join("tokenizer.json")).unwrap(), "an honest file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_2_index_serves_no_byte_its_chunk_digests_do_not_match() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = Scene::build(tmp.path()).await;
    let honest = scene.honest_weight();
    let index = honest_index(&scene.honest_companion).await;
    assert_eq!(index.version, 2);

    // The honest index, its source on the liar: every forged chunk is refused.
    let mut lied_to = index.clone();
    lied_to.source.reference = format!("{}/evil/model@{}", scene.forgery.liar.addr(), index.source.manifest_digest);
    let target = format!("{}/models/honest:v2-liar", scene.registry.addr());
    tokio::task::block_in_place(|| publish_companion(&target, &lied_to.to_json()));
    assert_eio(read_weight(&target, tmp.path(), "cache-liar", None), "the whole weight");
    assert_eio(read_weight(&target, tmp.path(), "cache-liar", Some(4096)), "its first page");

    // One wrong chunk digest (piece 5, in the second 4 MiB chunk) on an honest registry:
    // the chunk before it is served, the one it is in is not.
    let mut wrong = index.clone();
    let weight = wrong.blobs.iter_mut().find(|b| b.digest == scene.forgery.digest).unwrap();
    assert!(weight.chunks.len() > 5);
    weight.chunks[5] = ChunkAlgorithm::Blake3.digest(b"other bytes").to_string();
    assert_eq!(wrong.chunk_size, 1 << 20);
    let target = format!("{}/models/honest:v2-wrong-chunk", scene.registry.addr());
    tokio::task::block_in_place(|| publish_companion(&target, &wrong.to_json()));
    let head = read_weight(&target, tmp.path(), "cache-wrong", Some(4 << 20));
    assert_honest(head.map(|h| [h, honest[4 << 20..].to_vec()].concat()), &honest, "the chunk before");
    assert_eio(read_weight(&target, tmp.path(), "cache-wrong", None), "the whole weight");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn convert_publishes_no_index_for_bytes_that_are_not_the_blob() {
    if !prerequisites(false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let src = tmp.path().join("src");
    write_model_dir(&src, SHARD);
    let source = format!("{}/models/tampered:v1", registry.addr());
    push_dir(&src, &source, "raw");
    // The registry's storage is tampered with: one byte of the weight, in its middle.
    let weight = Digest::of(&std::fs::read(src.join(WEIGHT)).unwrap());
    let stored = registry.blob_file(&weight.to_string());
    let mut bytes = std::fs::read(&stored).unwrap();
    bytes[SHARD / 2] ^= 1;
    std::fs::write(&stored, &bytes).unwrap();

    let (ok, _, stderr) = run_bin(&["convert", &source]);
    assert!(!ok, "convert published an index for tampered bytes");
    assert!(stderr.contains(&weight.to_string()) && stderr.contains("content hashes to"), "{stderr}");
    let companion = modelpack_snapshotter::registry::parse_reference(&format!("{source}-lazy")).unwrap();
    let registry_client = modelpack_snapshotter::registry::Registry::new(companion, Default::default());
    assert!(registry_client.fetch_manifest().await.is_err(), "no companion was pushed");
}
