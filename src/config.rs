//! Command line and environment: one binary, subcommands, every flag with an
//! env twin, and Nixery's own variable names accepted as fallbacks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

use crate::nix::Source;

#[derive(Debug, Parser)]
#[command(
    name = "nixery",
    version,
    about = "Container images built by Nix on demand, served by an OCI registry"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log lines as `text` (coloured only on a terminal, never with NO_COLOR)
    /// or `json` (one object a line, for log collectors).
    #[arg(long, global = true, env = "NIXERY_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the registry alone (no Kubernetes).
    Serve(CommonArgs),
    /// Run in a cluster: registry plus the NixImage controller, one per node.
    Agent(AgentArgs),
    /// Build one image from the command line and print its reference and digest.
    Build(BuildArgs),
    /// Print the NixImage CRD as YAML.
    Crd,
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Agent")]
pub struct AgentArgs {
    /// This node's name (from the downward API in the DaemonSet).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// A package source NixImages may name besides the agent's own, as
    /// `repo:URL`, `channel:NAME`, `path:DIR` or `flake:PREFIX` (every flake
    /// reference under PREFIX, e.g. `flake:github:acme`) (repeatable; env:
    /// comma-separated). Building from a source evaluates its Nix code as
    /// root on every node.
    #[arg(long = "allowed-source", env = "NIXERY_ALLOWED_SOURCES", value_delimiter = ',', value_parser = parse_source)]
    pub allowed_sources: Vec<crate::nix::Source>,
    /// Namespace of the agents' node Leases (the agent's own namespace in the DaemonSet).
    #[arg(long, env = "POD_NAMESPACE", default_value = "nixery-system")]
    pub lease_namespace: String,
    /// Watch the NixImages of this namespace only [default: all namespaces].
    #[arg(long, env = "NIXERY_WATCH_NAMESPACE")]
    pub watch_namespace: Option<String>,
    /// Also serve /metrics (and /healthz, /readyz) on this address, for
    /// Prometheus to scrape from outside the node's loopback.
    #[arg(long, env = "NIXERY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Pull each image that becomes ready into the node's container runtime
    /// through its CRI, so Pods start without pulling; remove it when its
    /// NixImage goes.
    #[arg(long, env = "NIXERY_PRE_PULL", default_value_t = true, action = clap::ArgAction::Set, value_name = "BOOL")]
    pub pre_pull: bool,
    /// The container runtime's CRI socket [default: the first of
    /// containerd's, CRI-O's and k3s's usual paths, on the host or under /host].
    #[arg(long, env = "NIXERY_CRI_SOCKET", value_name = "PATH")]
    pub cri_socket: Option<PathBuf>,
    /// The flags every command shares (after this command's own in `--help`).
    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_source(s: &str) -> Result<crate::nix::Source, String> {
    crate::nix::Source::parse_tagged(s)
        .ok_or_else(|| format!("'{s}' is not repo:URL, channel:NAME, path:DIR or flake:PREFIX"))
}

#[derive(Debug, Args)]
#[command(next_help_heading = "Build")]
pub struct BuildArgs {
    /// Image path, e.g. `shell/curl` or `shell/curl:latest`.
    pub image: String,
    /// Also write the image to FILE as a tar that `docker load`, `ctr images
    /// import` and `podman load` read (OCI layout plus Docker's manifest.json).
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// Also write the image's SBOM to FILE: CycloneDX 1.6 JSON, or SPDX 2.3
    /// JSON when FILE ends in `.spdx.json`.
    #[arg(long, value_name = "FILE")]
    pub sbom: Option<PathBuf>,
    /// The name:tag the written archive gives the image [default: the image path and tag].
    #[arg(long, value_name = "NAME:TAG", requires = "output")]
    pub reference: Option<String>,
    /// The image's entrypoint, one argument per flag (repeatable).
    #[arg(long = "entrypoint", value_name = "ARG", allow_hyphen_values = true)]
    pub entrypoint: Vec<String>,
    /// The image's command, one argument per flag (repeatable) [default: a
    /// shell when the image has one, else the one package's program].
    #[arg(long = "cmd", value_name = "ARG", allow_hyphen_values = true)]
    pub cmd: Vec<String>,
    /// An environment variable of the image, NAME=VALUE (repeatable).
    #[arg(long = "env", value_name = "NAME=VALUE", value_parser = parse_env)]
    pub env: Vec<String>,
    /// A port the image exposes, e.g. 5000/tcp (repeatable).
    #[arg(long = "expose", value_name = "PORT/PROTO")]
    pub expose: Vec<String>,
    /// The flags every command shares (after this command's own in `--help`).
    #[command(flatten)]
    pub common: CommonArgs,
}

fn parse_env(s: &str) -> Result<String, String> {
    match s.split_once('=') {
        Some((name, _)) if !name.is_empty() => Ok(s.to_string()),
        _ => Err(format!("'{s}' is not NAME=VALUE")),
    }
}

/// The flags every command shares, in groups that `--help` shows under
/// their headings.
#[derive(Debug, Args, Clone, Default)]
pub struct CommonArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    #[command(flatten)]
    pub nix: NixArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    #[command(flatten)]
    pub storage: StorageArgs,
}

/// Where and how the registry listens.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Server")]
pub struct ServerArgs {
    /// Address to listen on [default: 127.0.0.1:5000; Nixery's PORT=n means 0.0.0.0:n].
    #[arg(long, env = "NIXERY_LISTEN")]
    pub listen: Option<String>,
    /// Most client connections at once; past it a connection is refused with
    /// 503 [default: half the open-file limit, at most 8192].
    #[arg(long, env = "NIXERY_MAX_CONNECTIONS")]
    pub max_connections: Option<usize>,
    /// Seconds a client may take to send a request's headers (and to start
    /// its next request on a kept-alive connection) before it is closed.
    #[arg(long, env = "NIXERY_HEADER_TIMEOUT", default_value_t = 10)]
    pub header_timeout: u64,
}

/// The package set and how Nix is called.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Nix")]
pub struct NixArgs {
    /// A local nixpkgs-shaped package set (`import PATH {}`).
    #[arg(long, env = "NIXERY_PKGS_PATH", group = "source")]
    pub pkgs_path: Option<PathBuf>,
    /// A git repository of a package set; image tags name its revisions.
    #[arg(long, env = "NIXERY_PKGS_REPO", group = "source")]
    pub pkgs_repo: Option<String>,
    /// A nixpkgs channel (e.g. nixos-unstable) or tarball URL [default: nixos-unstable].
    #[arg(long, env = "NIXERY_CHANNEL", group = "source")]
    pub pkgs_channel: Option<String>,
    /// A flake (e.g. github:acme/app, git+https://host/app?ref=main): image
    /// names are its outputs, as `nix build FLAKE#NAME` finds them; locked
    /// anew after --cache-ttl.
    #[arg(long, env = "NIXERY_PKGS_FLAKE", group = "source")]
    pub pkgs_flake: Option<String>,
    /// A Nix setting for every Nix call, as NAME=VALUE (repeatable); e.g.
    /// `substituters=` for the offline package set, where no cache is reachable.
    #[arg(long = "nix-option", env = "NIXERY_NIX_OPTIONS", value_delimiter = ',')]
    pub nix_options: Vec<String>,
    /// Seconds a build may take [default: 600; Nixery's NIX_TIMEOUT].
    #[arg(long, env = "NIXERY_BUILD_TIMEOUT")]
    pub build_timeout: Option<u64>,
    /// Builds that run at once; more queue.
    #[arg(long, env = "NIXERY_MAX_BUILDS", default_value_t = 2)]
    pub max_builds: usize,
    /// Builds that may wait for a slot; past it, requests get 429.
    #[arg(long, env = "NIXERY_MAX_QUEUE", default_value_t = 64)]
    pub max_queue: usize,
    /// Systems images are built for, e.g. x86_64-linux,aarch64-linux (or
    /// amd64,arm64). With more than one, each name also has an image index
    /// (manifest list) for clients that accept one [default: what the local
    /// Nix builds: its `system` and `extra-platforms`].
    #[arg(
        long,
        env = "NIXERY_SYSTEMS",
        value_delimiter = ',',
        value_name = "SYSTEMS"
    )]
    pub systems: Vec<String>,
}

/// How images are laid out, packed and cached.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Images")]
pub struct ImageArgs {
    /// Most layers in an image, the customisation layer included. Every
    /// layer costs a client about 0.1 s to fetch and unpack, so few is fast;
    /// the planner keeps shared packages in shared layers within it.
    #[arg(long, env = "NIXERY_MAX_LAYERS", default_value_t = 12, value_parser = clap::value_parser!(u64).range(2..=125))]
    pub max_layers: u64,
    /// Layer compression: gzip (every client), zstd (OCI manifests only;
    /// containerd 1.5+, Docker 23+, podman) or none (plain tar: no CPU on
    /// either end, bigger transfers; for pulls over a node's loopback).
    #[arg(long, env = "NIXERY_LAYER_COMPRESSION", value_enum, default_value_t = crate::oci::Compression::Gzip)]
    pub layer_compression: crate::oci::Compression,
    /// Seconds an image from a reference that can move (branch, channel,
    /// path) is served before it is rebuilt; Nix's own tarball-ttl is 3600.
    #[arg(long, env = "NIXERY_CACHE_TTL", default_value_t = 3600)]
    pub cache_ttl: u64,
    /// A popularity table (JSON of name -> count) as a local file path.
    #[arg(long, env = "NIX_POPULARITY_URL")]
    pub popularity: Option<String>,
    /// Sign every image and its SBOM and provenance attestations, as cosign
    /// verifies them, with this ECDSA P-256 private key (unencrypted PEM,
    /// PKCS#8 or SEC1); its public key is served at /cosign.pub.
    #[arg(long, env = "NIXERY_SIGNING_KEY", value_name = "FILE")]
    pub signing_key: Option<PathBuf>,
    /// The host (and port) clients pull by: the registry part of the identity
    /// that signatures name, and, for an agent, of the reference written into
    /// its node's NixImage status entries [default: the host each request
    /// addressed; an agent's: 127.0.0.1:<port>].
    #[arg(long, env = "NIXERY_PUBLIC_HOST", value_name = "HOST")]
    pub public_host: Option<String>,
}

/// Where blobs, manifests and the image index live, and how much.
#[derive(Debug, Args, Clone, Default)]
#[command(next_help_heading = "Storage")]
pub struct StorageArgs {
    /// Directory for blobs, layer cache and GC roots [default: /var/lib/nixery; Nixery's STORAGE_PATH].
    #[arg(long, env = "NIXERY_STATE_DIR")]
    pub state_dir: Option<PathBuf>,
    /// Most blob bytes to keep (e.g. 500MiB, 20GiB); past it, the least
    /// recently used images that no NixImage pins are evicted [default: a
    /// quarter of the state directory's disk].
    #[arg(long, env = "NIXERY_STORAGE_LIMIT", value_parser = parse_size)]
    pub storage_limit: Option<u64>,
    /// Seconds after a client last asked for any part of an image (its
    /// manifest or a blob) that it is not evicted (up to a quarter of the
    /// limit, the most recent first), nor while a blob of it is being sent,
    /// so a pull in progress gets every blob. 0: no grace at all.
    #[arg(long, env = "NIXERY_EVICTION_GRACE", default_value_t = 10)]
    pub eviction_grace: u64,
    /// Blob storage backend: `filesystem` (the state directory), or `s3` (a
    /// bucket that several instances share, with the state directory as a
    /// local cache within --storage-limit). Nixery's `gcs` means `s3` at
    /// Google Cloud Storage's S3 endpoint with HMAC keys and `GCS_BUCKET`.
    #[arg(long, env = "NIXERY_STORAGE_BACKEND", default_value = "filesystem")]
    pub storage_backend: String,
    /// The S3 server, e.g. http://127.0.0.1:3900 [default: AWS; env also AWS_ENDPOINT_URL].
    #[arg(long, env = "NIXERY_S3_ENDPOINT")]
    pub s3_endpoint: Option<String>,
    /// The bucket (it must exist). Credentials come from AWS_ACCESS_KEY_ID
    /// and AWS_SECRET_ACCESS_KEY (or the rest of the usual AWS environment).
    #[arg(long, env = "NIXERY_S3_BUCKET")]
    pub s3_bucket: Option<String>,
    /// The bucket's region [default: AWS_REGION, AWS_DEFAULT_REGION, or us-east-1].
    #[arg(long, env = "NIXERY_S3_REGION")]
    pub s3_region: Option<String>,
    /// Keep everything under this key prefix in the bucket.
    #[arg(long, env = "NIXERY_S3_PREFIX", default_value = "")]
    pub s3_prefix: String,
    /// Answer blob GETs with a redirect to a presigned URL of the bucket (as
    /// Nixery does with GCS), so that bytes flow from the bucket to the
    /// client; clients must reach the S3 endpoint.
    #[arg(long, env = "NIXERY_S3_REDIRECT")]
    pub s3_redirect: bool,
    /// Seconds a build lease lives without renewal: how long a dead
    /// builder's image is waited for before another instance builds it.
    #[arg(long, env = "NIXERY_BUILD_LEASE_TTL", default_value_t = 30, value_parser = clap::value_parser!(u64).range(3..))]
    pub build_lease_ttl: u64,
}

/// A size such as `500MiB`, `20GiB`, `1.5 GB` or `1048576` (bytes).
fn parse_size(s: &str) -> Result<u64, String> {
    let size: bytesize::ByteSize = s.trim().parse()?;
    Ok(size.as_u64())
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid listen address '{0}': {1}")]
    Listen(String, String),
    #[error("storage backend '{0}' is unknown; use 'filesystem' or 's3'")]
    Backend(String),
    #[error("invalid {0}: {1}")]
    Invalid(&'static str, String),
    #[error("reading the popularity table {0}: {1}")]
    Popularity(String, String),
    #[error(transparent)]
    SigningKey(#[from] crate::attest::cosign::KeyError),
}

/// Resolved settings.
#[derive(Debug, Clone)]
pub struct Settings {
    pub listen: SocketAddr,
    pub state_dir: PathBuf,
    pub source: Source,
    pub max_layers: usize,
    pub build_timeout: Duration,
    pub max_builds: usize,
    pub max_queue: usize,
    pub cache_ttl: Duration,
    pub compression: crate::oci::Compression,
    pub popularity: Option<crate::layers::Popularity>,
    /// Signs each image and its attestations (`--signing-key`).
    pub signer: Option<std::sync::Arc<crate::attest::Signer>>,
    /// The host clients pull by (`--public-host`).
    pub public_host: Option<String>,
    pub nix_options: Vec<(String, String)>,
    /// The systems asked for with `--systems`, host first when it is among
    /// them; empty: what the local Nix builds (see `nix::systems`).
    pub systems: Vec<crate::name::Arch>,
    pub limits: ConnectionLimits,
    /// None: the default, a quarter of the state directory's disk.
    pub storage_limit: Option<u64>,
    /// How long after its last pull an image is not evicted.
    pub eviction_grace: Duration,
    pub storage: Storage,
}

/// Where blobs, manifests and the image index live.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Storage {
    /// The state directory, this instance's alone.
    #[default]
    Filesystem,
    /// A bucket shared by instances, cached in the state directory.
    S3 {
        s3: crate::store::S3Config,
        /// Redirect blob GETs to presigned URLs.
        redirect: bool,
        lease_ttl: Duration,
    },
}

/// What one client connection may hold and for how long.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    pub max_connections: usize,
    pub header_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: default_max_connections(),
            header_timeout: Duration::from_secs(10),
        }
    }
}

/// Half the soft open-file limit (files, Nix's pipes and the store need the
/// rest), between 16 and 8192.
pub fn default_max_connections() -> usize {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only fills the struct.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 {
        lim.rlim_cur as usize
    } else {
        1024
    };
    (soft / 2).clamp(16, 8192)
}

impl CommonArgs {
    /// Applies defaults and Nixery's variable names (`env` looks them up).
    pub fn resolve(&self, env: impl Fn(&str) -> Option<String>) -> Result<Settings, ConfigError> {
        let listen = match (&self.server.listen, env("PORT")) {
            (Some(l), _) => l.clone(),
            (None, Some(port)) => format!("0.0.0.0:{port}"),
            (None, None) => "127.0.0.1:5000".into(),
        };
        let listen: SocketAddr = listen.parse().map_err(|e: std::net::AddrParseError| {
            ConfigError::Listen(listen.clone(), e.to_string())
        })?;
        let state_dir = self
            .storage
            .state_dir
            .clone()
            .or_else(|| env("STORAGE_PATH").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from("/var/lib/nixery"));
        let source = if let Some(p) = &self.nix.pkgs_path {
            let abs = std::path::absolute(p)
                .map_err(|e| ConfigError::Invalid("--pkgs-path", e.to_string()))?;
            Source::Path(abs)
        } else if let Some(r) = &self.nix.pkgs_repo {
            Source::Git { url: r.clone() }
        } else if let Some(f) = &self.nix.pkgs_flake {
            Source::Flake {
                reference: f.clone(),
            }
        } else {
            Source::Channel(
                self.nix
                    .pkgs_channel
                    .clone()
                    .unwrap_or_else(|| "nixos-unstable".into()),
            )
        };
        let timeout = match self.nix.build_timeout {
            Some(t) => t,
            None => match env("NIX_TIMEOUT") {
                Some(t) => t
                    .parse()
                    .map_err(|_| ConfigError::Invalid("NIX_TIMEOUT", t))?,
                None => 600,
            },
        };
        if timeout == 0 {
            return Err(ConfigError::Invalid(
                "build timeout",
                "must be at least one second".into(),
            ));
        }
        let storage = match self.storage.storage_backend.as_str() {
            "filesystem" => Storage::Filesystem,
            backend @ ("s3" | "gcs") => {
                let gcs = backend == "gcs";
                let bucket = self
                    .storage
                    .s3_bucket
                    .clone()
                    .or_else(|| env("GCS_BUCKET").filter(|_| gcs))
                    .ok_or(ConfigError::Invalid(
                        "--storage-backend s3",
                        "it needs --s3-bucket (NIXERY_S3_BUCKET)".into(),
                    ))?;
                let endpoint = self
                    .storage
                    .s3_endpoint
                    .clone()
                    .or_else(|| env("AWS_ENDPOINT_URL"))
                    .or_else(|| gcs.then(|| "https://storage.googleapis.com".to_string()));
                if let Some(e) = &endpoint {
                    if !(e.starts_with("http://") || e.starts_with("https://")) {
                        return Err(ConfigError::Invalid(
                            "--s3-endpoint",
                            format!("'{e}' is not an http:// or https:// URL"),
                        ));
                    }
                }
                let region = self
                    .storage
                    .s3_region
                    .clone()
                    .or_else(|| env("AWS_REGION"))
                    .or_else(|| env("AWS_DEFAULT_REGION"))
                    .unwrap_or_else(|| {
                        if gcs {
                            "auto".into()
                        } else {
                            "us-east-1".into()
                        }
                    });
                Storage::S3 {
                    s3: crate::store::S3Config {
                        endpoint,
                        bucket,
                        region,
                        prefix: self.storage.s3_prefix.trim_matches('/').to_string(),
                        credentials: None,
                    },
                    redirect: self.storage.s3_redirect,
                    lease_ttl: Duration::from_secs(self.storage.build_lease_ttl),
                }
            }
            other => return Err(ConfigError::Backend(other.to_string())),
        };
        let popularity = match &self.images.popularity {
            None => None,
            Some(p) => {
                let path = p.strip_prefix("file://").unwrap_or(p);
                let bytes = std::fs::read(path)
                    .map_err(|e| ConfigError::Popularity(p.clone(), e.to_string()))?;
                Some(
                    serde_json::from_slice(&bytes)
                        .map_err(|e| ConfigError::Popularity(p.clone(), e.to_string()))?,
                )
            }
        };
        let nix_options = self
            .nix
            .nix_options
            .iter()
            .map(|o| match o.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                _ => Err(ConfigError::Invalid(
                    "--nix-option",
                    format!("'{o}' is not NAME=VALUE"),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let mut systems = Vec::new();
        for s in &self.nix.systems {
            let arch = crate::name::Arch::parse(s).ok_or_else(|| {
                ConfigError::Invalid(
                    "--systems",
                    format!(
                        "'{s}' is not a system nixery builds for (x86_64-linux, aarch64-linux)"
                    ),
                )
            })?;
            if !systems.contains(&arch) {
                systems.push(arch);
            }
        }
        systems.sort_by_key(|a| *a != crate::name::Arch::host());
        Ok(Settings {
            storage,
            storage_limit: self.storage.storage_limit,
            eviction_grace: Duration::from_secs(self.storage.eviction_grace),
            nix_options,
            systems,
            listen,
            state_dir,
            source,
            max_layers: self.images.max_layers as usize,
            build_timeout: Duration::from_secs(timeout),
            max_builds: self.nix.max_builds.max(1),
            max_queue: self.nix.max_queue,
            cache_ttl: Duration::from_secs(self.images.cache_ttl),
            compression: self.images.layer_compression,
            popularity,
            public_host: self.images.public_host.clone(),
            signer: match &self.images.signing_key {
                Some(path) => Some(std::sync::Arc::new(crate::attest::Signer::from_file(path)?)),
                None => None,
            },
            limits: ConnectionLimits {
                max_connections: self
                    .server
                    .max_connections
                    .unwrap_or_else(default_max_connections)
                    .max(1),
                header_timeout: Duration::from_secs(self.server.header_timeout.max(1)),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_limits_read_as_people_write_them() {
        let limit = |v: &str| parse(&["--storage-limit", v]).storage.storage_limit;
        assert_eq!(limit("500MiB"), Some(500 << 20));
        assert_eq!(limit("20GiB"), Some(20 << 30));
        assert_eq!(limit("1 GB"), Some(1_000_000_000));
        assert_eq!(limit("4096"), Some(4096));
        let err = |v: &str| {
            Cli::try_parse_from(["nixery", "serve", "--storage-limit", v])
                .err()
                .map(|e| e.to_string())
        };
        assert!(err("lots").unwrap().contains("--storage-limit"));
        assert!(err("12 parsecs").is_some());
        assert_eq!(parse(&[]).storage.storage_limit, None);
    }

    /// `nixery build`'s image-config flags: repeatable, hyphenated values
    /// kept, and bad ones named.
    #[test]
    fn build_flags_set_the_image_config() {
        let build = |args: &[&str]| {
            let mut argv = vec!["nixery", "build", "shell"];
            argv.extend_from_slice(args);
            Cli::try_parse_from(argv).map(|c| match c.command {
                Command::Build(b) => b,
                _ => unreachable!(),
            })
        };
        let b = build(&[
            "--entrypoint",
            "/bin/nixery",
            "--cmd",
            "agent",
            "--cmd",
            "--flag",
            "--env",
            "A=1",
            "--env",
            "B=x=y",
            "--output",
            "o.tar",
            "--reference",
            "n:t",
        ])
        .unwrap();
        assert_eq!(b.entrypoint, ["/bin/nixery"]);
        assert_eq!(b.cmd, ["agent", "--flag"]);
        assert_eq!(b.env, ["A=1", "B=x=y"]);
        assert_eq!(b.reference.as_deref(), Some("n:t"));
        let err = |args: &[&str]| build(args).err().map(|e| e.to_string()).unwrap_or_default();
        assert!(err(&["--env", "NOEQUALS"]).contains("'NOEQUALS' is not NAME=VALUE"));
        assert!(err(&["--env", "=v"]).contains("is not NAME=VALUE"));
        assert!(
            err(&["--reference", "n:t"]).contains("--output"),
            "a name with nothing to name"
        );
    }

    /// `--help` shows every flag under the heading of what it configures,
    /// the command's own first.
    #[test]
    fn help_groups_flags_by_what_they_configure() {
        use clap::CommandFactory;
        let cli = Cli::command();
        let heading = |command: &str, flag: &str| {
            let sub = cli.find_subcommand(command).unwrap();
            let arg = sub
                .get_arguments()
                .find(|a| a.get_long() == Some(flag))
                .unwrap_or_else(|| panic!("{command} has no --{flag}"));
            arg.get_help_heading().map(str::to_string)
        };
        for (flag, group) in [
            ("listen", "Server"),
            ("header-timeout", "Server"),
            ("pkgs-channel", "Nix"),
            ("nix-option", "Nix"),
            ("max-builds", "Nix"),
            ("max-layers", "Images"),
            ("layer-compression", "Images"),
            ("state-dir", "Storage"),
            ("s3-bucket", "Storage"),
            ("storage-limit", "Storage"),
        ] {
            for command in ["serve", "agent", "build"] {
                assert_eq!(
                    heading(command, flag).as_deref(),
                    Some(group),
                    "{command} --{flag}"
                );
            }
        }
        assert_eq!(heading("agent", "node-name").as_deref(), Some("Agent"));
        assert_eq!(heading("agent", "metrics-listen").as_deref(), Some("Agent"));
        assert_eq!(heading("build", "output").as_deref(), Some("Build"));
        // No flag of a command is left without a group.
        for command in ["serve", "agent", "build"] {
            let sub = cli.find_subcommand(command).unwrap();
            for arg in sub.get_arguments() {
                let global = matches!(arg.get_id().as_str(), "help" | "log_format");
                assert!(
                    global || arg.get_help_heading().is_some(),
                    "{command}: {} has no heading",
                    arg.get_id()
                );
            }
        }
    }

    fn parse(args: &[&str]) -> CommonArgs {
        let mut argv = vec!["nixery", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(c) => c,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults() {
        let s = parse(&[]).resolve(|_| None).unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:5000");
        assert_eq!(s.source, Source::Channel("nixos-unstable".into()));
        assert_eq!(s.max_layers, 12);
        assert_eq!(s.build_timeout, Duration::from_secs(600));
    }

    #[test]
    fn nixery_variable_names_are_accepted() {
        let env = |k: &str| match k {
            "PORT" => Some("8080".to_string()),
            "STORAGE_PATH" => Some("/srv/nixery".to_string()),
            "NIX_TIMEOUT" => Some("30".to_string()),
            _ => None,
        };
        let s = parse(&[]).resolve(env).unwrap();
        assert_eq!(s.listen.to_string(), "0.0.0.0:8080");
        assert_eq!(s.state_dir, PathBuf::from("/srv/nixery"));
        assert_eq!(s.build_timeout, Duration::from_secs(30));
        // Our own flags win over Nixery's names.
        let s = parse(&["--listen", "127.0.0.1:1", "--build-timeout", "5"])
            .resolve(env)
            .unwrap();
        assert_eq!(s.listen.to_string(), "127.0.0.1:1");
        assert_eq!(s.build_timeout, Duration::from_secs(5));
    }

    #[test]
    fn one_package_source_at_most() {
        let r = Cli::try_parse_from([
            "nixery",
            "serve",
            "--pkgs-path",
            "/a",
            "--pkgs-channel",
            "x",
        ]);
        assert!(r.is_err());
        let s = parse(&["--pkgs-repo", "file:///r"])
            .resolve(|_| None)
            .unwrap();
        assert_eq!(
            s.source,
            Source::Git {
                url: "file:///r".into()
            }
        );
        let s = parse(&["--pkgs-flake", "github:acme/app"])
            .resolve(|_| None)
            .unwrap();
        assert_eq!(
            s.source,
            Source::Flake {
                reference: "github:acme/app".into()
            }
        );
        assert!(Cli::try_parse_from([
            "nixery",
            "serve",
            "--pkgs-flake",
            "github:acme/app",
            "--pkgs-repo",
            "x",
        ])
        .is_err());
    }

    #[test]
    fn allowed_flake_sources_are_prefixes() {
        let allowed = parse_source("flake:github:acme").unwrap();
        let flake = |r: &str| Source::Flake {
            reference: r.into(),
        };
        assert!(allowed.admits(&flake("github:acme/app")));
        assert!(!allowed.admits(&flake("github:acme-evil/app")));
        assert!(!allowed.admits(&Source::Git {
            url: "github:acme/app".into()
        }));
        assert!(parse_source("repo:file:///r")
            .unwrap()
            .admits(&Source::Git {
                url: "file:///r".into()
            }));
        assert!(parse_source("flake:").is_err());
        assert!(parse_source("flakes:x").is_err());
    }

    #[test]
    fn s3_storage_reads_its_flags_and_the_aws_environment() {
        let s3 = |args: &[&str], env: &[(&str, &str)]| {
            let mut all = vec!["--storage-backend", "s3"];
            all.extend_from_slice(args);
            let env: Vec<(String, String)> = env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect();
            parse(&all).resolve(move |k| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone()))
        };
        let err =
            |r: Result<Settings, ConfigError>| r.err().map(|e| e.to_string()).unwrap_or_default();
        assert!(
            err(s3(&[], &[])).contains("--s3-bucket"),
            "a bucket is required"
        );
        assert!(err(s3(
            &["--s3-bucket", "b", "--s3-endpoint", "localhost:3900"],
            &[]
        ))
        .contains("is not an http:// or https:// URL"));
        let got = s3(
            &[
                "--s3-bucket",
                "b",
                "--s3-prefix",
                "/nixery/",
                "--s3-redirect",
            ],
            &[
                ("AWS_ENDPOINT_URL", "http://127.0.0.1:3900"),
                ("AWS_DEFAULT_REGION", "garage"),
            ],
        )
        .unwrap();
        assert_eq!(
            got.storage,
            Storage::S3 {
                s3: crate::store::S3Config {
                    endpoint: Some("http://127.0.0.1:3900".into()),
                    bucket: "b".into(),
                    region: "garage".into(),
                    prefix: "nixery".into(),
                    credentials: None,
                },
                redirect: true,
                lease_ttl: Duration::from_secs(30),
            }
        );
        // The flag wins over the environment; AWS's default region otherwise.
        let Storage::S3 { s3: c, .. } = s3(
            &["--s3-bucket", "b", "--s3-region", "eu-west-3"],
            &[("AWS_REGION", "us-west-2")],
        )
        .unwrap()
        .storage
        else {
            panic!("not s3")
        };
        assert_eq!((c.region.as_str(), c.endpoint), ("eu-west-3", None));
        // Nixery's GCS settings: its bucket variable, at GCS's S3 endpoint.
        let gcs = parse(&["--storage-backend", "gcs"])
            .resolve(|k| (k == "GCS_BUCKET").then(|| "nixery-layers".into()))
            .unwrap();
        let Storage::S3 { s3: c, .. } = gcs.storage else {
            panic!("not s3")
        };
        assert_eq!(c.bucket, "nixery-layers");
        assert_eq!(
            c.endpoint.as_deref(),
            Some("https://storage.googleapis.com")
        );
        assert_eq!(
            parse(&[]).resolve(|_| None).unwrap().storage,
            Storage::Filesystem
        );
        assert!(Cli::try_parse_from(["nixery", "serve", "--build-lease-ttl", "1"]).is_err());
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(matches!(
            parse(&["--listen", "nonsense"]).resolve(|_| None),
            Err(ConfigError::Listen(..))
        ));
        assert!(matches!(
            parse(&["--storage-backend", "azure"]).resolve(|_| None),
            Err(ConfigError::Backend(_))
        ));
        assert!(matches!(
            parse(&[]).resolve(|k| (k == "NIX_TIMEOUT").then(|| "soon".into())),
            Err(ConfigError::Invalid(..))
        ));
        assert!(Cli::try_parse_from(["nixery", "serve", "--max-layers", "1"]).is_err());
        assert!(matches!(
            parse(&["--nix-option", "novalue"]).resolve(|_| None),
            Err(ConfigError::Invalid(..))
        ));
        let s = parse(&["--nix-option", "substituters="])
            .resolve(|_| None)
            .unwrap();
        assert_eq!(
            s.nix_options,
            vec![("substituters".to_string(), String::new())]
        );
        assert!(matches!(
            parse(&["--popularity", "/does/not/exist"]).resolve(|_| None),
            Err(ConfigError::Popularity(..))
        ));
    }
}
