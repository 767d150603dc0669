//! `make bench`: the `mount` read path measured against a registry on loopback, next to
//! what the same machine does without us in the same runs (four parallel `curl` ranges,
//! a verified download done well, a local file, download-then-load), as ratios, since
//! absolute times on shared machines are noisy. Every number is the median of
//! `BENCH_RUNS` runs (default 3) after one unmeasured warm-up run. Writes
//! `target/bench/report.json`, `target/bench/report.md` and `target/bench/report.svg` and
//! prints the table; `docs/benchmarks.md` lists every row, how it is measured and its target.
//!
//! Environment: `BENCH_RUNS`; `BENCH_SMALL_BYTES` (default 1 GiB) and `BENCH_LARGE_BYTES`
//! (default 4 GiB; 0 skips it), the two models read in full; `BENCH_HUGE_BYTES` (default
//! 8 GiB; 0 skips it), a model only mounted (mount ready), made of the large model's
//! weight files (the small one's without it) listed again under further directories, so
//! the registry stores each blob once. Needs root (FUSE, dropping the page cache),
//! docker-registry, curl, perf, and python3 with numpy and safetensors.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "bench/probes.rs"]
mod probes;
#[path = "bench/report.rs"]
mod report;

use std::io::{BufRead as _, BufReader, Read as _};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use modelpack_snapshotter::config::FetchSettings;
use probes::{Blob, PerfStat};
use report::{median, Cmp, Measure, Target};
use serde_json::json;
use sha2::{Digest as _, Sha256};

const GIB: f64 = (1u64 << 30) as f64;
const MIB: u64 = 1 << 20;

/// The groups of the report, in order.
const GROUPS: &[&str] =
    &["Mount ready", "Cold sequential read", "Warm read and memory", "Partial reads", "Random reads", "End to end"];

const PAGE_CACHE: &str = "before each side of a comparison (each download, each fresh mount), the files the \
     previous side wrote (downloads, the mount's cache) are deleted, `sync` runs, and the registry's files of \
     the model's blobs are read whole, so every side starts with the registry's blobs in page cache (a \
     registry serving hot content) and nothing of its own. Warm and local reads start with the page cache \
     dropped (`echo 3 > /proc/sys/vm/drop_caches`).";

const CONTEXT_SWITCHES: &str = "`perf stat -e context-switches,task-clock -p PID` attached to the mount \
     process with its counters off, switched on just before the first read and off once every blob is \
     verified: per-thread counters inherited by threads started later, kept for threads that exit; \
     `context-switches` counts voluntary and involuntary switches. The mount's CPU per GiB is perf's \
     `task-clock` over the same window. The verified download's are this process's own \
     (`getrusage(RUSAGE_SELF)`, every thread).";

const VERIFIED_DOWNLOAD: &str = "per blob, blob after blob, the same four ranges as the `curl` side fetched \
     in parallel (`reqwest`, one HTTP/1.1 connection each) and written into one file at their offsets as they \
     arrive, while one thread hashes the blob with sha256 (the `sha2` crate, SHA-NI when the CPU has it) in \
     blob order as its prefix completes, reading back bytes just written (from page cache); a blob is done \
     when its last byte is hashed and the digest matches.";

/// The directories sides of a comparison write to (caches, downloads), under the work dir.
const SCRATCH: &[&str] = &["seq", "download", "loader", "e2e"];

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// One unmeasured warm-up run of `f`, then `runs` measured ones.
fn repeat<T>(runs: usize, mut f: impl FnMut() -> T) -> Vec<T> {
    let _ = f();
    (0..runs).map(|_| f()).collect()
}

fn drop_caches() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3");
}

fn mbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e6
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// `1 GiB`, `1.5 GiB`, `256 MiB`.
fn size_label(bytes: u64) -> String {
    if bytes >= 1 << 30 {
        let g = bytes as f64 / GIB;
        if (g - g.round()).abs() < 0.01 {
            format!("{} GiB", g.round())
        } else {
            format!("{g:.1} GiB")
        }
    } else {
        format!("{} MiB", (bytes as f64 / MIB as f64).round())
    }
}

/// A model pushed to the registry.
struct Model {
    /// Its repository, `models/<name>`.
    name: String,
    /// How the report names it: `1 GiB model (2 shards)`.
    label: String,
    /// `<registry>/models/<name>:v1`.
    reference: String,
    /// `<registry>/models/<name>@sha256:…`, the manifest's digest.
    pinned: String,
    dir: PathBuf,
    /// The files read (relative to `dir`, and to the mountpoint): the safetensors shards,
    /// or every file of a model of small files.
    files: Vec<PathBuf>,
    /// `sha256:<hex>` and size of each of `files`, worked out once.
    digests: Vec<String>,
    sizes: Vec<u64>,
    bytes: u64,
}

impl Model {
    fn sources(&self) -> Vec<PathBuf> {
        self.files.iter().map(|f| self.dir.join(f)).collect()
    }

    fn mounted(&self, mountpoint: &Path) -> Vec<PathBuf> {
        self.files.iter().map(|f| mountpoint.join(f)).collect()
    }

    fn blobs(&self, registry: &TestRegistry) -> Vec<Blob> {
        self.digests
            .iter()
            .zip(&self.sizes)
            .map(|(d, &size)| Blob {
                url: format!("http://{}/v2/models/{}/blobs/{d}", registry.addr(), self.name),
                digest: d.clone(),
                size,
            })
            .collect()
    }
}

fn sha256_file(path: &Path) -> String {
    let mut f = std::fs::File::open(path).unwrap();
    let mut sha = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        sha.update(&buf[..n]);
    }
    format!("sha256:{}", hex::encode(sha.finalize()))
}

/// Pushes `dir` as `models/<name>:v1`; returns the model, reading `files` (whose digests
/// are worked out unless given).
fn push_model(
    registry: &TestRegistry,
    dir: &Path,
    name: &str,
    label: String,
    files: Vec<PathBuf>,
    digests: Option<Vec<String>>,
) -> Model {
    let reference = format!("{}/models/{name}:v1", registry.addr());
    let (ok, stdout, stderr) = run_bin(&["push", dir.to_str().unwrap(), &reference, "--format", "raw"]);
    assert!(ok, "push of {name} failed: {stderr}");
    let digest = stdout.trim().to_owned();
    assert!(digest.starts_with("sha256:"), "push printed {stdout:?}");
    let sizes: Vec<u64> = files.iter().map(|f| std::fs::metadata(dir.join(f)).unwrap().len()).collect();
    let digests = digests.unwrap_or_else(|| files.iter().map(|f| sha256_file(&dir.join(f))).collect());
    Model {
        name: name.to_owned(),
        label,
        pinned: format!("{}/models/{name}@{digest}", registry.addr()),
        reference,
        dir: dir.to_owned(),
        files,
        digests,
        bytes: sizes.iter().sum(),
        sizes,
    }
}

/// The safetensors files under `dir`, relative to it, sorted.
fn safetensors_files(dir: &Path) -> Vec<PathBuf> {
    read_tree(dir).keys().filter(|k| k.ends_with(".safetensors")).map(PathBuf::from).collect()
}

/// Generates a model with `scripts/make_model.py` and pushes it.
fn make_model(
    work: &Path,
    registry: &TestRegistry,
    name: &str,
    size: u64,
    shards: u64,
    middle_tensors: &[u64],
) -> Model {
    let dir = work.join(name);
    let mut cmd = Command::new("python3");
    cmd.arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/make_model.py"))
        .arg(&dir)
        .args(["--size", &size.to_string(), "--shards", &shards.to_string()])
        .args(["--tensor-bytes", &(16 * MIB).to_string()]);
    for t in middle_tensors {
        cmd.args(["--middle-tensor", &t.to_string()]);
    }
    assert!(cmd.status().unwrap().success(), "generating {name}");
    let label = format!("{} model ({shards} shard{})", size_label(size), if shards == 1 { "" } else { "s" });
    push_model(registry, &dir, name, label, safetensors_files(&dir), None)
}

/// A model of `size` bytes made of `base`'s weight files, hard-linked again under
/// `copy-<n>/` directories: the registry stores each blob once, and a mount reads only
/// the manifest and config before it is ready.
fn make_huge(work: &Path, registry: &TestRegistry, base: &Model, size: u64) -> Model {
    let dir = work.join("huge");
    let copies = size.div_ceil(base.bytes).max(1);
    let mut files = Vec::new();
    for k in 0..copies {
        for f in &base.files {
            let to = Path::new(&format!("copy-{k}")).join(f);
            std::fs::create_dir_all(dir.join(&to).parent().unwrap()).unwrap();
            std::fs::hard_link(base.dir.join(f), dir.join(&to)).unwrap();
            files.push(to);
        }
    }
    let label = format!(
        "{} model ({} shards: the {} model's, {copies} times over)",
        size_label(base.bytes * copies),
        files.len(),
        size_label(base.bytes)
    );
    let digests = (0..copies).flat_map(|_| base.digests.iter().cloned()).collect();
    push_model(registry, &dir, "huge", label, files, Some(digests))
}

fn make_many_files(work: &Path, registry: &TestRegistry) -> Model {
    let dir = work.join("many-files");
    for i in 0..1000u64 {
        let sub = dir.join(format!("part-{:02}", i % 20));
        std::fs::create_dir_all(&sub).unwrap();
        std::fs::write(sub.join(format!("shard-{i:04}.bin")), pseudo_random(4096 + (i as usize * 997) % 61_440, i + 7))
            .unwrap();
    }
    let files: Vec<PathBuf> = read_tree(&dir).keys().map(PathBuf::from).collect();
    let bytes: u64 = files.iter().map(|f| std::fs::metadata(dir.join(f)).unwrap().len()).sum();
    push_model(registry, &dir, "many-files", format!("1000 small files ({})", size_label(bytes)), files, None)
}

/// A `mount` process for benchmarking: started, timed to the first successful `stat`.
struct Mount {
    child: Option<Child>,
    stdout: Option<BufReader<ChildStdout>>,
    mountpoint: PathBuf,
    ready: Duration,
}

impl Mount {
    fn start(model: &Model, reference: &str, work: &Path, cache: &Path, args: &[&str]) -> Self {
        let mountpoint = work.join("mnt");
        std::fs::create_dir_all(&mountpoint).unwrap();
        let probe = mountpoint.join(&model.files[0]);
        let t = Instant::now();
        let mut child = Command::new(BIN)
            .args(["mount", reference])
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
            assert!(Instant::now() < deadline, "mount of {reference} never became ready");
            std::thread::sleep(Duration::from_micros(200));
        }
        let ready = t.elapsed();
        // The file system answers a little before the process has printed `ready:` and
        // set up its signal handling; a SIGTERM before that would kill it unreported.
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        while !line.starts_with("ready:") {
            line.clear();
            assert!(stdout.read_line(&mut line).unwrap() > 0, "mount of {reference} exited before it was ready");
        }
        Self { child: Some(child), stdout: Some(stdout), mountpoint, ready }
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
        let mut child = self.child.take().unwrap();
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let mut text = String::new();
        self.stdout.take().unwrap().read_to_string(&mut text).unwrap();
        child.wait().unwrap();
        if modelpack_snapshotter::fs::is_mountpoint(&self.mountpoint) {
            let _ = modelpack_snapshotter::fs::detach(&self.mountpoint);
        }
        text.lines()
            .find_map(|l| l.strip_prefix("unmounted: fetched "))
            .and_then(|l| l.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("mount printed no bytes fetched: {text:?}"))
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

/// Reads files start to end, `threads` files at a time, 1 MiB per read; returns the time taken.
fn read_all(files: &[PathBuf], threads: usize) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in files.chunks(files.len().div_ceil(threads.max(1))) {
            s.spawn(move || {
                let mut buf = vec![0u8; MIB as usize];
                for f in part {
                    let mut file = std::fs::File::open(f).unwrap();
                    while file.read(&mut buf).unwrap() > 0 {}
                }
            });
        }
    });
    t.elapsed()
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
            ms(t.elapsed())
        })
        .collect()
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Waits (up to ten minutes) until the cache at `cache` holds the blobs `digests`, verified.
fn wait_complete(cache: &Path, digests: &[String]) {
    let dir = cache.join("blobs/sha256");
    let markers: Vec<PathBuf> =
        digests.iter().map(|d| dir.join(format!("{}.verified", d.trim_start_matches("sha256:")))).collect();
    let deadline = Instant::now() + Duration::from_secs(600);
    while !markers.iter().all(|m| m.is_file()) {
        assert!(Instant::now() < deadline, "blobs in {} were not verified within ten minutes", dir.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs `scripts/load_tensors.py ARGS`; returns (tensor bytes loaded, seconds the loading took).
fn load_tensors(args: &[&str]) -> (u64, f64) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/load_tensors.py");
    let out = Command::new("python3").arg(script).args(args).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "load_tensors.py {args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    // "loaded N tensors, B bytes in S s"
    let words: Vec<&str> = stdout.split_whitespace().collect();
    let bytes = words.get(3).and_then(|w| w.parse().ok());
    let secs = words.get(6).and_then(|w| w.parse().ok());
    bytes.zip(secs).unwrap_or_else(|| panic!("load_tensors.py printed {stdout:?}"))
}

/// Where a tensor's bytes are in a safetensors file: `(start, end)` file offsets.
fn tensor_span(file: &Path, name: &str) -> (u64, u64) {
    let mut f = std::fs::File::open(file).unwrap();
    let mut len = [0u8; 8];
    f.read_exact(&mut len).unwrap();
    let n = u64::from_le_bytes(len);
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).unwrap();
    let header: serde_json::Value = serde_json::from_slice(&header).unwrap();
    let at = |i: usize| header[name]["data_offsets"][i].as_u64().unwrap() + 8 + n;
    (at(0), at(1))
}

/// The bench's state: the registry, scratch space, and the models.
struct Bench {
    registry: TestRegistry,
    work: tempfile::TempDir,
    runs: usize,
}

impl Bench {
    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// An empty directory `name` (a cache, a download target).
    fn fresh(&self, name: &str) -> PathBuf {
        let dir = self.path(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// The page cache state every side of a comparison starts from (see [`PAGE_CACHE`]):
    /// what earlier sides wrote deleted, written pages flushed, the model's blobs in the
    /// registry read whole.
    fn start_side(&self, model: &Model) {
        for dir in SCRATCH {
            let _ = std::fs::remove_dir_all(self.path(dir));
        }
        let _ = Command::new("sync").status();
        let files: Vec<PathBuf> = model.digests.iter().map(|d| self.registry.blob_file(d)).collect();
        read_all(&files, 1);
    }

    fn mount(&self, model: &Model, cache: &Path, args: &[&str]) -> Mount {
        Mount::start(model, &model.reference, self.work.path(), cache, args)
    }
}

fn main() {
    if !prerequisites(true) || !require_tools(&["curl", "python3", "perf"]) {
        return;
    }
    let runs = env_u64("BENCH_RUNS", 3).max(1) as usize;
    let small_size = env_u64("BENCH_SMALL_BYTES", 1 << 30);
    let large_size = env_u64("BENCH_LARGE_BYTES", 4 << 30);
    let huge_size = env_u64("BENCH_HUGE_BYTES", 8 << 30);
    let bench = Bench { registry: TestRegistry::start(), work: tempfile::tempdir_in("/var/tmp").unwrap(), runs };
    let (work, registry) = (bench.work.path(), &bench.registry);
    eprintln!("bench: generating and pushing models");
    let shards = |size: u64| size.div_ceil(4 << 30).max(2);
    let small = make_model(work, registry, "small", small_size, shards(small_size), &[]);
    let large = (large_size > 0).then(|| make_model(work, registry, "large", large_size, shards(large_size), &[]));
    let huge = (huge_size > 0).then(|| make_huge(work, registry, large.as_ref().unwrap_or(&small), huge_size));
    // For the partial reads: one 1 GiB shard with a 16 MiB and a 1 MiB tensor in its middle.
    let shard = make_model(work, registry, "shard", 1 << 30, 1, &[16 * MIB, MIB]);
    let many = make_many_files(work, registry);

    let mut measures = Vec::new();
    eprintln!("bench: mount ready");
    mount_ready(&bench, [Some(&small), large.as_ref(), huge.as_ref(), Some(&many)], &mut measures);
    for model in [Some(&small), large.as_ref()].into_iter().flatten() {
        eprintln!("bench: reads of the {}", model.label);
        full_reads(&bench, model, &mut measures);
    }
    eprintln!("bench: partial reads");
    partial_reads(&bench, &shard, &small, &mut measures);
    measures.sort_by_key(|m| GROUPS.iter().position(|g| *g == m.group).unwrap_or(GROUPS.len()));

    let models: Vec<serde_json::Value> = [Some(&small), large.as_ref(), huge.as_ref(), Some(&shard), Some(&many)]
        .into_iter()
        .flatten()
        .map(|m| json!({ "name": m.name, "label": m.label, "bytes": m.bytes, "files": m.files.len(), "manifest": m.pinned }))
        .collect();
    let setup = report::Setup {
        runs,
        page_cache: PAGE_CACHE,
        context_switches: CONTEXT_SWITCHES,
        verified_download: VERIFIED_DOWNLOAD,
        models: serde_json::Value::Array(models),
    };
    report::write(&measures, &setup);
}

/// Mount ready for every model from an empty cache, again with the manifest and config
/// cached, and the first safetensors header.
fn mount_ready(bench: &Bench, models: [Option<&Model>; 4], measures: &mut Vec<Measure>) {
    let small = models[0].unwrap();
    for model in models.into_iter().flatten() {
        let times = repeat(bench.runs, || {
            let m = bench.mount(model, &bench.fresh("ready"), &[]);
            let d = m.ready;
            m.stop();
            ms(d)
        });
        measures.push(
            Measure::new(
                "Mount ready",
                format!("mount_ready_ms/{}", model.name),
                format!("mount ready, {}: command start to the first stat of a file, empty cache", model.label),
                "ms",
                times,
            )
            .target(Target::value(Cmp::Below, 100.0)),
        );
    }

    // The same digest reference mounted a second time with the cache kept.
    let times = repeat(bench.runs, || {
        let cache = bench.fresh("ready-again");
        Mount::start(small, &small.pinned, bench.work.path(), &cache, &[]).stop();
        let m = Mount::start(small, &small.pinned, bench.work.path(), &cache, &[]);
        let d = m.ready;
        m.stop();
        ms(d)
    });
    measures.push(
        Measure::new(
            "Mount ready",
            "mount_ready_cached_ms".into(),
            format!(
                "mount ready again, {}, by digest (models/{}@sha256:…), manifest and config cached by a first mount",
                small.label, small.name
            ),
            "ms",
            times,
        )
        .target(Target::value(Cmp::Below, 40.0)),
    );

    let times = repeat(bench.runs, || {
        let t = Instant::now();
        let m = bench.mount(small, &bench.fresh("header"), &[]);
        let mut f = std::fs::File::open(m.mountpoint.join(&small.files[0])).unwrap();
        let mut len = [0u8; 8];
        f.read_exact(&mut len).unwrap();
        let mut header = vec![0u8; u64::from_le_bytes(len) as usize];
        f.read_exact(&mut header).unwrap();
        let d = t.elapsed();
        drop(f);
        m.stop();
        ms(d)
    });
    measures.push(Measure::new(
        "Mount ready",
        "header_ms".into(),
        format!("command start to a safetensors header read, {}, empty cache", small.label),
        "ms",
        times,
    ));
}

/// The samples of one run of [`full_reads`].
#[derive(Default)]
struct ReadRun {
    curl: f64,
    registry_cpu_curl: f64,
    verified: f64,
    /// CPU seconds and context switches per GiB, of the verified download and of the mount.
    verified_cpu: f64,
    verified_switches: f64,
    cold: f64,
    mount_cpu: f64,
    mount_switches: f64,
    registry_cpu_cold: f64,
    rss: f64,
    warm: f64,
    local: f64,
    loader: f64,
    e2e_lazy: f64,
    e2e_prefetch: f64,
    e2e_download: f64,
}

/// Whole-model reads of `model`: cold next to the link and a verified download, CPU and
/// context switches, warm next to local, a loader in file order, and end to end.
fn full_reads(bench: &Bench, model: &Model, measures: &mut Vec<Measure>) {
    let registry = &bench.registry;
    let blobs = model.blobs(registry);
    let gib = model.bytes as f64 / GIB;
    let bytes = model.bytes;
    let samples = repeat(bench.runs, || {
        let mut r = ReadRun::default();

        // The link: four ranges per blob to /dev/null.
        bench.start_side(model);
        let cpu = probes::cpu_seconds(registry.pid());
        r.curl = mbps(bytes, probes::curl_ranges(&blobs));
        r.registry_cpu_curl = (probes::cpu_seconds(registry.pid()) - cpu) / gib;

        // A verified download done well.
        bench.start_side(model);
        let dl = bench.fresh("download");
        let usage = probes::self_usage();
        r.verified = mbps(bytes, probes::verified_download(&blobs, &dl));
        let usage = probes::self_usage() - usage;
        (r.verified_cpu, r.verified_switches) = (usage.cpu_seconds / gib, usage.context_switches / gib);

        // The cold read through a fresh mount, until every blob is verified.
        bench.start_side(model);
        let cache = bench.fresh("seq");
        let m = bench.mount(model, &cache, &[]);
        let mut perf = PerfStat::attach(m.pid());
        perf.enable();
        let cpu = probes::cpu_seconds(registry.pid());
        r.cold = mbps(bytes, read_all(&model.mounted(&m.mountpoint), 1));
        wait_complete(&cache, &model.digests);
        perf.disable();
        r.registry_cpu_cold = (probes::cpu_seconds(registry.pid()) - cpu) / gib;
        let usage = perf.finish();
        (r.mount_cpu, r.mount_switches) = (usage.cpu_seconds / gib, usage.context_switches / gib);
        r.rss = m.peak_rss() as f64;
        m.stop();

        // Warm: a second mount over the full cache; next to the source files.
        let m = bench.mount(model, &cache, &[]);
        drop_caches();
        r.warm = mbps(bytes, read_all(&model.mounted(&m.mountpoint), 1));
        m.stop();
        drop_caches();
        r.local = mbps(bytes, read_all(&model.sources(), 1));

        // A loader reading each shard's tensors in file order, straight after mount.
        bench.start_side(model);
        let m = bench.mount(model, &bench.fresh("loader"), &[]);
        let (loaded, secs) = load_tensors(&[m.mountpoint.to_str().unwrap(), "--file-order"]);
        r.loader = loaded as f64 / secs / 1e6;
        m.stop();

        // End to end: mount and load every tensor, on demand and with --prefetch.
        for (args, out) in [(&[][..], &mut r.e2e_lazy), (&["--prefetch"][..], &mut r.e2e_prefetch)] {
            bench.start_side(model);
            let t = Instant::now();
            let m = bench.mount(model, &bench.fresh("e2e"), args);
            load_tensors(&[m.mountpoint.to_str().unwrap()]);
            *out = t.elapsed().as_secs_f64();
            m.stop();
        }
        // Versus downloading the blobs with curl, then loading from disk.
        bench.start_side(model);
        let dl = bench.fresh("download");
        let t = Instant::now();
        for (file, blob) in model.files.iter().zip(&blobs) {
            let ok = Command::new("curl")
                .args(["-fs", "-o"])
                .arg(dl.join(file.file_name().unwrap()))
                .arg(&blob.url)
                .status()
                .unwrap()
                .success();
            assert!(ok, "curl of {}", blob.url);
        }
        load_tensors(&[dl.to_str().unwrap()]);
        r.e2e_download = t.elapsed().as_secs_f64();
        let _ = std::fs::remove_dir_all(&dl);
        r
    });
    let get = |f: fn(&ReadRun) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
    let (name, label) = (&model.name, &model.label);
    let g = "Cold sequential read";
    measures.push(
        Measure::new(
            g,
            format!("cold_read_vs_curl/{name}"),
            format!("cold sequential read, {label}, fresh mount and empty cache ÷ four parallel curl ranges"),
            "MB/s",
            get(|r| r.cold),
        )
        .against("4 parallel curl ranges", get(|r| r.curl))
        .target(Target::ratio(Cmp::AtLeast, 0.7)),
    );
    measures.push(
        Measure::new(
            g,
            format!("cold_read_vs_verified_download/{name}"),
            format!(
                "cold sequential read, {label} ÷ a verified download (the same four ranges written to a file and \
                 sha256-hashed in order as they arrive)"
            ),
            "MB/s",
            get(|r| r.cold),
        )
        .against("verified download", get(|r| r.verified))
        .target(Target::ratio(Cmp::AtLeast, 1.0)),
    );
    measures.push(
        Measure::new(
            g,
            format!("cold_read_cpu_seconds_per_gib/{name}"),
            format!("mount process CPU per GiB of the cold read, until every blob is verified, {label}"),
            "s/GiB",
            get(|r| r.mount_cpu),
        )
        .against("verified download", get(|r| r.verified_cpu))
        .target(Target::value(Cmp::AtMost, 1.0)),
    );
    measures.push(
        Measure::new(
            g,
            format!("cold_read_context_switches_per_gib/{name}"),
            format!("mount process context switches per GiB of the same read (voluntary + involuntary, all threads), {label}"),
            "/GiB",
            get(|r| r.mount_switches),
        )
        .against("verified download", get(|r| r.verified_switches)),
    );
    measures.push(
        Measure::new(
            g,
            format!("cold_read_registry_cpu_seconds_per_gib/{name}"),
            format!("registry CPU per GiB serving the cold read, {label}"),
            "s/GiB",
            get(|r| r.registry_cpu_cold),
        )
        .against("serving the curl ranges", get(|r| r.registry_cpu_curl)),
    );
    let g = "Warm read and memory";
    measures.push(
        Measure::new(
            g,
            format!("warm_read_mbps/{name}"),
            format!("warm read, {label}: every chunk cached, second mount, page cache dropped"),
            "MB/s",
            get(|r| r.warm),
        )
        .against("local file, page cache dropped", get(|r| r.local))
        .target(Target::ratio(Cmp::AtLeast, 0.95)),
    );
    measures.push(
        Measure::new(
            g,
            format!("peak_rss_bytes/{name}"),
            format!("peak RSS of the mount process (VmHWM) over the cold read, {label}"),
            "bytes",
            get(|r| r.rss),
        )
        .target(Target::value(Cmp::AtMost, 100.0 * MIB as f64)),
    );
    measures.push(
        Measure::new(
            "Partial reads",
            format!("file_order_load_mbps/{name}"),
            format!(
                "a loader reading every tensor in file order (safetensors, offset_keys), straight after mount, \
                 {label} ÷ the cold sequential read"
            ),
            "MB/s",
            get(|r| r.loader),
        )
        .against("cold sequential read", get(|r| r.cold))
        .target(Target::ratio(Cmp::AtLeast, 0.9)),
    );
    for (id, how, f) in [
        ("e2e_load_seconds", "", (|r: &ReadRun| r.e2e_lazy) as fn(&ReadRun) -> f64),
        ("e2e_load_prefetch_seconds", " with --prefetch", |r: &ReadRun| r.e2e_prefetch),
    ] {
        measures.push(
            Measure::new(
                "End to end",
                format!("{id}/{name}"),
                format!(
                    "mount{how}, then load every tensor with safetensors, {label} ÷ download the blobs with curl, \
                     then load"
                ),
                "s",
                get(f),
            )
            .against("download then load", get(|r| r.e2e_download))
            .target(Target::ratio(Cmp::AtMost, 1.0).with_goal(0.75)),
        );
    }
}

/// Bytes fetched for one tensor from the middle of a shard, random 4 KiB reads.
fn partial_reads(bench: &Bench, shard: &Model, small: &Model, measures: &mut Vec<Measure>) {
    let chunk = FetchSettings::default().chunk_size;
    for (size, limit) in [(16 * MIB, 24 * MIB), (MIB, 8 * MIB)] {
        let name = format!("middle.0.{size}");
        let (start, end) = tensor_span(&shard.dir.join(&shard.files[0]), &name);
        let fetched = repeat(bench.runs, || {
            let m = bench.mount(shard, &bench.fresh("one"), &[]);
            load_tensors(&[m.mountpoint.to_str().unwrap(), "--tensor", &name]);
            m.stop() as f64
        });
        let touched = end.div_ceil(chunk) - start / chunk;
        measures.push(
            Measure::new(
                "Partial reads",
                format!("one_tensor_fetched_bytes/{}", size_label(size).replace(' ', "")),
                format!(
                    "bytes fetched for the header and one {} tensor from the middle of a {} shard (safetensors: safe_open, \
                     get_tensor), fresh mount",
                    size_label(size),
                    size_label(shard.bytes)
                ),
                "bytes",
                fetched,
            )
            .note(format!(
                "tensor at {:.3}–{:.3} MiB of the file: {touched} chunk{} of {} and the header's",
                start as f64 / MIB as f64,
                end as f64 / MIB as f64,
                if touched == 1 { "" } else { "s" },
                size_label(chunk)
            ))
            .target(Target::value(Cmp::AtMost, limit as f64)),
        );
    }

    // Random 4 KiB reads of one shard, cold (read-ahead off) and warm, next to a local file.
    let file = &small.files[0];
    let samples = repeat(bench.runs, || {
        let cache = bench.fresh("random");
        let m = bench.mount(small, &cache, &["--readahead-chunks", "0"]);
        let cold = random_reads(&m.mountpoint.join(file), 200, 11);
        read_all(&[m.mountpoint.join(file)], 1);
        wait_complete(&cache, &small.digests[..1]);
        m.stop();
        let m = bench.mount(small, &cache, &["--readahead-chunks", "0"]);
        drop_caches();
        let warm = random_reads(&m.mountpoint.join(file), 200, 12);
        m.stop();
        drop_caches();
        let local = random_reads(&small.dir.join(file), 200, 13);
        [cold, warm, local].map(|v| (percentile(v.clone(), 0.5), percentile(v, 0.99)))
    });
    let get = |i: usize, p99: bool| samples.iter().map(|s| if p99 { s[i].1 } else { s[i].0 }).collect::<Vec<_>>();
    let what = |how: &str| format!("random 4 KiB reads of a {} shard, {how}, p50", size_label(small.sizes[0]));
    measures.push(
        Measure::new("Random reads", "random_cold_p50_ms".into(), what("cold (read-ahead off)"), "ms", get(0, false))
            .note(format!("p99 {:.2} ms", median(&get(0, true)))),
    );
    measures.push(
        Measure::new(
            "Random reads",
            "random_warm_p50_ms".into(),
            what("warm, page cache dropped"),
            "ms",
            get(1, false),
        )
        .against(
            format!("local file (p99 here {:.2} ms, local {:.2} ms)", median(&get(1, true)), median(&get(2, true))),
            get(2, false),
        ),
    );
}
