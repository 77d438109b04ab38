//! A real Garage (the S3-compatible object store) on loopback for the
//! shared-storage tests: one node, or a cluster of three that a test can
//! cut a node from. `scripts/garage.sh` installs it (`.ci/run` runs that).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const KEY_ID: &str = "GK31c2f218a2e44f485b94239e";
pub const SECRET: &str = "b892c0665f0ada8a4755dae98baa3b133590e3b61b7ee6a5e96466e6a9fc19c4";
pub const REGION: &str = "garage";

/// The garage binary, or None (said, as a skip of `what`) when it is not
/// installed, except under CI, where `.ci/run` installs it and a missing one
/// fails the test.
pub fn binary(what: &str) -> Option<PathBuf> {
    let candidates = [
        std::env::var("GARAGE_BIN").ok().map(PathBuf::from),
        Some(PathBuf::from("/var/cache/nixery-ci/garage/bin/garage")),
    ];
    let found = candidates.into_iter().flatten().find(|p| p.exists());
    if found.is_none() {
        if std::env::var("CI").is_ok() {
            panic!("{what}: garage is not installed, and .ci/run installs it");
        }
        super::skip(&format!(
            "{what}: garage is not installed (bash scripts/garage.sh installs it)"
        ));
    }
    found
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Node {
    pub child: Option<Child>,
    pub config: PathBuf,
    pub s3_port: u16,
    pub rpc_port: u16,
}

impl Node {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    /// Kills the node for good (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A Garage cluster with one bucket and one key that may use it.
pub struct Garage {
    bin: PathBuf,
    pub nodes: Vec<Node>,
    pub bucket: String,
    _dir: tempfile::TempDir,
}

impl Garage {
    /// A cluster of `n` nodes on loopback (replication factor `n`), with
    /// bucket `bucket`; None when garage is not installed (a skip).
    pub fn start(what: &str, n: usize, bucket: &str) -> Option<Garage> {
        let bin = binary(what)?;
        let dir = tempfile::tempdir().unwrap();
        let secret = "6a4b5f8c2d1e0f3a9b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a";
        let mut nodes = Vec::new();
        for i in 0..n {
            let root = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&root).unwrap();
            let (s3_port, rpc_port) = (free_port(), free_port());
            let config = root.join("garage.toml");
            std::fs::write(
                &config,
                format!(
                    r#"metadata_dir = "{root}/meta"
data_dir = "{root}/data"
db_engine = "lmdb"
replication_factor = {n}
rpc_bind_addr = "127.0.0.1:{rpc_port}"
rpc_public_addr = "127.0.0.1:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "127.0.0.1:{s3_port}"
root_domain = ".s3.garage.localhost"
"#,
                    root = root.display()
                ),
            )
            .unwrap();
            let log = std::fs::File::create(root.join("garage.log")).unwrap();
            let child = Command::new(&bin)
                .arg("-c")
                .arg(&config)
                .arg("server")
                .env("RUST_LOG", "garage=warn")
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("starting garage");
            nodes.push(Node {
                child: Some(child),
                config,
                s3_port,
                rpc_port,
            });
        }
        let g = Garage {
            bin,
            nodes,
            bucket: bucket.to_string(),
            _dir: dir,
        };
        // Each node's ID, once its RPC answers (`node id` reads the key from
        // disk; `status` asks the server); then they meet, and the layout
        // gives each one a zone of its own.
        let mut ids = Vec::new();
        for i in 0..n {
            let deadline = Instant::now() + Duration::from_secs(30);
            let id = loop {
                let (ok, out, err) = g.cli(i, &["node", "id", "-q"]);
                if ok && g.cli(i, &["status"]).0 {
                    break out.trim().split('@').next().unwrap().to_string();
                }
                assert!(
                    Instant::now() < deadline,
                    "garage node {i} did not start: {err}"
                );
                std::thread::sleep(Duration::from_millis(200));
            };
            ids.push(id);
        }
        for (i, id) in ids.iter().enumerate().skip(1) {
            let peer = format!("{id}@127.0.0.1:{}", g.nodes[i].rpc_port);
            g.must(0, &["node", "connect", &peer]);
        }
        for (i, id) in ids.iter().enumerate() {
            g.must(
                0,
                &["layout", "assign", "-z", &format!("dc{i}"), "-c", "1G", id],
            );
        }
        g.must(0, &["layout", "apply", "--version", "1"]);
        // Key and bucket: retried while the new layout spreads.
        let deadline = Instant::now() + Duration::from_secs(60);
        for step in [
            vec![
                "key",
                "import",
                "--yes",
                "-n",
                "nixery-test",
                KEY_ID,
                SECRET,
            ],
            vec!["bucket", "create", bucket],
            vec![
                "bucket", "allow", "--read", "--write", "--owner", bucket, "--key", KEY_ID,
            ],
        ] {
            loop {
                let (ok, _, err) = g.cli(0, &step);
                if ok {
                    break;
                }
                assert!(Instant::now() < deadline, "garage {step:?} failed: {err}");
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        Some(g)
    }

    pub fn cli(&self, node: usize, args: &[&str]) -> (bool, String, String) {
        super::run(
            Command::new(&self.bin)
                .arg("-c")
                .arg(&self.nodes[node].config)
                .args(args),
        )
    }

    fn must(&self, node: usize, args: &[&str]) -> String {
        let (ok, out, err) = self.cli(node, args);
        assert!(ok, "garage {args:?}: {err}{out}");
        out
    }

    pub fn endpoint(&self) -> String {
        self.nodes[0].endpoint()
    }

    /// The credentials, as the AWS environment gives them.
    pub fn env() -> Vec<(&'static str, &'static str)> {
        vec![
            ("AWS_ACCESS_KEY_ID", KEY_ID),
            ("AWS_SECRET_ACCESS_KEY", SECRET),
            ("AWS_REGION", REGION),
        ]
    }

    /// `nixery serve` flags for this bucket through `endpoint`, under `prefix`.
    pub fn flags(&self, endpoint: &str, prefix: &str) -> Vec<String> {
        vec![
            "--storage-backend".into(),
            "s3".into(),
            "--s3-endpoint".into(),
            endpoint.into(),
            "--s3-bucket".into(),
            self.bucket.clone(),
            "--s3-region".into(),
            REGION.into(),
            "--s3-prefix".into(),
            prefix.into(),
        ]
    }

    /// An object_store client of the bucket, for looking inside it.
    pub fn client(&self, endpoint: &str) -> std::sync::Arc<dyn object_store::ObjectStore> {
        std::sync::Arc::new(
            object_store::aws::AmazonS3Builder::new()
                .with_endpoint(endpoint)
                .with_allow_http(true)
                .with_bucket_name(&self.bucket)
                .with_region(REGION)
                .with_access_key_id(KEY_ID)
                .with_secret_access_key(SECRET)
                .build()
                .unwrap(),
        )
    }
}

/// Every key under `prefix` in the bucket.
pub async fn keys(os: &dyn object_store::ObjectStore, prefix: &str) -> Vec<String> {
    use futures::TryStreamExt;
    let p = object_store::path::Path::from(prefix);
    let mut out: Vec<String> = os
        .list(Some(&p))
        .map_ok(|m| m.location.to_string())
        .try_collect()
        .await
        .unwrap();
    out.sort();
    out
}

pub fn log_of(node: &Node) -> String {
    std::fs::read_to_string(Path::new(&node.config).with_file_name("garage.log"))
        .unwrap_or_default()
}
