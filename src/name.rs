//! Parses registry paths (`/v2/...`) into validated requests before anything
//! else touches them, so no later stage sees an unchecked name or digest.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// Reserved first component for NixImage objects: never a package name.
pub const NIXIMAGE_PREFIX: &str = "niximage";
/// Meta-package: bash, coreutils and the usual interactive tools.
pub const META_SHELL: &str = "shell";
/// Meta-package: build for aarch64-linux instead of the host.
pub const META_ARM64: &str = "arm64";

const MAX_COMPONENT: usize = 255;
const MAX_COMPONENTS: usize = 64;
const MAX_TAG: usize = 128;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("invalid repository name: {0}")]
    InvalidName(String),
    #[error("invalid tag: {0}")]
    InvalidTag(String),
    #[error("invalid digest: {0}")]
    InvalidDigest(String),
    #[error("no such endpoint")]
    NotFound,
}

/// A `sha256:<64 hex>` content digest; the only algorithm we produce.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(String);

impl Digest {
    /// Digest of a byte string.
    pub fn of(bytes: &[u8]) -> Self {
        use sha2::Digest as _;
        Self::from_sha256(sha2::Sha256::digest(bytes).into())
    }
    pub fn from_sha256(raw: [u8; 32]) -> Self {
        Digest(format!("sha256:{}", hex::encode(raw)))
    }
    /// The hex part, safe to use as a file name (validated on construction).
    pub fn hex(&self) -> &str {
        &self.0["sha256:".len()..]
    }
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Digest {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, NameError> {
        let hex = s
            .strip_prefix("sha256:")
            .ok_or_else(|| NameError::InvalidDigest(printable(s)))?;
        if hex.len() == 64
            && hex
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            Ok(Digest(s.to_string()))
        } else {
            Err(NameError::InvalidDigest(printable(s)))
        }
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Target architecture of an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Arch {
    Amd64,
    Arm64,
}

impl Arch {
    pub fn host() -> Self {
        if cfg!(target_arch = "aarch64") {
            Arch::Arm64
        } else {
            Arch::Amd64
        }
    }
    /// The Nix system double.
    pub fn nix_system(self) -> &'static str {
        match self {
            Arch::Amd64 => "x86_64-linux",
            Arch::Arm64 => "aarch64-linux",
        }
    }
    /// The OCI architecture name.
    pub fn oci(self) -> &'static str {
        match self {
            Arch::Amd64 => "amd64",
            Arch::Arm64 => "arm64",
        }
    }
    /// Every architecture images are built for, host first.
    pub fn all() -> [Arch; 2] {
        match Arch::host() {
            Arch::Amd64 => [Arch::Amd64, Arch::Arm64],
            Arch::Arm64 => [Arch::Arm64, Arch::Amd64],
        }
    }
    /// An architecture as people name it: a Nix system (`aarch64-linux`), an
    /// OCI architecture (`arm64`) or platform (`linux/arm64`).
    pub fn parse(s: &str) -> Option<Arch> {
        let s = s.trim();
        let s = s.strip_prefix("linux/").unwrap_or(s);
        Arch::all()
            .into_iter()
            .find(|a| s == a.nix_system() || s == a.oci())
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.nix_system())
    }
}

/// An ad-hoc image: the sorted, de-duplicated package names of its path, with
/// the meta-packages taken out as flags.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdHocImage {
    pub packages: BTreeSet<String>,
    pub shell: bool,
    pub arch: Arch,
}

impl AdHocImage {
    /// The canonical repository name: sorted components, metas included.
    pub fn name(&self) -> String {
        let mut parts: BTreeSet<&str> = self.packages.iter().map(String::as_str).collect();
        if self.shell {
            parts.insert(META_SHELL);
        }
        if self.arch == Arch::Arm64 {
            parts.insert(META_ARM64);
        }
        parts.into_iter().collect::<Vec<_>>().join("/")
    }
}

/// A repository: an ad-hoc package set or a NixImage object.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Repository {
    AdHoc(AdHocImage),
    Named { namespace: String, name: String },
}

impl Repository {
    pub fn name(&self) -> String {
        match self {
            Repository::AdHoc(img) => img.name(),
            Repository::Named { namespace, name } => {
                format!("{NIXIMAGE_PREFIX}/{namespace}/{name}")
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reference {
    Tag(String),
    Digest(Digest),
}

/// A parsed `/v2/...` request path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Route {
    /// `/v2/`
    Base,
    /// `/v2/_catalog`
    Catalog,
    Manifest {
        repo: Repository,
        reference: Reference,
    },
    Blob {
        repo: Repository,
        digest: Digest,
    },
    /// `/v2/<name>/blobs/uploads/...`: pushes, which this registry refuses.
    Upload {
        repo: Repository,
    },
    Tags {
        repo: Repository,
    },
    /// `/v2/<name>/referrers/<digest>` (content discovery).
    Referrers {
        repo: Repository,
        digest: Digest,
    },
}

/// Parses the part of the path after `/v2/`.
pub fn parse_route(path: &str) -> Result<Route, NameError> {
    if path.is_empty() {
        return Ok(Route::Base);
    }
    if path == "_catalog" {
        return Ok(Route::Catalog);
    }
    let parts: Vec<&str> = path.split('/').collect();
    let n = parts.len();
    // Find the endpoint keyword from the end: the name may hold any component.
    if n >= 3 && parts[n - 2] == "manifests" {
        let repo = parse_repository(&parts[..n - 2])?;
        let reference = parse_reference(parts[n - 1])?;
        return Ok(Route::Manifest { repo, reference });
    }
    if n >= 3 && parts[n - 2] == "blobs" {
        let repo = parse_repository(&parts[..n - 2])?;
        let digest = parts[n - 1].parse()?;
        return Ok(Route::Blob { repo, digest });
    }
    if let Some(i) = parts.iter().rposition(|p| *p == "uploads") {
        if i >= 2 && parts[i - 1] == "blobs" {
            return Ok(Route::Upload {
                repo: parse_repository(&parts[..i - 1])?,
            });
        }
    }
    if n >= 3 && parts[n - 2] == "referrers" {
        let repo = parse_repository(&parts[..n - 2])?;
        let digest = parts[n - 1].parse()?;
        return Ok(Route::Referrers { repo, digest });
    }
    if n >= 3 && parts[n - 2] == "tags" && parts[n - 1] == "list" {
        return Ok(Route::Tags {
            repo: parse_repository(&parts[..n - 2])?,
        });
    }
    Err(NameError::NotFound)
}

/// Decodes percent-escapes in a request path (`%6F` is `o`), before the path
/// is parsed; an escaped slash (`%2F`), which would change the path's
/// structure, and escapes that do not decode to UTF-8 are invalid names.
pub fn decode_path(raw: &str) -> Result<String, NameError> {
    if !raw.contains('%') {
        return Ok(raw.to_string());
    }
    let bad = || NameError::InvalidName(printable(raw));
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = raw.get(i + 1..i + 3).ok_or_else(bad)?;
            let b = u8::from_str_radix(hex, 16).map_err(|_| bad())?;
            if b == b'/' {
                return Err(bad());
            }
            out.push(b);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| bad())
}

pub fn parse_reference(s: &str) -> Result<Reference, NameError> {
    if s.contains(':') {
        return Ok(Reference::Digest(s.parse()?));
    }
    validate_tag(s)?;
    Ok(Reference::Tag(s.to_string()))
}

/// Tags follow the distribution spec: `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`.
pub fn validate_tag(s: &str) -> Result<(), NameError> {
    let ok = !s.is_empty()
        && s.len() <= MAX_TAG
        && s.bytes().enumerate().all(|(i, b)| {
            b.is_ascii_alphanumeric() || b == b'_' || (i > 0 && (b == b'.' || b == b'-'))
        });
    if ok {
        Ok(())
    } else {
        Err(NameError::InvalidTag(printable(s)))
    }
}

/// Parses repository components: `niximage/<ns>/<name>` or package names.
pub fn parse_repository(parts: &[&str]) -> Result<Repository, NameError> {
    let joined = || printable(&parts.join("/"));
    if parts.is_empty() || parts.len() > MAX_COMPONENTS {
        return Err(NameError::InvalidName(joined()));
    }
    if parts[0] == NIXIMAGE_PREFIX {
        return match parts {
            [_, ns, name] if is_dns_label(ns) && is_dns_subdomain(name) => Ok(Repository::Named {
                namespace: ns.to_string(),
                name: name.to_string(),
            }),
            _ => Err(NameError::InvalidName(format!(
                "{}: NixImage names are niximage/<namespace>/<name>",
                joined()
            ))),
        };
    }
    parse_packages(parts)
        .map(Repository::AdHoc)
        .map_err(|e| NameError::InvalidName(format!("{}: {e}", joined())))
}

/// Package names as one image, whether from a URL path or a NixImage's
/// `spec.contents`: each an attribute path, `niximage` never one of them, the
/// meta-packages taken out as flags, the rest sorted and de-duplicated.
pub fn parse_packages<S: AsRef<str>>(parts: &[S]) -> Result<AdHocImage, String> {
    if parts.is_empty() {
        return Err("no packages named".into());
    }
    let mut img = AdHocImage {
        packages: BTreeSet::new(),
        shell: false,
        arch: Arch::host(),
    };
    for part in parts {
        let part = part.as_ref();
        if !is_attr_path(part) || part == NIXIMAGE_PREFIX {
            return Err(format!(
                "'{}' is not a package attribute path",
                printable(part)
            ));
        }
        match part {
            META_SHELL => img.shell = true,
            META_ARM64 => img.arch = Arch::Arm64,
            p => {
                img.packages.insert(p.to_string());
            }
        }
    }
    Ok(img)
}

/// A nixpkgs attribute path: dot-separated identifiers such as
/// `python3Packages.requests` or `iana-etc`. Nothing else gets near Nix.
pub fn is_attr_path(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_COMPONENT
        && s.split('.').all(|ident| {
            let mut bytes = ident.bytes();
            matches!(bytes.next(), Some(b) if b.is_ascii_alphanumeric() || b == b'_')
                && bytes
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'\'' | b'+'))
        })
}

/// RFC 1123 label, as Kubernetes namespaces are.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain, as Kubernetes object names are.
pub fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= 253 && s.split('.').all(is_dns_label)
}

/// A name as it may appear in an error message: odd bytes escaped, length capped.
pub fn printable(s: &str) -> String {
    let mut out: String = s.chars().take(200).flat_map(char::escape_default).collect();
    if s.chars().count() > 200 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn adhoc(path: &str) -> AdHocImage {
        match parse_route(path).unwrap() {
            Route::Manifest {
                repo: Repository::AdHoc(img),
                ..
            } => img,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn components_are_sorted_and_deduplicated() {
        let a = adhoc("shell/curl/manifests/latest");
        let b = adhoc("curl/shell/curl/manifests/latest");
        assert_eq!(a, b);
        assert!(a.shell);
        assert_eq!(a.packages.iter().collect::<Vec<_>>(), vec!["curl"]);
        assert_eq!(a.name(), "curl/shell");
    }

    #[test]
    fn meta_packages_become_flags() {
        let img = adhoc("arm64/git/manifests/latest");
        assert_eq!(img.arch, Arch::Arm64);
        assert!(!img.shell);
        assert_eq!(img.name(), "arm64/git");
    }

    #[test]
    fn attribute_paths_are_one_component() {
        let img = adhoc("python3Packages.requests/manifests/latest");
        assert!(img.packages.contains("python3Packages.requests"));
    }

    #[test]
    fn routes() {
        assert_eq!(parse_route("").unwrap(), Route::Base);
        assert_eq!(parse_route("_catalog").unwrap(), Route::Catalog);
        let d = format!("sha256:{}", "a".repeat(64));
        match parse_route(&format!("shell/blobs/{d}")).unwrap() {
            Route::Blob { digest, .. } => assert_eq!(digest.as_str(), d),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_route("shell/blobs/uploads/").unwrap(),
            Route::Upload { .. }
        ));
        assert!(matches!(
            parse_route("shell/blobs/uploads/abc").unwrap(),
            Route::Upload { .. }
        ));
        assert!(matches!(
            parse_route("shell/tags/list").unwrap(),
            Route::Tags { .. }
        ));
        match parse_route(&format!("curl/manifests/{d}")).unwrap() {
            Route::Manifest {
                reference: Reference::Digest(x),
                ..
            } => assert_eq!(x.as_str(), d),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            parse_route("shell/nothing").unwrap_err(),
            NameError::NotFound
        );
    }

    #[test]
    fn niximage_names() {
        match parse_route("niximage/default/curl-and-jq/manifests/v1").unwrap() {
            Route::Manifest {
                repo: Repository::Named { namespace, name },
                reference,
            } => {
                assert_eq!(
                    (namespace.as_str(), name.as_str()),
                    ("default", "curl-and-jq")
                );
                assert_eq!(reference, Reference::Tag("v1".into()));
            }
            other => panic!("{other:?}"),
        }
        // `niximage` is reserved: never a package, whatever follows.
        for bad in [
            "niximage/manifests/latest",
            "niximage/a/manifests/latest",
            "niximage/a/b/c/manifests/x",
            "niximage/A/b/manifests/x",
        ] {
            assert!(
                matches!(parse_route(bad), Err(NameError::InvalidName(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn hostile_names_are_rejected() {
        for bad in [
            "..%2f/manifests/latest",
            "../etc/manifests/latest",
            "a/../b/manifests/latest",
            "curl\"; builtins.abort \"x/manifests/latest",
            "${builtins.currentTime}/manifests/latest",
            "a;rm -rf ~/manifests/latest",
            "$(reboot)/manifests/latest",
            ".hidden/manifests/latest",
            "a..b/manifests/latest",
            "a./manifests/latest",
            "a b/manifests/latest",
            "\u{0}x/manifests/latest",
            "curl//manifests/latest",
            "/manifests/latest",
            // Reserved for NixImage names: never a package, wherever it stands.
            "curl/niximage/manifests/latest",
        ] {
            assert!(
                matches!(parse_route(bad), Err(NameError::InvalidName(_))),
                "{bad:?} should be invalid"
            );
        }
        let long = format!("{}/manifests/latest", "a".repeat(300));
        assert!(matches!(parse_route(&long), Err(NameError::InvalidName(_))));
    }

    #[test]
    fn bad_digests_and_tags() {
        // A digest with a slash never reaches the digest parser: not a route.
        assert_eq!(
            parse_route("curl/blobs/sha256:../../etc/passwd").unwrap_err(),
            NameError::NotFound
        );
        for bad in [
            "sha256:xyz",
            "sha512:00",
            "md5:aa",
            "sha256:..",
            &format!("sha256:{}", "A".repeat(64)),
        ] {
            assert!(
                matches!(
                    parse_route(&format!("curl/blobs/{bad}")),
                    Err(NameError::InvalidDigest(_))
                ),
                "{bad}"
            );
            assert!(
                matches!(
                    parse_route(&format!("curl/manifests/{bad}")),
                    Err(NameError::InvalidDigest(_))
                ),
                "{bad}"
            );
        }
        for bad in [".x", "-x", "a/b", &"t".repeat(129), "ta g"] {
            assert!(parse_reference(bad).is_err(), "{bad}");
        }
        assert!(parse_reference("v1.2_3-rc").is_ok());
    }

    #[test]
    fn percent_escapes_decode_but_never_into_a_slash() {
        assert_eq!(
            decode_path("hell%6F/manifests/latest").unwrap(),
            "hello/manifests/latest"
        );
        assert_eq!(decode_path("plain").unwrap(), "plain");
        for bad in ["a%2Fb", "a%2fb", "a%zz", "a%6", "%ff%fe"] {
            assert!(decode_path(bad).is_err(), "{bad}");
        }
        // Decoded, a name is validated like any other.
        let d = decode_path("%24(reboot)/manifests/latest").unwrap();
        assert!(matches!(parse_route(&d), Err(NameError::InvalidName(_))));
    }

    #[test]
    fn referrers_route() {
        let d = format!("sha256:{}", "b".repeat(64));
        match parse_route(&format!("shell/hello/referrers/{d}")).unwrap() {
            Route::Referrers { repo, digest } => {
                assert_eq!(repo.name(), "hello/shell");
                assert_eq!(digest.as_str(), d);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            parse_route("hello/referrers/sha256:zz"),
            Err(NameError::InvalidDigest(_))
        ));
    }

    #[test]
    fn printable_escapes_control_bytes() {
        assert_eq!(printable("a\u{0}b\n"), "a\\u{0}b\\n");
        assert!(printable(&"x".repeat(1000)).len() < 210);
    }
}
