//! A minimal client of Caddy's admin API over its unix socket: read the running config, load a new
//! one. The socket lives in the proxy's state volume, so only the proxy and root on its node (where
//! berth runs) can reach it; nothing listens on a network address. HTTP/1.1 with `Connection: close`
//! is all Caddy's admin endpoint needs, so this is written out instead of pulling in an HTTP client
//! that speaks unix sockets.

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;

/// Longest a config load may take (internal certificates are issued during the load).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the proxy's admin socket {path}: {source}")]
    Unreachable {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the proxy's admin API did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the proxy's admin API answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from the proxy's admin API: {0}")]
    Protocol(String),
}

pub struct Admin {
    socket: PathBuf,
}

impl Admin {
    pub fn new(socket: &Path) -> Self {
        Admin {
            socket: socket.to_path_buf(),
        }
    }

    /// The config the proxy runs now.
    pub async fn config(&self) -> Result<Value, AdminError> {
        let body = self.request("GET", "/config/", None, READ_TIMEOUT).await?;
        serde_json::from_slice(&body).map_err(|e| AdminError::Protocol(e.to_string()))
    }

    /// Replaces the proxy's config. Caddy starts the new config's servers on the listeners the old
    /// ones hold and drains the old ones, so no connection is refused or cut; an invalid config is
    /// refused and the old one keeps running.
    pub async fn load(&self, config: &[u8]) -> Result<(), AdminError> {
        self.request("POST", "/load", Some(config), LOAD_TIMEOUT)
            .await
            .map(|_| ())
    }

    async fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>, AdminError> {
        let exchange = async {
            let mut stream = UnixStream::connect(&self.socket).await.map_err(|source| {
                AdminError::Unreachable {
                    path: self.socket.display().to_string(),
                    source,
                }
            })?;
            // An empty Host: Caddy's admin endpoint on a unix socket accepts only that origin.
            let mut req = format!("{method} {path} HTTP/1.1\r\nHost: \r\nConnection: close\r\n");
            if let Some(b) = body {
                req.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n",
                    b.len()
                ));
            }
            req.push_str("\r\n");
            let io = |e: std::io::Error| AdminError::Protocol(e.to_string());
            stream.write_all(req.as_bytes()).await.map_err(io)?;
            if let Some(b) = body {
                stream.write_all(b).await.map_err(io)?;
            }
            let mut answer = Vec::new();
            stream.read_to_end(&mut answer).await.map_err(io)?;
            Ok::<_, AdminError>(answer)
        };
        let answer = tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| AdminError::Timeout(timeout))??;
        let (status, body) = parse_response(&answer)?;
        if !(200..300).contains(&status) {
            let message: String = serde_json::from_slice::<Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned())
                .chars()
                .take(500)
                .collect();
            return Err(AdminError::Refused { status, message });
        }
        Ok(body)
    }
}

/// Status and body of a complete HTTP/1.1 response (plain or chunked).
pub fn parse_response(raw: &[u8]) -> Result<(u16, Vec<u8>), AdminError> {
    let bad = |why: &str| AdminError::Protocol(why.to_string());
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..split]);
    let body = &raw[split + 4..];
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("no status line"))?;
    let chunked = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("transfer-encoding:") && l.contains("chunked")
    });
    if !chunked {
        return Ok((status, body.to_vec()));
    }
    let mut out = Vec::new();
    let mut rest = body;
    loop {
        let eol = rest
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or_else(|| bad("truncated chunk"))?;
        let size_text = String::from_utf8_lossy(&rest[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|_| bad("bad chunk size"))?;
        rest = &rest[eol + 2..];
        if size == 0 {
            return Ok((status, out));
        }
        if rest.len() < size {
            return Err(bad("truncated chunk"));
        }
        out.extend_from_slice(&rest[..size]);
        rest = rest.get(size + 2..).unwrap_or_default();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_and_chunked_bodies() {
        let (s, b) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").unwrap();
        assert_eq!((s, b.as_slice()), (200, b"{}".as_slice()));
        let raw = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n4\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\nEtag: x\r\n\r\n";
        let (s, b) = parse_response(raw).unwrap();
        assert_eq!(s, 200);
        assert_eq!(b, b"{\"a\":1}");
        assert!(parse_response(b"garbage").is_err());
        assert!(
            parse_response(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n").is_err()
        );
    }

    #[tokio::test]
    async fn talks_http_over_a_unix_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("admin.sock");
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let server = tokio::spawn(async move {
            let mut seen = Vec::new();
            for answer in [
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nb\r\n{\"apps\":{}}\r\n0\r\n\r\n",
                "HTTP/1.1 400 Bad Request\r\nContent-Length: 25\r\n\r\n{\"error\":\"bad config x\"}\n",
            ] {
                let (mut s, _) = listener.accept().await.unwrap();
                let mut buf = vec![0u8; 4096];
                let n = s.read(&mut buf).await.unwrap();
                seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
                s.write_all(answer.as_bytes()).await.unwrap();
            }
            seen
        });
        let admin = Admin::new(&path);
        assert_eq!(
            admin.config().await.unwrap(),
            serde_json::json!({"apps": {}})
        );
        let e = admin.load(b"{}").await.unwrap_err();
        assert_eq!(
            e.to_string(),
            "the proxy's admin API answered 400: bad config x"
        );
        let seen = server.await.unwrap();
        assert!(
            seen[0].starts_with("GET /config/ HTTP/1.1\r\nHost: \r\n"),
            "{}",
            seen[0]
        );
        assert!(seen[1].starts_with("POST /load HTTP/1.1\r\n"));
        assert!(seen[1].contains("Content-Length: 2\r\n"));
        let gone = Admin::new(&dir.path().join("nothing.sock"));
        assert!(matches!(
            gone.config().await,
            Err(AdminError::Unreachable { .. })
        ));
    }
}
