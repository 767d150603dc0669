//! Which [`FailureKind`] a failed registry request counts as, for the retry and error
//! metrics ([`crate::metrics`]).
//!
//! A request that ends for good is sorted by its [`RegistryError`]. An attempt worth
//! retrying carries only the sentence that explains it (what the registry or the
//! connection did, redacted of any secret), so it is sorted by that sentence: the ones
//! this module's parent writes ("short body", "long body", "timed out", "manifest
//! digest ... does not match") and the ones `oci-client` and `reqwest` write (their
//! `Display`, which the tests below pin against the versions in `Cargo.lock`). A sentence
//! no rule knows counts as [`FailureKind::Other`]: a miscount, never a lost failure.

use crate::metrics::FailureKind;

use super::RegistryError;

/// The kind of a request that failed for good.
pub(super) fn of_error(e: &RegistryError) -> FailureKind {
    match e {
        RegistryError::NotFound { .. } => FailureKind::NotFound,
        RegistryError::Unauthorized { .. } => FailureKind::Denied,
        RegistryError::Exhausted { last, .. } => of_message(last),
        RegistryError::Invalid { detail, .. } => match of_message(detail) {
            kind @ (FailureKind::Status4xx | FailureKind::Digest) => kind,
            _ => FailureKind::Other,
        },
        RegistryError::BadReference { .. } | RegistryError::LocalIo { .. } => FailureKind::Other,
    }
}

/// The kind of an attempt that failed with `message`.
pub(super) fn of_message(message: &str) -> FailureKind {
    let starts = |prefix: &str| message.starts_with(prefix);
    if starts("timed out") {
        FailureKind::Timeout
    } else if starts("short body") || starts("body:") || starts("request or response body error") {
        FailureKind::ShortBody
    } else if starts("long body") {
        FailureKind::LongBody
    } else if starts("error sending request") {
        // reqwest's words for a request that never got an answer: refused, reset,
        // unresolvable, a failed TLS handshake, a connect timeout.
        FailureKind::Connect
    } else if starts("Digest error") || starts("Invalid digest") || message.contains("does not match") {
        FailureKind::Digest
    } else if let Some(code) = status_code(message) {
        match code {
            500..=599 => FailureKind::Status5xx,
            400..=499 => FailureKind::Status4xx,
            _ => FailureKind::Other,
        }
    } else {
        FailureKind::Other
    }
}

/// The status code of `oci-client`'s "Server error: url U, code: N, message: M".
fn status_code(message: &str) -> Option<u16> {
    let rest = message.strip_prefix("Server error: ")?;
    let (_, after) = rest.split_once(", code: ")?;
    after.split(',').next()?.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use oci_client::errors::OciDistributionError;

    use super::*;

    #[test]
    fn what_this_module_writes() {
        assert_eq!(of_message("timed out after 60s"), FailureKind::Timeout);
        assert_eq!(of_message("short body: got 10 of 20 bytes"), FailureKind::ShortBody);
        assert_eq!(of_message("body: connection reset"), FailureKind::ShortBody);
        assert_eq!(of_message("long body: more than 20 bytes"), FailureKind::LongBody);
        assert_eq!(of_message("manifest digest sha256:aa does not match sha256:bb"), FailureKind::Digest);
        assert_eq!(of_message("something new"), FailureKind::Other);
    }

    #[test]
    fn what_oci_client_writes() {
        let server = |code| OciDistributionError::ServerError {
            code,
            url: "http://127.0.0.1:5000/v2/m/blobs/sha256:aa".into(),
            message: "no, code: 200, really".into(),
        };
        assert_eq!(of_message(&server(503).to_string()), FailureKind::Status5xx);
        assert_eq!(of_message(&server(429).to_string()), FailureKind::Status4xx);
        let digest = OciDistributionError::DigestError(oci_client::errors::DigestError::VerificationError {
            expected: "sha256:aa".into(),
            actual: "sha256:bb".into(),
        });
        assert_eq!(of_message(&digest.to_string()), FailureKind::Digest);
    }

    #[tokio::test]
    async fn what_reqwest_writes_for_a_refused_connection() {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let refused = reqwest::Client::new().get(format!("http://127.0.0.1:{port}/v2/")).send().await.unwrap_err();
        assert!(refused.is_connect(), "{refused:?}");
        let e = OciDistributionError::RequestError(refused);
        assert_eq!(of_message(&e.to_string()), FailureKind::Connect, "{e}");
    }

    #[test]
    fn requests_that_failed_for_good() {
        let reference = "127.0.0.1:5000/m:v1".to_owned();
        let not_found = RegistryError::NotFound { what: "manifest".into(), reference: reference.clone() };
        assert_eq!(of_error(&not_found), FailureKind::NotFound);
        let denied = RegistryError::Unauthorized { reference: reference.clone(), detail: "401".into() };
        assert_eq!(of_error(&denied), FailureKind::Denied);
        let exhausted = RegistryError::Exhausted {
            what: "bytes".into(),
            reference: reference.clone(),
            attempts: 4,
            last: "timed out after 1s".into(),
        };
        assert_eq!(of_error(&exhausted), FailureKind::Timeout);
        let refused = OciDistributionError::ServerError { code: 400, url: "u".into(), message: "m".into() };
        let invalid = RegistryError::Invalid { what: "blob".into(), reference, detail: refused.to_string() };
        assert_eq!(of_error(&invalid), FailureKind::Status4xx);
    }
}
