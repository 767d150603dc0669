//! Where a registry is reached: containerd's hosts directory
//! (`/etc/containerd/certs.d/<host>/hosts.toml`), so that a node's mirrors, P2P proxy
//! (Dragonfly), private CAs, client certificates and plain-HTTP registries apply to us
//! exactly as they apply to containerd.
//!
//! For a registry `R`, the file `<dir>/R/hosts.toml` is read, else `<dir>/_default/hosts.toml`.
//! Its `[host."URL"]` entries are tried in the order written, then `server` (when the
//! file names none, the registry itself: `https://R`, or `http://R` on loopback, as
//! without a file). Each entry may set `capabilities` (`pull`, `resolve`, `push`),
//! `skip_verify`, `ca` (a path or a list), `client` (a path holding certificate and key,
//! a `[cert, key]` pair, or a list of pairs), `header` (name to a value or a list of
//! values) and `override_path`; the top-level keys are the `server` entry's. Relative
//! paths are taken from the file's directory. A URL's path, if any, is where the
//! registry's API lives (`/v2` is appended unless `override_path`).
//!
//! The file is written by the node's administrator and is trusted as containerd trusts
//! it; what it may not do is make a request go where no entry says: a URL must be
//! `http` or `https` with a host and nothing else (no user, query or fragment).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::is_loopback;

/// The default hosts directory, containerd's, used when it exists.
pub const DEFAULT_HOSTS_DIR: &str = "/etc/containerd/certs.d";

/// Largest hosts.toml read; real ones are a few hundred bytes.
const MAX_HOSTS_FILE: u64 = 1 << 20;

/// Why a registry's hosts could not be configured. Names the file.
#[derive(Debug, thiserror::Error)]
pub enum HostsError {
    #[error("reading {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("{path}: {reason}")]
    Invalid { path: String, reason: String },
}

/// What a host may be asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Capabilities {
    /// Blobs, and manifests by digest.
    pub pull: bool,
    /// Manifests by tag.
    pub resolve: bool,
    /// Uploads.
    pub push: bool,
}

impl Capabilities {
    const ALL: Self = Self { pull: true, resolve: true, push: true };
}

/// One place a registry is reached, in the order it is tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostConfig {
    /// `http` or `https`.
    pub scheme: String,
    /// `host[:port]` as written.
    pub authority: String,
    /// Where the API lives, without a trailing slash (`/v2` usually).
    pub path: String,
    pub capabilities: Capabilities,
    pub skip_verify: bool,
    /// PEM files of extra roots for this host.
    pub ca: Vec<PathBuf>,
    /// Client certificates: a PEM file holding certificate and key, or certificate and
    /// key apart.
    pub client: Vec<(PathBuf, Option<PathBuf>)>,
    /// Headers sent with every request to this host.
    pub headers: Vec<(String, String)>,
    /// Whether this is not the registry itself (a mirror, a P2P proxy): requests carry
    /// `ns=<registry>` as containerd's do, and no tag is resolved here unless allowed.
    pub mirror: bool,
}

impl HostConfig {
    /// The registry itself, as reached without any configuration.
    pub fn default_for(registry: &str) -> Self {
        let scheme = if is_loopback(registry) { "http" } else { "https" };
        let authority = if registry == "docker.io" { "registry-1.docker.io" } else { registry };
        Self {
            scheme: scheme.to_owned(),
            authority: authority.to_owned(),
            path: "/v2".to_owned(),
            capabilities: Capabilities::ALL,
            skip_verify: false,
            ca: Vec::new(),
            client: Vec::new(),
            headers: Vec::new(),
            mirror: false,
        }
    }

    /// `scheme://authority/path`, the base of every request URL.
    pub fn base(&self) -> String {
        format!("{}://{}{}", self.scheme, self.authority, self.path)
    }

    /// What a client for this host is made of: hosts that agree on it share one.
    pub fn tls_key(&self) -> String {
        format!("{}|{}|{:?}|{:?}", self.scheme, self.skip_verify, self.ca, self.client)
    }
}

/// Where hosts files are looked for; `None`: nowhere (every registry is reached at
/// its own address).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HostsDir(pub Option<PathBuf>);

impl HostsDir {
    /// containerd's directory when it exists, else none.
    pub fn system() -> Self {
        let dir = Path::new(DEFAULT_HOSTS_DIR);
        Self(dir.is_dir().then(|| dir.to_owned()))
    }

    /// From a flag or config value: empty means none.
    pub fn from_setting(value: &Path) -> Self {
        Self((!value.as_os_str().is_empty()).then(|| value.to_owned()))
    }

    /// The hosts of `registry` (`host[:port]`), in the order they are tried.
    pub fn hosts(&self, registry: &str) -> Result<Vec<HostConfig>, HostsError> {
        let Some(dir) = &self.0 else { return Ok(vec![HostConfig::default_for(registry)]) };
        // A registry name is `host[:port]`; anything else must not pick a directory.
        let safe = !registry.is_empty()
            && !registry.starts_with('.')
            && !registry.contains(['/', '\\', '\0'])
            && registry != "_default";
        let candidates = safe.then(|| dir.join(registry)).into_iter().chain([dir.join("_default")]);
        for host_dir in candidates {
            let file = host_dir.join("hosts.toml");
            match read_bounded(&file) {
                Ok(text) => return parse(registry, &host_dir, &file, &text),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(HostsError::Read { path: file.display().to_string(), source }),
            }
        }
        Ok(vec![HostConfig::default_for(registry)])
    }
}

fn read_bounded(path: &Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?.take(MAX_HOSTS_FILE + 1).read_to_string(&mut text)?;
    if text.len() as u64 > MAX_HOSTS_FILE {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, "larger than 1 MiB"));
    }
    Ok(text)
}

/// The keys an entry (or the file's top level, for `server`) may have.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    capabilities: Option<Vec<String>>,
    #[serde(default)]
    skip_verify: bool,
    ca: Option<OneOrMany>,
    client: Option<toml::Value>,
    #[serde(default)]
    header: BTreeMap<String, OneOrMany>,
    #[serde(default)]
    override_path: bool,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// Parses one hosts.toml (`text`, read from `file` in `dir`) for `registry`.
pub fn parse(registry: &str, dir: &Path, file: &Path, text: &str) -> Result<Vec<HostConfig>, HostsError> {
    let invalid = |reason: String| HostsError::Invalid { path: file.display().to_string(), reason };
    let mut top: toml::Table = toml::from_str(text).map_err(|e| invalid(e.message().to_owned()))?;
    let server = match top.remove("server") {
        None => None,
        Some(toml::Value::String(url)) => Some(url),
        Some(_) => return Err(invalid("server must be a URL".to_owned())),
    };
    // Kept in the order written (`toml`'s `preserve_order`): tried in that order.
    let listed = match top.remove("host") {
        None => toml::Table::new(),
        Some(toml::Value::Table(t)) => t,
        Some(_) => return Err(invalid("host must be a table of URLs".to_owned())),
    };
    let top: Entry =
        toml::Value::Table(top).try_into().map_err(|e: toml::de::Error| invalid(e.message().to_owned()))?;
    let mut hosts = Vec::new();
    for (url, entry) in listed {
        let entry: Entry =
            entry.try_into().map_err(|e: toml::de::Error| invalid(format!("host {url:?}: {}", e.message())))?;
        let host = host_config(&url, entry, dir).map_err(|reason| invalid(format!("host {url:?}: {reason}")))?;
        hosts.push(host);
    }
    let server = match server {
        Some(url) => host_config(&url, top, dir).map_err(|reason| invalid(format!("server: {reason}")))?,
        None => {
            let default = HostConfig::default_for(registry);
            let url = format!("{}://{}", default.scheme, default.authority);
            host_config(&url, top, dir).map_err(invalid)?
        }
    };
    let server_host = server.authority.clone();
    hosts.push(server);
    // A host that is the registry itself under another entry is not a mirror.
    for host in &mut hosts {
        host.mirror = host.authority != registry && host.authority != server_host;
    }
    Ok(hosts)
}

fn host_config(url: &str, entry: Entry, dir: &Path) -> Result<HostConfig, String> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| format!("{url:?} is not an http or https URL"))?;
    let scheme = scheme.to_ascii_lowercase();
    if scheme != "http" && scheme != "https" {
        return Err(format!("{url:?} is not an http or https URL"));
    }
    let (authority, path) = rest.find('/').map_or((rest, ""), |i| (&rest[..i], &rest[i..]));
    if authority.is_empty() || authority.contains(['@', '?', '#', ' ']) || path.contains(['?', '#']) {
        return Err(format!("{url:?} must be scheme://host[:port][/path], with no user, query or fragment"));
    }
    let mut path = path.trim_end_matches('/').to_owned();
    if !entry.override_path && !path.ends_with("/v2") {
        path.push_str("/v2");
    }
    let capabilities = match entry.capabilities {
        None => Capabilities::ALL,
        Some(names) => {
            let mut caps = Capabilities::default();
            for name in names {
                match name.as_str() {
                    "pull" => caps.pull = true,
                    "resolve" => caps.resolve = true,
                    "push" => caps.push = true,
                    other => return Err(format!("unknown capability {other:?}")),
                }
            }
            caps
        }
    };
    let at = |p: &str| if Path::new(p).is_absolute() { PathBuf::from(p) } else { dir.join(p) };
    let ca = entry.ca.map(OneOrMany::into_vec).unwrap_or_default().iter().map(|p| at(p)).collect();
    let client = client_pairs(entry.client)?
        .into_iter()
        .map(|(cert, key)| (at(&cert), key.filter(|k| !k.is_empty()).map(|k| at(&k))))
        .collect();
    let mut headers = Vec::new();
    for (name, values) in entry.header {
        http::HeaderName::from_bytes(name.as_bytes()).map_err(|_| format!("header name {name:?} is not valid"))?;
        for value in values.into_vec() {
            http::HeaderValue::from_str(&value).map_err(|_| format!("header {name} has a value that is not valid"))?;
            headers.push((name.clone(), value));
        }
    }
    Ok(HostConfig {
        scheme,
        authority: authority.to_owned(),
        path,
        capabilities,
        skip_verify: entry.skip_verify,
        ca,
        client,
        headers,
        mirror: false,
    })
}

/// `client`: `"both.pem"`, `["cert", "key"]`, or `[["cert", "key"], ...]`.
fn client_pairs(value: Option<toml::Value>) -> Result<Vec<(String, Option<String>)>, String> {
    use toml::Value as V;
    let bad = || "client must be a path, a [cert, key] pair or a list of pairs".to_owned();
    let pair = |v: &[V]| -> Result<(String, Option<String>), String> {
        match v {
            [V::String(c)] => Ok((c.clone(), None)),
            [V::String(c), V::String(k)] => Ok((c.clone(), Some(k.clone()))),
            _ => Err(bad()),
        }
    };
    match value {
        None => Ok(Vec::new()),
        Some(V::String(path)) => Ok(vec![(path, None)]),
        Some(V::Array(items)) if items.iter().all(|i| i.is_str()) => Ok(vec![pair(&items)?]),
        Some(V::Array(items)) => items
            .iter()
            .map(|item| match item {
                V::Array(p) => pair(p),
                V::String(path) => Ok((path.clone(), None)),
                _ => Err(bad()),
            })
            .collect(),
        Some(_) => Err(bad()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in(registry: &str, text: &str) -> Result<Vec<HostConfig>, HostsError> {
        parse(registry, Path::new("/etc/certs.d/r"), Path::new("/etc/certs.d/r/hosts.toml"), text)
    }

    #[test]
    fn mirrors_come_first_in_the_order_written_then_the_server() {
        let hosts = parse_in(
            "registry.example.com",
            r#"
server = "https://registry.example.com"
ca = "ca.pem"

[host."http://127.0.0.1:4001"]
capabilities = ["pull", "resolve"]
[host."http://127.0.0.1:4001".header]
X-Dragonfly-Registry = ["https://registry.example.com"]

[host."https://mirror.example.com/prefix"]
capabilities = ["pull"]
skip_verify = true
client = [["/abs/client.pem", "client.key"]]
"#,
        )
        .unwrap();
        assert_eq!(hosts.len(), 3);
        assert_eq!(hosts[0].base(), "http://127.0.0.1:4001/v2");
        assert_eq!(hosts[0].headers, [("X-Dragonfly-Registry".to_owned(), "https://registry.example.com".to_owned())]);
        assert!(hosts[0].mirror && hosts[0].capabilities.resolve && !hosts[0].capabilities.push);
        assert_eq!(hosts[1].base(), "https://mirror.example.com/prefix/v2");
        assert!(hosts[1].skip_verify && !hosts[1].capabilities.resolve);
        assert_eq!(
            hosts[1].client,
            [(PathBuf::from("/abs/client.pem"), Some(PathBuf::from("/etc/certs.d/r/client.key")))]
        );
        assert_eq!(hosts[2].base(), "https://registry.example.com/v2");
        assert_eq!(hosts[2].ca, [PathBuf::from("/etc/certs.d/r/ca.pem")]);
        assert!(!hosts[2].mirror && hosts[2].capabilities == Capabilities::ALL);
    }

    #[test]
    fn without_a_server_the_registry_itself_comes_last_and_loopback_is_plain_http() {
        let hosts = parse_in("127.0.0.1:5000", "[host.\"http://127.0.0.1:6000\"]\n").unwrap();
        assert_eq!(
            hosts.iter().map(HostConfig::base).collect::<Vec<_>>(),
            ["http://127.0.0.1:6000/v2", "http://127.0.0.1:5000/v2"]
        );
        let plain = parse_in("r.example.com:5000", "server = \"http://r.example.com:5000\"\n").unwrap();
        assert_eq!(plain[0].base(), "http://r.example.com:5000/v2");
        let hosts = parse_in("docker.io", "").unwrap();
        assert_eq!(hosts[0].base(), "https://registry-1.docker.io/v2");
        let kept = parse_in("r.io", "server = \"https://r.io/custom/api\"\noverride_path = true\n").unwrap();
        assert_eq!(kept[0].base(), "https://r.io/custom/api");
    }

    #[test]
    fn bad_files_are_refused_naming_the_file() {
        for text in [
            "server = \"ftp://r.io\"",
            "server = \"https://user:pw@r.io\"",
            "server = \"https://r.io/v2?x=1\"",
            "[host.\"r.io\"]",
            "[host.\"https://m.io\"]\ncapabilities = [\"fly\"]",
            "[host.\"https://m.io\"]\nheader = { \"bad name\" = \"x\" }",
            "[host.\"https://m.io\"]\nheader = { X = \"line\\nbreak\" }",
            "[host.\"https://m.io\"]\nclient = 3",
            "unknown = 1",
            "server = [",
        ] {
            let err = parse_in("r.io", text).unwrap_err().to_string();
            assert!(err.starts_with("/etc/certs.d/r/hosts.toml: "), "{text}: {err}");
        }
    }

    #[test]
    fn the_directory_is_the_registrys_then_default_and_a_name_cannot_climb_out() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = HostsDir(Some(dir.path().to_owned()));
        assert_eq!(hosts.hosts("r.io:5000").unwrap(), [HostConfig::default_for("r.io:5000")]);
        std::fs::create_dir_all(dir.path().join("_default")).unwrap();
        std::fs::write(dir.path().join("_default/hosts.toml"), "[host.\"https://all.example\"]\n").unwrap();
        std::fs::create_dir_all(dir.path().join("r.io:5000")).unwrap();
        std::fs::write(dir.path().join("r.io:5000/hosts.toml"), "[host.\"https://mine.example\"]\n").unwrap();
        assert_eq!(hosts.hosts("r.io:5000").unwrap()[0].authority, "mine.example");
        assert_eq!(hosts.hosts("other.io").unwrap()[0].authority, "all.example");
        for name in ["..", "../r.io:5000", "a/b", "_default"] {
            assert_eq!(hosts.hosts(name).unwrap()[0].authority, "all.example", "{name}");
        }
        assert_eq!(HostsDir::default().hosts("r.io").unwrap(), [HostConfig::default_for("r.io")]);
    }
}
