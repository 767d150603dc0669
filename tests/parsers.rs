//! Property tests of every parser of untrusted bytes, through the library's public API:
//! manifests, model configs, file metadata and its timestamps, lazy indexes (JSON and the
//! companion layer's tar), prefetch policies, referrers lists, tar layers, model paths,
//! model labels, containerd filters and digests.
//!
//! Each property runs on random inputs and on mutations of a valid input built here
//! (bytes set, truncated, inserted, deleted, copied), and asserts that the parser never
//! panics and, where the result means something, that it keeps its promises: a model path
//! never climbs out of the tree, a tar entry's bytes lie inside the blob, what was
//! written reads back.
//!
//! `cargo test` runs [`CASES`] cases of each property. With `FUZZ_SECS` set (`make
//! fuzz`), each property instead runs rounds of [`FUZZ_ROUND_CASES`] cases, every round
//! with a fresh random seed, until that many seconds have passed. A failure prints the
//! smallest input proptest found; it then becomes a named regression test below.

use std::collections::BTreeMap;
use std::io::Cursor;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use modelpack_snapshotter::companion::index_from_tar;
use modelpack_snapshotter::config::PrefetchPolicy;
use modelpack_snapshotter::modelpack::index::{
    ChunkAlgorithm, IndexBlob, IndexFile, IndexSource, LazyIndex, INDEX_PATH, INDEX_VERSION, READABLE_VERSIONS,
};
use modelpack_snapshotter::modelpack::manifest::{self, FileMetadata, MAX_BLOB_SIZE};
use modelpack_snapshotter::modelpack::path::{self, ModelPath, MAX_COMPONENT_LEN, MAX_PATH_LEN};
use modelpack_snapshotter::modelpack::referrers::{Referrer, ReferrersList, MAX_REFERRERS};
use modelpack_snapshotter::modelpack::tar_index::{index_tar, TarEntryKind};
use modelpack_snapshotter::modelpack::Digest;
use modelpack_snapshotter::snapshotter::filter::Filter;
use modelpack_snapshotter::snapshotter::labels::model_labels;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use serde_json::json;

/// Cases of each property in an ordinary test run.
const CASES: u32 = 10_000;
/// Cases of one fuzzing round; each round starts from a fresh seed.
const FUZZ_ROUND_CASES: u32 = 2_000;

/// Runs `test` on values of `strategy`: [`CASES`] of them, or rounds of them until
/// `FUZZ_SECS` seconds have passed. Panics with the smallest failing input.
fn check<S: Strategy>(strategy: S, test: impl Fn(S::Value) -> Result<(), TestCaseError>) {
    let config = |cases| Config { cases, failure_persistence: None, ..Config::default() };
    let run = |cases| {
        if let Err(e) = TestRunner::new(config(cases)).run(&strategy, &test) {
            panic!("{e}");
        }
    };
    let fuzz_secs = std::env::var("FUZZ_SECS").ok().map(|s| s.parse::<u64>().expect("FUZZ_SECS is a number"));
    match fuzz_secs {
        None => run(CASES),
        Some(secs) => {
            let deadline = Instant::now() + Duration::from_secs(secs);
            let mut rounds = 0u64;
            while rounds == 0 || Instant::now() < deadline {
                run(FUZZ_ROUND_CASES);
                rounds += 1;
            }
            // libtest names each test's thread after the test.
            let name = std::thread::current().name().unwrap_or("property").to_owned();
            eprintln!("{name}: {} cases passed", rounds * u64::from(FUZZ_ROUND_CASES));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Inputs: random bytes, and mutations of valid inputs.

/// One edit of a byte string.
#[derive(Clone, Debug)]
enum Mutation {
    Set(Index, u8),
    Truncate(Index),
    Insert(Index, Vec<u8>),
    Delete(Index, usize),
    /// Copies a run of the input over another place (splices the input into itself).
    Copy {
        from: Index,
        to: Index,
        len: usize,
    },
}

/// Bytes that matter to the formats under test, more often than chance would pick them.
fn interesting_byte() -> impl Strategy<Value = u8> {
    prop_oneof![
        3 => any::<u8>(),
        2 => prop::sample::select(b"\"\\{}[]:,.-/0123456789 =!~|\n\0\xff\xc3ex".to_vec()),
    ]
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<Index>(), interesting_byte()).prop_map(|(at, b)| Mutation::Set(at, b)),
        1 => any::<Index>().prop_map(Mutation::Truncate),
        2 => (any::<Index>(), prop::collection::vec(interesting_byte(), 1..16)).prop_map(|(at, b)| Mutation::Insert(at, b)),
        2 => (any::<Index>(), 1usize..64).prop_map(|(at, n)| Mutation::Delete(at, n)),
        1 => (any::<Index>(), any::<Index>(), 1usize..600).prop_map(|(from, to, len)| Mutation::Copy { from, to, len }),
    ]
}

fn apply(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut out = seed.to_vec();
    for m in mutations {
        let len = out.len();
        let at = |i: &Index| if len == 0 { 0 } else { i.index(len + 1) };
        match m {
            Mutation::Set(i, b) if len > 0 => {
                let i = i.index(len);
                out[i] = *b;
            }
            Mutation::Set(..) => {}
            Mutation::Truncate(i) => out.truncate(at(i)),
            Mutation::Insert(i, bytes) => {
                let i = at(i);
                out.splice(i..i, bytes.iter().copied());
            }
            Mutation::Delete(i, n) => {
                let i = at(i).min(len);
                out.drain(i..(i + n).min(len));
            }
            Mutation::Copy { from, to, len: n } => {
                if len > 0 {
                    let from = from.index(len);
                    let run = out[from..(from + n).min(len)].to_vec();
                    let to = to.index(len);
                    let end = (to + run.len()).min(len);
                    out[to..end].copy_from_slice(&run[..end - to]);
                }
            }
        }
    }
    out
}

/// Mutations of `seed`, one to eight edits each.
fn mutated(seed: Vec<u8>) -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(mutation(), 1..8).prop_map(move |ms| apply(&seed, &ms))
}

/// Random bytes, mutations of each seed, and the seeds themselves.
fn bytes_around(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let mutants = prop::sample::select(seeds.clone()).prop_flat_map(mutated);
    prop_oneof![
        1 => prop::collection::vec(any::<u8>(), 0..512),
        1 => prop::collection::vec(interesting_byte(), 0..512),
        1 => prop::sample::select(seeds),
        8 => mutants,
    ]
}

/// Strings made of what path and filter syntax is made of, mostly.
fn syntax_string(alphabet: &'static [&'static str], max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            4 => prop::sample::select(alphabet).prop_map(str::to_owned),
            1 => any::<char>().prop_map(String::from),
        ],
        0..max,
    )
    .prop_map(|parts| parts.concat())
}

// ---------------------------------------------------------------------------------------
// Valid inputs to mutate.

fn digest(n: u8) -> String {
    Digest::of(&[n]).to_string()
}

const METADATA: &str = r#"{"name":"model.safetensors","mode":420,"uid":0,"gid":0,"size":1000,"mtime":"2025-04-01T12:00:00.5Z","typeflag":48}"#;

fn valid_manifest() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": { "mediaType": "application/vnd.cncf.model.config.v1+json", "digest": digest(0), "size": 321 },
        "layers": [
            { "mediaType": "application/vnd.cncf.model.weight.v1.raw", "digest": digest(1), "size": 1000,
              "annotations": { "org.cncf.model.filepath": "model.safetensors",
                               "org.cncf.model.file.metadata+json": METADATA } },
            { "mediaType": "application/vnd.cnai.model.doc.v1.tar+gzip", "digest": digest(2), "size": 12,
              "annotations": { "org.opencontainers.image.title": "docs" } },
            { "mediaType": "application/vnd.cncf.model.weight.config.v1.tar", "digest": digest(3), "size": 0 }
        ]
    }))
    .unwrap()
}

fn valid_config() -> Vec<u8> {
    serde_json::to_vec(&json!({
        "descriptor": { "name": "demo", "createdAt": "2025-01-01T00:00:00Z" },
        "config": { "architecture": "transformer", "format": "safetensors" },
        "modelfs": { "type": "layers", "diffIds": [digest(1), digest(2)], "diff_ids": [digest(3)] }
    }))
    .unwrap()
}

/// A consistent lazy index of a two-layer model, of `version`.
fn valid_index(version: u32) -> LazyIndex {
    let algorithm = ChunkAlgorithm::for_version(version).unwrap();
    let data = vec![7u8; 10_000];
    let config = r#"{"modelfs":{"type":"layers","diffIds":[]}}"#.to_owned();
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "artifactType": "application/vnd.cncf.model.manifest.v1+json",
        "config": {"mediaType": "application/vnd.cncf.model.config.v1+json",
                   "digest": Digest::of(config.as_bytes()).to_string(), "size": config.len()},
        "layers": [
            {"mediaType": "application/vnd.cncf.model.weight.v1.raw", "digest": Digest::of(&data).to_string(),
             "size": data.len(), "annotations": {"org.cncf.model.filepath": "w.bin"}},
            {"mediaType": "application/vnd.cncf.model.doc.v1.raw", "digest": Digest::of(b"doc").to_string(),
             "size": 3, "annotations": {"org.cncf.model.filepath": "README"}},
        ],
    })
    .to_string();
    LazyIndex {
        version,
        source: IndexSource {
            reference: format!("127.0.0.1:5000/m@{}", Digest::of(manifest.as_bytes())),
            manifest_digest: Digest::of(manifest.as_bytes()).to_string(),
        },
        manifest,
        config,
        chunk_size: 4096,
        blobs: vec![
            IndexBlob {
                digest: Digest::of(&data).to_string(),
                size: data.len() as u64,
                chunks: data.chunks(4096).map(|c| algorithm.digest(c).to_string()).collect(),
            },
            IndexBlob {
                digest: Digest::of(b"doc").to_string(),
                size: 3,
                chunks: vec![algorithm.digest(b"doc").to_string()],
            },
        ],
        files: vec![
            IndexFile {
                path: "w.bin".into(),
                kind: "file".into(),
                mode: 0o444,
                size: 10_000,
                layer: Some(0),
                offset: 0,
                target: None,
            },
            IndexFile {
                path: "README".into(),
                kind: "file".into(),
                mode: 0o444,
                size: 3,
                layer: Some(1),
                offset: 0,
                target: None,
            },
        ],
        prefetch: Some(PrefetchPolicy::Head(64 << 20)),
    }
}

/// A tar built header by header, so that names and sizes can be anything.
#[derive(Default)]
struct RawTar(Vec<u8>);

impl RawTar {
    fn header(kind: u8, name: &[u8], link: &[u8], size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::new(kind));
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        let old = h.as_old_mut();
        let n = name.len().min(old.name.len());
        old.name[..n].copy_from_slice(&name[..n]);
        let l = link.len().min(old.linkname.len());
        old.linkname[..l].copy_from_slice(&link[..l]);
        h.set_cksum();
        h
    }

    fn record(&mut self, kind: u8, name: &[u8], link: &[u8], data: &[u8]) {
        self.0.extend_from_slice(Self::header(kind, name, link, data.len() as u64).as_bytes());
        self.0.extend_from_slice(data);
        self.0.resize(self.0.len().next_multiple_of(512), 0);
    }

    fn pax(&mut self, records: &[(&str, &[u8])]) {
        let mut text = Vec::new();
        for (key, value) in records {
            let body_len = key.len() + value.len() + 3;
            let mut len = body_len + 1;
            while len.to_string().len() + body_len != len {
                len += 1;
            }
            text.extend_from_slice(format!("{len} {key}=").as_bytes());
            text.extend_from_slice(value);
            text.push(b'\n');
        }
        self.record(b'x', b"pax", b"", &text);
    }

    fn finish(mut self) -> Vec<u8> {
        self.0.extend_from_slice(&[0; 1024]);
        self.0
    }
}

fn valid_tar() -> Vec<u8> {
    let mut t = RawTar::default();
    t.record(b'5', b"./", b"", b"");
    t.record(b'5', b"model/", b"", b"");
    t.record(b'0', b"model/config.json", b"", b"{\"a\":1}");
    t.record(b'0', b"model/weights.bin", b"", &[9u8; 1500]);
    let long = format!("model/{}", "l".repeat(150));
    t.record(b'L', b"././@LongLink", b"", format!("{long}\0").as_bytes());
    t.record(b'0', b"truncated-name", b"", b"long");
    t.pax(&[("path", b"model/pax-name"), ("mtime", b"1234.5"), ("size", b"3")]);
    t.record(b'0', b"ignored", b"", b"pax");
    t.record(b'2', b"model/link", b"weights.bin", b"");
    t.record(b'1', b"model/hard", b"model/config.json", b"");
    t.record(b'g', b"global", b"", b"18 comment=global\n");
    t.finish()
}

/// A companion layer: a tar holding the lazy index JSON.
fn valid_index_tar() -> Vec<u8> {
    let json = valid_index(INDEX_VERSION).to_json();
    let mut t = RawTar::default();
    t.record(b'5', b".modelpack/", b"", b"");
    t.record(b'0', INDEX_PATH.as_bytes(), b"", &json);
    t.finish()
}

/// Sets the checksum of every 512-byte block, so that mutations reach past the checksum
/// check. Data blocks get a checksum field too, which changes nothing a header walk needs.
fn fix_checksums(bytes: &mut [u8]) {
    for block in bytes.chunks_exact_mut(512) {
        if block.iter().any(|&b| b != 0) {
            let mut h = tar::Header::new_old();
            h.as_mut_bytes().copy_from_slice(block);
            h.set_cksum();
            block.copy_from_slice(h.as_bytes());
        }
    }
}

// ---------------------------------------------------------------------------------------
// Properties.

/// A model path, whatever it was parsed from, stays inside the tree and is normalized.
fn assert_model_path(p: &ModelPath) -> Result<(), TestCaseError> {
    let s = p.as_str();
    prop_assert!(!s.is_empty() && !s.starts_with('/') && !s.ends_with('/') && !s.contains('\0'), "{s:?}");
    prop_assert!(s.len() <= MAX_PATH_LEN, "{} bytes", s.len());
    for c in p.components() {
        prop_assert!(!matches!(c, "" | "." | ".."), "{s:?} has component {c:?}");
        prop_assert!(c.len() <= MAX_COMPONENT_LEN);
    }
    prop_assert_eq!(&ModelPath::parse(s).unwrap(), p, "parsing is idempotent");
    Ok(())
}

#[test]
fn model_paths_never_leave_the_tree() {
    const ALPHABET: &[&str] = &["a", "b", "/", "/", ".", "..", "./", "../", "\0", "é", "\\"];
    let long =
        prop::collection::vec(prop::sample::select(vec!["x".repeat(250), "/".to_owned(), "..".to_owned()]), 0..24)
            .prop_map(|parts| parts.concat());
    check(prop_oneof![4 => syntax_string(ALPHABET, 24), 1 => long, 1 => any::<String>()], |s| {
        match ModelPath::parse(&s) {
            Ok(p) => {
                assert_model_path(&p)?;
                let stripped = s.strip_prefix("./").unwrap_or(&s);
                prop_assert_eq!(p.as_str(), stripped.strip_suffix('/').unwrap_or(stripped));
                if let Some(parent) = p.parent() {
                    assert_model_path(&parent)?;
                    prop_assert_eq!(format!("{}/{}", parent.as_str(), p.file_name()), p.as_str());
                }
            }
            Err(e) => prop_assert!(e.to_string().len() < 400, "errors stay short: {e}"),
        }
        if let Ok(Some(p)) = path::parse_tar_name(&s) {
            assert_model_path(&p)?;
        }
        Ok(())
    });
}

#[test]
fn digests_parse_only_their_canonical_form() {
    let canonical = any::<[u8; 32]>().prop_map(|b| Digest::from_bytes(b).to_string());
    let near = canonical
        .clone()
        .prop_flat_map(|d| mutated(d.into_bytes()))
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned());
    check(prop_oneof![canonical, near, any::<String>()], |s| {
        if let Ok(d) = s.parse::<Digest>() {
            prop_assert_eq!(d.to_string(), s.clone(), "only the canonical form parses");
            prop_assert_eq!(s.parse::<Digest>().unwrap(), d);
        } else {
            let ok = s.len() == 71
                && s.starts_with("sha256:")
                && s[7..].bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
            prop_assert!(!ok, "{s:?} is canonical but was refused");
        }
        Ok(())
    });
}

#[test]
fn prefetch_policies_parse_strictly_and_read_back() {
    let alphabet: &'static [&'static str] = &[
        "none",
        "all",
        "head:",
        "0",
        "1",
        "9",
        "64",
        "18446744073709551615",
        "KiB",
        "MiB",
        "GiB",
        "TiB",
        "B",
        " ",
        ":",
    ];
    let valid = prop_oneof![
        Just(PrefetchPolicy::None),
        Just(PrefetchPolicy::All),
        (1u64..).prop_map(PrefetchPolicy::Head),
        (1u64..1 << 24, 0usize..4).prop_map(|(n, shift)| PrefetchPolicy::Head(n << (10 * shift))),
    ];
    let written = valid.clone().prop_map(|p| p.to_string());
    let near = written
        .clone()
        .prop_flat_map(|s| mutated(s.into_bytes()))
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned());
    check(prop_oneof![written, near, syntax_string(alphabet, 8), any::<String>()], |s| {
        match s.parse::<PrefetchPolicy>() {
            Ok(p) => {
                prop_assert!(s.len() <= PrefetchPolicy::MAX_LEN);
                prop_assert!(s == "none" || s == "all" || s.starts_with("head:"), "{s:?}");
                prop_assert_ne!(p, PrefetchPolicy::Head(0));
                prop_assert_eq!(p.to_string().parse::<PrefetchPolicy>().unwrap(), p, "{:?} reads back", s);
            }
            Err(e) => prop_assert!(e.value.len() <= PrefetchPolicy::MAX_LEN && s.starts_with(&e.value), "{e}"),
        }
        Ok(())
    });
    check(valid, |p| {
        prop_assert_eq!(p.to_string().parse::<PrefetchPolicy>().unwrap(), p);
        Ok(())
    });
}

#[test]
fn manifests_parse_or_fail_without_panicking() {
    check(bytes_around(vec![valid_manifest()]), |bytes| {
        if let Ok(artifact) = manifest::parse_manifest(&bytes) {
            prop_assert!(artifact.config.size <= manifest::MAX_CONFIG_BYTES as u64);
            for (i, layer) in artifact.layers.iter().enumerate() {
                prop_assert_eq!(layer.index, i);
                prop_assert!(layer.size <= MAX_BLOB_SIZE);
                if let Some(p) = &layer.path {
                    assert_model_path(p)?;
                }
            }
        }
        Ok(())
    });
}

#[test]
fn configs_parse_or_fail_without_panicking() {
    check(bytes_around(vec![valid_config(), b"{}".to_vec()]), |bytes| {
        if let Ok(config) = manifest::parse_config(&bytes) {
            prop_assert!(config.name.as_deref() != Some(""));
            let value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
            let listed = value["modelfs"]["diffIds"].as_array().or(value["modelfs"]["diff_ids"].as_array());
            prop_assert_eq!(config.diff_ids.len(), listed.map_or(0, Vec::len));
        }
        Ok(())
    });
}

#[test]
fn file_metadata_parses_or_fails_without_panicking() {
    check(bytes_around(vec![METADATA.as_bytes().to_vec(), br#"{"typeflag":"0","mode":493}"#.to_vec()]), |bytes| {
        let _ = FileMetadata::from_json(&String::from_utf8_lossy(&bytes));
        Ok(())
    });
}

/// Days from 1970-01-01 to the first day of `year`, counted year by year: a different
/// computation from the parser's.
fn days_before_year(year: i64) -> i64 {
    let leap = |y: i64| y % 4 == 0 && (y % 100 != 0 || y % 400 == 0);
    let days = |y: i64| if leap(y) { 366 } else { 365 };
    if year >= 1970 {
        (1970..year).map(days).sum()
    } else {
        -(year..1970).map(days).sum::<i64>()
    }
}

fn mtime_of(s: &str) -> Option<SystemTime> {
    FileMetadata::from_json(&json!({ "mtime": s }).to_string()).unwrap().mtime
}

#[test]
fn timestamps_read_back_what_was_written() {
    let fields = (
        1u32..=9999,
        1u32..=12,
        1u32..=31,
        0u32..24,
        0u32..60,
        0u32..60,
        0u32..1_000_000_000,
        -1439i32..=1439,
        any::<u8>(),
    );
    check(fields, |(year, month, day, hour, minute, second, nanos, offset_minutes, style)| {
        let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
        let month_days = [31, if leap { 29 } else { 28 }, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
        let day = day.min(month_days[month as usize - 1]);
        let fraction = if style & 1 == 0 { String::new() } else { format!(".{nanos:09}") };
        let zone = if style & 2 == 0 {
            "Z".to_owned()
        } else {
            let sign = if offset_minutes < 0 { '-' } else { '+' };
            format!("{sign}{:02}:{:02}", offset_minutes.unsigned_abs() / 60, offset_minutes.unsigned_abs() % 60)
        };
        let s = format!("{year:04}-{month:02}-{day:02}T{hour:02}:{minute:02}:{second:02}{fraction}{zone}");
        let day_of_year: i64 =
            month_days[..month as usize - 1].iter().map(|&d| i64::from(d)).sum::<i64>() + i64::from(day) - 1;
        let offset = if style & 2 == 0 { 0 } else { i64::from(offset_minutes) * 60 };
        let secs = (days_before_year(i64::from(year)) + day_of_year) * 86_400
            + i64::from(hour * 3600 + minute * 60 + second)
            - offset;
        let nanos = if style & 1 == 0 { 0 } else { nanos };
        let want = if secs >= 0 {
            UNIX_EPOCH + Duration::new(secs.unsigned_abs(), nanos)
        } else {
            UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + Duration::from_nanos(u64::from(nanos))
        };
        // Go's zero time means "unset".
        let go_zero = secs == -62_135_596_800 && nanos == 0;
        prop_assert_eq!(mtime_of(&s), (!go_zero).then_some(want), "{}", s);
        Ok(())
    });
}

#[test]
fn timestamps_parse_or_fail_without_panicking() {
    const ALPHABET: &[&str] = &["0", "1", "2", "9", "-", ":", "T", "t", " ", ".", "Z", "z", "+", "60", "99"];
    let seeds = ["2025-04-01T12:00:00.123456789+02:00", "1970-01-01T00:00:00Z", "0001-01-01T00:00:00Z"];
    let near = prop::sample::select(seeds.to_vec())
        .prop_flat_map(|s| mutated(s.as_bytes().to_vec()))
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned());
    check(prop_oneof![near, syntax_string(ALPHABET, 40)], |s| {
        let _ = mtime_of(&s);
        Ok(())
    });
}

#[test]
fn lazy_indexes_parse_or_fail_without_panicking() {
    let mut seeds = Vec::new();
    for version in READABLE_VERSIONS {
        let index = valid_index(version);
        let json = index.to_json();
        let parsed = LazyIndex::parse(&json).unwrap();
        assert_eq!(parsed.index, index, "a valid index of version {version} reads back");
        seeds.push(json);
    }
    check(bytes_around(seeds), |bytes| {
        if let Ok(v) = LazyIndex::parse(&bytes) {
            prop_assert_eq!(Digest::of(v.index.manifest.as_bytes()), v.manifest_digest);
            prop_assert_eq!(v.chunks.len(), v.artifact.layers.len());
            for (layer, chunks) in v.artifact.layers.iter().zip(&v.chunks) {
                prop_assert_eq!(chunks.len() as u64, layer.size.div_ceil(chunks.chunk_size));
                prop_assert_eq!(Some(chunks.algorithm), ChunkAlgorithm::for_version(v.index.version));
            }
        }
        Ok(())
    });
}

/// A referrers list as `convert` writes it, with an entry of another client's.
fn valid_referrers() -> Vec<u8> {
    json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [
            { "mediaType": "application/vnd.oci.image.index.v1+json", "digest": digest(1), "size": 700 },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(2), "size": 900,
                "artifactType": "application/vnd.oci.image.config.v1+json",
            },
            {
                "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": digest(3), "size": 500,
                "artifactType": "application/vnd.example.signature.v1", "annotations": { "a": "b" },
            },
        ],
    })
    .to_string()
    .into_bytes()
}

#[test]
fn referrers_lists_parse_or_fail_without_panicking() {
    let seed = valid_referrers();
    assert_eq!(ReferrersList::parse(&seed).unwrap().referrers().len(), 3);
    check(bytes_around(vec![seed]), |bytes| {
        if let Ok(mut list) = ReferrersList::parse(&bytes) {
            prop_assert!(list.len() <= MAX_REFERRERS);
            prop_assert!(list.referrers().len() <= list.len());
            // What was written reads back, and adding what is listed changes nothing.
            let again = ReferrersList::parse(&list.to_json()).unwrap();
            prop_assert_eq!(&again, &list);
            let listed: Vec<Referrer> = list.referrers().to_vec();
            prop_assert!(!list.add(&listed).unwrap());
            prop_assert_eq!(list.to_json(), again.to_json());
        }
        Ok(())
    });
}

#[test]
fn companion_layers_parse_or_fail_without_panicking() {
    let seed = valid_index_tar();
    assert_eq!(index_from_tar(&seed).unwrap(), valid_index(INDEX_VERSION).to_json());
    let fixed = mutated(seed.clone()).prop_map(|mut b| {
        fix_checksums(&mut b);
        b
    });
    check(prop_oneof![bytes_around(vec![seed]), fixed], |bytes| {
        if let Ok(json) = index_from_tar(&bytes) {
            prop_assert!(json.len() <= bytes.len());
        }
        Ok(())
    });
}

/// Everything a successful tar index promises about `blob`.
fn assert_tar_index(blob: &[u8]) -> Result<(), TestCaseError> {
    let Ok(entries) = index_tar(Cursor::new(blob), blob.len() as u64) else { return Ok(()) };
    let mut files = BTreeMap::new();
    for e in &entries {
        assert_model_path(&e.path)?;
        let end = e.data_offset.checked_add(e.size);
        prop_assert!(end.is_some_and(|end| end <= blob.len() as u64), "{e:?} runs past {} bytes", blob.len());
        match &e.kind {
            TarEntryKind::File => {
                prop_assert_eq!(e.data_offset % 512, 0);
                files.insert(e.path.clone(), (e.size, e.data_offset));
            }
            TarEntryKind::HardLink(target) => {
                prop_assert_eq!(files.get(target), Some(&(e.size, e.data_offset)), "{:?}", e);
                files.insert(e.path.clone(), (e.size, e.data_offset));
            }
            TarEntryKind::Symlink(target) => {
                prop_assert!(!target.is_empty() && !target.starts_with('/'), "{target:?}");
                prop_assert_eq!((e.size, e.data_offset), (0, 0));
            }
            TarEntryKind::Dir => prop_assert_eq!((e.size, e.data_offset), (0, 0)),
        }
    }
    Ok(())
}

/// A path as archives write them, mostly well-formed: a few components, sometimes with a
/// leading `./` or a trailing `/`, sometimes with a hostile part.
fn tar_path() -> impl Strategy<Value = String> {
    let part = prop_oneof![
        12 => prop::sample::select(&["a", "b", "dir", "x.bin", "é"][..]),
        1 => prop::sample::select(&["..", ".", "", "\0"][..]),
    ];
    (prop::collection::vec(part, 1..4), any::<u8>()).prop_map(|(parts, style)| {
        let mut p = parts.join("/");
        if style & 3 == 0 {
            p.insert_str(0, "./");
        }
        if style & 12 == 0 {
            p.push('/');
        }
        if style == 255 {
            p.insert(0, '/');
        }
        p
    })
}

/// One entry of a generated archive: a type, a name, a link target, data, how the name
/// travels (in the header, a GNU long-name record or a PAX record) and the PAX size.
type GeneratedEntry = (u8, String, String, usize, u8, usize);

fn tar_entry() -> impl Strategy<Value = GeneratedEntry> {
    (
        prop_oneof![10 => prop::sample::select(b"0000055222211".to_vec()), 1 => prop::sample::select(b"xgLKS3".to_vec())],
        tar_path(),
        prop_oneof![tar_path(), tar_path().prop_map(|p| format!("../{p}"))],
        prop_oneof![3 => 0usize..700, 1 => Just(0)],
        any::<u8>(),
        prop_oneof![0usize..700, 1usize << 40..1 << 62],
    )
}

fn build_tar(entries: &[GeneratedEntry]) -> Vec<u8> {
    let mut t = RawTar::default();
    for (kind, name, link, size, how, pax_size) in entries {
        let data = vec![b'd'; *size];
        match how % 8 {
            0 => t.record(b'L', b"././@LongLink", b"", format!("{name}\0").as_bytes()),
            1 => t.record(b'K', b"././@LongLink", b"", format!("{link}\0").as_bytes()),
            2 => t.pax(&[("path", name.as_bytes()), ("linkpath", link.as_bytes())]),
            3 => t.pax(&[("size", size.to_string().as_bytes())]),
            4 => t.pax(&[("size", pax_size.to_string().as_bytes())]),
            _ => {}
        }
        t.record(*kind, name.as_bytes(), link.as_bytes(), &data);
    }
    t.finish()
}

#[test]
fn generated_tar_layers_keep_their_promises() {
    check(prop::collection::vec(tar_entry(), 0..8), |entries| assert_tar_index(&build_tar(&entries)));
}

/// Files of a well-formed archive: a path (long ones travel in GNU long-name records),
/// content, and whether a PAX record precedes the file.
fn tar_files() -> impl Strategy<Value = Vec<(String, Vec<u8>, bool)>> {
    let component = prop_oneof![4 => "[a-z0-9_.-]{1,12}", 1 => "[a-zé]{100,120}"]
        .prop_filter("not . or ..", |c| c != "." && c != "..");
    let path = prop::collection::vec(component, 1..4).prop_map(|c| c.join("/"));
    prop::collection::vec((path, prop::collection::vec(any::<u8>(), 0..1500), any::<bool>()), 0..6)
}

#[test]
fn well_formed_tar_layers_read_back_what_was_archived() {
    check(tar_files(), |files| {
        let mut builder = tar::Builder::new(Vec::new());
        let mut want: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        for (path, data, pax) in &files {
            // A path that is another file's directory (or the other way round) cannot be
            // both; the later entry is left out.
            let clash = want.keys().any(|p| p.starts_with(&format!("{path}/")) || path.starts_with(&format!("{p}/")));
            if clash {
                continue;
            }
            if *pax {
                builder.append_pax_extensions([("mtime", b"1700000000.5".as_slice())]).unwrap();
            }
            let mut header = tar::Header::new_gnu();
            header.set_size(data.len() as u64);
            header.set_mode(0o644);
            builder.append_data(&mut header, path, &data[..]).unwrap();
            want.insert(path.clone(), data.clone());
        }
        let blob = builder.into_inner().unwrap();
        let entries =
            index_tar(Cursor::new(&blob), blob.len() as u64).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let mut got = BTreeMap::new();
        for e in entries.iter().filter(|e| e.kind == TarEntryKind::File) {
            let range = e.data_offset as usize..(e.data_offset + e.size) as usize;
            got.insert(e.path.as_str().to_owned(), blob[range].to_vec());
        }
        prop_assert_eq!(got, want);
        Ok(())
    });
}

#[test]
fn mutated_tar_layers_keep_their_promises() {
    let seed = valid_tar();
    assert_eq!(index_tar(Cursor::new(&seed), seed.len() as u64).unwrap().len(), 7);
    let fixed = (mutated(seed.clone()), any::<bool>()).prop_map(|(mut b, fix)| {
        if fix {
            fix_checksums(&mut b);
        }
        b
    });
    check(prop_oneof![1 => bytes_around(vec![seed]), 3 => fixed], |bytes| assert_tar_index(&bytes));
}

fn valid_labels() -> BTreeMap<String, String> {
    let d = Digest::of(b"x");
    [
        // A model's chain ID is its index layer's digest.
        ("containerd.io/snapshot.ref", d.to_string()),
        ("containerd.io/snapshot/modelpack.source", format!("127.0.0.1:5000/models/m@{d}")),
        ("containerd.io/snapshot/modelpack.index", format!("registry.example/models/m-lazy@{d}")),
        ("containerd.io/snapshot/modelpack.version", "1".to_owned()),
        ("containerd.io/snapshot/cri.image-ref", "whatever".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

#[test]
fn model_labels_parse_or_fail_without_panicking() {
    assert!(matches!(model_labels(&valid_labels()), Ok(Some(_))), "the seed is a valid model");
    let keys: Vec<String> =
        valid_labels().into_keys().chain(["containerd.io/snapshot/modelpack.".to_owned()]).collect();
    let edit = (
        prop::sample::select(keys),
        prop_oneof![
            Just(None),
            any::<String>().prop_map(Some),
            (
                prop::sample::select(valid_labels().into_values().collect::<Vec<_>>()),
                prop::collection::vec(mutation(), 1..6)
            )
                .prop_map(|(v, ms)| Some(String::from_utf8_lossy(&apply(v.as_bytes(), &ms)).into_owned())),
        ],
    );
    check(prop::collection::vec(edit, 0..6), |edits| {
        let mut labels = valid_labels();
        for (key, value) in edits {
            match value {
                Some(v) => labels.insert(key, v),
                None => labels.remove(&key),
            };
        }
        if let Ok(Some(m)) = model_labels(&labels) {
            prop_assert_eq!(&m.chain_id, &m.index.digest.to_string());
            prop_assert!(labels.values().any(|v| *v == m.source.reference));
            prop_assert!(m.index.reference.ends_with(&m.index.digest.to_string()));
        }
        Ok(())
    });
}

/// `s` as a containerd double-quoted string, every character escaped.
fn quoted(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        out.push_str(&format!("\\U{:08x}", u32::from(c)));
    }
    out.push('"');
    out
}

#[test]
fn filters_match_the_label_they_quote() {
    let text = any::<String>().prop_filter("no nul", |s| !s.contains('\0'));
    check((text.clone(), text, any::<bool>()), |(key, value, equal)| {
        let op = if equal { "==" } else { "!=" };
        let filter = format!("labels.{}{op}{},parent", quoted(&key), quoted(&value));
        let parsed =
            Filter::parse_all(std::slice::from_ref(&filter)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        let labelled = |v: &str| {
            let v = v.to_owned();
            let key = key.clone();
            move |path: &[&str]| match path {
                ["parent"] => Some(String::new()),
                ["labels", k] if *k == key => Some(v.clone()),
                _ => None,
            }
        };
        prop_assert_eq!(parsed.matches(&labelled(&value)), equal, "{}", filter);
        prop_assert_eq!(parsed.matches(&labelled(&format!("{value}x"))), !equal, "{}", filter);
        Ok(())
    });
}

#[test]
fn filters_parse_or_fail_without_panicking() {
    const ALPHABET: &[&str] = &[
        "labels", ".", "\"", "/", "|", "\\", "==", "!=", "~=", "=", "!", "~", ",", " ", "a", "é", "x4", "u00e9", "0",
        "\n", "[", "*", "{2}",
    ];
    let seeds = [
        r#"labels."containerd.io/snapshot.ref"==sha256:abc,parent=="d\u00e9f\x41\101""#,
        r"name~=/a\/b/,kind!=view,labels.a.b,labels.ü~=|x|",
        "name == модель , kind==😀",
    ];
    let near = prop::sample::select(seeds.to_vec())
        .prop_flat_map(|s| mutated(s.as_bytes().to_vec()))
        .prop_map(|b| String::from_utf8_lossy(&b).into_owned());
    let filters =
        prop::collection::vec(prop_oneof![3 => near, 2 => syntax_string(ALPHABET, 30), 1 => any::<String>()], 0..3);
    check(filters, |filters| {
        if let Ok(parsed) = Filter::parse_all(&filters) {
            let _ = parsed.matches(&|path: &[&str]| (path.len() % 2 == 0).then(|| path.join(".")));
        }
        Ok(())
    });
}
