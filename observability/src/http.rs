//! A minimal HTTP/1.1 responder and client, enough for `GET /metrics` (one request per
//! connection, `Connection: close`). Every read and write has a deadline.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest request head we accept.
const MAX_HEAD: usize = 8 * 1024;
/// Largest response body the client accepts.
pub const MAX_BODY: usize = 16 * 1024 * 1024;
/// Connections served at once; more wait in the accept queue.
const MAX_CONNECTIONS: usize = 16;
/// Deadline for reading a request head and for writing a response.
pub const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// Content type of the text exposition format.
pub const TEXT_FORMAT: &str = "text/plain; version=0.0.4; charset=utf-8";

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0} timed out")]
    Timeout(String),
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("bad response: {0}")]
    BadResponse(String),
    #[error("HTTP status {0}")]
    Status(u16),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HttpError {
    let what = what.into();
    move |source| HttpError::Io { what, source }
}

/// What a handler answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
}

impl Response {
    pub fn ok_metrics(body: String) -> Response {
        Response {
            status: 200,
            content_type: TEXT_FORMAT,
            body,
        }
    }

    pub fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.into(),
        }
    }
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// Handles one request: gets the path, returns the response.
pub type Handler = Arc<dyn Fn(String) -> Pin<Box<dyn Future<Output = Response> + Send>> + Send + Sync>;

/// Parses a request head; returns (method, path without query).
pub fn parse_request_head(head: &str) -> Result<(String, String), HttpError> {
    let line = head.lines().next().unwrap_or("");
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) = (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(HttpError::BadRequest(format!("request line {line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::BadRequest(format!("version {version:?}")));
    }
    let path = target.split('?').next().unwrap_or(target);
    Ok((method.to_string(), path.to_string()))
}

async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> Result<String, HttpError> {
    let mut buf = Vec::with_capacity(512);
    let mut chunk = [0u8; 512];
    loop {
        let n = s.read(&mut chunk).await.map_err(io("reading the request"))?;
        if n == 0 {
            return Err(HttpError::BadRequest("connection closed before the end of the head".into()));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            buf.truncate(end);
            return Ok(String::from_utf8_lossy(&buf).into_owned());
        }
        if buf.len() > MAX_HEAD {
            return Err(HttpError::BadRequest("request head too large".into()));
        }
    }
}

/// Serialises a response with `Connection: close`.
pub fn encode_response(r: &Response) -> Vec<u8> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        r.status,
        reason(r.status),
        r.content_type,
        r.body.len()
    )
    .into_bytes();
    out.extend_from_slice(r.body.as_bytes());
    out
}

/// Serves one request on `s`. The handler is not under our deadline: it bounds itself.
pub async fn serve_connection<S>(mut s: S, handler: Handler) -> Result<(), HttpError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let head = tokio::time::timeout(IO_TIMEOUT, read_head(&mut s))
        .await
        .map_err(|_| HttpError::Timeout("reading the request".into()))?;
    let response = match head.and_then(|h| parse_request_head(&h)) {
        Ok((method, path)) if method == "GET" => handler(path).await,
        Ok(_) => Response::text(405, "only GET\n"),
        Err(e) => Response::text(400, format!("{e}\n")),
    };
    write_all(&mut s, &encode_response(&response)).await
}

async fn write_all<S: AsyncWrite + Unpin>(s: &mut S, bytes: &[u8]) -> Result<(), HttpError> {
    let w = async {
        s.write_all(bytes).await?;
        s.shutdown().await
    };
    tokio::time::timeout(IO_TIMEOUT, w)
        .await
        .map_err(|_| HttpError::Timeout("writing the response".into()))?
        .map_err(io("writing the response"))
}

/// A running unix-socket server; dropping it stops accepting and removes the socket file.
pub struct UnixServer {
    task: tokio::task::JoinHandle<()>,
    path: PathBuf,
}

impl UnixServer {
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for UnixServer {
    fn drop(&mut self) {
        self.task.abort();
        // The file may already be gone with its state directory.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Binds `path` (mode 0600; a stale socket there is replaced) and serves requests on a tokio
/// task of the current runtime, at most [`MAX_CONNECTIONS`] at once.
pub fn serve_unix(path: &Path, handler: Handler) -> Result<UnixServer, HttpError> {
    use std::os::unix::fs::{FileTypeExt as _, PermissionsExt as _};
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if m.file_type().is_socket() {
            std::fs::remove_file(path).map_err(io(format!("removing stale {}", path.display())))?;
        }
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(io(format!("binding {}", path.display())))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(io(format!("chmod {}", path.display())))?;
    let limit = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let task = tokio::spawn(async move {
        loop {
            let Ok(permit) = limit.clone().acquire_owned().await else { return };
            match listener.accept().await {
                Ok((stream, _)) => {
                    let h = handler.clone();
                    tokio::spawn(async move {
                        if let Err(e) = serve_connection(stream, h).await {
                            tracing::debug!(error = %e, "metrics request failed");
                        }
                        drop(permit);
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accepting a metrics connection failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(UnixServer {
        task,
        path: path.to_path_buf(),
    })
}

/// Parses a full `Connection: close` response; returns (status, body).
pub fn parse_response(raw: &[u8]) -> Result<(u16, String), HttpError> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| HttpError::BadResponse("no end of head".into()))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let status_line = head.lines().next().unwrap_or("");
    let mut parts = status_line.split(' ');
    let (Some(version), Some(code)) = (parts.next(), parts.next()) else {
        return Err(HttpError::BadResponse(format!("status line {status_line:?}")));
    };
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::BadResponse(format!("status line {status_line:?}")));
    }
    let status = code
        .parse::<u16>()
        .map_err(|_| HttpError::BadResponse(format!("status line {status_line:?}")))?;
    let mut body = &raw[end + 4..];
    for l in head.lines().skip(1) {
        if let Some((k, v)) = l.split_once(':') {
            if k.trim().eq_ignore_ascii_case("content-length") {
                let n: usize = v
                    .trim()
                    .parse()
                    .map_err(|_| HttpError::BadResponse(format!("content-length {v:?}")))?;
                if n > body.len() {
                    return Err(HttpError::BadResponse("truncated body".into()));
                }
                body = &body[..n];
            }
            if k.trim().eq_ignore_ascii_case("transfer-encoding") {
                return Err(HttpError::BadResponse("transfer encodings are not supported".into()));
            }
        }
    }
    let body = String::from_utf8(body.to_vec()).map_err(|_| HttpError::BadResponse("body is not UTF-8".into()))?;
    Ok((status, body))
}

/// `GET path` over the unix socket `sock`, the whole exchange within `timeout`; the body of a
/// 200 answer.
pub async fn get_unix(sock: &Path, path: &str, timeout: Duration) -> Result<String, HttpError> {
    let exchange = async {
        let mut s = tokio::net::UnixStream::connect(sock)
            .await
            .map_err(io(format!("connecting to {}", sock.display())))?;
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes())
            .await
            .map_err(io("sending the request"))?;
        let mut raw = Vec::new();
        (&mut s)
            .take(MAX_BODY as u64 + MAX_HEAD as u64)
            .read_to_end(&mut raw)
            .await
            .map_err(io("reading the response"))?;
        let (status, body) = parse_response(&raw)?;
        if status != 200 {
            return Err(HttpError::Status(status));
        }
        Ok(body)
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| HttpError::Timeout(format!("GET {path} on {}", sock.display())))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert_eq!(
            parse_request_head("GET /metrics?x=1 HTTP/1.1\r\nHost: a").unwrap(),
            ("GET".to_string(), "/metrics".to_string())
        );
        assert!(parse_request_head("GET /metrics").is_err());
        assert!(parse_request_head("GET / SPDY/3").is_err());
    }

    #[test]
    fn responses_round_trip() {
        let raw = encode_response(&Response::ok_metrics("m 1\n".into()));
        assert_eq!(parse_response(&raw).unwrap(), (200, "m 1\n".to_string()));
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").is_err());
        assert!(parse_response(b"nonsense").is_err());
    }

    #[tokio::test(flavor = "current_thread")]
    async fn serves_and_gets_over_a_unix_socket() {
        let dir = std::env::temp_dir().join(format!("joey-http-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let sock = dir.join("metrics.sock");
        let handler: Handler = Arc::new(|path: String| {
            Box::pin(async move {
                if path == "/metrics" {
                    Response::ok_metrics("m 1\n".into())
                } else {
                    Response::text(404, "no\n")
                }
            })
        });
        let server = serve_unix(&sock, handler).unwrap();
        let t = Duration::from_secs(5);
        assert_eq!(get_unix(&sock, "/metrics", t).await.unwrap(), "m 1\n");
        assert!(matches!(get_unix(&sock, "/other", t).await, Err(HttpError::Status(404))));
        drop(server);
        assert!(!sock.exists());
        // A server that never answers: the client gives up at its deadline.
        let l = tokio::net::UnixListener::bind(&sock).unwrap();
        let t0 = std::time::Instant::now();
        let hold = tokio::spawn(async move {
            let c = l.accept().await;
            tokio::time::sleep(Duration::from_secs(10)).await;
            drop(c);
        });
        let r = get_unix(&sock, "/metrics", Duration::from_millis(200)).await;
        assert!(matches!(r, Err(HttpError::Timeout(_))), "{r:?}");
        assert!(t0.elapsed() < Duration::from_secs(2));
        hold.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }
}
