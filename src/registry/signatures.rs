//! cosign signatures and attestations, made when a client asks for them, for
//! the repository it asks under: a `sha256-<hex>.sig` served under `R` says
//! `HOST/R` is `sha256:<hex>` (`critical.identity.docker-reference`), which
//! containers/image (skopeo, podman, CRI-O) checks against the reference it
//! pulled, and cosign ignores. Deterministic (RFC 6979, no clock), so every
//! node and every instance on a shared bucket serves the same bytes without
//! storing any; kept here so that the blobs they name can be fetched.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::http::{header, HeaderMap};
use bytes::Bytes;

use crate::attest::{Attachments, Signer};
use crate::name::Digest;

/// How many signatures are kept; past it the oldest half goes (they are
/// made again when asked for).
const KEEP: usize = 8192;

/// What is signed: a manifest under an identity, as its signature or as
/// its attestations.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Key {
    pub identity: String,
    pub subject: Digest,
    pub attestations: bool,
}

/// A signature (or attestations) manifest and the blobs it names.
#[derive(Debug)]
pub struct Made {
    pub manifest: Bytes,
    pub digest: Digest,
    pub blobs: Vec<(Digest, Bytes)>,
}

impl Made {
    fn of(a: Attachments) -> Made {
        let manifest = Bytes::from(a.manifests.into_iter().next().expect("one manifest"));
        Made {
            digest: Digest::of(&manifest),
            manifest,
            blobs: a
                .blobs
                .into_iter()
                .map(|b| (Digest::of(&b), Bytes::from(b)))
                .collect(),
        }
    }
}

/// A use counter, and each signature with its last use.
type Kept = (u64, HashMap<Key, (u64, Arc<Made>)>);

pub struct Signatures {
    made: Mutex<Kept>,
    limit: usize,
}

impl Default for Signatures {
    fn default() -> Self {
        Signatures::with_limit(KEEP)
    }
}

impl Signatures {
    pub fn with_limit(limit: usize) -> Self {
        Signatures {
            made: Mutex::default(),
            limit,
        }
    }

    pub fn get(&self, key: &Key) -> Option<Arc<Made>> {
        let mut made = self.made.lock().unwrap();
        made.0 += 1;
        let n = made.0;
        made.1.get_mut(key).map(|(used, m)| {
            *used = n;
            m.clone()
        })
    }

    pub fn keep(&self, key: Key, attachments: Attachments) -> Arc<Made> {
        let m = Arc::new(Made::of(attachments));
        let mut made = self.made.lock().unwrap();
        if made.1.len() >= self.limit {
            let mut uses: Vec<u64> = made.1.values().map(|(u, _)| *u).collect();
            uses.sort_unstable();
            let cut = uses[uses.len() / 2];
            made.1.retain(|_, (u, _)| *u > cut);
        }
        made.0 += 1;
        let n = made.0;
        made.1.insert(key, (n, m.clone()));
        m
    }

    /// The signature for `key`, made now when it is not kept.
    pub fn signature(&self, signer: &Signer, key: Key) -> Arc<Made> {
        debug_assert!(!key.attestations);
        if let Some(m) = self.get(&key) {
            return m;
        }
        let made = crate::attest::signature(signer, &key.identity, &key.subject);
        self.keep(key, made)
    }

    /// A signature's or attestations' manifest or blob made under
    /// `identity`, by digest.
    pub fn part(&self, identity: &str, digest: &Digest) -> Option<Part> {
        let made = self.made.lock().unwrap();
        made.1
            .iter()
            .filter(|(k, _)| k.identity == identity)
            .find_map(|(_, (_, m))| m.part(digest))
    }
}

/// A manifest or a blob of a signature.
#[derive(Debug, Clone, PartialEq)]
pub enum Part {
    Manifest(Bytes),
    Blob(Bytes),
}

impl Made {
    pub fn part(&self, digest: &Digest) -> Option<Part> {
        if self.digest == *digest {
            return Some(Part::Manifest(self.manifest.clone()));
        }
        self.blobs
            .iter()
            .find(|(d, _)| d == digest)
            .map(|(_, b)| Part::Blob(b.clone()))
    }
}

/// The docker reference a client pulls `requested` (the repository as its
/// request spelled it) by: the registry's public host when one is set, else
/// the host the client addressed, in lowercase as references are.
pub fn identity(public_host: Option<&str>, headers: &HeaderMap, requested: &str) -> String {
    let host = public_host
        .map(str::to_string)
        .or_else(|| {
            headers
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| "localhost".into());
    format!("{host}/{requested}").to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signer() -> Signer {
        let key = p256::SecretKey::from_slice(&[7u8; 32]).unwrap();
        use p256::pkcs8::EncodePrivateKey;
        let pem = key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF).unwrap();
        Signer::from_pem(&pem, "test").unwrap()
    }

    #[test]
    fn the_identity_is_where_the_client_pulls_from() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "127.0.0.1:5000".parse().unwrap());
        assert_eq!(
            identity(None, &h, "shell/hello"),
            "127.0.0.1:5000/shell/hello"
        );
        assert_eq!(
            identity(Some("Registry.Example:443"), &h, "niximage/ns/App"),
            "registry.example:443/niximage/ns/app"
        );
        assert_eq!(
            identity(None, &HeaderMap::new(), "hello"),
            "localhost/hello"
        );
    }

    #[test]
    fn signatures_are_made_once_per_identity_and_name_their_blobs() {
        let s = signer();
        let sigs = Signatures::default();
        let subject = Digest::of(b"manifest");
        let key = |identity: &str| Key {
            identity: identity.into(),
            subject: subject.clone(),
            attestations: false,
        };
        let a = sigs.signature(&s, key("h/shell/hello"));
        let again = sigs.signature(&s, key("h/shell/hello"));
        assert!(Arc::ptr_eq(&a, &again), "kept");
        let b = sigs.signature(&s, key("h/hello/shell"));
        assert_ne!(a.digest, b.digest, "each repository its own identity");
        // The same bytes, made afresh (another node, a restart).
        let fresh = Signatures::default().signature(&s, key("h/shell/hello"));
        assert_eq!(fresh.manifest, a.manifest);
        let payload = &a.blobs[0];
        assert_eq!(
            sigs.part("h/shell/hello", &payload.0),
            Some(Part::Blob(payload.1.clone()))
        );
        assert_eq!(
            sigs.part("h/shell/hello", &a.digest),
            Some(Part::Manifest(a.manifest.clone()))
        );
        assert_eq!(sigs.part("h/other", &payload.0), None);
        let v: serde_json::Value = serde_json::from_slice(&payload.1).unwrap();
        assert_eq!(
            v["critical"]["identity"]["docker-reference"],
            "h/shell/hello"
        );
        assert_eq!(
            v["critical"]["image"]["docker-manifest-digest"],
            subject.to_string()
        );
    }

    #[test]
    fn the_oldest_half_goes_past_the_limit() {
        let s = signer();
        let sigs = Signatures::with_limit(16);
        for i in 0..17 {
            sigs.signature(
                &s,
                Key {
                    identity: format!("h/{i}"),
                    subject: Digest::of(b"m"),
                    attestations: false,
                },
            );
        }
        let kept = sigs.made.lock().unwrap().1.len();
        assert!(kept <= 10, "{kept}");
        assert!(sigs
            .get(&Key {
                identity: "h/16".into(),
                subject: Digest::of(b"m"),
                attestations: false
            })
            .is_some());
    }
}
