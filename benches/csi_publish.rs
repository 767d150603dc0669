//! Benchmark: the CSI node plugin's publish, as kubelet asks for it. For a generated
//! model of each size, published from a plain ModelPack artifact that has no companion,
//! from one whose companion `convert` listed among its referrers, and from the
//! companion's own reference:
//! the time `NodePublishVolume` takes, the time from sending it until the first `stat` of
//! a weight file at the target succeeds (publish to ready), and the bytes the publish
//! fetched from the registry (counted by a proxy in front of it) next to what a full
//! pull fetches (the model's size); then the time to publish the same model for a second
//! pod (a bind of the mounted model). Medians of several runs, each with a freshly
//! started daemon, fresh state and an empty cache.
//!
//! Run with `cargo bench --bench csi_publish` (as root); `BENCH_SMALL_BYTES` (default
//! 1 GiB) and `BENCH_LARGE_BYTES` (default 8 GiB) set the model sizes (`0` skips one),
//! `BENCH_RUNS` the repetitions (default 3). Writes `target/bench/csi_publish.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::containerd::{make_bench_model, push_bench_artifact};
use common::csi::{node_client, publish, unpublish, Kubelet};
use common::proxy::FaultProxy;
use common::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The weight file whose `stat` says the volume is ready.
const WEIGHT: &str = "model-00001-of-00002.safetensors";

/// One publish: how long the call took, how long until a weight file's `stat`
/// succeeded, the bytes it fetched, and how long publishing it for a second pod took.
#[derive(Debug, Clone, Copy)]
struct Sample {
    publish: Duration,
    ready: Duration,
    fetched: u64,
    second: Duration,
}

/// Publishes `reference` through a fresh daemon under `dir`, as kubelet would for a pod.
async fn sample(dir: &Path, proxy: &FaultProxy, reference: &str) -> Sample {
    let config = write_config(&dir.join("etc"), "");
    let socket = dir.join("plugin/csi.sock");
    let serve = SnapshotterProcess::start_csi(&dir.join("root"), &socket, &config);
    let kubelet = Kubelet::start(&dir.join("kubelet"));
    let mut node = node_client(&socket).await;
    let volume_of = |uid: &str| (Kubelet::volume_id(uid, "model"), kubelet.target(uid, "model"));
    let (volume, target) = volume_of("bench-pod-uid");
    let weight = target.join(WEIGHT);

    proxy.reset_counts();
    let t = Instant::now();
    node.node_publish_volume(publish(&volume, &target, &[("modelRef", reference)])).await.unwrap();
    let published = t.elapsed();
    while std::fs::metadata(&weight).is_err() {
        assert!(t.elapsed() < Duration::from_secs(30), "{} never appeared", weight.display());
        std::thread::sleep(Duration::from_millis(1));
    }
    let ready = t.elapsed();
    let (_, fetched) = proxy.blob_counts();

    let (volume2, target2) = volume_of("bench-pod-2-uid");
    let t = Instant::now();
    node.node_publish_volume(publish(&volume2, &target2, &[("modelRef", reference)])).await.unwrap();
    let second = t.elapsed();

    node.node_unpublish_volume(unpublish(&volume2, &target2)).await.unwrap();
    node.node_unpublish_volume(unpublish(&volume, &target)).await.unwrap();
    drop((kubelet, serve));
    Sample { publish: published, ready, fetched, second }
}

fn median(samples: &[Sample], key: impl Fn(&Sample) -> f64) -> f64 {
    let mut v: Vec<f64> = samples.iter().map(key).collect();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The bytes of the files in `dir` (a generated model is one flat directory).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().metadata().unwrap().len()).sum()
}

fn main() {
    if !prerequisites(true) {
        eprintln!("csi_publish: needs root, FUSE and docker-registry (make setup)");
        return;
    }
    let sizes = [env_u64("BENCH_SMALL_BYTES", 1 << 30), env_u64("BENCH_LARGE_BYTES", 8 << 30)];
    let runs = env_u64("BENCH_RUNS", 3);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut report = format!(
        "| model (median of {runs}) | reference | `NodePublishVolume` | publish → first `stat` of a weight file | fetched by the publish | a full pull fetches | the same model for a second pod |\n| --- | --- | --- | --- | --- | --- | --- |\n"
    );
    for size in sizes.into_iter().filter(|s| *s > 0) {
        // One registry per model, so that the large model's copy is the only one on disk.
        let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
        let registry = TestRegistry::start();
        let proxy = FaultProxy::start(registry.port);
        let src = tmp.path().join("model");
        make_bench_model(&src, size);
        let model_bytes = dir_bytes(&src);
        let (artifact, companion) = push_bench_artifact(&src, &proxy.addr());
        // The same blobs in a repository of their own, never converted: no lazy index.
        let bare = format!("{}/models/bench-bare:v1", proxy.addr());
        push_dir(&src, &bare, "raw");
        std::fs::remove_dir_all(&src).unwrap();
        let references = [
            ("plain artifact, no companion", &bare),
            ("plain artifact, companion among its referrers", &artifact),
            ("the companion's reference", &companion),
        ];
        for (kind, reference) in references {
            let samples: Vec<Sample> = (0..runs)
                .map(|i| {
                    let dir = tmp.path().join(format!("run-{i}"));
                    let s = rt.block_on(sample(&dir, &proxy, reference));
                    eprintln!("{size} bytes, {kind}, run {i}: {s:?}");
                    let _ = std::fs::remove_dir_all(&dir);
                    s
                })
                .collect();
            report.push_str(&format!(
                "| {:.1} GiB | {kind} | {:.1} ms | {:.1} ms | {:.1} KiB | {:.1} MiB | {:.1} ms |\n",
                size as f64 / f64::from(1 << 30),
                median(&samples, |s| s.publish.as_secs_f64()) * 1e3,
                median(&samples, |s| s.ready.as_secs_f64()) * 1e3,
                median(&samples, |s| s.fetched as f64) / 1024.0,
                model_bytes as f64 / f64::from(1 << 20),
                median(&samples, |s| s.second.as_secs_f64()) * 1e3,
            ));
        }
    }
    print!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("csi_publish.md"), report).unwrap();
}
