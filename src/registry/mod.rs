//! The only module that speaks HTTP: an OCI distribution client for one repository,
//! reached through the hosts the node configures for its registry ([`hosts`]:
//! containerd's `hosts.toml`, so mirrors and P2P proxies are tried first), with
//! credentials and retries.
//!
//! Reads say how many bytes they expect and get exactly that many or an error: a short,
//! long or failed body is retried with exponential backoff up to the configured budget.
//! Every attempt tries the hosts able to answer in order; a host that failed is tried
//! after the others for a while. Verification against digests is the caller's job
//! ([`crate::blob`]), except for manifests and small blobs fetched whole, which are
//! checked here, so a mirror is trusted with nothing.
//!
//! Credentials ([`credentials`]) are looked up under the registry's name for the
//! registry itself and under its own name for a mirror, read when a client is made and
//! read again when a host refuses a request (401 or 403): the request is then tried
//! once more with what the source holds now, so a long-lived mount outlives credentials
//! that expire. No error message carries a secret: text a registry sent back is
//! redacted first.

pub mod credentials;
pub mod hosts;
mod reference;
mod transport;

use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use http::Method;
use oci_client::Reference;

use self::credentials::{CredentialStore, Credentials};
pub use self::transport::ClientPool;
use self::transport::{challenge_of, small_body, status_attempt, with_auth, Access, Auth, Host};
use crate::config::RegistrySettings;
use crate::metrics::{self, FailureKind as Kind};
use crate::modelpack::media;
use crate::modelpack::referrers::{self, ReferrersList};
use crate::modelpack::Digest;

/// The largest manifest or config we accept, against a registry that sends garbage.
pub const MAX_SMALL_BLOB: u64 = 4 << 20;

/// Why a registry operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The reference is not a valid image reference.
    #[error("invalid reference {reference:?}: {reason}")]
    BadReference { reference: String, reason: String },
    /// The registry says the thing does not exist.
    #[error("{what} not found in {reference}")]
    NotFound { what: String, reference: String },
    /// The registry refused our credentials or asked for some, even after they were
    /// read again.
    #[error("access to {reference} denied: {detail}")]
    Unauthorized { reference: String, detail: String },
    /// Failed after every retry.
    #[error("{what} from {reference} failed after {attempts} attempts: {last}")]
    Exhausted { what: String, reference: String, attempts: u32, last: String },
    /// The registry answered with something we cannot accept (and retrying won't help).
    #[error("{what} from {reference}: {detail}")]
    Invalid { what: String, reference: String, detail: String },
    /// Reading a local file to push failed.
    #[error("reading {path}: {source}")]
    LocalIo { path: String, source: std::io::Error },
    /// The node's configuration of a registry host cannot be used (a hosts.toml, a CA
    /// or client certificate file).
    #[error("registry host configuration for {host}: {detail}")]
    Config { host: String, detail: String },
    /// No configured host of the registry may be asked for this.
    #[error("no host of {registry} is configured to {what} (capabilities in hosts.toml)")]
    NoHost { registry: String, what: &'static str },
}

/// One attempt's failure, sorted by whether trying again can help.
enum Attempt {
    /// Worth another try; the kind is what the metrics count it as.
    Retry(Kind, String),
    /// Refused: worth one more try with credentials read again.
    Denied(RegistryError),
    Fatal(RegistryError),
}

/// What a request needs of a host (hosts.toml `capabilities`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Need {
    /// A manifest by tag.
    Resolve,
    /// A blob, or a manifest by digest.
    Pull,
    Push,
}

impl Need {
    fn allowed_by(self, host: &Host) -> bool {
        let caps = host.config.capabilities;
        match self {
            Self::Resolve => caps.resolve,
            Self::Pull => caps.pull,
            Self::Push => caps.push,
        }
    }

    fn verb(self) -> &'static str {
        match self {
            Self::Resolve => "resolve tags",
            Self::Pull => "pull",
            Self::Push => "push",
        }
    }
}

/// Credentials for every host, and what was derived from them (tokens), renewed
/// together when a host refuses them.
struct Session {
    auths: Vec<Auth>,
    /// Counts renewals, so that many requests refused at once renew only once.
    generation: u64,
}

/// A client for one repository of one registry.
pub struct Registry {
    session: RwLock<Arc<Session>>,
    /// Held while credentials are read again.
    renewing: tokio::sync::Mutex<()>,
    credentials: CredentialStore,
    /// The hosts of the registry in the order they are tried, or why the node's
    /// configuration of them cannot be used (every request fails with it). Shared by the
    /// clients [`Registry::with_reference`] makes for the same repository.
    hosts: Result<Arc<[Host]>, Unusable>,
    reference: Reference,
    settings: RegistrySettings,
}

/// Why the node's configuration of a registry's hosts cannot be used.
#[derive(Debug, Clone)]
struct Unusable {
    host: String,
    detail: String,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry").field("reference", &self.reference.whole()).finish_non_exhaustive()
    }
}

/// Parses an image reference such as `127.0.0.1:5000/models/demo:v1` or
/// `registry.example.com/m@sha256:...`.
pub fn parse_reference(s: &str) -> Result<Reference, RegistryError> {
    reference::parse(s)
        .map_err(|reason| RegistryError::BadReference { reference: s.to_owned(), reason: reason.to_owned() })
}

/// Whether a registry host (with optional port) is on loopback, where containerd and we
/// speak plain HTTP unless the hosts directory says otherwise.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Credentials for `name` from `store`; anonymous, with a warning, when the source
/// fails (the error names the source, never a secret).
fn read_credentials(store: &CredentialStore, name: &str) -> Credentials {
    match store.get(name) {
        Ok(credentials) => {
            tracing::debug!(registry = name, source = %credentials.source, "registry credentials");
            credentials
        }
        Err(e) => {
            tracing::warn!(registry = name, error = %e, "cannot read registry credentials; trying anonymously");
            Credentials::anonymous()
        }
    }
}

/// A streamed blob body.
pub type BlobStream = futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>;

impl Registry {
    /// A client for `reference`'s repository, with credentials from `settings`' store,
    /// else from Docker's configuration. A credential helper gets as long as one request
    /// (`request_timeout`) to answer.
    pub fn new(reference: Reference, settings: RegistrySettings) -> Self {
        let store = settings.credentials.clone().unwrap_or_else(|| CredentialStore::from_env(settings.request_timeout));
        Self::with_credentials(reference, settings, store)
    }

    /// A client for `reference`'s repository, with credentials from `store`.
    pub fn with_credentials(reference: Reference, settings: RegistrySettings, store: CredentialStore) -> Self {
        let registry = reference.resolve_registry().to_owned();
        let timeouts = (settings.connect_timeout, settings.request_timeout);
        let hosts = settings
            .hosts
            .hosts(reference.registry())
            .map(|configs| configs.into_iter().map(|c| Host::new(c, &settings.clients, timeouts)).collect::<Arc<[_]>>())
            .map_err(|e| Unusable { host: reference.registry().to_owned(), detail: e.to_string() });
        if let Ok(hosts) = &hosts {
            if hosts.len() > 1 {
                let order: Vec<String> = hosts.iter().map(|h| h.config.base()).collect();
                tracing::debug!(registry, hosts = ?order, "registry hosts from the hosts directory");
            }
        }
        let auths = credentials_for(&store, &registry, hosts.as_deref().unwrap_or_default());
        Self {
            session: RwLock::new(Arc::new(Session { auths, generation: 0 })),
            renewing: tokio::sync::Mutex::new(()),
            credentials: store,
            hosts,
            reference,
            settings,
        }
    }

    fn session(&self) -> Arc<Session> {
        self.session.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the credentials again after `refused` was refused, unless another request
    /// already did since; later requests use them (and ask for fresh tokens).
    async fn renew(&self, refused: &Session) {
        let _renewing = self.renewing.lock().await;
        if self.session().generation != refused.generation {
            return;
        }
        let registry = self.reference.resolve_registry().to_owned();
        tracing::debug!(registry, "registry refused the credentials; reading them again");
        let store = self.credentials.clone();
        let hosts = self.hosts.clone();
        let auths = tokio::task::spawn_blocking(move || {
            credentials_for(&store, &registry, hosts.as_deref().unwrap_or_default())
        })
        .await
        .unwrap_or_default();
        let session = Session { auths, generation: refused.generation + 1 };
        *self.session.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(session);
    }

    fn host_list(&self) -> &[Host] {
        self.hosts.as_deref().unwrap_or_default()
    }

    /// The reference this client was made for.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// A client for another tag or digest, with credentials from the same source. In
    /// the same repository it shares this client's hosts and what its credentials
    /// earned (tokens are per repository): no second read of the hosts file or of the
    /// credentials, and no second round of authentication.
    pub fn with_reference(&self, reference: Reference) -> Self {
        let same_repository =
            reference.registry() == self.reference.registry() && reference.repository() == self.reference.repository();
        if !same_repository {
            return Self::with_credentials(reference, self.settings.clone(), self.credentials.clone());
        }
        Self {
            session: RwLock::new(self.session()),
            renewing: tokio::sync::Mutex::new(()),
            credentials: self.credentials.clone(),
            hosts: self.hosts.clone(),
            reference,
            settings: self.settings.clone(),
        }
    }

    fn name(&self) -> String {
        self.reference.whole()
    }

    fn invalid(&self, what: &str, detail: String) -> RegistryError {
        RegistryError::Invalid { what: what.to_owned(), reference: self.name(), detail }
    }

    /// The hosts to try for `need`, in order: those that failed lately go last.
    fn candidates(&self, need: Need) -> Result<Vec<usize>, RegistryError> {
        let hosts = match &self.hosts {
            Ok(hosts) => hosts,
            Err(Unusable { host, detail }) => {
                return Err(RegistryError::Config { host: host.clone(), detail: detail.clone() })
            }
        };
        let able: Vec<usize> = (0..hosts.len()).filter(|&i| need.allowed_by(&hosts[i])).collect();
        if able.is_empty() {
            return Err(RegistryError::NoHost { registry: self.reference.registry().to_owned(), what: need.verb() });
        }
        let (up, down): (Vec<usize>, Vec<usize>) = able.into_iter().partition(|&i| !hosts[i].is_down());
        Ok(up.into_iter().chain(down).collect())
    }

    /// Runs `op` on the hosts able to answer `need`, in order, with the retry budget:
    /// an attempt goes through the hosts until one succeeds; then what the last one
    /// said decides whether to try again, except that any host's "not found" outweighs
    /// hosts that could not be reached or failed in a way another try could mend. A
    /// refusal is tried once more, straight away and outside the budget, with
    /// credentials read again. Each host's try is bounded by `limit`.
    async fn with_retries<T, F, Fut>(
        &self,
        what: &str,
        need: Need,
        limit: Option<Duration>,
        mut op: F,
    ) -> Result<T, RegistryError>
    where
        F: FnMut(Arc<Session>, usize) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let attempts = self.settings.retries + 1;
        let mut delay = self.settings.backoff;
        let mut last = String::new();
        let mut renewed = false;
        let mut attempt = 1;
        // The last failed try, counted as a retry once another follows, else as the error.
        let mut failed: Option<(usize, Kind)> = None;
        loop {
            let session = self.session();
            let candidates = self.candidates(need)?;
            let mut outcome = None;
            let mut not_found = None;
            for (n, &i) in candidates.iter().enumerate() {
                let host = &self.host_list()[i];
                if let Some((i, kind)) = failed.take() {
                    metrics::registry_retry(&self.host_list()[i].config.authority, kind);
                }
                let result = match limit {
                    Some(limit) => tokio::time::timeout(limit, op(session.clone(), i))
                        .await
                        .unwrap_or_else(|_| Err(Attempt::Retry(Kind::Timeout, format!("timed out after {limit:?}")))),
                    None => op(session.clone(), i).await,
                };
                match result {
                    Ok(v) => {
                        host.mark(true);
                        return Ok(v);
                    }
                    Err(e) => {
                        failed = Some((i, e.kind()));
                        if let Attempt::Retry(_, msg) = &e {
                            host.mark(false);
                            last = msg.clone();
                        }
                        if n + 1 < candidates.len() {
                            let why = match &e {
                                Attempt::Retry(_, msg) => msg.clone(),
                                Attempt::Denied(e) | Attempt::Fatal(e) => e.to_string(),
                            };
                            tracing::debug!(what, host = %host.config.base(), error = %why, "registry host failed; trying the next");
                        }
                        match e {
                            Attempt::Fatal(e @ RegistryError::NotFound { .. }) => not_found = Some(e),
                            e => outcome = Some(e),
                        }
                    }
                }
            }
            // A host that answered "not found" outweighs hosts that could not answer (a
            // mirror's 404 while the origin is down); it is final only if no other did.
            let outcome = match (outcome, not_found) {
                (Some(Attempt::Retry(..)) | None, Some(e)) => Some(Attempt::Fatal(e)),
                (outcome, _) => outcome,
            };
            match outcome {
                Some(Attempt::Denied(_)) if !renewed => {
                    renewed = true;
                    self.renew(&session).await;
                    continue;
                }
                Some(Attempt::Denied(e) | Attempt::Fatal(e)) => {
                    self.count_error(failed, Some(kind_of(&e)));
                    return Err(e);
                }
                Some(Attempt::Retry(..)) | None => {}
            }
            if attempt == attempts {
                break;
            }
            tracing::debug!(what, attempt, error = %last, "registry request failed; retrying");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
            attempt += 1;
        }
        self.count_error(failed, None);
        Err(RegistryError::Exhausted { what: what.to_owned(), reference: self.name(), attempts, last })
    }

    /// Counts a request that failed for good, under the host its last try went to, as
    /// `kind` or else as that try's kind.
    fn count_error(&self, failed: Option<(usize, Kind)>, kind: Option<Kind>) {
        if let Some((i, last)) = failed {
            metrics::registry_error(&self.host_list()[i].config.authority, kind.unwrap_or(last));
        }
    }

    /// Sends what `build` makes to host `i`, answering one authentication challenge
    /// (the request is built again, so its body must be one that can be). Any answer
    /// but a refusal is returned, success or not.
    async fn send(
        &self,
        session: &Session,
        i: usize,
        access: Access,
        build: impl Fn(&Host) -> Result<reqwest::RequestBuilder, Attempt>,
    ) -> Result<reqwest::Response, Attempt> {
        let host = &self.host_list()[i];
        let auth = &session.auths[i];
        let response =
            with_auth(build(host)?, auth.cached(access)).send().await.map_err(|e| transport_attempt(auth, &e))?;
        let Some(challenge) = challenge_of(&response) else { return Ok(response) };
        drop(response);
        let header = auth.authorize(host, challenge.as_ref(), self.reference.repository(), access).await?;
        with_auth(build(host)?, Some(header)).send().await.map_err(|e| transport_attempt(auth, &e))
    }

    /// `response` if it is a success, else the sorted failure.
    async fn success(
        &self,
        session: &Session,
        i: usize,
        what: &str,
        response: reqwest::Response,
    ) -> Result<reqwest::Response, Attempt> {
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let said = small_body(response).await.unwrap_or_default();
        let said = session.auths[i].text(&String::from_utf8_lossy(&said));
        Err(status_attempt(status, what, &self.name(), &said))
    }

    /// `repository/<kind>/<name>` on host `i`.
    fn url(&self, i: usize, kind: &str, name: &str) -> String {
        let path = format!("{}/{kind}/{name}", self.reference.repository());
        self.host_list()[i].url(self.reference.registry(), &path)
    }

    /// The manifest bytes the reference names, and their digest. A digest reference is
    /// verified against the bytes.
    pub async fn fetch_manifest(&self) -> Result<(Bytes, Digest), RegistryError> {
        let accept = [media::OCI_MANIFEST, media::OCI_INDEX, media::DOCKER_MANIFEST].join(", ");
        let what = "manifest";
        let (name, need) = match self.reference.digest() {
            Some(digest) => (digest.to_owned(), Need::Pull),
            None => (self.reference.tag().unwrap_or("latest").to_owned(), Need::Resolve),
        };
        let (accept, name) = (accept.as_str(), name.as_str());
        self.with_retries(what, need, Some(self.settings.request_timeout), |session, i| async move {
            let url = self.url(i, "manifests", name);
            let response = self
                .send(&session, i, Access::Pull, |h| {
                    Ok(h.request(Method::GET, &url)?.header(http::header::ACCEPT, accept))
                })
                .await?;
            let response = self.success(&session, i, what, response).await?;
            let header =
                response.headers().get("docker-content-digest").and_then(|v| v.to_str().ok()).map(str::to_owned);
            let body = read_limited(response, MAX_SMALL_BLOB).await.map_err(|e| match e {
                Limited::TooLarge => {
                    Attempt::Fatal(self.invalid(what, format!("manifest larger than {MAX_SMALL_BLOB} bytes")))
                }
                Limited::Body(e) => Attempt::Retry(Kind::ShortBody, format!("body: {e}")),
            })?;
            let actual = Digest::of(&body);
            if let Some(pinned) = self.reference.digest() {
                if pinned != actual.to_string() {
                    return Err(Attempt::Retry(
                        Kind::Digest,
                        format!("manifest digest {actual} does not match {pinned}"),
                    ));
                }
            }
            if header.as_deref().is_some_and(|h| h != actual.to_string()) {
                tracing::debug!(header = ?header, %actual, "registry reported another manifest digest");
            }
            Ok((body, actual))
        })
        .await
    }

    /// A whole small blob (a config), verified against its digest.
    pub async fn fetch_small_blob(&self, digest: &Digest, size: u64) -> Result<Bytes, RegistryError> {
        let what = format!("blob {digest}");
        if size > MAX_SMALL_BLOB {
            return Err(self.invalid(&what, format!("size {size} exceeds the {MAX_SMALL_BLOB}-byte limit")));
        }
        let bytes = if size == 0 { Bytes::new() } else { self.read_range(digest, 0, size).await? };
        if Digest::of(&bytes) != *digest {
            return Err(self.invalid(&what, "content does not match its digest".to_owned()));
        }
        Ok(bytes)
    }

    /// Exactly `len` bytes of `blob` from `offset` (a ranged GET), retried on failure.
    /// The bytes are not verified here.
    pub async fn read_range(&self, blob: &Digest, offset: u64, len: u64) -> Result<Bytes, RegistryError> {
        let mut pieces = self.read_range_pieces(blob, offset, len, len).await?;
        Ok(pieces.pop().unwrap_or_default())
    }

    /// [`Self::read_range`] received into buffers of `piece` bytes each (the last may be
    /// shorter), every one page-aligned: one copy out of the socket, as into one buffer,
    /// and a piece kept alive keeps only its own memory.
    pub async fn read_range_pieces(
        &self,
        blob: &Digest,
        offset: u64,
        len: u64,
        piece: u64,
    ) -> Result<Vec<Bytes>, RegistryError> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let piece = piece.clamp(1, len);
        let what = format!("bytes {offset}+{len} of blob {blob}");
        let digest = blob.to_string();
        let range = format!("bytes={offset}-{}", offset + len - 1);
        let (what, digest, range) = (what.as_str(), digest.as_str(), range.as_str());
        self.with_retries(what, Need::Pull, Some(self.settings.request_timeout), |session, i| async move {
            let started = std::time::Instant::now();
            let url = self.url(i, "blobs", digest);
            let response = self
                .send(&session, i, Access::Pull, |h| {
                    Ok(h.request(Method::GET, &url)?.header(http::header::RANGE, range))
                })
                .await?;
            let mut response = self.success(&session, i, what, response).await?;
            // A registry that ignores Range sends the whole blob: skip to our window.
            let whole = response.status() != http::StatusCode::PARTIAL_CONTENT;
            let mut skip = if whole { offset } else { 0 };
            let mut out = PiecedBody::new(len, piece);
            while let Some(mut received) =
                response.chunk().await.map_err(|e| Attempt::Retry(Kind::ShortBody, format!("body: {e}")))?
            {
                if skip > 0 {
                    let n = skip.min(received.len() as u64);
                    skip -= n;
                    received = received.slice(n as usize..);
                }
                let room = (len - out.received()) as usize;
                if received.len() > room {
                    if !whole {
                        return Err(Attempt::Retry(Kind::LongBody, format!("long body: more than {len} bytes")));
                    }
                    out.extend_from_slice(&received[..room]);
                    break;
                }
                out.extend_from_slice(&received);
            }
            if out.received() != len {
                return Err(Attempt::Retry(
                    Kind::ShortBody,
                    format!("short body: got {} of {len} bytes", out.received()),
                ));
            }
            metrics::registry_request(&self.host_list()[i].config.authority, len, started.elapsed());
            Ok(out.freeze())
        })
        .await
    }

    /// Streams a blob from `offset` to its end, for a caller that hashes every byte
    /// itself (`convert`, the unpacking of a compressed layer) and verifies the digest
    /// and the size. Only the answer's
    /// start is bounded by the request timeout; the body flows as long as it keeps coming.
    pub async fn stream_blob(&self, blob: &Digest, offset: u64) -> Result<BlobStream, RegistryError> {
        let what = format!("blob {blob}");
        let digest = blob.to_string();
        let (what, digest) = (what.as_str(), digest.as_str());
        self.with_retries(what, Need::Pull, Some(self.settings.request_timeout), |session, i| async move {
            let url = self.url(i, "blobs", digest);
            let range = format!("bytes={offset}-");
            let response = self
                .send(&session, i, Access::Pull, |h| {
                    // No Range from 0: `bytes=0-` is unsatisfiable for an empty blob.
                    let request = h.request(Method::GET, &url)?;
                    Ok(if offset == 0 { request } else { request.header(http::header::RANGE, range.as_str()) })
                })
                .await?;
            let response = self.success(&session, i, what, response).await?;
            let whole = response.status() != http::StatusCode::PARTIAL_CONTENT;
            let stream = response.bytes_stream().map_err(std::io::Error::other);
            if !whole || offset == 0 {
                return Ok(stream.boxed());
            }
            let mut skip = offset;
            Ok(stream
                .map_ok(move |mut piece| {
                    let n = skip.min(piece.len() as u64);
                    skip -= n;
                    piece.split_off(n as usize)
                })
                .boxed())
        })
        .await
    }

    /// Whether the repository already has a blob.
    pub async fn blob_exists(&self, blob: &Digest) -> Result<bool, RegistryError> {
        let what = format!("blob {blob}");
        let digest = blob.to_string();
        let (what, digest) = (what.as_str(), digest.as_str());
        self.with_retries(what, Need::Push, Some(self.settings.request_timeout), |session, i| async move {
            let url = self.url(i, "blobs", digest);
            let response = self.send(&session, i, Access::Push, |h| h.request(Method::HEAD, &url)).await?;
            if response.status() == http::StatusCode::NOT_FOUND {
                return Ok(false);
            }
            self.success(&session, i, what, response).await.map(|_| true)
        })
        .await
    }

    /// Starts an upload on host `i`: the URL to `PUT` the blob to.
    async fn start_upload(&self, session: &Session, i: usize, what: &str, digest: &str) -> Result<String, Attempt> {
        let url = self.url(i, "blobs", "uploads/");
        let response = self.send(session, i, Access::Push, |h| h.request(Method::POST, &url)).await?;
        let response = self.success(session, i, what, response).await?;
        let location = response
            .headers()
            .get(http::header::LOCATION)
            .and_then(|l| l.to_str().ok())
            .ok_or_else(|| Attempt::Fatal(self.invalid(what, "upload started without a Location".to_owned())))?;
        let base = reqwest::Url::parse(&url).map_err(|e| Attempt::Fatal(self.invalid(what, e.to_string())))?;
        let mut put = base
            .join(location)
            .map_err(|_| Attempt::Fatal(self.invalid(what, format!("bad upload Location {location:?}"))))?;
        put.query_pairs_mut().append_pair("digest", digest);
        Ok(put.to_string())
    }

    /// Uploads an in-memory blob (configs, manifests' neighbours).
    pub async fn push_bytes(&self, data: Bytes, digest: &Digest) -> Result<(), RegistryError> {
        let what = format!("upload of blob {digest}");
        let digest = digest.to_string();
        let (what, digest) = (what.as_str(), digest.as_str());
        self.with_retries(what, Need::Push, Some(self.settings.request_timeout), |session, i| {
            let data = data.clone();
            async move {
                let put = self.start_upload(&session, i, what, digest).await?;
                let response = self
                    .send(&session, i, Access::Push, |h| {
                        Ok(h.request(Method::PUT, &put)?
                            .header(http::header::CONTENT_TYPE, "application/octet-stream")
                            .body(data.clone()))
                    })
                    .await?;
                self.success(&session, i, what, response).await.map(drop)
            }
        })
        .await
    }

    /// Uploads a file as a blob in one streamed request, calling `progress` with the
    /// bytes sent so far. No request timeout: an upload takes as long as the file needs.
    pub async fn push_file(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
        progress: impl Fn(u64) + Send + Sync + Clone + 'static,
    ) -> Result<(), RegistryError> {
        let what = format!("upload of {}", path.display());
        let digest = digest.to_string();
        let local_err = |source| RegistryError::LocalIo { path: path.display().to_string(), source };
        // Opened once here, so that a missing file is a local error, not a retry.
        drop(std::fs::File::open(path).map_err(local_err)?);
        let (what, digest) = (what.as_str(), digest.as_str());
        self.with_retries(what, Need::Push, None, |session, i| {
            let progress = progress.clone();
            async move {
                let put = self.start_upload(&session, i, what, digest).await?;
                let file = tokio::fs::File::open(path).await.map_err(|e| Attempt::Fatal(local_err(e)))?;
                let body = file_stream(file, progress);
                // Built once: a stream cannot be sent twice, and the upload's start
                // already answered any challenge, so its token is cached.
                let body = Mutex::new(Some(reqwest::Body::wrap_stream(body)));
                let response = self
                    .send(&session, i, Access::Push, |h| {
                        let body = body.lock().unwrap_or_else(|e| e.into_inner()).take();
                        let body = body.ok_or_else(|| {
                            Attempt::Retry(Kind::Denied, "upload refused after it started".to_owned())
                        })?;
                        Ok(h.request(Method::PUT, &put)?
                            .header(http::header::CONTENT_TYPE, "application/octet-stream")
                            .header(http::header::CONTENT_LENGTH, size)
                            .body(body))
                    })
                    .await?;
                self.success(&session, i, what, response).await.map(drop)
            }
        })
        .await
    }

    /// The referrers of `subject` (a manifest of this repository): the registry's
    /// referrers API, or, where the registry has none (it answers 404), the image index
    /// under the referrers tag (empty when there is none). Nothing listed is trusted:
    /// the list is bounded in bytes and entries, and names candidates only.
    pub async fn referrers(&self, subject: &Digest) -> Result<ReferrersList, RegistryError> {
        let what = format!("referrers of {subject}");
        let name = subject.to_string();
        let (what, name) = (what.as_str(), name.as_str());
        let body = self
            .with_retries(what, Need::Pull, Some(self.settings.request_timeout), |session, i| async move {
                let url = self.url(i, "referrers", name);
                let response = self
                    .send(&session, i, Access::Pull, |h| {
                        Ok(h.request(Method::GET, &url)?.header(http::header::ACCEPT, media::OCI_INDEX))
                    })
                    .await?;
                let response = self.success(&session, i, what, response).await?;
                read_limited(response, MAX_SMALL_BLOB).await.map_err(|e| match e {
                    Limited::TooLarge => Attempt::Fatal(self.invalid(what, "answer larger than 4 MiB".to_owned())),
                    Limited::Body(e) => Attempt::Retry(Kind::ShortBody, format!("body: {e}")),
                })
            })
            .await;
        let body = match body {
            Ok(body) => body,
            Err(RegistryError::NotFound { .. }) => return self.referrers_tag(subject).await,
            Err(e) => return Err(e),
        };
        ReferrersList::parse(&body).map_err(|e| self.invalid(what, e.to_string()))
    }

    /// The image index under the referrers tag of `subject`, byte for byte as this
    /// client keeps it (see [`referrers`]); empty when the tag does not exist. An
    /// existing tag that is not an image index is an error, as the spec asks.
    pub async fn referrers_tag(&self, subject: &Digest) -> Result<ReferrersList, RegistryError> {
        let tag = referrers::referrers_tag(subject);
        let tagged = self.with_reference(Reference::with_tag(
            self.reference.registry().to_owned(),
            self.reference.repository().to_owned(),
            tag.clone(),
        ));
        match tagged.fetch_manifest().await {
            Ok((bytes, _)) => ReferrersList::parse(&bytes).map_err(|e| tagged.invalid("referrers tag", e.to_string())),
            Err(RegistryError::NotFound { .. }) => Ok(ReferrersList::empty()),
            Err(e) => Err(e),
        }
    }

    /// Pushes `list` under the referrers tag of `subject`.
    pub async fn push_referrers_tag(&self, subject: &Digest, list: &ReferrersList) -> Result<Digest, RegistryError> {
        let tagged = self.with_reference(Reference::with_tag(
            self.reference.registry().to_owned(),
            self.reference.repository().to_owned(),
            referrers::referrers_tag(subject),
        ));
        tagged.push_manifest(Bytes::from(list.to_json()), media::OCI_INDEX).await
    }

    /// Uploads a manifest under this client's tag (or digest), returning its digest.
    pub async fn push_manifest(&self, body: Bytes, media_type: &str) -> Result<Digest, RegistryError> {
        let what = "manifest upload";
        let content_type: http::HeaderValue = media_type
            .parse()
            .map_err(|_| self.invalid(what, format!("media type {media_type:?} is not a header value")))?;
        let name = match self.reference.digest() {
            Some(digest) => digest.to_owned(),
            None => self.reference.tag().unwrap_or("latest").to_owned(),
        };
        let name = name.as_str();
        self.with_retries(what, Need::Push, Some(self.settings.request_timeout), |session, i| {
            let (body, content_type) = (body.clone(), content_type.clone());
            async move {
                let url = self.url(i, "manifests", name);
                let response = self
                    .send(&session, i, Access::Push, |h| {
                        Ok(h.request(Method::PUT, &url)?
                            .header(http::header::CONTENT_TYPE, content_type.clone())
                            .body(body.clone()))
                    })
                    .await?;
                self.success(&session, i, what, response).await.map(drop)
            }
        })
        .await?;
        Ok(Digest::of(&body))
    }
}

/// Credentials for each of `hosts`: the registry's own for the registry, a mirror's
/// own for a mirror (a registry's credentials never go to a host the hosts directory
/// names as another).
fn credentials_for(store: &CredentialStore, registry: &str, hosts: &[Host]) -> Vec<Auth> {
    hosts
        .iter()
        .map(|h| Auth::new(read_credentials(store, if h.config.mirror { &h.config.authority } else { registry })))
        .collect()
}

/// What a transport error says, with the URL's query left out.
fn transport_error(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// A request that got no answer, or not all of it: worth another try.
fn transport_attempt(auth: &Auth, e: &reqwest::Error) -> Attempt {
    let kind = if e.is_timeout() {
        Kind::Timeout
    } else if e.is_body() || e.is_decode() {
        Kind::ShortBody
    } else {
        Kind::Connect
    };
    Attempt::Retry(kind, auth.text(&transport_error(e)))
}

impl Attempt {
    /// What the metrics count this failed try as.
    fn kind(&self) -> Kind {
        match self {
            Self::Retry(kind, _) => *kind,
            Self::Denied(_) => Kind::Denied,
            Self::Fatal(e) => kind_of(e),
        }
    }
}

/// What a request that failed for good counts as.
fn kind_of(e: &RegistryError) -> Kind {
    match e {
        RegistryError::NotFound { .. } => Kind::NotFound,
        RegistryError::Unauthorized { .. } => Kind::Denied,
        RegistryError::Invalid { .. } => Kind::Status4xx,
        _ => Kind::Other,
    }
}

enum Limited {
    TooLarge,
    Body(reqwest::Error),
}

/// A whole body of at most `max` bytes.
async fn read_limited(mut response: reqwest::Response, max: u64) -> Result<Bytes, Limited> {
    if response.content_length().is_some_and(|l| l > max) {
        return Err(Limited::TooLarge);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(Limited::Body)? {
        if (body.len() + chunk.len()) as u64 > max {
            return Err(Limited::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(body))
}

/// A file read in 1 MiB pieces, reporting the bytes read so far.
fn file_stream(
    file: tokio::fs::File,
    progress: impl Fn(u64) + Send + Sync + Clone + 'static,
) -> impl futures_util::Stream<Item = std::io::Result<Bytes>> + Send + 'static {
    use tokio::io::AsyncReadExt;
    futures_util::stream::try_unfold((file, 0u64), move |(mut file, sent)| {
        let progress = progress.clone();
        async move {
            let mut buf = vec![0u8; 1 << 20];
            let n = file.read(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            buf.truncate(n);
            let sent = sent + n as u64;
            progress(sent);
            Ok(Some((Bytes::from(buf), (file, sent))))
        }
    })
}

/// Alignment of a ranged body in memory: a page, so that the cache can write its chunks
/// (each a multiple of a page from the body's start) with `O_DIRECT`, straight from the
/// body, without copying them into the page cache first.
pub const BODY_ALIGN: usize = 4096;

/// A ranged body being received into memory aligned to [`BODY_ALIGN`] (as a slice of a
/// buffer one page larger than the range): the same one copy out of the socket's
/// pieces as a plain buffer, with no `unsafe`. Buffers come from, and go back to, the
/// process's [`BodyPool`].
struct AlignedBody {
    buf: Vec<u8>,
    start: usize,
    cap: usize,
}

impl AlignedBody {
    fn new(cap: usize) -> Self {
        let mut buf = BODY_POOL.take(cap + BODY_ALIGN);
        let start = buf.as_ptr().align_offset(BODY_ALIGN).min(BODY_ALIGN);
        buf.resize(start, 0);
        Self { buf, start, cap }
    }

    fn len(&self) -> usize {
        self.buf.len() - self.start
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        debug_assert!(self.len() + bytes.len() <= self.cap, "body longer than its range");
        // Within the capacity reserved up front, so the buffer never moves.
        self.buf.extend_from_slice(bytes);
    }

    fn freeze(self) -> Bytes {
        Bytes::from_owner(PooledBody { buf: self.buf, start: self.start })
    }
}

/// A received body; its buffer goes back to the [`BodyPool`] when the last slice of it
/// is dropped.
struct PooledBody {
    buf: Vec<u8>,
    start: usize,
}

impl AsRef<[u8]> for PooledBody {
    fn as_ref(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        BODY_POOL.give(std::mem::take(&mut self.buf));
    }
}

/// Body buffers kept for reuse, by capacity, up to [`BodyPool::IDLE_BYTES`] in all.
/// Chunk bodies are all of one size and live briefly: freed to the allocator, each one
/// either costs fresh pages from the kernel (page faults, zeroing) or, once glibc's
/// adaptive threshold serves them from its per-thread arenas, fragments those arenas
/// (a 1 GiB cold read peaked 25 MiB higher). Reused, neither happens, and the process
/// holds about as many buffers as it ever had in use at once.
struct BodyPool {
    /// Idle bytes in all, and the idle buffers by capacity.
    free: Mutex<(usize, IdleBuffers)>,
}

type IdleBuffers = std::collections::BTreeMap<usize, Vec<Vec<u8>>>;

static BODY_POOL: BodyPool = BodyPool { free: Mutex::new((0, IdleBuffers::new())) };

impl BodyPool {
    /// Most idle bytes kept.
    const IDLE_BYTES: usize = 32 << 20;
    /// Smaller buffers are left to the allocator.
    const MIN_POOLED: usize = 64 << 10;

    /// An empty buffer of capacity `cap`, reused when one is idle.
    fn take(&self, cap: usize) -> Vec<u8> {
        if cap >= Self::MIN_POOLED {
            let mut free = self.free.lock().expect("body pool lock");
            if let Some(mut buf) = free.1.get_mut(&cap).and_then(Vec::pop) {
                free.0 -= cap;
                drop(free);
                buf.clear();
                return buf;
            }
        }
        Vec::with_capacity(cap)
    }

    fn give(&self, buf: Vec<u8>) {
        let cap = buf.capacity();
        if cap < Self::MIN_POOLED {
            return;
        }
        let mut free = self.free.lock().expect("body pool lock");
        if free.0 + cap <= Self::IDLE_BYTES {
            free.0 += cap;
            free.1.entry(cap).or_default().push(buf);
        }
    }
}

/// A ranged body of `len` bytes being received into [`AlignedBody`] pieces of `piece`
/// bytes, each allocated as the body reaches it.
struct PiecedBody {
    len: u64,
    piece: u64,
    received: u64,
    done: Vec<Bytes>,
    current: Option<AlignedBody>,
}

impl PiecedBody {
    fn new(len: u64, piece: u64) -> Self {
        Self { len, piece, received: 0, done: Vec::with_capacity(len.div_ceil(piece) as usize), current: None }
    }

    fn received(&self) -> u64 {
        self.received
    }

    /// Appends `bytes`, which must fit within `len`.
    fn extend_from_slice(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() {
            let (len, piece, received) = (self.len, self.piece, self.received);
            let current = self.current.get_or_insert_with(|| AlignedBody::new(piece.min(len - received) as usize));
            let take = (current.cap - current.len()).min(bytes.len());
            current.extend_from_slice(&bytes[..take]);
            self.received += take as u64;
            bytes = &bytes[take..];
            if current.len() == current.cap {
                let full = self.current.take().expect("current piece");
                self.done.push(full.freeze());
            }
        }
    }

    fn freeze(self) -> Vec<Bytes> {
        self.done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_body_received_in_pieces_lands_page_aligned_one_buffer_per_piece() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        for _ in 0..2 {
            // Received in slices that straddle the pieces' ends; the second time round,
            // from buffers the first one gave back to the pool.
            let mut body = PiecedBody::new(data.len() as u64, 100_000);
            for slice in data.chunks(65_537) {
                body.extend_from_slice(slice);
            }
            assert_eq!(body.received(), data.len() as u64);
            let pieces = body.freeze();
            assert_eq!(pieces.iter().map(Bytes::len).collect::<Vec<_>>(), [100_000, 100_000, 100_000]);
            for (i, piece) in pieces.iter().enumerate() {
                assert_eq!(piece.as_ptr() as usize % BODY_ALIGN, 0, "piece {i} is page-aligned");
                assert_eq!(&piece[..], &data[i * 100_000..(i + 1) * 100_000]);
            }
            // A slice kept alive keeps its own piece's buffer only.
            let kept = pieces[1].slice(10..20);
            drop(pieces);
            assert_eq!(&kept[..], &data[100_010..100_020]);
        }
        let mut short = PiecedBody::new(250_000, 100_000);
        short.extend_from_slice(&data[..250_000]);
        assert_eq!(short.freeze().iter().map(Bytes::len).collect::<Vec<_>>(), [100_000, 100_000, 50_000]);
    }

    #[test]
    fn a_mirror_never_gets_the_registrys_credentials() {
        let dir = tempfile::tempdir().unwrap();
        // alice:s3cret-Value-42, for the registry only.
        let config = r#"{"auths":{"127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0LVZhbHVlLTQy"}}}"#;
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let hosts = dir.path().join("certs.d/127.0.0.1:5000");
        std::fs::create_dir_all(&hosts).unwrap();
        std::fs::write(hosts.join("hosts.toml"), "[host.\"http://127.0.0.1:4001\"]\n").unwrap();
        let settings = RegistrySettings {
            hosts: hosts::HostsDir(Some(dir.path().join("certs.d"))),
            ..RegistrySettings::default()
        };
        let store = CredentialStore::new(Some(dir.path().to_owned()), None, Duration::from_secs(1));
        let registry = Registry::with_credentials(parse_reference("127.0.0.1:5000/m:v1").unwrap(), settings, store);
        let session = registry.session();
        let [mirror, server] = &session.auths[..] else { panic!("two hosts") };
        assert!(matches!(mirror.credentials.auth, oci_client::secrets::RegistryAuth::Anonymous), "the mirror");
        assert!(matches!(server.credentials.auth, oci_client::secrets::RegistryAuth::Basic(..)), "the registry");
    }

    #[test]
    fn a_client_for_the_same_repository_shares_hosts_and_tokens_and_no_other_does() {
        let registry = Registry::new(parse_reference("127.0.0.1:5000/m:v1").unwrap(), RegistrySettings::default());
        let by_digest =
            registry.with_reference(registry.reference().clone_with_digest(format!("sha256:{}", "a".repeat(64))));
        assert!(Arc::ptr_eq(&registry.session(), &by_digest.session()), "same repository: same session");
        let hosts = |r: &Registry| r.hosts.as_ref().unwrap().clone();
        assert!(Arc::ptr_eq(&hosts(&registry), &hosts(&by_digest)));
        let other = registry.with_reference(parse_reference("127.0.0.1:5000/other:v1").unwrap());
        assert!(!Arc::ptr_eq(&registry.session(), &other.session()), "tokens are per repository");
    }

    #[test]
    fn no_error_or_debug_output_shows_the_secret() {
        const SECRET: &str = "s3cret-Value-42";
        let dir = tempfile::tempdir().unwrap();
        // alice:s3cret-Value-42
        let config = r#"{"auths":{"127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0LVZhbHVlLTQy"}}}"#;
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let store = CredentialStore::new(Some(dir.path().to_owned()), None, std::time::Duration::from_secs(1));
        let reference = parse_reference("127.0.0.1:5000/models/m:v1").unwrap();
        let registry = Registry::with_credentials(reference, RegistrySettings::default(), store);
        let session = registry.session();
        let auth = &session.auths[0];
        assert!(matches!(&auth.credentials.auth, oci_client::secrets::RegistryAuth::Basic(_, p) if p == SECRET));

        // Registries and token servers that echo the secret back.
        let echoed = auth.text(&format!("bad credentials alice:{SECRET}"));
        for status in [400u16, 401, 403, 404, 500, 503] {
            let status = http::StatusCode::from_u16(status).unwrap();
            let shown = match status_attempt(status, "manifest", &registry.name(), &echoed) {
                Attempt::Retry(_, msg) => msg,
                Attempt::Denied(e) | Attempt::Fatal(e) => format!("{e} {e:?}"),
            };
            assert!(!shown.contains(SECRET), "{shown}");
        }
        assert!(echoed.contains("<redacted>"), "{echoed}");
        let shown = format!("{registry:?} {:?} {:?}", auth.credentials, registry.credentials);
        assert!(!shown.contains(SECRET), "{shown}");
    }

    #[test]
    fn loopback_hosts_are_plain_http() {
        for host in ["localhost", "localhost:5000", "127.0.0.1:5000", "127.3.2.1", "[::1]:5000", "[::1]"] {
            assert!(is_loopback(host), "{host}");
        }
        for host in ["registry.example.com", "10.0.0.1:5000", "localhost.example.com", "[::2]:80"] {
            assert!(!is_loopback(host), "{host}");
        }
    }

    #[test]
    fn clients_are_shared_by_hosts_of_the_same_tls_configuration_and_timeouts() {
        use self::hosts::HostConfig;
        let settings = RegistrySettings::default();
        let timeouts = (settings.connect_timeout, settings.request_timeout);
        let pool = &settings.clients;
        let plain = HostConfig::default_for("127.0.0.1:5000");
        let other_port = HostConfig::default_for("127.0.0.1:5001");
        let key = |c: &HostConfig, t| format!("{}|{t:?}", c.tls_key());
        assert_eq!(key(&plain, timeouts), key(&other_port, timeouts), "a client is not bound to a host");
        let verify_off = HostConfig { skip_verify: true, ..plain.clone() };
        assert_ne!(key(&plain, timeouts), key(&verify_off, timeouts));
        assert_ne!(key(&plain, timeouts), key(&plain, (timeouts.0, Duration::from_secs(1))));
        pool.client(&plain, timeouts).unwrap();
        pool.client(&verify_off, timeouts).unwrap();
        assert_eq!(settings.clone().clients.0.lock().unwrap().len(), 2, "clones of the settings share the pool");
        let missing_ca = HostConfig { ca: vec!["/nonexistent/ca.pem".into()], ..plain };
        let err = pool.client(&missing_ca, timeouts).unwrap_err();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
    }
}
