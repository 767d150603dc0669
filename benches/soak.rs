//! `make soak`: reads of one model through three front-ends at once while fault proxies
//! break thousands of registry requests, every byte compared with the true file.
//!
//! - `mount` of the plain artifact, behind a proxy that resets connections, answers
//!   500, truncates bodies and stalls them past the request timeout. It gets no
//!   corrupted bytes: without per-chunk digests a multi-chunk blob is only checked
//!   when complete, so same-length corruption is caught after it was served (README,
//!   "Integrity").
//! - `mount` of the companion reference and `serve` (a model snapshot prepared over
//!   the snapshots API with the companion's labels, read through a view of it), behind
//!   a proxy that also flips bits of bodies: every chunk is checked against the lazy
//!   index, so no corrupted byte may be served.
//!
//! The request timeout is 1 s with 3 retries, the chunk size 128 KiB, and each cache is
//! held to a small budget and the page cache dropped after every read, so reads keep
//! reaching the registry. A read fails (with its errno) only when every attempt of a
//! fetch failed; it must never return wrong bytes, end early, or take longer than the
//! timeouts allow. Writes `target/soak/report.md`, prints it, and exits non-zero when a
//! wrong byte was served, a read ended early or hung, or nothing was measured.
//!
//! Environment: `SOAK_SECS` (120), `SOAK_MAX_REQUESTS` (blob requests through the
//! proxies, 300000), `SOAK_FAULT_RATE` (share of blob requests broken, 0.3),
//! `SOAK_SEED` (1), `SOAK_READERS` (reader threads per front-end, 4),
//! `SOAK_PENDING_STORE_CHUNKS` (the front-ends' `pending_store_chunks`, their default).
//! Needs root (FUSE) and docker-registry; all traffic stays on 127.0.0.1.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::proxy::{Fault, FaultProxy, RandomFaults};
use common::*;
use modelpack_snapshotter::config::FetchSettings;

/// Seconds allowed for one registry request; stalls last longer.
const REQUEST_TIMEOUT_SECS: u64 = 1;
/// Retries of a failed request.
const RETRIES: u32 = 3;
/// The first retry's delay (the default); it doubles with each further retry.
const BACKOFF: Duration = Duration::from_millis(100);
/// Bytes per chunk and per digested piece of the lazy index: small, so that reads
/// make many requests for the proxies to break.
const CHUNK: u64 = 128 << 10;
/// Cache budget of each front-end: a fraction of the model, so chunks are evicted and
/// fetched again all along.
const CACHE_BUDGET: u64 = 8 << 20;
/// Size of the larger weight shard (the other is half as large).
const SHARD_BYTES: usize = 24 << 20;
/// Most bytes one read asks for.
const MAX_READ: u64 = 512 << 10;

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The longest a read may take before it counts as hung: every attempt of a fetch
/// timing out with backoff between them, twice for a chunk fetched again after failing
/// its check, for each chunk a read can span (should they be fetched one after another).
fn hang_limit() -> Duration {
    let attempts = RETRIES + 1;
    let backoff: Duration = (0..RETRIES).map(|i| BACKOFF * 2u32.pow(i)).sum();
    let fetch = Duration::from_secs(REQUEST_TIMEOUT_SECS) * attempts + backoff;
    let spanned = (MAX_READ.div_ceil(CHUNK) + 1) as u32;
    fetch * 2 * spanned
}

/// What the readers of one front-end saw.
#[derive(Default)]
struct Tally {
    reads: u64,
    bytes: u64,
    wrong_bytes: u64,
    early_eofs: u64,
    /// errno name → (count, one message).
    failed: BTreeMap<String, (u64, String)>,
    longest: Duration,
    latencies_ms: Vec<f64>,
}

/// One front-end: a directory showing the model, and its readers' tally.
struct Front {
    name: &'static str,
    root: PathBuf,
    tally: Mutex<Tally>,
    /// Start of each reader's read in progress (ns since `epoch`), 0 when idle.
    in_read: Vec<AtomicU64>,
}

fn errno_name(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::EIO) => "EIO".into(),
        Some(libc::ENOTCONN) => "ENOTCONN".into(),
        Some(libc::EINVAL) => "EINVAL".into(),
        Some(libc::ENOENT) => "ENOENT".into(),
        Some(libc::EINTR) => "EINTR".into(),
        Some(libc::EAGAIN) => "EAGAIN".into(),
        Some(libc::ETIMEDOUT) => "ETIMEDOUT".into(),
        Some(libc::ECONNABORTED) => "ECONNABORTED".into(),
        Some(n) => format!("errno {n}"),
        None => format!("{:?}", e.kind()),
    }
}

enum ReadError {
    EarlyEof(u64),
    Io(std::io::Error),
}

/// Reads `buf.len()` bytes at `offset`, taking short reads as they come.
fn read_fully(file: &std::fs::File, buf: &mut [u8], offset: u64) -> Result<(), ReadError> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => return Err(ReadError::EarlyEof(offset + done as u64)),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ReadError::Io(e)),
        }
    }
    Ok(())
}

/// A small xorshift generator per reader thread.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

/// Reads random ranges and whole files of `front` until `stop`, comparing with `truth`.
fn reader(front: &Front, slot: usize, truth: &BTreeMap<String, Vec<u8>>, seed: u64, stop: &AtomicBool, epoch: Instant) {
    let files: Vec<(&String, &Vec<u8>)> = truth.iter().filter(|(_, v)| !v.is_empty()).collect();
    let mut rng = Rng(seed | 1);
    let mut buf = vec![0u8; MAX_READ as usize];
    while !stop.load(Ordering::SeqCst) {
        let (name, want) = files[rng.below(files.len() as u64) as usize];
        let size = want.len() as u64;
        // Mostly random ranges, sometimes a whole file in order (read-ahead, streams).
        let ranges: Vec<(u64, u64)> = if rng.below(10) < 8 {
            let offset = rng.below(size);
            vec![(offset, 1 + rng.below(MAX_READ.min(size - offset)))]
        } else {
            (0..size).step_by(MAX_READ as usize).map(|o| (o, MAX_READ.min(size - o))).collect()
        };
        let started = Instant::now();
        front.in_read[slot].store(started.duration_since(epoch).as_nanos() as u64, Ordering::SeqCst);
        let file = match std::fs::File::open(front.root.join(name)) {
            Ok(f) => f,
            Err(e) => {
                front.in_read[slot].store(0, Ordering::SeqCst);
                let mut t = front.tally.lock().unwrap();
                let entry = t.failed.entry(format!("open: {}", errno_name(&e))).or_default();
                entry.0 += 1;
                entry.1 = format!("{name}: {e}");
                continue;
            }
        };
        for (i, (offset, len)) in ranges.into_iter().enumerate() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let t0 = if i == 0 { started } else { Instant::now() };
            front.in_read[slot].store(t0.duration_since(epoch).as_nanos() as u64, Ordering::SeqCst);
            let out = &mut buf[..len as usize];
            let result = read_fully(&file, out, offset);
            let took = t0.elapsed();
            front.in_read[slot].store(0, Ordering::SeqCst);
            let mut t = front.tally.lock().unwrap();
            t.reads += 1;
            t.longest = t.longest.max(took);
            t.latencies_ms.push(took.as_secs_f64() * 1e3);
            match result {
                Ok(()) => {
                    let expected = &want[offset as usize..(offset + len) as usize];
                    let wrong = out.iter().zip(expected).filter(|(a, b)| a != b).count() as u64;
                    t.bytes += len;
                    if wrong > 0 {
                        t.wrong_bytes += wrong;
                        eprintln!("soak: {}: {wrong} wrong bytes in {name} at {offset}+{len}", front.name);
                    }
                }
                Err(ReadError::EarlyEof(at)) => {
                    t.early_eofs += 1;
                    eprintln!("soak: {}: {name} ended at {at}, before {} of {size}", front.name, offset + len);
                    break;
                }
                Err(ReadError::Io(e)) => {
                    let entry = t.failed.entry(errno_name(&e)).or_default();
                    entry.0 += 1;
                    entry.1 = format!("{name} at {offset}+{len}: {e}");
                    break;
                }
            }
        }
        // SAFETY: an advisory call on a descriptor we own; drops cached pages so that
        // the next read of them reaches the filesystem again.
        unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    }
}

/// Prepares the model snapshot from the companion's labels over `socket`, then a view
/// of it mounted at `target`, as containerd does for an image volume.
async fn serve_model(socket: &Path, companion: &str, target: &Path) -> Unmount {
    let mut client = snapshots_client(socket).await;
    view_model(&mut client, &companion_layer(companion).await, "soak", target).await
}

fn percentile(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

fn fault_sum(counts: &[(Fault, u64)]) -> u64 {
    counts.iter().map(|(_, n)| n).sum()
}

fn main() -> ExitCode {
    if !prerequisites(true) {
        return ExitCode::SUCCESS;
    }
    let secs: u64 = env_or("SOAK_SECS", 120);
    let max_requests: u64 = env_or("SOAK_MAX_REQUESTS", 300_000);
    let rate: f64 = env_or("SOAK_FAULT_RATE", 0.3);
    let seed: u64 = env_or("SOAK_SEED", 1);
    let readers: usize = env_or("SOAK_READERS", 4usize).max(1);
    let pending: u64 = env_or("SOAK_PENDING_STORE_CHUNKS", FetchSettings::default().pending_store_chunks);
    let limit = hang_limit();
    let stall = Duration::from_secs(REQUEST_TIMEOUT_SECS + 1);

    let work = tempfile::tempdir_in("/var/tmp").unwrap();
    let registry = TestRegistry::start();
    let plain_proxy = FaultProxy::start(registry.port);
    let verified_proxy = FaultProxy::start(registry.port);
    for proxy in [&plain_proxy, &verified_proxy] {
        proxy.set_stall(stall);
    }
    let src = work.path().join("model");
    write_model_dir(&src, SHARD_BYTES);
    let truth = Arc::new(read_tree(&src));
    let model_bytes: usize = truth.values().map(Vec::len).sum();
    push_dir(&src, &format!("{}/models/soak:v1", registry.addr()), "raw");
    let source = format!("{}/models/soak:v1", verified_proxy.addr());
    let (ok, _, stderr) = run_bin(&["convert", &source, "--chunk-size", &CHUNK.to_string()]);
    assert!(ok, "convert failed: {stderr}");
    let companion = format!("{source}-lazy");
    eprintln!("soak: model of {model_bytes} bytes pushed and converted");

    let timeout = REQUEST_TIMEOUT_SECS.to_string();
    let retries = RETRIES.to_string();
    let chunk = CHUNK.to_string();
    let budget = CACHE_BUDGET.to_string();
    let pending_arg = pending.to_string();
    let mount_args = [
        "--request-timeout",
        &timeout,
        "--retries",
        &retries,
        "--chunk-size",
        &chunk,
        "--cache-budget",
        &budget,
        "--pending-store-chunks",
        &pending_arg,
        "--log-level",
        "error",
    ];
    let start_mount = |name: &str, reference: &str| {
        MountProcess::start(reference, &work.path().join(name), &work.path().join(format!("{name}-cache")), &mount_args)
            .unwrap_or_else(|e| panic!("mount of {reference} failed: {e}"))
    };
    let mut plain = start_mount("plain", &format!("{}/models/soak:v1", plain_proxy.addr()));
    let mut verified = start_mount("companion", &companion);

    let config = work.path().join("serve.toml");
    std::fs::write(
        &config,
        format!(
            "log_level = \"error\"\n[cache]\nchunk_size = {CHUNK}\nbudget_bytes = {CACHE_BUDGET}\n\
             pending_store_chunks = {pending}\n\
             [registry]\nrequest_timeout_secs = {REQUEST_TIMEOUT_SECS}\nretries = {RETRIES}\n"
        ),
    )
    .unwrap();
    let mut serve = {
        let root = work.path().join("serve-root");
        SnapshotterProcess::start_with(&root, &root.join("snapshotter.sock"), &config)
    };
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let served = runtime.block_on(serve_model(&serve.socket, &companion, &work.path().join("served")));

    let fronts: Vec<Arc<Front>> = [
        ("mount, plain artifact", plain.mountpoint.clone()),
        ("mount, companion", verified.mountpoint.clone()),
        ("serve (snapshots API)", served.0.clone()),
    ]
    .into_iter()
    .map(|(name, root)| {
        Arc::new(Front {
            name,
            root,
            tally: Mutex::default(),
            in_read: (0..readers).map(|_| AtomicU64::new(0)).collect(),
        })
    })
    .collect();

    let plain_kinds = vec![Fault::Reset, Fault::Status500, Fault::Truncate, Fault::Stall];
    plain_proxy.set_random_faults(RandomFaults { rate, seed, kinds: plain_kinds });
    verified_proxy.set_random_faults(RandomFaults { rate, seed: seed + 1, kinds: Fault::ALL.to_vec() });
    eprintln!("soak: reading for {secs} s through {} front-ends, {readers} readers each", fronts.len());

    let stop = Arc::new(AtomicBool::new(false));
    let epoch = Instant::now();
    let mut threads = Vec::new();
    for (f, front) in fronts.iter().enumerate() {
        for slot in 0..readers {
            let (front, truth, stop) = (front.clone(), truth.clone(), stop.clone());
            let seed = seed.wrapping_mul(1000).wrapping_add((f * readers + slot) as u64 + 1);
            threads.push(std::thread::spawn(move || reader(&front, slot, &truth, seed, &stop, epoch)));
        }
    }
    let requests = || {
        [&plain_proxy, &verified_proxy]
            .iter()
            .map(|p| p.blob_counts().0 + p.fault_counts().iter().map(|(_, n)| n).sum::<u64>())
            .sum::<u64>()
    };
    let deadline = epoch + Duration::from_secs(secs);
    let mut hung: Vec<String> = Vec::new();
    let check_hangs = |hung: &mut Vec<String>| {
        let now = epoch.elapsed().as_nanos() as u64;
        for front in &fronts {
            for (slot, started) in front.in_read.iter().enumerate() {
                let started = started.load(Ordering::SeqCst);
                if started != 0 && Duration::from_nanos(now.saturating_sub(started)) > limit {
                    let what = format!("{} reader {slot}", front.name);
                    if !hung.contains(&what) {
                        eprintln!("soak: {what} has been in one read for more than {limit:?}");
                        hung.push(what);
                    }
                }
            }
        }
    };
    while Instant::now() < deadline && requests() < max_requests {
        std::thread::sleep(Duration::from_millis(200));
        check_hangs(&mut hung);
    }
    let elapsed = epoch.elapsed();
    stop.store(true, Ordering::SeqCst);
    // Readers finish the read in progress, which the timeouts bound.
    let join_deadline = Instant::now() + limit + Duration::from_secs(5);
    while threads.iter().any(|t| !t.is_finished()) && Instant::now() < join_deadline {
        std::thread::sleep(Duration::from_millis(100));
        check_hangs(&mut hung);
    }
    let unfinished = threads.iter().filter(|t| !t.is_finished()).count();
    for t in threads.into_iter().filter(|t| t.is_finished()) {
        t.join().expect("a reader panicked");
    }
    for proxy in [&plain_proxy, &verified_proxy] {
        proxy.clear_fault();
    }

    let plain_line = plain.stop();
    let verified_line = verified.stop();
    drop(served);
    serve.stop();

    // The report.
    let mut md = String::new();
    let _ = writeln!(md, "# Soak report\n");
    let _ = writeln!(
        md,
        "{:.0} s of reads of a {model_bytes}-byte model ({} files) through {} front-ends, {readers} reader threads \
         each; fault rate {rate}, seed {seed}; request timeout {REQUEST_TIMEOUT_SECS} s, {RETRIES} retries, \
         stalls {stall:?}; chunk {CHUNK} bytes, cache budget {CACHE_BUDGET} bytes, {pending} pending store \
         chunks; a read longer than {limit:?} counts as hung.\n",
        elapsed.as_secs_f64(),
        truth.len(),
        fronts.len(),
    );
    let _ = writeln!(md, "## Faults injected\n");
    let _ = writeln!(md, "| kind | plain-artifact proxy | companion proxy (mount + serve) | total |");
    let _ = writeln!(md, "| --- | ---: | ---: | ---: |");
    let (pc, vc) = (plain_proxy.fault_counts(), verified_proxy.fault_counts());
    let mut faults_total = 0;
    for ((kind, p), (_, v)) in pc.iter().zip(&vc) {
        faults_total += p + v;
        let _ = writeln!(md, "| {kind:?} | {p} | {v} | {} |", p + v);
    }
    let (pi, vi) = (plain_proxy.blob_counts().0, verified_proxy.blob_counts().0);
    let _ = writeln!(md, "| **all faults** | {} | {} | {faults_total} |", fault_sum(&pc), fault_sum(&vc));
    let _ = writeln!(md, "| blob requests answered intact | {pi} | {vi} | {} |\n", pi + vi);

    let _ = writeln!(md, "## Reads\n");
    let _ = writeln!(
        md,
        "| front-end | reads | bytes verified | wrong bytes | ended early | failed | p50 ms | p99 ms | longest |"
    );
    let _ = writeln!(md, "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |");
    let (mut reads, mut wrong, mut early, mut longest) = (0, 0, 0, Duration::ZERO);
    let mut failures = String::new();
    for front in &fronts {
        let t = front.tally.lock().unwrap();
        let failed: u64 = t.failed.values().map(|(n, _)| n).sum();
        reads += t.reads;
        wrong += t.wrong_bytes;
        early += t.early_eofs;
        longest = longest.max(t.longest);
        let _ = writeln!(
            md,
            "| {} | {} | {} | {} | {} | {failed} | {:.1} | {:.1} | {:.2} s |",
            front.name,
            t.reads,
            t.bytes,
            t.wrong_bytes,
            t.early_eofs,
            percentile(&t.latencies_ms, 0.5),
            percentile(&t.latencies_ms, 0.99),
            t.longest.as_secs_f64(),
        );
        for (errno, (n, example)) in &t.failed {
            let _ = writeln!(failures, "- {}: {n} × {errno}, e.g. {example}", front.name);
        }
    }
    let _ = writeln!(md);
    let _ = writeln!(md, "## Failed reads\n");
    let _ = writeln!(
        md,
        "A read fails when every attempt of a fetch failed (or, with a lazy index, a chunk failed its check twice).\n"
    );
    md.push_str(if failures.is_empty() { "None.\n" } else { &failures });
    let _ = writeln!(md, "\n## Mount processes at exit\n");
    let _ = writeln!(md, "- plain artifact: `{plain_line}`");
    let _ = writeln!(md, "- companion: `{verified_line}`");

    let mut verdict = Vec::new();
    if wrong > 0 {
        verdict.push(format!("{wrong} wrong bytes served"));
    }
    if early > 0 {
        verdict.push(format!("{early} reads ended before the end of their file"));
    }
    if !hung.is_empty() || unfinished > 0 {
        verdict.push(format!("reads hung past {limit:?}: {} ({unfinished} readers never finished)", hung.join(", ")));
    }
    if reads == 0 || faults_total == 0 {
        verdict.push(format!("nothing measured: {reads} reads, {faults_total} faults"));
    }
    let _ = writeln!(md, "\n## Verdict\n");
    let _ = writeln!(
        md,
        "{} reads, {wrong} wrong bytes, {faults_total} faults, longest read {:.2} s (limit {limit:?}): {}",
        reads,
        longest.as_secs_f64(),
        if verdict.is_empty() { "PASS".to_owned() } else { format!("FAIL — {}", verdict.join("; ")) }
    );

    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/soak");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("report.md"), &md).unwrap();
    println!("{md}");
    println!("soak: report written to {}", out.join("report.md").display());
    if unfinished > 0 {
        // A reader stuck in the kernel cannot be joined: stop what we started, then
        // leave without waiting for it.
        drop((plain_proxy, verified_proxy, registry));
        std::process::exit(1);
    }
    if verdict.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
