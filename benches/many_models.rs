//! Benchmark: many models on one node. `serve` with containerd (1.6, Debian's) pulling N
//! small generated models through their companions, so that each becomes a mounted
//! model snapshot: the daemon's memory (`VmRSS`, `VmHWM`) and threads with no model,
//! with N/2 and with N, what the N models add and what each of the last N/2 adds; then
//! the daemon is killed (SIGKILL, as a crash or an upgrade that does not wait would) and
//! started again: the time until its socket answers a snapshots `List`, and until every
//! model is mounted again (`Stat` of each answers).
//!
//! Run with `cargo bench --bench many_models` (as root); `BENCH_MODELS` sets N (default
//! 100). Writes `target/bench/many_models.md`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use common::containerd::Containerd;
use common::*;
use modelpack_snapshotter::snapshotter::proto::snapshots as pb;

/// Tokio's blocking threads exit after ten idle seconds: measured after this long, the
/// thread count is what the daemon keeps, not what the last burst of work left behind.
const SETTLE: Duration = Duration::from_secs(11);

/// Threads the daemon may add for its first model (a shared FUSE session's), however
/// many follow.
const MAX_ADDED_THREADS: usize = 4;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// A process's memory and threads, from `/proc`.
#[derive(Debug, Clone)]
struct Footprint {
    rss_kib: u64,
    hwm_kib: u64,
    anon_kib: u64,
    threads: usize,
    /// Thread names and how many threads carry each.
    names: BTreeMap<String, usize>,
}

fn status_kib(status: &str, key: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn footprint(pid: u32) -> Footprint {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let mut names = BTreeMap::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap().flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        // Numbered threads (`fuser-0`, `tokio-runtime-worker`) are counted under one name.
        let name = comm.trim().trim_end_matches(|c: char| c.is_ascii_digit()).to_owned();
        *names.entry(name).or_insert(0) += 1;
    }
    Footprint {
        rss_kib: status_kib(&status, "VmRSS:"),
        hwm_kib: status_kib(&status, "VmHWM:"),
        anon_kib: status_kib(&rollup, "Anonymous:"),
        threads: names.values().sum(),
        names,
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// Writes model `i`: a 2 MiB and a 1 MiB shard and two small files, all its own bytes.
fn write_small_model(dir: &Path, i: u64) {
    std::fs::create_dir_all(dir).unwrap();
    let seed = 1000 + 4 * i;
    std::fs::write(dir.join("model-00001-of-00002.safetensors"), pseudo_random(2 << 20, seed)).unwrap();
    std::fs::write(dir.join("model-00002-of-00002.safetensors"), pseudo_random(1 << 20, seed + 1)).unwrap();
    std::fs::write(dir.join("config.json"), format!("{{\"architectures\":[\"Demo\"],\"model\":{i}}}")).unwrap();
    std::fs::write(dir.join("tokenizer.json"), pseudo_random(64 << 10, seed + 2)).unwrap();
}

/// Pushes and converts `n` models, a few at a time: their companions' references.
fn push_models(tmp: &Path, addr: &str, n: u64) -> Vec<String> {
    let next = std::sync::atomic::AtomicU64::new(0);
    let companions = std::sync::Mutex::new(BTreeMap::new());
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let dir = tmp.join(format!("models/{i}"));
                write_small_model(&dir, i);
                let source = format!("{addr}/models/m{i}:v1");
                push_dir(&dir, &source, "raw");
                let (ok, _, err) = run_bin(&["convert", &source]);
                assert!(ok, "convert {source}: {err}");
                companions.lock().unwrap().insert(i, format!("{source}-lazy"));
            });
        }
    });
    companions.into_inner().unwrap().into_values().collect()
}

/// Pulls every companion through containerd into the snapshotter, a few at a time.
fn pull_all(containerd: &Containerd, companions: &[String]) {
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..4 {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(companion) = companions.get(i) else { break };
                containerd.ctr_ok(&["images", "pull", "--plain-http", "--snapshotter", "modelpack", companion]);
            });
        }
    });
}

/// Asks `Stat` of every snapshot in `names` until each answers (a model still being
/// mounted after a restart answers `Unavailable` once its bounded wait is over).
async fn stat_all(client: &mut SnapshotsClient, names: &[String], deadline: Instant) {
    for name in names {
        loop {
            let request = pb::StatSnapshotRequest { snapshotter: "modelpack".into(), key: name.clone() };
            match client.stat(request).await {
                Ok(_) => break,
                Err(status) if status.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Err(status) => panic!("Stat {name}: {status}"),
            }
        }
    }
}

/// How many FUSE mounts (a model's own, or binds of a shared session) lie under `root`.
fn fuse_mounts_under(root: &Path) -> usize {
    let root = root.display().to_string();
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    info.lines()
        .filter(|l| l.split(' ').nth(4).is_some_and(|p| p.starts_with(&root)))
        .filter(|l| l.split(" - ").nth(1).is_some_and(|fs| fs.starts_with("fuse")))
        .count()
}

struct Restart {
    socket: Duration,
    list: Duration,
    all_mounted: Duration,
}

fn names_line(f: &Footprint) -> String {
    f.names.iter().map(|(name, n)| format!("{name} ×{n}")).collect::<Vec<_>>().join(", ")
}

fn main() {
    if !prerequisites(true) || !require_tools(&["containerd", "ctr"]) {
        eprintln!("many_models: needs root, FUSE, docker-registry and containerd (make setup)");
        return;
    }
    let n = env_u64("BENCH_MODELS", 100).max(1);
    let tmp = tempfile::tempdir_in("/var/tmp").unwrap();
    let registry = TestRegistry::start();
    let t = Instant::now();
    let companions = push_models(tmp.path(), &registry.addr(), n);
    eprintln!("many_models: {n} models pushed and converted in {:.1} s", t.elapsed().as_secs_f64());

    let config = write_config(&tmp.path().join("etc"), "log_level = \"error\"\n");
    let root = tmp.path().join("snapshotter");
    let socket = root.join("snapshotter.sock");
    let mut serve = SnapshotterProcess::start_with(&root, &socket, &config);
    let containerd = Containerd::start_v2(&tmp.path().join("containerd"), &serve.socket);
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    // containerd has connected and asked once: the daemon as it idles on a node.
    containerd.ctr_ok(&["snapshots", "--snapshotter", "modelpack", "ls"]);
    std::thread::sleep(SETTLE);
    let empty = footprint(serve.pid());

    // Half the models first: what the second half adds is the cost of a further model,
    // without what the first one brings along (the session, the allocator's arenas).
    let half = companions.len() / 2;
    let t = Instant::now();
    pull_all(&containerd, &companions[..half]);
    let mut pulled = t.elapsed();
    std::thread::sleep(SETTLE);
    let halfway = footprint(serve.pid());
    let t = Instant::now();
    pull_all(&containerd, &companions[half..]);
    pulled += t.elapsed();
    let names = rt.block_on(snapshot_names(&serve.socket, "kind==committed"));
    assert_eq!(names.len() as u64, n, "one committed model snapshot per companion: {names:?}");
    assert_eq!(fuse_mounts_under(&root.join("snapshots")) as u64, n, "one mount per model");
    std::thread::sleep(SETTLE);
    let full = footprint(serve.pid());
    eprintln!("many_models: {n} companions pulled in {:.1} s; {full:?}", pulled.as_secs_f64());

    serve.kill();
    let t = Instant::now();
    let serve = SnapshotterProcess::start_with(&root, &socket, &config);
    let socket_at = t.elapsed();
    let restart = rt.block_on(async {
        let mut client = snapshots_client(&serve.socket).await;
        let listed = snapshot_names(&serve.socket, "kind==committed").await;
        let list = t.elapsed();
        assert_eq!(listed.len() as u64, n, "every model snapshot listed after the restart");
        stat_all(&mut client, &names, Instant::now() + Duration::from_secs(300)).await;
        Restart { socket: socket_at, list, all_mounted: t.elapsed() }
    });
    assert_eq!(fuse_mounts_under(&root.join("snapshots")) as u64, n, "every model mounted again, once");
    std::thread::sleep(SETTLE);
    let restarted = footprint(serve.pid());
    drop(containerd);
    drop(serve);

    let added_rss = full.rss_kib.saturating_sub(empty.rss_kib);
    let further = n - half as u64;
    let per_further = full.rss_kib.saturating_sub(halfway.rss_kib) as f64 / 1024.0 / further as f64;
    let added_threads = full.threads.saturating_sub(empty.threads);
    // DESIGN.md §5: each further mounted model adds ≤ 1 MiB and no thread of its own;
    // issue 11: 100 models add ≤ 100 MiB, restart answers in < 1 s.
    // The target is for 100 models; fewer get the same share per model.
    let rss_target = n * 1024;
    let yes = |ok: bool| if ok { "yes" } else { "**no**" };
    let mut report = String::new();
    report.push_str(&format!(
        "`serve` with containerd 1.6 pulling {n} companions of {n} small models (3.1 MiB each); \
         memory and threads measured {} s after the last pull.\n\n",
        SETTLE.as_secs()
    ));
    report.push_str("| measure | value | target | met |\n| --- | --- | --- | --- |\n");
    report.push_str(&format!(
        "| RSS (`VmRSS`), no model / {half} / {n} models mounted | {:.1} / {:.1} / {:.1} MiB | | |\n",
        mib(empty.rss_kib),
        mib(halfway.rss_kib),
        mib(full.rss_kib)
    ));
    report.push_str(&format!(
        "| RSS added by {n} mounted models (per model) | {:.1} MiB ({:.2} MiB) | ≤ {} MiB (1 MiB per model) | {} |\n",
        mib(added_rss),
        mib(added_rss) / n as f64,
        n,
        yes(added_rss <= rss_target)
    ));
    report.push_str(&format!(
        "| RSS added by each of the last {further} models ({half} → {n} mounted) | {per_further:.2} MiB | ≤ 1 MiB | {} |\n",
        yes(per_further <= 1.0)
    ));
    report.push_str(&format!(
        "| anonymous memory, no model / {half} / {n} models | {:.1} / {:.1} / {:.1} MiB | | |\n",
        mib(empty.anon_kib),
        mib(halfway.anon_kib),
        mib(full.anon_kib)
    ));
    report.push_str(&format!(
        "| peak RSS (`VmHWM`), no model / {n} models / after the restart | {:.1} / {:.1} / {:.1} MiB | | |\n",
        mib(empty.hwm_kib),
        mib(full.hwm_kib),
        mib(restarted.hwm_kib)
    ));
    report.push_str(&format!(
        "| threads, no model / {n} models / after the restart | {} / {} / {} | none per model (≤ {MAX_ADDED_THREADS} added) | {} |\n",
        empty.threads,
        full.threads,
        restarted.threads,
        yes(added_threads <= MAX_ADDED_THREADS)
    ));
    report.push_str(&format!(
        "| restart (SIGKILL): socket accepts a connection | {:.0} ms | | |\n",
        restart.socket.as_secs_f64() * 1e3
    ));
    report.push_str(&format!(
        "| restart (SIGKILL): socket answers `List` | {:.0} ms | < 1000 ms | {} |\n",
        restart.list.as_secs_f64() * 1e3,
        yes(restart.list < Duration::from_secs(1))
    ));
    report.push_str(&format!(
        "| restart (SIGKILL): all {n} models mounted again (`Stat` of each answers) | {:.0} ms | | |\n",
        restart.all_mounted.as_secs_f64() * 1e3
    ));
    report.push_str(&format!("\nThreads with no model: {}.\n", names_line(&empty)));
    report.push_str(&format!("Threads with {n} models: {}.\n", names_line(&full)));
    report.push_str(&format!("Threads after the restart: {}.\n", names_line(&restarted)));
    print!("{report}");
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("many_models.md"), report).unwrap();
}
