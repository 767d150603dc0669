//! Registry hosts from containerd's hosts directory, end to end: a mirror used while
//! the origin is down (and the origin while the mirror is), Dragonfly's P2P proxy with
//! the header its documentation gives for containerd, and a TLS registry with a private
//! CA and a client certificate. Every registry is a real `docker-registry` on loopback;
//! the P2P proxy is the test proxy, which refuses any request that does not name its
//! origin the way Dragonfly's does.

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use common::csi::{node_client, publish, unpublish};
use common::proxy::FaultProxy;
use common::*;

const SHARD: usize = 3 << 20;

/// Writes `<hosts>/<registry>/hosts.toml`.
fn write_hosts(hosts: &Path, registry: &str, toml: &str) {
    std::fs::create_dir_all(hosts.join(registry)).unwrap();
    std::fs::write(hosts.join(registry).join("hosts.toml"), toml).unwrap();
}

/// `inspect REFERENCE --hosts-dir HOSTS --retries 0` with a fresh cache (a cached
/// manifest would answer for a registry that cannot be reached).
fn inspect(reference: &str, hosts: &str) -> (bool, String, String) {
    let cache = tempfile::tempdir().unwrap();
    let cache = cache.path().to_str().unwrap();
    run_bin(&["inspect", reference, "--retries", "0", "--hosts-dir", hosts, "--cache-dir", cache])
}

/// Mounts `reference` with `--hosts-dir hosts`, checks every file against `src`, and
/// unmounts.
fn mount_and_compare(reference: &str, src: &Path, hosts: &Path, tmp: &Path, name: &str) {
    let mountpoint = tmp.join(format!("mnt-{name}"));
    let cache = tmp.join(format!("cache-{name}"));
    let args = ["--hosts-dir", hosts.to_str().unwrap()];
    let mut mount =
        MountProcess::start(reference, &mountpoint, &cache, &args).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_same_tree(src, &mountpoint);
    mount.stop();
}

#[test]
fn a_mirror_serves_while_the_origin_is_down_and_the_origin_while_the_mirror_is() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut origin = TestRegistry::start();
    let mut mirror = TestRegistry::start_sharing(&origin);
    let src = tmp.path().join("model");
    let reference = format!("{}/models/m:v1", origin.addr());
    // A converted model: its companion names the origin as the model's registry, and
    // that registry too must be reached through the node's mirrors.
    push_converted(&src, SHARD, &reference, &[]);
    let hosts = tmp.path().join("certs.d");
    write_hosts(
        &hosts,
        &origin.addr(),
        &format!("[host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n", mirror.addr()),
    );

    origin.stop();
    mount_and_compare(&reference, &src, &hosts, tmp.path(), "origin-down");
    let (ok, out, stderr) = inspect(&reference, hosts.to_str().unwrap());
    assert!(ok && out.contains("lazy index: sha256:"), "{out}{stderr}");
    // Without the hosts directory, the origin is all there is.
    let (ok, _, _) = inspect(&reference, "");
    assert!(!ok, "the origin is down");

    origin.restart();
    mirror.stop();
    mount_and_compare(&reference, &src, &hosts, tmp.path(), "mirror-down");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_reaches_a_model_and_its_companions_registry_through_the_configured_mirror() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let mut origin = TestRegistry::start();
    let mirror = TestRegistry::start_sharing(&origin);
    let src = tmp.path().join("model");
    let reference = format!("{}/models/m:v1", origin.addr());
    push_converted(&src, SHARD, &reference, &[]);
    let hosts = tmp.path().join("certs.d");
    write_hosts(&hosts, &origin.addr(), &format!("[host.\"http://{}\"]\n", mirror.addr()));
    let config =
        write_config(&tmp.path().join("etc"), &format!("[registry]\nconfig_path = {:?}\n", hosts.to_str().unwrap()));
    let socket = tmp.path().join("plugin/csi.sock");
    let serve = SnapshotterProcess::start_csi(&tmp.path().join("root"), &socket, &config);
    origin.stop();

    let mut node = node_client(&socket).await;
    let target = tmp.path().join("root/pods/a/mount");
    // The plain reference finds its companion, whose index names the origin again: every
    // request goes to the mirror.
    node.node_publish_volume(publish("vol-a", &target, &[("modelRef", &reference)])).await.unwrap();
    assert_same_tree(&src, &target);
    node.node_unpublish_volume(unpublish("vol-a", &target)).await.unwrap();
    drop(serve);
}

#[test]
fn the_dragonfly_header_reaches_the_p2p_proxy_and_ranges_pass_through_it() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let origin = TestRegistry::start();
    let src = tmp.path().join("model");
    let reference = format!("{}/models/m:v1", origin.addr());
    write_model_dir(&src, SHARD);
    push_dir(&src, &reference, "raw");

    let p2p = FaultProxy::start(origin.port);
    let origin_url = format!("http://{}", origin.addr());
    p2p.require_header("X-Dragonfly-Registry", &origin_url);
    // As Dragonfly's documentation writes it for containerd.
    let hosts = tmp.path().join("certs.d");
    write_hosts(
        &hosts,
        &origin.addr(),
        &format!(
            "server = \"{origin_url}\"\n\n[host.\"http://{}\"]\ncapabilities = [\"pull\", \"resolve\"]\n\n[host.\"http://{}\".header]\nX-Dragonfly-Registry = [\"{origin_url}\"]\n",
            p2p.addr(),
            p2p.addr()
        ),
    );
    // Without the header the proxy refuses, as Dragonfly's does.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", p2p.port)).unwrap();
    raw.write_all(b"GET /v2/ HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut answer = String::new();
    raw.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");

    let mountpoint = tmp.path().join("mnt");
    let args = ["--hosts-dir", hosts.to_str().unwrap()];
    let mut mount = MountProcess::start(&reference, &mountpoint, &tmp.path().join("cache"), &args).unwrap();
    // A read in the middle of a shard: a ranged request through the proxy.
    let shard = "model-00001-of-00002.safetensors";
    let expected = std::fs::read(src.join(shard)).unwrap();
    let mut middle = vec![0u8; 4096];
    let file = std::fs::File::open(mountpoint.join(shard)).unwrap();
    file.read_exact_at(&mut middle, (SHARD / 2) as u64).unwrap();
    assert_eq!(middle, expected[SHARD / 2..SHARD / 2 + 4096]);
    assert_same_tree(&src, &mountpoint);
    mount.stop();

    let (refused, ranged) = p2p.header_counts();
    let (blob_gets, _) = p2p.blob_counts();
    assert_eq!(refused, 1, "only the test's own request went without the header");
    assert!(blob_gets > 0 && ranged > 0, "blobs came through the proxy as ranges: {blob_gets} GETs, {ranged} ranged");
}

/// A CA, and a certificate it signed for `names` (server or client use), as PEM files.
struct Pki {
    ca_params: rcgen::CertificateParams,
    ca_key: rcgen::KeyPair,
}

impl Pki {
    fn new(dir: &Path) -> Self {
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(rcgen::DnType::CommonName, "test registry CA");
        ca_params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::DigitalSignature];
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
        Self { ca_params, ca_key }
    }

    fn issue(&self, dir: &Path, name: &str, sans: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) {
        let mut params = rcgen::CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        params.extended_key_usages = vec![usage];
        let key = rcgen::KeyPair::generate().unwrap();
        let issuer = rcgen::Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem()).unwrap();
    }
}

#[test]
fn a_tls_registry_with_a_private_ca_and_a_client_certificate_from_hosts_toml() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let pki_dir = tmp.path().join("pki");
    std::fs::create_dir_all(&pki_dir).unwrap();
    let pki = Pki::new(&pki_dir);
    pki.issue(&pki_dir, "server", &["127.0.0.1"], rcgen::ExtendedKeyUsagePurpose::ServerAuth);
    pki.issue(&pki_dir, "client", &["client"], rcgen::ExtendedKeyUsagePurpose::ClientAuth);
    let p = |f: &str| pki_dir.join(f).display().to_string();
    let registry = TestRegistry::start_with(&format!(
        "  tls:\n    certificate: {}\n    key: {}\n    clientcas:\n      - {}\n",
        p("server.pem"),
        p("server.key"),
        p("ca.pem")
    ));
    let hosts = tmp.path().join("certs.d");
    // The CA and client certificate beside hosts.toml, named relative to it.
    let host_dir = hosts.join(registry.addr());
    std::fs::create_dir_all(&host_dir).unwrap();
    for f in ["ca.pem", "client.pem", "client.key"] {
        std::fs::copy(pki_dir.join(f), host_dir.join(f)).unwrap();
    }
    let server = format!("server = \"https://{}\"\nca = \"ca.pem\"\n", registry.addr());
    write_hosts(&hosts, &registry.addr(), &format!("{server}client = [[\"client.pem\", \"client.key\"]]\n"));

    let src = tmp.path().join("model");
    write_model_dir(&src, SHARD);
    let reference = format!("{}/models/m:v1", registry.addr());
    let hosts_arg = hosts.to_str().unwrap();
    let (ok, out, stderr) = run_bin(&["push", src.to_str().unwrap(), &reference, "--hosts-dir", hosts_arg]);
    assert!(ok && out.starts_with("sha256:"), "push over TLS: {stderr}");
    mount_and_compare(&reference, &src, &hosts, tmp.path(), "tls");

    // The same registry without the CA, or without the client certificate, is refused.
    let other = tmp.path().join("other.d");
    write_hosts(&other, &registry.addr(), &format!("server = \"https://{}\"\n", registry.addr()));
    let (ok, _, stderr) = inspect(&reference, other.to_str().unwrap());
    assert!(!ok && stderr.to_lowercase().contains("certificate"), "unknown CA: {stderr}");
    std::fs::copy(pki_dir.join("ca.pem"), other.join(registry.addr()).join("ca.pem")).unwrap();
    write_hosts(&other, &registry.addr(), &server);
    let (ok, _, stderr) = inspect(&reference, other.to_str().unwrap());
    assert!(!ok, "no client certificate: {stderr}");
    // skip_verify takes the place of the CA (the client certificate is still needed).
    let client = "client = [[\"client.pem\", \"client.key\"]]\n";
    for f in ["client.pem", "client.key"] {
        std::fs::copy(pki_dir.join(f), other.join(registry.addr()).join(f)).unwrap();
    }
    let unverified = format!("server = \"https://{}\"\nskip_verify = true\n{client}", registry.addr());
    write_hosts(&other, &registry.addr(), &unverified);
    let (ok, out, stderr) = inspect(&reference, other.to_str().unwrap());
    assert!(ok && out.contains("model-00001-of-00002.safetensors"), "skip_verify: {stderr}");
    // Plain HTTP to it, by configuration, fails too: nothing falls back on its own.
    write_hosts(&other, &registry.addr(), &format!("server = \"http://{}\"\n", registry.addr()));
    let (ok, _, _) = inspect(&reference, other.to_str().unwrap());
    assert!(!ok, "plain HTTP to a TLS registry");
}

#[test]
fn a_broken_hosts_file_is_an_error_naming_it() {
    if !prerequisites(false) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let hosts = tmp.path().join("certs.d");
    write_hosts(&hosts, "127.0.0.1:9", "[host.\"ftp://mirror\"]\n");
    let (ok, _, stderr) = inspect("127.0.0.1:9/m:v1", hosts.to_str().unwrap());
    assert!(!ok && stderr.contains("hosts.toml") && stderr.contains("ftp://mirror"), "{stderr}");
}
