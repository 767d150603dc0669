//! What `serve` tells an operator, checked against a known read: a real registry, a model
//! published through the CSI socket (no containerd needed) and one file read whole
//! through the real FUSE mount; then `GET /metrics` on `--metrics-address` must name
//! every metric with the values that read implies, and `modelpack-snapshotter status`
//! must list the model with its cached share, as text and as JSON.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::csi::{node_client, publish, unpublish};
use common::*;

/// How long the cache writes that follow a read may take to land before the test gives
/// up: far beyond what they need, only so that a broken build fails instead of hanging.
const SETTLE: Duration = Duration::from_secs(60);

/// The value of the sample `series` (name and labels exactly as exposed) in `text`.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.trim().parse().ok())
}

/// [`sample`], which must be there.
fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("{series} missing from:\n{text}"))
}

async fn scrape(port: u16) -> String {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await.unwrap();
    assert!(response.status().is_success(), "{response:?}");
    let content_type = response.headers()["content-type"].to_str().unwrap().to_owned();
    assert!(content_type.starts_with("text/plain; version=0.0.4"), "{content_type}");
    response.text().await.unwrap()
}

fn status(socket: &Path, json: bool) -> String {
    let mut args = vec!["status", "--address", socket.to_str().unwrap()];
    if json {
        args.push("--json");
    }
    let (ok, stdout, stderr) = run_bin(&args);
    assert!(ok, "status failed: {stderr}");
    stdout
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_status_after_a_known_read() {
    if !prerequisites(true) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let registry = TestRegistry::start();
    let reference = format!("{}/models/observed:v1", registry.addr());
    let src = tmp.path().join("src");
    push_converted(&src, 9 << 20, &reference, &[]);
    let port = free_port();
    let config = write_config(&tmp.path().join("etc"), &format!("metrics_address = \"127.0.0.1:{port}\"\n"));
    let root = tmp.path().join("root");
    let csi_socket = tmp.path().join("plugin/csi.sock");
    let serve = SnapshotterProcess::start_csi(&root, &csi_socket, &config);
    let status_socket = root.join("status.sock");

    // Nothing read yet: no model, no bytes, the families already exposed.
    let before = scrape(port).await;
    assert_eq!(value(&before, r#"modelpack_models_mounted{frontend="csi"}"#), 0.0);
    assert_eq!(value(&before, "modelpack_verification_failures_total"), 0.0);
    assert_eq!(value(&before, "modelpack_cache_budget_bytes"), 0.0, "unlimited");

    let mut node = node_client(&csi_socket).await;
    let target = root.join("pods/pod-a/volumes/model/mount");
    node.node_publish_volume(publish("vol-a", &target, &[("modelRef", &reference)])).await.unwrap();
    let file = "model-00001-of-00002.safetensors";
    let read = std::fs::read(target.join(file)).unwrap();
    assert!(read == std::fs::read(src.join(file)).unwrap(), "{file} differs");
    let size = read.len() as f64;

    let text = scrape(port).await;
    let host = format!(r#"registry="{}""#, registry.addr());
    let fetched = value(&text, &format!("modelpack_registry_fetched_bytes_total{{{host}}}"));
    assert!(fetched >= size, "fetched {fetched} bytes for a file of {size}");
    assert!(value(&text, &format!("modelpack_registry_requests_total{{{host}}}")) > 0.0);
    assert!(value(&text, &format!("modelpack_registry_request_duration_seconds_count{{{host}}}")) > 0.0);
    assert!(value(&text, &format!(r#"modelpack_registry_request_duration_seconds_bucket{{{host},le="+Inf"}}"#)) > 0.0);
    assert_eq!(value(&text, r#"modelpack_models_mounted{frontend="csi"}"#), 1.0);
    assert_eq!(value(&text, r#"modelpack_models_mounted{frontend="containerd"}"#), 0.0);
    assert!(value(&text, "modelpack_chunks_fetched_total") >= (size / f64::from(1 << 20)).floor());
    assert_eq!(value(&text, "modelpack_verification_failures_total"), 0.0);
    assert!(value(&text, "modelpack_fuse_read_duration_seconds_count") > 0.0);
    let touched: f64 = ["cache", "memory", "fetch"]
        .iter()
        .map(|source| value(&text, &format!(r#"modelpack_chunk_reads_total{{source="{source}"}}"#)))
        .sum();
    assert!(touched >= (size / f64::from(1 << 20)).floor(), "{touched} chunk reads for {size} bytes");
    for family in
        ["modelpack_prefetch_bytes_total", "modelpack_passthrough_opens_total", "modelpack_cache_evictions_total"]
    {
        assert!(sample(&text, family).is_some(), "{family} missing from:\n{text}");
    }
    assert_eq!(value(&text, "modelpack_prefetch_bytes_total"), 0.0, "no prefetch policy: nothing prefetched");
    assert!(text.contains("# TYPE modelpack_registry_request_duration_seconds histogram"), "{text}");

    // Chunks reach the cache just after readers get them: wait for the read to land.
    let deadline = Instant::now() + SETTLE;
    let json = loop {
        let json: serde_json::Value =
            serde_json::from_str(&status(&status_socket, true)).expect("status --json parses");
        if json["models"][0]["cached_bytes"].as_f64().unwrap_or(0.0) >= size || Instant::now() > deadline {
            break json;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let model = &json["models"][0];
    assert_eq!(json["models"].as_array().unwrap().len(), 1, "{json}");
    assert_eq!(model["reference"], reference.as_str());
    assert_eq!(model["frontend"], "csi");
    let (bytes, cached) = (model["bytes"].as_f64().unwrap(), model["cached_bytes"].as_f64().unwrap());
    assert!(cached >= size && cached < bytes, "{cached} of {bytes} bytes cached after reading {size}: {json}");
    assert!(json["fetch"]["bytes"].as_f64().unwrap() >= size, "{json}");
    assert!(json["cache"]["used_bytes"].as_f64().unwrap() >= cached, "{json}");
    assert!(value(&scrape(port).await, "modelpack_cache_used_bytes") >= cached);

    let text = status(&status_socket, false);
    let share = (cached * 100.0 / bytes).floor();
    let line = text.lines().find(|l| l.contains(&reference)).unwrap_or_else(|| panic!("no model line in:\n{text}"));
    assert!(line.contains("CSI volume") && line.contains(&format!("{share}% of ")), "{line}\n{text}");
    assert!(text.contains("fetch rate: ") && text.contains("/s over the last "), "{text}");
    assert!(text.contains(" used of no budget (unlimited)"), "{text}");

    // The last volume gone, the model is no longer counted.
    node.node_unpublish_volume(unpublish("vol-a", &target)).await.unwrap();
    assert_eq!(value(&scrape(port).await, r#"modelpack_models_mounted{frontend="csi"}"#), 0.0);
    let json: serde_json::Value = serde_json::from_str(&status(&status_socket, true)).unwrap();
    assert_eq!(json["models"].as_array().unwrap().len(), 0, "{json}");
    drop(serve);
    assert!(!status_socket.exists(), "a stopped daemon removes its status socket");
}

#[test]
fn a_metrics_address_in_use_fails_the_start_with_nothing_served() {
    let tmp = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = taken.local_addr().unwrap().to_string();
    let config = write_config(&tmp.path().join("etc"), "");
    let root = tmp.path().join("root");
    let csi_socket = tmp.path().join("plugin/csi.sock");
    let mut serve = std::process::Command::new(BIN)
        .args(["serve", "--no-containerd", "--metrics-address", &address, "--root"])
        .arg(&root)
        .arg("--csi-address")
        .arg(&csi_socket)
        .arg("--config")
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + SETTLE;
    let exited = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            terminate(&mut serve);
            panic!("serve kept running with its metrics address in use");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut serve.stderr.take().unwrap(), &mut stderr).unwrap();
    assert!(!exited.success());
    assert!(stderr.contains(&format!("metrics address {address}")), "{stderr}");
    assert!(!csi_socket.exists(), "nothing is served: the CSI socket was never bound");
}

#[test]
fn status_without_a_daemon_says_so() {
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("status.sock");
    let (ok, _, stderr) = run_bin(&["status", "--address", socket.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains(&socket.display().to_string()) && stderr.contains("is `modelpack-snapshotter serve` running"),
        "{stderr}"
    );
}
