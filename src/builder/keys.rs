//! The build service's keys, pure: a request's (the spec as spelled, and
//! the repository it is asked under), an image's (what the names resolved
//! to), and the settings that shape every image, which both include.

use std::collections::BTreeSet;

use sha2::Digest as _;

use super::ImageSpec;
use crate::nix::{Prepared, Source};

/// The settings that shape every image (compression, layer budget,
/// popularity table), as part of every key: the catalog outlives a process
/// whose settings may change.
pub fn shape(
    compression: crate::oci::Compression,
    max_layers: usize,
    popularity: Option<&crate::layers::Popularity>,
) -> String {
    let mut h = sha2::Sha256::new();
    if let Some(p) = popularity {
        let sorted: std::collections::BTreeMap<_, _> = p.iter().collect();
        h.update(serde_json::to_vec(&sorted).expect("serialisable"));
    }
    // "groups": the layer planner (a new one changes every digest).
    format!(
        "groups/{}/{}/{}",
        compression.cache_tag(),
        max_layers,
        hex::encode(h.finalize())
    )
}

/// The request key: the spec's (`ImageSpec::key`), the settings that shape
/// images, and the repository it is asked under, so that each spelling of
/// one package set (`curl/jq` and `cacert/curl/jq`, `shell` and its four
/// packages) has its own request, and the image is content of each
/// repository that asked for it.
pub fn request_key(spec: &ImageSpec, source: &Source, shape: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(format!(
        "{}\0{}\0{:?}",
        spec.key(source),
        shape,
        spec.repository
    ));
    hex::encode(h.finalize())
}

/// The image key: the output paths the names resolved to (sorted, unique),
/// the default program, and everything else that shapes the image.
pub fn image_key(
    prepared: &Prepared,
    spec: &ImageSpec,
    program: Option<&str>,
    shape: &str,
) -> String {
    let outs: BTreeSet<&str> = prepared.outs.iter().map(String::as_str).collect();
    let mut h = sha2::Sha256::new();
    h.update(format!(
        "{outs:?}\0{:?}\0{:?}\0{program:?}\0{shape}",
        spec.arch, spec.run,
    ));
    hex::encode(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(path: &str) -> ImageSpec {
        let parts: Vec<&str> = path.split('/').collect();
        ImageSpec::ad_hoc(&crate::name::parse_packages(&parts).unwrap(), "latest")
    }

    fn prepared(outs: &[&str]) -> Prepared {
        Prepared {
            unknown: vec![],
            drvs: vec![],
            outs: outs.iter().map(|o| o.to_string()).collect(),
            resolved: vec![],
        }
    }

    #[test]
    fn spellings_have_their_own_requests_and_meet_at_the_image() {
        let source = Source::Path("/pkgs".into());
        let shape = shape(crate::oci::Compression::Gzip, 12, None);
        let (a, b) = (spec("curl/jq"), spec("jq/curl"));
        // One name, one request, whatever the order.
        assert_eq!(
            request_key(&a, &source, &shape),
            request_key(&b, &source, &shape)
        );
        // `shell` and its packages are two requests (two repositories)...
        let (shell, spelled) = (
            spec("shell"),
            spec("bashInteractive/coreutils/moreutils/nano"),
        );
        assert_ne!(
            request_key(&shell, &source, &shape),
            request_key(&spelled, &source, &shape)
        );
        // ...that resolve to one image, whatever order Nix answers in.
        let p = prepared(&["/nix/store/b-bash", "/nix/store/a-coreutils"]);
        let q = prepared(&[
            "/nix/store/a-coreutils",
            "/nix/store/b-bash",
            "/nix/store/a-coreutils",
        ]);
        assert_eq!(
            image_key(&p, &shell, None, &shape),
            image_key(&q, &spelled, None, &shape)
        );
        // Another source, program or architecture is another request or image.
        let git = Source::Git {
            url: "file:///r".into(),
        };
        assert_ne!(
            request_key(&a, &source, &shape),
            request_key(&a, &git, &shape)
        );
        assert_ne!(
            image_key(&p, &shell, None, &shape),
            image_key(&p, &shell, Some("bash"), &shape)
        );
        let arm = ImageSpec {
            arch: crate::name::Arch::Arm64,
            ..shell.clone()
        };
        assert_ne!(
            image_key(&p, &shell, None, &shape),
            image_key(&p, &arm, None, &shape)
        );
    }

    #[test]
    fn the_shape_is_in_every_key() {
        let source = Source::Path("/pkgs".into());
        let gzip = shape(crate::oci::Compression::Gzip, 12, None);
        let zstd = shape(crate::oci::Compression::Zstd, 12, None);
        let fewer = shape(crate::oci::Compression::Gzip, 6, None);
        assert_ne!(gzip, zstd);
        assert_ne!(gzip, fewer);
        let s = spec("curl");
        assert_ne!(
            request_key(&s, &source, &gzip),
            request_key(&s, &source, &zstd)
        );
        let p = prepared(&["/nix/store/a-curl"]);
        assert_ne!(
            image_key(&p, &s, None, &gzip),
            image_key(&p, &s, None, &fewer)
        );
    }
}
