//! `serve`'s background prefetch, through each front-end, against a real registry behind
//! a counting proxy and real FUSE mounts: `all` leaves every blob verified in the cache
//! without a read (the model then reads whole with the registry gone), `head:N` fetches
//! the first N bytes of each file, `none` nothing beyond what mounting needs; a CSI
//! volume attribute overrides the node's policy, the larger of two volumes' policies wins,
//! and an unpublished volume's model stops fetching; a policy `convert --prefetch` writes
//! into the companion is honoured by the snapshotter (`Prepare`, `Commit`, and again
//! after a restart) and by the layer store; malformed policies are refused, naming them.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::csi::{node_client, publish, unpublish};
use common::proxy::{Fault, FaultProxy};
use common::*;
use modelpack_snapshotter::companion::index_from_tar;
use modelpack_snapshotter::layerstore::encode_reference;
use modelpack_snapshotter::modelpack::Digest;
use tonic::Code;

const SHARD: usize = 8 << 20;

/// Writes a model whose bytes depend on `seed` (two models of different seeds share no
/// blob): two shards, a config and a tokenizer.
fn write_model(dir: &Path, seed: u64) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), pseudo_random(SHARD, seed)).unwrap();
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), pseudo_random(SHARD / 2 + 777, seed + 1)).unwrap();
    std::fs::write(dir.join("config.json"), format!(r#"{{"architectures":["Demo"],"seed":{seed}}}"#)).unwrap();
    std::fs::write(dir.join("tokenizer.json"), pseudo_random(70_000, seed + 2)).unwrap();
}

/// A model pushed as a plain artifact and converted with `convert_args`.
struct Pushed {
    src: PathBuf,
    plain: String,
    companion: String,
}

impl Pushed {
    fn new(tmp: &Path, registry: &str, name: &str, seed: u64, convert_args: &[&str]) -> Self {
        let src = tmp.join(name);
        write_model(&src, seed);
        let plain = format!("{registry}/models/{name}:v1");
        push_dir(&src, &plain, "raw");
        let (ok, _, stderr) = run_bin(&[&["convert", plain.as_str()][..], convert_args].concat());
        assert!(ok, "{stderr}");
        let companion = format!("{plain}-lazy");
        Self { src, plain, companion }
    }

    /// Each file's blob (raw layers: the file is the blob), with its size.
    fn blobs(&self) -> Vec<(String, Digest, u64)> {
        read_tree(&self.src).into_iter().map(|(path, data)| (path, Digest::of(&data), data.len() as u64)).collect()
    }

    fn bytes(&self) -> u64 {
        self.blobs().iter().map(|b| b.2).sum()
    }
}

fn blob_file(cache: &Path, blob: &Digest, suffix: &str) -> PathBuf {
    cache.join("blobs/sha256").join(format!("{}{suffix}", blob.hex()))
}

/// Waits (up to two minutes) until every blob of `model` is verified in `cache`.
fn wait_all_verified(cache: &Path, model: &Pushed) {
    let deadline = Instant::now() + Duration::from_secs(120);
    for (path, blob, _) in model.blobs() {
        while !blob_file(cache, &blob, ".verified").is_file() {
            assert!(Instant::now() < deadline, "{path} ({blob}) was never verified in {}", cache.display());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits (up to two minutes) until `log()` holds `count` lines with `what`.
fn wait_logged(log: impl Fn() -> String, what: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while log().matches(what).count() < count {
        assert!(Instant::now() < deadline, "{what:?} was not logged {count} times:\n{}", log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// How long the proxy must forward nothing before [`quiet_bytes`] takes the registry to
/// be done with: longer than a stalled request (see [`STALL`]) and its retry take.
const QUIET: Duration = Duration::from_secs(3);
/// How long a stalled blob request stays silent.
const STALL: Duration = Duration::from_secs(1);

/// Waits until the proxy has forwarded no more blob bytes for [`QUIET`] (every request
/// already sent has finished); returns the bytes forwarded.
fn quiet_bytes(proxy: &FaultProxy) -> u64 {
    let mut last = proxy.blob_counts().1;
    let mut still_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(120);
    while still_since.elapsed() < QUIET {
        assert!(Instant::now() < deadline, "the registry never went quiet");
        std::thread::sleep(Duration::from_millis(100));
        let now = proxy.blob_counts().1;
        if now != last {
            (last, still_since) = (now, Instant::now());
        }
    }
    last
}

/// A registry behind a counting proxy, and a daemon serving CSI alone with `config`.
struct CsiScene {
    registry: TestRegistry,
    proxy: FaultProxy,
    serve: SnapshotterProcess,
    socket: PathBuf,
    cache: PathBuf,
    targets: PathBuf,
}

impl CsiScene {
    fn start(tmp: &Path, config: &str) -> Self {
        let registry = TestRegistry::start();
        let proxy = FaultProxy::start(registry.port);
        let socket = tmp.join("plugin/csi.sock");
        let root = tmp.join("root");
        let serve = SnapshotterProcess::start_csi(&root, &socket, &write_config(&tmp.join("etc"), config));
        // Targets under the root, so that a failed test leaves nothing mounted.
        Self { registry, proxy, serve, socket, cache: root.join("cache"), targets: root.join("pods") }
    }

    fn target(&self, name: &str) -> PathBuf {
        self.targets.join(name).join("mount")
    }

    fn log(&self) -> String {
        self.serve.log()
    }

    /// A model pushed through the proxy and converted with `convert_args`; the proxy's
    /// counts start from zero after it (`convert` reads every blob).
    fn push(&self, tmp: &Path, name: &str, seed: u64, convert_args: &[&str]) -> Pushed {
        let pushed = Pushed::new(tmp, &self.proxy.addr(), name, seed, convert_args);
        self.proxy.reset_counts();
        pushed
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_leaves_every_blob_of_a_csi_volume_verified_and_the_model_reads_with_the_registry_gone() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut scene = CsiScene::start(tmp.path(), "[cache]\nprefetch = \"all\"\n");
    let model = scene.push(tmp.path(), "m", 1, &[]);
    let mut node = node_client(&scene.socket).await;
    let target = scene.target("pod-a");
    node.node_publish_volume(publish("vol-a", &target, &[("modelRef", &model.plain)])).await.unwrap();
    // Nothing reads the volume: the prefetch alone fetches and verifies every blob, once.
    tokio::task::block_in_place(|| wait_all_verified(&scene.cache, &model));
    let fetched = quiet_bytes(&scene.proxy);
    assert!(fetched < model.bytes() + (1 << 20), "fetched {fetched} bytes of a {}-byte model", model.bytes());
    scene.registry.stop();
    tokio::task::block_in_place(|| assert_same_tree(&model.src, &target));
    node.node_unpublish_volume(unpublish("vol-a", &target)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_files_a_volume_serves_are_prefetched() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = CsiScene::start(tmp.path(), "[cache]\nprefetch = \"all\"\n");
    let model = scene.push(tmp.path(), "m", 2, &[]);
    let mut node = node_client(&scene.socket).await;
    let target = scene.target("pod-a");
    let attributes = [("modelRef", model.plain.as_str()), ("model.csi.modelpack.org/exclude-model-weights", "true")];
    node.node_publish_volume(publish("vol-a", &target, &attributes)).await.unwrap();
    tokio::task::block_in_place(|| wait_logged(|| scene.log(), "prefetch complete", 1));
    for (path, blob, _) in model.blobs() {
        let weight = path.ends_with(".safetensors");
        assert_eq!(blob_file(&scene.cache, &blob, ".verified").is_file(), !weight, "{path}");
        assert_eq!(blob_file(&scene.cache, &blob, "").exists(), !weight, "{path}: nothing of it is cached");
    }
    assert!(quiet_bytes(&scene.proxy) < 1 << 20, "the weights were not fetched");
    node.node_unpublish_volume(unpublish("vol-a", &target)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_attribute_overrides_the_node_and_the_larger_of_two_volumes_wins() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = CsiScene::start(tmp.path(), "[cache]\nprefetch = \"all\"\n");
    let lazy = scene.push(tmp.path(), "lazy", 10, &[]);
    let eager = scene.push(tmp.path(), "eager", 20, &[]);
    let mut node = node_client(&scene.socket).await;
    let (a, b, c) = (scene.target("pod-a"), scene.target("pod-b"), scene.target("pod-c"));
    node.node_publish_volume(publish("vol-a", &a, &[("modelRef", &lazy.plain), ("prefetch", "none")])).await.unwrap();
    node.node_publish_volume(publish("vol-b", &b, &[("modelRef", &eager.plain)])).await.unwrap();
    tokio::task::block_in_place(|| wait_all_verified(&scene.cache, &eager));
    tokio::task::block_in_place(|| wait_logged(|| scene.log(), "prefetch complete", 1));
    // `none` fetched nothing beyond what mounting needs (the companions' index layers).
    let fetched = quiet_bytes(&scene.proxy);
    assert!(fetched < eager.bytes() + (256 << 10), "fetched {fetched} bytes for {} of the eager model", eager.bytes());
    for (path, blob, _) in lazy.blobs() {
        assert!(!blob_file(&scene.cache, &blob, "").exists(), "{path} of the lazy volume was fetched");
    }
    // A second volume of the lazy model, with the node's `all`, widens its prefetch.
    node.node_publish_volume(publish("vol-c", &c, &[("modelRef", &lazy.plain)])).await.unwrap();
    tokio::task::block_in_place(|| wait_all_verified(&scene.cache, &lazy));
    for (volume, target) in [("vol-a", &a), ("vol-b", &b), ("vol-c", &c)] {
        node.node_unpublish_volume(unpublish(volume, target)).await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_fetches_the_first_bytes_of_every_file() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = "[cache]\nchunk_size = 1048576\nprefetch = \"head:2MiB\"\n";
    let mut scene = CsiScene::start(tmp.path(), config);
    let model = scene.push(tmp.path(), "m", 30, &[]);
    let index_layer = companion_layer(&model.companion).await.bytes.len() as u64;
    scene.proxy.reset_counts();
    let mut node = node_client(&scene.socket).await;
    let target = scene.target("pod-a");
    node.node_publish_volume(publish("vol-a", &target, &[("modelRef", &model.companion)])).await.unwrap();
    tokio::task::block_in_place(|| wait_logged(|| scene.log(), "prefetch complete", 1));
    let fetched = quiet_bytes(&scene.proxy);
    let heads: u64 = model.blobs().iter().map(|(_, _, size)| (*size).min(2 << 20)).sum();
    assert!(
        (heads..=heads + index_layer).contains(&fetched),
        "fetched {fetched} bytes; the heads are {heads} bytes, the index layer {index_layer}"
    );
    // The heads are there without the registry; the rest is not.
    scene.registry.stop();
    let shard = target.join("model-00001-of-00002.safetensors");
    let expected = std::fs::read(model.src.join("model-00001-of-00002.safetensors")).unwrap();
    tokio::task::block_in_place(|| {
        use std::os::unix::fs::FileExt;
        let file = std::fs::File::open(&shard).unwrap();
        let mut head = vec![0u8; 2 << 20];
        file.read_exact_at(&mut head, 0).unwrap();
        assert!(head == expected[..2 << 20], "the head of the shard differs");
        let mut rest = vec![0u8; 4096];
        assert!(file.read_exact_at(&mut rest, 3 << 20).is_err(), "past the head, the registry is needed");
        assert_eq!(
            std::fs::read(target.join("config.json")).unwrap(),
            std::fs::read(model.src.join("config.json")).unwrap()
        );
    });
    node.node_unpublish_volume(unpublish("vol-a", &target)).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpublished_model_stops_fetching() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    // One chunk per request, one request at a time: what is in flight when the volume
    // goes is one chunk.
    let config = "[cache]\nchunk_size = 1048576\nstream_request_chunks = 1\nprefetch_concurrency = 1\n";
    let scene = CsiScene::start(tmp.path(), config);
    let model = scene.push(tmp.path(), "m", 40, &[]);
    let mut node = node_client(&scene.socket).await;
    let (a, b) = (scene.target("pod-a"), scene.target("pod-b"));
    node.node_publish_volume(publish("vol-a", &a, &[("modelRef", &model.companion)])).await.unwrap();
    let before = quiet_bytes(&scene.proxy);
    // Every blob request stalls from now on; a second volume asks for the whole model.
    scene.proxy.set_stall(STALL);
    scene.proxy.set_fault(Fault::Stall, u32::MAX);
    node.node_publish_volume(publish("vol-b", &b, &[("modelRef", &model.companion), ("prefetch", "all")]))
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while scene.proxy.fault_counts().iter().all(|(_, n)| *n == 0) {
        assert!(Instant::now() < deadline, "the prefetch never asked the registry");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A file a container still holds open keeps the model's FUSE connection (its mount
    // is detached, not gone): the model is not dropped, but its prefetch stops all the same.
    let held = std::fs::File::open(a.join("config.json")).unwrap();
    for (volume, target) in [("vol-a", &a), ("vol-b", &b)] {
        node.node_unpublish_volume(unpublish(volume, target)).await.unwrap();
    }
    scene.proxy.clear_fault();
    // The request in flight may still complete (it is retried); nothing after it starts.
    // A prefetch that kept going would fetch again within a second of the stall's end.
    let after = tokio::task::block_in_place(|| quiet_bytes(&scene.proxy));
    assert!(after - before <= 1 << 20, "fetched {} bytes after the model went", after - before);
    let (_, shard, _) = model.blobs().into_iter().find(|(path, _, _)| path.starts_with("model-00001")).unwrap();
    assert!(!blob_file(&scene.cache, &shard, ".verified").exists(), "the first shard was fetched whole");
    drop(held);
}

/// The lazy index JSON of the companion at `companion`.
async fn index_json(companion: &str) -> serde_json::Value {
    serde_json::from_slice(&index_from_tar(&companion_layer(companion).await.bytes).unwrap()).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_policies_are_refused_naming_them() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let scene = CsiScene::start(tmp.path(), "");
    let model = scene.push(tmp.path(), "m", 50, &["--prefetch", "all"]);
    let mut json = index_json(&model.companion).await;
    assert_eq!(json["prefetch"], "all", "convert writes the policy into the index");
    json["prefetch"] = "everything".into();
    let bad = format!("{}/models/bad:v1", scene.proxy.addr());
    tokio::task::block_in_place(|| publish_companion(&bad, &serde_json::to_vec(&json).unwrap()));

    // A companion whose index carries a malformed policy is not served.
    let mut node = node_client(&scene.socket).await;
    let target = scene.target("pod-a");
    let status = node.node_publish_volume(publish("vol-a", &target, &[("modelRef", &bad)])).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status}");
    assert!(status.message().contains("\"everything\""), "{status}");
    // Nor is a volume whose attribute is malformed.
    let attributes = [("modelRef", model.plain.as_str()), ("model.csi.modelpack.org/prefetch", "head:1.5MiB")];
    let status = node.node_publish_volume(publish("vol-a", &target, &attributes)).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status}");
    assert!(
        status.message().contains("model.csi.modelpack.org/prefetch") && status.message().contains("\"head:1.5MiB\""),
        "{status}"
    );
    assert!(!modelpack_snapshotter::fs::is_mountpoint(&target));

    // The snapshotter refuses it at Prepare too, naming it.
    let snapshotter = SnapshotterProcess::start(&tmp.path().join("snapshotter"));
    let mut client = snapshots_client(&snapshotter.socket).await;
    let layer = companion_layer(&bad).await;
    let request = modelpack_snapshotter::snapshotter::proto::snapshots::PrepareSnapshotRequest {
        snapshotter: "modelpack".into(),
        key: format!("extract-1 {}", layer.digest),
        parent: String::new(),
        labels: layer.prepare_labels(),
    };
    let status = client.prepare(request).await.unwrap_err();
    assert!(status.message().contains("\"everything\""), "{status}");
    let stat = modelpack_snapshotter::snapshotter::proto::snapshots::StatSnapshotRequest {
        snapshotter: "modelpack".into(),
        key: layer.digest.clone(),
    };
    assert_eq!(client.stat(stat).await.unwrap_err().code(), Code::NotFound, "nothing recorded");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_snapshotter_honours_the_policy_convert_wrote_at_prepare_commit_and_after_a_restart() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut registry = TestRegistry::start();
    let prepared = Pushed::new(tmp.path(), &registry.addr(), "prepared", 60, &["--prefetch", "all"]);
    let committed = Pushed::new(tmp.path(), &registry.addr(), "committed", 70, &["--prefetch", "all"]);
    let root = tmp.path().join("root");
    let cache = root.join("cache");
    // The sample configuration: the node prefetches nothing unless a companion asks.
    let serve = SnapshotterProcess::start(&root);
    let mut c = snapshots_client(&serve.socket).await;

    // Prepare with the companion's labels, as Kubernetes pulls.
    let layer = companion_layer(&prepared.companion).await;
    let view = view_model(&mut c, &layer, "view-prepared", &tmp.path().join("v1")).await;
    tokio::task::block_in_place(|| wait_all_verified(&cache, &prepared));
    drop(view);

    // Commit of the companion layer a client unpacked itself, as `ctr images pull` does.
    let layer = companion_layer(&committed.companion).await;
    let key = format!("extract-2 {}", layer.digest);
    let prepare = modelpack_snapshotter::snapshotter::proto::snapshots::PrepareSnapshotRequest {
        snapshotter: "modelpack".into(),
        key: key.clone(),
        parent: String::new(),
        labels: Default::default(),
    };
    let mounts = c.prepare(prepare).await.unwrap().into_inner().mounts;
    {
        let target = tmp.path().join("unpack");
        let _m = mount_all(&mounts, &target);
        std::fs::create_dir(target.join(".modelpack")).unwrap();
        std::fs::write(target.join(".modelpack/index.json"), index_from_tar(&layer.bytes).unwrap()).unwrap();
    }
    let commit = modelpack_snapshotter::snapshotter::proto::snapshots::CommitSnapshotRequest {
        snapshotter: "modelpack".into(),
        name: layer.digest.clone(),
        key,
        labels: Default::default(),
    };
    c.commit(commit).await.unwrap();
    tokio::task::block_in_place(|| wait_all_verified(&cache, &committed));

    // After a restart that lost the cached blobs, both models are mounted again and
    // prefetched again.
    drop(c);
    drop(serve);
    std::fs::remove_dir_all(cache.join("blobs")).unwrap();
    let serve = SnapshotterProcess::start(&root);
    tokio::task::block_in_place(|| {
        wait_all_verified(&cache, &prepared);
        wait_all_verified(&cache, &committed);
    });
    registry.stop();
    let mut c = snapshots_client(&serve.socket).await;
    let chain = layer.digest.clone();
    let mounts = c
        .view(modelpack_snapshotter::snapshotter::proto::snapshots::ViewSnapshotRequest {
            snapshotter: "modelpack".into(),
            key: "view-committed".into(),
            parent: chain,
            labels: Default::default(),
        })
        .await
        .unwrap()
        .into_inner()
        .mounts;
    let target = tmp.path().join("v2");
    let _m = mount_all(&mounts, &target);
    tokio::task::block_in_place(|| assert_same_tree(&committed.src, &target));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_layer_store_prefetches_what_the_companion_asks_for() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let model = Pushed::new(tmp.path(), &registry.addr(), "m", 80, &["--prefetch", "all"]);
    let layer = companion_layer(&model.companion).await;
    let (root, store) = (tmp.path().join("root"), tmp.path().join("root/store"));
    let serve = SnapshotterProcess::start_layer_store(&root, &store, &write_config(&tmp.path().join("etc"), ""));
    // containers/storage looks the layer up; nothing reads the model.
    let dir = store.join(encode_reference(&model.companion)).join(&layer.digest);
    assert!(std::fs::metadata(dir.join("diff")).unwrap().is_dir());
    tokio::task::block_in_place(|| wait_all_verified(&root.join("cache"), &model));
    assert!(serve.log().contains("prefetch complete"), "{}", serve.log());
}
