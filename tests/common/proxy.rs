//! A fault-injecting HTTP/1.1 proxy in front of the test registry. It serves one request
//! per connection (answering `Connection: close`), counts blob bodies it forwards, and
//! breaks blob GETs: the next N of them with one kind of fault, or each at random with
//! a given rate, seed and set of kinds (counted per kind). Faults: reset the connection,
//! answer 500, truncate the body, corrupt it (same length, bits flipped), or stall
//! mid-body. It can also stand for a registry that wants a bearer token even from
//! anonymous clients (as public registries do), issuing one at its own `/token`.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What to do to a blob GET.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Send a random part of the response (perhaps nothing, never all of it), then
    /// reset the connection (RST).
    Reset,
    /// Answer `500 Internal Server Error`.
    Status500,
    /// Send the headers and half the body, then close.
    Truncate,
    /// Send the whole response with one to eight bits of the body flipped.
    Corrupt,
    /// Send the headers and half the body, then nothing for the stall time (see
    /// [`FaultProxy::set_stall`]), then close.
    Stall,
}

impl Fault {
    /// Every kind, in the order [`FaultProxy::fault_counts`] reports them.
    pub const ALL: [Fault; 5] = [Fault::Reset, Fault::Status500, Fault::Truncate, Fault::Corrupt, Fault::Stall];

    fn index(self) -> usize {
        Self::ALL.iter().position(|f| *f == self).expect("listed")
    }
}

/// Faults drawn at random for every blob GET.
#[derive(Debug, Clone)]
pub struct RandomFaults {
    /// Chance that a blob GET is broken, 0 to 1.
    pub rate: f64,
    /// Seed of the draws. Requests run on threads of their own, so a seed fixes the
    /// mix of faults, not which request gets which.
    pub seed: u64,
    /// Kinds drawn from, with equal chances.
    pub kinds: Vec<Fault>,
}

#[derive(Default)]
struct State {
    fault: Mutex<Option<Fault>>,
    faults_left: AtomicU32,
    random: Mutex<Option<RandomFaults>>,
    /// The xorshift state behind every random choice.
    rng: Mutex<u64>,
    stall: Mutex<Duration>,
    injected: [AtomicU64; Fault::ALL.len()],
    blob_requests: AtomicU64,
    blob_bytes: AtomicU64,
    require_token: AtomicBool,
    unauthorized: AtomicU64,
    /// A header every request must carry, as a P2P proxy wants to be told the origin.
    required_header: Mutex<Option<(String, String)>>,
    refused: AtomicU64,
    /// Forwarded requests that asked for a byte range.
    ranged: AtomicU64,
    /// Every request forwarded to the registry, of any kind.
    requests: AtomicU64,
    stop: AtomicBool,
}

impl State {
    /// A pseudo-random number below `n` (n > 0).
    fn below(&self, n: u64) -> u64 {
        let mut x = self.rng.lock().unwrap();
        *x ^= *x << 13;
        *x ^= *x >> 7;
        *x ^= *x << 17;
        *x % n
    }
}

/// The token the proxy issues and then expects.
const TOKEN: &str = "test-token";

/// The running proxy; stops on drop.
pub struct FaultProxy {
    pub port: u16,
    state: Arc<State>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream_port`.
    pub fn start(upstream_port: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let state = Arc::new(State { rng: Mutex::new(0x9e37_79b9_7f4a_7c15), ..State::default() });
        let st = state.clone();
        let thread = std::thread::spawn(move || {
            while !st.stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((client, _)) => {
                        let st = st.clone();
                        std::thread::spawn(move || {
                            let _ = serve(client, upstream_port, &st);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { port, state, thread: Some(thread) }
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Applies `fault` to the next `count` blob GETs (`u32::MAX`: until cleared).
    pub fn set_fault(&self, fault: Fault, count: u32) {
        *self.state.fault.lock().unwrap() = Some(fault);
        self.state.faults_left.store(count, Ordering::SeqCst);
    }

    /// Stops injecting faults (counted and random ones).
    pub fn clear_fault(&self) {
        *self.state.fault.lock().unwrap() = None;
        self.state.faults_left.store(0, Ordering::SeqCst);
        *self.state.random.lock().unwrap() = None;
    }

    /// Breaks each blob GET at random as `faults` says, until cleared.
    pub fn set_random_faults(&self, faults: RandomFaults) {
        assert!(!faults.kinds.is_empty() && (0.0..=1.0).contains(&faults.rate), "{faults:?}");
        *self.state.rng.lock().unwrap() = faults.seed | 1;
        *self.state.random.lock().unwrap() = Some(faults);
    }

    /// How long a stalled response stays silent before the proxy closes it.
    pub fn set_stall(&self, stall: Duration) {
        *self.state.stall.lock().unwrap() = stall;
    }

    /// Faults injected so far, per kind (in the order of [`Fault::ALL`]).
    pub fn fault_counts(&self) -> Vec<(Fault, u64)> {
        Fault::ALL.iter().map(|f| (*f, self.state.injected[f.index()].load(Ordering::SeqCst))).collect()
    }

    /// Blob GETs forwarded intact, and the body bytes they carried.
    pub fn blob_counts(&self) -> (u64, u64) {
        (self.state.blob_requests.load(Ordering::SeqCst), self.state.blob_bytes.load(Ordering::SeqCst))
    }

    /// From now on, answers requests without the bearer token with 401 and a challenge
    /// pointing at its own token endpoint.
    #[allow(dead_code)] // not every test binary uses it
    pub fn require_token(&self) {
        self.state.require_token.store(true, Ordering::SeqCst);
    }

    /// How many requests were refused for want of the token.
    #[allow(dead_code)] // not every test binary uses it
    pub fn unauthorized_count(&self) -> u64 {
        self.state.unauthorized.load(Ordering::SeqCst)
    }

    /// From now on, answers requests without `name: value` with 400, as Dragonfly's
    /// proxy answers requests that do not name their origin registry.
    #[allow(dead_code)] // not every test binary uses it
    pub fn require_header(&self, name: &str, value: &str) {
        *self.state.required_header.lock().unwrap() = Some((name.to_owned(), value.to_owned()));
    }

    /// Requests refused for want of the required header; forwarded requests with a
    /// `Range`.
    #[allow(dead_code)] // not every test binary uses it
    pub fn header_counts(&self) -> (u64, u64) {
        (self.state.refused.load(Ordering::SeqCst), self.state.ranged.load(Ordering::SeqCst))
    }

    /// Requests of any kind (manifests, referrers, blobs) forwarded to the registry.
    pub fn request_count(&self) -> u64 {
        self.state.requests.load(Ordering::SeqCst)
    }

    /// Zeroes the counters.
    pub fn reset_counts(&self) {
        self.state.blob_requests.store(0, Ordering::SeqCst);
        self.state.blob_bytes.store(0, Ordering::SeqCst);
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.state.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn header_value<'a>(head: &'a str, name: &str) -> Option<&'a str> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim().eq_ignore_ascii_case(name).then(|| v.trim())
    })
}

/// The fault for this blob GET, if any: a random one when random faults are on, else
/// one of the counted ones.
fn take_fault(state: &State) -> Option<Fault> {
    let random = state.random.lock().unwrap().clone();
    if let Some(random) = random {
        // Draws in millionths: enough resolution for any rate a soak uses.
        if state.below(1_000_000) as f64 >= random.rate * 1e6 {
            return None;
        }
        return Some(random.kinds[state.below(random.kinds.len() as u64) as usize]);
    }
    let fault = *state.fault.lock().unwrap();
    fault?;
    let took = state
        .faults_left
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| match n {
            0 => None,
            u32::MAX => Some(u32::MAX),
            n => Some(n - 1),
        })
        .is_ok();
    if took {
        fault
    } else {
        None
    }
}

fn serve(mut client: TcpStream, upstream_port: u16, state: &State) -> std::io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(30)))?;
    // Request head, then a body if it has a Content-Length.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 65536];
    let head_end = loop {
        if let Some(p) = find(&buf, b"\r\n\r\n") {
            break p + 4;
        }
        let n = client.read(&mut chunk)?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if !buf[0].is_ascii_uppercase() {
            // Not HTTP: a client trying TLS first (podman with --tls-verify=false does).
            // Refuse at once, as the registry itself would, so it falls back to plain HTTP
            // now rather than after its handshake timeout.
            client.write_all(b"HTTP/1.1 400 Bad Request\r\nConnection: close\r\n\r\n")?;
            return Ok(());
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let body_len: usize = header_value(&head, "content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
    while buf.len() < head_end + body_len {
        let n = client.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let request_line = head.lines().next().unwrap_or_default().to_owned();
    let is_blob_get = request_line.starts_with("GET ") && request_line.contains("/blobs/sha256:");
    if state.require_token.load(Ordering::SeqCst) {
        if request_line.starts_with("GET /token") {
            let body = format!("{{\"token\":\"{TOKEN}\",\"access_token\":\"{TOKEN}\"}}");
            let reply = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(reply.as_bytes())?;
            client.shutdown(Shutdown::Write)?;
            return Ok(());
        }
        if header_value(&head, "authorization") != Some(&format!("Bearer {TOKEN}")) {
            state.unauthorized.fetch_add(1, Ordering::SeqCst);
            let host = header_value(&head, "host").unwrap_or("127.0.0.1");
            let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}"#;
            let reply = format!(
                "HTTP/1.1 401 Unauthorized\r\nWWW-Authenticate: Bearer realm=\"http://{host}/token\",service=\"proxy\"\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            client.write_all(reply.as_bytes())?;
            client.shutdown(Shutdown::Write)?;
            return Ok(());
        }
    }

    let required = state.required_header.lock().unwrap().clone();
    if let Some((name, value)) = required {
        if header_value(&head, &name) != Some(value.as_str()) {
            state.refused.fetch_add(1, Ordering::SeqCst);
            client.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
            client.shutdown(Shutdown::Write)?;
            return Ok(());
        }
    }
    if header_value(&head, "range").is_some() {
        state.ranged.fetch_add(1, Ordering::SeqCst);
    }

    // Forward with Connection: close, so the upstream ends its answer with EOF.
    let mut rewritten = String::new();
    for line in head.split("\r\n").filter(|l| !l.is_empty()) {
        if line.to_ascii_lowercase().starts_with("connection:") {
            continue;
        }
        rewritten.push_str(line);
        rewritten.push_str("\r\n");
    }
    rewritten.push_str("Connection: close\r\n\r\n");
    state.requests.fetch_add(1, Ordering::SeqCst);
    let mut upstream = TcpStream::connect(("127.0.0.1", upstream_port))?;
    upstream.write_all(rewritten.as_bytes())?;
    upstream.write_all(&buf[head_end..])?;
    let mut response = Vec::new();
    upstream.read_to_end(&mut response)?;

    let fault = if is_blob_get { take_fault(state) } else { None };
    if let Some(fault) = fault {
        state.injected[fault.index()].fetch_add(1, Ordering::SeqCst);
    }
    let resp_head_end = find(&response, b"\r\n\r\n").map_or(response.len(), |p| p + 4);
    let body = response.len() - resp_head_end;
    match fault {
        Some(Fault::Reset) => {
            // Never the whole response: the client must see it cut short.
            let prefix = state.below(response.len().max(1) as u64) as usize;
            client.write_all(&response[..prefix])?;
            reset(&client);
            return Ok(());
        }
        Some(Fault::Stall) => {
            client.write_all(&response[..resp_head_end + body / 2])?;
            client.flush()?;
            let stall = *state.stall.lock().unwrap();
            std::thread::sleep(stall);
        }
        Some(Fault::Status500) => {
            client
                .write_all(b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
        }
        Some(Fault::Truncate) => {
            client.write_all(&response[..resp_head_end + body / 2])?;
        }
        Some(Fault::Corrupt) => {
            if body > 0 {
                for _ in 0..=state.below(8) {
                    let at = resp_head_end + state.below(body as u64) as usize;
                    response[at] ^= 1 << state.below(8);
                }
            }
            client.write_all(&response)?;
        }
        None => {
            if is_blob_get {
                state.blob_requests.fetch_add(1, Ordering::SeqCst);
                state.blob_bytes.fetch_add((response.len() - resp_head_end) as u64, Ordering::SeqCst);
            }
            client.write_all(&response)?;
        }
    }
    client.flush()?;
    client.shutdown(Shutdown::Write)?;
    Ok(())
}

/// Closes `client` with a TCP reset rather than an orderly shutdown.
fn reset(client: &TcpStream) {
    let linger = libc::linger { l_onoff: 1, l_linger: 0 };
    // SAFETY: setting SO_LINGER on a socket we own, with a correctly sized option value.
    unsafe {
        libc::setsockopt(
            client.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        );
    }
    // Dropping the stream (by the caller) closes it; with a zero linger that sends RST.
}
