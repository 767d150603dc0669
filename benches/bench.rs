//! `make bench`: the lazy mount measured against a registry on loopback, next to the
//! link's limit and a local file in the same run (ratios, since absolute times on shared
//! machines are noisy). Medians of `BENCH_RUNS` repetitions (default 3). Writes
//! `target/bench/report.json`, `target/bench/report.md` and `target/bench/report.svg`
//! and prints the table. `docs/benchmarks.md` says how to read it.
//!
//! Environment: `BENCH_RUNS`, `BENCH_LARGE_BYTES` (the large model, default 8 GiB; 0
//! skips it), `BENCH_SMALL_BYTES` (default 1 GiB). Needs root (FUSE, dropping the page
//! cache), docker-registry, curl and python3 with numpy and safetensors.

#[path = "../tests/common/mod.rs"]
mod common;

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const BIN: &str = env!("CARGO_BIN_EXE_modelpack-snapshotter");

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

/// One measured quantity of the report.
struct Measure {
    id: &'static str,
    what: String,
    value: f64,
    unit: &'static str,
    reference: Option<(String, f64)>,
    target: Option<(&'static str, bool)>,
}

/// A model pushed to the registry.
struct Model {
    name: String,
    reference: String,
    dir: PathBuf,
    weights: Vec<PathBuf>,
    /// `sha256:<hex>` of each weight file, worked out once.
    digests: Vec<String>,
    weight_bytes: u64,
}

fn make_model(work: &Path, registry: &TestRegistry, name: &str, size: u64, tensor_bytes: u64) -> Model {
    let dir = work.join(name);
    let status = Command::new("python3")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make_model.py"))
        .arg(&dir)
        .args(["--size", &size.to_string(), "--shards", &(size.div_ceil(4 << 30)).max(2).to_string()])
        .args(["--tensor-bytes", &tensor_bytes.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "generating {name}");
    let reference = format!("{}/models/{name}:v1", registry.addr());
    push_dir(&dir, &reference, "raw");
    let mut weights: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    weights.sort();
    let weight_bytes = weights.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    let digests = weights.iter().map(|w| sha256_file(w)).collect();
    Model { name: name.to_owned(), reference, dir, weights, digests, weight_bytes }
}

fn make_small_files_model(work: &Path, registry: &TestRegistry) -> Model {
    let dir = work.join("many-files");
    for i in 0..1000u64 {
        let sub = dir.join(format!("part-{:02}", i % 20));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("shard-{i:04}.bin")), pseudo_random(4096 + (i as usize * 997) % 61_440, i + 7))
            .unwrap();
    }
    let reference = format!("{}/models/many-files:v1", registry.addr());
    push_dir(&dir, &reference, "raw");
    let files: Vec<PathBuf> = read_tree(&dir).keys().map(|k| dir.join(k)).collect();
    let bytes = files.iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
    let digests = files.iter().map(|w| sha256_file(w)).collect();
    Model { name: "many-files".into(), reference, dir, weights: files, digests, weight_bytes: bytes }
}

/// A `mount` process for benchmarking: started, timed to the first successful `stat`.
struct Mount {
    child: Option<Child>,
    mountpoint: PathBuf,
    ready: Duration,
}

impl Mount {
    fn start(model: &Model, work: &Path, cache: &Path, args: &[&str]) -> Self {
        let mountpoint = work.join("mnt");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let probe = mountpoint.join(model.weights[0].strip_prefix(&model.dir).unwrap());
        let t = Instant::now();
        let child = Command::new(BIN)
            .args(["mount", &model.reference])
            .arg(&mountpoint)
            .arg("--cache-dir")
            .arg(cache)
            .args(["--log-level", "warn"])
            .args(args)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(120);
        while std::fs::metadata(&probe).is_err() {
            assert!(Instant::now() < deadline, "mount of {} never became ready", model.name);
            std::thread::sleep(Duration::from_micros(200));
        }
        Self { child: Some(child), mountpoint, ready: t.elapsed() }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Peak resident memory of the serving process so far, in bytes.
    fn peak_rss(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    }

    /// Stops it; returns the bytes it fetched (from its closing line).
    fn stop(mut self) -> u64 {
        let child = self.child.take().unwrap();
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        if modelpack_snapshotter::fs::is_mountpoint(&self.mountpoint) {
            let _ = modelpack_snapshotter::fs::detach(&self.mountpoint);
        }
        text.lines()
            .find_map(|l| l.strip_prefix("unmounted: fetched "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if modelpack_snapshotter::fs::is_mountpoint(&self.mountpoint) {
            let _ = modelpack_snapshotter::fs::detach(&self.mountpoint);
        }
    }
}

fn mounted_weights(model: &Model, m: &Mount) -> Vec<PathBuf> {
    model.weights.iter().map(|w| m.mountpoint.join(w.strip_prefix(&model.dir).unwrap())).collect()
}

/// Reads files start to end, `threads` files at a time; returns the time taken.
fn read_all(files: &[PathBuf], threads: usize) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in files.chunks(files.len().div_ceil(threads.max(1))) {
            s.spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                for f in part {
                    let mut file = std::fs::File::open(f).unwrap();
                    while std::io::Read::read(&mut file, &mut buf).unwrap() > 0 {}
                }
            });
        }
    });
    t.elapsed()
}

/// Four parallel ranged `curl` downloads per blob, blob after blob: the link's limit.
fn curl_ranges(registry: &TestRegistry, model: &Model) -> Duration {
    let blobs: Vec<(u64, &String)> =
        model.weights.iter().zip(&model.digests).map(|(w, d)| (std::fs::metadata(w).unwrap().len(), d)).collect();
    let t = Instant::now();
    for (data_len, digest) in blobs {
        let quarter = data_len / 4;
        let children: Vec<Child> = (0..4)
            .map(|i| {
                let start = i * quarter;
                let end = if i == 3 { data_len - 1 } else { (i + 1) * quarter - 1 };
                Command::new("curl")
                    .args(["-fs", "-o", "/dev/null", "-r", &format!("{start}-{end}")])
                    .arg(format!("http://{}/v2/models/{}/blobs/{digest}", registry.addr(), model.name))
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success());
        }
    }
    t.elapsed()
}

/// CPU seconds (user and system) a process has used so far.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

fn sha256_file(path: &Path) -> String {
    let out = Command::new("sha256sum").arg(path).output().unwrap();
    format!("sha256:{}", String::from_utf8_lossy(&out.stdout).split(' ').next().unwrap())
}

/// Random 4 KiB reads of a file; latencies in milliseconds.
fn random_reads(file: &Path, count: usize, seed: u64) -> Vec<f64> {
    let f = std::fs::File::open(file).unwrap();
    let size = f.metadata().unwrap().len();
    let offsets = pseudo_random(count * 8, seed);
    let mut buf = vec![0u8; 4096];
    offsets
        .chunks(8)
        .map(|b| {
            let offset = (u64::from_le_bytes(b.try_into().unwrap()) % (size - 4096)) & !4095;
            let t = Instant::now();
            std::os::unix::fs::FileExt::read_exact_at(&f, &mut buf, offset).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

/// Waits (up to a minute) until the cache at `cache` holds the blobs `digests`, verified.
fn wait_complete(cache: &Path, digests: &[String]) {
    let dir = cache.join("blobs/sha256");
    let markers: Vec<PathBuf> =
        digests.iter().map(|d| dir.join(format!("{}.verified", d.trim_start_matches("sha256:")))).collect();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !markers.iter().all(|m| m.is_file()) {
        assert!(Instant::now() < deadline, "blobs in {} were not verified within a minute", dir.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn python(args: &[&str]) -> Duration {
    let t = Instant::now();
    let out = Command::new("python3").args(args).output().unwrap();
    assert!(out.status.success(), "python3 {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    t.elapsed()
}

fn main() {
    if !prerequisites(true) || !require_tools(&["curl", "python3", "sha256sum"]) {
        return;
    }
    let runs = env_u64("BENCH_RUNS", 3).max(1) as usize;
    let small_size = env_u64("BENCH_SMALL_BYTES", 1 << 30);
    let large_size = env_u64("BENCH_LARGE_BYTES", 8 << 30);
    let scripts = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts");
    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let registry = TestRegistry::start();
    eprintln!("bench: generating and pushing models");
    let small = make_model(work.path(), &registry, "small", small_size, 16 << 20);
    let large = (large_size > 0).then(|| make_model(work.path(), &registry, "large", large_size, 16 << 20));
    // For the partial-read target: a 1 GiB shard whose tensors are 1 MiB each.
    let fine = make_model(work.path(), &registry, "fine", 2 << 30, 1 << 20);
    let many = make_small_files_model(work.path(), &registry);
    let mut measures = Vec::new();
    let cache = |n: &str| work.path().join(format!("cache-{n}"));
    let fresh = |n: &str| {
        let _ = std::fs::remove_dir_all(cache(n));
        cache(n)
    };

    // Mount ready, for each model size: constant in size, under 100 ms.
    let mut ready_ms = Vec::new();
    for model in [Some(&small), large.as_ref(), Some(&many)].into_iter().flatten() {
        let times: Vec<f64> = (0..runs)
            .map(|_| {
                let m = Mount::start(model, work.path(), &fresh("ready"), &[]);
                let d = m.ready;
                m.stop();
                d.as_secs_f64() * 1e3
            })
            .collect();
        let ms = median(times);
        ready_ms.push((model.name.clone(), ms));
        measures.push(Measure {
            id: "mount_ready_ms",
            what: format!("mount ready ({}, {} bytes): command start to first stat", model.name, model.weight_bytes),
            value: ms,
            unit: "ms",
            reference: None,
            target: Some(("< 100 ms", ms < 100.0)),
        });
    }

    // First bytes of a safetensors header, from command start.
    let header_ms: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            let m = Mount::start(&small, work.path(), &fresh("header"), &[]);
            let file = &mounted_weights(&small, &m)[0];
            let mut f = std::fs::File::open(file).unwrap();
            let mut len = [0u8; 8];
            std::io::Read::read_exact(&mut f, &mut len).unwrap();
            let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
            std::io::Read::read_exact(&mut f, &mut header).unwrap();
            let ms = t.elapsed().as_secs_f64() * 1e3;
            m.stop();
            ms
        })
        .collect();
    measures.push(Measure {
        id: "header_ms",
        what: format!("command start to a safetensors header read ({} bytes)", small.weight_bytes),
        value: median(header_ms),
        unit: "ms",
        reference: None,
        target: None,
    });

    // Cold and warm sequential reads, next to curl and a local file, for each model.
    for model in [Some(&small), large.as_ref()].into_iter().flatten() {
        let mut cold = Vec::new();
        let mut curl = Vec::new();
        let mut warm = Vec::new();
        let mut local = Vec::new();
        let mut rss = 0u64;
        let (mut curl_registry_cpu, mut cold_registry_cpu, mut cold_mount_cpu) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..runs {
            // The registry's files in page cache for both, as for a registry serving hot content.
            read_all(&model.weights, 1);
            let registry_cpu = cpu_seconds(registry.pid());
            curl.push(mbps(model.weight_bytes, curl_ranges(&registry, model)));
            curl_registry_cpu.push(cpu_seconds(registry.pid()) - registry_cpu);
            let dir = fresh("seq");
            let m = Mount::start(model, work.path(), &dir, &[]);
            let files = mounted_weights(model, &m);
            let (registry_cpu, mount_cpu) = (cpu_seconds(registry.pid()), cpu_seconds(m.pid()));
            cold.push(mbps(model.weight_bytes, read_all(&files, 1)));
            cold_registry_cpu.push(cpu_seconds(registry.pid()) - registry_cpu);
            cold_mount_cpu.push(cpu_seconds(m.pid()) - mount_cpu);
            rss = rss.max(m.peak_rss());
            // Steady state after a full read: each verified blob also kept whole.
            wait_complete(&dir, &model.digests);
            m.stop();
            let m = Mount::start(model, work.path(), &dir, &[]);
            drop_caches();
            warm.push(mbps(model.weight_bytes, read_all(&mounted_weights(model, &m), 1)));
            m.stop();
            drop_caches();
            local.push(mbps(model.weight_bytes, read_all(&model.weights, 1)));
        }
        let (cold, curl, warm, local) = (median(cold), median(curl), median(warm), median(local));
        measures.push(Measure {
            id: "cold_read_mbps",
            what: format!("cold sequential read of all weights ({})", model.name),
            value: cold,
            unit: "MB/s",
            reference: Some(("4 parallel curl ranges".into(), curl)),
            target: Some(("≥ 0.9× curl", cold >= 0.9 * curl)),
        });
        // Where the CPU of the cold read goes, per GiB: on a machine with few cores the
        // registry, this process and the reader share them.
        let gib = model.weight_bytes as f64 / f64::from(1u32 << 30);
        let (curl_registry_cpu, cold_registry_cpu, cold_mount_cpu) =
            (median(curl_registry_cpu) / gib, median(cold_registry_cpu) / gib, median(cold_mount_cpu) / gib);
        measures.push(Measure {
            id: "cold_read_cpu_seconds_per_gib",
            what: format!(
                "CPU per GiB during the cold read ({}): mount process / registry {cold_registry_cpu:.2} s",
                model.name
            ),
            value: cold_mount_cpu,
            unit: "s",
            reference: Some(("registry CPU per GiB while serving curl".into(), curl_registry_cpu)),
            target: None,
        });
        measures.push(Measure {
            id: "warm_read_mbps",
            what: format!("warm read, every chunk cached, page cache dropped ({})", model.name),
            value: warm,
            unit: "MB/s",
            reference: Some(("local file, page cache dropped".into(), local)),
            target: Some(("≥ 0.95× local", warm >= 0.95 * local)),
        });
        measures.push(Measure {
            id: "peak_rss_bytes",
            what: format!("peak RSS of the mount process during the cold read ({})", model.name),
            value: rss as f64,
            unit: "bytes",
            reference: None,
            target: Some(("≤ 100 MiB", rss <= 100 << 20)),
        });
    }

    // Random 4 KiB reads, cold (prefetch and read-ahead off) and warm.
    let dir = fresh("random");
    let m = Mount::start(&small, work.path(), &dir, &["--readahead-chunks", "0"]);
    let file = mounted_weights(&small, &m)[0].clone();
    let cold = random_reads(&file, 200, 11);
    read_all(std::slice::from_ref(&file), 1);
    wait_complete(&dir, &small.digests[..1]);
    m.stop();
    let m = Mount::start(&small, work.path(), &dir, &["--readahead-chunks", "0"]);
    drop_caches();
    let warm = random_reads(&mounted_weights(&small, &m)[0], 200, 12);
    m.stop();
    drop_caches();
    let local = random_reads(&small.weights[0], 200, 13);
    for (id, label, v) in [("random_cold", "cold", cold), ("random_warm", "warm", warm)] {
        measures.push(Measure {
            id,
            what: format!("random 4 KiB read latency, {label}, p50 / p99"),
            value: percentile(v.clone(), 0.5),
            unit: "ms (p50)",
            reference: Some((
                format!("p99 {:.2} ms; local file p50", percentile(v, 0.99)),
                percentile(local.clone(), 0.5),
            )),
            target: None,
        });
    }

    // One tensor with prefetch off: bytes fetched, for 16 MiB and 1 MiB tensors.
    for (model, tensor, target) in [(&small, "16 MiB", None), (&fine, "1 MiB", Some(8u64 << 20))] {
        let m = Mount::start(model, work.path(), &fresh("one"), &[]);
        python(&[scripts.join("load_tensors.py").to_str().unwrap(), m.mountpoint.to_str().unwrap(), "--one"]);
        let fetched = m.stop();
        measures.push(Measure {
            id: "one_tensor_fetched_bytes",
            what: format!("bytes fetched for the header and first tensor ({tensor}) of a shard ({})", model.name),
            value: fetched as f64,
            unit: "bytes",
            reference: None,
            target: target.map(|t| ("≤ 8 MiB", fetched <= t)),
        });
    }

    // End to end: load every tensor straight after mount (on demand only, and with the
    // background prefetch a user loading everything would ask for), versus download then load.
    let load = scripts.join("load_tensors.py");
    let load = load.to_str().unwrap();
    let (mut lazy, mut prefetched, mut pull_first) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..runs {
        for (args, times) in [(&[][..], &mut lazy), (&["--prefetch"][..], &mut prefetched)] {
            read_all(&small.weights, 1);
            let t = Instant::now();
            let m = Mount::start(&small, work.path(), &fresh("e2e"), args);
            python(&[load, m.mountpoint.to_str().unwrap()]);
            times.push(t.elapsed().as_secs_f64());
            m.stop();
        }
        let dl = work.path().join(format!("download-{i}"));
        std::fs::create_dir_all(&dl).unwrap();
        read_all(&small.weights, 1);
        let t = Instant::now();
        for (w, digest) in small.weights.iter().zip(&small.digests) {
            let target = dl.join(w.file_name().unwrap());
            let ok = Command::new("curl")
                .args(["-fs", "-o"])
                .arg(&target)
                .arg(format!("http://{}/v2/models/small/blobs/{digest}", registry.addr()))
                .status()
                .unwrap()
                .success();
            assert!(ok);
        }
        python(&[load, dl.to_str().unwrap()]);
        pull_first.push(t.elapsed().as_secs_f64());
        let _ = std::fs::remove_dir_all(&dl);
    }
    let pull_first = median(pull_first);
    for (id, how, value) in
        [("e2e_load_seconds", "", median(lazy)), ("e2e_load_prefetch_seconds", ", with --prefetch", median(prefetched))]
    {
        measures.push(Measure {
            id,
            what: format!(
                "load every tensor with safetensors straight after mount{how} ({} bytes)",
                small.weight_bytes
            ),
            value,
            unit: "s",
            reference: Some(("download the blobs with curl, then load from disk".into(), pull_first)),
            target: Some(("≤ 0.75× download-then-load", value <= 0.75 * pull_first)),
        });
    }

    write_report(&measures, runs, &ready_ms);
}

fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem =
        std::fs::read_to_string("/proc/meminfo").unwrap_or_default().lines().next().unwrap_or_default().to_owned();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_owned()))
        .unwrap_or_default();
    json!({ "cpus": cpus, "cpu": cpu, "memory": mem, "kernel": kernel })
}

fn write_report(measures: &[Measure], runs: usize, ready: &[(String, f64)]) {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out).unwrap();
    let machine = machine();
    let entries: Vec<serde_json::Value> = measures
        .iter()
        .map(|m| {
            json!({
                "id": m.id, "what": m.what, "value": m.value, "unit": m.unit,
                "reference": m.reference.as_ref().map(|(w, v)| json!({"what": w, "value": v})),
                "ratio": m.reference.as_ref().map(|(_, v)| m.value / v),
                "target": m.target.map(|(t, met)| json!({"target": t, "met": met})),
            })
        })
        .collect();
    let report = json!({ "machine": machine, "runs": runs, "mount_ready_ms": ready, "measures": entries });
    std::fs::write(out.join("report.json"), serde_json::to_vec_pretty(&report).unwrap()).unwrap();

    let mut md = String::new();
    let _ = writeln!(md, "# modelpack-snapshotter benchmark\n");
    let _ = writeln!(
        md,
        "Machine: {} × {}, {}, kernel {}. Medians of {runs} runs.\n",
        machine["cpus"],
        machine["cpu"].as_str().unwrap_or(""),
        machine["memory"].as_str().unwrap_or("").split_whitespace().skip(1).collect::<Vec<_>>().join(" "),
        machine["kernel"].as_str().unwrap_or("")
    );
    let _ = writeln!(md, "| measure | value | next to | ratio | target | met |");
    let _ = writeln!(md, "| --- | --- | --- | --- | --- | --- |");
    for m in measures {
        let value = match m.unit {
            "bytes" => format!("{:.1} MiB", m.value / (1 << 20) as f64),
            unit => format!("{:.2} {unit}", m.value),
        };
        let (reference, ratio) = match &m.reference {
            Some((w, v)) => (format!("{w}: {v:.2}"), format!("{:.2}×", m.value / v)),
            None => (String::new(), String::new()),
        };
        let (target, met) = match m.target {
            Some((t, true)) => (t.to_owned(), "yes".to_owned()),
            Some((t, false)) => (t.to_owned(), "**no**".to_owned()),
            None => (String::new(), String::new()),
        };
        let _ = writeln!(md, "| {} | {value} | {reference} | {ratio} | {target} | {met} |", m.what);
    }
    std::fs::write(out.join("report.md"), &md).unwrap();
    std::fs::write(out.join("report.svg"), chart(measures)).unwrap();
    println!("{md}");
    println!("written: {}/report.{{json,md,svg}}", out.display());
}

/// A bar chart of every measure that has a reference: our value as a share of it, with
/// the target line where there is one.
fn chart(measures: &[Measure]) -> String {
    let rows: Vec<&Measure> = measures
        .iter()
        .filter(|m| m.reference.is_some() && m.unit != "ms (p50)" && !m.id.starts_with("cold_read_cpu"))
        .collect();
    let (w, row_h, left) = (760.0, 34.0, 330.0);
    let h = 40.0 + row_h * rows.len() as f64;
    let scale = (w - left - 60.0) / 1.5;
    let mut svg = format!(
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ =
        write!(svg, r#"<text x="10" y="20" font-size="14">ours ÷ reference (1.0 = as fast as the reference)</text>"#);
    let x1 = left + scale;
    let _ = write!(svg, r##"<line x1="{x1}" y1="28" x2="{x1}" y2="{h}" stroke="#888" stroke-dasharray="4"/>"##);
    for (i, m) in rows.iter().enumerate() {
        let y = 34.0 + row_h * i as f64;
        let (_, reference) = m.reference.as_ref().unwrap();
        let ratio = m.value / reference;
        let ratio = if m.unit == "s" { reference / m.value } else { ratio };
        let color = match m.target {
            Some((_, true)) => "#3a7",
            Some((_, false)) => "#c44",
            None => "#59c",
        };
        let _ = write!(svg, r#"<text x="10" y="{}">{}</text>"#, y + 16.0, m.what.chars().take(48).collect::<String>());
        let _ = write!(
            svg,
            r#"<rect x="{left}" y="{}" width="{:.1}" height="22" fill="{color}"/>"#,
            y + 2.0,
            (ratio.min(1.5) * scale).max(1.0)
        );
        let _ =
            write!(svg, r#"<text x="{:.1}" y="{}">{ratio:.2}×</text>"#, left + ratio.min(1.5) * scale + 4.0, y + 17.0);
    }
    svg.push_str("</svg>");
    svg
}
