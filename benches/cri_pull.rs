//! Benchmark: Kubernetes' pull path through the CRI API of containerd 2.x with the
//! snapshotter. Compares `PullImage` of a model's companion with `PullImage` of an
//! ordinary image carrying the same bytes, and times a container that reads the first
//! byte of the model from an image volume (`StartContainer` until it exits). Medians of
//! several runs, each on fresh containerd and snapshotter state.
//!
//! Run with `cargo bench --bench cri_pull` (as root); `BENCH_MODEL_BYTES` sets the model
//! size (default 1 GiB), `BENCH_RUNS` the repetitions (default 3).

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::containerd::{push_bench_model, push_busybox_image_with, Containerd, Flavor};
use common::cri::{image_volume, read_cri_log, spec, Cri};
use common::*;
use k8s_cri::v1 as cri;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Run {
    pull_companion: Duration,
    pull_ordinary: Duration,
    first_byte: Duration,
}

async fn one_run(
    tmp: &Path,
    registry: &str,
    companion: &str,
    ordinary: &str,
    busybox: &str,
    sandbox: &str,
    first_file: &str,
) -> Run {
    let serve = SnapshotterProcess::start(&tmp.join("snapshotter"));
    let containerd =
        Containerd::start_cri(Flavor::V2, &tmp.join("containerd"), &serve.socket, sandbox, &[registry.to_owned()]);
    let mut client = Cri::connect(&containerd.socket).await;
    client.pull(busybox).await;
    let t = Instant::now();
    client.pull(companion).await;
    let pull_companion = t.elapsed();
    let t = Instant::now();
    client.pull(ordinary).await;
    let pull_ordinary = t.elapsed();

    let logs = tmp.join("logs");
    let sandbox = client.run_sandbox("bench", &logs).await;
    let config = cri::ContainerConfig {
        metadata: Some(cri::ContainerMetadata { name: "first-byte".into(), attempt: 0 }),
        image: Some(spec(busybox)),
        command: vec!["/bin/sh".into(), "-c".into(), format!("head -c 1 /model/{first_file} >/dev/null")],
        mounts: vec![image_volume(companion, "/model")],
        log_path: "first-byte.log".into(),
        ..Default::default()
    };
    let id = client
        .runtime
        .create_container(cri::CreateContainerRequest {
            pod_sandbox_id: sandbox.0.clone(),
            config: Some(config),
            sandbox_config: Some(sandbox.1.clone()),
        })
        .await
        .unwrap()
        .into_inner()
        .container_id;
    let t = Instant::now();
    client.runtime.start_container(cri::StartContainerRequest { container_id: id.clone() }).await.unwrap();
    let code = client.wait_exited(&id, Duration::from_millis(1)).await;
    assert_eq!(code, 0, "reader failed: {}", read_cri_log(&logs.join("first-byte.log")));
    let first_byte = t.elapsed();
    client.remove_sandbox(&sandbox.0).await;
    Run { pull_companion, pull_ordinary, first_byte }
}

fn main() {
    if !prerequisites(true) || common::containerd::containerd2_bin().is_none() {
        eprintln!("cri_pull: needs root, FUSE, docker-registry and tools/containerd2 (make setup)");
        return;
    }
    let size = env_u64("BENCH_MODEL_BYTES", 1 << 30);
    let runs = env_u64("BENCH_RUNS", 3);
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let registry = TestRegistry::start();
    let src = tmp.path().join("model");
    let (companion, ordinary) = push_bench_model(&src, &registry.addr(), size);
    let busybox = format!("{}/library/busybox:bench", registry.addr());
    push_busybox_image_with(&busybox, &["/bin/sh"]);
    let sandbox = format!("{}/library/sandbox:bench", registry.addr());
    push_busybox_image_with(&sandbox, &["/bin/sleep", "2147483647"]);
    let first_file = "model-00001-of-00002.safetensors";

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut results = Vec::new();
    for i in 0..runs {
        let dir = tmp.path().join(format!("run-{i}"));
        let run = rt.block_on(one_run(&dir, &registry.addr(), &companion, &ordinary, &busybox, &sandbox, first_file));
        eprintln!(
            "run {i}: PullImage companion {:?}, ordinary {:?}, start→first byte {:?}",
            run.pull_companion, run.pull_ordinary, run.first_byte
        );
        results.push(run);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let companion_t = median(results.iter().map(|r| r.pull_companion).collect());
    let ordinary_t = median(results.iter().map(|r| r.pull_ordinary).collect());
    let first_t = median(results.iter().map(|r| r.first_byte).collect());
    println!("| measure ({size}-byte model, containerd 2.x CRI, median of {runs}) | time |");
    println!("| --- | --- |");
    println!("| PullImage of the companion | {:.0} ms |", companion_t.as_secs_f64() * 1e3);
    println!("| PullImage of an ordinary image with the same bytes | {:.0} ms |", ordinary_t.as_secs_f64() * 1e3);
    println!(
        "| StartContainer until a reader of the model's first byte exits | {:.0} ms |",
        first_t.as_secs_f64() * 1e3
    );
}
