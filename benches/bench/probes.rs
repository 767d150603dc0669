//! What `bench` measures with, besides the mount itself: `perf stat` attached to the mount
//! process (CPU and context switches of all its threads, also those that exit), this
//! process's own usage (for the verified download it runs), a process's CPU from `/proc`,
//! and the two downloads the cold read is compared with: four parallel `curl` ranges to
//! `/dev/null` (the link) and a verified download done well (the same four ranges written
//! to a file as they arrive while one SHA-NI sha256 follows them in blob order).

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use sha2::{Digest as _, Sha256};

/// CPU time and context switches over a window.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// User and system CPU seconds.
    pub cpu_seconds: f64,
    /// Voluntary and involuntary context switches.
    pub context_switches: f64,
}

/// `perf stat -e context-switches,task-clock -p PID`, started with its counters off and
/// switched on and off through its control FIFO, so the window is exactly the one between
/// [`PerfStat::enable`] and [`PerfStat::disable`]. `-p` opens per-thread counters on every
/// thread of the process with inheritance, so threads started later are counted, and the
/// counts of threads that exit stay in the totals (`/proc/PID/task/*/status` would lose
/// them; `/proc/PID/status` counts the main thread only). `context-switches` counts every
/// switch away from a thread, voluntary or not: the sum of `voluntary_ctxt_switches` and
/// `nonvoluntary_ctxt_switches`.
pub struct PerfStat {
    child: Option<Child>,
    ctl: File,
    ack: File,
    out: PathBuf,
    _dir: tempfile::TempDir,
}

impl PerfStat {
    pub fn attach(pid: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let (ctl, ack, out) = (dir.path().join("ctl"), dir.path().join("ack"), dir.path().join("out"));
        for fifo in [&ctl, &ack] {
            let path = CString::new(fifo.to_str().unwrap()).unwrap();
            // SAFETY: `path` is a valid NUL-terminated string that outlives the call.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0, "mkfifo {}", fifo.display());
        }
        let child = Command::new("perf")
            .args(["stat", "-e", "context-switches,task-clock", "-x", ",", "--delay=-1", "-p", &pid.to_string()])
            .arg("-o")
            .arg(&out)
            .arg(format!("--control=fifo:{},{}", ctl.display(), ack.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting perf stat");
        // Read and write ends both: opening never waits for perf.
        let open = |p: &Path| std::fs::OpenOptions::new().read(true).write(true).open(p).unwrap();
        Self { child: Some(child), ctl: open(&ctl), ack: open(&ack), out, _dir: dir }
    }

    /// Sends a control command and waits (up to 30 s) for perf to acknowledge it.
    fn command(&mut self, cmd: &str) {
        self.ctl.write_all(format!("{cmd}\n").as_bytes()).unwrap();
        let mut poll = libc::pollfd { fd: self.ack.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: one valid pollfd, for the duration of the call.
        let ready = unsafe { libc::poll(&mut poll, 1, 30_000) };
        assert!(ready == 1, "perf stat did not acknowledge {cmd:?} (is perf_event_open allowed here?)");
        let mut buf = [0u8; 16];
        let _ = self.ack.read(&mut buf).unwrap();
    }

    pub fn enable(&mut self) {
        self.command("enable");
    }

    pub fn disable(&mut self) {
        self.command("disable");
    }

    /// Stops perf and returns what it counted while enabled.
    pub fn finish(mut self) -> Usage {
        let child = self.child.take().unwrap();
        // SAFETY: signalling a child we spawned and have not reaped.
        unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
        let status = child.wait_with_output().unwrap().status;
        let text = std::fs::read_to_string(&self.out).unwrap_or_default();
        let field = |event: &str| {
            text.lines()
                .map(|l| l.split(',').collect::<Vec<_>>())
                .find(|f| f.get(2) == Some(&event))
                .and_then(|f| f[0].parse::<f64>().ok())
                .unwrap_or_else(|| panic!("perf stat ({status}) counted no {event}: {text:?}"))
        };
        Usage { cpu_seconds: field("task-clock") / 1e3, context_switches: field("context-switches") }
    }
}

impl Drop for PerfStat {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// This process's CPU and context switches so far, all threads (`getrusage(RUSAGE_SELF)`
/// sums the threads that exited too).
pub fn self_usage() -> Usage {
    // SAFETY: getrusage fills the struct it is given.
    let ru = unsafe {
        let mut ru = std::mem::zeroed::<libc::rusage>();
        libc::getrusage(libc::RUSAGE_SELF, &mut ru);
        ru
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Usage { cpu_seconds: secs(ru.ru_utime) + secs(ru.ru_stime), context_switches: (ru.ru_nvcsw + ru.ru_nivcsw) as f64 }
}

impl std::ops::Sub for Usage {
    type Output = Usage;
    fn sub(self, o: Usage) -> Usage {
        Usage {
            cpu_seconds: self.cpu_seconds - o.cpu_seconds,
            context_switches: self.context_switches - o.context_switches,
        }
    }
}

/// CPU seconds (user and system, all threads, also exited ones) a process has used so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    // SAFETY: sysconf only reads a constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
    ticks as f64 / hz as f64
}

/// A blob to download: its URL, digest (`sha256:<hex>`) and size.
pub struct Blob {
    pub url: String,
    pub digest: String,
    pub size: u64,
}

/// The four byte ranges a blob is fetched in, as `(start, end exclusive)`.
fn quarters(size: u64) -> Vec<(u64, u64)> {
    let q = size / 4;
    (0..4).map(|i| (i * q, if i == 3 { size } else { (i + 1) * q })).collect()
}

/// Four parallel ranged `curl` downloads to `/dev/null` per blob, blob after blob: the link.
pub fn curl_ranges(blobs: &[Blob]) -> Duration {
    let t = Instant::now();
    for blob in blobs {
        let children: Vec<Child> = quarters(blob.size)
            .into_iter()
            .map(|(start, end)| {
                Command::new("curl")
                    .args(["-fs", "-o", "/dev/null", "-r", &format!("{start}-{}", end - 1), &blob.url])
                    .spawn()
                    .unwrap()
            })
            .collect();
        for mut c in children {
            assert!(c.wait().unwrap().success(), "curl of {}", blob.url);
        }
    }
    t.elapsed()
}

/// Bytes the hasher takes at a time, and how far a range must get before it is woken.
const HASH_STEP: u64 = 1 << 20;

/// How far each of a blob's four ranges has been written.
struct Arrived {
    written: Mutex<[u64; 4]>,
    cond: Condvar,
}

/// A verified download done well, blob after blob: the blob's four ranges fetched in
/// parallel (HTTP/1.1, one connection each, as the `curl` side) and written to one file at
/// their offsets as they arrive, while one thread hashes the blob with sha256 (the `sha2`
/// crate, which uses the SHA-NI instructions when the CPU has them) in blob order as its
/// prefix completes: the first range as it arrives, each later range from where the hash
/// has got to, reading back the bytes just written (from page cache). The digest is
/// checked against the blob's once its last byte is hashed, which is when the blob counts
/// as downloaded. Every byte is written once and hashed once. Returns the time taken.
pub fn verified_download(blobs: &[Blob], dir: &Path) -> Duration {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().unwrap();
    let client = reqwest::Client::new();
    let t = Instant::now();
    for blob in blobs {
        let path = dir.join(blob.digest.trim_start_matches("sha256:"));
        let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).unwrap();
        let file = Arc::new(file);
        file.set_len(blob.size).unwrap();
        let ranges = quarters(blob.size);
        let arrived = Arc::new(Arrived { written: Mutex::new([0; 4]), cond: Condvar::new() });
        let hasher = {
            let (file, arrived, ranges, size) = (file.clone(), arrived.clone(), ranges.clone(), blob.size);
            std::thread::spawn(move || {
                let mut sha = Sha256::new();
                let mut buf = vec![0u8; HASH_STEP as usize];
                let mut pos = 0u64;
                while pos < size {
                    let i = ranges.iter().rposition(|&(start, _)| start <= pos).unwrap();
                    let (start, end) = ranges[i];
                    let upto = {
                        let mut written = arrived.written.lock().unwrap();
                        while start + written[i] <= pos {
                            written = arrived.cond.wait(written).unwrap();
                        }
                        start + written[i]
                    };
                    let n = (upto.min(end) - pos).min(HASH_STEP) as usize;
                    file.read_exact_at(&mut buf[..n], pos).unwrap();
                    sha.update(&buf[..n]);
                    pos += n as u64;
                }
                format!("sha256:{}", hex::encode(sha.finalize()))
            })
        };
        rt.block_on(async {
            let fetches = ranges.iter().enumerate().map(|(i, &(start, end))| {
                let (client, file, arrived, url) = (client.clone(), file.clone(), arrived.clone(), blob.url.clone());
                async move {
                    let mut response = client
                        .get(&url)
                        .header("Range", format!("bytes={start}-{}", end - 1))
                        .send()
                        .await
                        .and_then(|r| r.error_for_status())
                        .unwrap_or_else(|e| panic!("range {start}-{end} of {url}: {e}"));
                    let mut at = start;
                    while let Some(chunk) = response.chunk().await.unwrap() {
                        assert!(at + chunk.len() as u64 <= end, "{url} sent more than range {start}-{end}");
                        file.write_all_at(&chunk, at).unwrap();
                        let before = at - start;
                        at += chunk.len() as u64;
                        // Wake the hasher once a step more is there, or the range is done.
                        let mut written = arrived.written.lock().unwrap();
                        written[i] = at - start;
                        if at == end || (at - start) / HASH_STEP > before / HASH_STEP {
                            arrived.cond.notify_all();
                        }
                    }
                    assert_eq!(at, end, "{url} ended range {start}-{end} early");
                }
            });
            let tasks: Vec<_> = fetches.map(|f| tokio::spawn(f)).collect();
            for task in tasks {
                task.await.unwrap();
            }
        });
        let digest = hasher.join().unwrap();
        assert_eq!(digest, blob.digest, "verified download of {}: the bytes hash to another digest", blob.url);
    }
    t.elapsed()
}
