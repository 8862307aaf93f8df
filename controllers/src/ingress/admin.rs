//! A client of one proxy task's *remote* admin endpoint: read the running config, load a new one.
//!
//! Every proxy task runs Caddy's remote admin (`admin.remote` in the rendered config) on container
//! port [`ADMIN_TARGET_PORT`], published in host mode on its node (`--ingress-admin-port`). Who may
//! use it: only the holder of berth's admin client key. Mutual TLS both ways:
//! - berth verifies the proxy: its certificate (`admin.identity`, for the fixed name
//!   [`server_name`]) is issued by Caddy from berth's CA, which only the proxy holds the key of;
//!   berth trusts that CA and nothing else (no system roots).
//! - the proxy verifies berth: `access_control` names berth's client certificate
//!   ([`super::ca::AdminIdentity`]) as the only key allowed in, and only for `GET /config/` and
//!   `POST /load` (Caddy 2.6 applies one permission entry's methods to all its paths).
//!
//! This is how a config reaches proxies on *every* node, berth's own included: one mechanism. (Caddy
//! 2.6.2's pull alternative, `admin.config.load` with `load_delay`, was tried and rejected: its
//! poller stops for good after one config it refuses, and its HTTP loader sends every poll ten
//! times; see docs/ingress.md.)

use super::ca::AdminIdentity;
use serde_json::Value;
use std::net::SocketAddr;
use std::time::Duration;

/// The port Caddy's remote admin listens on inside the proxy's containers.
pub const ADMIN_TARGET_PORT: u16 = 2021;
/// Longest a config load may take (internal certificates are issued during the load).
const LOAD_TIMEOUT: Duration = Duration::from_secs(30);
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// A proxy that does not accept a connection this fast is taken as unreachable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// The name every proxy's admin certificate is issued for. One name for all nodes, because every
/// task runs the same config; berth connects to a node's address and checks this name.
pub fn server_name(proxy: &str) -> String {
    format!("{proxy}.admin.berth")
}

#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("cannot reach the proxy's admin endpoint at {addr}: {message}")]
    Unreachable { addr: SocketAddr, message: String },
    #[error("the proxy's admin API answered {status}: {message}")]
    Refused { status: u16, message: String },
    #[error("unexpected answer from the proxy's admin API: {0}")]
    Protocol(String),
}

/// The admin endpoint of one proxy task.
pub struct Admin {
    client: reqwest::Client,
    base: String,
    addr: SocketAddr,
}

impl Admin {
    /// The endpoint at `addr` (a node's address and the published admin port), verified against
    /// `ca_pem` for [`server_name`] of `proxy`, called with `identity`.
    pub fn new(
        identity: &AdminIdentity,
        ca_pem: &str,
        proxy: &str,
        addr: SocketAddr,
    ) -> Result<Admin, AdminError> {
        let bad = |what: &str, e: reqwest::Error| AdminError::Protocol(format!("{what}: {e}"));
        if !ca_pem.contains("-----BEGIN CERTIFICATE-----") {
            // reqwest takes anything here and would then trust nothing.
            return Err(AdminError::Protocol(
                "berth's CA certificate is not PEM".into(),
            ));
        }
        let name = server_name(proxy);
        let client = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(
                reqwest::Certificate::from_pem(ca_pem.as_bytes())
                    .map_err(|e| bad("berth's CA certificate", e))?,
            )
            .identity(
                reqwest::Identity::from_pem(identity.pem_file().as_bytes())
                    .map_err(|e| bad("berth's admin client identity", e))?,
            )
            // Connect to the node's address, but check the proxy's certificate for its name.
            .resolve(&name, addr)
            .no_proxy()
            .connect_timeout(CONNECT_TIMEOUT)
            .pool_max_idle_per_host(0)
            .build()
            .map_err(|e| bad("TLS client", e))?;
        Ok(Admin {
            client,
            base: format!("https://{name}:{}", addr.port()),
            addr,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The config the proxy runs now.
    pub async fn config(&self) -> Result<Value, AdminError> {
        let body = self
            .request(reqwest::Method::GET, "/config/", None, READ_TIMEOUT)
            .await?;
        serde_json::from_slice(&body).map_err(|e| AdminError::Protocol(e.to_string()))
    }

    /// Replaces the proxy's config. Caddy starts the new config's servers on the listeners the old
    /// ones hold and drains the old ones, so no connection is refused or cut; an invalid config is
    /// refused and the old one keeps running.
    pub async fn load(&self, config: &[u8]) -> Result<(), AdminError> {
        self.request(reqwest::Method::POST, "/load", Some(config), LOAD_TIMEOUT)
            .await
            .map(|_| ())
    }

    async fn request(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>, AdminError> {
        let mut req = self
            .client
            .request(method, format!("{}{path}", self.base))
            .timeout(timeout);
        if let Some(b) = body {
            req = req
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .body(b.to_vec());
        }
        let unreachable = |e: reqwest::Error| AdminError::Unreachable {
            addr: self.addr,
            message: error_chain(&e),
        };
        let resp = req.send().await.map_err(unreachable)?;
        let status = resp.status().as_u16();
        let body = resp.bytes().await.map_err(unreachable)?.to_vec();
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

/// An error with its causes: reqwest's own text is only "error sending request".
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
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

    #[tokio::test]
    async fn an_unreachable_endpoint_is_reported_with_its_address() {
        let id = AdminIdentity::generate("t").unwrap();
        let ca = super::super::ca::generate("t").unwrap();
        // Nothing listens on port 1 of the loopback address: refused at once.
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let admin = Admin::new(&id, &ca.cert_pem, "lb", addr).unwrap();
        assert_eq!(admin.base, "https://lb.admin.berth:1");
        match admin.config().await {
            Err(AdminError::Unreachable { addr: a, message }) => {
                assert_eq!(a, addr);
                assert!(!message.is_empty());
            }
            other => panic!("{other:?}"),
        }
        assert!(Admin::new(&id, "not a pem", "lb", addr).is_err());
    }
}
