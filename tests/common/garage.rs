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
    /// The node's container, when it runs in one (`Garage::start_in_docker`).
    pub container: Option<String>,
    pub network: Option<String>,
    pub config: PathBuf,
    /// Its address: 127.0.0.1, or the container's on the private network.
    pub host: String,
    pub s3_port: u16,
    pub rpc_port: u16,
}

impl Node {
    pub fn endpoint(&self) -> String {
        format!("http://{}:{}", self.host, self.s3_port)
    }

    /// Kills the node for good (SIGKILL: no goodbye to its peers).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if let Some(c) = self.container.take() {
            let _ = Command::new("docker").args(["rm", "-f", &c]).output();
        }
    }

    /// Cuts a container node off its network: alive, but unreachable.
    pub fn disconnect(&self) {
        let (c, n) = (
            self.container.as_ref().unwrap(),
            self.network.as_ref().unwrap(),
        );
        let (ok, _, err) = super::run(Command::new("docker").args(["network", "disconnect", n, c]));
        assert!(ok, "docker network disconnect: {err}");
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
    /// The private Docker network of container nodes, removed on drop.
    network: Option<String>,
    _dir: tempfile::TempDir,
}

impl Drop for Garage {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        if let Some(net) = &self.network {
            let _ = Command::new("docker").args(["network", "rm", net]).output();
        }
    }
}

fn config_text(dirs: &str, n: usize, host: &str, s3_port: u16, rpc_port: u16) -> String {
    let secret = "6a4b5f8c2d1e0f3a9b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f1a0b9c8d7e6f5a";
    format!(
        r#"metadata_dir = "{dirs}/meta"
data_dir = "{dirs}/data"
db_engine = "lmdb"
replication_factor = {n}
rpc_bind_addr = "{host}:{rpc_port}"
rpc_public_addr = "{host}:{rpc_port}"
rpc_secret = "{secret}"

[s3_api]
s3_region = "{REGION}"
api_bind_addr = "{host}:{s3_port}"
root_domain = ".s3.garage.localhost"
"#
    )
}

impl Garage {
    /// A cluster of `n` nodes on loopback (replication factor `n`), with
    /// bucket `bucket`; None when garage is not installed (a skip).
    pub fn start(what: &str, n: usize, bucket: &str) -> Option<Garage> {
        let bin = binary(what)?;
        let dir = tempfile::tempdir().unwrap();
        let mut nodes = Vec::new();
        for i in 0..n {
            let root = dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&root).unwrap();
            let (s3_port, rpc_port) = (free_port(), free_port());
            let config = root.join("garage.toml");
            let dirs = root.display().to_string();
            std::fs::write(
                &config,
                config_text(&dirs, n, "127.0.0.1", s3_port, rpc_port),
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
                container: None,
                network: None,
                config,
                host: "127.0.0.1".into(),
                s3_port,
                rpc_port,
            });
        }
        let g = Garage {
            bin,
            nodes,
            bucket: bucket.to_string(),
            network: None,
            _dir: dir,
        };
        g.setup(bucket);
        Some(g)
    }

    /// A cluster of `n` nodes, each in a container of its own on a private
    /// Docker network (the host reaches them at their addresses there); the
    /// image holds only garage and the libraries it loads, imported once.
    pub fn start_in_docker(what: &str, n: usize, bucket: &str) -> Option<Garage> {
        let bin = binary(what)?;
        let image = "nixery-test/garage:2.5.0";
        if !super::run(Command::new("docker").args(["image", "inspect", image])).0 {
            let (ok, _, err) = super::run(Command::new("sh").arg("-c").arg(format!(
                "tar -c --dereference -f - {} /lib/x86_64-linux-gnu/libgcc_s.so.1 \
                 /lib/x86_64-linux-gnu/libm.so.6 /lib/x86_64-linux-gnu/libc.so.6 \
                 /lib64/ld-linux-x86-64.so.2 2>/dev/null | docker import - {image}",
                bin.display(),
            )));
            assert!(ok, "making the garage image: {err}");
        }
        let network = format!("nixery-garage-{}-{bucket}", std::process::id());
        // A subnet of our own (fixed addresses need one): the first free
        // 10.213.x.0/24.
        let mut base = None;
        for k in 0..64u32 {
            let x = (std::process::id() + k * 37) % 250;
            let (ok, _, err) = super::run(Command::new("docker").args([
                "network",
                "create",
                "--subnet",
                &format!("10.213.{x}.0/24"),
                &network,
            ]));
            if ok {
                base = Some(format!("10.213.{x}"));
                break;
            }
            assert!(err.contains("overlap"), "docker network create: {err}");
        }
        let base = base.expect("no free 10.213.x.0/24 subnet for the Garage network");
        // From here on, a panic removes what was made (Drop).
        let mut g = Garage {
            bin: bin.clone(),
            nodes: Vec::new(),
            bucket: bucket.to_string(),
            network: Some(network.clone()),
            _dir: tempfile::tempdir().unwrap(),
        };
        for i in 0..n {
            let root = g._dir.path().join(format!("node{i}"));
            std::fs::create_dir_all(&root).unwrap();
            let host = format!("{base}.{}", 10 + i);
            let config = root.join("garage.toml");
            std::fs::write(&config, config_text("/data", n, &host, 3900, 3901)).unwrap();
            let name = format!("{network}-{i}");
            let (ok, _, err) = super::run(Command::new("docker").args([
                "run",
                "-d",
                "--name",
                &name,
                "--network",
                &network,
                "--ip",
                &host,
                "-e",
                "RUST_LOG=garage=warn",
                "-v",
                &format!("{}:/etc/garage.toml:ro", config.display()),
                "--tmpfs",
                "/data",
                image,
                &bin.display().to_string(),
                "-c",
                "/etc/garage.toml",
                "server",
            ]));
            // Removed on drop even if it failed to start.
            g.nodes.push(Node {
                child: None,
                container: Some(name),
                network: Some(network.clone()),
                config,
                host,
                s3_port: 3900,
                rpc_port: 3901,
            });
            assert!(ok, "docker run garage: {err}");
        }
        g.setup(bucket);
        Some(g)
    }

    /// Joins the nodes into one layout, then makes the key and the bucket.
    fn setup(&self, bucket: &str) {
        let (g, n) = (self, self.nodes.len());
        // Each node's ID, once its RPC answers (`node id` reads the key from
        // disk; `status` asks the server); then they meet, and the layout
        // gives each one a zone of its own.
        let mut ids = Vec::new();
        for i in 0..n {
            let deadline = Instant::now() + Duration::from_secs(30);
            let id = loop {
                let (ok, out, err) = g.cli(i, &["node", "id", "-q"]);
                let (up, _, status_err) = g.cli(i, &["status"]);
                if ok && up {
                    break out.trim().split('@').next().unwrap().to_string();
                }
                assert!(
                    Instant::now() < deadline,
                    "garage node {i} did not start: {err}{status_err}\n{}",
                    g.node_log(i)
                );
                std::thread::sleep(Duration::from_millis(200));
            };
            ids.push(id);
        }
        for (i, id) in ids.iter().enumerate().skip(1) {
            let peer = format!("{id}@{}:{}", g.nodes[i].host, g.nodes[i].rpc_port);
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
    }

    /// What a node process said (its log's last lines), or its container's
    /// log, for a failure message.
    fn node_log(&self, node: usize) -> String {
        let n = &self.nodes[node];
        let text = match &n.container {
            Some(c) => super::run(Command::new("docker").args(["logs", "--tail", "20", c])).2,
            None => {
                std::fs::read_to_string(n.config.with_file_name("garage.log")).unwrap_or_default()
            }
        };
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "its log ends:\n{}",
            lines[lines.len().saturating_sub(20)..].join("\n")
        )
    }

    pub fn cli(&self, node: usize, args: &[&str]) -> (bool, String, String) {
        let n = &self.nodes[node];
        match &n.container {
            Some(c) => super::run(
                Command::new("docker")
                    .args(["exec", c])
                    .arg(&self.bin)
                    .args(["-c", "/etc/garage.toml"])
                    .args(args),
            ),
            None => super::run(Command::new(&self.bin).arg("-c").arg(&n.config).args(args)),
        }
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
