//! The login check: does the registry accept these credentials? Asked of the registry itself through
//! the distribution v2 API (the engine's `/auth` is not in the engine client berth uses), following
//! the same steps `docker login` takes: `GET /v2/`, then answer its challenge, either Basic (the
//! registry checks the password itself) or Bearer (a token server checks it and hands out a token).
//!
//! Like the engine, a registry on a loopback address may speak plain HTTP; every other registry must
//! speak HTTPS with a certificate the system trusts.
//!
//! The password only ever goes into an `Authorization` header: outcomes carry the registry's words
//! and the server's name, never the credentials.

use std::time::Duration;

/// What the registry said about the credentials.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoginOutcome {
    Accepted,
    /// The registry said no (401/403): nothing to retry until the credentials change.
    Rejected(String),
    /// No answer, or an answer that says nothing about the credentials: worth retrying.
    Unreachable(String),
}

/// How long one request to a registry may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

/// An HTTP client for login checks (no redirects to other hosts are needed by the v2 handshake, but
/// token servers do redirect; reqwest's default policy of 10 hops is kept).
pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(REQUEST_TIMEOUT)
        .user_agent(concat!("berth/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("a client with timeouts and a user agent builds")
}

/// Checks `username`/`password` against the registry at `host` (normalised `host[:port]`).
pub async fn login(
    http: &reqwest::Client,
    host: &str,
    username: &str,
    password: &str,
) -> LoginOutcome {
    let api_host = api_host(host);
    let mut last_error = String::new();
    for scheme in schemes(host) {
        let base = format!("{scheme}://{api_host}/v2/");
        let first = match http.get(&base).send().await {
            Ok(r) => r,
            Err(e) => {
                last_error = format!("cannot reach {base}: {}", error_chain(&e));
                continue;
            }
        };
        let status = first.status().as_u16();
        if status == 200 {
            // A registry without authentication lets anyone pull; the credentials are not needed.
            return LoginOutcome::Accepted;
        }
        if status != 401 {
            return LoginOutcome::Unreachable(format!(
                "{base} answered {} instead of asking for credentials",
                first.status()
            ));
        }
        let challenge = first
            .headers()
            .get(reqwest::header::WWW_AUTHENTICATE)
            .and_then(|v| v.to_str().ok())
            .map(parse_challenge)
            .unwrap_or(Challenge::Basic);
        let request = match &challenge {
            Challenge::Basic => http.get(&base),
            Challenge::Bearer { realm, service } => {
                let mut query = vec![("account", username), ("client_id", "berth")];
                if let Some(s) = service {
                    query.push(("service", s));
                }
                http.get(realm).query(&query)
            }
        };
        let answer = match request.basic_auth(username, Some(password)).send().await {
            Ok(r) => r,
            Err(e) => {
                return LoginOutcome::Unreachable(format!(
                    "login to {host} failed: {}",
                    error_chain(&e)
                ))
            }
        };
        let code = answer.status();
        let body = answer.text().await.unwrap_or_default();
        return match code.as_u16() {
            200..=299 => LoginOutcome::Accepted,
            401 | 403 => LoginOutcome::Rejected(format!(
                "{host} rejected the login of `{username}`: {}",
                registry_error_text(code, &body)
            )),
            _ => LoginOutcome::Unreachable(format!(
                "login to {host} failed: {}",
                registry_error_text(code, &body)
            )),
        };
    }
    LoginOutcome::Unreachable(last_error)
}

/// The engine's rule: registries on loopback addresses may be plain HTTP (tried after HTTPS).
fn schemes(host: &str) -> &'static [&'static str] {
    let name = host
        .rsplit_once(':')
        .map(|(n, p)| {
            if p.bytes().all(|b| b.is_ascii_digit()) {
                n
            } else {
                host
            }
        })
        .unwrap_or(host);
    let loopback_ip = name
        .parse::<std::net::Ipv4Addr>()
        .is_ok_and(|a| a.is_loopback());
    if name == "localhost" || loopback_ip || name == "[::1]" {
        &["https", "http"]
    } else {
        &["https"]
    }
}

/// Docker Hub's API is not served on `docker.io` itself.
fn api_host(host: &str) -> &str {
    if host == berth_api_types::image::DOCKER_HUB {
        "registry-1.docker.io"
    } else {
        host
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parses a `WWW-Authenticate` header (`Basic realm="x"` or `Bearer realm="...",service="..."`).
fn parse_challenge(header: &str) -> Challenge {
    let (scheme, params) = header.trim().split_once(' ').unwrap_or((header.trim(), ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Challenge::Basic;
    }
    let mut realm = None;
    let mut service = None;
    for part in split_params(params) {
        let Some((k, v)) = part.split_once('=') else {
            continue;
        };
        let v = v.trim().trim_matches('"').to_string();
        match k.trim().to_ascii_lowercase().as_str() {
            "realm" => realm = Some(v),
            "service" => service = Some(v),
            _ => {}
        }
    }
    match realm {
        Some(realm) => Challenge::Bearer { realm, service },
        None => Challenge::Basic,
    }
}

/// Splits `a="x,y",b=c` at the commas outside quotes.
fn split_params(s: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut quoted = false;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '"' => quoted = !quoted,
            ',' if !quoted => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// The registry's own words: the `errors` of a distribution error body, else the body's first
/// line, else the status line.
fn registry_error_text(status: reqwest::StatusCode, body: &str) -> String {
    #[derive(serde::Deserialize)]
    struct Body {
        errors: Vec<Item>,
    }
    #[derive(serde::Deserialize)]
    struct Item {
        #[serde(default)]
        code: String,
        #[serde(default)]
        message: String,
    }
    let words = match serde_json::from_str::<Body>(body) {
        Ok(b) if !b.errors.is_empty() => b
            .errors
            .iter()
            .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                (false, false) => format!("{}: {}", e.code, e.message),
                (true, false) => e.message.clone(),
                _ => e.code.clone(),
            })
            .collect::<Vec<_>>()
            .join("; "),
        _ => body
            .lines()
            .map(str::trim)
            .find(|l| !l.is_empty())
            .unwrap_or_default()
            .chars()
            .take(200)
            .collect(),
    };
    if words.is_empty() {
        status.to_string()
    } else {
        format!("{status}: {words}")
    }
}

/// reqwest's top-level error says only "error sending request"; the cause says why.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = if e.is_timeout() {
        "timed out".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        assert_eq!(
            parse_challenge(r#"Basic realm="berth-test""#),
            Challenge::Basic
        );
        assert_eq!(
            parse_challenge(
                r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io""#
            ),
            Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            }
        );
        assert_eq!(
            parse_challenge(r#"Bearer service="a,b", realm="https://t.example/x""#),
            Challenge::Bearer {
                realm: "https://t.example/x".into(),
                service: Some("a,b".into())
            }
        );
        // A bearer challenge without a realm cannot be followed; Basic is the fallback.
        assert_eq!(parse_challenge("Bearer"), Challenge::Basic);
    }

    #[test]
    fn plain_http_only_on_loopback() {
        assert_eq!(schemes("127.0.0.1:5000"), &["https", "http"]);
        assert_eq!(schemes("localhost"), &["https", "http"]);
        assert_eq!(schemes("registry.example.com"), &["https"]);
        assert_eq!(schemes("127.example.com:443"), &["https"]);
        assert_eq!(api_host("docker.io"), "registry-1.docker.io");
    }

    #[test]
    fn registry_words() {
        let s = reqwest::StatusCode::UNAUTHORIZED;
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"authentication required","detail":null}]}"#;
        assert_eq!(
            registry_error_text(s, body),
            "401 Unauthorized: UNAUTHORIZED: authentication required"
        );
        assert_eq!(
            registry_error_text(s, "\n  incorrect username or password\n"),
            "401 Unauthorized: incorrect username or password"
        );
        assert_eq!(registry_error_text(s, ""), "401 Unauthorized");
    }
}
