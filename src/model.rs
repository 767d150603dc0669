//! A model, opened: the reference resolved to a ModelPack manifest, every layer indexed,
//! and the merged file tree, ready for [`crate::fs`] to serve.
//!
//! Raw and plain tar layers stay remote and are read lazily through
//! [`crate::blob::BlobStore`]. Compressed tar layers have no random access: each is
//! fetched once, verified, and unpacked into the cache, then served from there. What a
//! compressed layer unpacks to is bounded (by the size it declares, else by
//! [`crate::config::FetchSettings::max_unpacked_bytes`]) and checked against the model
//! config's `diffIds` before it is first used and whenever an unpacked copy is reused.
//! Resolved manifests and configs are kept in the cache, so a model opened before opens
//! again while its registry is unreachable. A companion reference (made by `convert`)
//! opens the model its lazy index describes, with every chunk checked against the index.
//! So does a plain reference whose manifest has a companion among its referrers
//! ([`companion::discover`]); without one it is served as it is, or refused when
//! [`crate::config::FetchSettings::require_lazy_index`] is set. [`prefetch`] fetches what a
//! [`crate::config::PrefetchPolicy`] asks of it in the background, while it is served.

mod prefetch;

pub use prefetch::Prefetched;

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use futures_util::StreamExt;
use tokio::runtime::Handle;

use crate::blob::{BlobError, BlobInfo, BlobStore, IndexDigests};
use crate::cache::{CacheError, ChunkCache, UnpackedLease};
use crate::companion;
use crate::config::{PrefetchPolicy, Settings};
use crate::modelpack::digest::Hasher;
use crate::modelpack::index::VerifiedIndex;
use crate::modelpack::labels::Pinned;
use crate::modelpack::manifest::{self, ManifestError, ModelArtifact, ModelLayer};
use crate::modelpack::media::LayerFormat;
use crate::modelpack::select::Selection;
use crate::modelpack::tar_index::{self, TarError, BLOCK_SIZE, MAX_EXTENSION_BYTES};
use crate::modelpack::tree::{Tree, TreeBuilder, TreeError};
use crate::modelpack::Digest;
use crate::registry::{self, Registry, RegistryError};

/// Why a model could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// The registry failed and the cache has no copy.
    #[error(transparent)]
    Registry(#[from] RegistryError),
    /// The manifest or config is not an acceptable ModelPack artifact.
    #[error("{reference}: {source}")]
    Manifest { reference: String, source: ManifestError },
    /// A tar layer is malformed or unsafe.
    #[error("layer {index} ({digest}): {source}")]
    Tar { index: usize, digest: Digest, source: TarError },
    /// Layers do not merge into one tree.
    #[error("{reference}: {source}")]
    Tree { reference: String, source: TreeError },
    /// Reading a layer failed.
    #[error("layer {index} ({digest}): {source}")]
    Layer { index: usize, digest: Digest, source: BlobError },
    /// A compressed layer could not be fetched or unpacked.
    #[error("unpacking layer {index} ({digest}): {detail}")]
    Unpack { index: usize, digest: Digest, detail: String },
    /// A compressed layer unpacks to more bytes than it may: a decompression bomb, or a
    /// layer larger than the configured maximum.
    #[error("unpacking layer {index} ({digest}): it unpacks to more than {limit} bytes, the limit set by {why}")]
    UnpackTooLarge { index: usize, digest: Digest, limit: u64, why: &'static str },
    /// A compressed layer unpacks to other content than the model config's `diffIds` says.
    #[error(
        "unpacking layer {index} ({digest}): the unpacked tar has digest {actual}, but the model config's \
         diffIds lists {expected}"
    )]
    DiffId { index: usize, digest: Digest, actual: Digest, expected: Digest },
    /// The model config lists diffIds, but none for this compressed layer.
    #[error("unpacking layer {index} ({digest}): the model config lists {listed} diffIds, none for this layer")]
    MissingDiffId { index: usize, digest: Digest, listed: usize },
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A companion image's lazy index could not be loaded.
    #[error("{reference}: {detail}")]
    Companion { reference: String, detail: String },
    /// The lazy index's digests cannot check chunks of the configured size.
    #[error("chunk size {chunk_size} is not a multiple of the lazy index's {piece}-byte pieces")]
    ChunkSize { chunk_size: u64, piece: u64 },
    /// A plain artifact has no usable lazy index, and one is required.
    #[error(
        "{reference}: no lazy index found for manifest {manifest} ({detail}), and require_lazy_index is set; \
         publish one with `modelpack-snapshotter convert {reference}`"
    )]
    NoLazyIndex { reference: String, manifest: Digest, detail: String },
}

/// How much of a model the cache holds ([`Model::cache_share`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CacheShare {
    /// Bytes of the blobs the model's files are served from.
    pub bytes: u64,
    /// How many of them are in the cache.
    pub cached: u64,
}

/// Where the bytes of one layer's (uncompressed) content are read from.
#[derive(Debug, Clone)]
pub enum LayerData {
    /// The registry blob itself, read lazily in chunks.
    Remote(BlobInfo),
    /// An unpacked copy of a compressed layer in the cache.
    Local(Arc<File>),
}

/// What `assemble` builds a model from.
struct Parts<'a> {
    reference: &'a str,
    registry: Arc<Registry>,
    artifact: ModelArtifact,
    manifest_digest: Digest,
    offline: bool,
    /// The lazy index's chunk digests, when the model is served from one.
    index: Option<IndexDigests>,
    /// The model config's `diffIds`; empty when it lists none.
    diff_ids: Vec<Digest>,
}

/// An opened model.
#[derive(Debug)]
pub struct Model {
    /// The reference the user gave.
    pub reference: String,
    /// The manifest's digest.
    pub manifest_digest: Digest,
    /// The parsed artifact.
    pub artifact: ModelArtifact,
    /// Every file, merged by path.
    pub tree: Tree,
    /// Per layer, where its bytes come from (same order as `artifact.layers`).
    pub layers: Vec<LayerData>,
    /// The chunked reader for remote layers.
    pub store: Arc<BlobStore>,
    /// True when the manifest came from the cache because the registry was unreachable.
    pub offline: bool,
    /// Which files are served (the others are left out of the tree).
    pub selection: Selection,
    /// The digest of the lazy index every fetched chunk is checked against, when the
    /// model is served from one (a companion, or one found among the referrers).
    pub lazy_index: Option<Digest>,
    /// What of it is fetched in the background once it is served: its lazy index's
    /// `prefetch` when it has one, else the node's `fetch.prefetch`. A front-end may
    /// start another (a CSI volume attribute overrides both).
    pub prefetch: PrefetchPolicy,
    /// The background prefetch, stopped when the model is dropped.
    prefetching: Mutex<Option<prefetch::Prefetching>>,
    /// Holds the unpacked copies of compressed layers while the model lives.
    _unpacked: Vec<UnpackedLease>,
}

fn manifest_key(reference: &str) -> String {
    format!("manifest-for:{reference}")
}

fn blob_key(digest: &Digest) -> String {
    format!("blob:{digest}")
}

impl Model {
    /// Resolves `reference` and indexes every layer. A plain artifact is served from a
    /// lazy index found among its manifest's referrers when there is one. Must run
    /// inside a tokio runtime with blocking threads available (tar indexing blocks on
    /// chunk reads).
    pub async fn open(reference: &str, settings: &Settings, cache: Arc<ChunkCache>) -> Result<Self, ModelError> {
        Self::open_with(reference, settings, cache, true).await
    }

    /// [`Model::open`], without looking for a lazy index among the referrers: the
    /// artifact itself, for `convert`, which reads every blob whole to make the index.
    pub async fn open_artifact(
        reference: &str,
        settings: &Settings,
        cache: Arc<ChunkCache>,
    ) -> Result<Self, ModelError> {
        Self::open_with(reference, settings, cache, false).await
    }

    async fn open_with(
        reference: &str,
        settings: &Settings,
        cache: Arc<ChunkCache>,
        discover: bool,
    ) -> Result<Self, ModelError> {
        let parsed = registry::parse_reference(reference)?;
        // A manifest named by its digest never changes: a cached copy that hashes to it
        // is the manifest, and asking the registry again would only cost a round trip.
        let pinned = parsed.digest().and_then(|d| d.parse::<Digest>().ok());
        let cached = match pinned {
            Some(digest) => cache.get_meta(&manifest_key(reference))?.filter(|bytes| Digest::of(bytes) == digest),
            None => None,
        };
        let registry = Arc::new(Registry::new(parsed, settings.registry.clone()));
        let fetched = match (cached, pinned) {
            (Some(bytes), Some(digest)) => Ok((false, bytes, digest)),
            _ => registry.fetch_manifest().await.map(|(bytes, digest)| (true, bytes.to_vec(), digest)),
        };
        let (manifest_bytes, manifest_digest, offline) = match fetched {
            Ok((fresh, bytes, digest)) => {
                if fresh {
                    cache.put_meta(&manifest_key(reference), &bytes)?;
                }
                (bytes, digest, false)
            }
            Err(e @ (RegistryError::Exhausted { .. } | RegistryError::Invalid { .. })) => {
                // A reference by digest takes only the manifest that digest names.
                let cached = cache.get_meta(&manifest_key(reference))?;
                match cached.filter(|bytes| pinned.is_none_or(|digest| Digest::of(bytes) == digest)) {
                    Some(bytes) => {
                        tracing::warn!(reference, error = %e, "registry unreachable; using the cached manifest");
                        let digest = Digest::of(&bytes);
                        (bytes, digest, true)
                    }
                    None => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        };
        if let Some(at) = companion_of(reference, &registry, &cache, &manifest_bytes, offline).await? {
            let pinned = Pinned::parse(&at).map_err(|reason| ModelError::Companion {
                reference: reference.to_owned(),
                detail: format!("index location {at:?}: {reason}"),
            })?;
            let (index, _) = companion::load_index(&at, &pinned.digest, &cache, &settings.registry)
                .await
                .map_err(|e| ModelError::Companion { reference: reference.to_owned(), detail: e.to_string() })?;
            tracing::info!(reference, source = %index.index.source.reference, "serving the model of a companion image");
            return Self::open_indexed(index, settings, cache).await;
        }
        let manifest_err = |source| ModelError::Manifest { reference: reference.to_owned(), source };
        let artifact = manifest::parse_manifest(&manifest_bytes).map_err(manifest_err)?;
        if discover {
            match referred_index(&registry, &cache, settings, &manifest_digest, offline, pinned.is_some()).await {
                Ok(Some(found)) => {
                    tracing::info!(reference, index = %found.index.digest, "serving the model through the lazy index of its companion");
                    let mut model = Self::open_indexed(found.index, settings, cache).await?;
                    model.reference = reference.to_owned();
                    model.offline = offline;
                    return Ok(model);
                }
                Ok(None) if settings.fetch.require_lazy_index => {
                    let detail = if offline {
                        "the registry is unreachable and none was found before".to_owned()
                    } else {
                        "no referrer of the manifest is a companion of it".to_owned()
                    };
                    return Err(ModelError::NoLazyIndex {
                        reference: reference.to_owned(),
                        manifest: manifest_digest,
                        detail,
                    });
                }
                Ok(None) => {}
                Err(e) if settings.fetch.require_lazy_index => {
                    return Err(ModelError::NoLazyIndex {
                        reference: reference.to_owned(),
                        manifest: manifest_digest,
                        detail: e.to_string(),
                    });
                }
                Err(e) => {
                    tracing::warn!(reference, error = %e, "cannot look for a lazy index among the referrers; serving the artifact without one");
                }
            }
        }
        let config = fetch_config(&registry, &cache, &artifact).await?;
        let diff_ids = manifest::parse_config(&config).map_err(manifest_err)?.diff_ids;
        let parts = Parts { reference, registry, artifact, manifest_digest, offline, index: None, diff_ids };
        Self::assemble(parts, settings, cache).await
    }

    /// Opens the model a lazy index describes: manifest and config come from the
    /// (verified) index, bytes from the source repository, and every fetched chunk is
    /// checked against the index's digests.
    pub async fn open_indexed(
        index: VerifiedIndex,
        settings: &Settings,
        cache: Arc<ChunkCache>,
    ) -> Result<Self, ModelError> {
        let reference = index.index.source.reference.clone();
        let prefetch = index.index.prefetch;
        let registry = Arc::new(Registry::new(registry::parse_reference(&reference)?, settings.registry.clone()));
        let manifest_err = |source| ModelError::Manifest { reference: reference.clone(), source };
        let diff_ids = manifest::parse_config(index.index.config.as_bytes()).map_err(manifest_err)?.diff_ids;
        let mut chunks = HashMap::new();
        for (layer, pieces) in index.artifact.layers.iter().zip(index.chunks) {
            if !BlobStore::check_digests(settings.fetch.chunk_size, pieces.chunk_size) {
                return Err(ModelError::ChunkSize { chunk_size: settings.fetch.chunk_size, piece: pieces.chunk_size });
            }
            chunks.insert(layer.digest, pieces);
        }
        let parts = Parts {
            reference: &reference,
            registry,
            artifact: index.artifact,
            manifest_digest: index.manifest_digest,
            offline: false,
            index: Some(IndexDigests { index: index.digest, chunks }),
            diff_ids,
        };
        let mut model = Self::assemble(parts, settings, cache).await?;
        model.lazy_index = Some(index.digest);
        model.prefetch = prefetch.unwrap_or(model.prefetch);
        Ok(model)
    }

    async fn assemble(parts: Parts<'_>, settings: &Settings, cache: Arc<ChunkCache>) -> Result<Self, ModelError> {
        let Parts { reference, registry, artifact, manifest_digest, offline, index, diff_ids } = parts;
        cache.bind_chunk_size(settings.fetch.chunk_size)?;
        let store = BlobStore::new(registry.clone(), cache.clone(), settings.fetch.clone(), index);
        let mut builder = TreeBuilder::new(SystemTime::UNIX_EPOCH);
        let mut layers = Vec::with_capacity(artifact.layers.len());
        let mut leases = Vec::new();
        for layer in &artifact.layers {
            let blob = BlobInfo { digest: layer.digest, size: layer.size };
            if !settings.selection.keeps(layer) {
                // Left out of the tree, so never read; kept in place to keep indices.
                layers.push(LayerData::Remote(blob));
                continue;
            }
            let tree_err = |source| ModelError::Tree { reference: reference.to_owned(), source };
            match layer.media_type.format {
                LayerFormat::Raw => {
                    builder.add_raw_layer(layer).map_err(tree_err)?;
                    store.verify_cached(&blob);
                    layers.push(LayerData::Remote(blob));
                }
                LayerFormat::Tar => {
                    let reader = BlobCursor { store: store.clone(), blob, pos: 0, handle: Handle::current() };
                    let (index, digest) = (layer.index, layer.digest);
                    let entries = tokio::task::spawn_blocking(move || tar_index::index_tar(reader, blob.size))
                        .await
                        .map_err(|e| ModelError::Unpack { index, digest, detail: e.to_string() })?
                        .map_err(|source| ModelError::Tar { index, digest, source })?;
                    builder.add_tar_layer(layer, &entries).map_err(tree_err)?;
                    layers.push(LayerData::Remote(blob));
                }
                LayerFormat::TarGzip | LayerFormat::TarZstd => {
                    let (index, digest) = (layer.index, layer.digest);
                    let diff_id = match diff_ids.get(index) {
                        Some(d) => Some(*d),
                        None if diff_ids.is_empty() => None,
                        None => return Err(ModelError::MissingDiffId { index, digest, listed: diff_ids.len() }),
                    };
                    let (file, lease) =
                        unpack_layer(&registry, &cache, layer, diff_id, settings.fetch.max_unpacked_bytes).await?;
                    leases.push(lease);
                    let unpack_err = |e: std::io::Error| ModelError::Unpack { index, digest, detail: e.to_string() };
                    let for_index = file.try_clone().map_err(unpack_err)?;
                    let unpacked_size = file.metadata().map_err(unpack_err)?.len();
                    let entries = tokio::task::spawn_blocking(move || tar_index::index_tar(for_index, unpacked_size))
                        .await
                        .map_err(|e| ModelError::Unpack { index, digest, detail: e.to_string() })?
                        .map_err(|source| ModelError::Tar { index, digest, source })?;
                    builder.add_tar_layer(layer, &entries).map_err(tree_err)?;
                    layers.push(LayerData::Local(Arc::new(file)));
                }
            }
        }
        Ok(Self {
            reference: reference.to_owned(),
            manifest_digest,
            artifact,
            tree: builder.build(),
            layers,
            store,
            offline,
            selection: settings.selection.clone(),
            lazy_index: None,
            prefetch: settings.fetch.prefetch,
            prefetching: Mutex::new(None),
            _unpacked: leases,
        })
    }

    /// How much of the model the cache holds now: the bytes of the blobs its files are
    /// served from (each blob once), and how many of them are cached. A compressed
    /// layer counts as cached whole, since it is unpacked into the cache before the
    /// model opens. Looks each remote chunk up in the cache: for `status`, not for a
    /// read path.
    pub fn cache_share(&self) -> CacheShare {
        let mut seen = std::collections::HashSet::new();
        let mut share = CacheShare::default();
        let served = self.layers.iter().zip(&self.artifact.layers).filter(|(_, layer)| self.selection.keeps(layer));
        for (data, layer) in served {
            match data {
                LayerData::Remote(blob) if seen.insert(blob.digest) => {
                    share.bytes += blob.size;
                    share.cached += self.store.cache().cached_bytes(&blob.digest, blob.size);
                }
                LayerData::Local(_) if seen.insert(layer.digest) => {
                    share.bytes += layer.size;
                    share.cached += layer.size;
                }
                _ => {}
            }
        }
        share
    }

    /// The remote blobs of the files served, for prefetch.
    pub fn remote_blobs(&self) -> Vec<BlobInfo> {
        self.layers
            .iter()
            .zip(&self.artifact.layers)
            .filter(|(_, layer)| self.selection.keeps(layer))
            .filter_map(|(l, _)| match l {
                LayerData::Remote(b) => Some(*b),
                LayerData::Local(_) => None,
            })
            .collect()
    }
}

/// If `manifest` is a companion image (or an index of them), the pinned location of its
/// lazy index layer; remembered in the cache for when the registry is unreachable.
async fn companion_of(
    reference: &str,
    registry: &Registry,
    cache: &ChunkCache,
    manifest: &[u8],
    offline: bool,
) -> Result<Option<String>, ModelError> {
    let key = format!("companion-for:{reference}");
    if offline {
        return Ok(cache.get_meta(&key)?.and_then(|v| String::from_utf8(v).ok()));
    }
    let found = companion::index_location(registry, manifest).await?;
    if let Some(at) = &found {
        cache.put_meta(&key, at.as_bytes())?;
    }
    Ok(found)
}

/// The companion of a plain artifact's manifest found among its referrers: looked up
/// (and remembered) while the registry answers, else the one found before. A failed
/// look-up falls back to the one found before too, and is an error only without one.
async fn referred_index(
    registry: &Registry,
    cache: &ChunkCache,
    settings: &Settings,
    manifest_digest: &Digest,
    offline: bool,
    pinned: bool,
) -> Result<Option<companion::Discovered>, companion::CompanionError> {
    let chunk_size = settings.fetch.chunk_size;
    let before =
        || companion::discovered_before(registry.reference(), manifest_digest, cache, &settings.registry, chunk_size);
    if offline {
        return before().await;
    }
    // The companion found before for a manifest named by its digest still vouches for
    // exactly that manifest: the referrers are listed again only when none was found.
    if pinned {
        if let Ok(Some(found)) = before().await {
            return Ok(Some(found));
        }
    }
    match companion::discover(registry, manifest_digest, cache, &settings.registry, chunk_size).await {
        Ok(found) => Ok(found),
        Err(e) => match before().await {
            Ok(Some(found)) => {
                tracing::warn!(manifest = %manifest_digest, error = %e, "cannot list the referrers; using the lazy index found before");
                Ok(Some(found))
            }
            _ => Err(e),
        },
    }
}

/// The config blob, from the cache or the registry (then cached).
async fn fetch_config(
    registry: &Registry,
    cache: &ChunkCache,
    artifact: &ModelArtifact,
) -> Result<Vec<u8>, ModelError> {
    let desc = &artifact.config;
    let key = blob_key(&desc.digest);
    if let Some(bytes) = cache.get_meta(&key)? {
        if Digest::of(&bytes) == desc.digest {
            return Ok(bytes);
        }
    }
    let bytes = registry.fetch_small_blob(&desc.digest, desc.size).await?;
    cache.put_meta(&key, &bytes)?;
    Ok(bytes.to_vec())
}

/// GNU tar pads an archive to whole records of this many bytes (20 blocks).
const TAR_RECORD_SIZE: u64 = 20 * BLOCK_SIZE;
/// Room allowed beyond the size a layer's file metadata declares, for the tar records
/// around that one file: its header, a long name, a long link and a PAX record (each at
/// most [`MAX_EXTENSION_BYTES`] with a header and padding), the end-of-archive blocks, and
/// padding to a whole tar record.
const TAR_OVERHEAD_BYTES: u64 = 3 * (MAX_EXTENSION_BYTES + 2 * BLOCK_SIZE) + 2 * TAR_RECORD_SIZE;
/// Bytes moved per read while decompressing.
const COPY_BUFFER_BYTES: usize = 1 << 20;

/// How many bytes `layer` may unpack to, and why: the size its file metadata declares
/// for the one regular file it holds (typeflag `0`) plus [`TAR_OVERHEAD_BYTES`], else
/// `max`; never more than `max`. Metadata of a directory or with no typeflag says
/// nothing about the archive's size.
fn unpack_limit(layer: &ModelLayer, max: u64) -> (u64, &'static str) {
    match &layer.metadata {
        Some(m) if m.typeflag == b'0' && m.size.saturating_add(TAR_OVERHEAD_BYTES) < max => {
            (m.size + TAR_OVERHEAD_BYTES, "the file size its metadata annotation declares plus room for tar headers")
        }
        _ => (max, "max_unpacked_bytes (--max-unpacked-bytes)"),
    }
}

/// A file in the cache's temporary directory, removed when dropped unless persisted.
struct TempFile {
    path: PathBuf,
    persisted: bool,
}

impl TempFile {
    fn new(path: PathBuf) -> Self {
        Self { path, persisted: false }
    }

    /// Renames the file to `to`; from then on it is no longer removed.
    fn persist(mut self, to: &Path) -> std::io::Result<()> {
        std::fs::rename(&self.path, to)?;
        self.persisted = true;
        Ok(())
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.persisted {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// How a bounded decompression ended.
#[derive(Debug, PartialEq, Eq)]
enum Decompressed {
    /// Everything was written: the digest of the bytes.
    Done(Digest),
    /// The stream held more than the limit; at most one byte past it was read.
    OverLimit,
}

/// Decompresses `src` (gzip or zstd, by `format`) into `out`, hashing what it writes, and
/// stops as soon as more than `limit` bytes come out.
fn decompress(format: LayerFormat, src: impl Read, out: &mut impl Write, limit: u64) -> std::io::Result<Decompressed> {
    let decoder: Box<dyn Read + '_> = match format {
        LayerFormat::TarZstd => Box::new(zstd::stream::read::Decoder::new(src)?),
        _ => Box::new(flate2::read::GzDecoder::new(src)),
    };
    let mut limited = decoder.take(limit.saturating_add(1));
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    let mut written = 0u64;
    loop {
        let n = match limited.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        written += n as u64;
        if written > limit {
            return Ok(Decompressed::OverLimit);
        }
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])?;
    }
    Ok(Decompressed::Done(hasher.finish()))
}

/// The digest of everything `file` holds, read from its start.
fn digest_of_file(mut file: &File) -> std::io::Result<Digest> {
    file.seek(SeekFrom::Start(0))?;
    let mut hasher = Hasher::default();
    let mut buf = vec![0u8; COPY_BUFFER_BYTES];
    loop {
        match file.read(&mut buf) {
            Ok(0) => return Ok(hasher.finish()),
            Ok(n) => hasher.update(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

/// Fetches a compressed layer once, checks its digest while streaming, and unpacks it
/// into the cache (atomically: a temp file renamed into place), no larger than
/// [`unpack_limit`] allows and, when the config lists one, matching `diff_id`. An earlier
/// copy is reused only if it passes the same checks; otherwise it is deleted and the layer
/// unpacked again. Nothing is left in the cache's temporary directory on failure.
async fn unpack_layer(
    registry: &Registry,
    cache: &Arc<ChunkCache>,
    layer: &ModelLayer,
    diff_id: Option<Digest>,
    max_unpacked: u64,
) -> Result<(File, UnpackedLease), ModelError> {
    let (index, blob) = (layer.index, BlobInfo { digest: layer.digest, size: layer.size });
    let err = |detail: String| ModelError::Unpack { index, digest: blob.digest, detail };
    let (limit, why) = unpack_limit(layer, max_unpacked);
    let path = cache.unpacked_path(&blob.digest);

    if let Ok(file) = File::open(&path) {
        let checked = tokio::task::spawn_blocking(move || -> std::io::Result<(File, bool)> {
            let fits = file.metadata()?.len() <= limit;
            let matches = match diff_id {
                Some(expected) if fits => digest_of_file(&file)? == expected,
                _ => fits,
            };
            Ok((file, matches))
        })
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(|e| err(format!("checking the unpacked copy {}: {e}", path.display())))?;
        match checked {
            (file, true) => return Ok((file, cache.lease_unpacked(&blob.digest)?)),
            (_, false) => {
                tracing::warn!(layer = index, digest = %blob.digest, "unpacked copy does not match the layer; unpacking it again");
                if !cache.discard_unpacked(&blob.digest)? {
                    return Err(err(format!("{} is in use by another model and does not match", path.display())));
                }
            }
        }
    }

    let packed = TempFile::new(cache.temp_path());
    let mut packed_file =
        File::create(&packed.path).map_err(|e| err(format!("creating {}: {e}", packed.path.display())))?;
    // Hashed here, once: the whole-blob stream is not hashed again on the way.
    let mut stream = registry.stream_blob(&blob.digest, 0).await?;
    let mut hasher = Hasher::default();
    let mut received = 0u64;
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| err(format!("download: {e}")))?;
        received += piece.len() as u64;
        if received > blob.size {
            break;
        }
        hasher.update(&piece);
        packed_file.write_all(&piece).map_err(|e| err(format!("writing {}: {e}", packed.path.display())))?;
    }
    drop(packed_file);
    let actual = hasher.finish();
    if received != blob.size || actual != blob.digest {
        return Err(err(format!("received {received} of {} bytes with digest {actual}", blob.size)));
    }

    let unpacked = TempFile::new(cache.temp_path());
    let format = layer.media_type.format;
    let outcome = tokio::task::spawn_blocking(move || -> Result<Decompressed, String> {
        let src = File::open(&packed.path).map_err(|e| format!("opening {}: {e}", packed.path.display()))?;
        let mut out = File::create(&unpacked.path).map_err(|e| format!("creating {}: {e}", unpacked.path.display()))?;
        let outcome = decompress(format, std::io::BufReader::new(src), &mut out, limit)
            .map_err(|e| format!("decompressing: {e}"))?;
        drop(packed);
        if let Decompressed::Done(actual) = outcome {
            if diff_id.is_none_or(|expected| expected == actual) {
                out.sync_all().map_err(|e| format!("flushing {}: {e}", unpacked.path.display()))?;
                unpacked.persist(&path).map_err(|e| format!("renaming into {}: {e}", path.display()))?;
            }
        }
        Ok(outcome)
    })
    .await
    .map_err(|e| err(e.to_string()))?
    .map_err(err)?;
    match (outcome, diff_id) {
        (Decompressed::OverLimit, _) => Err(ModelError::UnpackTooLarge { index, digest: blob.digest, limit, why }),
        (Decompressed::Done(actual), Some(expected)) if actual != expected => {
            Err(ModelError::DiffId { index, digest: blob.digest, actual, expected })
        }
        (Decompressed::Done(_), _) => {
            let file = File::open(cache.unpacked_path(&blob.digest)).map_err(|e| err(e.to_string()))?;
            Ok((file, cache.lease_unpacked(&blob.digest)?))
        }
    }
}

/// A blocking `Read + Seek` view of a remote blob, for indexing tar headers. Used only
/// on blocking threads.
struct BlobCursor {
    store: Arc<BlobStore>,
    blob: BlobInfo,
    pos: u64,
    handle: Handle,
}

impl Read for BlobCursor {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.blob.size || buf.is_empty() {
            return Ok(0);
        }
        let data = self
            .handle
            .block_on(self.store.read(&self.blob, self.pos, buf.len() as u64))
            .map_err(std::io::Error::other)?;
        buf[..data.len()].copy_from_slice(&data);
        self.pos += data.len() as u64;
        Ok(data.len())
    }
}

impl Seek for BlobCursor {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let target = match to {
            SeekFrom::Start(n) => Some(n),
            SeekFrom::End(d) => self.blob.size.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        self.pos = target.ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "seek out of range"))?;
        Ok(self.pos)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::modelpack::manifest::FileMetadata;

    fn gzip(data: &[u8]) -> Vec<u8> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        gz.write_all(data).unwrap();
        gz.finish().unwrap()
    }

    /// A reader that counts the bytes handed out.
    struct Counting<R> {
        inner: R,
        read: u64,
    }

    impl<R: Read> Read for Counting<R> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = self.inner.read(buf)?;
            self.read += n as u64;
            Ok(n)
        }
    }

    #[test]
    fn decompression_stops_past_the_limit() {
        // 64 MiB of zeros: 64 KiB of gzip, a few hundred bytes of zstd.
        let zeros = vec![0u8; 64 << 20];
        let gz = gzip(&zeros);
        let zst = zstd::encode_all(&zeros[..], 19).unwrap();
        assert!(gz.len() < 100 << 10 && zst.len() < 10 << 10, "{} {}", gz.len(), zst.len());
        for (format, packed) in [(LayerFormat::TarGzip, &gz), (LayerFormat::TarZstd, &zst)] {
            let mut out = Vec::new();
            let mut src = Counting { inner: &packed[..], read: 0 };
            let outcome = decompress(format, &mut src, &mut out, 1 << 20).unwrap();
            assert_eq!(outcome, Decompressed::OverLimit, "{format:?}");
            assert!(out.len() <= 1 << 20, "{format:?}: {} bytes written", out.len());
            assert!(
                src.read < packed.len() as u64 / 4 + (64 << 10),
                "{format:?}: read {} of {}",
                src.read,
                packed.len()
            );
        }
    }

    #[test]
    fn decompression_at_the_limit_completes_with_the_digest() {
        let data = b"exactly this much".repeat(1000);
        for (format, packed) in
            [(LayerFormat::TarGzip, gzip(&data)), (LayerFormat::TarZstd, zstd::encode_all(&data[..], 3).unwrap())]
        {
            let mut out = Vec::new();
            let limit = data.len() as u64;
            assert_eq!(
                decompress(format, &packed[..], &mut out, limit).unwrap(),
                Decompressed::Done(Digest::of(&data))
            );
            assert_eq!(out, data);
            let mut out = Vec::new();
            assert_eq!(decompress(format, &packed[..], &mut out, limit - 1).unwrap(), Decompressed::OverLimit);
        }
        let err = decompress(LayerFormat::TarGzip, &b"not gzip"[..], &mut Vec::new(), 100).unwrap_err();
        assert!(!err.to_string().is_empty());
    }

    fn layer(metadata: Option<FileMetadata>) -> ModelLayer {
        ModelLayer {
            index: 0,
            media_type: "application/vnd.cncf.model.weight.v1.tar+gzip".parse().unwrap(),
            digest: Digest::of(b"layer"),
            size: 10,
            path: None,
            metadata,
            annotations: BTreeMap::new(),
        }
    }

    #[test]
    fn the_limit_is_the_declared_file_size_when_there_is_one() {
        let max = 1 << 40;
        let file = FileMetadata { size: 5000, typeflag: b'0', ..FileMetadata::default() };
        assert_eq!(unpack_limit(&layer(Some(file)), max).0, 5000 + TAR_OVERHEAD_BYTES);
        assert_eq!(unpack_limit(&layer(None), max).0, max);
        let dir = FileMetadata { size: 4096, typeflag: b'5', ..FileMetadata::default() };
        assert_eq!(unpack_limit(&layer(Some(dir)), max).0, max, "a directory's size says nothing");
        assert_eq!(unpack_limit(&layer(Some(FileMetadata::default())), max).0, max, "nor does metadata without a type");
        let huge = FileMetadata { size: u64::MAX, typeflag: b'0', ..FileMetadata::default() };
        assert_eq!(unpack_limit(&layer(Some(huge)), max).0, max, "never above the configured maximum");
        assert!(unpack_limit(&layer(None), max).1.contains("max_unpacked_bytes"));
    }
}
