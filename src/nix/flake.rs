//! Flakes as package sources: locking a reference to the exact source every
//! node builds (`nix flake metadata`), which references an operator's
//! `--allowed-source flake:<prefix>` admits, and what a locked one names.

use serde::Deserialize;

use super::NixError;

/// The experimental features a flake call needs (Nix 2.8 to 2.2x have them
/// behind this setting; later ones accept it). Added with
/// `--extra-experimental-features`, so the user's own settings stay.
pub const FEATURES: &str = "nix-command flakes";

/// A flake reference locked to one source tree, as `nix flake metadata
/// --json` resolves it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedFlake {
    /// The locked reference with its `narHash`, which `builtins.getFlake`
    /// accepts under pure evaluation and which fetches exactly that tree
    /// (or fails saying its hash changed).
    pub url: String,
    /// The commit, for a git (or GitHub, GitLab…) flake.
    pub rev: Option<String>,
    /// The NAR hash of the source tree (SRI: `sha256-…`).
    pub nar_hash: String,
}

#[derive(Deserialize)]
struct Metadata {
    url: String,
    locked: Locked,
}

#[derive(Deserialize)]
struct Locked {
    #[serde(rename = "narHash")]
    nar_hash: String,
    #[serde(default)]
    rev: Option<String>,
}

/// Reads `nix flake metadata --json`: its locked URL (`url`), with the
/// locked `narHash` added when Nix leaves it out (2.8 does for git), and
/// the commit.
pub fn parse_metadata(json: &str) -> Result<LockedFlake, String> {
    let m: Metadata = serde_json::from_str(json).map_err(|e| e.to_string())?;
    if !m.locked.nar_hash.starts_with("sha256-") {
        return Err(format!("unexpected narHash {:?}", m.locked.nar_hash));
    }
    let url = if query_value(&m.url, "narHash").is_some() {
        m.url
    } else {
        let sep = if m.url.contains('?') { '&' } else { '?' };
        // SRI base64 holds `+`, `/` and `=`: percent-encoded in a query.
        let encoded: String = m
            .locked
            .nar_hash
            .chars()
            .map(|c| match c {
                '+' => "%2B".to_string(),
                '/' => "%2F".to_string(),
                '=' => "%3D".to_string(),
                c => c.to_string(),
            })
            .collect();
        format!("{}{sep}narHash={encoded}", m.url)
    };
    Ok(LockedFlake {
        url,
        rev: m.locked.rev,
        nar_hash: m.locked.nar_hash,
    })
}

/// A query parameter of a flake reference, percent-decoded.
pub fn query_value(reference: &str, name: &str) -> Option<String> {
    let query = reference.split_once('?')?.1;
    let query = query.split('#').next().unwrap_or(query);
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=')?;
        (k == name).then(|| {
            percent_encoding::percent_decode_str(v)
                .decode_utf8_lossy()
                .into_owned()
        })
    })
}

/// Whether a failed `nix flake metadata` means the reference names nothing
/// (no such repository, path, branch, tag or commit, or no flake.nix
/// there): the user's error, not one to retry. Other failures (a server
/// that does not answer) are retried.
pub fn names_nothing(log: &str) -> bool {
    // A program Nix could not run (no git on the node) is the node's
    // failure, not the reference's, though its words say "No such file".
    if log.contains("error: executing '") {
        return false;
    }
    [
        // git: a branch or tag that is not there (Nix 2.8 runs git rev-parse;
        // later ones libgit2), a commit that is not there, no repository.
        "unknown revision or path not in the working tree",
        "couldn't find remote ref",
        "Cannot find Git revision",
        "does not appear to be a git repository",
        "not found",
        // A path, or a flake.nix, that is not there.
        "No such file or directory",
        "does not exist",
        // GitHub, GitLab and tarballs: no such repository or ref.
        "HTTP error 404",
        "response code 404",
        // Not a flake reference at all.
        "is not a valid URL",
        "is not a valid flake reference",
        "unsupported flake reference",
        "is unsupported",
    ]
    .iter()
    .any(|m| log.contains(m))
}

/// Whether an operator's allowed prefix admits a reference: it starts with
/// the prefix, at a boundary (the prefix ends with `/` or `:`, or the
/// reference goes on with `/`, `?` or `#`, or ends), so `github:acme`
/// admits `github:acme/app` but not `github:acme-evil/app`; and what
/// follows it does not climb out of it with a `..` segment (plain or
/// percent-encoded), so `path:/srv/flakes/` does not admit
/// `path:/srv/flakes/../../root/app`.
pub fn prefix_admits(prefix: &str, reference: &str) -> bool {
    let Some(rest) = reference.strip_prefix(prefix) else {
        return false;
    };
    let at_boundary =
        prefix.ends_with(['/', ':']) || rest.is_empty() || rest.starts_with(['/', '?', '#']);
    let path = rest.split(['?', '#']).next().unwrap_or(rest);
    let climbs = path
        .split('/')
        .any(|segment| percent_encoding::percent_decode_str(segment).decode_utf8_lossy() == "..");
    at_boundary && !climbs
}

/// `nix flake metadata` of a reference: its locked form, or None when it
/// names nothing. Never writes a lock file: an unlocked input of the flake
/// is resolved for this call only.
pub async fn lock(
    reference: &str,
    options: &[(String, String)],
) -> Result<Option<LockedFlake>, NixError> {
    const STAGE: &str = "resolving the flake";
    let mut args = vec![
        "--extra-experimental-features",
        FEATURES,
        "flake",
        "metadata",
        "--json",
        "--no-write-lock-file",
    ];
    for (k, v) in options {
        args.extend(["--option", k.as_str(), v.as_str()]);
    }
    args.push(reference);
    match super::run("nix", &args, STAGE, None).await {
        Ok(out) => parse_metadata(&out)
            .map(Some)
            .map_err(|message| NixError::BadOutput {
                stage: STAGE,
                message,
            }),
        Err(NixError::Failed { stage, log }) => {
            if names_nothing(&log) {
                return Ok(None);
            }
            // The reference may carry credentials: only its redacted form is kept.
            Err(NixError::Failed {
                stage,
                log: log.replace(reference, &super::redact_url(reference)),
            })
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metadata_gives_a_locked_reference_with_its_hash() {
        // `nix flake metadata --json` of a git+file flake, Nix 2.8.
        let json = r#"{"description":"test","lastModified":1796620825,
            "locked":{"lastModified":1796620825,"narHash":"sha256-3tqz9lZ0j7IaVwGU02CGsztoHKZAE5eaPiP9umzcAlU=","ref":"main","rev":"1e73408a20146497888827094581836564add8d0","revCount":2,"type":"git","url":"file:///tmp/fx"},
            "original":{"type":"git","url":"file:///tmp/fx"},"originalUrl":"git+file:///tmp/fx?ref=main",
            "path":"/nix/store/s9k5vxvq8nvrgm6f19fw6snkw58kkfdg-source",
            "url":"git+file:///tmp/fx?ref=main&rev=1e73408a20146497888827094581836564add8d0"}"#;
        let l = parse_metadata(json).unwrap();
        assert_eq!(
            l.rev.as_deref(),
            Some("1e73408a20146497888827094581836564add8d0")
        );
        assert_eq!(
            l.url,
            "git+file:///tmp/fx?ref=main&rev=1e73408a20146497888827094581836564add8d0&narHash=sha256-3tqz9lZ0j7IaVwGU02CGsztoHKZAE5eaPiP9umzcAlU%3D"
        );
        assert_eq!(
            query_value(&l.url, "narHash").as_deref(),
            Some("sha256-3tqz9lZ0j7IaVwGU02CGsztoHKZAE5eaPiP9umzcAlU=")
        );
        // A path flake has no commit; a URL that has its narHash keeps it.
        let json = r#"{"locked":{"narHash":"sha256-AAAA/+b=","type":"path","path":"/f"},
            "url":"path:/f?lastModified=1&narHash=sha256-AAAA/%2Bb%3D"}"#;
        let l = parse_metadata(json).unwrap();
        assert_eq!(l.rev, None);
        assert_eq!(l.url, "path:/f?lastModified=1&narHash=sha256-AAAA/%2Bb%3D");
        assert!(parse_metadata(r#"{"url":"x","locked":{"narHash":"md5-x"}}"#).is_err());
        assert!(parse_metadata("not json").is_err());
    }

    #[test]
    fn allowed_prefixes_stop_at_a_boundary() {
        assert!(prefix_admits("github:acme", "github:acme/app"));
        assert!(prefix_admits("github:acme/", "github:acme/app"));
        assert!(prefix_admits("github:acme/app", "github:acme/app"));
        assert!(prefix_admits("github:acme/app", "github:acme/app?ref=v1"));
        assert!(!prefix_admits("github:acme", "github:acme-evil/app"));
        assert!(!prefix_admits("github:acme/app", "github:acme/application"));
        assert!(!prefix_admits("github:acme", "gitlab:acme/app"));
        assert!(prefix_admits(
            "git+https://git.example.com/",
            "git+https://git.example.com/x"
        ));
        // No climbing out of the prefix, spelled plainly or encoded.
        assert!(!prefix_admits(
            "path:/srv/flakes/",
            "path:/srv/flakes/../../root/x"
        ));
        assert!(!prefix_admits("path:/srv/flakes", "path:/srv/flakes/.."));
        assert!(!prefix_admits(
            "git+https://git.example.com/acme",
            "git+https://git.example.com/acme/%2e%2E/evil"
        ));
        assert!(prefix_admits(
            "path:/srv/flakes/",
            "path:/srv/flakes/a..b/c"
        ));
        assert!(prefix_admits("github:acme/app", "github:acme/app?dir=../x"));
    }

    #[test]
    fn what_names_nothing_is_told_from_what_failed() {
        // Nix 2.8's words for a branch, a repository and a path that are not there.
        assert!(names_nothing(
            "fatal: ambiguous argument 'nope': unknown revision or path not in the working tree."
        ));
        assert!(names_nothing(
            "fatal: '/tmp/nothere' does not appear to be a git repository"
        ));
        assert!(names_nothing(
            "error: getting status of '/tmp/nothere': No such file or directory"
        ));
        assert!(names_nothing("error: 'not a ref' is not a valid URL"));
        // A node without git is not the user's error.
        assert!(!names_nothing(
            "error: executing 'git': No such file or directory"
        ));
        // A server that does not answer is retried.
        assert!(!names_nothing("error: unable to download 'https://api.github.com/repos/foo/bar/commits/HEAD': Couldn't resolve host name (6)"));
        assert!(!names_nothing("fatal: unable to access 'https://example.invalid/x/': Could not resolve host: example.invalid"));
    }
}
