//! berth's internal CA for Ingresses with `tls.mode: internal`.
//!
//! berth generates the root once and hands it to the proxy: the key as a Swarm secret, the
//! certificate as a Swarm config. Caddy's PKI app then issues (and renews) the hosts' certificates
//! from it. berth never stores the key itself: it exists only in the moment of generation, in
//! Swarm's encrypted secret store, and inside the proxy. Only the certificate is read back (a Swarm
//! config can be; a secret cannot), to show clients what to trust.

use base64::Engine;
use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::Path;

/// A freshly generated root: PEM certificate and PEM private key.
pub struct GeneratedCa {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Hand-written so the key never reaches a log.
impl std::fmt::Debug for GeneratedCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GeneratedCa").finish_non_exhaustive()
    }
}

/// How long a root is valid. Caddy issues short-lived intermediates and leaves from it; the API's
/// CA issues its server certificate anew at every start.
const ROOT_YEARS: i32 = 10;

/// The parameters of a berth root CA named `common_name`: the ingress CA here, and the API's own
/// CA (`berth up --tls internal`). Only the name, key usages and constraints go into what a
/// certificate issued from it says about its issuer, so a root rebuilt from the same name and key
/// issues certificates that the first one verifies.
pub fn root_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn.push(DnType::OrganizationName, "berth");
    params.distinguished_name = dn;
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    // From the start of today (UTC), so a clock a little behind the proxy's does not matter.
    let today = chrono::Utc::now().date_naive();
    params.not_before = rcgen::date_time_ymd(today.year(), today.month() as u8, today.day() as u8);
    params.not_after = rcgen::date_time_ymd(today.year() + ROOT_YEARS, today.month() as u8, 1);
    params
}

/// Generates a root CA (ECDSA P-256) named after the installation.
pub fn generate(instance: &str) -> Result<GeneratedCa, String> {
    let key = KeyPair::generate().map_err(|e| format!("cannot generate the CA key: {e}"))?;
    let params = root_params(&format!("berth ingress CA {instance}"));
    let cert = params
        .self_signed(&key)
        .map_err(|e| format!("cannot sign the CA certificate: {e}"))?;
    Ok(GeneratedCa {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
    })
}

/// Short id of a CA, from its certificate: links the Swarm config and secret of one root.
pub fn ca_id(cert_pem: &str) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(&Sha256::digest(cert_pem.as_bytes())[..6])
}

/// berth's client identity for the proxies' admin endpoints: a self-signed certificate (what the
/// proxies' configs name) and its key.
#[derive(Clone)]
pub struct AdminIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

/// Hand-written so the key never reaches a log.
impl std::fmt::Debug for AdminIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminIdentity").finish_non_exhaustive()
    }
}

/// How long berth's admin client certificate is valid. Caddy checks the client's public key, and
/// Go's verifier also the validity period, so it must outlive the installation's ordinary life.
const CLIENT_YEARS: i32 = 20;

impl AdminIdentity {
    /// A fresh identity (ECDSA P-256), named after the installation.
    pub fn generate(instance: &str) -> Result<AdminIdentity, String> {
        let key = KeyPair::generate()
            .map_err(|e| format!("cannot generate the admin client key: {e}"))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(
            DnType::CommonName,
            format!("berth ingress admin {instance}"),
        );
        dn.push(DnType::OrganizationName, "berth");
        params.distinguished_name = dn;
        params.is_ca = IsCa::NoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let today = chrono::Utc::now().date_naive();
        params.not_before =
            rcgen::date_time_ymd(today.year(), today.month() as u8, today.day() as u8);
        params.not_after =
            rcgen::date_time_ymd(today.year() + CLIENT_YEARS, today.month() as u8, 1);
        let cert = params
            .self_signed(&key)
            .map_err(|e| format!("cannot sign the admin client certificate: {e}"))?;
        Ok(AdminIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// The identity kept in `path` (key and certificate in one PEM file), created with mode 0600 on
    /// first use. A file others can read is refused, as berth's master key is.
    pub fn load_or_create(path: &Path, instance: &str) -> Result<AdminIdentity, String> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let shown = path.display();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let mode = std::fs::metadata(path)
                    .map_err(|e| format!("cannot read {shown}: {e}"))?
                    .permissions()
                    .mode();
                if mode & 0o077 != 0 {
                    return Err(format!(
                        "{shown} (berth's ingress admin key) is readable by others (mode {:o}); chmod 600 it",
                        mode & 0o777
                    ));
                }
                let block = |tag: &str| {
                    let begin = format!("-----BEGIN {tag}-----");
                    let end = format!("-----END {tag}-----");
                    let start = text.find(&begin)?;
                    let stop = text[start..].find(&end)? + start + end.len();
                    Some(format!("{}\n", &text[start..stop]))
                };
                match (block("PRIVATE KEY"), block("CERTIFICATE")) {
                    (Some(key_pem), Some(cert_pem)) => Ok(AdminIdentity { cert_pem, key_pem }),
                    _ => Err(format!(
                        "{shown} does not hold a private key and a certificate; remove it to make a new one"
                    )),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = AdminIdentity::generate(instance)?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir)
                        .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                }
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("cannot create {shown}: {e}"))?;
                std::io::Write::write_all(&mut f, id.pem_file().as_bytes())
                    .map_err(|e| format!("cannot write {shown}: {e}"))?;
                f.set_permissions(std::fs::Permissions::from_mode(0o600))
                    .map_err(|e| format!("cannot write {shown}: {e}"))?;
                Ok(id)
            }
            Err(e) => Err(format!("cannot read {shown}: {e}")),
        }
    }

    /// Key and certificate in one PEM text (what a TLS client identity is read from).
    pub fn pem_file(&self) -> String {
        format!("{}{}", self.key_pem, self.cert_pem)
    }

    /// The certificate as base64 DER: how Caddy's `access_control.public_keys` names it.
    pub fn certificate_base64(&self) -> String {
        let body: String = self
            .cert_pem
            .lines()
            .filter(|l| !l.starts_with("-----"))
            .collect();
        // Normalised through a decode, so a stray space never ends up in the proxy's config.
        base64::engine::general_purpose::STANDARD
            .decode(body.trim())
            .map(|der| base64::engine::general_purpose::STANDARD.encode(der))
            .unwrap_or(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_root() {
        let ca = generate("inst-1").unwrap();
        assert!(ca.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        assert!(ca.key_pem.contains("PRIVATE KEY-----"));
        assert_eq!(format!("{ca:?}"), "GeneratedCa { .. }");
        assert_eq!(ca_id(&ca.cert_pem).len(), 12);
        assert_ne!(
            ca_id(&ca.cert_pem),
            ca_id(&generate("inst-1").unwrap().cert_pem)
        );
    }

    #[test]
    fn admin_identity_is_kept_private_and_read_back() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("ingress-admin.pem");
        let made = AdminIdentity::load_or_create(&path, "inst").unwrap();
        assert_eq!(format!("{made:?}"), "AdminIdentity { .. }");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = AdminIdentity::load_or_create(&path, "inst").unwrap();
        assert_eq!(again.cert_pem, made.cert_pem);
        assert_eq!(again.key_pem, made.key_pem);
        let b64 = made.certificate_base64();
        assert!(!b64.contains('\n') && b64.len() > 100, "{b64}");
        assert!(reqwest::Identity::from_pem(made.pem_file().as_bytes()).is_ok());

        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = AdminIdentity::load_or_create(&path, "inst").unwrap_err();
        assert!(e.contains("readable by others"), "{e}");
        assert!(!e.contains("PRIVATE"), "no key material in errors");
        std::fs::write(&path, "nothing").unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(AdminIdentity::load_or_create(&path, "inst").is_err());
    }
}
