//! HTTP to one registry host: clients per TLS configuration, the distribution spec's
//! authentication (a `401` with a `Basic` or `Bearer` challenge, a token from the realm
//! it names), and the sorting of answers into what trying again can or cannot mend.
//!
//! Written on `reqwest` rather than through `oci-client`'s `Client`, which has no way to
//! send a host's configured headers (Dragonfly's `X-Dragonfly-Registry`), present a
//! client certificate, trust a CA for one host only, or try mirrors in order.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::{HeaderValue, AUTHORIZATION, WWW_AUTHENTICATE};
use http::StatusCode;
use oci_client::secrets::RegistryAuth;

use super::credentials::Credentials;
use super::hosts::HostConfig;
use super::{is_loopback, Attempt, RegistryError};
use crate::metrics::FailureKind as Kind;

/// Largest token answer or error body read.
const MAX_SMALL_ANSWER: usize = 1 << 20;

/// A host that failed is tried after the others for this long.
const DOWN_FOR: Duration = Duration::from_secs(30);

/// Tokens without a lifetime live 60 s (the token spec's default).
const DEFAULT_TOKEN_LIFE: Duration = Duration::from_secs(60);

/// `reqwest` clients shared by every registry reached with clones of one
/// [`crate::config::RegistrySettings`]: building one reads and parses every CA
/// certificate of the system, milliseconds of CPU and a few hundred KiB, which a daemon
/// serving a hundred models would pay for each. Clients hold no credentials: hosts with
/// the same TLS configuration and timeouts share one, and its connections.
#[derive(Clone, Default)]
pub struct ClientPool(pub(super) Arc<Mutex<HashMap<String, reqwest::Client>>>);

impl std::fmt::Debug for ClientPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientPool").finish_non_exhaustive()
    }
}

impl ClientPool {
    /// A client for `host` with these timeouts; an error names the file that failed.
    pub(super) fn client(&self, host: &HostConfig, timeouts: (Duration, Duration)) -> Result<reqwest::Client, String> {
        let key = format!("{}|{timeouts:?}", host.tls_key());
        let mut pool = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = pool.get(&key) {
            return Ok(client.clone());
        }
        let client = build_client(host, timeouts)?;
        pool.insert(key, client.clone());
        Ok(client)
    }
}

fn build_client(host: &HostConfig, (connect, request): (Duration, Duration)) -> Result<reqwest::Client, String> {
    let read = |path: &std::path::Path| std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()));
    let mut builder = reqwest::Client::builder()
        .connect_timeout(connect)
        .read_timeout(request)
        .user_agent(concat!("modelpack-snapshotter/", env!("CARGO_PKG_VERSION")))
        .danger_accept_invalid_certs(host.skip_verify);
    let mut roots = Vec::new();
    for ca in &host.ca {
        let pem = read(ca)?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| format!("{}: not a PEM certificate: {e}", ca.display()))?;
        roots.extend(certs);
    }
    if !roots.is_empty() {
        builder = builder.tls_certs_merge(roots);
    }
    // One identity per client: the first pair, as a TLS server asks for one.
    if let Some((cert, key)) = host.client.first() {
        let mut pem = read(cert)?;
        if let Some(key) = key {
            pem.push(b'\n');
            pem.extend(read(key)?);
        }
        let identity = reqwest::Identity::from_pem(&pem)
            .map_err(|e| format!("{}: not a PEM certificate and key: {e}", cert.display()))?;
        builder = builder.identity(identity);
    }
    builder.build().map_err(|e| format!("TLS configuration for {}: {e}", host.authority))
}

/// One configured host of a registry, with its client.
pub(super) struct Host {
    pub config: HostConfig,
    client: Result<reqwest::Client, String>,
    /// Until when this host is tried only after the others.
    down_until: Mutex<Option<Instant>>,
}

impl Host {
    pub fn new(config: HostConfig, pool: &ClientPool, timeouts: (Duration, Duration)) -> Self {
        let client = pool.client(&config, timeouts);
        Self { config, client, down_until: Mutex::new(None) }
    }

    pub fn is_down(&self) -> bool {
        self.down_until.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t| Instant::now() < t)
    }

    pub fn mark(&self, up: bool) {
        let mut down = self.down_until.lock().unwrap_or_else(|e| e.into_inner());
        if up {
            *down = None;
        } else {
            *down = Some(Instant::now() + DOWN_FOR);
        }
    }

    /// The URL of `path` (below `/v2`) on this host; a mirror's carries `ns=<registry>`.
    pub fn url(&self, registry: &str, path: &str) -> String {
        let base = self.config.base();
        if self.config.mirror {
            format!("{base}/{path}?ns={registry}")
        } else {
            format!("{base}/{path}")
        }
    }

    /// A request to `url` with this host's headers.
    pub fn request(&self, method: http::Method, url: &str) -> Result<reqwest::RequestBuilder, Attempt> {
        let client = self.client.as_ref().map_err(|e| {
            Attempt::Fatal(RegistryError::Config { host: self.config.authority.clone(), detail: e.clone() })
        })?;
        let mut request = client.request(method, url);
        for (name, value) in &self.config.headers {
            request = request.header(name.as_str(), value.as_str());
        }
        Ok(request)
    }
}

/// Pull, or pull and push: the two scopes a repository's token is asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Access {
    Pull,
    Push,
}

/// Credentials for one host and the `Authorization` values derived from them.
pub(super) struct Auth {
    pub credentials: Credentials,
    /// For [`Access::Pull`] and [`Access::Push`]: the header and when it expires.
    headers: Mutex<[Option<(HeaderValue, Instant)>; 2]>,
}

impl Auth {
    pub fn new(credentials: Credentials) -> Self {
        Self { credentials, headers: Mutex::new([None, None]) }
    }

    pub fn cached(&self, access: Access) -> Option<HeaderValue> {
        let headers = self.headers.lock().unwrap_or_else(|e| e.into_inner());
        headers[access as usize].as_ref().filter(|(_, until)| Instant::now() < *until).map(|(h, _)| h.clone())
    }

    fn store(&self, access: Access, header: HeaderValue, life: Duration) {
        let mut headers = self.headers.lock().unwrap_or_else(|e| e.into_inner());
        headers[access as usize] = Some((header, Instant::now() + life));
    }

    /// Answers `challenge` (a 401's `WWW-Authenticate`) for `repository`: a basic
    /// header, or a token from the realm. The header is kept for later requests.
    pub async fn authorize(
        &self,
        host: &Host,
        challenge: Option<&HeaderValue>,
        repository: &str,
        access: Access,
    ) -> Result<HeaderValue, Attempt> {
        let denied = |detail: String| {
            Attempt::Denied(RegistryError::Unauthorized { reference: host.config.authority.clone(), detail })
        };
        let challenge = challenge.and_then(|c| c.to_str().ok()).map(Challenge::parse);
        let (header, life) = match (challenge, &self.credentials.auth) {
            (_, RegistryAuth::Bearer(token)) => (bearer(token)?, Duration::MAX),
            (Some(Challenge::Bearer(params)), _) => self.token(host, &params, repository, access).await?,
            (Some(Challenge::Basic), RegistryAuth::Basic(user, password)) => {
                use base64::Engine;
                let pair = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                (sensitive(&format!("Basic {pair}"))?, Duration::MAX)
            }
            (Some(Challenge::Basic), _) => return Err(denied("the registry wants a user and password".to_owned())),
            (Some(Challenge::Other) | None, _) => {
                return Err(denied("refused with no Basic or Bearer challenge to answer".to_owned()))
            }
        };
        self.store(access, header.clone(), life.min(Duration::from_secs(365 * 86400)));
        Ok(header)
    }

    /// A token from the realm of a `Bearer` challenge.
    async fn token(
        &self,
        host: &Host,
        params: &HashMap<String, String>,
        repository: &str,
        access: Access,
    ) -> Result<(HeaderValue, Duration), Attempt> {
        let who = host.config.authority.clone();
        let denied = |detail: String| Attempt::Denied(RegistryError::Unauthorized { reference: who.clone(), detail });
        let realm = params.get("realm").ok_or_else(|| denied("a Bearer challenge without a realm".to_owned()))?;
        let url = reqwest::Url::parse(realm).map_err(|_| denied(format!("token realm {realm:?} is not a URL")))?;
        let realm_host = url.host_str().unwrap_or_default().to_owned();
        match url.scheme() {
            "https" => {}
            // A password goes in clear only where the registry itself is reached in clear
            // or on this machine.
            "http" if host.config.scheme == "http" || is_loopback(&realm_host) => {}
            _ => return Err(denied(format!("token realm {realm:?} is not https"))),
        }
        let scope = match access {
            Access::Pull => format!("repository:{repository}:pull"),
            Access::Push => format!("repository:{repository}:pull,push"),
        };
        let mut query = vec![("scope", scope.as_str())];
        if let Some(service) = params.get("service") {
            query.push(("service", service));
        }
        let mut request = host.request(http::Method::GET, url.as_str())?.query(&query);
        if let RegistryAuth::Basic(user, password) = &self.credentials.auth {
            request = request.basic_auth(user, Some(password));
        }
        let response = request.send().await.map_err(|e| Attempt::Retry(Kind::Connect, self.text(&e.to_string())))?;
        let status = response.status();
        let body = small_body(response).await.map_err(|e| Attempt::Retry(Kind::ShortBody, self.text(&e)))?;
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(denied(format!("token request answered {status}")));
        }
        if !status.is_success() {
            return Err(status_attempt(status, "token", &who, &self.text(&String::from_utf8_lossy(&body))));
        }
        #[derive(serde::Deserialize)]
        struct Answer {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|_| Attempt::Retry(Kind::Other, "token answer is not JSON".to_owned()))?;
        let token = answer.token.or(answer.access_token).filter(|t| !t.is_empty());
        let token = token.ok_or_else(|| Attempt::Retry(Kind::Other, "token answer holds no token".to_owned()))?;
        let life = answer.expires_in.map_or(DEFAULT_TOKEN_LIFE, |s| Duration::from_secs(s.saturating_sub(10).max(1)));
        Ok((bearer(&token)?, life))
    }

    /// `text` with this host's secret taken out.
    pub fn text(&self, text: &str) -> String {
        self.credentials.redact(text.to_owned())
    }
}

fn bearer(token: &str) -> Result<HeaderValue, Attempt> {
    sensitive(&format!("Bearer {token}"))
}

fn sensitive(value: &str) -> Result<HeaderValue, Attempt> {
    let mut header = HeaderValue::from_str(value)
        .map_err(|_| Attempt::Retry(Kind::Other, "credentials cannot be sent in a header".to_owned()))?;
    header.set_sensitive(true);
    Ok(header)
}

/// A `WWW-Authenticate` challenge.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Challenge {
    Basic,
    Bearer(HashMap<String, String>),
    Other,
}

impl Challenge {
    /// Parses `Scheme k="v", k2=v2`; quoted values may hold commas and `\"`.
    pub fn parse(header: &str) -> Self {
        let header = header.trim();
        let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
        if scheme.eq_ignore_ascii_case("basic") {
            return Self::Basic;
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Self::Other;
        }
        let mut params = HashMap::new();
        let mut chars = rest.chars().peekable();
        loop {
            while chars.next_if(|c| *c == ',' || c.is_whitespace()).is_some() {}
            let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=' && *c != ',')).collect();
            if key.is_empty() || chars.next() != Some('=') {
                break;
            }
            while chars.next_if(|c| c.is_whitespace()).is_some() {}
            let mut value = String::new();
            if chars.next_if_eq(&'"').is_some() {
                while let Some(c) = chars.next() {
                    match c {
                        '\\' => value.extend(chars.next()),
                        '"' => break,
                        c => value.push(c),
                    }
                }
            } else {
                value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect::<String>().trim().to_owned();
            }
            params.insert(key.trim().to_ascii_lowercase(), value);
        }
        Self::Bearer(params)
    }
}

/// The body of a small answer (a token, an error), at most 1 MiB.
pub(super) async fn small_body(mut response: reqwest::Response) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await.map_err(|e| e.to_string())? {
        if body.len() + chunk.len() > MAX_SMALL_ANSWER {
            return Err("answer larger than 1 MiB".to_owned());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// Sorts an answer that is not a success: 404 is not found, 401 and 403 refused,
/// 408, 429 and 5xx worth another try, any other status final. `said` (already
/// redacted) is what the registry said, kept short.
pub(super) fn status_attempt(status: StatusCode, what: &str, reference: &str, said: &str) -> Attempt {
    let said: String = said.chars().take(200).collect();
    let detail = format!("{status}: {}", said.trim());
    match status.as_u16() {
        404 => Attempt::Fatal(RegistryError::NotFound { what: what.to_owned(), reference: reference.to_owned() }),
        401 | 403 => Attempt::Denied(RegistryError::Unauthorized { reference: reference.to_owned(), detail }),
        408 | 429 => Attempt::Retry(Kind::Status4xx, detail),
        500..=599 => Attempt::Retry(Kind::Status5xx, detail),
        _ => Attempt::Fatal(RegistryError::Invalid { what: what.to_owned(), reference: reference.to_owned(), detail }),
    }
}

/// For a 401, its challenge (if it sent one); `None` for any other answer.
pub(super) fn challenge_of(response: &reqwest::Response) -> Option<Option<HeaderValue>> {
    (response.status() == StatusCode::UNAUTHORIZED).then(|| response.headers().get(WWW_AUTHENTICATE).cloned())
}

/// Sets `Authorization` when one is known.
pub(super) fn with_auth(request: reqwest::RequestBuilder, header: Option<HeaderValue>) -> reqwest::RequestBuilder {
    match header {
        Some(h) => request.header(AUTHORIZATION, h),
        None => request,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::credentials::CredentialSource;

    /// A registry reached over https that points its token realm at a plain-HTTP host
    /// elsewhere: the password must not go out in clear. Refused before any request.
    #[tokio::test]
    async fn a_password_never_goes_to_a_plain_http_realm_of_an_https_registry() {
        let host = Host::new(
            HostConfig::default_for("registry.example"),
            &ClientPool::default(),
            (Duration::from_secs(1), Duration::from_secs(1)),
        );
        let auth = Auth::new(Credentials {
            auth: RegistryAuth::Basic("alice".into(), "s3cret".into()),
            source: CredentialSource::Anonymous,
        });
        let challenge = HeaderValue::from_static(r#"Bearer realm="http://collector.example/token",service="r""#);
        let refused = auth.authorize(&host, Some(&challenge), "m", Access::Pull).await;
        assert!(
            matches!(&refused, Err(Attempt::Denied(RegistryError::Unauthorized { detail, .. })) if detail.contains("not https")),
            "refused: {}",
            refused.is_err()
        );
        assert!(auth.cached(Access::Pull).is_none(), "nothing kept");
    }

    #[test]
    fn challenges_are_parsed_with_quotes_and_commas() {
        let c = Challenge::parse(
            r#"Bearer realm="https://auth.example/token",service="registry.example",scope="repository:a/b:pull,push""#,
        );
        let Challenge::Bearer(p) = c else { panic!("{c:?}") };
        assert_eq!(p["realm"], "https://auth.example/token");
        assert_eq!(p["service"], "registry.example");
        assert_eq!(p["scope"], "repository:a/b:pull,push");
        let Challenge::Bearer(p) = Challenge::parse(r#"bearer Realm=http://x/t, service = "s\"q""#) else { panic!() };
        assert_eq!(p["realm"], "http://x/t");
        assert_eq!(p["service"], "s\"q");
        assert_eq!(Challenge::parse(r#"Basic realm="test""#), Challenge::Basic);
        assert_eq!(Challenge::parse("Negotiate"), Challenge::Other);
        assert_eq!(Challenge::parse("Bearer"), Challenge::Bearer(HashMap::new()));
    }

    #[test]
    fn statuses_are_sorted_by_what_another_try_can_mend() {
        let r = "r.io/m:v1";
        assert!(matches!(
            status_attempt(StatusCode::NOT_FOUND, "m", r, ""),
            Attempt::Fatal(RegistryError::NotFound { .. })
        ));
        assert!(matches!(status_attempt(StatusCode::FORBIDDEN, "m", r, ""), Attempt::Denied(_)));
        for s in [408, 429, 500, 502, 503] {
            assert!(matches!(status_attempt(StatusCode::from_u16(s).unwrap(), "m", r, ""), Attempt::Retry(..)), "{s}");
        }
        assert!(matches!(
            status_attempt(StatusCode::BAD_REQUEST, "m", r, &"x".repeat(1000)),
            Attempt::Fatal(RegistryError::Invalid { detail, .. }) if detail.len() < 300
        ));
    }
}
