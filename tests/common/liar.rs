//! A registry that lies: it answers blob requests for chosen digests, in any repository,
//! with bytes of its choosing (ranges included), the way an attacker's registry would
//! answer for another tenant's blob. Everything else is 404. One thread per connection,
//! one response per connection; stopped on drop.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use modelpack_snapshotter::modelpack::index::LazyIndex;
use modelpack_snapshotter::modelpack::Digest;

pub struct LyingRegistry {
    pub port: u16,
    stop: Arc<AtomicBool>,
}

impl LyingRegistry {
    /// Serves `blobs` (digest string → bytes) on a loopback port.
    pub fn start(blobs: HashMap<String, Vec<u8>>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").expect("binding the lying registry");
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let blobs = Arc::new(blobs);
        let stopping = stop.clone();
        std::thread::spawn(move || {
            while !stopping.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => {
                        let blobs = blobs.clone();
                        std::thread::spawn(move || {
                            let _ = answer(stream, &blobs);
                        });
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        Self { port, stop }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

/// The attacker of one weight file of a model: a lying registry that answers every blob
/// of the model in `src` honestly except that file's, which it answers with other bytes
/// of the same length, so that a forged model works until its index is caught.
pub struct WeightForgery {
    pub liar: LyingRegistry,
    /// The honest weight blob's digest.
    pub digest: String,
    /// What the liar answers for it.
    pub forged: Vec<u8>,
}

impl WeightForgery {
    /// Forges `weight` (a path in `src`).
    pub fn start(src: &Path, weight: &str) -> Self {
        let honest = std::fs::read(src.join(weight)).unwrap();
        let forged: Vec<u8> = honest.iter().map(|b| b ^ 0x5a).collect();
        let digest = Digest::of(&honest).to_string();
        let mut blobs: HashMap<String, Vec<u8>> =
            super::read_tree(src).into_values().map(|data| (Digest::of(&data).to_string(), data)).collect();
        blobs.insert(digest.clone(), forged.clone());
        Self { liar: LyingRegistry::start(blobs), digest, forged }
    }

    /// Makes `index` vouch for the forged bytes: the weight blob's chunk digests those of
    /// the forged bytes, with the hash of the index's version.
    pub fn vouch(&self, index: &mut LazyIndex) {
        let (algorithm, chunk_size) = (index.chunk_algorithm().expect("a readable index version"), index.chunk_size);
        let blob = index.blobs.iter_mut().find(|b| b.digest == self.digest).expect("weight blob in the index");
        blob.chunks = self.forged.chunks(chunk_size as usize).map(|c| algorithm.digest(c).to_string()).collect();
    }

    /// Makes `index` vouch for the forged bytes and name `repository` on the liar as its
    /// source (the same manifest digest).
    pub fn forge(&self, index: &mut LazyIndex, repository: &str) {
        self.vouch(index);
        index.source.reference = format!("{}/{repository}@{}", self.liar.addr(), index.source.manifest_digest);
    }
}

impl Drop for LyingRegistry {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

fn answer(stream: TcpStream, blobs: &HashMap<String, Vec<u8>>) -> std::io::Result<()> {
    stream.set_nonblocking(false)?;
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request = String::new();
    reader.read_line(&mut request)?;
    let mut range = None;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("range") {
                range = value.trim().strip_prefix("bytes=").and_then(|r| {
                    let (a, b) = r.split_once('-')?;
                    Some((a.parse::<usize>().ok()?, b.parse::<usize>().ok()))
                });
            }
        }
    }
    let mut parts = request.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let mut out = stream;
    if path == "/v2/" || path == "/v2" {
        return respond(&mut out, "200 OK", &[("Content-Type", "application/json".into())], b"{}", method);
    }
    let blob = path.rsplit_once("/blobs/").map(|(_, digest)| digest).and_then(|d| blobs.get(d));
    let Some(data) = blob else {
        return respond(&mut out, "404 Not Found", &[], b"", method);
    };
    match range {
        Some((start, end)) if start < data.len() => {
            let end = end.unwrap_or(data.len() - 1).min(data.len() - 1);
            let headers = [("Content-Range", format!("bytes {start}-{end}/{}", data.len()))];
            respond(&mut out, "206 Partial Content", &headers, &data[start..=end], method)
        }
        Some(_) => respond(&mut out, "416 Range Not Satisfiable", &[], b"", method),
        None => respond(&mut out, "200 OK", &[], data, method),
    }
}

fn respond(
    out: &mut TcpStream,
    status: &str,
    headers: &[(&str, String)],
    body: &[u8],
    method: &str,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n", body.len());
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    out.write_all(head.as_bytes())?;
    if method != "HEAD" {
        out.write_all(body)?;
    }
    out.flush()
}
