//! The daemon's own HTTP (HTTP/1.1 on hyper), apart from the registry client: `GET
//! /metrics` in Prometheus text format on a TCP address for Prometheus, `GET /status`
//! as JSON on a Unix socket only root reaches, and the client `modelpack-snapshotter
//! status` asks it with.
//!
//! Answers are computed on a blocking thread (they take the cache's lock and look chunks
//! up), one request at a time per connection. Stopping the daemon stops accepting and
//! drops the connections still open.

use std::convert::Infallible;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::{Stream, StreamExt};
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::task::JoinSet;

/// How long accepting pauses after it failed (out of file descriptors, say), rather
/// than spinning on the same error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Connections served at once; more are closed as they come. A scraper or two and a few
/// `status` calls are what is expected; a peer on the metrics address that opens
/// connections without end must not take the daemon's file descriptors.
const MAX_CONNECTIONS: usize = 64;

/// Time a connection has to send a request's head, so that one that sends nothing
/// does not hold its place.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// Why asking the daemon failed.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// Nothing answers at the socket.
    #[error("connecting to {path}: {source} (is `modelpack-snapshotter serve` running, and are you root?)")]
    Connect { path: String, source: std::io::Error },
    /// The exchange failed.
    #[error("asking {path}: {source}")]
    Protocol { path: String, source: hyper::Error },
    /// The daemon answered with an error.
    #[error("{path} answered {status}: {body}")]
    Status { path: String, status: StatusCode, body: String },
}

/// An answer: status, content type and body.
#[derive(Debug, Clone)]
pub struct Reply {
    status: StatusCode,
    content_type: &'static str,
    body: Bytes,
}

impl Reply {
    /// 200 with `body` of `content_type`.
    pub fn ok(content_type: &'static str, body: impl Into<Bytes>) -> Self {
        Self { status: StatusCode::OK, content_type, body: body.into() }
    }

    /// `status` with a sentence saying why.
    pub fn error(status: StatusCode, why: impl Into<String>) -> Self {
        Self { status, content_type: "text/plain; charset=utf-8", body: Bytes::from(why.into() + "\n") }
    }
}

/// Answers a request (`GET`, `HEAD` or `POST`) of a path.
pub type Handler = Arc<dyn Fn(&Method, &str) -> Reply + Send + Sync>;

/// Serves `handler` on every connection `incoming` yields until `stopping` turns true.
pub async fn serve<S, C>(incoming: S, handler: Handler, mut stopping: watch::Receiver<bool>)
where
    S: Stream<Item = std::io::Result<C>>,
    C: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut connections = JoinSet::new();
    let mut incoming = std::pin::pin!(incoming);
    let mut stopped = std::pin::pin!(async move {
        let _ = stopping.wait_for(|s| *s).await;
    });
    loop {
        tokio::select! {
            next = incoming.next() => match next {
                Some(Ok(_)) if connections.len() >= MAX_CONNECTIONS => {
                    tracing::debug!(max = MAX_CONNECTIONS, "too many HTTP connections; closing a new one");
                }
                Some(Ok(connection)) => {
                    let handler = handler.clone();
                    connections.spawn(async move {
                        let service = service_fn(move |request| answer(handler.clone(), request));
                        let served = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(HEAD_TIMEOUT)
                            .serve_connection(TokioIo::new(connection), service)
                            .await;
                        if let Err(e) = served {
                            tracing::debug!(error = %e, "HTTP connection ended with an error");
                        }
                    });
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "cannot accept an HTTP connection");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
                None => break,
            },
            Some(_) = connections.join_next() => {}
            () = &mut stopped => break,
        }
    }
    connections.abort_all();
}

/// Answers one request: `GET`, `HEAD` or `POST` (without a body) only.
async fn answer(handler: Handler, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let method = request.method().clone();
    let reply = if [Method::GET, Method::HEAD, Method::POST].contains(&method) {
        let path = request.uri().path().to_owned();
        let asked = if method == Method::HEAD { Method::GET } else { method.clone() };
        tokio::task::spawn_blocking(move || handler(&asked, &path))
            .await
            .unwrap_or_else(|e| Reply::error(StatusCode::INTERNAL_SERVER_ERROR, format!("answering failed: {e}")))
    } else {
        Reply::error(StatusCode::METHOD_NOT_ALLOWED, format!("{method} is not served here; use GET"))
    };
    let body = if request.method() == Method::HEAD { Bytes::new() } else { reply.body };
    let response = Response::builder()
        .status(reply.status)
        .header(header::CONTENT_TYPE, reply.content_type)
        .body(Full::new(body))
        .expect("a status and a static header make a valid response");
    Ok(response)
}

/// `GET path` from the daemon listening on the Unix socket `socket`: the body of a 200.
pub async fn get(socket: &Path, path: &str) -> Result<Bytes, HttpError> {
    request(socket, Method::GET, path).await
}

/// `POST path` (without a body) to the daemon listening on the Unix socket `socket`: the
/// body of a 200.
pub async fn post(socket: &Path, path: &str) -> Result<Bytes, HttpError> {
    request(socket, Method::POST, path).await
}

async fn request(socket: &Path, method: Method, path: &str) -> Result<Bytes, HttpError> {
    let at = socket.display().to_string();
    let stream = tokio::net::UnixStream::connect(socket)
        .await
        .map_err(|source| HttpError::Connect { path: at.clone(), source })?;
    let protocol = |source| HttpError::Protocol { path: at.clone(), source };
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(protocol)?;
    let driving = tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(path)
        .header(header::HOST, "localhost")
        .body(Empty::<Bytes>::new())
        .expect("a path and a static header make a valid request");
    let response = sender.send_request(request).await.map_err(protocol)?;
    let status = response.status();
    let body = response.into_body().collect().await.map_err(protocol)?.to_bytes();
    driving.abort();
    if status != StatusCode::OK {
        return Err(HttpError::Status { path: at, status, body: String::from_utf8_lossy(&body).trim().to_owned() });
    }
    Ok(body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_get_over_a_unix_socket_until_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let handler: Handler = Arc::new(|_: &Method, path: &str| match path {
            "/hello" => Reply::ok("text/plain", "hi"),
            other => Reply::error(StatusCode::NOT_FOUND, format!("nothing at {other}")),
        });
        let (stop, stopping) = watch::channel(false);
        let server = tokio::spawn(serve(tokio_stream::wrappers::UnixListenerStream::new(listener), handler, stopping));
        assert_eq!(get(&socket, "/hello").await.unwrap(), Bytes::from("hi"));
        let e = get(&socket, "/nope").await.unwrap_err();
        assert!(matches!(e, HttpError::Status { status: StatusCode::NOT_FOUND, .. }), "{e}");
        assert!(e.to_string().contains("nothing at /nope"), "{e}");
        stop.send(true).unwrap();
        server.await.unwrap();
        let e = get(&dir.path().join("absent.sock"), "/hello").await.unwrap_err();
        assert!(matches!(e, HttpError::Connect { .. }), "{e}");
    }

    #[tokio::test]
    async fn connections_beyond_the_limit_are_closed_and_the_ones_kept_still_answer() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("s.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let handler: Handler = Arc::new(|_: &Method, _: &str| Reply::ok("text/plain", "hi"));
        let (stop, stopping) = watch::channel(false);
        let server = tokio::spawn(serve(tokio_stream::wrappers::UnixListenerStream::new(listener), handler, stopping));
        // Silent peers take every place (accepted in the order they connected).
        let mut silent = Vec::new();
        for _ in 0..MAX_CONNECTIONS {
            silent.push(tokio::net::UnixStream::connect(&socket).await.unwrap());
        }
        let mut extra = tokio::net::UnixStream::connect(&socket).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf)).await.unwrap().unwrap_or(0);
        assert_eq!(n, 0, "the connection beyond the limit is closed");
        // A peer that holds a place can still ask.
        silent[0].write_all(b"GET /x HTTP/1.1\r\nHost: l\r\n\r\n").await.unwrap();
        let n = silent[0].read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 200"), "{:?}", String::from_utf8_lossy(&buf[..n]));
        stop.send(true).unwrap();
        server.await.unwrap();
    }
}
