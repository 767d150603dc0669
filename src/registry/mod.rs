//! The only module that speaks HTTP: an OCI distribution client (on `oci-client`) for
//! one repository, with credentials, plain HTTP for loopback registries, and retries.
//!
//! Reads say how many bytes they expect and get exactly that many or an error: a short,
//! long or failed body is retried with exponential backoff up to the configured budget.
//! Verification against digests is the caller's job ([`crate::blob`]), except for
//! manifests and small blobs fetched whole, which are checked here.
//!
//! Credentials ([`credentials`]) are read when a client is made and read again when the
//! registry refuses a request (401 or 403): the request is then tried once more with
//! what the source holds now, so a long-lived mount outlives credentials that expire.
//! No error message carries a secret: text a registry sent back is redacted first.

pub mod credentials;
mod failure;
mod reference;

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use oci_client::client::{BlobResponse, ClientConfig, ClientProtocol};
use oci_client::errors::{OciDistributionError, OciErrorCode};
use oci_client::secrets::RegistryAuth;
use oci_client::{Client, Reference};
use tokio::io::AsyncReadExt;

use self::credentials::{CredentialStore, Credentials};
use crate::config::RegistrySettings;
use crate::metrics::{self, FailureKind};
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
}

/// One attempt's failure, sorted by whether trying again can help.
enum Attempt {
    Retry(String),
    /// Refused: worth one more try with credentials read again.
    Denied(RegistryError),
    Fatal(RegistryError),
}

/// Credentials and a client that uses them. The client caches what it derived from
/// them (tokens, basic-auth headers), so new credentials get a new client.
struct Session {
    client: Arc<PooledClient>,
    credentials: Credentials,
    /// Counts renewals, so that many requests refused at once renew only once.
    generation: u64,
}

/// A client for one repository of one registry.
pub struct Registry {
    session: RwLock<Arc<Session>>,
    /// Held while credentials are read again.
    renewing: tokio::sync::Mutex<()>,
    credentials: CredentialStore,
    /// A client that never authenticates, for blob reads while the registry has asked
    /// for no credentials: with anonymous access to a registry that issues no token,
    /// `oci-client` probes `/v2/` before every request, which doubles the requests and
    /// the registry's CPU per byte. A 401 turns `bare_reads` off for good.
    bare: Arc<PooledClient>,
    bare_reads: AtomicBool,
    reference: Reference,
    settings: RegistrySettings,
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
/// speak plain HTTP.
pub fn is_loopback(registry: &str) -> bool {
    let host = if let Some(rest) = registry.strip_prefix('[') {
        rest.split(']').next().unwrap_or(rest)
    } else {
        registry.rsplit_once(':').map_or(registry, |(h, _)| h)
    };
    host == "localhost" || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

/// Credentials for `registry` from `store`; anonymous, with a warning, when the source
/// fails (the error names the source, never a secret).
fn read_credentials(store: &CredentialStore, registry: &str) -> Credentials {
    match store.get(registry) {
        Ok(credentials) => {
            tracing::debug!(registry, source = %credentials.source, "registry credentials");
            credentials
        }
        Err(e) => {
            tracing::warn!(registry, error = %e, "cannot read registry credentials; trying anonymously");
            Credentials::anonymous()
        }
    }
}

/// `oci-client` clients shared by every [`Registry`] made from clones of one
/// [`RegistrySettings`] that reach the same registry, with the same timeouts and the
/// same credentials. Building a client reads and parses every CA certificate of the
/// system (twice, in `oci-client` 0.18): milliseconds of CPU and a few hundred KiB each,
/// which a daemon serving a hundred models paid for every model, again at every start.
/// A shared client shares its token cache, whose tokens are per repository; clients of
/// other credentials (a pod's pull secret) are never shared with them. Entries are
/// weak: a client, and the credentials it holds, goes with its last user.
#[derive(Clone, Default)]
pub struct ClientPool(Arc<Mutex<HashMap<String, Vec<Weak<PooledClient>>>>>);

impl std::fmt::Debug for ClientPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPool").finish_non_exhaustive()
    }
}

/// A pooled client and what it was made for.
struct PooledClient {
    auth: RegistryAuth,
    /// Never authenticates (see [`Registry::bare`]).
    bare: bool,
    timeouts: (Duration, Duration),
    client: Client,
}

impl std::ops::Deref for PooledClient {
    type Target = Client;

    fn deref(&self) -> &Client {
        &self.client
    }
}

impl ClientPool {
    /// A client for `registry` with `settings`' timeouts, for `auth` (or one that never
    /// authenticates, if `bare`): one in use already, unless `fresh`.
    fn client(
        &self,
        registry: &str,
        settings: &RegistrySettings,
        auth: &RegistryAuth,
        bare: bool,
        fresh: bool,
    ) -> Arc<PooledClient> {
        let timeouts = (settings.connect_timeout, settings.request_timeout);
        let fits = |c: &PooledClient| c.bare == bare && c.timeouts == timeouts && c.auth == *auth;
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        let clients = pool.entry(registry.to_owned()).or_default();
        clients.retain(|c| c.strong_count() > 0);
        if !fresh {
            if let Some(found) = clients.iter().filter_map(Weak::upgrade).find(|c| fits(c)) {
                return found;
            }
        }
        let made =
            Arc::new(PooledClient { auth: auth.clone(), bare, timeouts, client: new_client(registry, settings) });
        clients.retain(|c| c.upgrade().is_some_and(|c| !fits(&c)));
        clients.push(Arc::downgrade(&made));
        made
    }
}

/// An `oci-client` client for `registry` with our timeouts.
fn new_client(registry: &str, settings: &RegistrySettings) -> Client {
    let protocol = if is_loopback(registry) {
        ClientProtocol::HttpsExcept(vec![registry.to_owned()])
    } else {
        ClientProtocol::Https
    };
    Client::new(ClientConfig {
        protocol,
        connect_timeout: Some(settings.connect_timeout),
        read_timeout: Some(settings.request_timeout),
        use_monolithic_push: true,
        ..Default::default()
    })
}

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
        let credentials = read_credentials(&store, &registry);
        let bare_reads = AtomicBool::new(matches!(credentials.auth, RegistryAuth::Anonymous));
        let pool = &settings.clients;
        let client = pool.client(&registry, &settings, &credentials.auth, false, false);
        let session = Session { client, credentials, generation: 0 };
        Self {
            session: RwLock::new(Arc::new(session)),
            renewing: tokio::sync::Mutex::new(()),
            credentials: store,
            bare: pool.client(&registry, &settings, &RegistryAuth::Anonymous, true, false),
            bare_reads,
            reference,
            settings,
        }
    }

    fn session(&self) -> Arc<Session> {
        self.session.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Reads the credentials again after `refused` was refused, unless another request
    /// already did since; later requests use them.
    async fn renew(&self, refused: &Session) {
        let _renewing = self.renewing.lock().await;
        if self.session().generation != refused.generation {
            return;
        }
        let registry = self.reference.resolve_registry().to_owned();
        tracing::debug!(registry, "registry refused the credentials; reading them again");
        let store = self.credentials.clone();
        let credentials = tokio::task::spawn_blocking(move || read_credentials(&store, &registry))
            .await
            .unwrap_or_else(|_| Credentials::anonymous());
        // A fresh client, whatever the credentials: the refused one's cached tokens are
        // what may have been refused.
        let client = self.settings.clients.client(
            self.reference.resolve_registry(),
            &self.settings,
            &credentials.auth,
            false,
            true,
        );
        let session = Session { client, credentials, generation: refused.generation + 1 };
        *self.session.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(session);
    }

    /// The reference this client was made for.
    pub fn reference(&self) -> &Reference {
        &self.reference
    }

    /// A client for another tag or digest in the same repository, with credentials
    /// from the same source.
    pub fn with_reference(&self, reference: Reference) -> Self {
        Self::with_credentials(reference, self.settings.clone(), self.credentials.clone())
    }

    fn name(&self) -> String {
        self.reference.whole()
    }

    /// Runs `op` with the retry budget, sorting its errors. A refusal is tried once
    /// more, straight away and outside the budget, with credentials read again.
    async fn with_retries<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut(Arc<Session>) -> Fut,
        Fut: Future<Output = Result<T, Attempt>>,
    {
        let attempts = self.settings.retries + 1;
        let mut delay = self.settings.backoff;
        let mut last;
        let mut renewed = false;
        let mut attempt = 1;
        loop {
            let session = self.session();
            match tokio::time::timeout(self.settings.request_timeout, op(session.clone())).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(Attempt::Denied(_))) if !renewed => {
                    metrics::registry_retry(self.reference.resolve_registry(), FailureKind::Denied);
                    renewed = true;
                    self.renew(&session).await;
                    continue;
                }
                Ok(Err(Attempt::Denied(e) | Attempt::Fatal(e))) => {
                    metrics::registry_error(self.reference.resolve_registry(), failure::of_error(&e));
                    return Err(e);
                }
                Ok(Err(Attempt::Retry(msg))) => last = msg,
                Err(_) => last = format!("timed out after {:?}", self.settings.request_timeout),
            }
            if attempt == attempts {
                metrics::registry_error(self.reference.resolve_registry(), failure::of_message(&last));
                break;
            }
            metrics::registry_retry(self.reference.resolve_registry(), failure::of_message(&last));
            tracing::debug!(what, attempt, error = %last, "registry request failed; retrying");
            tokio::time::sleep(delay).await;
            delay = delay.saturating_mul(2);
            attempt += 1;
        }
        Err(RegistryError::Exhausted { what: what.to_owned(), reference: self.name(), attempts, last })
    }

    /// Sorts an `oci-client` error; what the registry said is redacted of the secret
    /// `session` sent, in case the registry echoed it.
    fn classify(&self, session: &Session, what: &str, e: OciDistributionError) -> Attempt {
        use OciDistributionError as O;
        let text = |e: &OciDistributionError| session.credentials.redact(e.to_string());
        match e {
            O::ImageManifestNotFoundError(_) => {
                Attempt::Fatal(RegistryError::NotFound { what: what.to_owned(), reference: self.name() })
            }
            O::ServerError { code: 404, .. } => {
                Attempt::Fatal(RegistryError::NotFound { what: what.to_owned(), reference: self.name() })
            }
            O::RegistryError { ref envelope, .. }
                if envelope.errors.iter().any(|err| format!("{:?}", err.code).contains("Unknown")) =>
            {
                Attempt::Fatal(RegistryError::NotFound { what: what.to_owned(), reference: self.name() })
            }
            O::UnauthorizedError { .. } | O::AuthenticationFailure(_) | O::ServerError { code: 401 | 403, .. } => {
                Attempt::Denied(RegistryError::Unauthorized { reference: self.name(), detail: text(&e) })
            }
            O::RegistryError { ref envelope, .. }
                if envelope
                    .errors
                    .iter()
                    .any(|err| matches!(err.code, OciErrorCode::Unauthorized | OciErrorCode::Denied)) =>
            {
                Attempt::Denied(RegistryError::Unauthorized { reference: self.name(), detail: text(&e) })
            }
            O::DigestError(_) => Attempt::Retry(text(&e)),
            O::ServerError { code, .. } if code < 500 && code != 408 && code != 429 => {
                Attempt::Fatal(RegistryError::Invalid {
                    what: what.to_owned(),
                    reference: self.name(),
                    detail: text(&e),
                })
            }
            other => Attempt::Retry(text(&other)),
        }
    }

    /// The manifest bytes the reference names, and their digest. A digest reference is
    /// verified against the bytes.
    pub async fn fetch_manifest(&self) -> Result<(Bytes, Digest), RegistryError> {
        let accept = [media::OCI_MANIFEST, media::OCI_INDEX, media::DOCKER_MANIFEST];
        let what = "manifest";
        self.with_retries(what, |session| async move {
            let (body, digest) = session
                .client
                .pull_manifest_raw(&self.reference, &session.credentials.auth, &accept)
                .await
                .map_err(|e| self.classify(&session, what, e))?;
            let actual = Digest::of(&body);
            if let Some(pinned) = self.reference.digest() {
                if pinned != actual.to_string() {
                    return Err(Attempt::Retry(format!("manifest digest {actual} does not match {pinned}")));
                }
            }
            if digest != actual.to_string() {
                tracing::debug!(header = %digest, %actual, "registry reported another manifest digest");
            }
            if body.len() as u64 > MAX_SMALL_BLOB {
                return Err(Attempt::Fatal(
                    self.invalid(what, format!("manifest of {} bytes is too large", body.len())),
                ));
            }
            Ok((body, actual))
        })
        .await
    }

    fn invalid(&self, what: &str, detail: String) -> RegistryError {
        RegistryError::Invalid { what: what.to_owned(), reference: self.name(), detail }
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
        let started = std::time::Instant::now();
        let piece = piece.clamp(1, len.max(1));
        let what = format!("bytes {offset}+{len} of blob {blob}");
        let digest = blob.to_string();
        let (what, digest) = (what.as_str(), digest.as_str());
        self.with_retries(what, |session| async move {
            let response =
                self.pull_partial(&session, digest, offset, len).await.map_err(|e| self.classify(&session, what, e))?;
            // A registry that ignores Range sends the whole blob: skip to our window.
            let (mut stream, mut skip, whole) = match response {
                BlobResponse::Partial(s) => (s.stream, 0u64, false),
                BlobResponse::Full(s) => (s.stream, offset, true),
            };
            let mut out = PiecedBody::new(len, piece);
            while let Some(received) = stream.next().await {
                let mut received = received.map_err(|e| Attempt::Retry(format!("body: {e}")))?;
                if skip > 0 {
                    let n = skip.min(received.len() as u64);
                    skip -= n;
                    received = received.slice(n as usize..);
                }
                let room = (len - out.received()) as usize;
                if received.len() > room {
                    if !whole {
                        return Err(Attempt::Retry(format!("long body: more than {len} bytes")));
                    }
                    out.extend_from_slice(&received[..room]);
                    break;
                }
                out.extend_from_slice(&received);
            }
            if out.received() != len {
                return Err(Attempt::Retry(format!("short body: got {} of {len} bytes", out.received())));
            }
            Ok(out.freeze())
        })
        .await
        .inspect(|_| metrics::registry_request(self.reference.resolve_registry(), len, started.elapsed()))
    }

    /// One ranged GET, unauthenticated while the registry allows it (see `bare`).
    async fn pull_partial(
        &self,
        session: &Session,
        digest: &str,
        offset: u64,
        len: u64,
    ) -> Result<BlobResponse, OciDistributionError> {
        if self.bare_reads.load(Ordering::Relaxed) {
            match self.bare.pull_blob_stream_partial(&self.reference, digest, offset, Some(len)).await {
                Err(
                    OciDistributionError::UnauthorizedError { .. }
                    | OciDistributionError::AuthenticationFailure(_)
                    | OciDistributionError::ServerError { code: 401, .. },
                ) => {
                    tracing::debug!(registry = self.reference.resolve_registry(), "registry wants a token for blobs");
                    self.bare_reads.store(false, Ordering::Relaxed);
                }
                other => return other,
            }
        }
        session.client.store_auth_if_needed(self.reference.resolve_registry(), &session.credentials.auth).await;
        session.client.pull_blob_stream_partial(&self.reference, digest, offset, Some(len)).await
    }

    /// Streams the whole of `blob`, `size` bytes, for a caller that hashes every byte
    /// itself (`convert`, the unpacking of a compressed layer). It is asked for as a
    /// range, which the client library passes through as it arrives instead of hashing
    /// it a second time on the way (it checks only whole-blob answers, which a registry
    /// that ignores the range still gets). The caller verifies the digest and the size.
    pub async fn stream_whole_blob(
        &self,
        blob: &Digest,
        size: u64,
    ) -> Result<futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>, RegistryError> {
        if size == 0 {
            // `bytes=0-` is unsatisfiable for an empty blob.
            return self.stream_blob(blob, 0).await;
        }
        let what = format!("blob {blob}");
        let digest = blob.to_string();
        let (what, digest) = (what.as_str(), digest.as_str());
        self.with_retries(what, |session| async move {
            session.client.store_auth_if_needed(self.reference.resolve_registry(), &session.credentials.auth).await;
            let response = session
                .client
                .pull_blob_stream_partial(&self.reference, digest, 0, Some(size))
                .await
                .map_err(|e| self.classify(&session, what, e))?;
            match response {
                BlobResponse::Partial(s) | BlobResponse::Full(s) => Ok(s.stream),
            }
        })
        .await
    }

    /// Streams a whole blob from `offset` to its end (for compressed layers, which are
    /// read once from start to end). The caller verifies the digest.
    pub async fn stream_blob(
        &self,
        blob: &Digest,
        offset: u64,
    ) -> Result<futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>, RegistryError> {
        let what = format!("blob {blob}");
        let digest = blob.to_string();
        let (what, digest) = (what.as_str(), digest.as_str());
        self.with_retries(what, |session| async move {
            session.client.store_auth_if_needed(self.reference.resolve_registry(), &session.credentials.auth).await;
            if offset == 0 {
                // No Range header: `bytes=0-` is unsatisfiable for an empty blob.
                let stream = session
                    .client
                    .pull_blob_stream(&self.reference, digest)
                    .await
                    .map_err(|e| self.classify(&session, what, e))?;
                return Ok(stream.stream);
            }
            let response = session
                .client
                .pull_blob_stream_partial(&self.reference, digest, offset, None)
                .await
                .map_err(|e| self.classify(&session, what, e))?;
            match response {
                BlobResponse::Partial(s) => Ok(s.stream),
                BlobResponse::Full(s) if offset == 0 => Ok(s.stream),
                BlobResponse::Full(s) => {
                    let mut skip = offset;
                    Ok(s.stream
                        .map_ok(move |mut piece| {
                            let n = skip.min(piece.len() as u64);
                            skip -= n;
                            piece.split_off(n as usize)
                        })
                        .boxed())
                }
            }
        })
        .await
    }

    /// Whether the repository already has a blob.
    pub async fn blob_exists(&self, blob: &Digest) -> Result<bool, RegistryError> {
        let what = format!("blob {blob}");
        let digest = blob.to_string();
        let (what, digest) = (what.as_str(), digest.as_str());
        self.with_retries(what, |session| async move {
            session.client.store_auth_if_needed(self.reference.resolve_registry(), &session.credentials.auth).await;
            session.client.blob_exists(&self.reference, digest).await.map_err(|e| self.classify(&session, what, e))
        })
        .await
    }

    /// Uploads an in-memory blob (configs, manifests' neighbours).
    pub async fn push_bytes(&self, data: Bytes, digest: &Digest) -> Result<(), RegistryError> {
        let what = format!("upload of blob {digest}");
        let what = what.as_str();
        self.with_retries(what, |session| {
            let data = data.clone();
            async move {
                session.client.store_auth_if_needed(self.reference.resolve_registry(), &session.credentials.auth).await;
                session
                    .client
                    .push_blob(&self.reference, data, &digest.to_string())
                    .await
                    .map(drop)
                    .map_err(|e| self.classify(&session, what, e))
            }
        })
        .await
    }

    /// Uploads a file as a blob in one streamed request, calling `progress` with the
    /// bytes sent so far.
    pub async fn push_file(
        &self,
        path: &Path,
        digest: &Digest,
        size: u64,
        progress: impl Fn(u64) + Send + Sync + Clone + 'static,
    ) -> Result<(), RegistryError> {
        let what = format!("upload of {}", path.display());
        let local_err = |source| RegistryError::LocalIo { path: path.display().to_string(), source };
        let attempts = self.settings.retries + 1;
        let mut last = String::new();
        let mut renewed = false;
        let mut attempt = 0;
        while attempt < attempts {
            let session = self.session();
            session.client.store_auth_if_needed(self.reference.resolve_registry(), &session.credentials.auth).await;
            let file = tokio::fs::File::open(path).await.map_err(local_err)?;
            let progress = progress.clone();
            let stream = futures_util::stream::try_unfold((file, 0u64), move |(mut file, sent)| {
                let progress = progress.clone();
                async move {
                    let mut buf = vec![0u8; 1 << 20];
                    let n = file.read(&mut buf).await.map_err(OciDistributionError::IoError)?;
                    if n == 0 {
                        return Ok(None);
                    }
                    buf.truncate(n);
                    let sent = sent + n as u64;
                    progress(sent);
                    Ok(Some((Bytes::from(buf), (file, sent))))
                }
            });
            // No request timeout: an upload takes as long as the file needs.
            match session.client.push_blob_stream(&self.reference, stream, &digest.to_string(), Some(size)).await {
                Ok(_) => return Ok(()),
                Err(e) => match self.classify(&session, &what, e) {
                    Attempt::Denied(_) if !renewed => {
                        renewed = true;
                        self.renew(&session).await;
                        continue;
                    }
                    Attempt::Denied(e) | Attempt::Fatal(e) => return Err(e),
                    Attempt::Retry(msg) => last = msg,
                },
            }
            attempt += 1;
        }
        Err(RegistryError::Exhausted { what, reference: self.name(), attempts, last })
    }

    /// The referrers of `subject` (a manifest of this repository): the registry's
    /// referrers API, or, where the registry has none (it answers 404), the image index
    /// under the referrers tag (empty when there is none). Nothing listed is trusted:
    /// the list is bounded in bytes and entries, and names candidates only.
    pub async fn referrers(&self, subject: &Digest) -> Result<ReferrersList, RegistryError> {
        let what = format!("referrers of {subject}");
        let what = what.as_str();
        let image = self.reference.clone_with_digest(subject.to_string());
        let index = self
            .with_retries(what, |session| {
                let image = image.clone();
                async move {
                    session
                        .client
                        .store_auth_if_needed(self.reference.resolve_registry(), &session.credentials.auth)
                        .await;
                    session.client.pull_referrers(&image, None).await.map_err(|e| self.classify(&session, what, e))
                }
            })
            .await;
        let index = match index {
            Ok(index) => index,
            Err(RegistryError::NotFound { .. }) => return Ok(ReferrersList::empty()),
            Err(e) => return Err(e),
        };
        // `oci-client` parsed the answer; our own parser bounds and checks it.
        let bytes = serde_json::to_vec(&index).map_err(|e| self.invalid(what, e.to_string()))?;
        ReferrersList::parse(&bytes).map_err(|e| self.invalid(what, e.to_string()))
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
        self.with_retries(what, |session| {
            let (body, content_type) = (body.clone(), content_type.clone());
            async move {
                session.client.store_auth_if_needed(self.reference.resolve_registry(), &session.credentials.auth).await;
                session
                    .client
                    .push_manifest_raw(&self.reference, body, content_type)
                    .await
                    .map_err(|e| self.classify(&session, what, e))
            }
        })
        .await?;
        Ok(Digest::of(&body))
    }
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

    #[tokio::test]
    async fn no_error_or_debug_output_shows_the_secret() {
        const SECRET: &str = "s3cret-Value-42";
        let dir = tempfile::tempdir().unwrap();
        // alice:s3cret-Value-42
        let config = r#"{"auths":{"127.0.0.1:5000":{"auth":"YWxpY2U6czNjcmV0LVZhbHVlLTQy"}}}"#;
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let store = CredentialStore::new(Some(dir.path().to_owned()), None, std::time::Duration::from_secs(1));
        let reference = parse_reference("127.0.0.1:5000/models/m:v1").unwrap();
        let registry = Registry::with_credentials(reference, RegistrySettings::default(), store);
        let session = registry.session();
        assert!(matches!(&session.credentials.auth, RegistryAuth::Basic(_, p) if p == SECRET));

        // Registries and token servers that echo the secret back.
        let echoed = || format!("bad credentials alice:{SECRET}");
        let url = format!("http://alice:{SECRET}@127.0.0.1:5000/v2/");
        let errors = [
            OciDistributionError::AuthenticationFailure(echoed()),
            OciDistributionError::UnauthorizedError { url: url.clone() },
            OciDistributionError::ServerError { code: 401, url: url.clone(), message: echoed() },
            OciDistributionError::ServerError { code: 400, url: url.clone(), message: echoed() },
            OciDistributionError::ServerError { code: 503, url, message: echoed() },
            OciDistributionError::GenericError(Some(echoed())),
        ];
        for e in errors {
            let shown = match registry.classify(&session, "manifest", e) {
                Attempt::Retry(msg) => msg,
                Attempt::Denied(e) | Attempt::Fatal(e) => format!("{e} {e:?}"),
            };
            assert!(!shown.contains(SECRET), "{shown}");
            assert!(shown.contains("<redacted>"), "{shown}");
        }
        let shown = format!("{registry:?} {:?} {:?}", session.credentials, registry.credentials);
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
    fn clients_are_shared_only_by_the_same_registry_settings_and_credentials() {
        let settings = RegistrySettings::default();
        let pool = &settings.clients;
        let alice = RegistryAuth::Basic("alice".into(), "one".into());
        let host = "127.0.0.1:5000";
        let first = pool.client(host, &settings, &alice, false, false);
        assert!(Arc::ptr_eq(&first, &pool.client(host, &settings, &alice, false, false)), "shared");
        let shared_with_a_clone = settings.clone().clients.client(host, &settings, &alice, false, false);
        assert!(Arc::ptr_eq(&first, &shared_with_a_clone), "clones of the settings share the pool");
        let others = [
            pool.client(host, &settings, &RegistryAuth::Basic("alice".into(), "two".into()), false, false),
            pool.client(host, &settings, &RegistryAuth::Bearer("one".into()), false, false),
            pool.client(host, &settings, &RegistryAuth::Anonymous, false, false),
            pool.client(host, &settings, &alice, true, false),
            pool.client("127.0.0.1:5001", &settings, &alice, false, false),
            pool.client(
                host,
                &RegistrySettings { request_timeout: Duration::from_secs(1), ..settings.clone() },
                &alice,
                false,
                false,
            ),
        ];
        for other in &others {
            assert!(!Arc::ptr_eq(&first, other), "other credentials, registry or timeouts: another client");
        }
        let unrelated = RegistrySettings::default();
        let elsewhere = unrelated.clients.client(host, &unrelated, &alice, false, false);
        assert!(!Arc::ptr_eq(&elsewhere, &first), "settings made apart share nothing");

        // A fresh client (after a refusal) replaces the shared one for later users.
        let fresh = pool.client(host, &settings, &alice, false, true);
        assert!(!Arc::ptr_eq(&first, &fresh));
        assert!(Arc::ptr_eq(&fresh, &pool.client(host, &settings, &alice, false, false)));

        // The pool does not keep a client, or the credentials in it, alive.
        let weak = Arc::downgrade(&fresh);
        drop((first, shared_with_a_clone, fresh));
        assert!(weak.upgrade().is_none(), "a client goes with its last user");
    }
}
