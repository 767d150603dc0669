//! Registry credentials from Docker's `config.json` (`$DOCKER_CONFIG` or `~/.docker`),
//! looked up as Docker does: the credential helper named for the registry
//! (`credHelpers`), then the file's own `auths` entry, then the default helper
//! (`credsStore`); anonymous when none has any. A model may hold credentials of its own
//! in front of those: a pod's pull secret (CSI), or what a CRI pull of its image proved
//! ([`keychain`], for that image's registry alone).
//!
//! They are read when a client is made and again when the registry refuses them (cloud
//! registries hand out credentials that expire within hours). Secrets stay inside
//! [`Credentials`]: no error, log line or `Debug` output of this module carries one, nor
//! anything a helper printed, since a failing helper may echo what it holds.

pub mod keychain;

use std::ffi::OsString;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use oci_client::secrets::RegistryAuth;
use serde::Deserialize;

/// The largest answer we read from a credential helper (a few hundred bytes is usual).
const MAX_HELPER_OUTPUT: u64 = 1 << 20;

/// How often a running helper is checked for having exited.
const HELPER_POLL: Duration = Duration::from_millis(10);

/// What a helper prints when it holds nothing for the registry (the helper protocol's
/// "not found" answer, with a non-zero exit).
const HELPER_NOT_FOUND: &[u8] = b"credentials not found";

/// Why credentials could not be read. No variant holds a secret or helper output.
#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    /// `config.json` exists but cannot be read.
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    /// `config.json` is not a Docker configuration file.
    #[error("{path} is not a valid docker config file")]
    Parse { path: String },
    /// The file's entry for the registry cannot be decoded.
    #[error("{path}: credentials for {registry} cannot be used: {reason}")]
    Decode { path: String, registry: String, reason: String },
    /// The helper's name could be a path, which Docker never runs.
    #[error("credential helper name {helper:?} for {registry} is not a plain name")]
    HelperName { helper: String, registry: String },
    /// The helper could not be run.
    #[error("credential helper {helper} for {registry} could not be started: {source}")]
    HelperStart { helper: String, registry: String, source: std::io::Error },
    /// The helper exited with an error.
    #[error("credential helper {helper} for {registry} failed ({status})")]
    HelperFailed { helper: String, registry: String, status: ExitStatus },
    /// The helper did not answer in time and was killed.
    #[error("credential helper {helper} for {registry} did not answer within {timeout:?}")]
    HelperTimeout { helper: String, registry: String, timeout: Duration },
    /// The helper answered something other than credentials.
    #[error("credential helper {helper} for {registry} answered something other than credentials")]
    HelperOutput { helper: String, registry: String },
}

/// Where a registry's credentials came from; says nothing about the secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CredentialSource {
    /// No credentials anywhere: requests go anonymously.
    Anonymous,
    /// A pull secret handed over with a request (a CSI volume's `secrets`).
    PullSecret,
    /// The credentials kubelet gave a CRI `PullImage` of this image (through the CRI
    /// proxy), which containerd pulled it with.
    CriPull(keychain::ImageKey),
    /// The `auths` entry of this `config.json`.
    File(PathBuf),
    /// This program (`docker-credential-<name>`).
    Helper(String),
}

impl std::fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Anonymous => f.write_str("anonymous"),
            Self::PullSecret => f.write_str("the request's pull secret"),
            Self::CriPull(image) => write!(f, "the CRI pull of {image}"),
            Self::File(path) => write!(f, "file {}", path.display()),
            Self::Helper(program) => write!(f, "credential helper {program}"),
        }
    }
}

/// Credentials for one registry and where they came from. `Debug` shows the source only.
#[derive(Clone)]
pub struct Credentials {
    pub auth: RegistryAuth,
    pub source: CredentialSource,
}

impl Credentials {
    /// No credentials.
    pub fn anonymous() -> Self {
        Self { auth: RegistryAuth::Anonymous, source: CredentialSource::Anonymous }
    }

    /// Replaces every occurrence of the secret in `text`, for messages built from what a
    /// registry or token server answered (which may echo what it was sent).
    pub fn redact(&self, text: String) -> String {
        let secret = match &self.auth {
            RegistryAuth::Anonymous => return text,
            RegistryAuth::Basic(_, password) => password,
            RegistryAuth::Bearer(token) => token,
        };
        if secret.is_empty() || !text.contains(secret.as_str()) {
            return text;
        }
        text.replace(secret.as_str(), "<redacted>")
    }
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("source", &self.source).finish_non_exhaustive()
    }
}

/// Where credentials are looked up: a pull secret held in memory, if any, or the
/// credentials of a CRI pull for its image's registry, then Docker's configuration
/// directory and the directories searched for helpers.
#[derive(Debug, Clone)]
pub struct CredentialStore {
    pull_secret: Option<PullSecret>,
    cri_pull: Option<keychain::CriCredentials>,
    config_dir: Option<PathBuf>,
    search_path: Option<OsString>,
    helper_timeout: Duration,
}

/// A `.dockerconfigjson` (a Kubernetes pull secret's content), kept in memory only.
/// `Debug` shows nothing of it.
#[derive(Clone)]
struct PullSecret(std::sync::Arc<Vec<u8>>);

impl std::fmt::Debug for PullSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PullSecret(..)")
    }
}

/// A helper's answer (`docker-credential-* get`).
#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperAnswer {
    username: String,
    secret: String,
}

impl CredentialStore {
    /// The store Docker uses: `$DOCKER_CONFIG`, else `~/.docker`; helpers on `$PATH`. A
    /// helper that runs longer than `helper_timeout` is killed.
    pub fn from_env(helper_timeout: Duration) -> Self {
        let config_dir = std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".docker")));
        Self::new(config_dir, std::env::var_os("PATH"), helper_timeout)
    }

    /// A store reading `config_dir/config.json` and running helpers found in
    /// `search_path` (a `PATH`-style list).
    pub fn new(config_dir: Option<PathBuf>, search_path: Option<OsString>, helper_timeout: Duration) -> Self {
        Self { pull_secret: None, cri_pull: None, config_dir, search_path, helper_timeout }
    }

    /// This store with `docker_config_json` (a `.dockerconfigjson`: `{"auths": {...}}`, as
    /// a Kubernetes pull secret holds) consulted first: its `auths` entry for a registry
    /// wins; registries it does not name are looked up as before. Fails, naming no
    /// secret, if it is not a Docker configuration.
    pub fn with_pull_secret(mut self, docker_config_json: Vec<u8>) -> Result<Self, CredentialError> {
        let parsed: Result<serde_json::Map<String, serde_json::Value>, _> = serde_json::from_slice(&docker_config_json);
        if !parsed.is_ok_and(|config| config.get("auths").is_some_and(serde_json::Value::is_object)) {
            return Err(CredentialError::Parse { path: "the pull secret's .dockerconfigjson".to_owned() });
        }
        self.pull_secret = Some(PullSecret(std::sync::Arc::new(docker_config_json)));
        Ok(self)
    }

    /// This store with the credentials a CRI pull of an image proved consulted first, for
    /// that image's registry only ([`keychain::CriCredentials::for_registry`]); other
    /// registries are looked up as before.
    pub fn with_cri_pull(mut self, credentials: keychain::CriCredentials) -> Self {
        self.cri_pull = Some(credentials);
        self
    }

    /// The credentials for `registry` (`host[:port]`), reading the configuration anew.
    pub fn get(&self, registry: &str) -> Result<Credentials, CredentialError> {
        if let Some(pull) = &self.cri_pull {
            if let Some(auth) = pull.for_registry(registry) {
                return Ok(Credentials { auth, source: CredentialSource::CriPull(pull.image().clone()) });
            }
        }
        if let Some(PullSecret(json)) = &self.pull_secret {
            use docker_credential::{CredentialRetrievalError as E, DockerCredential as D};
            match docker_credential::get_credential_from_reader(&json[..], registry) {
                Ok(found) => {
                    let auth = match found {
                        D::UsernamePassword(user, password) => RegistryAuth::Basic(user, password),
                        D::IdentityToken(token) => RegistryAuth::Bearer(token),
                    };
                    return Ok(Credentials { auth, source: CredentialSource::PullSecret });
                }
                Err(E::NoCredentialConfigured) => {}
                Err(e) => {
                    return Err(CredentialError::Decode {
                        path: "the pull secret".to_owned(),
                        registry: registry.to_owned(),
                        reason: e.to_string(),
                    })
                }
            }
        }
        let Some(dir) = &self.config_dir else { return Ok(Credentials::anonymous()) };
        let path = dir.join("config.json");
        let shown = || path.display().to_string();
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Credentials::anonymous()),
            Err(source) => return Err(CredentialError::Read { path: shown(), source }),
        };
        let mut config: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&bytes).map_err(|_| CredentialError::Parse { path: shown() })?;
        let text_of = |v: Option<serde_json::Value>| match v {
            Some(serde_json::Value::String(s)) if !s.is_empty() => Some(s),
            _ => None,
        };
        let mut helpers = config.remove("credHelpers");
        let for_registry = helpers.as_mut().and_then(|h| h.as_object_mut()).and_then(|h| h.remove(registry));
        if let Some(helper) = text_of(for_registry) {
            return self.ask_helper(&helper, registry);
        }
        let store = text_of(config.remove("credsStore"));
        // What is left holds no helper, so this reads the file's `auths` only.
        let file_only = serde_json::to_vec(&config).map_err(|_| CredentialError::Parse { path: shown() })?;
        use docker_credential::{CredentialRetrievalError as E, DockerCredential as D};
        match docker_credential::get_credential_from_reader(&file_only[..], registry) {
            Ok(found) => {
                let auth = match found {
                    D::UsernamePassword(user, password) => RegistryAuth::Basic(user, password),
                    D::IdentityToken(token) => RegistryAuth::Bearer(token),
                };
                Ok(Credentials { auth, source: CredentialSource::File(path) })
            }
            Err(E::NoCredentialConfigured) => match store {
                Some(helper) => self.ask_helper(&helper, registry),
                None => Ok(Credentials::anonymous()),
            },
            Err(E::ConfigReadError) => Err(CredentialError::Parse { path: shown() }),
            // The remaining reasons (undecodable `auth`, `auth` contradicting
            // `username`/`password`) name no secret.
            Err(e) => {
                Err(CredentialError::Decode { path: shown(), registry: registry.to_owned(), reason: e.to_string() })
            }
        }
    }

    /// Runs `docker-credential-<helper> get` with the registry on its standard input.
    fn ask_helper(&self, helper: &str, registry: &str) -> Result<Credentials, CredentialError> {
        let program = format!("docker-credential-{helper}");
        let err_start =
            |source| CredentialError::HelperStart { helper: program.clone(), registry: registry.to_owned(), source };
        if helper.contains('/') || helper == "." || helper == ".." {
            return Err(CredentialError::HelperName { helper: helper.to_owned(), registry: registry.to_owned() });
        }
        let found = self
            .search_path
            .as_deref()
            .into_iter()
            .flat_map(std::env::split_paths)
            .map(|dir| dir.join(&program))
            .find(|p| p.is_file())
            .ok_or_else(|| err_start(std::io::ErrorKind::NotFound.into()))?;
        // Standard error is dropped unread: a failing helper may print what it holds.
        let mut child = Command::new(&found)
            .arg("get")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .map_err(err_start)?;
        if let Some(mut stdin) = child.stdin.take() {
            // A helper that exits without reading its input is judged by its answer.
            let _ = stdin.write_all(registry.as_bytes());
        }
        let mut stdout = child.stdout.take().expect("stdout is piped");
        let (tx, answer) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut out = Vec::new();
            let _ = (&mut stdout).take(MAX_HELPER_OUTPUT).read_to_end(&mut out);
            let _ = tx.send(out);
        });
        let deadline = Instant::now() + self.helper_timeout;
        let timed_out = || CredentialError::HelperTimeout {
            helper: program.clone(),
            registry: registry.to_owned(),
            timeout: self.helper_timeout,
        };
        let status = loop {
            match child.try_wait() {
                Ok(Some(status)) => break status,
                Ok(None) if Instant::now() < deadline => std::thread::sleep(HELPER_POLL),
                Ok(None) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    return Err(timed_out());
                }
                Err(e) => return Err(err_start(e)),
            }
        };
        // A process the helper left behind may still hold the pipe open: the answer,
        // too, must come before the deadline.
        let out = answer.recv_timeout(deadline.saturating_duration_since(Instant::now())).map_err(|_| timed_out())?;
        if !status.success() {
            if out.windows(HELPER_NOT_FOUND.len()).any(|w| w.eq_ignore_ascii_case(HELPER_NOT_FOUND)) {
                return Ok(Credentials::anonymous());
            }
            return Err(CredentialError::HelperFailed { helper: program, registry: registry.to_owned(), status });
        }
        let answer: HelperAnswer = serde_json::from_slice(&out)
            .map_err(|_| CredentialError::HelperOutput { helper: program.clone(), registry: registry.to_owned() })?;
        // Docker's convention for an identity token rather than a user.
        let auth = if answer.username == "<token>" {
            RegistryAuth::Bearer(answer.secret)
        } else {
            RegistryAuth::Basic(answer.username, answer.secret)
        };
        Ok(Credentials { auth, source: CredentialSource::Helper(program) })
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    const SECRET: &str = "s3cret-Value-42";

    /// A store over a temp dir holding `config` as `config.json` and the helper scripts
    /// `helpers` (name, shell body), which are the only programs it can run.
    fn store(config: &str, helpers: &[(&str, &str)], timeout: Duration) -> (CredentialStore, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("config.json"), config).unwrap();
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        for (name, body) in helpers {
            let path = bin.join(format!("docker-credential-{name}"));
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        (CredentialStore::new(Some(dir.path().to_owned()), Some(bin.into_os_string()), timeout), dir)
    }

    fn basic(c: &Credentials) -> (&str, &str) {
        match &c.auth {
            RegistryAuth::Basic(user, password) => (user, password),
            other => panic!("expected basic credentials, got {other:?}"),
        }
    }

    #[test]
    fn the_file_entry_for_the_registry_is_used() {
        let auth = "YWxpY2U6czNjcmV0LVZhbHVlLTQy"; // alice:s3cret-Value-42
        let config = format!(r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{auth}"}},"other:1":{{"auth":"eDp5"}}}}}}"#);
        let (store, dir) = store(&config, &[], Duration::from_secs(5));
        let found = store.get("127.0.0.1:5000").unwrap();
        assert_eq!(basic(&found), ("alice", SECRET));
        assert_eq!(found.source, CredentialSource::File(dir.path().join("config.json")));
        assert!(!format!("{found:?}").contains(SECRET), "{found:?}");
        assert_eq!(store.get("127.0.0.1:6000").unwrap().source, CredentialSource::Anonymous);
    }

    #[test]
    fn a_missing_config_is_anonymous_and_a_broken_one_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let none = CredentialStore::new(Some(dir.path().to_owned()), None, Duration::from_secs(1));
        assert_eq!(none.get("r:1").unwrap().source, CredentialSource::Anonymous);
        let (broken, _dir) = store("{not json", &[], Duration::from_secs(1));
        assert!(matches!(broken.get("r:1"), Err(CredentialError::Parse { .. })));
    }

    #[test]
    fn helpers_answer_for_their_registry_then_the_default_store() {
        let helpers = [
            // Echoes the registry it was asked for as the user name.
            (
                "mine",
                r#"read reg; printf '{"ServerURL":"%s","Username":"%s","Secret":"s3cret-Value-42"}' "$reg" "$reg""#,
            ),
            ("store", r#"printf '{"Username":"<token>","Secret":"s3cret-Value-42"}'"#),
        ];
        let config = r#"{"credHelpers":{"127.0.0.1:5000":"mine"},"credsStore":"store","auths":{"127.0.0.1:5000":{}}}"#;
        let (store, _dir) = store(config, &helpers, Duration::from_secs(5));
        let mine = store.get("127.0.0.1:5000").unwrap();
        assert_eq!(basic(&mine), ("127.0.0.1:5000", SECRET));
        assert_eq!(mine.source, CredentialSource::Helper("docker-credential-mine".into()));
        let default = store.get("127.0.0.1:6000").unwrap();
        assert!(matches!(&default.auth, RegistryAuth::Bearer(t) if t == SECRET));
        assert_eq!(default.source.to_string(), "credential helper docker-credential-store");
    }

    #[test]
    fn helper_failures_never_show_what_the_helper_printed() {
        let helpers = [
            ("loud", "echo s3cret-Value-42; echo s3cret-Value-42 >&2; exit 1"),
            ("garbled", "echo 'Secret: s3cret-Value-42'"),
            ("empty", "echo 'credentials not found in native keychain'; exit 1"),
            ("slow", "exec sleep 30"),
        ];
        let config = r#"{"credHelpers":{"a":"loud","b":"garbled","c":"empty","d":"slow","e":"absent","f":"../bin/x"}}"#;
        let (store, _dir) = store(config, &helpers, Duration::from_millis(300));
        for (registry, want) in [("a", "failed"), ("b", "answered something other"), ("e", "could not be started")] {
            let err = store.get(registry).expect_err(registry);
            let shown = format!("{err} {err:?}");
            assert!(shown.contains(want) && !shown.contains(SECRET), "{registry}: {shown}");
        }
        assert_eq!(store.get("c").unwrap().source, CredentialSource::Anonymous, "the helper has none");
        let started = Instant::now();
        assert!(matches!(store.get("d"), Err(CredentialError::HelperTimeout { .. })));
        assert!(started.elapsed() < Duration::from_secs(5), "a hung helper is killed at its deadline");
        assert!(matches!(store.get("f"), Err(CredentialError::HelperName { .. })));
    }

    #[test]
    fn a_cri_pulls_credentials_go_to_its_registry_and_the_node_answers_for_others() {
        // The attack: a model of an image in one registry whose lazy index or source names
        // another host, which would then receive the image's credentials.
        let node = "bm9kZTpub2RlLXNlY3JldA=="; // node:node-secret
        let config = format!(r#"{{"auths":{{"127.0.0.1:5000":{{"auth":"{node}"}},"other:1":{{"auth":"{node}"}}}}}}"#);
        let (store, dir) = store(&config, &[], Duration::from_secs(5));
        let keychain = keychain::CriKeychain::new(Duration::from_secs(60));
        let image = keychain::ImageName::parse("127.0.0.1:5000/models/m:v1").unwrap();
        keychain.pulling(&image, RegistryAuth::Basic("alice".into(), SECRET.into())).succeeded(&[]);
        let store = store.with_cri_pull(keychain.for_image(&image.key).unwrap());
        let own = store.get("127.0.0.1:5000").unwrap();
        assert_eq!(basic(&own), ("alice", SECRET));
        assert_eq!(own.source.to_string(), "the CRI pull of 127.0.0.1:5000/models/m:v1");
        let other = store.get("other:1").unwrap();
        assert_eq!(basic(&other), ("node", "node-secret"), "another registry gets the node's credentials");
        assert_eq!(other.source, CredentialSource::File(dir.path().join("config.json")));
        assert_eq!(store.get("elsewhere:2").unwrap().source, CredentialSource::Anonymous);
        assert!(!format!("{store:?} {own:?}").contains(SECRET));
    }

    #[test]
    fn redaction_removes_every_copy_of_the_secret() {
        let c =
            Credentials { auth: RegistryAuth::Basic("u".into(), SECRET.into()), source: CredentialSource::Anonymous };
        assert_eq!(c.redact(format!("a {SECRET} b {SECRET}")), "a <redacted> b <redacted>");
        assert_eq!(Credentials::anonymous().redact("as is".into()), "as is");
    }
}
