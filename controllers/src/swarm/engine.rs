//! Talking to the Swarm engine: connecting (one place that understands `--docker-host` values and
//! negotiates the API version down to what the engine speaks; Debian's engine 20.10 speaks 1.41), and
//! the small helpers every controller needs around engine answers.

use bollard::Docker;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("cannot connect to the Docker engine at {host}: {source}")]
    Connect {
        host: String,
        #[source]
        source: bollard::errors::Error,
    },
    /// The engine address and the docker CLI's TLS variables do not make a safe connection.
    #[error("Docker engine at {host}: {message}")]
    Settings { host: String, message: String },
}

/// How berth reaches the engine, from `--docker-host` and the docker CLI's variables.
#[derive(Debug, PartialEq, Eq)]
pub enum Transport {
    Unix(String),
    /// Plain HTTP; `beyond_loopback` when it crosses a network (everything sent, Secret values
    /// included, then travels in clear).
    Http {
        url: String,
        beyond_loopback: bool,
    },
    /// HTTPS, the engine verified against `ca`, berth proving itself with `cert` and `key`: the
    /// files `docker --tlsverify` uses.
    Tls {
        url: String,
        ca: PathBuf,
        cert: PathBuf,
        key: PathBuf,
    },
}

/// Resolves `host` as the docker CLI does: a `tcp://` host with `DOCKER_TLS_VERIFY` set (to
/// anything, as for docker) is HTTPS with the client certificate in `DOCKER_CERT_PATH` (default
/// `~/.docker`): `ca.pem`, `cert.pem`, `key.pem`. `DOCKER_TLS` alone (TLS without checking the
/// engine's certificate) is refused. `env` reads a variable.
pub fn transport(host: &str, env: impl Fn(&str) -> Option<String>) -> Result<Transport, String> {
    let set = |k: &str| env(k).filter(|v| !v.is_empty());
    let (rest, explicit_http) = match (host.strip_prefix("tcp://"), host.strip_prefix("http://")) {
        (Some(rest), _) => (rest, false),
        (_, Some(rest)) => (rest, true),
        _ => return Ok(Transport::Unix(host.to_string())),
    };
    if set("DOCKER_TLS_VERIFY").is_some() {
        if explicit_http {
            return Err(format!(
                "DOCKER_TLS_VERIFY is set but {host} says plain HTTP; use tcp://{rest}"
            ));
        }
        let dir = match (set("DOCKER_CERT_PATH"), set("HOME")) {
            (Some(dir), _) => PathBuf::from(dir),
            (None, Some(home)) => Path::new(&home).join(".docker"),
            (None, None) => {
                return Err("DOCKER_TLS_VERIFY is set but neither DOCKER_CERT_PATH nor HOME is: \
                            set DOCKER_CERT_PATH to the directory with ca.pem, cert.pem and key.pem"
                    .into())
            }
        };
        let file = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(format!(
                    "DOCKER_TLS_VERIFY is set but {} is missing (the client certificate directory \
                     DOCKER_CERT_PATH, default ~/.docker, must hold ca.pem, cert.pem and key.pem, \
                     as for `docker --tlsverify`)",
                    path.display()
                ))
            }
        };
        return Ok(Transport::Tls {
            url: format!("tcp://{rest}"),
            ca: file("ca.pem")?,
            cert: file("cert.pem")?,
            key: file("key.pem")?,
        });
    }
    if set("DOCKER_TLS").is_some() {
        return Err(
            "DOCKER_TLS is set without DOCKER_TLS_VERIFY: berth does not talk TLS to an engine \
             without checking its certificate; set DOCKER_TLS_VERIFY=1 and DOCKER_CERT_PATH"
                .into(),
        );
    }
    let name = rest.split('/').next().unwrap_or(rest);
    let name = name
        .rsplit_once(':')
        .map(|(h, _)| h)
        .unwrap_or(name)
        .trim_matches(['[', ']']);
    let loopback = name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    Ok(Transport::Http {
        url: format!("http://{rest}"),
        beyond_loopback: !loopback,
    })
}

/// `host`: `unix:///path`, `/path`, `tcp://h:p` or `http://h:p`; `None`: `DOCKER_HOST` or the local
/// socket. A `tcp://` host uses TLS as the docker CLI would (see `transport`).
pub async fn connect(host: Option<&str>) -> Result<Docker, EngineError> {
    let host_s = host
        .map(str::to_string)
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
    let err = |source| EngineError::Connect {
        host: host_s.clone(),
        source,
    };
    let transport =
        transport(&host_s, |k| std::env::var(k).ok()).map_err(|message| EngineError::Settings {
            host: host_s.clone(),
            message,
        })?;
    let version = bollard::API_DEFAULT_VERSION;
    let docker = match transport {
        Transport::Unix(path) => Docker::connect_with_unix(&path, 120, version),
        Transport::Http {
            url,
            beyond_loopback,
        } => {
            if beyond_loopback {
                warn_clear_text(&host_s);
            }
            Docker::connect_with_http(&url, 120, version)
        }
        Transport::Tls { url, ca, cert, key } => {
            // bollard looks the client key up through the process's default provider: make it
            // ring (what every other TLS connection of berth uses) before it asks.
            let _ = tokio_rustls::rustls::crypto::ring::default_provider().install_default();
            // bollard reads the client certificate only during the handshake and, if it cannot,
            // sends none: the engine's refusal would not name the file.
            check_pem(&cert, &key).map_err(|message| EngineError::Settings {
                host: host_s.clone(),
                message,
            })?;
            Docker::connect_with_ssl(&url, &key, &cert, &ca, 120, version)
        }
    }
    .map_err(err)?;
    let docker = docker.negotiate_version().await.map_err(err)?;
    docker.ping().await.map_err(err)?;
    Ok(docker)
}

/// The client certificate and key files hold what their names say.
fn check_pem(cert: &Path, key: &Path) -> Result<(), String> {
    use tokio_rustls::rustls::pki_types::{pem::PemObject, CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .map(|i| i.filter_map(Result::ok).count())
        .unwrap_or(0);
    if certs == 0 {
        return Err(format!("{} holds no PEM certificate", cert.display()));
    }
    PrivateKeyDer::from_pem_file(key)
        .map(|_| ())
        .map_err(|_| format!("{} holds no PEM private key", key.display()))
}

/// Once per process: every controller connects, one warning is enough to be seen.
fn warn_clear_text(host: &str) {
    static WARNED: std::sync::Once = std::sync::Once::new();
    WARNED.call_once(|| {
        tracing::warn!(
            %host,
            "the Docker engine is reached over plain HTTP: Secret and Config values, registry \
             credentials and everything else berth sends travel in clear. Use TLS \
             (DOCKER_TLS_VERIFY=1, DOCKER_CERT_PATH) or an SSH tunnel to the engine's socket"
        );
    });
}

/// The HTTP status of an engine error answer, if it was one.
pub fn status_code(e: &bollard::errors::Error) -> Option<u16> {
    match e {
        bollard::errors::Error::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

/// "the engine refused the <what>: <engine's message>", for status conditions.
pub fn refusal(what: &str, e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { .. } => {
            format!("the engine refused the {what}: {}", message(e))
        }
        other => other.to_string(),
    }
}

/// The engine's own words for an error answer (without bollard's "Docker responded with status
/// code" prefix), or the transport error.
pub fn message(e: &bollard::errors::Error) -> String {
    match e {
        bollard::errors::Error::DockerResponseServerError { message, .. } => message.clone(),
        other => other.to_string(),
    }
}

/// An engine answer where 404 means "not there": `Ok(None)`, other errors stay errors.
pub fn found<T>(r: Result<T, bollard::errors::Error>) -> Result<Option<T>, bollard::errors::Error> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if status_code(&e) == Some(404) => Ok(None),
        Err(e) => Err(e),
    }
}

/// An engine delete where 404 ("already gone") is success.
pub fn gone(r: Result<(), bollard::errors::Error>) -> Result<(), bollard::errors::Error> {
    found(r).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(vars: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            vars.iter()
                .find(|(n, _)| *n == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn local_and_plain_hosts() {
        assert_eq!(
            transport("unix:///var/run/docker.sock", env(&[])).unwrap(),
            Transport::Unix("unix:///var/run/docker.sock".into())
        );
        // TLS variables do not apply to a socket (as for docker).
        assert!(matches!(
            transport("/run/docker.sock", env(&[("DOCKER_TLS_VERIFY", "1")])).unwrap(),
            Transport::Unix(_)
        ));
        for (host, beyond) in [
            ("tcp://127.0.0.1:2375", false),
            ("tcp://localhost:2375", false),
            ("tcp://[::1]:2375", false),
            ("tcp://10.0.0.2:2375", true),
            ("http://manager.example:2375", true),
        ] {
            match transport(host, env(&[("DOCKER_TLS_VERIFY", "")])).unwrap() {
                Transport::Http {
                    url,
                    beyond_loopback,
                } => {
                    assert!(url.starts_with("http://"), "{url}");
                    assert_eq!(beyond_loopback, beyond, "{host}");
                }
                other => panic!("{host}: {other:?}"),
            }
        }
    }

    #[test]
    fn tls_verify_uses_the_docker_cli_files_and_names_a_missing_one() {
        let dir = tempfile::tempdir().unwrap();
        let certs = dir.path().to_str().unwrap();
        std::fs::write(dir.path().join("ca.pem"), "x").unwrap();
        std::fs::write(dir.path().join("cert.pem"), "x").unwrap();
        let vars = [("DOCKER_TLS_VERIFY", "1"), ("DOCKER_CERT_PATH", certs)];
        let e = transport("tcp://10.0.0.2:2376", env(&vars)).unwrap_err();
        assert!(
            e.contains(&dir.path().join("key.pem").display().to_string()),
            "{e}"
        );
        std::fs::write(dir.path().join("key.pem"), "x").unwrap();
        assert_eq!(
            transport("tcp://10.0.0.2:2376", env(&vars)).unwrap(),
            Transport::Tls {
                url: "tcp://10.0.0.2:2376".into(),
                ca: dir.path().join("ca.pem"),
                cert: dir.path().join("cert.pem"),
                key: dir.path().join("key.pem"),
            }
        );
        // Default directory: ~/.docker, as for docker.
        let home = dir.path().to_str().unwrap();
        let e = transport(
            "tcp://10.0.0.2:2376",
            env(&[("DOCKER_TLS_VERIFY", "1"), ("HOME", home)]),
        )
        .unwrap_err();
        assert!(e.contains(".docker/ca.pem"), "{e}");
        // Plain HTTP asked for explicitly contradicts DOCKER_TLS_VERIFY.
        let e = transport("http://10.0.0.2:2376", env(&vars)).unwrap_err();
        assert!(e.contains("tcp://10.0.0.2:2376"), "{e}");
    }

    #[test]
    fn tls_without_verification_is_refused() {
        let e = transport("tcp://10.0.0.2:2376", env(&[("DOCKER_TLS", "1")])).unwrap_err();
        assert!(e.contains("DOCKER_TLS_VERIFY"), "{e}");
    }
}
