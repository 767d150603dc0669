//! Benchmark: CRI-O's pull path, played by podman 4.3 (containers/storage 1.43) and
//! podman 5.4 (containers/storage 1.57, as CRI-O >= 1.31) with the daemon's layer store.
//! For a model's companion taken from the store, and for an ordinary image carrying the
//! same bytes pulled without it: the bytes the pull fetched from the registry, the pull's
//! time, and the time from `podman run` (with the image mounted at /model, as CRI-O
//! mounts an image volume) to the first byte of a weight file read in the container
//! (the container prints the kernel's uptime after the read; the host's is taken before
//! the command). Medians of several runs, each with fresh podman storage and fresh daemon
//! state and cache.
//!
//! Run with `cargo bench --bench podman_pull` (as root, after `make setup`);
//! `BENCH_MODEL_BYTES` sets the model size (default 1 GiB), `BENCH_RUNS` the repetitions
//! (default 3). Writes `target/bench/podman_pull.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::containerd::{push_bench_model, push_busybox_image};
use common::podman::{podman5_root, Flavor, Podman};
use common::proxy::FaultProxy;
use common::*;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn uptime() -> f64 {
    parse_uptime(&std::fs::read_to_string("/proc/uptime").unwrap())
}

fn parse_uptime(text: &str) -> f64 {
    text.split_whitespace().next().and_then(|s| s.parse().ok()).expect("an uptime")
}

/// One pull and first read: bytes fetched from the registry, pull time, run → first byte.
#[derive(Debug, Clone, Copy)]
struct Sample {
    fetched: u64,
    pull: Duration,
    first_byte: Duration,
}

/// Pulls `image` with `podman` and reads the first byte of `/model/{file}` in a
/// container that mounts it.
fn sample(podman: &Podman, proxy: &FaultProxy, image: &str, busybox: &str, file: &str) -> Sample {
    podman.pull(busybox).unwrap();
    proxy.reset_counts();
    let t = Instant::now();
    podman.pull(image).unwrap();
    let pull = t.elapsed();
    let (_, fetched) = proxy.blob_counts();
    let reader = format!("head -c 1 /model/{file} >/dev/null && cat /proc/uptime");
    let before = uptime();
    let out = podman.run_with_image_mount(busybox, image, "/model", &["sh", "-c", &reader]).unwrap();
    let first_byte = Duration::from_secs_f64((parse_uptime(&out) - before).max(0.0));
    Sample { fetched, pull, first_byte }
}

fn median(mut v: Vec<Sample>, key: impl Fn(&Sample) -> f64) -> f64 {
    v.sort_by(|a, b| key(a).total_cmp(&key(b)));
    key(&v[v.len() / 2])
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    let root = unsafe { libc::geteuid() } == 0;
    if !prerequisites(true) || !root || which("podman").is_none() || podman5_root().is_none() {
        eprintln!("podman_pull: needs root, FUSE, docker-registry, podman and tools/podman5 (make setup)");
        return;
    }
    let size = env_u64("BENCH_MODEL_BYTES", 1 << 30);
    let runs = env_u64("BENCH_RUNS", 3);
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let registry = TestRegistry::start();
    let proxy = FaultProxy::start(registry.port);
    let src = tmp.path().join("model");
    let (companion, ordinary) = push_bench_model(&src, &proxy.addr(), size);
    let busybox = format!("{}/library/busybox:bench", proxy.addr());
    push_busybox_image(&busybox);
    let first_file = "model-00001-of-00002.safetensors";

    let mut report = format!(
        "| podman ({size}-byte model, median of {runs}) | image | fetched by the pull | pull | `podman run` → first byte |\n| --- | --- | --- | --- | --- |\n"
    );
    for flavor in [Flavor::V4, Flavor::V5] {
        let (mut lazy, mut plain) = (Vec::new(), Vec::new());
        for i in 0..runs {
            let dir = tmp.path().join(format!("{flavor:?}-{i}"));
            let (state, store) = (dir.join("root"), dir.join("root/store"));
            let config = write_config(&dir.join("etc"), "");
            let serve = SnapshotterProcess::start_layer_store(&state, &store, &config);
            let podman = Podman::with_layer_store(flavor, &store);
            lazy.push(sample(&podman, &proxy, &companion, &busybox, first_file));
            drop(podman);
            drop(serve);
            let podman = Podman::new(flavor);
            plain.push(sample(&podman, &proxy, &ordinary, &busybox, &format!("model/{first_file}")));
            drop(podman);
            eprintln!("{flavor:?} run {i}: companion {:?}, ordinary {:?}", lazy[i as usize], plain[i as usize]);
            let _ = std::fs::remove_dir_all(&dir);
        }
        for (name, samples) in [("companion, from the store", lazy), ("ordinary image, same bytes", plain)] {
            let podman = match flavor {
                Flavor::V4 => "4.3 (containers/storage 1.43, blob-digest lookup)",
                Flavor::V5 => "5.4 (containers/storage 1.57, TOC-digest lookup)",
            };
            report.push_str(&format!(
                "| {podman} | {name} | {:.1} MiB | {:.0} ms | {:.0} ms |\n",
                median(samples.clone(), |s| s.fetched as f64) / f64::from(1 << 20),
                median(samples.clone(), |s| s.pull.as_secs_f64()) * 1e3,
                median(samples, |s| s.first_byte.as_secs_f64()) * 1e3,
            ));
        }
    }
    print!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("podman_pull.md"), report).unwrap();
}
