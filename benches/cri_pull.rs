//! Benchmark: Kubernetes' pull path through the CRI API of containerd 2.x with the
//! snapshotter. Compares `PullImage` of a model's companion with `PullImage` of an
//! ordinary image carrying the same bytes, and times a container that reads the first
//! byte of the model from an image volume (`StartContainer` until it exits). Then the end
//! to end: `PullImage`, a container started with the model as an image volume, and every
//! tensor loaded with `scripts/load_tensors.py` from the model's directory as that
//! container sees it — for the companion with `serve`'s `[cache] prefetch` at `none` and
//! at `all`, next to the ordinary image (a full pull and unpack, then the same load).
//! Medians of several runs, each on fresh containerd and snapshotter state.
//!
//! The busybox container has no Python: the load runs on the host, through
//! `/proc/<container pid>/root/model`, which is the container's own mount of the image
//! volume (its overlay over the model's FUSE mount, or over the ordinary image's
//! unpacked snapshot), read in the container's mount namespace.
//!
//! Run with `cargo bench --bench cri_pull` (as root, after `make setup`);
//! `BENCH_MODEL_BYTES` sets the model size (default 1 GiB), `BENCH_RUNS` the repetitions
//! (default 3). Writes `target/bench/cri_pull.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
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

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1e3)
}

/// What every run pulls and runs.
struct Images {
    registry: String,
    companion: String,
    ordinary: String,
    busybox: String,
    sandbox: String,
}

/// A fresh snapshotter (`serve` with `config`) and containerd 2.x under `dir`, with a
/// CRI client that has pulled busybox already.
struct Node {
    _serve: SnapshotterProcess,
    _containerd: Containerd,
    client: Cri,
    logs: PathBuf,
}

impl Node {
    async fn start(dir: &Path, images: &Images, config: &str) -> Self {
        let config = write_config(&dir.join("etc"), config);
        let root = dir.join("snapshotter");
        let serve = SnapshotterProcess::start_with(&root, &root.join("snapshotter.sock"), &config);
        let containerd = Containerd::start_cri(
            Flavor::V2,
            &dir.join("containerd"),
            &serve.socket,
            &images.sandbox,
            std::slice::from_ref(&images.registry),
        );
        let mut client = Cri::connect(&containerd.socket).await;
        client.pull(&images.busybox).await;
        Self { _serve: serve, _containerd: containerd, client, logs: dir.join("logs") }
    }

    /// Creates and starts a busybox container running `command` with `volume` as an
    /// image volume at `/model`, in a new sandbox; returns (sandbox id, container id).
    async fn start_container(&mut self, busybox: &str, volume: &str, command: &[&str]) -> (String, String) {
        let sandbox = self.client.run_sandbox("bench", &self.logs).await;
        let config = cri::ContainerConfig {
            metadata: Some(cri::ContainerMetadata { name: "reader".into(), attempt: 0 }),
            image: Some(spec(busybox)),
            command: command.iter().map(|c| (*c).to_owned()).collect(),
            mounts: vec![image_volume(volume, "/model")],
            log_path: "reader.log".into(),
            ..Default::default()
        };
        let id = self
            .client
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
        self.client.runtime.start_container(cri::StartContainerRequest { container_id: id.clone() }).await.unwrap();
        (sandbox.0, id)
    }

    /// The host PID of a running container (from containerd's verbose status).
    async fn pid(&mut self, id: &str) -> u32 {
        let request = cri::ContainerStatusRequest { container_id: id.to_owned(), verbose: true };
        let info = self.client.runtime.container_status(request).await.unwrap().into_inner().info;
        let info: serde_json::Value = serde_json::from_str(&info["info"]).unwrap();
        info["pid"].as_u64().expect("a running container has a pid") as u32
    }

    fn reader_log(&self) -> String {
        read_cri_log(&self.logs.join("reader.log"))
    }
}

/// `PullImage` of `image`, then a container with it as an image volume started, then
/// every tensor loaded from `<model dir>` as the container sees it.
struct EndToEnd {
    pull: Duration,
    start: Duration,
    load: Duration,
}

impl EndToEnd {
    fn total(&self) -> Duration {
        self.pull + self.start + self.load
    }
}

/// One end-to-end measure on a fresh node whose `serve` has `config`: `image` pulled and
/// mounted as an image volume, and its tensors (under `subdir` of the volume) loaded.
async fn end_to_end(dir: &Path, images: &Images, config: &str, image: &str, subdir: &str) -> EndToEnd {
    let mut node = Node::start(dir, images, config).await;
    let t = Instant::now();
    node.client.pull(image).await;
    let pull = t.elapsed();
    let t = Instant::now();
    let (sandbox, id) = node.start_container(&images.busybox, image, &["/bin/sleep", "3600"]).await;
    let pid = node.pid(&id).await;
    let start = t.elapsed();
    let model = Path::new("/proc").join(pid.to_string()).join("root/model").join(subdir);
    let t = Instant::now();
    let out = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/load_tensors.py"))
        .arg(&model)
        .output()
        .unwrap();
    let load = t.elapsed();
    assert!(
        out.status.success(),
        "loading from {}: {}{}",
        model.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    node.client.remove_sandbox(&sandbox).await;
    EndToEnd { pull, start, load }
}

/// The end-to-end rows, in the order of [`Run::e2e`]; the last is the reference.
const E2E_ROWS: [&str; 3] = [
    "companion, `serve` prefetch `none`",
    "companion, `serve` prefetch `all`",
    "ordinary image (full pull and unpack)",
];

struct Run {
    pull_companion: Duration,
    pull_ordinary: Duration,
    first_byte: Duration,
    /// One per [`E2E_ROWS`].
    e2e: [EndToEnd; 3],
}

async fn one_run(dir: &Path, images: &Images, first_file: &str) -> Run {
    let (pull_companion, pull_ordinary, first_byte) = {
        let mut node = Node::start(&dir.join("pulls"), images, "").await;
        let t = Instant::now();
        node.client.pull(&images.companion).await;
        let pull_companion = t.elapsed();
        let t = Instant::now();
        node.client.pull(&images.ordinary).await;
        let pull_ordinary = t.elapsed();
        let read = format!("head -c 1 /model/{first_file} >/dev/null");
        let t = Instant::now();
        let (sandbox, id) = node.start_container(&images.busybox, &images.companion, &["/bin/sh", "-c", &read]).await;
        let code = node.client.wait_exited(&id, Duration::from_millis(1)).await;
        let first_byte = t.elapsed();
        assert_eq!(code, 0, "reader failed: {}", node.reader_log());
        node.client.remove_sandbox(&sandbox).await;
        (pull_companion, pull_ordinary, first_byte)
    };
    let lazy = end_to_end(&dir.join("lazy"), images, "[cache]\nprefetch = \"none\"\n", &images.companion, "").await;
    let prefetched =
        end_to_end(&dir.join("prefetched"), images, "[cache]\nprefetch = \"all\"\n", &images.companion, "").await;
    // The ordinary image holds the files under `model/`.
    let ordinary = end_to_end(&dir.join("ordinary"), images, "", &images.ordinary, "model").await;
    Run { pull_companion, pull_ordinary, first_byte, e2e: [lazy, prefetched, ordinary] }
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
    let images = Images { registry: registry.addr(), companion, ordinary, busybox, sandbox };
    let first_file = "model-00001-of-00002.safetensors";

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let mut results = Vec::new();
    for i in 0..runs {
        let dir = tmp.path().join(format!("run-{i}"));
        let run = rt.block_on(one_run(&dir, &images, first_file));
        eprintln!(
            "run {i}: PullImage companion {:?}, ordinary {:?}, start→first byte {:?}; \
             end to end: lazy {:?}, prefetch all {:?}, ordinary {:?}",
            run.pull_companion,
            run.pull_ordinary,
            run.first_byte,
            run.e2e[0].total(),
            run.e2e[1].total(),
            run.e2e[2].total()
        );
        results.push(run);
        let _ = std::fs::remove_dir_all(&dir);
    }
    let med = |f: &dyn Fn(&Run) -> Duration| median(results.iter().map(f).collect());
    let mut report = String::new();
    let _ = writeln!(report, "| measure ({size}-byte model, containerd 2.x CRI, median of {runs}) | time |");
    let _ = writeln!(report, "| --- | --- |");
    let rows: [(&str, Duration); 3] = [
        ("PullImage of the companion", med(&|r| r.pull_companion)),
        ("PullImage of an ordinary image with the same bytes", med(&|r| r.pull_ordinary)),
        ("StartContainer until a reader of the model's first byte exits", med(&|r| r.first_byte)),
    ];
    for (what, t) in rows {
        let _ = writeln!(report, "| {what} | {} |", ms(t));
    }
    let ordinary_total = med(&|r| r.e2e[2].total());
    let _ = writeln!(report);
    let _ = writeln!(
        report,
        "| end to end: PullImage, container with the image volume started, every tensor loaded \
         (`load_tensors.py` through `/proc/<pid>/root/model`) | pull | start | load | total | vs ordinary |"
    );
    let _ = writeln!(report, "| --- | --- | --- | --- | --- | --- |");
    for (i, what) in E2E_ROWS.iter().enumerate() {
        let (pull, start, load) = (med(&|r| r.e2e[i].pull), med(&|r| r.e2e[i].start), med(&|r| r.e2e[i].load));
        let total = med(&|r| r.e2e[i].total());
        let ratio = total.as_secs_f64() / ordinary_total.as_secs_f64();
        let _ =
            writeln!(report, "| {what} | {} | {} | {} | {} | {ratio:.2}× |", ms(pull), ms(start), ms(load), ms(total));
    }
    print!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("cri_pull.md"), report).unwrap();
}
