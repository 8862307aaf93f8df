//! Connecting to the Swarm engine: one place that understands `--docker-host` values and negotiates
//! the API version down to what the engine speaks (Debian's engine 20.10 speaks 1.41).

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
