//! Reading companion images (see [`crate::convert`]): finding the lazy index layer of a
//! companion reference and loading the index from it, with the cache as a fallback so
//! that a model served before is served again while its registry is unreachable.
//!
//! A plain ModelPack reference finds its companion among the referrers of its manifest
//! ([`discover`]): the registry's referrers API, else the referrers tag `convert`
//! maintains. A referrer is untrusted — anyone who can push to the repository can list
//! one — so a candidate counts only when its index layer lies in the model's own
//! repository, its index verifies, and the index's source is this very manifest in this
//! very repository (so chunk digests are checked against bytes of the registry the user
//! named, never of one the referrer names). Each look-up is bounded in candidates.

use std::io::Read;

use bytes::Bytes;

use futures_util::StreamExt;

use crate::cache::ChunkCache;
use crate::config::RegistrySettings;
use crate::modelpack::digest::Hasher;
use crate::modelpack::index::{LazyIndex, VerifiedIndex, INDEX_PATH, MAX_INDEX_BYTES};
use crate::modelpack::labels::{self, Pinned};
use crate::modelpack::media;
use crate::modelpack::Digest;
use crate::registry::{parse_reference, Registry, RegistryError};

/// Why a companion's index could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum CompanionError {
    /// The registry failed.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The companion or its index is malformed.
    #[error("lazy index {at}: {detail}")]
    Invalid { at: String, detail: String },
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] crate::cache::CacheError),
}

/// Most referrers of one manifest whose manifests are fetched when looking for its
/// companion: a companion lists as three (its index and two platform manifests), and
/// anything else costs a small manifest request before it is ruled out.
pub const MAX_REFERRER_CANDIDATES: usize = 16;
/// Most lazy indexes loaded when looking for a companion among referrers: each may be
/// up to [`MAX_INDEX_BYTES`].
pub const MAX_REFERRER_INDEXES: usize = 4;

fn invalid(at: &str, detail: impl Into<String>) -> CompanionError {
    CompanionError::Invalid { at: at.to_owned(), detail: detail.into() }
}

/// Cache record of an index JSON, by the JSON's digest.
pub fn index_key(digest: &Digest) -> String {
    format!("lazy-index:{digest}")
}

/// Cache record naming the index JSON digest of an index layer.
fn layer_key(digest: &Digest) -> String {
    format!("lazy-index-layer:{digest}")
}

/// Cache record of an index layer's blob (its tar), by the blob's digest.
fn layer_blob_key(digest: &Digest) -> String {
    format!("lazy-index-layer-blob:{digest}")
}

/// This machine's OCI architecture name.
pub fn oci_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// The index layer of a companion image, as its manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexLayer {
    /// The layer blob's digest (its diff ID too: the layer is an uncompressed tar).
    pub digest: Digest,
    /// The layer blob's size.
    pub size: u64,
    /// Where the layer is, pinned (`registry/repo@sha256:...`), from its annotation.
    pub location: String,
    /// The TOC digest its annotation declares (the digest of the index JSON), if any.
    pub toc: Option<Digest>,
    /// Both TOC annotations were set: containers/image refuses such a layer.
    pub toc_conflict: bool,
}

/// If `manifest` (fetched through `registry`) is a companion image or an index of them,
/// its lazy index layer as the manifest (this machine's platform, else the first)
/// describes it. Nothing here is trusted yet: the caller checks the layer's bytes.
pub async fn index_layer(registry: &Registry, manifest: &[u8]) -> Result<Option<IndexLayer>, RegistryError> {
    let Ok(value) = serde_json::from_slice::<serde_json::Value>(manifest) else { return Ok(None) };
    let is_index = value["mediaType"] == media::OCI_INDEX || value["manifests"].is_array();
    let image = if is_index {
        let entries = value["manifests"].as_array().cloned().unwrap_or_default();
        let pick = entries
            .iter()
            .find(|e| e["platform"]["architecture"] == oci_arch() && e["platform"]["os"] == "linux")
            .or_else(|| entries.first());
        let Some(digest) = pick.and_then(|e| e["digest"].as_str()) else { return Ok(None) };
        let (bytes, _) =
            registry.with_reference(registry.reference().clone_with_digest(digest.to_owned())).fetch_manifest().await?;
        match serde_json::from_slice::<serde_json::Value>(&bytes) {
            Ok(v) => v,
            Err(_) => return Ok(None),
        }
    } else {
        value
    };
    let layer = &image["layers"][0];
    let annotations = &layer["annotations"];
    let Some(location) = annotations[labels::INDEX].as_str() else { return Ok(None) };
    let (Some(digest), Some(size)) = (layer["digest"].as_str().and_then(|d| d.parse().ok()), layer["size"].as_u64())
    else {
        return Ok(None);
    };
    let toc_of = |key: &str| annotations[key].as_str().and_then(|d| d.parse::<Digest>().ok());
    let (stargz, chunked) = (toc_of(labels::TOC_DIGEST), toc_of(labels::ZSTD_CHUNKED_TOC_DIGEST));
    Ok(Some(IndexLayer {
        digest,
        size,
        location: location.to_owned(),
        toc_conflict: stargz.is_some() && chunked.is_some(),
        toc: stargz.or(chunked),
    }))
}

/// If `manifest` (fetched through `registry`) is a companion image or an index of them,
/// the pinned location of its lazy index layer (`registry/repo@sha256:...`).
pub async fn index_location(registry: &Registry, manifest: &[u8]) -> Result<Option<String>, RegistryError> {
    Ok(index_layer(registry, manifest).await?.map(|layer| layer.location))
}

/// The index in the layer at `at` (pinned), and the digest of its JSON: from the cache,
/// else fetched whole (digest-checked, size-capped), unpacked from its tar and cached.
pub async fn load_index(
    at: &str,
    layer: &Digest,
    cache: &ChunkCache,
    settings: &RegistrySettings,
) -> Result<(VerifiedIndex, Digest), CompanionError> {
    let cache_err = |e: crate::cache::CacheError| invalid(at, e.to_string());
    if let Some(named) = cache.get_meta(&layer_key(layer)).map_err(cache_err)? {
        let json_digest = std::str::from_utf8(&named).ok().and_then(|s| s.parse::<Digest>().ok());
        if let Some(json_digest) = json_digest {
            if let Some(index) = cached_index(cache, &json_digest).map_err(|e| invalid(at, e))? {
                return Ok((index, json_digest));
            }
        }
    }
    let data = fetch_layer(at, layer, settings).await?;
    let index = keep_layer_index(at, layer, &data, cache)?;
    let json_digest = index.digest;
    Ok((index, json_digest))
}

/// The index layer at `at` (pinned), its tar bytes, and the index in it: from the
/// cache, else fetched whole (digest-checked, size-capped) and cached. For front-ends
/// that hand the layer itself out (the layer store's `blob`).
pub async fn load_index_layer(
    at: &str,
    layer: &Digest,
    cache: &ChunkCache,
    settings: &RegistrySettings,
) -> Result<(VerifiedIndex, Bytes), CompanionError> {
    let cache_err = |e: crate::cache::CacheError| invalid(at, e.to_string());
    let data = match cache.get_meta(&layer_blob_key(layer)).map_err(cache_err)? {
        Some(data) if Digest::of(&data) == *layer => Bytes::from(data),
        _ => {
            let data = fetch_layer(at, layer, settings).await?;
            cache.put_meta(&layer_blob_key(layer), &data).map_err(cache_err)?;
            data
        }
    };
    Ok((keep_layer_index(at, layer, &data, cache)?, data))
}

/// The index in `data` (the verified blob of index layer `layer`), parsed and kept in
/// the cache with the record naming it.
fn keep_layer_index(
    at: &str,
    layer: &Digest,
    data: &[u8],
    cache: &ChunkCache,
) -> Result<VerifiedIndex, CompanionError> {
    let cache_err = |e: crate::cache::CacheError| invalid(at, e.to_string());
    let json = index_from_tar(data).map_err(|e| invalid(at, e))?;
    let index = LazyIndex::parse(&json).map_err(|e| invalid(at, e.to_string()))?;
    keep_index(cache, &json).map_err(cache_err)?;
    cache.put_meta(&layer_key(layer), index.digest.to_string().as_bytes()).map_err(cache_err)?;
    Ok(index)
}

/// The index layer blob at `at`, fetched whole, size-capped and checked against `layer`.
async fn fetch_layer(at: &str, layer: &Digest, settings: &RegistrySettings) -> Result<Bytes, CompanionError> {
    let registry = Registry::new(parse_reference(at)?, settings.clone());
    let mut stream = registry.stream_blob(layer, 0).await?;
    let mut data = Vec::new();
    let mut hasher = Hasher::default();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| invalid(at, format!("download: {e}")))?;
        if (data.len() + piece.len()) as u64 > MAX_INDEX_BYTES {
            return Err(invalid(at, format!("index layer exceeds {MAX_INDEX_BYTES} bytes")));
        }
        hasher.update(&piece);
        data.extend_from_slice(&piece);
    }
    if hasher.finish() != *layer {
        return Err(invalid(at, "index layer does not match its digest"));
    }
    Ok(Bytes::from(data))
}

/// A cached index JSON by its digest, checked and parsed.
pub fn cached_index(cache: &ChunkCache, json_digest: &Digest) -> Result<Option<VerifiedIndex>, String> {
    match cache.get_meta(&index_key(json_digest)).map_err(|e| e.to_string())? {
        Some(json) if Digest::of(&json) == *json_digest => LazyIndex::parse(&json).map(Some).map_err(|e| e.to_string()),
        _ => Ok(None),
    }
}

/// Keeps an index JSON in the cache, by its digest.
pub fn keep_index(cache: &ChunkCache, json: &[u8]) -> Result<Digest, crate::cache::CacheError> {
    let digest = Digest::of(json);
    cache.put_meta(&index_key(&digest), json)?;
    Ok(digest)
}

/// The index file inside a companion layer's tar.
pub fn index_from_tar(layer: &[u8]) -> Result<Vec<u8>, String> {
    let mut archive = tar::Archive::new(layer);
    for entry in archive.entries().map_err(|e| format!("index layer is not a tar: {e}"))? {
        let entry = entry.map_err(|e| format!("index layer is not a tar: {e}"))?;
        let path = entry.path_bytes().into_owned();
        if path == INDEX_PATH.as_bytes() || path.strip_prefix(b"./") == Some(INDEX_PATH.as_bytes()) {
            let mut json = Vec::new();
            entry.take(MAX_INDEX_BYTES).read_to_end(&mut json).map_err(|e| format!("reading {INDEX_PATH}: {e}"))?;
            return Ok(json);
        }
    }
    Err(format!("index layer holds no {INDEX_PATH}"))
}

/// Cache record naming the index layer found among the referrers of a manifest, by the
/// manifest's digest.
fn referred_key(manifest: &Digest) -> String {
    format!("referrer-index-for:{manifest}")
}

/// A companion found among the referrers of a plain artifact's manifest, whose index
/// describes that manifest in that repository.
#[derive(Debug, Clone)]
pub struct Discovered {
    /// Where its index layer is, pinned (`registry/repo@sha256:...`).
    pub location: String,
    /// The index, parsed and checked.
    pub index: VerifiedIndex,
}

/// Why `index` may not vouch for the plain artifact `manifest_digest` of `source`'s
/// repository, if it may not: its source must be that manifest, in that repository of
/// that registry, and its pieces must divide `chunk_size`.
pub fn check_source(
    index: &VerifiedIndex,
    source: &oci_client::Reference,
    manifest_digest: &Digest,
    chunk_size: u64,
) -> Result<(), String> {
    if index.manifest_digest != *manifest_digest {
        return Err(format!("its index describes manifest {}, not {manifest_digest}", index.manifest_digest));
    }
    let named = &index.index.source.reference;
    let named_ref = parse_reference(named).map_err(|e| format!("its index names source {named:?}: {e}"))?;
    if !same_repository(&named_ref, source) {
        return Err(format!("its index names source {named}, outside {}", repository_of(source)));
    }
    if named_ref.digest() != Some(manifest_digest.to_string().as_str()) {
        return Err(format!("its index names source {named}, not pinned to {manifest_digest}"));
    }
    if let Some(pieces) = index.chunks.first() {
        if !crate::blob::BlobStore::check_digests(chunk_size, pieces.chunk_size) {
            return Err(format!(
                "its {}-byte chunk digests cannot check chunks of the configured {chunk_size} bytes",
                pieces.chunk_size
            ));
        }
    }
    Ok(())
}

fn same_repository(a: &oci_client::Reference, b: &oci_client::Reference) -> bool {
    a.resolve_registry() == b.resolve_registry() && a.repository() == b.repository()
}

fn repository_of(r: &oci_client::Reference) -> String {
    format!("{}/{}", r.registry(), r.repository())
}

/// Looks for a companion among the referrers of `manifest_digest`, a plain artifact's
/// manifest in `registry`'s repository, and remembers the one found in `cache` (see
/// [`discovered_before`]). `Ok(None)` when no referrer is a usable companion; referrers
/// that are not companions, or whose index does not describe this manifest here, are
/// skipped with a warning. An error says the registry could not list the referrers.
pub async fn discover(
    registry: &Registry,
    manifest_digest: &Digest,
    cache: &ChunkCache,
    settings: &RegistrySettings,
    chunk_size: u64,
) -> Result<Option<Discovered>, CompanionError> {
    let list = registry.referrers(manifest_digest).await?;
    let source = registry.reference();
    let mut tried_layers: Vec<Digest> = Vec::new();
    for (examined, referrer) in list.referrers().iter().filter(|r| r.may_be_companion()).enumerate() {
        if examined == MAX_REFERRER_CANDIDATES || tried_layers.len() == MAX_REFERRER_INDEXES {
            tracing::warn!(
                manifest = %manifest_digest,
                listed = list.len(),
                "stopped looking for a lazy index among the referrers: too many candidates"
            );
            break;
        }
        let skip = |reason: &str| {
            tracing::warn!(manifest = %manifest_digest, referrer = %referrer.digest, reason, "ignoring a referrer");
        };
        let candidate = registry.with_reference(source.clone_with_digest(referrer.digest.to_string()));
        let manifest = match candidate.fetch_manifest().await {
            Ok((bytes, _)) => bytes,
            Err(e) => {
                skip(&format!("fetching it: {e}"));
                continue;
            }
        };
        let layer = match index_layer(&candidate, &manifest).await {
            Ok(Some(layer)) => layer,
            Ok(None) => {
                tracing::debug!(manifest = %manifest_digest, referrer = %referrer.digest, "a referrer that is not a companion");
                continue;
            }
            Err(e) => {
                skip(&format!("reading it: {e}"));
                continue;
            }
        };
        if tried_layers.contains(&layer.digest) {
            continue;
        }
        tried_layers.push(layer.digest);
        match Pinned::parse(&layer.location).and_then(|p| {
            let at = parse_reference(&p.reference).map_err(|e| e.to_string())?;
            if p.digest != layer.digest {
                return Err(format!("its index location {} names another layer", layer.location));
            }
            if !same_repository(&at, source) {
                return Err(format!("its index location {} is outside {}", layer.location, repository_of(source)));
            }
            Ok(())
        }) {
            Ok(()) => {}
            Err(reason) => {
                skip(&reason);
                continue;
            }
        }
        let index = match load_index(&layer.location, &layer.digest, cache, settings).await {
            Ok((index, _)) => index,
            Err(e) => {
                skip(&format!("loading its index: {e}"));
                continue;
            }
        };
        if let Err(reason) = check_source(&index, source, manifest_digest, chunk_size) {
            skip(&reason);
            continue;
        }
        cache.put_meta(&referred_key(manifest_digest), layer.location.as_bytes())?;
        tracing::info!(manifest = %manifest_digest, companion = %referrer.digest, index = %index.digest, "found a lazy index among the referrers");
        return Ok(Some(Discovered { location: layer.location, index }));
    }
    Ok(None)
}

/// The companion [`discover`] found for `manifest_digest` before, from the cache (for
/// when the registry is unreachable), checked again as [`discover`] checks it.
pub async fn discovered_before(
    source: &oci_client::Reference,
    manifest_digest: &Digest,
    cache: &ChunkCache,
    settings: &RegistrySettings,
    chunk_size: u64,
) -> Result<Option<Discovered>, CompanionError> {
    let Some(location) = cache.get_meta(&referred_key(manifest_digest))? else { return Ok(None) };
    let location = String::from_utf8(location).map_err(|_| invalid("cache", "a referrer record is not UTF-8"))?;
    let pinned = Pinned::parse(&location).map_err(|e| invalid(&location, e))?;
    let (index, _) = load_index(&location, &pinned.digest, cache, settings).await?;
    check_source(&index, source, manifest_digest, chunk_size).map_err(|e| invalid(&location, e))?;
    Ok(Some(Discovered { location, index }))
}
