//! A model, opened: the reference resolved to a ModelPack manifest, every layer indexed,
//! and the merged file tree, ready for [`crate::fs`] to serve.
//!
//! Raw and plain tar layers stay remote and are read lazily through
//! [`crate::blob::BlobStore`]. Compressed tar layers have no random access: each is
//! fetched once, verified, and unpacked into the cache, then served from there.
//! Resolved manifests and configs are kept in the cache, so a model opened before opens
//! again while its registry is unreachable. A companion reference (made by `convert`)
//! opens the model its lazy index describes, with every chunk checked against the index.

use std::collections::HashMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::sync::Arc;
use std::time::SystemTime;

use futures_util::StreamExt;
use tokio::runtime::Handle;

use crate::blob::{BlobError, BlobInfo, BlobStore};
use crate::cache::{CacheError, ChunkCache};
use crate::companion;
use crate::config::Settings;
use crate::modelpack::digest::Hasher;
use crate::modelpack::index::{ChunkDigests, VerifiedIndex};
use crate::modelpack::manifest::{self, ManifestError, ModelArtifact};
use crate::modelpack::media::LayerFormat;
use crate::modelpack::tar_index::{self, TarError};
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
    /// The cache failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// A companion image's lazy index could not be loaded.
    #[error("{reference}: {detail}")]
    Companion { reference: String, detail: String },
    /// The lazy index's digests cannot check chunks of the configured size.
    #[error("chunk size {chunk_size} is not a multiple of the lazy index's {piece}-byte pieces")]
    ChunkSize { chunk_size: u64, piece: u64 },
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
    digests: HashMap<Digest, ChunkDigests>,
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
}

fn manifest_key(reference: &str) -> String {
    format!("manifest-for:{reference}")
}

fn blob_key(digest: &Digest) -> String {
    format!("blob:{digest}")
}

impl Model {
    /// Resolves `reference` and indexes every layer. Must run inside a tokio runtime
    /// with blocking threads available (tar indexing blocks on chunk reads).
    pub async fn open(reference: &str, settings: &Settings, cache: Arc<ChunkCache>) -> Result<Self, ModelError> {
        let parsed = registry::parse_reference(reference)?;
        let registry = Arc::new(Registry::new(parsed, settings.registry.clone()));
        let (manifest_bytes, manifest_digest, offline) = match registry.fetch_manifest().await {
            Ok((bytes, digest)) => {
                cache.put_meta(&manifest_key(reference), &bytes)?;
                (bytes.to_vec(), digest, false)
            }
            Err(e @ (RegistryError::Exhausted { .. } | RegistryError::Invalid { .. })) => {
                match cache.get_meta(&manifest_key(reference))? {
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
            let pinned = companion::Pinned::parse(&at).map_err(|reason| ModelError::Companion {
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
        let config = fetch_config(&registry, &cache, &artifact).await?;
        manifest::parse_config(&config).map_err(manifest_err)?;
        let parts = Parts { reference, registry, artifact, manifest_digest, offline, digests: HashMap::new() };
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
        let registry = Arc::new(Registry::new(registry::parse_reference(&reference)?, settings.registry.clone()));
        let manifest_err = |source| ModelError::Manifest { reference: reference.clone(), source };
        manifest::parse_config(index.index.config.as_bytes()).map_err(manifest_err)?;
        let mut digests = HashMap::new();
        for (layer, pieces) in index.artifact.layers.iter().zip(index.chunks) {
            if !BlobStore::check_digests(settings.fetch.chunk_size, pieces.chunk_size) {
                return Err(ModelError::ChunkSize { chunk_size: settings.fetch.chunk_size, piece: pieces.chunk_size });
            }
            digests.insert(layer.digest, pieces);
        }
        let parts = Parts {
            reference: &reference,
            registry,
            artifact: index.artifact,
            manifest_digest: index.manifest_digest,
            offline: false,
            digests,
        };
        Self::assemble(parts, settings, cache).await
    }

    async fn assemble(parts: Parts<'_>, settings: &Settings, cache: Arc<ChunkCache>) -> Result<Self, ModelError> {
        let Parts { reference, registry, artifact, manifest_digest, offline, digests } = parts;
        cache.bind_chunk_size(settings.fetch.chunk_size)?;
        let store = BlobStore::new(registry.clone(), cache.clone(), settings.fetch.clone(), digests);
        let mut builder = TreeBuilder::new(SystemTime::UNIX_EPOCH);
        let mut layers = Vec::with_capacity(artifact.layers.len());
        for layer in &artifact.layers {
            let blob = BlobInfo { digest: layer.digest, size: layer.size };
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
                    let file = unpack_layer(&registry, &cache, layer.index, blob, layer.media_type.format).await?;
                    let (index, digest) = (layer.index, layer.digest);
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
        })
    }

    /// The remote blobs of the model, for prefetch.
    pub fn remote_blobs(&self) -> Vec<BlobInfo> {
        self.layers
            .iter()
            .filter_map(|l| match l {
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

/// Fetches a compressed layer once, checks its digest while streaming, and unpacks it
/// into the cache (atomically: a temp file renamed into place). Reuses an earlier copy.
async fn unpack_layer(
    registry: &Registry,
    cache: &Arc<ChunkCache>,
    index: usize,
    blob: BlobInfo,
    format: LayerFormat,
) -> Result<File, ModelError> {
    let err = |detail: String| ModelError::Unpack { index, digest: blob.digest, detail };
    let path = cache.unpacked_path(&blob.digest);
    if let Ok(file) = File::open(&path) {
        return Ok(file);
    }
    let packed_path = cache.temp_path();
    let mut packed = File::create(&packed_path).map_err(|e| err(format!("creating {}: {e}", packed_path.display())))?;
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
        packed.write_all(&piece).map_err(|e| err(format!("writing {}: {e}", packed_path.display())))?;
    }
    let actual = hasher.finish();
    if received != blob.size || actual != blob.digest {
        let _ = std::fs::remove_file(&packed_path);
        return Err(err(format!("received {received} of {} bytes with digest {actual}", blob.size)));
    }
    let unpacked_tmp = cache.temp_path();
    let result = tokio::task::spawn_blocking(move || -> Result<(), String> {
        let src = File::open(&packed_path).map_err(|e| e.to_string())?;
        let mut out = File::create(&unpacked_tmp).map_err(|e| e.to_string())?;
        let copied = match format {
            LayerFormat::TarGzip => std::io::copy(&mut flate2::read::GzDecoder::new(src), &mut out),
            _ => zstd::stream::read::Decoder::new(src).and_then(|mut d| std::io::copy(&mut d, &mut out)),
        };
        let _ = std::fs::remove_file(&packed_path);
        copied.map_err(|e| format!("decompressing: {e}"))?;
        out.sync_all().map_err(|e| e.to_string())?;
        std::fs::rename(&unpacked_tmp, &path).map_err(|e| e.to_string())?;
        Ok(())
    })
    .await
    .map_err(|e| err(e.to_string()))?;
    result.map_err(err)?;
    File::open(cache.unpacked_path(&blob.digest)).map_err(|e| err(e.to_string()))
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
