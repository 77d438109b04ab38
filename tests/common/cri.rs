//! A node's container runtime for tests and benchmarks: a private containerd
//! (Debian's, with its CRI plugin and runc) with its own root, state, sockets
//! and config beside any other containerd, and a kubelet's side of a Pod
//! start driven over its CRI: ImageStatus, PullImage when the image is
//! absent, RunPodSandbox on the host network (no CNI), CreateContainer,
//! StartContainer, and waiting until the container exits.
//! See ../shared/CRI-NOTES.md for the settings and why.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    ContainerConfig, ContainerMetadata, ContainerState, ContainerStatusRequest,
    CreateContainerRequest, ImageSpec, LinuxPodSandboxConfig, LinuxSandboxSecurityContext,
    ListPodSandboxRequest, NamespaceMode, NamespaceOption, PodSandboxConfig, PodSandboxMetadata,
    RemovePodSandboxRequest, RunPodSandboxRequest, StartContainerRequest, StatusRequest,
    StopPodSandboxRequest,
};
use tonic::transport::Channel;

/// A private containerd; stopped, with its sandboxes, on drop.
pub struct Containerd {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
    child: Option<Child>,
    pub runtime: nixery::cri::Runtime,
    client: RuntimeServiceClient<Channel>,
}

/// How one Pod start went.
pub struct PodStart {
    pub sandbox: String,
    /// Whether the image had to be pulled first.
    pub pulled: bool,
    pub exit_code: i32,
    /// What the container printed (the CRI log's message parts).
    pub output: String,
    /// From the image check to the container's exit.
    pub elapsed: Duration,
}

/// Why no containerd could be started here.
pub fn unavailable() -> Option<String> {
    for tool in ["containerd", "runc", "containerd-shim-runc-v2"] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {tool}"))
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !found {
            return Some(format!(
                "{tool} is not installed (Debian: containerd, runc)"
            ));
        }
    }
    if unsafe { libc::geteuid() } != 0 {
        return Some("a containerd with runc needs root".into());
    }
    None
}

fn channel(socket: &Path) -> Channel {
    nixery::cri::channel(socket).unwrap()
}

impl Containerd {
    /// Starts a containerd whose sandboxes run `sandbox_image` (which it
    /// pulls when a sandbox first needs it; a registry on loopback is
    /// pulled over plain HTTP).
    pub async fn start(sandbox_image: &str) -> Self {
        // Overlay mounts need a real file system under the root, not tmpfs.
        let dir = tempfile::Builder::new()
            .prefix("nixery-containerd-")
            .tempdir_in("/var/tmp")
            .unwrap();
        let d = dir.path();
        for sub in [
            "root", "state", "opt", "certs.d", "cni/conf", "cni/bin", "pods",
        ] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        let socket = d.join("containerd.sock");
        let config = format!(
            r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.snapshotter.v1.btrfs", "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.aufs"]
[grpc]
  address = "{d}/containerd.sock"
[ttrpc]
  address = "{d}/containerd.sock.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
[plugins."io.containerd.grpc.v1.cri"]
  restrict_oom_score_adj = true
  disable_apparmor = true
  sandbox_image = "{sandbox_image}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  [plugins."io.containerd.grpc.v1.cri".cni]
    conf_dir = "{d}/cni/conf"
    bin_dir = "{d}/cni/bin"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "{d}/certs.d"
"#,
            d = d.display()
        );
        std::fs::write(d.join("config.toml"), config).unwrap();
        let log = std::fs::File::create(d.join("containerd.log")).unwrap();
        let mut cmd = Command::new("containerd");
        cmd.arg("--config")
            .arg(d.join("config.toml"))
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        // It goes with the test process, however that ends.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM);
                Ok(())
            });
        }
        let child = cmd.spawn().expect("starting containerd");
        let runtime = nixery::cri::Runtime::new(&socket).unwrap();
        let client = RuntimeServiceClient::new(channel(&socket));
        let mut c = Containerd {
            dir,
            socket,
            child: Some(child),
            runtime,
            client,
        };
        c.wait_ready().await;
        c
    }

    /// Waits until the CRI says the runtime is ready (at most 60 s).
    async fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                panic!("containerd exited ({status}):\n{}", self.log());
            }
            if let Ok(r) = self.client.status(StatusRequest { verbose: false }).await {
                let ready = r.into_inner().status.is_some_and(|s| {
                    s.conditions
                        .iter()
                        .any(|c| c.r#type == "RuntimeReady" && c.status)
                });
                if ready {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "containerd not ready after 60 s:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("containerd.log")).unwrap_or_default()
    }

    /// Starts a Pod of one container as a kubelet would with
    /// `imagePullPolicy: IfNotPresent`, and waits until its container exits
    /// (at most `timeout`). The Pod stays, as a kubelet keeps an exited one,
    /// until `remove_pod`.
    pub async fn run_pod(
        &self,
        name: &str,
        image: &str,
        command: &[&str],
        timeout: Duration,
    ) -> PodStart {
        let started = Instant::now();
        let pulled = match self.runtime.image(image).await.unwrap() {
            Some(_) => false,
            None => {
                self.runtime.pull(image).await.unwrap();
                true
            }
        };
        let mut client = self.client.clone();
        let logs = self.dir.path().join("pods").join(name);
        std::fs::create_dir_all(&logs).unwrap();
        let sandbox_config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{name}"),
                namespace: "default".into(),
                attempt: 0,
            }),
            // (No hostname: a kubelet sets none for host-network Pods.)
            log_directory: logs.display().to_string(),
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Node as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let sandbox = client
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(sandbox_config.clone()),
                runtime_handler: String::new(),
            })
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox: {e}\n{}", self.log()))
            .into_inner()
            .pod_sandbox_id;
        let container = client
            .create_container(CreateContainerRequest {
                pod_sandbox_id: sandbox.clone(),
                config: Some(ContainerConfig {
                    metadata: Some(ContainerMetadata {
                        name: "main".into(),
                        attempt: 0,
                    }),
                    image: Some(ImageSpec {
                        image: image.into(),
                        ..Default::default()
                    }),
                    command: command.iter().map(|s| s.to_string()).collect(),
                    log_path: "main.log".into(),
                    ..Default::default()
                }),
                sandbox_config: Some(sandbox_config),
            })
            .await
            .unwrap_or_else(|e| panic!("CreateContainer: {e}\n{}", self.log()))
            .into_inner()
            .container_id;
        client
            .start_container(StartContainerRequest {
                container_id: container.clone(),
            })
            .await
            .unwrap_or_else(|e| panic!("StartContainer: {e}\n{}", self.log()));
        let exit_code = loop {
            let status = client
                .container_status(ContainerStatusRequest {
                    container_id: container.clone(),
                    verbose: false,
                })
                .await
                .unwrap()
                .into_inner()
                .status
                .unwrap();
            if status.state == ContainerState::ContainerExited as i32 {
                break status.exit_code;
            }
            assert!(
                started.elapsed() < timeout,
                "the container did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let elapsed = started.elapsed();
        // CRI log lines: `<time> <stream> <P|F> <message>`.
        let output = std::fs::read_to_string(logs.join("main.log"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.splitn(4, ' ').nth(3))
            .collect::<Vec<_>>()
            .join("\n");
        PodStart {
            sandbox,
            pulled,
            exit_code,
            output,
            elapsed,
        }
    }

    /// Stops and removes a Pod (its containers go with it).
    pub async fn remove_pod(&self, sandbox: &str) {
        remove_pod(&mut self.client.clone(), sandbox).await.unwrap();
    }
}

/// StopPodSandbox (which may find it stopped), then RemovePodSandbox.
async fn remove_pod(
    client: &mut RuntimeServiceClient<Channel>,
    sandbox: &str,
) -> Result<(), tonic::Status> {
    let _ = client
        .stop_pod_sandbox(StopPodSandboxRequest {
            pod_sandbox_id: sandbox.into(),
        })
        .await;
    client
        .remove_pod_sandbox(RemovePodSandboxRequest {
            pod_sandbox_id: sandbox.into(),
        })
        .await
        .map(|_| ())
}

impl Drop for Containerd {
    fn drop(&mut self) {
        // Sandboxes first, or runc's shims and overlay mounts stay behind.
        let socket = self.socket.clone();
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let mut client = RuntimeServiceClient::new(channel(&socket));
                let Ok(pods) = client
                    .list_pod_sandbox(ListPodSandboxRequest { filter: None })
                    .await
                else {
                    return;
                };
                for p in pods.into_inner().items {
                    let _ = remove_pod(&mut client, &p.id).await;
                }
            });
        })
        .join();
        if let Some(mut child) = self.child.take() {
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Whatever overlay mounts remain under the root go before the files.
        let root = self.dir.path().display().to_string();
        if let Ok(mounts) = std::fs::read_to_string("/proc/self/mounts") {
            let mut under: Vec<&str> = mounts
                .lines()
                .filter_map(|l| l.split(' ').nth(1))
                .filter(|m| m.starts_with(&root))
                .collect();
            under.sort_by_key(|m| std::cmp::Reverse(m.len()));
            for m in under {
                let _ = Command::new("umount").arg("-l").arg(m).status();
            }
        }
    }
}
