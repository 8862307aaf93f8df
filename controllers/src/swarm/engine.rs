//! Talking to the Swarm engine: connecting (one place that understands `--docker-host` values and
//! negotiates the API version down to what the engine speaks; Debian's engine 20.10 speaks 1.41), and
//! the small helpers every controller needs around engine answers.

use bollard::Docker;

#[derive(Debug, thiserror::Error)]
#[error("cannot connect to the Docker engine at {host}: {source}")]
pub struct EngineError {
    host: String,
    #[source]
    source: bollard::errors::Error,
}

/// `host`: `unix:///path`, `/path`, `tcp://h:p` or `http://h:p`; `None`: `DOCKER_HOST` or the local socket.
pub async fn connect(host: Option<&str>) -> Result<Docker, EngineError> {
    let host_s = host
        .map(str::to_string)
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string());
    let err = |source| EngineError {
        host: host_s.clone(),
        source,
    };
    let docker = if let Some(rest) = host_s.strip_prefix("tcp://") {
        Docker::connect_with_http(&format!("http://{rest}"), 120, bollard::API_DEFAULT_VERSION)
    } else if host_s.starts_with("http://") {
        Docker::connect_with_http(&host_s, 120, bollard::API_DEFAULT_VERSION)
    } else {
        Docker::connect_with_unix(&host_s, 120, bollard::API_DEFAULT_VERSION)
    }
    .map_err(err)?;
    let docker = docker.negotiate_version().await.map_err(err)?;
    docker.ping().await.map_err(err)?;
    Ok(docker)
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
