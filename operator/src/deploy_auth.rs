//! Authentication of deploy events on the bus. Anyone who can publish on `berth.deploy.<service>`
//! used to be able to set any image on any service; now the webhook bridge signs every event it
//! publishes and the deploy applier refuses events without a valid signature. Both run in the API
//! server, the only process that holds the master key, so nothing else on the bus can sign.
//!
//! The signature is HMAC-SHA256 over [`DeployEvent::signed_bytes`] (every field but the signature,
//! in a canonical length-prefixed encoding), as lowercase hex in `DeployEvent::signature`. The key
//! is derived from the master key for this purpose alone — `HMAC-SHA256(master, "berth deploy
//! events v1")` — so a signature reveals nothing about the key that seals Secrets, and the master
//! key is never used directly.

use berth_api_types::deploy::DeployEvent;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Names what the derived key is for; a new layout of signed events gets a new label (and key).
const PURPOSE: &[u8] = b"berth deploy events v1";

/// The key that signs and verifies deploy events. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub struct DeployKey([u8; 32]);

impl std::fmt::Debug for DeployKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeployKey(<derived>)")
    }
}

/// Why an event's signature does not hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    /// Not hex of the right length, or not the HMAC of this event under this installation's key.
    Wrong,
}

impl DeployKey {
    /// Derives the deploy key from the master key's bytes (a PRF keyed with the master key over a
    /// fixed label: stable across restarts, distinct from the master key and from other uses).
    pub fn derive(master: &[u8; 32]) -> Self {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(master).expect("HMAC takes keys of any length");
        mac.update(PURPOSE);
        DeployKey(mac.finalize().into_bytes().into())
    }

    fn mac(&self, ev: &DeployEvent) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(&ev.signed_bytes());
        mac
    }

    /// The signature of `ev` as it is now (its own `signature` field is not covered).
    pub fn signature(&self, ev: &DeployEvent) -> String {
        hex::encode(self.mac(ev).finalize().into_bytes())
    }

    /// Sets `ev.signature`; the last thing to do before publishing, as any later change voids it.
    pub fn sign(&self, ev: &mut DeployEvent) {
        ev.signature = Some(self.signature(ev));
    }

    /// Checks `ev.signature` in constant time.
    pub fn verify(&self, ev: &DeployEvent) -> Result<(), SignatureError> {
        let given = ev.signature.as_deref().ok_or(SignatureError::Missing)?;
        let given = hex::decode(given.trim()).map_err(|_| SignatureError::Wrong)?;
        let expected = self.mac(ev).finalize().into_bytes();
        if given.len() == expected.len() && bool::from(given.ct_eq(&expected)) {
            Ok(())
        } else {
            Err(SignatureError::Wrong)
        }
    }

    #[cfg(test)]
    pub(crate) fn bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use berth_api_types::deploy::DeploySource;

    fn event() -> DeployEvent {
        DeployEvent {
            id: "01J0000000000000000000000A".into(),
            service: "web".into(),
            image: "127.0.0.1:5000/team/app:2".into(),
            tag: Some("2".into()),
            digest: None,
            source: DeploySource::Webhook,
            time: "2024-05-01T10:00:00.5Z".parse().unwrap(),
            instance: Some("inst".into()),
            signature: None,
        }
    }

    #[test]
    fn signature_round_trips_through_the_bus_encoding() {
        let key = DeployKey::derive(&[7u8; 32]);
        let mut ev = event();
        assert_eq!(key.verify(&ev), Err(SignatureError::Missing));
        key.sign(&mut ev);
        assert_eq!(key.verify(&ev), Ok(()));
        let sig = ev.signature.clone().unwrap();
        assert_eq!(sig.len(), 64, "hex of 32 bytes: {sig}");
        let back: DeployEvent = serde_json::from_slice(&serde_json::to_vec(&ev).unwrap()).unwrap();
        assert_eq!(key.verify(&back), Ok(()));
        // Upper-case hex is the same bytes.
        let mut upper = back.clone();
        upper.signature = Some(sig.to_uppercase());
        assert_eq!(key.verify(&upper), Ok(()));
    }

    /// One change an attacker might make to a signed event.
    type Tamper = fn(&mut DeployEvent);

    #[test]
    fn each_tampered_field_voids_the_signature() {
        let key = DeployKey::derive(&[7u8; 32]);
        let mut signed = event();
        key.sign(&mut signed);
        let tamper: Vec<(&str, Tamper)> = vec![
            ("id", |e| e.id = "01J0000000000000000000000B".into()),
            ("service", |e| e.service = "api".into()),
            ("image", |e| e.image = "evil.example/team/app:2".into()),
            ("tag", |e| e.tag = Some("3".into())),
            ("tag removed", |e| e.tag = None),
            ("digest", |e| {
                e.digest = Some(format!("sha256:{}", "a".repeat(64)))
            }),
            ("source", |e| e.source = DeploySource::Registry),
            ("time", |e| e.time += chrono::Duration::nanoseconds(1)),
            ("instance", |e| e.instance = Some("other".into())),
            ("instance removed", |e| e.instance = None),
            ("signature", |e| {
                let mut s = e.signature.take().unwrap().into_bytes();
                s[0] = if s[0] == b'0' { b'1' } else { b'0' };
                e.signature = Some(String::from_utf8(s).unwrap());
            }),
            ("signature truncated", |e| {
                e.signature.as_mut().unwrap().truncate(62);
            }),
            ("signature not hex", |e| e.signature = Some("zz".repeat(32))),
            ("signature empty", |e| e.signature = Some(String::new())),
        ];
        for (what, change) in tamper {
            let mut e = signed.clone();
            change(&mut e);
            assert_eq!(key.verify(&e), Err(SignatureError::Wrong), "{what}");
        }
        assert_eq!(key.verify(&signed), Ok(()));
    }

    #[test]
    fn another_installation_key_does_not_verify() {
        let mut ev = event();
        DeployKey::derive(&[1u8; 32]).sign(&mut ev);
        assert_eq!(
            DeployKey::derive(&[2u8; 32]).verify(&ev),
            Err(SignatureError::Wrong)
        );
    }

    #[test]
    fn key_derivation_is_stable_and_not_the_master_key() {
        let master = [9u8; 32];
        let a = DeployKey::derive(&master);
        assert_eq!(a.bytes(), DeployKey::derive(&master).bytes());
        assert_ne!(a.bytes(), &master);
        assert_ne!(a.bytes(), DeployKey::derive(&[8u8; 32]).bytes());
        // Pinned, so a change of the derivation (which would void every queued event) is noticed:
        // printf 'berth deploy events v1' | openssl dgst -sha256 -mac HMAC -macopt hexkey:0909...09
        assert_eq!(
            hex::encode(a.bytes()),
            PINNED_DERIVATION,
            "the deploy key derivation changed"
        );
        assert!(!format!("{a:?}").contains(&hex::encode(a.bytes())));
    }

    const PINNED_DERIVATION: &str =
        "b7f8e402ad5427c6e910aa2edbc7dc96ecf9ad9badfb6bd26005840358cfd445";
}
