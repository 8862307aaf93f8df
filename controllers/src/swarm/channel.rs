//! The one-time encrypted channel between berth (on a manager) and an agent task it started on
//! another node (see [`agent_task`](super::agent_task)): a volume's data for a backup or restore,
//! or a command's terminal for `berth exec`. Both are user data, often health data: they never
//! cross the network in clear, and nobody but the agent berth started for this job can connect.
//!
//! - berth listens on its node's swarm address, on a port of its own (ephemeral by default), with
//!   a certificate generated for this transfer alone (ECDSA P-256, never written to disk);
//! - the agent learns the address, that certificate and a 256-bit token from a [`Grant`], which
//!   berth hands it as a Swarm secret (mounted at a file, never in the service's spec, env or
//!   command line, so `docker service inspect` shows none of it);
//! - the agent accepts exactly that certificate (pinned: no CA, no names), sends the token, and
//!   berth answers `OK` to the first connection with the right token and operation; wrong ones
//!   are dropped and counted. Then the listener is closed: one transfer, one connection.
//!
//! TLS 1.3 only, ring as the provider (the one reqwest already brings).

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::io::{self, Read, Write};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName,
};

/// The name in the one-time certificate. Nothing checks it (the certificate is pinned); it says
/// what the certificate is for to whoever looks.
const CERT_NAME: &str = "transfer.berth.invalid";
/// How long a connecting peer has to finish TLS and send its hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(15);
/// Connections with a wrong token (scanners, strays) tolerated before the transfer is refused.
const MAX_BAD_HELLOS: u32 = 16;
/// The protocol's first words: version 1.
const MAGIC: &str = "BERTH-TRANSFER/1";

/// Which way the volume's data flows, named from the agent's side.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Op {
    /// The agent reads its volume and sends it (a backup).
    Send,
    /// The agent receives a tar and unpacks it into its volume (a restore).
    Receive,
    /// The agent runs a command in a container of its node and carries its terminal
    /// (`berth exec` to a task on another node).
    Exec,
}

impl Op {
    pub fn word(self) -> &'static str {
        match self {
            Op::Send => "send",
            Op::Receive => "receive",
            Op::Exec => "exec",
        }
    }
}

/// What an agent needs to reach berth: delivered as the content of a Swarm secret. Secret: its
/// `Debug` shows neither the token nor the certificate.
#[derive(Clone, Serialize, Deserialize)]
pub struct Grant {
    pub op: Op,
    /// `ip:port` berth listens on.
    pub addr: SocketAddr,
    /// The one-time certificate, DER, base64.
    pub cert: String,
    /// 32 random bytes, hex.
    pub token: String,
    /// Unix seconds after which the agent gives up, whatever it is doing.
    pub deadline: u64,
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("op", &self.op)
            .field("addr", &self.addr)
            .field("deadline", &self.deadline)
            .finish_non_exhaustive()
    }
}

impl Grant {
    /// An agent's grant from its file (the Swarm secret), checked to be for `op`. The error is for
    /// the agent's log: it never holds the grant's content.
    pub fn read(path: &std::path::Path, op: Op) -> Result<Grant, String> {
        let bytes = std::fs::read(path)
            .map_err(|e| format!("cannot read the grant {}: {e}", path.display()))?;
        let grant: Grant = serde_json::from_slice(&bytes)
            .map_err(|e| format!("the grant {} is not valid: {e}", path.display()))?;
        if grant.op != op {
            return Err(format!(
                "the grant is for `{}`, not `{}`",
                grant.op.word(),
                op.word()
            ));
        }
        Ok(grant)
    }
}

/// The agent's watchdog: exits the process at `deadline` (unix seconds) whatever it is doing, so
/// a stuck agent cannot hold a volume or a terminal open past the job's end.
pub fn exit_at_deadline(deadline: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let left = Duration::from_secs(deadline.saturating_sub(now));
    std::thread::spawn(move || {
        std::thread::sleep(left);
        eprintln!("berth agent: the job's deadline has passed; giving up");
        std::process::exit(3);
    });
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("transfer channel: {0}")]
    Io(#[from] io::Error),
    #[error("transfer channel: TLS: {0}")]
    Tls(#[from] rustls::Error),
    #[error("transfer channel: cannot generate the one-time certificate: {0}")]
    Cert(#[from] rcgen::Error),
    #[error("transfer channel: {MAX_BAD_HELLOS} connections without the transfer's token; refusing the transfer")]
    TooManyStrangers,
    #[error("transfer channel: {0}")]
    Protocol(String),
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// berth's side: a listener for one agent.
pub struct Listener {
    tcp: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    cert_der: Vec<u8>,
    token: [u8; 32],
    op: Op,
}

impl Listener {
    /// Listens on `ip:port` (`port` 0: any free port) for an agent doing `op`.
    pub async fn bind(ip: IpAddr, port: u16, op: Op) -> Result<Self, ChannelError> {
        let ck = rcgen::generate_simple_self_signed(vec![CERT_NAME.to_string()])?;
        let cert_der = ck.cert.der().to_vec();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_no_client_auth()
            .with_single_cert(vec![CertificateDer::from(cert_der.clone())], key)?;
        let mut token = [0u8; 32];
        rand_bytes(&mut token)?;
        Ok(Listener {
            tcp: TcpListener::bind(SocketAddr::new(ip, port)).await?,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(config)),
            cert_der,
            token,
            op,
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.tcp.local_addr()
    }

    /// What the agent must be given (secret: hand it over only as a Swarm secret).
    pub fn grant(&self, deadline: u64) -> io::Result<Grant> {
        Ok(Grant {
            op: self.op,
            addr: self.local_addr()?,
            cert: base64::engine::general_purpose::STANDARD.encode(&self.cert_der),
            token: hex::encode(self.token),
            deadline,
        })
    }

    /// Waits for the agent: the first connection that completes TLS and sends this transfer's
    /// operation and token. The listener is closed when this returns (it is consumed).
    pub async fn accept(self) -> Result<tokio_rustls::server::TlsStream<TcpStream>, ChannelError> {
        let want = format!("{MAGIC} {} {}\n", self.op.word(), hex::encode(self.token));
        let mut bad = 0;
        loop {
            let (tcp, peer) = self.tcp.accept().await?;
            let attempt = async {
                let mut tls = self.acceptor.accept(tcp).await?;
                // Byte by byte: a buffered reader would swallow the data that follows the hello.
                let mut line = Vec::with_capacity(128);
                let mut byte = [0u8; 1];
                while line.len() < 256 && line.last() != Some(&b'\n') {
                    if tls.read(&mut byte).await? == 0 {
                        break;
                    }
                    line.push(byte[0]);
                }
                let ok: bool = line.as_slice().ct_eq(want.as_bytes()).into();
                if !ok {
                    return Ok::<_, io::Error>(None);
                }
                tls.write_all(b"OK\n").await?;
                tls.flush().await?;
                Ok(Some(tls))
            };
            match tokio::time::timeout(HELLO_TIMEOUT, attempt).await {
                Ok(Ok(Some(tls))) => return Ok(tls),
                // Never echo what a stranger sent: it may be a mistyped token.
                Ok(Ok(None)) => {
                    tracing::warn!(%peer, "transfer channel: a connection without this transfer's token; dropped")
                }
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "transfer channel: a connection failed before its hello; dropped")
                }
                Err(_) => {
                    tracing::warn!(%peer, "transfer channel: a connection sent no hello in time; dropped")
                }
            }
            bad += 1;
            if bad >= MAX_BAD_HELLOS {
                return Err(ChannelError::TooManyStrangers);
            }
        }
    }
}

/// Random bytes from the TLS provider's system random source.
fn rand_bytes(buf: &mut [u8]) -> io::Result<()> {
    provider()
        .secure_random
        .fill(buf)
        .map_err(|_| io::Error::other("no system randomness"))
}

/// The agent's side: a blocking TLS stream (the agent is one process doing one thing).
pub type AgentStream = rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream>;

/// The hello an agent sends and the TLS settings that accept only the grant's certificate.
fn client_side(grant: &Grant) -> Result<(Arc<rustls::ClientConfig>, String), ChannelError> {
    let pinned = base64::engine::general_purpose::STANDARD
        .decode(&grant.cert)
        .map_err(|_| ChannelError::Protocol("the grant's certificate is not base64".into()))?;
    let token = hex::decode(&grant.token)
        .map_err(|_| ChannelError::Protocol("the grant's token is not hex".into()))?;
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(Pinned {
            der: pinned,
            provider: provider(),
        }))
        .with_no_client_auth();
    let hello = format!("{MAGIC} {} {}\n", grant.op.word(), hex::encode(token));
    Ok((Arc::new(config), hello))
}

fn refused() -> ChannelError {
    ChannelError::Protocol("berth did not accept this agent (a stale or foreign grant?)".into())
}

/// Connects to berth as the grant says, checks berth's certificate is the pinned one, sends the
/// hello and waits for `OK`.
pub fn connect(grant: &Grant, io_timeout: Duration) -> Result<AgentStream, ChannelError> {
    let (config, hello) = client_side(grant)?;
    let name = ServerName::try_from(CERT_NAME).expect("a valid DNS name");
    let conn = rustls::ClientConnection::new(config, name)?;
    let tcp = std::net::TcpStream::connect_timeout(&grant.addr, io_timeout)?;
    tcp.set_read_timeout(Some(io_timeout))?;
    tcp.set_write_timeout(Some(io_timeout))?;
    tcp.set_nodelay(true)?;
    let mut s = rustls::StreamOwned::new(conn, tcp);
    s.write_all(hello.as_bytes())?;
    s.flush()?;
    // Byte by byte: what follows `OK` is the transfer's data.
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 16 && line.last() != Some(&b'\n') {
        if s.read(&mut byte)? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    if line != b"OK\n" {
        return Err(refused());
    }
    Ok(s)
}

/// [`connect`] for an agent that streams both ways at once (exec: input and output interleave,
/// for as long as a person types), on tokio. No I/O timeout: an interactive shell may sit idle.
pub async fn connect_async(
    grant: &Grant,
    connect_timeout: Duration,
) -> Result<tokio_rustls::client::TlsStream<TcpStream>, ChannelError> {
    let (config, hello) = client_side(grant)?;
    let name = ServerName::try_from(CERT_NAME).expect("a valid DNS name");
    let tcp = tokio::time::timeout(connect_timeout, TcpStream::connect(grant.addr))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "connecting to berth"))??;
    tcp.set_nodelay(true)?;
    let mut s = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await?;
    s.write_all(hello.as_bytes()).await?;
    s.flush().await?;
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    while line.len() < 16 && line.last() != Some(&b'\n') {
        if s.read(&mut byte).await? == 0 {
            break;
        }
        line.push(byte[0]);
    }
    if line != b"OK\n" {
        return Err(refused());
    }
    Ok(s)
}

/// Ends the agent's sending side properly: TLS close_notify (so berth can tell a complete stream
/// from a cut one), then TCP half-close. Reading stays possible.
pub fn finish_sending(s: &mut AgentStream) -> io::Result<()> {
    s.conn.send_close_notify();
    s.flush()?;
    // The close_notify is out: that is what berth waits for. A peer that has already closed its
    // end (it had all it needed) makes the half-close fail with ENOTCONN; that is no failure.
    let _ = s.sock.shutdown(std::net::Shutdown::Write);
    Ok(())
}

/// Accepts exactly one certificate, byte for byte; the handshake signature is still checked
/// against it, so only the holder of the one-time key can pass.
#[derive(Debug)]
struct Pinned {
    der: Vec<u8>,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl rustls::client::danger::ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        if intermediates.is_empty() && end_entity.as_ref() == self.der.as_slice() {
            Ok(rustls::client::danger::ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::UnknownIssuer,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn listener(op: Op) -> Listener {
        Listener::bind("127.0.0.1".parse().unwrap(), 0, op)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_right_agent_gets_through_and_strangers_do_not() {
        let l = listener(Op::Send).await;
        let grant = l.grant(u64::MAX).unwrap();
        assert!(
            !format!("{grant:?}").contains(&grant.token),
            "Debug hides the token"
        );
        let server = tokio::spawn(async move {
            let mut s = l.accept().await.unwrap();
            let mut got = Vec::new();
            s.read_to_end(&mut got).await.unwrap();
            got
        });
        let g = grant.clone();
        let agent = tokio::task::spawn_blocking(move || {
            // A wrong token first: dropped, and the listener keeps waiting.
            let mut wrong = g.clone();
            wrong.token = hex::encode([0u8; 32]);
            assert!(connect(&wrong, Duration::from_secs(5)).is_err());
            // The wrong operation with the right token: dropped too.
            let mut other = g.clone();
            other.op = Op::Receive;
            assert!(connect(&other, Duration::from_secs(5)).is_err());
            let mut s = connect(&g, Duration::from_secs(5)).unwrap();
            s.write_all(b"volume data").unwrap();
            finish_sending(&mut s).unwrap();
        });
        agent.await.unwrap();
        assert_eq!(server.await.unwrap(), b"volume data");
    }

    #[tokio::test]
    async fn an_agent_refuses_any_other_certificate() {
        let real = listener(Op::Send).await;
        let other = listener(Op::Send).await;
        // The real listener's address, another transfer's certificate.
        let mut g = real.grant(u64::MAX).unwrap();
        g.cert = other.grant(u64::MAX).unwrap().cert;
        let server = tokio::spawn(async move {
            tokio::time::timeout(Duration::from_secs(3), real.accept()).await
        });
        let err =
            tokio::task::spawn_blocking(move || connect(&g, Duration::from_secs(5)).map(|_| ()))
                .await
                .unwrap()
                .unwrap_err();
        assert!(
            err.to_string().contains("certificate") || err.to_string().contains("Certificate"),
            "{err}"
        );
        assert!(server.await.unwrap().is_err(), "nothing was accepted");
    }
}
