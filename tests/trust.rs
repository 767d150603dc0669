//! The cache's trust model, played by an attacker on a shared node. The attacker
//! publishes a forged companion: the honest model's manifest and config (they hash
//! correctly), but a lazy index whose chunk digests describe other bytes of the same
//! length, with its source on a registry that answers the honest weight blob's digest
//! with those bytes. Whatever order the forged and the honest models are mounted in,
//! through `mount` (one cache directory) or through `serve` (one daemon), the honest
//! model reads honest bytes, and once the forged index is caught (its whole blob does
//! not hash to its digest) its own reads fail with EIO.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::liar::WeightForgery;
use common::*;
use modelpack_snapshotter::companion::index_from_tar;
use modelpack_snapshotter::modelpack::index::LazyIndex;
use modelpack_snapshotter::modelpack::Digest;

/// The shard the attacker forges: several 4 MiB chunks, so no single chunk is the blob.
const WEIGHT: &str = "model-00001-of-00002.safetensors";
const SHARD: usize = 9 << 20;

/// An honest model with its companion, and the attacker's forged companion.
struct Scene {
    _registry: TestRegistry,
    _forgery: WeightForgery,
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
        write_model_dir(&src, SHARD);
        let source = format!("{}/models/honest:v1", registry.addr());
        push_dir(&src, &source, "raw");
        let (ok, _, stderr) = run_bin(&["convert", &source]);
        assert!(ok, "{stderr}");
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
            _registry: registry,
            forged_weight: forgery.forged.clone(),
            _forgery: forgery,
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
