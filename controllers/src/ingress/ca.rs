//! berth's internal CA for Ingresses with `tls.mode: internal`.
//!
//! berth generates the root once and hands it to the proxy: the key as a Swarm secret, the
//! certificate as a Swarm config. Caddy's PKI app then issues (and renews) the hosts' certificates
//! from it. berth never stores the key itself: it exists only in the moment of generation, in
//! Swarm's encrypted secret store, and inside the proxy. Only the certificate is read back (a Swarm
//! config can be; a secret cannot), to show clients what to trust.

use chrono::Datelike;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

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

/// How long the root is valid. Caddy issues short-lived intermediates and leaves from it.
const ROOT_YEARS: i32 = 10;

/// Generates a root CA (ECDSA P-256) named after the installation.
pub fn generate(instance: &str) -> Result<GeneratedCa, String> {
    let key = KeyPair::generate().map_err(|e| format!("cannot generate the CA key: {e}"))?;
    let mut params = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, format!("berth ingress CA {instance}"));
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
}
