//! HTTPS for berth's own listeners: the API (`--listen`) and the webhook listener
//! (`--hooks-listen`).
//!
//! Either the operator's certificate (`--tls-cert`, `--tls-key`) or berth's internal CA
//! (`--tls internal`): a root kept in the data directory (`ca.key`, mode 0600; `ca.pem` for
//! clients, `berth --ca`) issues the server certificate anew at every start, for the names clients
//! use. Without TLS berth serves plain HTTP only on loopback unless `--insecure-http` says
//! otherwise: the API carries bearer tokens and Secret values, the webhook listener tokens.
//!
//! The TLS handshake runs in a task per connection (bounded, with a timeout), not in the accept
//! loop, so a client that never finishes its handshake cannot hold up the others.

use clap::Args;
use rcgen::{CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls::{self, pki_types};
use tokio_rustls::server::TlsStream;
use tracing::debug;

/// How berth's listeners serve HTTPS (flattened into `berth up` and `berth api`).
#[derive(Args, Clone, Debug, Default)]
pub struct TlsArgs {
    /// Serve HTTPS with this certificate chain (PEM, the server's certificate first). Read at
    /// start: restart berth after renewing it.
    #[arg(
        long,
        env = "BERTH_TLS_CERT",
        requires = "tls_key",
        conflicts_with = "tls"
    )]
    pub tls_cert: Option<PathBuf>,
    /// The private key of --tls-cert (PEM). Refused when others can read it.
    #[arg(long, env = "BERTH_TLS_KEY", requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// `internal`: serve HTTPS with a certificate from berth's own CA, kept in the data directory
    /// (ca.key, mode 0600). Clients trust <data-dir>/ca.pem (`berth --ca`). The server certificate
    /// is issued at every start for localhost, 127.0.0.1, ::1, this host's name, the listen
    /// addresses and each --tls-san.
    #[arg(long, env = "BERTH_TLS", value_parser = ["internal"])]
    pub tls: Option<String>,
    /// Another name or IP address clients reach berth by, for the internal CA's server
    /// certificate (repeat it, or separate with commas).
    #[arg(
        long = "tls-san",
        env = "BERTH_TLS_SAN",
        value_delimiter = ',',
        requires = "tls"
    )]
    pub tls_san: Vec<String>,
    /// Serve plain HTTP on an address beyond loopback. Tokens, Secret values and webhook tokens
    /// then cross the network in clear: only for an isolated test or lab network that only the
    /// platform's operators can reach, never for production. Without it berth refuses to listen
    /// beyond loopback without TLS.
    #[arg(
        long,
        env = "BERTH_INSECURE_HTTP",
        value_parser = clap::builder::FalseyValueParser::new(),
        conflicts_with_all = ["tls", "tls_cert"]
    )]
    pub insecure_http: bool,
}

/// Where the internal CA lives in the data directory.
pub const CA_KEY_FILE: &str = "ca.key";
pub const CA_CERT_FILE: &str = "ca.pem";

/// How long a server certificate from the internal CA is valid. It is issued anew at every start.
const SERVER_CERT_DAYS: i64 = 397;
/// TLS handshakes in progress at once per listener; connections beyond are closed at once.
const MAX_HANDSHAKES: usize = 256;
/// A client that has not finished its handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What a listener serves with.
pub struct ServerTls {
    pub config: Arc<rustls::ServerConfig>,
    /// The CA clients must trust, when it is berth's own.
    pub ca_file: Option<PathBuf>,
}

impl TlsArgs {
    fn enabled(&self) -> bool {
        self.tls.is_some() || self.tls_cert.is_some()
    }

    /// Refuses plain HTTP on `addr` (the address `flag` bound) unless it is loopback or the
    /// operator said `--insecure-http`.
    pub fn check_plain(&self, flag: &str, addr: SocketAddr) -> Result<(), String> {
        if self.enabled() || addr.ip().is_loopback() {
            return Ok(());
        }
        if self.insecure_http {
            tracing::warn!(%addr, "{flag}: plain HTTP beyond loopback (--insecure-http): tokens and Secret values cross the network in clear");
            return Ok(());
        }
        Err(format!(
            "error: {flag} {addr} is not a loopback address and TLS is off: tokens and Secret \
             values would cross the network in clear. Serve HTTPS (--tls internal, or --tls-cert \
             and --tls-key), or pass --insecure-http on an isolated test network"
        ))
    }

    /// The TLS configuration of the listeners bound to `listen`, or `None` for plain HTTP.
    /// `instance` names the internal CA.
    pub fn server_tls(
        &self,
        data_dir: &Path,
        instance: &str,
        listen: &[SocketAddr],
    ) -> Result<Option<ServerTls>, String> {
        if let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) {
            let (chain, key) = read_identity(cert, key)?;
            return Ok(Some(ServerTls {
                config: server_config(chain, key)?,
                ca_file: None,
            }));
        }
        if self.tls.is_none() {
            return Ok(None);
        }
        for san in &self.tls_san {
            check_san(san)?;
        }
        let ca = InternalCa::load_or_create(data_dir, instance)?;
        let names = server_names(listen, hostname().as_deref(), &self.tls_san);
        if listen.iter().any(|a| a.ip().is_unspecified()) {
            tracing::info!(
                names = %names.join(", "),
                "listening on every address: the server certificate names only these; add --tls-san for the others clients use"
            );
        }
        let (chain, key) = ca.issue(&names)?;
        ca.check_issued(&chain[0])?;
        Ok(Some(ServerTls {
            config: server_config(chain, key)?,
            ca_file: Some(ca.cert_file),
        }))
    }
}

fn server_config(
    chain: Vec<pki_types::CertificateDer<'static>>,
    key: pki_types::PrivateKeyDer<'static>,
) -> Result<Arc<rustls::ServerConfig>, String> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("error: TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("error: the TLS certificate and key do not go together: {e}"))?;
    // axum serves HTTP/1.1 here.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The operator's certificate chain and key. The key file may be group-readable (the `ssl-cert`
/// group convention) but not readable by everyone.
fn read_identity(
    cert: &Path,
    key: &Path,
) -> Result<
    (
        Vec<pki_types::CertificateDer<'static>>,
        pki_types::PrivateKeyDer<'static>,
    ),
    String,
> {
    use pki_types::pem::PemObject;
    let chain = pki_types::CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("error: --tls-cert {}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!(
            "error: --tls-cert {}: no PEM certificate in the file",
            cert.display()
        ));
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(key)
            .map_err(|e| format!("error: --tls-key {}: {e}", key.display()))?
            .permissions()
            .mode();
        if mode & 0o007 != 0 {
            return Err(format!(
                "error: --tls-key {} is readable by everyone (mode {:04o}); run `chmod o-rwx` on it \
                 (and consider the key exposed)",
                key.display(),
                mode & 0o777
            ));
        }
    }
    // rustls' message names neither the file nor the key: keep ours.
    let key = pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| {
        format!(
            "error: --tls-key {}: no PEM private key in the file ({e})",
            key.display()
        )
    })?;
    Ok((chain, key))
}

/// `--tls-san` must be an IP address or a DNS name (optionally `*.` for one level of wildcard).
pub fn check_san(san: &str) -> Result<(), String> {
    if san.parse::<IpAddr>().is_ok() {
        return Ok(());
    }
    let name = san.strip_prefix("*.").unwrap_or(san);
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
    };
    if name.len() <= 253 && name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(format!(
            "error: --tls-san `{san}` is neither an IP address nor a DNS name (letters, digits and \
             `-` between dots; `*.` may start it)"
        ))
    }
}

/// The names the internal CA's server certificate is for: loopback (how the CLI on the machine
/// reaches berth), this host's name, the addresses the listeners bound (unless "every address"),
/// and the operator's extra names. No duplicates, in that order.
pub fn server_names(
    listen: &[SocketAddr],
    hostname: Option<&str>,
    extra: &[String],
) -> Vec<String> {
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(
        hostname
            .filter(|h| check_san(h).is_ok())
            .map(str::to_string),
    );
    names.extend(
        listen
            .iter()
            .map(|a| a.ip())
            .filter(|ip| !ip.is_unspecified())
            .map(|ip| ip.to_string()),
    );
    names.extend(extra.iter().cloned());
    let mut seen = std::collections::HashSet::new();
    names.retain(|n| seen.insert(n.to_ascii_lowercase()));
    names
}

fn hostname() -> Option<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
}

/// berth's own CA for its API: the key is the lasting part (0600 in the data directory); the
/// certificate clients trust is written once beside it.
pub struct InternalCa {
    key: KeyPair,
    /// Rebuilt from the key and the name at each start: what issued certificates name as issuer.
    issuer: rcgen::Certificate,
    /// The certificate clients trust, as written at creation.
    cert_pem: String,
    pub cert_file: PathBuf,
}

/// Hand-written so the key never reaches a log.
impl std::fmt::Debug for InternalCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InternalCa")
            .field("cert_file", &self.cert_file)
            .finish_non_exhaustive()
    }
}

impl InternalCa {
    /// The CA in `data_dir`, created (ECDSA P-256, named after the installation) at first use.
    pub fn load_or_create(data_dir: &Path, instance: &str) -> Result<InternalCa, String> {
        let key_file = data_dir.join(CA_KEY_FILE);
        let cert_file = data_dir.join(CA_CERT_FILE);
        let shown = key_file.display();
        let name = format!("berth API CA {instance}");
        let key = match std::fs::metadata(&key_file) {
            Ok(_) => {
                crate::data_dir::check_private_file(&key_file, "API CA key")
                    .map_err(|e| format!("error: {e}"))?;
                let pem = std::fs::read_to_string(&key_file)
                    .map_err(|e| format!("error: cannot read {shown}: {e}"))?;
                KeyPair::from_pem(&pem).map_err(|_| {
                    format!("error: {shown} does not hold a PEM private key (restore it, or remove it and {} to make a new CA that clients must then trust)", cert_file.display())
                })?
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if cert_file.exists() {
                    return Err(format!(
                        "error: {} exists but its key {shown} does not: restore the key, or remove \
                         {} to make a new CA (clients must then trust the new one)",
                        cert_file.display(),
                        cert_file.display()
                    ));
                }
                let key = KeyPair::generate()
                    .map_err(|e| format!("error: cannot generate the API CA key: {e}"))?;
                write_new_private(&key_file, key.serialize_pem().as_bytes())
                    .map_err(|e| format!("error: cannot create {shown}: {e}"))?;
                key
            }
            Err(e) => return Err(format!("error: cannot read {shown}: {e}")),
        };
        let issuer = berth_controllers::ingress::ca::root_params(&name)
            .self_signed(&key)
            .map_err(|e| format!("error: cannot sign the API CA certificate: {e}"))?;
        let cert_pem = match std::fs::read_to_string(&cert_file) {
            Ok(pem) => pem,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let pem = issuer.pem();
                std::fs::write(&cert_file, &pem)
                    .map_err(|e| format!("error: cannot write {}: {e}", cert_file.display()))?;
                pem
            }
            Err(e) => return Err(format!("error: cannot read {}: {e}", cert_file.display())),
        };
        Ok(InternalCa {
            key,
            issuer,
            cert_pem,
            cert_file,
        })
    }

    /// A server certificate for `names` (IP addresses and DNS names) and its fresh key.
    pub fn issue(
        &self,
        names: &[String],
    ) -> Result<
        (
            Vec<pki_types::CertificateDer<'static>>,
            pki_types::PrivateKeyDer<'static>,
        ),
        String,
    > {
        use chrono::Datelike;
        let mut params = CertificateParams::new(names.to_vec())
            .map_err(|e| format!("error: cannot name the server certificate: {e}"))?;
        params
            .distinguished_name
            .push(DnType::CommonName, "berth API");
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        // From yesterday: a client whose clock is a little behind still accepts it.
        let date =
            |d: chrono::NaiveDate| rcgen::date_time_ymd(d.year(), d.month() as u8, d.day() as u8);
        let today = chrono::Utc::now().date_naive();
        params.not_before = date(today - chrono::Days::new(1));
        params.not_after = date(today + chrono::Days::new(SERVER_CERT_DAYS as u64));
        let key = KeyPair::generate()
            .map_err(|e| format!("error: cannot generate the server key: {e}"))?;
        let cert = params
            .signed_by(&key, &self.issuer, &self.key)
            .map_err(|e| format!("error: cannot issue the server certificate: {e}"))?;
        let key = pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        Ok((vec![cert.der().clone()], key))
    }

    /// Checks that a client trusting `ca.pem` accepts `leaf` (for localhost): `ca.pem` and `ca.key`
    /// are two files, and one replaced without the other would otherwise surface only as every
    /// client's certificate error.
    pub fn check_issued(&self, leaf: &pki_types::CertificateDer<'static>) -> Result<(), String> {
        use pki_types::pem::PemObject;
        use rustls::client::danger::ServerCertVerifier;
        let mismatch = |why: String| {
            format!(
                "error: {} does not verify the certificates its key issues ({why}): restore the \
                 pair, or remove both {} and {} to make a new CA",
                self.cert_file.display(),
                self.cert_file.display(),
                CA_KEY_FILE
            )
        };
        let mut roots = rustls::RootCertStore::empty();
        for cert in pki_types::CertificateDer::pem_slice_iter(self.cert_pem.as_bytes()) {
            roots
                .add(cert.map_err(|e| mismatch(e.to_string()))?)
                .map_err(|e| mismatch(e.to_string()))?;
        }
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .map_err(|e| mismatch(e.to_string()))?;
        let name = pki_types::ServerName::try_from("localhost").expect("a valid name");
        verifier
            .verify_server_cert(leaf, &[], &name, &[], pki_types::UnixTime::now())
            .map(|_| ())
            .map_err(|e| mismatch(e.to_string()))
    }
}

/// Creates `path` with mode 0600 and `content`, never replacing a file (two starts at once must not
/// each make a CA).
fn write_new_private(path: &Path, content: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(path)?;
    f.write_all(content)?;
    f.sync_all()
}

/// Serves `app` on `listener`, over TLS when `tls` is given. The peer address reaches handlers as
/// `ConnectInfo<SocketAddr>` either way (webhook calls are rate-limited by it).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    app: axum::Router,
) -> std::io::Result<()> {
    use axum::serve::ListenerExt;
    let app = app.into_make_service_with_connect_info::<SocketAddr>();
    match tls {
        None => axum::serve(listener, app).await,
        // `tap_io` is what lets axum's `ConnectInfo<SocketAddr>` work with our listener type.
        Some(config) => axum::serve(TlsListener::new(listener, config)?.tap_io(|_| {}), app).await,
    }
}

/// A TCP listener whose connections come out after a completed TLS handshake.
pub struct TlsListener {
    ready: tokio::sync::mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    /// Starts accepting on `tcp`; handshakes run in their own tasks.
    pub fn new(tcp: TcpListener, config: Arc<rustls::ServerConfig>) -> std::io::Result<Self> {
        let local = tcp.local_addr()?;
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        let acceptor = tokio_rustls::TlsAcceptor::from(config);
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_HANDSHAKES));
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match tcp.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        // Out of file descriptors and the like: wait instead of spinning.
                        debug!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    debug!(%peer, "too many TLS handshakes in progress; connection closed");
                    continue;
                };
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    let _slot = slot;
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, handshake(&acceptor, stream))
                        .await
                    {
                        Ok(Ok(Some(tls))) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Ok(None)) => {
                            debug!(%peer, "plain HTTP on the TLS port: told to use https")
                        }
                        Ok(Err(e)) => debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => debug!(%peer, "TLS handshake timed out"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

/// What a plain-HTTP request on a TLS port is told: the client learns what is wrong instead of
/// seeing a connection closed for no reason.
const PLAIN_HTTP_BODY: &str = "This port serves HTTPS: use an https:// URL with berth.\n";

/// The TLS handshake; `None` when the client spoke plain HTTP (answered with 400).
async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    mut stream: TcpStream,
) -> std::io::Result<Option<TlsStream<TcpStream>>> {
    let mut first = [0u8; 1];
    let n = stream.peek(&mut first).await?;
    // A TLS connection starts with a handshake record (0x16); an HTTP request with a method name.
    if n == 1 && first[0].is_ascii_uppercase() {
        let mut request = [0u8; 4096];
        // Read what the client sent before answering, so closing does not reset the connection
        // under the answer.
        let _ = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut request)).await;
        let answer = format!(
            "HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nConnection: close\r\n\
             Content-Length: {}\r\n\r\n{PLAIN_HTTP_BODY}",
            PLAIN_HTTP_BODY.len()
        );
        stream.write_all(answer.as_bytes()).await?;
        let _ = stream.shutdown().await;
        return Ok(None);
    }
    acceptor.accept(stream).await.map(Some)
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The accept task ends only when this listener is dropped.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cmd {
        #[command(flatten)]
        tls: TlsArgs,
    }

    fn parse(args: &[&str]) -> Result<TlsArgs, String> {
        Cmd::try_parse_from(std::iter::once("berth").chain(args.iter().copied()))
            .map(|c| c.tls)
            .map_err(|e| e.to_string())
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn flags_that_do_not_go_together_are_refused() {
        assert!(parse(&["--tls", "internal"]).is_ok());
        assert!(parse(&["--tls", "acme"]).unwrap_err().contains("internal"));
        assert!(parse(&["--tls-cert", "c.pem"])
            .unwrap_err()
            .contains("--tls-key"));
        assert!(parse(&["--tls-key", "k.pem"])
            .unwrap_err()
            .contains("--tls-cert"));
        assert!(parse(&["--tls-cert", "c", "--tls-key", "k", "--tls", "internal"]).is_err());
        assert!(parse(&["--tls-san", "berth.example"])
            .unwrap_err()
            .contains("--tls"));
        assert!(parse(&["--insecure-http", "--tls", "internal"]).is_err());
        assert!(parse(&["--insecure-http", "--tls-cert", "c", "--tls-key", "k"]).is_err());
        let sans = parse(&[
            "--tls",
            "internal",
            "--tls-san",
            "a.example,10.0.0.5",
            "--tls-san",
            "b",
        ])
        .unwrap()
        .tls_san;
        assert_eq!(sans, ["a.example", "10.0.0.5", "b"]);
    }

    #[test]
    fn plain_http_beyond_loopback_needs_the_insecure_flag() {
        let plain = parse(&[]).unwrap();
        assert!(plain
            .check_plain("--listen", addr("127.0.0.1:7474"))
            .is_ok());
        assert!(plain.check_plain("--listen", addr("[::1]:7474")).is_ok());
        for a in ["0.0.0.0:7474", "10.1.2.3:7474", "[::]:7474"] {
            let e = plain.check_plain("--hooks-listen", addr(a)).unwrap_err();
            assert!(
                e.contains("--hooks-listen") && e.contains("--insecure-http"),
                "{e}"
            );
        }
        let insecure = parse(&["--insecure-http"]).unwrap();
        assert!(insecure
            .check_plain("--listen", addr("0.0.0.0:7474"))
            .is_ok());
        let tls = parse(&["--tls", "internal"]).unwrap();
        assert!(tls.check_plain("--listen", addr("0.0.0.0:7474")).is_ok());
    }

    #[test]
    fn server_names_cover_loopback_host_listen_and_extra() {
        let names = server_names(
            &[
                addr("10.0.0.7:7474"),
                addr("0.0.0.0:7575"),
                addr("127.0.0.1:1"),
            ],
            Some("node-1"),
            &["berth.example".into(), "NODE-1".into()],
        );
        assert_eq!(
            names,
            [
                "localhost",
                "127.0.0.1",
                "::1",
                "node-1",
                "10.0.0.7",
                "berth.example"
            ]
        );
        // A host name that is no DNS name is left out rather than failing the start.
        assert_eq!(server_names(&[], Some("bad name"), &[]).len(), 3);
    }

    #[test]
    fn san_values_are_checked() {
        for ok in [
            "berth.example",
            "*.berth.example",
            "10.0.0.1",
            "::1",
            "a-b.c",
        ] {
            assert!(check_san(ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            "a b",
            "-a.example",
            "a..b",
            "berth.example/",
            "é.example",
            "*",
        ] {
            let e = check_san(bad).unwrap_err();
            assert!(e.contains("--tls-san"), "{e}");
        }
    }

    #[test]
    fn internal_ca_is_kept_private_reused_and_verifies_what_it_issues() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = InternalCa::load_or_create(dir.path(), "inst").unwrap();
        assert!(!format!("{ca:?}").contains("PRIVATE"));
        let key_file = dir.path().join(CA_KEY_FILE);
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let pem = std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap();
        assert!(pem.starts_with("-----BEGIN CERTIFICATE-----"));

        // A restart reuses the CA: ca.pem is unchanged and verifies the new server certificate.
        let again = InternalCa::load_or_create(dir.path(), "inst").unwrap();
        assert_eq!(
            std::fs::read_to_string(dir.path().join(CA_CERT_FILE)).unwrap(),
            pem
        );
        let (chain, _key) = again
            .issue(&["localhost".into(), "10.0.0.7".into()])
            .unwrap();
        again.check_issued(&chain[0]).unwrap();

        // Another installation's CA does not verify it.
        let other_dir = tempfile::tempdir().unwrap();
        let other = InternalCa::load_or_create(other_dir.path(), "inst").unwrap();
        let e = other.check_issued(&chain[0]).unwrap_err();
        assert!(e.contains("ca.pem") && !e.contains("PRIVATE"), "{e}");

        // A key others can read is refused; a missing key with a ca.pem left is refused.
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = InternalCa::load_or_create(dir.path(), "inst").unwrap_err();
        assert!(e.contains("API CA key") && e.contains("chmod 600"), "{e}");
        std::fs::remove_file(&key_file).unwrap();
        let e = InternalCa::load_or_create(dir.path(), "inst").unwrap_err();
        assert!(e.contains("ca.key") && e.contains("restore"), "{e}");
    }

    /// The names a client checks: the certificate is valid for every SAN it was issued for and
    /// for no other.
    #[test]
    fn issued_certificate_is_valid_for_its_names_only() {
        use rustls::client::danger::ServerCertVerifier;
        let dir = tempfile::tempdir().unwrap();
        let ca = InternalCa::load_or_create(dir.path(), "inst").unwrap();
        let names = server_names(
            &[addr("10.0.0.7:1")],
            Some("node-1"),
            &["berth.example".into()],
        );
        let (chain, _) = ca.issue(&names).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(ca.issuer.der().clone()).unwrap();
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            provider(),
        )
        .build()
        .unwrap();
        let verify = |n: &str| {
            let name = pki_types::ServerName::try_from(n.to_string()).unwrap();
            verifier
                .verify_server_cert(&chain[0], &[], &name, &[], pki_types::UnixTime::now())
                .is_ok()
        };
        for n in [
            "localhost",
            "127.0.0.1",
            "::1",
            "node-1",
            "10.0.0.7",
            "berth.example",
        ] {
            assert!(verify(n), "{n}");
        }
        for n in ["node-2", "10.0.0.8", "other.example"] {
            assert!(!verify(n), "{n}");
        }
    }

    #[test]
    fn operator_identity_errors_name_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = InternalCa::load_or_create(dir.path(), "inst").unwrap();
        let cert = dir.path().join("server.pem");
        let key = dir.path().join("server.key");
        std::fs::write(&cert, &ca.cert_pem).unwrap();
        std::fs::write(&key, "not a key").unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = read_identity(&cert, &key).unwrap_err();
        assert!(e.contains("--tls-key") && e.contains("server.key"), "{e}");
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = read_identity(&cert, &key).unwrap_err();
        assert!(e.contains("readable by everyone"), "{e}");
        let e = read_identity(&key, &key).unwrap_err();
        assert!(
            e.contains("--tls-cert") && e.contains("no PEM certificate"),
            "{e}"
        );
    }

    fn pem(tag: &str, der: &[u8]) -> String {
        let b64 = base64::Engine::encode(&base64::engine::general_purpose::STANDARD, der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {tag}-----\n{}\n-----END {tag}-----\n",
            lines.join("\n")
        )
    }

    /// `--tls-cert`/`--tls-key`: served as given, and no internal CA is made.
    #[tokio::test]
    async fn serves_the_operators_certificate() {
        use std::os::unix::fs::PermissionsExt;
        let issuer_dir = tempfile::tempdir().unwrap();
        let ca = InternalCa::load_or_create(issuer_dir.path(), "someone").unwrap();
        let (chain, key) = ca.issue(&["localhost".into()]).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let (cert_file, key_file) = (dir.path().join("tls.crt"), dir.path().join("tls.key"));
        std::fs::write(&cert_file, pem("CERTIFICATE", &chain[0])).unwrap();
        std::fs::write(&key_file, pem("PRIVATE KEY", key.secret_der())).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let args = parse(&[
            "--tls-cert",
            cert_file.to_str().unwrap(),
            "--tls-key",
            key_file.to_str().unwrap(),
        ])
        .unwrap();
        let data_dir = tempfile::tempdir().unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = tcp.local_addr().unwrap();
        let tls = args
            .server_tls(data_dir.path(), "inst", &[local])
            .unwrap()
            .unwrap();
        assert!(tls.ca_file.is_none());
        assert!(!data_dir.path().join(CA_KEY_FILE).exists());
        let app = axum::Router::new().route("/", axum::routing::get(|| async { "hi" }));
        tokio::spawn(serve(tcp, Some(tls.config), app));
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(ca.cert_pem.as_bytes()).unwrap())
            .build()
            .unwrap();
        let body = client
            .get(format!("https://localhost:{}/", local.port()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "hi");
    }

    /// Over a real socket: HTTPS works with the CA, the handler sees the peer address, and plain
    /// HTTP gets a 400 that says to use https.
    #[tokio::test]
    async fn serves_https_with_the_peer_address_and_tells_plain_http_off() {
        use axum::extract::ConnectInfo;
        let dir = tempfile::tempdir().unwrap();
        let args = parse(&["--tls", "internal"]).unwrap();
        let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let local = tcp.local_addr().unwrap();
        let tls = args
            .server_tls(dir.path(), "inst", &[local])
            .unwrap()
            .unwrap();
        let app = axum::Router::new().route(
            "/peer",
            axum::routing::get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move {
                peer.ip().to_string()
            }),
        );
        tokio::spawn(serve(tcp, Some(tls.config), app));

        let ca = std::fs::read(tls.ca_file.unwrap()).unwrap();
        let client = reqwest::Client::builder()
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .build()
            .unwrap();
        let body = client
            .get(format!("https://localhost:{}/peer", local.port()))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(body, "127.0.0.1");

        let untrusting = reqwest::Client::new();
        let e = untrusting
            .get(format!("https://127.0.0.1:{}/peer", local.port()))
            .send()
            .await
            .unwrap_err();
        assert!(format!("{:?}", e).contains("UnknownIssuer"), "{e:?}");

        let resp = reqwest::get(format!("http://127.0.0.1:{}/peer", local.port()))
            .await
            .unwrap();
        assert_eq!(resp.status(), 400);
        assert!(resp.text().await.unwrap().contains("use an https:// URL"));
    }
}
