//! Registry credentials end to end: a real `docker-registry` wanting HTTP basic
//! authentication (bcrypt htpasswd), Docker `config.json` files and a credential helper,
//! and a `mount` that outlives a change of credentials.

mod common;

use std::ffi::OsStr;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

const PASSWORD_A: &str = "first-Secret-7f3a";
const PASSWORD_B: &str = "second-Secret-91c2";

/// Replaces `path` with `contents` in one step, as a reader may look at any moment.
fn replace_file(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("new");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Makes `user` with `password` the only user `htpasswd` admits (bcrypt, low cost).
fn set_htpasswd(htpasswd: &Path, user: &str, password: &str) {
    let out = Command::new("htpasswd").args(["-nbB", "-C", "4", user, password]).output().unwrap();
    assert!(out.status.success(), "htpasswd: {}", String::from_utf8_lossy(&out.stderr));
    replace_file(htpasswd, &out.stdout);
}

/// Standard base64, as Docker writes the `auth` field.
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for group in data.chunks(3) {
        let n = group.iter().enumerate().fold(0u32, |n, (i, b)| n | (u32::from(*b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= group.len() {
                out.push(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[test]
fn base64_matches_dockers_encoding() {
    assert_eq!(base64(b"alice:pw"), "YWxpY2U6cHc=");
    assert_eq!(base64(b"ab"), "YWI=");
    assert_eq!(base64(b"abc"), "YWJj");
}

#[test]
fn a_mount_keeps_reading_after_the_registry_credentials_change() {
    if !prerequisites(true) || !require_tools(&["htpasswd"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let htpasswd = tmp.path().join("htpasswd");
    set_htpasswd(&htpasswd, "alice", PASSWORD_A);
    let registry = TestRegistry::start_with_htpasswd(&htpasswd);
    let addr = registry.addr();

    // Docker's configuration, and a credential helper beside it on PATH.
    let docker = tmp.path().join("docker");
    let bin = tmp.path().join("bin");
    std::fs::create_dir_all(&docker).unwrap();
    std::fs::create_dir_all(&bin).unwrap();
    let config = docker.join("config.json");
    let file_auth = base64(format!("alice:{PASSWORD_A}").as_bytes());
    replace_file(&config, format!(r#"{{"auths":{{"{addr}":{{"auth":"{file_auth}"}}}}}}"#).as_bytes());
    // It notes each run, to count how often credentials are read again.
    let helper = bin.join("docker-credential-rotating");
    let runs = tmp.path().join("helper-runs");
    std::fs::write(
        &helper,
        format!(
            "#!/bin/sh\necho run >> {}\necho '{{\"Username\":\"bob\",\"Secret\":\"{PASSWORD_B}\"}}'\n",
            runs.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let path = std::env::join_paths(
        std::iter::once(bin.clone()).chain(std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())),
    )
    .unwrap();
    let env: [(&str, &OsStr); 3] =
        [("DOCKER_CONFIG", docker.as_os_str()), ("PATH", path.as_os_str()), ("NO_COLOR", OsStr::new("1"))];

    let src = tmp.path().join("src");
    std::fs::create_dir_all(&src).unwrap();
    let data = pseudo_random(8 << 20, 31);
    std::fs::write(src.join("model.safetensors"), &data).unwrap();
    let reference = format!("{addr}/models/auth:v1");
    let (ok, _, stderr) = run_bin_env(&["push", src.to_str().unwrap(), &reference], &env);
    assert!(ok, "push with the file's credentials failed: {stderr}");
    let (ok, _, stderr) = run_bin(&["inspect", &reference, "--cache-dir", tmp.path().join("c0").to_str().unwrap()]);
    assert!(!ok && stderr.contains("denied"), "the registry admits anonymous clients: {stderr}");

    // One chunk per request and no read-ahead, so that every later read is a new request.
    let mut m = MountProcess::start_with_env(
        &reference,
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
        &["--chunk-size", "1048576", "--readahead-chunks", "0", "--log-level", "debug"],
        &env,
    )
    .unwrap_or_else(|e| panic!("mount failed: {e}"));
    let file = std::fs::File::open(m.mountpoint.join("model.safetensors")).unwrap();
    let mut head = vec![0u8; 1 << 20];
    file.read_exact_at(&mut head, 0).unwrap();
    assert!(head == data[..1 << 20], "the first chunk differs");

    // The registry now admits only bob: alice's password is refused, and the error
    // does not repeat it. The registry reads htpasswd again when its modification time
    // changes (distribution 2.8), so it keeps running on its port.
    set_htpasswd(&htpasswd, "bob", PASSWORD_B);
    let (ok, _, stderr) =
        run_bin_env(&["inspect", &reference, "--cache-dir", tmp.path().join("c1").to_str().unwrap()], &env);
    assert!(!ok && stderr.contains("denied"), "the old password still works: {stderr}");
    assert!(!stderr.contains(PASSWORD_A), "an error shows the password: {stderr}");

    // The configuration now sends the registry to a helper holding bob's password; the
    // same mount reads on. Its other chunks are read at once, so that several requests
    // are refused together: they read the credentials again once.
    replace_file(&config, format!(r#"{{"credHelpers":{{"{addr}":"rotating"}}}}"#).as_bytes());
    std::thread::scope(|s| {
        for chunk in 1..data.len() >> 20 {
            let (file, data) = (&file, &data);
            s.spawn(move || {
                let mut buf = vec![0u8; 1 << 20];
                file.read_exact_at(&mut buf, (chunk << 20) as u64).unwrap();
                assert!(buf == data[chunk << 20..(chunk + 1) << 20], "chunk {chunk} differs");
            });
        }
    });
    drop(file);
    let helper_runs = std::fs::read_to_string(&runs).unwrap_or_default().lines().count();
    assert_eq!(helper_runs, 1, "requests refused together read the credentials again more than once");

    let log = m.stop_with_stderr();
    assert!(
        log.contains(&format!("source=file {}", config.display())),
        "the log does not say the file supplied credentials: {log}"
    );
    assert!(
        log.contains("source=credential helper docker-credential-rotating"),
        "the log does not say the helper supplied credentials: {log}"
    );
    let helper_auth = base64(format!("bob:{PASSWORD_B}").as_bytes());
    for secret in [PASSWORD_A, PASSWORD_B, &file_auth, &helper_auth] {
        assert!(!log.contains(secret), "the debug log shows a secret");
    }
}
