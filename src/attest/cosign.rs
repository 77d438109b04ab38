//! Signatures in the form cosign verifies: an ECDSA P-256 key, deterministic
//! (RFC 6979) signatures, the simple-signing payload of `<digest>.sig` and
//! the DSSE envelopes of `<digest>.att`, with no transparency log.

use base64::Engine as _;
use p256::ecdsa::signature::Signer as _;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::{DecodePrivateKey, EncodePublicKey, LineEnding};
use serde_json::json;

use crate::name::Digest;

/// cosign's annotation carrying a layer's signature.
pub const SIGNATURE_ANNOTATION: &str = "dev.cosignproject.cosign/signature";
pub const SIMPLE_SIGNING: &str = "application/vnd.dev.cosign.simplesigning.v1+json";
pub const DSSE_ENVELOPE: &str = "application/vnd.dsse.envelope.v1+json";
pub const IN_TOTO_PAYLOAD: &str = "application/vnd.in-toto+json";

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("reading the signing key {0}: {1}")]
    Read(String, String),
    #[error(
        "the signing key {0} is not an ECDSA P-256 private key in PEM (PKCS#8 `PRIVATE KEY` or SEC1 `EC PRIVATE KEY`, unencrypted): {1}"
    )]
    Parse(String, String),
}

/// The operator's key.
#[derive(Clone)]
pub struct Signer {
    key: SigningKey,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(P-256)")
    }
}

impl Signer {
    /// From PEM text: PKCS#8 (`openssl genpkey`, what `cosign import-key-pair`
    /// takes) or SEC1 (`openssl ecparam -genkey`).
    pub fn from_pem(pem: &str, origin: &str) -> Result<Self, KeyError> {
        let parse = |e: String| KeyError::Parse(origin.to_string(), e);
        let key = if pem.contains("BEGIN EC PRIVATE KEY") {
            let secret = p256::SecretKey::from_sec1_pem(pem).map_err(|e| parse(e.to_string()))?;
            SigningKey::from(secret)
        } else {
            SigningKey::from_pkcs8_pem(pem).map_err(|e| parse(e.to_string()))?
        };
        Ok(Signer { key })
    }

    pub fn from_file(path: &std::path::Path) -> Result<Self, KeyError> {
        let origin = path.display().to_string();
        let pem = std::fs::read_to_string(path)
            .map_err(|e| KeyError::Read(origin.clone(), e.to_string()))?;
        Self::from_pem(&pem, &origin)
    }

    /// ASN.1 DER ECDSA-SHA256 signature, as cosign writes and reads them;
    /// RFC 6979 nonces, so the same bytes always get the same signature.
    pub fn sign(&self, message: &[u8]) -> Vec<u8> {
        let sig: Signature = self.key.sign(message);
        sig.to_der().as_bytes().to_vec()
    }

    /// Whether `signature` (base64 DER, as in cosign's annotation) is this
    /// key's signature of `message`.
    pub fn verifies(&self, message: &[u8], signature: &str) -> bool {
        use base64::Engine as _;
        use p256::ecdsa::signature::Verifier as _;
        let Ok(der) = base64::engine::general_purpose::STANDARD.decode(signature) else {
            return false;
        };
        let Ok(sig) = Signature::from_der(&der) else {
            return false;
        };
        self.key.verifying_key().verify(message, &sig).is_ok()
    }

    /// The public key as `cosign.pub` holds it (SPKI PEM).
    pub fn public_pem(&self) -> String {
        self.key
            .verifying_key()
            .to_public_key_pem(LineEnding::LF)
            .expect("a P-256 public key encodes")
    }
}

/// cosign's simple-signing payload for a manifest digest. The identity is
/// the docker reference the manifest is pulled by (`HOST/REPOSITORY`, see
/// `registry::signatures`), which containers/image checks; cosign checks only
/// the digest.
pub fn simple_signing_payload(identity: &str, digest: &Digest) -> Vec<u8> {
    super::sbom::to_bytes(&json!({
        "critical": {
            "identity": { "docker-reference": identity },
            "image": { "docker-manifest-digest": digest.to_string() },
            "type": "cosign container image signature",
        },
        "optional": null,
    }))
}

/// DSSE's pre-authentication encoding.
pub fn pae(payload_type: &str, payload: &[u8]) -> Vec<u8> {
    let mut out = format!(
        "DSSEv1 {} {} {} ",
        payload_type.len(),
        payload_type,
        payload.len()
    )
    .into_bytes();
    out.extend_from_slice(payload);
    out
}

/// A DSSE envelope of an in-toto statement, signed.
pub fn envelope(signer: &Signer, statement: &[u8]) -> Vec<u8> {
    let b64 = base64::engine::general_purpose::STANDARD;
    let sig = signer.sign(&pae(IN_TOTO_PAYLOAD, statement));
    super::sbom::to_bytes(&json!({
        "payloadType": IN_TOTO_PAYLOAD,
        "payload": b64.encode(statement),
        "signatures": [{ "keyid": "", "sig": b64.encode(sig) }],
    }))
}

pub fn base64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::VerifyingKey;
    use p256::pkcs8::DecodePublicKey;

    // A throwaway key for tests only (openssl genpkey -algorithm EC
    // -pkeyopt ec_paramgen_curve:P-256).
    const KEY: &str = "-----BEGIN PRIVATE KEY-----
MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKHBzuhcTHUeDdxH3
a6a4tgeqGUHT0D235hgq8Yl4TSahRANCAATmnjhLTlEBzFfCYpfypMd0jovwKMFu
g3iHDfVpnIfwWz5Is+XqvP7bDHnsmpIjlgPY1zzDVDPWoPOV+uWYtnMg
-----END PRIVATE KEY-----
";

    #[test]
    fn signatures_are_deterministic_and_verify() {
        let s = Signer::from_pem(KEY, "test").unwrap();
        let a = s.sign(b"payload");
        assert_eq!(a, s.sign(b"payload"), "RFC 6979: same message, same bytes");
        assert_ne!(a, s.sign(b"payloaD"));
        let public = VerifyingKey::from_public_key_pem(&s.public_pem()).unwrap();
        let sig = Signature::from_der(&a).unwrap();
        assert!(public.verify(b"payload", &sig).is_ok());
        assert!(public.verify(b"tampered", &sig).is_err());
    }

    #[test]
    fn bad_keys_are_named() {
        let e = Signer::from_pem("not a key", "/etc/k.pem")
            .unwrap_err()
            .to_string();
        assert!(e.contains("/etc/k.pem") && e.contains("P-256"), "{e}");
    }

    #[test]
    fn pae_is_dsse_v1() {
        assert_eq!(
            pae("application/vnd.in-toto+json", b"{}"),
            b"DSSEv1 28 application/vnd.in-toto+json 2 {}".to_vec()
        );
    }
}
