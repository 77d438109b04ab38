//! The node's container runtime, through the CRI a kubelet speaks (containerd,
//! CRI-O, k3s's containerd): where its socket is, and the image calls.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use hyper_util::rt::TokioIo;
use k8s_cri::v1::image_service_client::ImageServiceClient;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::{
    Image, ImageSpec, ImageStatusRequest, ListContainersRequest, PullImageRequest,
    RemoveImageRequest, VersionRequest,
};
use tonic::transport::{Channel, Endpoint, Uri};

/// Where runtimes put their CRI socket, in the order a kubelet's users most
/// often have them: containerd, CRI-O, k3s's containerd.
pub const SOCKETS: &[&str] = &[
    "/run/containerd/containerd.sock",
    "/run/crio/crio.sock",
    "/var/run/crio/crio.sock",
    "/run/k3s/containerd/containerd.sock",
];

/// The first socket of `SOCKETS` that exists under one of `roots` (`/` on a
/// host; in the agent's Pod also `/host`, where deploy/ mounts the node's /run).
pub fn find_socket(roots: &[&Path]) -> Option<PathBuf> {
    SOCKETS.iter().find_map(|s| {
        roots.iter().find_map(|root| {
            let p = root.join(s.trim_start_matches('/'));
            is_socket(&p).then_some(p)
        })
    })
}

fn is_socket(p: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(p).is_ok_and(|m| m.file_type().is_socket())
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the container runtime's socket {0} is not a valid endpoint")]
    Endpoint(String, #[source] tonic::transport::Error),
    #[error("the container runtime's {call} failed: {}", .source.message())]
    Call {
        call: &'static str,
        #[source]
        source: tonic::Status,
    },
}

fn call(call: &'static str) -> impl FnOnce(tonic::Status) -> Error {
    move |source| Error::Call { call, source }
}

fn spec(reference: &str) -> Option<ImageSpec> {
    Some(ImageSpec {
        image: reference.to_string(),
        ..Default::default()
    })
}

/// One runtime's CRI. Cheap to clone; connects on first use and again after
/// the runtime restarts.
#[derive(Clone)]
pub struct Runtime {
    socket: PathBuf,
    images: ImageServiceClient<Channel>,
    runtime: RuntimeServiceClient<Channel>,
}

/// A gRPC channel to a unix socket, connected on first use and again
/// after the peer restarts.
pub fn channel(socket: &Path) -> Result<Channel, Error> {
    let path = socket.to_path_buf();
    // The URI is a placeholder: every connection goes to the socket.
    Ok(Endpoint::try_from("http://[::1]:50051")
        .map_err(|e| Error::Endpoint(socket.display().to_string(), e))?
        .connect_timeout(Duration::from_secs(10))
        .connect_with_connector_lazy(tower::service_fn(move |_: Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?))
            }
        })))
}

impl Runtime {
    pub fn new(socket: &Path) -> Result<Self, Error> {
        let channel = channel(socket)?;
        // An image's status with many references, and a long pull, both fit.
        Ok(Runtime {
            socket: socket.to_path_buf(),
            images: ImageServiceClient::new(channel.clone()).max_decoding_message_size(16 << 20),
            runtime: RuntimeServiceClient::new(channel).max_decoding_message_size(16 << 20),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// The runtime's name and version, as `crictl version` shows them
    /// (`containerd 1.6.20`).
    pub async fn version(&self) -> Result<String, Error> {
        let v = self
            .runtime
            .clone()
            .version(VersionRequest {
                version: "v1".into(),
            })
            .await
            .map_err(call("Version"))?
            .into_inner();
        Ok(format!("{} {}", v.runtime_name, v.runtime_version))
    }

    /// The image a reference names in the runtime, if it has it.
    pub async fn image(&self, reference: &str) -> Result<Option<Image>, Error> {
        Ok(self
            .images
            .clone()
            .image_status(ImageStatusRequest {
                image: spec(reference),
                verbose: false,
            })
            .await
            .map_err(call("ImageStatus"))?
            .into_inner()
            .image)
    }

    /// Pulls a reference, as a kubelet does for a Pod; answers the image's id.
    pub async fn pull(&self, reference: &str) -> Result<String, Error> {
        Ok(self
            .images
            .clone()
            .pull_image(PullImageRequest {
                image: spec(reference),
                ..Default::default()
            })
            .await
            .map_err(call("PullImage"))?
            .into_inner()
            .image_ref)
    }

    /// Removes an image with every reference it has (the CRI removes images,
    /// not single references).
    pub async fn remove(&self, reference: &str) -> Result<(), Error> {
        self.images
            .clone()
            .remove_image(RemoveImageRequest {
                image: spec(reference),
            })
            .await
            .map_err(call("RemoveImage"))?;
        Ok(())
    }

    /// Every image any container uses, running or exited (a kubelet's image
    /// garbage collection counts both): ids and references as the runtime
    /// reports them.
    pub async fn images_in_use(&self) -> Result<BTreeSet<String>, Error> {
        let containers = self
            .runtime
            .clone()
            .list_containers(ListContainersRequest { filter: None })
            .await
            .map_err(call("ListContainers"))?
            .into_inner()
            .containers;
        Ok(containers
            .into_iter()
            .flat_map(|c| [Some(c.image_ref), c.image.map(|i| i.image)])
            .flatten()
            .filter(|s| !s.is_empty())
            .collect())
    }
}

/// Every name an image answers to in the runtime: its id, tags and digests.
pub fn names(image: &Image) -> BTreeSet<String> {
    std::iter::once(image.id.clone())
        .chain(image.repo_tags.iter().cloned())
        .chain(image.repo_digests.iter().cloned())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_runtime_socket_under_any_root() {
        let dir = tempfile::tempdir().unwrap();
        let host = dir.path().join("host");
        assert_eq!(find_socket(&[dir.path(), &host]), None);
        // A plain file at a socket's path is not a runtime.
        std::fs::create_dir_all(host.join("run/crio")).unwrap();
        std::fs::write(host.join("run/crio/crio.sock"), "").unwrap();
        assert_eq!(find_socket(&[dir.path(), &host]), None);
        std::fs::remove_file(host.join("run/crio/crio.sock")).unwrap();
        let crio = host.join("run/crio/crio.sock");
        let _l1 = std::os::unix::net::UnixListener::bind(&crio).unwrap();
        assert_eq!(find_socket(&[dir.path(), &host]), Some(crio.clone()));
        // containerd comes first, wherever it is.
        std::fs::create_dir_all(dir.path().join("run/containerd")).unwrap();
        let containerd = dir.path().join("run/containerd/containerd.sock");
        let _l2 = std::os::unix::net::UnixListener::bind(&containerd).unwrap();
        assert_eq!(find_socket(&[dir.path(), &host]), Some(containerd));
    }
}
