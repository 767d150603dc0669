//! The CSI node plugin front-end (`model.csi.modelpack.org`): kubelet publishes an inline
//! volume naming a model (`volumeAttributes: {modelRef: ...}`), and the model appears at
//! the volume's target path at once, read lazily through the same engine and cache as
//! every other front-end. [`grpc`] is the tonic adapter (requests parsed there, errors
//! mapped to gRPC codes there); this module knows nothing of gRPC.
//!
//! A model is opened once per reference and served in the CSI volumes' one FUSE session
//! (`<root>/csi/session`, a [`SharedMounts`], kept across restarts like the snapshotter's:
//! docs/restarts.md), bound at `<root>/csi/models/<key>` (named after what the mount is
//! shared by) and bind-mounted read-only, nosuid, nodev at every target that publishes
//! it; the last unpublish takes it out of the session. Publishing is idempotent: the same volume at the same target
//! with the same model succeeds again without a second mount.
//!
//! A volume's pull secret (the request's `secrets`) is used for its model's registry
//! alone and kept in memory only; a model opened with one is shared only with volumes
//! holding the same secret. Exclusions (`exclude-model-weights`,
//! `exclude-file-patterns`) leave files out of the model's tree. Published volumes are
//! recorded (`<root>/csi/volumes.redb`, without secrets) and published again after a
//! restart.
//!
//! A published model is prefetched in the background as the volume's `prefetch`
//! attribute says, else as its companion's lazy index says, else as the node's
//! `cache.prefetch` says; of two volumes sharing a mount, the larger policy wins (a
//! prefetch is widened, never narrowed, while the mount lives). It stops with the mount.

pub mod grpc;
pub mod proto;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::runtime::Handle;

use serde::{Deserialize, Serialize};

use crate::cache::ChunkCache;
use crate::config::{PrefetchPolicy, Settings};
use crate::fs::handover::Keeper;
use crate::fs::shared::{Attached, SharedMounts};
use crate::fs::{self, FsError};
use crate::metadata::records::{Records, RecordsError};
use crate::model::{Model, ModelError};
use crate::modelpack::select::Selection;
use crate::modelpack::Digest;
use crate::registry::credentials::CredentialStore;

/// The volume attributes naming the model: the Model CSI driver's key, and the one the
/// ModelPack getting-started guide writes. Either may be used; both must then agree.
pub const REFERENCE_KEYS: [&str; 2] = ["model.csi.modelpack.org/reference", "modelRef"];

/// The volume attributes asking for a prefetch policy (`none`, `all`, `head:BYTES`): the
/// Model CSI driver's style of key, and the short one. Either may be used; both must
/// then agree.
pub const PREFETCH_KEYS: [&str; 2] = ["model.csi.modelpack.org/prefetch", "prefetch"];

/// Why a call failed.
#[derive(Debug, thiserror::Error)]
pub enum CsiError {
    /// The request is malformed or asks for what a read-only model cannot give.
    #[error("{0}")]
    InvalidArgument(String),
    /// The model could not be opened.
    #[error("{reference}: {source}")]
    Open { reference: String, source: Box<ModelError> },
    /// A mount failed.
    #[error("mounting {what} at {path}: {source}")]
    Mount { what: &'static str, path: String, source: std::io::Error },
    /// The volume records failed.
    #[error(transparent)]
    Records(#[from] RecordsError),
    /// The volume is already published at this target with another model.
    #[error("volume {volume} is already published at {target} with {published}, not {requested}")]
    AlreadyExists { volume: String, target: String, published: String, requested: String },
}

/// The volume attribute excluding weight files (`true`/`false`).
pub const EXCLUDE_WEIGHTS_KEY: &str = "model.csi.modelpack.org/exclude-model-weights";
/// The volume attribute excluding files by pattern (a JSON array).
pub const EXCLUDE_PATTERNS_KEY: &str = "model.csi.modelpack.org/exclude-file-patterns";
/// The key of a Kubernetes pull secret's content among a request's `secrets`.
pub const PULL_SECRET_KEY: &str = ".dockerconfigjson";

/// A publish request, parsed.
#[derive(Debug, Clone)]
pub struct Publish {
    /// The volume's id (kubelet makes one per pod and volume for inline volumes).
    pub volume_id: String,
    /// Where the model must appear.
    pub target: PathBuf,
    /// The model's reference.
    pub reference: String,
    /// Which files are served.
    pub selection: Selection,
    /// The exclusion attributes as given (recorded for a restart).
    pub exclusions: Exclusions,
    /// The volume's pull secret, if the pod names one.
    pub pull_secret: Option<PullSecret>,
    /// The volume's prefetch policy, if its attributes name one.
    pub prefetch: Option<PrefetchPolicy>,
}

/// A volume's exclusion attributes, as given.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exclusions {
    /// `exclude-model-weights`.
    pub weights: Option<String>,
    /// `exclude-file-patterns`.
    pub patterns: Option<String>,
}

impl Exclusions {
    /// The exclusion attributes among `attributes`.
    pub fn of(attributes: &HashMap<String, String>) -> Self {
        Self {
            weights: attributes.get(EXCLUDE_WEIGHTS_KEY).cloned(),
            patterns: attributes.get(EXCLUDE_PATTERNS_KEY).cloned(),
        }
    }

    /// What they select.
    pub fn selection(&self) -> Result<Selection, CsiError> {
        Selection::parse(self.weights.as_deref(), self.patterns.as_deref())
            .map_err(|e| CsiError::InvalidArgument(e.to_string()))
    }
}

/// A pull secret: the credentials it holds, and its digest (which tells secrets apart
/// in memory; the secret itself is never logged or written).
#[derive(Debug, Clone)]
pub struct PullSecret {
    credentials: CredentialStore,
    digest: Digest,
}

impl PullSecret {
    /// The pull secret in a request's `secrets`, if there is one: `.dockerconfigjson`, on
    /// top of the node's own Docker configuration for registries it does not name.
    pub fn of(secrets: &HashMap<String, String>, helper_timeout: Duration) -> Result<Option<Self>, CsiError> {
        let Some(json) = secrets.get(PULL_SECRET_KEY) else { return Ok(None) };
        let digest = Digest::of(json.as_bytes());
        let credentials = CredentialStore::from_env(helper_timeout)
            .with_pull_secret(json.as_bytes().to_vec())
            .map_err(|e| CsiError::InvalidArgument(e.to_string()))?;
        Ok(Some(Self { credentials, digest }))
    }
}

/// What a model mount is shared by: the same reference, files and credentials.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ModelKey {
    reference: String,
    selection: Selection,
    secret: Option<Digest>,
}

impl ModelKey {
    /// The name of the directory its model is bound at: the same for the same key in the
    /// next process, so that a restart finds the model where it left it.
    fn dir_name(&self) -> String {
        use sha2::{Digest as _, Sha256};
        let described = format!("{}\n{:?}\n{:?}", self.reference, self.selection, self.secret);
        hex::encode(&Sha256::digest(described.as_bytes())[..12])
    }

    fn of(request: &Publish) -> Self {
        Self {
            reference: request.reference.clone(),
            selection: request.selection.clone(),
            secret: request.pull_secret.as_ref().map(|s| s.digest),
        }
    }
}

/// A published volume as recorded for a restart (no secret).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct VolumeRecord {
    volume_id: String,
    target: PathBuf,
    reference: String,
    exclusions: Exclusions,
    /// The prefetch attribute, parsed (absent in records of older builds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    prefetch: Option<PrefetchPolicy>,
}

fn record_key(volume_id: &str, target: &Path) -> String {
    serde_json::to_string(&(volume_id, target)).expect("keys serialize")
}

impl Publish {
    /// The model reference among `attributes` (a volume's context), under either key.
    pub fn reference_of(attributes: &HashMap<String, String>) -> Result<String, CsiError> {
        let mut found = REFERENCE_KEYS.iter().filter_map(|k| attributes.get(*k).map(|v| v.trim()));
        let Some(first) = found.next().filter(|r| !r.is_empty()) else {
            return Err(CsiError::InvalidArgument(format!(
                "volume attributes name no model: set {} (or {})",
                REFERENCE_KEYS[1], REFERENCE_KEYS[0]
            )));
        };
        if let Some(other) = found.next() {
            if other != first {
                return Err(CsiError::InvalidArgument(format!(
                    "volume attributes name two models: {first:?} and {other:?}"
                )));
            }
        }
        Ok(first.to_owned())
    }

    /// The prefetch policy among `attributes`, under either key, if one is given; a
    /// malformed one is refused, naming the attribute.
    pub fn prefetch_of(attributes: &HashMap<String, String>) -> Result<Option<PrefetchPolicy>, CsiError> {
        let mut found = None;
        for key in PREFETCH_KEYS {
            let Some(value) = attributes.get(key) else { continue };
            let policy = value
                .parse::<PrefetchPolicy>()
                .map_err(|e| CsiError::InvalidArgument(format!("volume attribute {key}: {e}")))?;
            match found {
                Some((other, earlier)) if earlier != policy => {
                    return Err(CsiError::InvalidArgument(format!(
                        "volume attributes {other} and {key} ask for two prefetch policies: {earlier} and {policy}"
                    )))
                }
                _ => found = Some((key, policy)),
            }
        }
        Ok(found.map(|(_, policy)| policy))
    }
}

/// A model mounted for CSI volumes.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    mounted: Attached,
    /// The model, to widen its prefetch for a volume that asks for more.
    model: Arc<Model>,
    /// Targets publishing it.
    users: usize,
    /// Its entry among the models mounted, gone with it.
    _listed: Listed,
}

/// The models mounted for volumes, readable at any time: a call holds [`State`] while
/// it opens a model, which may wait on a registry for as long as its timeouts allow.
#[derive(Debug, Default)]
struct Listing {
    models: std::sync::Mutex<HashMap<u64, Arc<Model>>>,
    next: std::sync::atomic::AtomicU64,
}

/// A model's entry in the [`Listing`], taken out when dropped.
#[derive(Debug)]
struct Listed {
    listing: Arc<Listing>,
    id: u64,
}

impl Listing {
    fn add(self: &Arc<Self>, model: Arc<Model>) -> Listed {
        let id = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.models.lock().expect("listing lock").insert(id, model);
        Listed { listing: self.clone(), id }
    }
}

impl Drop for Listed {
    fn drop(&mut self) {
        self.listing.models.lock().expect("listing lock").remove(&self.id);
    }
}

#[derive(Debug, Default)]
struct State {
    /// (volume id, target) → the model it publishes.
    volumes: HashMap<(String, PathBuf), ModelKey>,
    /// Its mount, by what shares it.
    models: HashMap<ModelKey, Shared>,
}

/// The CSI node plugin's volumes.
#[derive(Debug)]
pub struct CsiNode {
    cache: Arc<ChunkCache>,
    settings: Settings,
    models_dir: PathBuf,
    /// The session every volume's model is served in.
    session: Arc<SharedMounts>,
    records: Records,
    runtime: Handle,
    /// Calls run one at a time: publishing is rare, and a second publish of a model must
    /// find the first one's mount.
    state: tokio::sync::Mutex<State>,
    listing: Arc<Listing>,
}

impl CsiNode {
    /// Volumes whose models are served in a session at `<dir>/session` (`threads`
    /// threads), bound under `<dir>/models` and recorded in `<dir>/volumes.redb` (`dir` a
    /// private directory), read through `cache` on `runtime`. With a `keeper`, the session
    /// is kept across restarts (a model served before one waits at most `wait` to be
    /// published again). Other mounts an earlier process left under `models` are
    /// detached.
    pub fn open(
        dir: &Path,
        cache: Arc<ChunkCache>,
        settings: Settings,
        runtime: Handle,
        (threads, wait): (usize, Duration),
        keeper: Option<Arc<dyn Keeper>>,
    ) -> Result<Self, CsiError> {
        let models_dir = dir.join("models");
        let session_dir = dir.join("session");
        let passthrough = settings.fetch.passthrough;
        let session = SharedMounts::new(&session_dir, "csi", runtime.clone(), passthrough, threads, wait, keeper)
            .map_err(|e| mount_err("the models' session", &session_dir, std::io::Error::other(e)))?;
        let io = |e| mount_err("the models' directory", &models_dir, e);
        std::fs::create_dir_all(&models_dir).map_err(io)?;
        for entry in std::fs::read_dir(&models_dir).map_err(io)? {
            let path = entry.map_err(io)?.path();
            if session.is_pending(&path) {
                continue;
            }
            if fs::is_mountpoint(&path) {
                tracing::info!(path = %path.display(), "detaching a model mount an earlier process left");
                let _ = fs::detach(&path);
            }
            let _ = std::fs::remove_dir(&path);
        }
        let records = Records::open(&dir.join("volumes.redb"), "volumes")?;
        let state = tokio::sync::Mutex::new(State::default());
        let session = Arc::new(session);
        Ok(Self { cache, settings, models_dir, session, records, runtime, state, listing: Arc::default() })
    }

    /// The models mounted for volumes now, each once however many volumes share it.
    /// Never waits for a call in progress.
    pub fn mounted_models(&self) -> Vec<Arc<Model>> {
        self.listing.models.lock().expect("listing lock").values().cloned().collect()
    }

    /// Publishes again, in the background, every volume recorded as published (after a
    /// restart), with the node's credentials: a pull secret is not kept, so a model only
    /// its secret could open waits for the cache or for kubelet to publish it again.
    pub fn restore(self: &Arc<Self>) -> Result<usize, CsiError> {
        let records: Vec<VolumeRecord> = self.records.list()?;
        let count = records.len();
        let this = self.clone();
        self.runtime.spawn(async move {
            for record in records {
                let selection = match record.exclusions.selection() {
                    Ok(selection) => selection,
                    Err(e) => {
                        tracing::error!(volume = %record.volume_id, error = %e, "unreadable volume record");
                        continue;
                    }
                };
                let request = Publish {
                    volume_id: record.volume_id.clone(),
                    target: record.target.clone(),
                    reference: record.reference.clone(),
                    selection,
                    exclusions: record.exclusions.clone(),
                    pull_secret: None,
                    prefetch: record.prefetch,
                };
                match this.publish(&request).await {
                    Ok(()) => tracing::info!(volume = %record.volume_id, target = %record.target.display(), "volume published again"),
                    Err(e) => tracing::warn!(volume = %record.volume_id, error = %e, "cannot publish a recorded volume again"),
                }
            }
        });
        Ok(count)
    }

    /// Publishes `request`: its model mounted (once) and bound at its target, and
    /// recorded for a restart.
    pub async fn publish(&self, request: &Publish) -> Result<(), CsiError> {
        let mut state = self.state.lock().await;
        let key = (request.volume_id.clone(), request.target.clone());
        let model = ModelKey::of(request);
        if let Some(published) = state.volumes.get(&key) {
            if *published != model {
                return Err(CsiError::AlreadyExists {
                    volume: request.volume_id.clone(),
                    target: request.target.display().to_string(),
                    published: published.reference.clone(),
                    requested: request.reference.clone(),
                });
            }
            if fs::is_mountpoint(&request.target) {
                return Ok(());
            }
            // The bind went away under us: bind it again below, counting it once.
            state.volumes.remove(&key);
            release(&mut state, &model);
        }
        if !state.models.contains_key(&model) {
            let dir = self.models_dir.join(model.dir_name());
            let shared = self.mount_model(request, dir).await?;
            state.models.insert(model.clone(), shared);
        }
        // A mount already at the target is replaced only if it is this volume's own, left
        // by an earlier process: nothing else at a path kubelet names is ours to unmount.
        let record_key = record_key(&request.volume_id, &request.target);
        let ours = self.records.get::<VolumeRecord>(&record_key)?.is_some();
        let shared = state.models.get_mut(&model).expect("mounted above");
        // Counted before the bind, so that a failed bind releases it like any other.
        shared.users += 1;
        let (dir, target) = (shared.dir.clone(), request.target.clone());
        let bound = tokio::task::spawn_blocking(move || bind(&dir, &target, ours))
            .await
            .map_err(|e| mount_err("the volume", &request.target, std::io::Error::other(e)))
            .and_then(|bound| bound);
        if let Err(e) = bound {
            release(&mut state, &model);
            return Err(e);
        }
        let recorded = VolumeRecord {
            volume_id: request.volume_id.clone(),
            target: request.target.clone(),
            reference: request.reference.clone(),
            exclusions: request.exclusions.clone(),
            prefetch: request.prefetch,
        };
        if let Err(e) = self.records.update(&record_key, |_| Some(recorded)) {
            let _ = unbind(&request.target);
            release(&mut state, &model);
            return Err(e.into());
        }
        let shared = state.models.get(&model).expect("published above");
        shared.model.start_prefetch(request.prefetch.unwrap_or(shared.model.prefetch), &self.runtime);
        state.volumes.insert(key, model);
        tracing::info!(volume = %request.volume_id, target = %request.target.display(), reference = %request.reference, "volume published");
        Ok(())
    }

    /// Unpublishes volume `volume_id` at `target`: the bind removed (and the target
    /// directory), the model unmounted with its last volume. A volume not published (and
    /// not recorded) is not an error, and nothing at its target is touched.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), CsiError> {
        let mut state = self.state.lock().await;
        let key = record_key(volume_id, target);
        let known = state.volumes.contains_key(&(volume_id.to_owned(), target.to_owned()));
        if !known && self.records.get::<VolumeRecord>(&key)?.is_none() {
            return Ok(());
        }
        let target_owned = target.to_owned();
        tokio::task::spawn_blocking(move || unbind(&target_owned))
            .await
            .map_err(|e| mount_err("the volume", target, std::io::Error::other(e)))??;
        if let Some(model) = state.volumes.remove(&(volume_id.to_owned(), target.to_owned())) {
            release(&mut state, &model);
            tracing::info!(volume = volume_id, target = %target.display(), "volume unpublished");
        }
        self.records.update(&key, |_: Option<VolumeRecord>| None)?;
        Ok(())
    }

    /// Unmounts every volume's model and the session (at a stop for good, or a restart
    /// that cannot keep the session); the binds at the targets stay, and read as a dead
    /// mount until kubelet unpublishes them.
    pub fn unmount_all(&self) {
        let mut state = self.state.blocking_lock();
        for (model, shared) in state.models.drain() {
            tracing::info!(reference = %model.reference, "unmounting a CSI volume's model");
            shared.mounted.unmount();
        }
        state.volumes.clear();
        self.session.shut();
    }

    /// Whether the volumes' session is kept for the next process (a restart then leaves
    /// every volume as it is).
    pub fn session_kept(&self) -> bool {
        self.session.is_kept()
    }

    async fn mount_model(&self, request: &Publish, dir: PathBuf) -> Result<Shared, CsiError> {
        let reference = request.reference.as_str();
        let mut settings = self.settings.clone();
        settings.selection = request.selection.clone();
        if let Some(secret) = &request.pull_secret {
            settings.registry.credentials = Some(secret.credentials.clone());
        }
        let model = Model::open(reference, &settings, self.cache.clone())
            .await
            .map_err(|source| CsiError::Open { reference: reference.to_owned(), source: Box::new(source) })?;
        if model.tree.len() <= 1 && !request.selection.is_all() {
            return Err(CsiError::InvalidArgument(format!("{reference}: the exclusions leave no file to serve")));
        }
        let model = Arc::new(model);
        let (session, at, opened) = (self.session.clone(), dir.clone(), model.clone());
        let mounted = tokio::task::spawn_blocking(move || {
            // A model served before a restart is bound there already; its directory is
            // never looked at (a look would wait for the model being attached here).
            if !fs::is_mountpoint(&at) {
                std::fs::create_dir_all(&at)?;
            }
            session.attach(opened, &at).map_err(|e: FsError| std::io::Error::other(e))
        })
        .await
        .map_err(|e| mount_err("the model", &dir, std::io::Error::other(e)))?
        .map_err(|e| mount_err("the model", &dir, e))?;
        tracing::info!(reference, dir = %dir.display(), "model mounted for CSI volumes");
        let listed = self.listing.add(model.clone());
        Ok(Shared { dir, mounted, model, users: 0, _listed: listed })
    }
}

fn mount_err(what: &'static str, path: &Path, source: std::io::Error) -> CsiError {
    CsiError::Mount { what, path: path.display().to_string(), source }
}

/// One target fewer for `model`; it is unmounted with its last target.
fn release(state: &mut State, model: &ModelKey) {
    let Some(shared) = state.models.get_mut(model) else { return };
    shared.users = shared.users.saturating_sub(1);
    if shared.users == 0 {
        if let Some(shared) = state.models.remove(model) {
            tracing::info!(reference = %model.reference, "last volume of a model unpublished; unmounting it");
            shared.mounted.unmount();
        }
    }
}

/// Binds the model at `dir` to `target` (created if missing). A mount already there is
/// replaced if it is `ours` (left by an earlier process), else refused.
fn bind(dir: &Path, target: &Path, ours: bool) -> Result<(), CsiError> {
    if fs::is_mountpoint(target) {
        // Bound by the process before a restart, to this very model in the session.
        if ours && fs::mount_entry(target).is_some_and(|entry| Some(entry) == fs::mount_entry(dir)) {
            return Ok(());
        }
        if !ours {
            return Err(CsiError::InvalidArgument(format!(
                "target_path {} is already a mount point, not of this volume",
                target.display()
            )));
        }
        fs::detach(target).map_err(|e| mount_err("the volume", target, e))?;
    }
    std::fs::create_dir_all(target).map_err(|e| mount_err("the volume", target, e))?;
    fs::bind_read_only(dir, target).map_err(|e| mount_err("the volume", target, e))
}

/// Removes the mount at `target` (lazily, if files are open) and the directory.
fn unbind(target: &Path) -> Result<(), CsiError> {
    if fs::is_mountpoint(target) {
        fs::detach(target).map_err(|e| mount_err("the volume", target, e))?;
    }
    match std::fs::remove_dir(target) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(mount_err("the volume", target, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attrs(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn either_spelling_names_the_model() {
        let r = "registry.example.com/models/demo:v1";
        assert_eq!(Publish::reference_of(&attrs(&[("modelRef", r)])).unwrap(), r);
        assert_eq!(Publish::reference_of(&attrs(&[("model.csi.modelpack.org/reference", r)])).unwrap(), r);
        assert_eq!(
            Publish::reference_of(&attrs(&[("modelRef", r), ("model.csi.modelpack.org/reference", r)])).unwrap(),
            r
        );
        let two = Publish::reference_of(&attrs(&[("modelRef", r), ("model.csi.modelpack.org/reference", "x/y:z")]));
        assert!(matches!(two, Err(CsiError::InvalidArgument(m)) if m.contains("two models")));
        assert!(Publish::reference_of(&attrs(&[("modelRef", " ")])).is_err());
        assert!(Publish::reference_of(&attrs(&[])).is_err());
    }

    #[test]
    fn either_spelling_asks_for_a_prefetch_policy() {
        assert_eq!(Publish::prefetch_of(&attrs(&[])).unwrap(), None);
        assert_eq!(Publish::prefetch_of(&attrs(&[("prefetch", "all")])).unwrap(), Some(PrefetchPolicy::All));
        let long = [("model.csi.modelpack.org/prefetch", "head:1MiB")];
        assert_eq!(Publish::prefetch_of(&attrs(&long)).unwrap(), Some(PrefetchPolicy::Head(1 << 20)));
        let both = [("model.csi.modelpack.org/prefetch", "head:1MiB"), ("prefetch", "head:1048576")];
        assert_eq!(Publish::prefetch_of(&attrs(&both)).unwrap(), Some(PrefetchPolicy::Head(1 << 20)), "the same");
        let two = Publish::prefetch_of(&attrs(&[("model.csi.modelpack.org/prefetch", "all"), ("prefetch", "none")]));
        assert!(matches!(two, Err(CsiError::InvalidArgument(m)) if m.contains("two prefetch policies")));
        let bad = Publish::prefetch_of(&attrs(&[("prefetch", "everything")]));
        assert!(
            matches!(bad, Err(CsiError::InvalidArgument(m)) if m.contains("prefetch") && m.contains("\"everything\""))
        );
    }
}
