//! The CSI node plugin front-end (`model.csi.modelpack.org`): kubelet publishes an inline
//! volume naming a model (`volumeAttributes: {modelRef: ...}`), and the model appears at
//! the volume's target path at once, read lazily through the same engine and cache as
//! every other front-end. [`grpc`] is the tonic adapter (requests parsed there, errors
//! mapped to gRPC codes there); this module knows nothing of gRPC.
//!
//! A model is opened and mounted (FUSE) once per reference, under `<root>/csi/models/`,
//! and bind-mounted read-only, nosuid, nodev at every target that publishes it; the last
//! unpublish unmounts it. Publishing is idempotent: the same volume at the same target
//! with the same model succeeds again without a second mount.
//!
//! Not built yet (docs/csi.md): pull secrets from the request, exclusions, finding a
//! plain artifact's companion through the referrers API, and publishing volumes again
//! after a daemon restart.

pub mod grpc;
pub mod proto;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::runtime::Handle;

use crate::cache::ChunkCache;
use crate::config::Settings;
use crate::fs::{self, Mounted};
use crate::model::{Model, ModelError};
use crate::modelpack::Digest;

/// The volume attributes naming the model: the Model CSI driver's key, and the one the
/// ModelPack getting-started guide writes. Either may be used; both must then agree.
pub const REFERENCE_KEYS: [&str; 2] = ["model.csi.modelpack.org/reference", "modelRef"];

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
    /// The volume is already published at this target with another model.
    #[error("volume {volume} is already published at {target} with {published}, not {requested}")]
    AlreadyExists { volume: String, target: String, published: String, requested: String },
}

/// A publish request, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Publish {
    /// The volume's id (kubelet makes one per pod and volume for inline volumes).
    pub volume_id: String,
    /// Where the model must appear.
    pub target: PathBuf,
    /// The model's reference.
    pub reference: String,
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
}

/// A model mounted for CSI volumes.
#[derive(Debug)]
struct Shared {
    dir: PathBuf,
    mounted: Mounted,
    /// Targets publishing it.
    users: usize,
}

#[derive(Debug, Default)]
struct State {
    /// (volume id, target) → reference.
    volumes: HashMap<(String, PathBuf), String>,
    /// Reference → its mount.
    models: HashMap<String, Shared>,
}

/// The CSI node plugin's volumes.
#[derive(Debug)]
pub struct CsiNode {
    cache: Arc<ChunkCache>,
    settings: Settings,
    models_dir: PathBuf,
    runtime: Handle,
    /// Calls run one at a time: publishing is rare, and a second publish of a model must
    /// find the first one's mount.
    state: tokio::sync::Mutex<State>,
}

impl CsiNode {
    /// Volumes whose models are mounted under `models_dir` (a private directory), read
    /// through `cache` on `runtime`.
    pub fn new(cache: Arc<ChunkCache>, settings: Settings, models_dir: PathBuf, runtime: Handle) -> Self {
        Self { cache, settings, models_dir, runtime, state: tokio::sync::Mutex::new(State::default()) }
    }

    /// Publishes `request`: its model mounted (once) and bound at its target.
    pub async fn publish(&self, request: &Publish) -> Result<(), CsiError> {
        let mut state = self.state.lock().await;
        let key = (request.volume_id.clone(), request.target.clone());
        if let Some(published) = state.volumes.get(&key) {
            if *published != request.reference {
                return Err(CsiError::AlreadyExists {
                    volume: request.volume_id.clone(),
                    target: request.target.display().to_string(),
                    published: published.clone(),
                    requested: request.reference.clone(),
                });
            }
            if fs::is_mountpoint(&request.target) {
                return Ok(());
            }
            // The bind went away under us: bind it again below, counting it once.
            state.volumes.remove(&key);
            release(&mut state, &request.reference);
        }
        if !state.models.contains_key(&request.reference) {
            let shared = self.mount_model(&request.reference).await?;
            state.models.insert(request.reference.clone(), shared);
        }
        let shared = state.models.get_mut(&request.reference).expect("mounted above");
        // Counted before the bind, so that a failed bind releases it like any other.
        shared.users += 1;
        let (dir, target) = (shared.dir.clone(), request.target.clone());
        let bound = tokio::task::spawn_blocking(move || bind(&dir, &target))
            .await
            .map_err(|e| mount_err("the volume", &request.target, std::io::Error::other(e)))
            .and_then(|bound| bound);
        if let Err(e) = bound {
            release(&mut state, &request.reference);
            return Err(e);
        }
        state.volumes.insert(key, request.reference.clone());
        tracing::info!(volume = %request.volume_id, target = %request.target.display(), reference = %request.reference, "volume published");
        Ok(())
    }

    /// Unpublishes volume `volume_id` at `target`: the bind removed (and the target
    /// directory), the model unmounted with its last volume. A volume not published is
    /// not an error; a leftover mount at its target is removed all the same.
    pub async fn unpublish(&self, volume_id: &str, target: &Path) -> Result<(), CsiError> {
        let mut state = self.state.lock().await;
        let target_owned = target.to_owned();
        tokio::task::spawn_blocking(move || unbind(&target_owned))
            .await
            .map_err(|e| mount_err("the volume", target, std::io::Error::other(e)))??;
        if let Some(reference) = state.volumes.remove(&(volume_id.to_owned(), target.to_owned())) {
            release(&mut state, &reference);
            tracing::info!(volume = volume_id, target = %target.display(), "volume unpublished");
        }
        Ok(())
    }

    /// Unmounts every volume's model (at shutdown); the binds at the targets stay, and
    /// read as a dead mount until kubelet unpublishes them.
    pub fn unmount_all(&self) {
        let mut state = self.state.blocking_lock();
        for (reference, shared) in state.models.drain() {
            tracing::info!(reference, "unmounting a CSI volume's model");
            shared.mounted.unmount();
        }
        state.volumes.clear();
    }

    async fn mount_model(&self, reference: &str) -> Result<Shared, CsiError> {
        let model = Model::open(reference, &self.settings, self.cache.clone())
            .await
            .map_err(|source| CsiError::Open { reference: reference.to_owned(), source: Box::new(source) })?;
        let dir = self.models_dir.join(Digest::of(reference.as_bytes()).hex());
        let runtime = self.runtime.clone();
        let at = dir.clone();
        let mounted = tokio::task::spawn_blocking(move || {
            std::fs::create_dir_all(&at)?;
            fs::mount(Arc::new(model), &at, runtime).map_err(std::io::Error::other)
        })
        .await
        .map_err(|e| mount_err("the model", &dir, std::io::Error::other(e)))?
        .map_err(|e| mount_err("the model", &dir, e))?;
        tracing::info!(reference, dir = %dir.display(), "model mounted for CSI volumes");
        Ok(Shared { dir, mounted, users: 0 })
    }
}

fn mount_err(what: &'static str, path: &Path, source: std::io::Error) -> CsiError {
    CsiError::Mount { what, path: path.display().to_string(), source }
}

/// One target fewer for `reference`; its model is unmounted with its last target.
fn release(state: &mut State, reference: &str) {
    let Some(shared) = state.models.get_mut(reference) else { return };
    shared.users = shared.users.saturating_sub(1);
    if shared.users == 0 {
        if let Some(shared) = state.models.remove(reference) {
            tracing::info!(reference, "last volume of a model unpublished; unmounting it");
            shared.mounted.unmount();
        }
    }
}

/// Binds the model at `dir` to `target` (created if missing), replacing a dead mount an
/// earlier process left there.
fn bind(dir: &Path, target: &Path) -> Result<(), CsiError> {
    if fs::is_mountpoint(target) {
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
}
