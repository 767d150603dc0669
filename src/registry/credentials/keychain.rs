//! Credentials that CRI `PullImage` calls proved, remembered per image for the models of
//! those images. kubelet hands a pod's pull secret to the runtime with `PullImage`, and
//! containerd never passes it on to a snapshotter; the CRI proxy ([`crate::cri`]) sees it
//! on its way to containerd and notes it here, and the snapshotter looks a model's image
//! up here (its `containerd.io/snapshot/cri.image-ref` label) before it fetches anything.
//!
//! Which credentials are trusted, and for what, is decided here alone:
//! - A pull's credentials are *pending* while containerd pulls with them: the model that
//!   very pull prepares may use them (containerd fetched the image's manifest with them
//!   before it asks the snapshotter for anything), the newest pull of an image first.
//! - They are *remembered* only once containerd's pull succeeded with them: a pull that
//!   fails leaves nothing behind, so credentials that do not work (a tenant's wrong
//!   password) never replace ones that did.
//! - They are bound to the image's registry host: [`CriCredentials::for_registry`] answers
//!   nothing for any other host, whatever a companion's labels or lazy index name there.
//! - They live in memory only, and are forgotten `ttl` after the pull that proved them. A
//!   model opened with them keeps its own copy ([`CriCredentials`]) for as long as it is
//!   served; when the registry refuses that copy, it takes what a later successful pull of
//!   the same image remembered, if any.
//!
//! No `Debug` output here shows a secret.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use oci_client::secrets::RegistryAuth;

use crate::modelpack::Digest;
use crate::registry::parse_reference;

/// Why an image cannot be a key.
#[derive(Debug, thiserror::Error)]
pub enum KeychainError {
    /// Neither an image reference nor an image id.
    #[error("image {image:?} is neither a reference nor an image id: {reason}")]
    Image { image: String, reason: String },
}

/// An image as containerd names it: a reference normalised as containerd's CRI plugin
/// writes it into `containerd.io/snapshot/cri.image-ref` (`docker.io/library/` for short
/// names, `:latest` when no tag, and a tag dropped beside a digest), or an image id
/// (`sha256:<hex>`), which containerd answers `PullImage` with.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ImageKey(String);

impl std::fmt::Display for ImageKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// An image reference: its key and the registry host its bytes are fetched from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageName {
    pub key: ImageKey,
    /// `host[:port]`, as registry clients ask for credentials (`index.docker.io` for
    /// Docker Hub).
    pub registry: String,
}

impl ImageKey {
    /// The key of `image`, an image reference or an image id.
    pub fn parse(image: &str) -> Result<Self, KeychainError> {
        if let Ok(id) = image.parse::<Digest>() {
            return Ok(Self(id.to_string()));
        }
        ImageName::parse(image).map(|name| name.key)
    }
}

impl ImageName {
    /// `image` as a reference (an image id names no registry, so it is refused).
    pub fn parse(image: &str) -> Result<Self, KeychainError> {
        let bad = |reason: String| KeychainError::Image { image: image.to_owned(), reason };
        if image.parse::<Digest>().is_ok() {
            return Err(bad("an image id names no registry".to_owned()));
        }
        let reference = parse_reference(image).map_err(|e| bad(e.to_string()))?;
        let name = format!("{}/{}", reference.registry(), reference.repository());
        let key = match (reference.digest(), reference.tag()) {
            (Some(digest), _) => format!("{name}@{digest}"),
            (None, Some(tag)) => format!("{name}:{tag}"),
            (None, None) => name,
        };
        Ok(Self { key: ImageKey(key), registry: reference.resolve_registry().to_owned() })
    }
}

/// Credentials and the one registry host they may be sent to.
#[derive(Clone)]
struct Bound {
    registry: String,
    auth: RegistryAuth,
}

/// Credentials a successful pull proved, until `until`.
struct Remembered {
    bound: Bound,
    until: Instant,
}

/// The credentials of one pull still running.
struct Running {
    id: u64,
    bound: Bound,
}

#[derive(Default)]
struct State {
    remembered: HashMap<ImageKey, Remembered>,
    /// Oldest first.
    running: HashMap<ImageKey, Vec<Running>>,
    next_id: u64,
}

struct Inner {
    ttl: Duration,
    state: Mutex<State>,
}

/// What CRI pulls proved, per image; shared by the CRI proxy and the snapshotter.
#[derive(Clone)]
pub struct CriKeychain(Arc<Inner>);

impl std::fmt::Debug for CriKeychain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.lock();
        f.debug_struct("CriKeychain")
            .field("ttl", &self.0.ttl)
            .field("remembered", &state.remembered.len())
            .field("running", &state.running.len())
            .finish()
    }
}

impl CriKeychain {
    /// A keychain remembering what a pull proved for `ttl`.
    pub fn new(ttl: Duration) -> Self {
        Self(Arc::new(Inner { ttl, state: Mutex::default() }))
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.0.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Notes `auth` as the credentials of a pull of `image` that containerd is about to
    /// run. They count as the image's while the returned [`Pull`] lives, and are
    /// remembered only if [`Pull::succeeded`] is called.
    pub fn pulling(&self, image: &ImageName, auth: RegistryAuth) -> Pull {
        let mut state = self.lock();
        let id = state.next_id;
        state.next_id += 1;
        let bound = Bound { registry: image.registry.clone(), auth };
        state.running.entry(image.key.clone()).or_default().push(Running { id, bound });
        Pull { keychain: self.clone(), image: image.key.clone(), id }
    }

    /// The credentials for a model of `image`: those of the newest pull of it still
    /// running, else those remembered from a successful one, if not expired.
    pub fn for_image(&self, image: &ImageKey) -> Option<CriCredentials> {
        self.for_image_at(image, Instant::now())
    }

    fn for_image_at(&self, image: &ImageKey, now: Instant) -> Option<CriCredentials> {
        let bound = {
            let state = self.lock();
            let running = state.running.get(image).and_then(|pulls| pulls.last()).map(|p| p.bound.clone());
            running.or_else(|| remembered(&state, image, now))?
        };
        Some(CriCredentials {
            image: image.clone(),
            registry: bound.registry,
            held: Arc::new(Mutex::new(bound.auth)),
            keychain: self.clone(),
        })
    }

    /// Ends pull `id` of `image`; remembers its credentials under `image` and `aliases`
    /// (until `now` + ttl) if it succeeded.
    fn finish(&self, image: &ImageKey, id: u64, succeeded: Option<(&[ImageKey], Instant)>) {
        let mut state = self.lock();
        let Some(pulls) = state.running.get_mut(image) else { return };
        let Some(at) = pulls.iter().position(|p| p.id == id) else { return };
        let pull = pulls.remove(at);
        if pulls.is_empty() {
            state.running.remove(image);
        }
        let Some((aliases, now)) = succeeded else { return };
        state.remembered.retain(|_, r| r.until > now);
        let until = now + self.0.ttl;
        for key in std::iter::once(image).chain(aliases) {
            state.remembered.insert(key.clone(), Remembered { bound: pull.bound.clone(), until });
        }
    }
}

/// What is remembered for `image` at `now`, if anything.
fn remembered(state: &State, image: &ImageKey, now: Instant) -> Option<Bound> {
    state.remembered.get(image).filter(|r| r.until > now).map(|r| r.bound.clone())
}

/// One pull's credentials while containerd pulls with them; forgotten when dropped,
/// unless the pull [`succeeded`](Self::succeeded).
#[derive(Debug)]
pub struct Pull {
    keychain: CriKeychain,
    image: ImageKey,
    id: u64,
}

impl Pull {
    /// containerd pulled the image with these credentials: remember them under the
    /// image, and under `aliases` (what containerd answered the pull with).
    pub fn succeeded(self, aliases: &[ImageKey]) {
        self.keychain.finish(&self.image, self.id, Some((aliases, Instant::now())));
    }
}

impl Drop for Pull {
    fn drop(&mut self) {
        // After `succeeded` the pull is no longer running, and this finds nothing.
        self.keychain.finish(&self.image, self.id, None);
    }
}

/// The credentials a model of one image was opened with, bound to that image's registry.
/// `Debug` shows the image and registry only.
#[derive(Clone)]
pub struct CriCredentials {
    image: ImageKey,
    registry: String,
    /// The copy in use, which outlives the keychain's memory.
    held: Arc<Mutex<RegistryAuth>>,
    keychain: CriKeychain,
}

impl std::fmt::Debug for CriCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CriCredentials").field("image", &self.image).field("registry", &self.registry).finish()
    }
}

impl CriCredentials {
    /// The image whose pull supplied them.
    pub fn image(&self) -> &ImageKey {
        &self.image
    }

    /// The only registry host they are sent to.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The credentials to send to `registry`: none unless it is the image's own. Then
    /// what a successful pull of the image proved most recently, if the keychain still
    /// remembers it (credentials renewed by a later pull), else the copy held.
    pub fn for_registry(&self, registry: &str) -> Option<RegistryAuth> {
        self.for_registry_at(registry, Instant::now())
    }

    fn for_registry_at(&self, registry: &str, now: Instant) -> Option<RegistryAuth> {
        if registry != self.registry {
            return None;
        }
        let renewed = remembered(&self.keychain.lock(), &self.image, now).filter(|b| b.registry == self.registry);
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(renewed) = renewed {
            *held = renewed.auth;
        }
        Some(held.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "good-Secret-5e1d";
    const BAD: &str = "bad-Secret-0b7a";

    fn basic(password: &str) -> RegistryAuth {
        RegistryAuth::Basic("alice".into(), password.into())
    }

    fn name(image: &str) -> ImageName {
        ImageName::parse(image).unwrap()
    }

    fn password(c: &CriCredentials, registry: &str, now: Instant) -> Option<String> {
        match c.for_registry_at(registry, now)? {
            RegistryAuth::Basic(_, p) => Some(p),
            other => panic!("basic credentials expected, got {other:?}"),
        }
    }

    #[test]
    fn keys_are_normalised_as_containerd_writes_them() {
        let digest = format!("sha256:{}", "a".repeat(64));
        for (given, key, registry) in [
            ("busybox", "docker.io/library/busybox:latest", "index.docker.io"),
            ("docker.io/library/busybox:1", "docker.io/library/busybox:1", "index.docker.io"),
            ("127.0.0.1:5000/models/m:v1", "127.0.0.1:5000/models/m:v1", "127.0.0.1:5000"),
            ("127.0.0.1:5000/models/m", "127.0.0.1:5000/models/m:latest", "127.0.0.1:5000"),
            (
                &format!("127.0.0.1:5000/models/m@{digest}"),
                &format!("127.0.0.1:5000/models/m@{digest}"),
                "127.0.0.1:5000",
            ),
            (
                &format!("127.0.0.1:5000/models/m:v1@{digest}"),
                &format!("127.0.0.1:5000/models/m@{digest}"),
                "127.0.0.1:5000",
            ),
        ] {
            let parsed = name(given);
            assert_eq!((parsed.key.to_string().as_str(), parsed.registry.as_str()), (key, registry), "{given}");
            assert_eq!(ImageKey::parse(given).unwrap(), parsed.key);
        }
        assert_eq!(ImageKey::parse(&digest).unwrap().to_string(), digest, "an image id is its own key");
        assert!(ImageName::parse(&digest).is_err(), "an image id names no registry");
        assert!(ImageKey::parse("Not A Reference").is_err());
    }

    #[test]
    fn credentials_are_remembered_only_once_their_pull_succeeded() {
        let keychain = CriKeychain::new(Duration::from_secs(60));
        let image = name("127.0.0.1:5000/models/m:v1");
        let id = ImageKey::parse(&format!("sha256:{}", "b".repeat(64))).unwrap();
        assert!(keychain.for_image(&image.key).is_none());

        let pull = keychain.pulling(&image, basic(BAD));
        let during = keychain.for_image(&image.key).expect("the running pull's credentials");
        assert_eq!(password(&during, "127.0.0.1:5000", Instant::now()).as_deref(), Some(BAD));
        drop(pull);
        assert!(keychain.for_image(&image.key).is_none(), "a failed pull leaves nothing behind");

        keychain.pulling(&image, basic(GOOD)).succeeded(std::slice::from_ref(&id));
        for key in [&image.key, &id] {
            let found = keychain.for_image(key).expect("remembered");
            assert_eq!(password(&found, "127.0.0.1:5000", Instant::now()).as_deref(), Some(GOOD));
        }
    }

    #[test]
    fn a_failed_pull_never_replaces_credentials_that_worked() {
        // The attack: another tenant pulls the same image with a wrong password, to break
        // the models of those who hold the right one.
        let keychain = CriKeychain::new(Duration::from_secs(60));
        let image = name("127.0.0.1:5000/models/m:v1");
        keychain.pulling(&image, basic(GOOD)).succeeded(&[]);
        let mounted = keychain.for_image(&image.key).unwrap();
        drop(keychain.pulling(&image, basic(BAD)));
        let later = keychain.for_image(&image.key).unwrap();
        for c in [&mounted, &later] {
            assert_eq!(password(c, "127.0.0.1:5000", Instant::now()).as_deref(), Some(GOOD));
        }
    }

    #[test]
    fn the_newest_running_pull_wins_and_each_ends_alone() {
        let keychain = CriKeychain::new(Duration::from_secs(60));
        let image = name("127.0.0.1:5000/models/m:v1");
        let first = keychain.pulling(&image, basic("first"));
        let second = keychain.pulling(&image, basic("second"));
        let now = Instant::now();
        assert_eq!(password(&keychain.for_image(&image.key).unwrap(), "127.0.0.1:5000", now).unwrap(), "second");
        drop(second);
        assert_eq!(password(&keychain.for_image(&image.key).unwrap(), "127.0.0.1:5000", now).unwrap(), "first");
        first.succeeded(&[]);
        assert_eq!(password(&keychain.for_image(&image.key).unwrap(), "127.0.0.1:5000", now).unwrap(), "first");
    }

    #[test]
    fn credentials_go_to_their_images_registry_alone() {
        // The attack: a companion whose labels or lazy index send the model's fetches to
        // another host, which would then receive the image's credentials.
        let keychain = CriKeychain::new(Duration::from_secs(60));
        let image = name("127.0.0.1:5000/models/m:v1");
        keychain.pulling(&image, basic(GOOD)).succeeded(&[]);
        let found = keychain.for_image(&image.key).unwrap();
        assert_eq!(found.registry(), "127.0.0.1:5000");
        let now = Instant::now();
        for other in ["127.0.0.1:5001", "127.0.0.1", "evil.example.com", "127.0.0.1:5000.evil.example.com", ""] {
            assert_eq!(password(&found, other, now), None, "{other}");
        }
        // Another image of the same registry has credentials of its own, or none.
        assert!(keychain.for_image(&name("127.0.0.1:5000/models/other:v1").key).is_none());
        let shown = format!("{keychain:?} {found:?}");
        assert!(!shown.contains(GOOD) && shown.contains("127.0.0.1:5000"), "{shown}");
    }

    #[test]
    fn remembered_credentials_expire_but_a_model_keeps_its_copy() {
        let ttl = Duration::from_secs(60);
        let keychain = CriKeychain::new(ttl);
        let image = name("127.0.0.1:5000/models/m:v1");
        keychain.pulling(&image, basic(GOOD)).succeeded(&[]);
        let now = Instant::now();
        let mounted = keychain.for_image_at(&image.key, now).unwrap();
        let later = now + ttl + Duration::from_secs(1);
        assert!(keychain.for_image_at(&image.key, later).is_none(), "forgotten after the ttl");
        assert_eq!(password(&mounted, "127.0.0.1:5000", later).as_deref(), Some(GOOD), "the model's own copy");

        // A later pull with renewed credentials reaches the mounted model when the
        // registry refuses its copy, and the renewed copy stays after that pull expires.
        keychain.pulling(&image, basic("renewed")).succeeded(&[]);
        assert_eq!(password(&mounted, "127.0.0.1:5000", Instant::now()).as_deref(), Some("renewed"));
        assert_eq!(password(&mounted, "127.0.0.1:5000", Instant::now() + ttl * 2).as_deref(), Some("renewed"));
    }
}
