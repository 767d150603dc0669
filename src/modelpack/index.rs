//! The lazy index: what `convert` publishes inside a companion image so that a
//! snapshotter can serve a model without trusting the registry's bytes blindly.
//!
//! It carries the source ModelPack manifest and config verbatim (so their digests can be
//! checked), the digest of every fixed-size chunk of every layer blob, and the list of
//! files (for people and tools; the snapshotter rebuilds the tree from the manifest).
//! The format is versioned JSON; `docs/lazy-index.md` describes it. The version decides
//! the chunk digests' hash: sha256 in version 1, BLAKE3 in version 2 (what `convert`
//! writes), and every chunk digest names its algorithm. Parsing checks every digest,
//! size and count before anything uses them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::Digest as _;

use super::digest::Digest;
use super::manifest::{self, ManifestError, ModelArtifact};

/// The format version `convert` writes: chunk digests are BLAKE3.
pub const INDEX_VERSION: u32 = 2;
/// The chunk digests' hash in [`INDEX_VERSION`].
pub const INDEX_ALGORITHM: ChunkAlgorithm = ChunkAlgorithm::Blake3;
/// Every format version this build reads, oldest first.
pub const READABLE_VERSIONS: [u32; 2] = [1, 2];
/// The index's path inside the companion layer's tar.
pub const INDEX_PATH: &str = ".modelpack/index.json";
/// Smallest and largest chunk sizes an index may declare.
pub const MIN_CHUNK_SIZE: u64 = 4096;
/// See [`MIN_CHUNK_SIZE`].
pub const MAX_CHUNK_SIZE: u64 = 1 << 30;
/// The largest index accepted, against a hostile companion.
pub const MAX_INDEX_BYTES: u64 = 256 << 20;

/// Why an index is unusable.
#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    /// Not JSON of the expected shape.
    #[error("lazy index is malformed: {0}")]
    Malformed(String),
    /// Written by a newer (or unknown) format.
    #[error("lazy index version {0} is not supported (this build reads versions {versions})", versions = readable_versions())]
    Version(u32),
    /// The embedded manifest does not hash to the source digest it claims.
    #[error("lazy index manifest does not match source digest {0}")]
    ManifestDigest(Digest),
    /// The embedded config does not match the manifest's config descriptor.
    #[error("lazy index config does not match the manifest's config {0}")]
    ConfigDigest(Digest),
    /// The embedded manifest is not a ModelPack manifest.
    #[error("lazy index: {0}")]
    Manifest(#[from] ManifestError),
    /// Chunk size out of range.
    #[error("lazy index chunk size {0} is outside {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize(u64),
    /// The blobs do not correspond to the manifest's layers, or their chunk lists do not
    /// fit their sizes.
    #[error("lazy index blob {index} ({digest}): {reason}")]
    Blob { index: usize, digest: String, reason: String },
}

/// Where the model came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexSource {
    /// The source reference, pinned by digest (`registry/repo@sha256:...`).
    pub reference: String,
    /// The ModelPack manifest's digest.
    pub manifest_digest: String,
}

/// Chunk digests of one layer blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexBlob {
    /// The blob's digest.
    pub digest: String,
    /// Its size in bytes.
    pub size: u64,
    /// The digest of each `chunkSize` piece, in order (the last may be shorter), as
    /// `<algorithm>:<64 hex>`: `sha256` in version 1, `blake3` in version 2.
    pub chunks: Vec<String>,
}

/// One file of the model tree, for reference.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct IndexFile {
    /// Path in the model.
    pub path: String,
    /// `file`, `dir` or `symlink`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Permission bits as served.
    pub mode: u32,
    /// Size in bytes (files).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    /// Index of the layer holding the bytes (files).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<usize>,
    /// Offset of the bytes in the layer's (uncompressed) blob (files).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    /// Link target (symlinks).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The serialized form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LazyIndex {
    /// One of [`READABLE_VERSIONS`]; `convert` writes [`INDEX_VERSION`].
    pub version: u32,
    /// Where the model came from.
    pub source: IndexSource,
    /// The ModelPack manifest, byte for byte.
    pub manifest: String,
    /// The model config blob, byte for byte.
    pub config: String,
    /// Bytes per digested chunk.
    pub chunk_size: u64,
    /// One entry per manifest layer, in manifest order.
    pub blobs: Vec<IndexBlob>,
    /// Every file, directory and symlink of the model tree.
    pub files: Vec<IndexFile>,
    /// What of the model a node fetches in the background once it serves it (`convert
    /// --prefetch`), in place of the node's own `cache.prefetch`; a CSI volume attribute
    /// overrides it. Parsed strictly: a malformed value makes the whole index malformed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefetch: Option<crate::config::PrefetchPolicy>,
}

/// The hash of a lazy index's chunk digests, decided by the index's version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkAlgorithm {
    /// Version 1.
    Sha256,
    /// Version 2: BLAKE3-256, about three times as fast as sha256 with SHA-NI here
    /// (docs/benchmarks.md), and nydus's default chunk digester.
    Blake3,
}

impl ChunkAlgorithm {
    /// The algorithm of an index of `version`, if this build reads that version.
    pub fn for_version(version: u32) -> Option<Self> {
        match version {
            1 => Some(Self::Sha256),
            2 => Some(Self::Blake3),
            _ => None,
        }
    }

    /// The name that prefixes its digests.
    pub fn name(self) -> &'static str {
        match self {
            Self::Sha256 => "sha256",
            Self::Blake3 => "blake3",
        }
    }

    /// The digest of `data`.
    pub fn digest(self, data: &[u8]) -> ChunkDigest {
        let bytes = match self {
            Self::Sha256 => sha2::Sha256::digest(data).into(),
            Self::Blake3 => *blake3::hash(data).as_bytes(),
        };
        ChunkDigest { algorithm: self, bytes }
    }

    /// An incremental hasher.
    pub fn hasher(self) -> ChunkHasher {
        match self {
            Self::Sha256 => ChunkHasher::Sha256(sha2::Sha256::new()),
            Self::Blake3 => ChunkHasher::Blake3(Box::default()),
        }
    }
}

fn readable_versions() -> String {
    READABLE_VERSIONS.map(|v| v.to_string()).join(" and ")
}

/// Why a string is not a chunk digest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkDigestError {
    /// An algorithm this build does not know.
    #[error("chunk digest {0:?} has an unknown algorithm (known: sha256, blake3)")]
    Algorithm(String),
    /// Not 64 lower-case hex digits after the algorithm.
    #[error("chunk digest {0:?} is not of the form <algorithm>:<64 lower-case hex digits>")]
    Malformed(String),
}

/// One chunk's digest: its algorithm and all 256 bits.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ChunkDigest {
    algorithm: ChunkAlgorithm,
    bytes: [u8; 32],
}

impl ChunkDigest {
    /// The hash it was made with.
    pub fn algorithm(&self) -> ChunkAlgorithm {
        self.algorithm
    }
}

/// At most this much of a hostile string goes into an error message.
const SHOWN_CHARS: usize = 80;

fn shown(s: &str) -> String {
    match s.char_indices().nth(SHOWN_CHARS) {
        Some((end, _)) => format!("{}...", &s[..end]),
        None => s.to_owned(),
    }
}

impl FromStr for ChunkDigest {
    type Err = ChunkDigestError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let malformed = || ChunkDigestError::Malformed(shown(s));
        let (name, hex_part) = s.split_once(':').ok_or_else(malformed)?;
        let algorithm = match name {
            "sha256" => ChunkAlgorithm::Sha256,
            "blake3" => ChunkAlgorithm::Blake3,
            _ => return Err(ChunkDigestError::Algorithm(shown(s))),
        };
        if hex_part.len() != 64 || !hex_part.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(malformed());
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(hex_part, &mut bytes).map_err(|_| malformed())?;
        Ok(Self { algorithm, bytes })
    }
}

impl fmt::Display for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), hex::encode(self.bytes))
    }
}

impl fmt::Debug for ChunkDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// Incremental hashing of one chunk.
#[derive(Debug, Clone)]
pub enum ChunkHasher {
    /// See [`ChunkAlgorithm::Sha256`].
    Sha256(sha2::Sha256),
    /// See [`ChunkAlgorithm::Blake3`].
    Blake3(Box<blake3::Hasher>),
}

impl ChunkHasher {
    /// Feeds more bytes.
    pub fn update(&mut self, data: &[u8]) {
        match self {
            Self::Sha256(h) => h.update(data),
            Self::Blake3(h) => {
                h.update(data);
            }
        }
    }

    /// The digest of everything fed.
    pub fn finish(self) -> ChunkDigest {
        match self {
            Self::Sha256(h) => ChunkDigest { algorithm: ChunkAlgorithm::Sha256, bytes: h.finalize().into() },
            Self::Blake3(h) => ChunkDigest { algorithm: ChunkAlgorithm::Blake3, bytes: *h.finalize().as_bytes() },
        }
    }
}

/// Chunk digests of one blob, validated: all of one algorithm.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkDigests {
    /// Bytes per chunk.
    pub chunk_size: u64,
    /// The hash of every digest.
    pub algorithm: ChunkAlgorithm,
    /// One digest per chunk.
    digests: Vec<[u8; 32]>,
}

impl ChunkDigests {
    /// The digests of `data` in pieces of `chunk_size` bytes.
    #[cfg(test)]
    pub fn of(algorithm: ChunkAlgorithm, chunk_size: u64, data: &[u8]) -> Self {
        let digests = data.chunks(chunk_size as usize).map(|c| algorithm.digest(c).bytes).collect();
        Self { chunk_size, algorithm, digests }
    }

    /// How many chunks are listed.
    pub fn len(&self) -> usize {
        self.digests.len()
    }

    /// Whether none is (an empty blob).
    pub fn is_empty(&self) -> bool {
        self.digests.is_empty()
    }

    /// Checks `data`, read at byte `offset` of the blob, piece by piece against the
    /// listed digests; says what is wrong.
    pub fn check(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        if offset % self.chunk_size != 0 {
            return Err(format!("offset {offset} is not at a {}-byte piece boundary", self.chunk_size));
        }
        let first = offset / self.chunk_size;
        for (i, piece) in data.chunks(self.chunk_size as usize).enumerate() {
            let n = first + i as u64;
            match usize::try_from(n).ok().and_then(|n| self.digests.get(n)) {
                Some(want) if *want == self.algorithm.digest(piece).bytes => {}
                Some(_) => {
                    return Err(format!(
                        "piece {n} does not match its {} digest from the lazy index",
                        self.algorithm.name()
                    ))
                }
                None => return Err(format!("piece {n} is beyond the lazy index")),
            }
        }
        Ok(())
    }
}

/// A parsed, checked index.
#[derive(Debug, Clone)]
pub struct VerifiedIndex {
    /// The sha256 of the JSON it was parsed from: the index's identity, under which its
    /// readers vouch for the chunks its digests checked.
    pub digest: Digest,
    /// The raw form.
    pub index: LazyIndex,
    /// The source manifest digest.
    pub manifest_digest: Digest,
    /// The parsed source manifest.
    pub artifact: ModelArtifact,
    /// Chunk digests per layer, in layer order.
    pub chunks: Vec<ChunkDigests>,
}

fn blob_err(index: usize, digest: &str, reason: impl Into<String>) -> IndexError {
    IndexError::Blob { index, digest: digest.to_owned(), reason: reason.into() }
}

impl LazyIndex {
    /// Deterministic JSON: the same model gives the same bytes.
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("index serializes")
    }

    /// The hash of this index's chunk digests, which its version decides.
    pub fn chunk_algorithm(&self) -> Result<ChunkAlgorithm, IndexError> {
        ChunkAlgorithm::for_version(self.version).ok_or(IndexError::Version(self.version))
    }

    /// Parses and checks an index: version, manifest and config digests, one blob per
    /// layer with matching digest and size, chunk counts that fit the sizes.
    pub fn parse(bytes: &[u8]) -> Result<VerifiedIndex, IndexError> {
        if bytes.len() as u64 > MAX_INDEX_BYTES {
            return Err(IndexError::Malformed(format!(
                "{} bytes exceeds the {MAX_INDEX_BYTES}-byte limit",
                bytes.len()
            )));
        }
        let index: LazyIndex = serde_json::from_slice(bytes).map_err(|e| IndexError::Malformed(e.to_string()))?;
        let algorithm = index.chunk_algorithm()?;
        let manifest_digest: Digest = index
            .source
            .manifest_digest
            .parse()
            .map_err(|e: super::digest::DigestError| IndexError::Malformed(e.to_string()))?;
        if Digest::of(index.manifest.as_bytes()) != manifest_digest {
            return Err(IndexError::ManifestDigest(manifest_digest));
        }
        let artifact = manifest::parse_manifest(index.manifest.as_bytes())?;
        if Digest::of(index.config.as_bytes()) != artifact.config.digest {
            return Err(IndexError::ConfigDigest(artifact.config.digest));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&index.chunk_size) {
            return Err(IndexError::ChunkSize(index.chunk_size));
        }
        if index.blobs.len() != artifact.layers.len() {
            return Err(IndexError::Malformed(format!(
                "{} blobs for {} manifest layers",
                index.blobs.len(),
                artifact.layers.len()
            )));
        }
        let mut chunks = Vec::with_capacity(index.blobs.len());
        for (i, (blob, layer)) in index.blobs.iter().zip(&artifact.layers).enumerate() {
            if blob.digest != layer.digest.to_string() || blob.size != layer.size {
                return Err(blob_err(
                    i,
                    &blob.digest,
                    format!("does not match manifest layer {} of {} bytes", layer.digest, layer.size),
                ));
            }
            let expected = blob.size.div_ceil(index.chunk_size);
            if blob.chunks.len() as u64 != expected {
                return Err(blob_err(
                    i,
                    &blob.digest,
                    format!("has {} chunk digests, {expected} expected", blob.chunks.len()),
                ));
            }
            let mut digests = Vec::with_capacity(blob.chunks.len());
            for (n, chunk) in blob.chunks.iter().enumerate() {
                let parsed: ChunkDigest =
                    chunk.parse().map_err(|e| blob_err(i, &blob.digest, format!("chunk {n}: {e}")))?;
                if parsed.algorithm != algorithm {
                    return Err(blob_err(
                        i,
                        &blob.digest,
                        format!(
                            "chunk {n} has a {} digest, but every chunk digest of a version {} index is {}",
                            parsed.algorithm.name(),
                            index.version,
                            algorithm.name()
                        ),
                    ));
                }
                digests.push(parsed.bytes);
            }
            chunks.push(ChunkDigests { chunk_size: index.chunk_size, algorithm, digests });
        }
        Ok(VerifiedIndex { digest: Digest::of(bytes), index, manifest_digest, artifact, chunks })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DATA: [u8; 10_000] = [7u8; 10_000];

    /// An index of one 10,000-byte layer in 4096-byte chunks, of `version`.
    fn sample_of(version: u32) -> LazyIndex {
        let algorithm = ChunkAlgorithm::for_version(version).unwrap();
        let data = &DATA[..];
        let config = r#"{"modelfs":{"type":"layers","diffIds":[]}}"#.to_owned();
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "artifactType": "application/vnd.cncf.model.manifest.v1+json",
            "config": {"mediaType": "application/vnd.cncf.model.config.v1+json", "digest": Digest::of(config.as_bytes()).to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.cncf.model.weight.v1.raw", "digest": Digest::of(data).to_string(), "size": data.len(),
                        "annotations": {"org.cncf.model.filepath": "w.bin"}}],
        })
        .to_string();
        LazyIndex {
            version,
            source: IndexSource {
                reference: "r/m@x".into(),
                manifest_digest: Digest::of(manifest.as_bytes()).to_string(),
            },
            manifest,
            config,
            chunk_size: 4096,
            blobs: vec![IndexBlob {
                digest: Digest::of(data).to_string(),
                size: data.len() as u64,
                chunks: data.chunks(4096).map(|c| algorithm.digest(c).to_string()).collect(),
            }],
            files: vec![IndexFile {
                path: "w.bin".into(),
                kind: "file".into(),
                mode: 0o444,
                size: 10_000,
                layer: Some(0),
                offset: 0,
                target: None,
            }],
            prefetch: None,
        }
    }

    fn sample() -> LazyIndex {
        sample_of(INDEX_VERSION)
    }

    /// The reason a blob error gives, or a failure naming what was returned instead.
    fn blob_reason(index: &LazyIndex) -> String {
        match LazyIndex::parse(&index.to_json()) {
            Err(IndexError::Blob { index: 0, reason, .. }) => reason,
            other => panic!("expected a blob error, got {other:?}"),
        }
    }

    #[test]
    fn round_trips() {
        assert_eq!(ChunkAlgorithm::for_version(INDEX_VERSION), Some(INDEX_ALGORITHM));
        let index = sample();
        assert!(index.blobs[0].chunks.iter().all(|c| c.starts_with("blake3:") && c.len() == 7 + 64));
        let verified = LazyIndex::parse(&index.to_json()).unwrap();
        assert_eq!(verified.index, index);
        assert_eq!(verified.chunks[0].len(), 3);
        assert_eq!(verified.chunks[0].algorithm, ChunkAlgorithm::Blake3);
        assert_eq!(verified.artifact.layers.len(), 1);
    }

    #[test]
    fn blake3_digests_are_the_reference_values() {
        // The BLAKE3 paper's test vector for the empty input.
        assert_eq!(
            ChunkAlgorithm::Blake3.digest(b"").to_string(),
            "blake3:af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262"
        );
        let mut h = ChunkAlgorithm::Blake3.hasher();
        h.update(&DATA[..5000]);
        h.update(&DATA[5000..]);
        assert_eq!(h.finish(), ChunkAlgorithm::Blake3.digest(&DATA));
        let mut h = ChunkAlgorithm::Sha256.hasher();
        h.update(b"hel");
        h.update(b"lo");
        assert_eq!(h.finish().to_string(), format!("sha256:{}", Digest::of(b"hello").hex()));
    }

    #[test]
    fn checks_every_piece_with_the_index_algorithm() {
        for version in READABLE_VERSIONS {
            let verified = LazyIndex::parse(&sample_of(version).to_json()).unwrap();
            let chunks = &verified.chunks[0];
            assert_eq!(Some(chunks.algorithm), ChunkAlgorithm::for_version(version));
            assert_eq!(chunks.check(0, &DATA), Ok(()), "version {version}");
            assert_eq!(chunks.check(8192, &DATA[8192..]), Ok(()));
            let mut forged = DATA;
            forged[5000] ^= 1;
            let err = chunks.check(0, &forged).unwrap_err();
            assert!(err.contains("piece 1 does not match") && err.contains(chunks.algorithm.name()), "{err}");
            assert!(chunks.check(4096, &DATA[4096..8000]).is_err(), "a truncated piece");
            assert!(chunks.check(8192, &DATA[..4096]).is_err(), "a shorter last piece");
            assert!(chunks.check(12288, &DATA[..10]).unwrap_err().contains("beyond"));
            assert!(chunks.check(100, &DATA[100..200]).unwrap_err().contains("boundary"));
        }
        // A version 1 index is checked with sha256: BLAKE3 digests of the right bytes do
        // not pass as its digests, nor the other way round.
        let mut v1 = sample_of(1);
        v1.blobs[0].chunks = sample_of(2).blobs[0].chunks.clone();
        assert!(blob_reason(&v1).contains("every chunk digest of a version 1 index is sha256"));
    }

    #[test]
    fn refuses_chunk_digests_of_another_or_an_unknown_algorithm() {
        let hex = "ab".repeat(32);
        // Mixing: one sha256 digest among the BLAKE3 ones of a version 2 index.
        let mut i = sample();
        i.blobs[0].chunks[1] = format!("sha256:{hex}");
        let reason = blob_reason(&i);
        assert!(reason.contains("chunk 1 has a sha256 digest") && reason.contains("version 2"), "{reason}");
        let mut i = sample();
        i.blobs[0].chunks[2] = format!("sha512:{hex}");
        assert!(blob_reason(&i).contains("unknown algorithm"), "{}", blob_reason(&i));
        for bad in [
            format!("blake3:{}", &hex[..62]),
            format!("blake3:{hex}00"),
            format!("blake3:{}", hex.to_uppercase()),
            hex.clone(),
            "blake3:".to_owned(),
            format!("blake3:{}", "é".repeat(32)),
        ] {
            let mut i = sample();
            i.blobs[0].chunks[0] = bad.clone();
            let reason = blob_reason(&i);
            assert!(
                reason.starts_with("chunk 0: chunk digest") && reason.contains("64 lower-case hex"),
                "{bad}: {reason}"
            );
        }
        // A long hostile string is not repeated whole.
        let mut i = sample();
        i.blobs[0].chunks[0] = format!("blake3:{}", "0".repeat(10_000));
        assert!(blob_reason(&i).len() < 300);
    }

    #[test]
    fn refuses_inconsistent_indexes() {
        let mut i = sample();
        i.version = 3;
        let err = LazyIndex::parse(&i.to_json()).unwrap_err();
        assert!(matches!(err, IndexError::Version(3)));
        assert!(err.to_string().contains("reads versions 1 and 2"), "{err}");
        let mut i = sample();
        i.version = 0;
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::Version(0))));
        let mut i = sample();
        i.manifest.push(' ');
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::ManifestDigest(_))));
        let mut i = sample();
        i.config.push(' ');
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::ConfigDigest(_))));
        let mut i = sample();
        i.blobs[0].chunks.pop();
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::Blob { .. })));
        let mut i = sample();
        i.blobs[0].size += 1;
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::Blob { .. })));
        let mut i = sample();
        i.chunk_size = 1;
        assert!(matches!(LazyIndex::parse(&i.to_json()), Err(IndexError::ChunkSize(1))));
        assert!(matches!(LazyIndex::parse(b"{\"version\":1}"), Err(IndexError::Malformed(_))));
    }

    #[test]
    fn carries_a_prefetch_policy_or_none() {
        use crate::config::PrefetchPolicy;
        let json = String::from_utf8(sample().to_json()).unwrap();
        assert!(!json.contains("prefetch"), "absent unless set: {json}");
        let mut i = sample();
        i.prefetch = Some(PrefetchPolicy::Head(64 << 20));
        let json = String::from_utf8(i.to_json()).unwrap();
        assert!(json.contains(r#""prefetch":"head:64MiB""#), "{json}");
        assert_eq!(LazyIndex::parse(json.as_bytes()).unwrap().index.prefetch, Some(PrefetchPolicy::Head(64 << 20)));
        let bad = json.replace("head:64MiB", "head:lots");
        let e = LazyIndex::parse(bad.as_bytes()).unwrap_err();
        assert!(matches!(e, IndexError::Malformed(_)) && e.to_string().contains(r#""head:lots""#), "{e}");
    }
}
