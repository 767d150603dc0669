//! What the commands write on standard error when it is not a terminal (a pipe here, as
//! for journald or a log file): `push`, `convert` and `mount --prefetch` report progress
//! in plain lines with exact byte counts, with no escape code or carriage return, and
//! keep their closing lines; with `--log-format json` (or `log_format = "json"` for
//! `serve`) every line is one JSON object, progress included. On a terminal (a pseudo-
//! terminal from `script`) `push` draws bars instead. Against a real registry, and real
//! FUSE for `mount`.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;
use serde_json::Value;

const SHARD: usize = 8 << 20;
const SHARD_FILE: &str = "model-00001-of-00002.safetensors";

/// A progress line, `LABEL: DONE of TOTAL bytes (P%)...`, as (label, done, total).
fn progress_line(line: &str) -> Option<(&str, u64, u64)> {
    let (label, rest) = line.split_once(": ")?;
    let (done, rest) = rest.split_once(" of ")?;
    let (total, _) = rest.split_once(" bytes (")?;
    Some((label, done.parse().ok()?, total.parse().ok()?))
}

/// The progress lines of `stderr` whose label ends with `label`, as (done, total).
fn progress_of(stderr: &str, label: &str) -> Vec<(u64, u64)> {
    stderr
        .lines()
        .filter_map(progress_line)
        .filter(|(l, _, _)| l.ends_with(label))
        .map(|(_, done, total)| (done, total))
        .collect()
}

/// Asserts `stderr` is plain text: no escape code, no carriage return.
fn assert_plain(stderr: &str) {
    assert!(!stderr.contains('\x1b'), "escape codes on a pipe:\n{stderr}");
    assert!(!stderr.contains('\r'), "carriage returns on a pipe:\n{stderr}");
}

/// Asserts `stderr` reports the progress of `label` as a transfer of `total` bytes: at
/// least one line, each short of the total, in order.
fn assert_progress(stderr: &str, label: &str, total: u64) {
    let lines = progress_of(stderr, label);
    assert!(!lines.is_empty(), "no progress of {label:?}:\n{stderr}");
    assert!(lines.iter().all(|(done, t)| *t == total && *done < total), "{label:?}: {lines:?} of {total}");
    assert!(lines.windows(2).all(|w| w[0].0 < w[1].0), "{label:?} goes back: {lines:?}");
}

/// The size of every file of the model, by path.
fn sizes(src: &Path) -> BTreeMap<String, u64> {
    read_tree(src).into_iter().map(|(path, data)| (path, data.len() as u64)).collect()
}

/// Every line of `stderr` as a JSON object with a level, a target, a timestamp and
/// fields, with a message in ours (a library's event may carry fields alone: oci-client
/// logs a `url`); fails naming the first line that is not.
fn json_lines(stderr: &str) -> Vec<Value> {
    assert!(!stderr.contains('\x1b'), "escape codes in JSON logs:\n{stderr}");
    let lines: Vec<Value> = stderr
        .lines()
        .map(|line| {
            let value: Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
            let level = value["level"].as_str().unwrap_or_else(|| panic!("no level: {line}"));
            assert!(["TRACE", "DEBUG", "INFO", "WARN", "ERROR"].contains(&level), "{line}");
            assert!(value["fields"].is_object() && value["timestamp"].is_string(), "{line}");
            let target = value["target"].as_str().unwrap_or_else(|| panic!("no target: {line}"));
            if target.starts_with("modelpack_snapshotter") {
                assert!(value["fields"]["message"].is_string(), "no message: {line}");
            }
            value
        })
        .collect();
    assert!(!lines.is_empty(), "nothing logged");
    lines
}

/// The messages of `lines`.
fn messages(lines: &[Value]) -> Vec<&str> {
    lines.iter().filter_map(|l| l["fields"]["message"].as_str()).collect()
}

#[test]
fn push_and_convert_write_plain_progress_lines_off_a_terminal() {
    if !prerequisites(false) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, SHARD);
    let files = sizes(&src);
    let reference = format!("{}/models/progress:v1", registry.addr());

    let (ok, stdout, stderr) = run_bin(&["push", src.to_str().unwrap(), &reference]);
    assert!(ok, "{stderr}");
    assert!(stdout.trim().starts_with("sha256:"), "{stdout}");
    assert_plain(&stderr);
    assert_progress(&stderr, &format!("{SHARD_FILE} (hashing)"), SHARD as u64);
    assert_progress(&stderr, &format!("{SHARD_FILE} (uploading)"), SHARD as u64);
    for (path, size) in &files {
        let closing = format!("] {path}: pushed {size} bytes");
        assert!(stderr.lines().any(|l| l.starts_with('[') && l.ends_with(&closing)), "no {closing:?}:\n{stderr}");
    }

    // Pushed again: nothing to upload, and each file says so as before.
    let (ok, _, stderr) = run_bin(&["push", src.to_str().unwrap(), &reference]);
    assert!(ok, "{stderr}");
    assert_plain(&stderr);
    assert!(progress_of(&stderr, "(uploading)").is_empty(), "{stderr}");
    for path in files.keys() {
        let closing = format!("] {path}: already in the registry");
        assert!(stderr.lines().any(|l| l.ends_with(&closing)), "no {closing:?}:\n{stderr}");
    }

    let (ok, stdout, stderr) = run_bin(&["convert", &reference]);
    assert!(ok, "{stderr}");
    assert!(stdout.trim().starts_with(&format!("{reference}-lazy@sha256:")), "{stdout}");
    assert_plain(&stderr);
    assert_progress(&stderr, SHARD_FILE, SHARD as u64);
    let chunks = SHARD.div_ceil(1 << 20);
    let closing = format!("] {SHARD_FILE}: {SHARD} bytes, {chunks} chunk digests");
    assert!(stderr.lines().any(|l| l.ends_with(&closing)), "no {closing:?}:\n{stderr}");
    assert!(stderr.contains("listed the companion under the referrers tag sha256-"), "{stderr}");
}

#[test]
fn mount_prefetch_writes_plain_progress_lines_off_a_terminal() {
    if !prerequisites(true) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, SHARD);
    let total: u64 = sizes(&src).values().sum();
    let reference = format!("{}/models/prefetch:v1", registry.addr());
    push_dir(&src, &reference, "raw");

    // One chunk per request: the prefetch finishes piece by piece, a line per tenth.
    let mut m = MountProcess::start(
        &reference,
        &tmp.path().join("mnt"),
        &tmp.path().join("cache"),
        &["--prefetch", "--stream-request-chunks", "1"],
    )
    .unwrap();
    assert!(m.ready_line.starts_with(&format!("ready: {reference} mounted at ")), "{}", m.ready_line);
    let line = m.wait_line("prefetched:", Duration::from_secs(60));
    assert!(line.starts_with(&format!("prefetched: {reference} (all) in ")) && line.ends_with(" s"), "{line}");
    let stderr = m.stop_with_stderr();
    assert_plain(&stderr);
    assert_progress(&stderr, "prefetch (all)", total);
}

#[test]
fn json_logs_are_one_object_per_line_progress_included() {
    if !prerequisites(false) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, SHARD);
    let reference = format!("{}/models/json:v1", registry.addr());
    let json = ["--log-format", "json", "--log-level", "debug"];

    let (ok, stdout, stderr) = run_bin(&[&["push", src.to_str().unwrap(), &reference][..], &json].concat());
    assert!(ok, "{stderr}");
    assert!(stdout.trim().starts_with("sha256:"), "the digest stays on stdout: {stdout}");
    let lines = json_lines(&stderr);
    assert!(lines.iter().any(|l| l["level"] == "DEBUG"), "--log-level debug logs debug lines:\n{stderr}");
    let closing = format!("] {SHARD_FILE}: pushed {SHARD} bytes");
    assert!(messages(&lines).iter().any(|m| m.ends_with(&closing)), "no {closing:?}:\n{stderr}");
    let label = format!("{SHARD_FILE} (uploading)");
    let uploads: Vec<&Value> =
        lines.iter().filter(|l| l["fields"]["label"].as_str().is_some_and(|s| s.ends_with(&label))).collect();
    assert!(!uploads.is_empty(), "no upload progress:\n{stderr}");
    for event in uploads {
        let (done, total) = (&event["fields"]["done_bytes"], &event["fields"]["total_bytes"]);
        assert!(done.as_u64().is_some_and(|d| d < SHARD as u64) && *total == SHARD as u64, "{event}");
    }

    let (ok, stdout, stderr) = run_bin(&[&["convert", reference.as_str()][..], &json].concat());
    assert!(ok, "{stderr}");
    assert!(stdout.trim().starts_with(&format!("{reference}-lazy@sha256:")), "{stdout}");
    let lines = json_lines(&stderr);
    assert!(lines.iter().any(|l| l["fields"]["total_bytes"] == SHARD as u64), "no blob progress:\n{stderr}");

    // A command that fails says why in an object too, as its last line.
    let nowhere = format!("127.0.0.1:{}/models/json:v1", free_port());
    let cache = tmp.path().join("cache");
    let args = ["inspect", &nowhere, "--retries", "0", "--cache-dir", cache.to_str().unwrap()];
    let (ok, _, stderr) = run_bin(&[&args[..], &json].concat());
    assert!(!ok, "{stderr}");
    let last = json_lines(&stderr).pop().unwrap();
    assert!(last["level"] == "ERROR" && last["fields"]["message"].as_str().unwrap().contains(&nowhere), "{last}");
}

#[test]
fn serve_logs_json_as_its_configuration_says() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let config = write_config(&tmp.path().join("etc"), "log_format = \"json\"\nlog_level = \"debug\"\n");
    let mut serve =
        SnapshotterProcess::start_csi(&tmp.path().join("root"), &tmp.path().join("plugin/csi.sock"), &config);
    serve.stop();
    let lines = json_lines(&serve.log());
    assert!(lines.iter().any(|l| l["level"] == "DEBUG"), "{}", serve.log());
}

#[test]
fn push_draws_bars_on_a_terminal() {
    if !prerequisites(false) || !require_tools(&["script"]) {
        return;
    }
    let registry = TestRegistry::start();
    let tmp = tempfile::tempdir().unwrap();
    let src = tmp.path().join("src");
    write_model_dir(&src, SHARD);
    let reference = format!("{}/models/terminal:v1", registry.addr());
    // `script` runs the command on a pseudo-terminal and copies what it wrote (standard
    // output and error, both on the terminal) to ours.
    let out = Command::new("script")
        .args(["--quiet", "--return", "--command"])
        .arg(format!("{BIN} push {} {reference}", src.display()))
        .arg("/dev/null")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{terminal}{}", String::from_utf8_lossy(&out.stderr));
    // Bars are drawn at most 20 times a second after a burst: the shard's first (its
    // hashing) is drawn at least once.
    let bar = format!("{SHARD_FILE} (hashing) [");
    assert!(terminal.contains(&bar) && terminal.contains("ETA"), "no bar {bar:?}: {terminal}");
    assert!(progress_of(&terminal, SHARD_FILE).is_empty(), "plain progress lines on a terminal: {terminal}");
    let closing = format!("] {SHARD_FILE}: pushed {SHARD} bytes");
    assert!(terminal.contains(&closing), "no {closing:?}: {terminal}");
    assert!(terminal.contains("sha256:"), "{terminal}");
}
