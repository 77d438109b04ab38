//! An image as one tar file that `docker load`, `ctr images import` and
//! `podman load` all read: an OCI image layout (`oci-layout`, `index.json`,
//! `blobs/sha256/...`) with Docker's `manifest.json` beside it pointing at the
//! same blobs, the shape `docker save` writes since Docker 25. Docker before
//! 25 reads only `manifest.json` (and unpacks gzip layers itself); containerd
//! reads the index.
//!
//! Blobs stream from the store into the tar; the file appears under its name
//! only when complete.

use std::io;
use std::path::Path;

use futures::StreamExt;
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::name::Digest;
use crate::store::BlobStore;

/// A manifest's config and layers as (digest, size), read with oci-spec.
fn parse_manifest(manifest: &[u8]) -> io::Result<Parts> {
    let bad = |e: &dyn std::fmt::Display| {
        io::Error::new(io::ErrorKind::InvalidData, format!("manifest: {e}"))
    };
    let m = oci_spec::image::ImageManifest::from_reader(manifest).map_err(|e| bad(&e))?;
    let desc = |d: &oci_spec::image::Descriptor| -> io::Result<(Digest, u64)> {
        let digest: Digest = d.digest().to_string().parse().map_err(|e| bad(&e))?;
        Ok((digest, d.size()))
    };
    Ok(Parts {
        config: desc(m.config())?,
        layers: m.layers().iter().map(desc).collect::<io::Result<_>>()?,
    })
}

struct Parts {
    config: (Digest, u64),
    layers: Vec<(Digest, u64)>,
}

/// A reference as containerd (and so a kubelet) names it: `nixery-agent:v1`
/// is `docker.io/library/nixery-agent:v1`, as Docker's own normalising does.
pub fn fully_qualified(reference: &str) -> String {
    let first = reference.split('/').next().unwrap_or_default();
    let has_domain = reference.contains('/')
        && (first.contains('.') || first.contains(':') || first == "localhost");
    if has_domain {
        reference.to_string()
    } else if reference.contains('/') {
        format!("docker.io/{reference}")
    } else {
        format!("docker.io/library/{reference}")
    }
}

fn blob_path(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// Writes `oci_manifest` (an OCI image manifest whose blobs are in `store`)
/// and its blobs to `out` as an archive tagged `reference` (`name:tag`).
pub async fn write_archive(
    store: &dyn BlobStore,
    oci_manifest: &[u8],
    reference: &str,
    out: &Path,
) -> io::Result<()> {
    let parts = parse_manifest(oci_manifest)?;
    let manifest_digest = Digest::of(oci_manifest);
    let tag = reference
        .rsplit_once(':')
        .map(|(_, t)| t)
        .unwrap_or("latest");
    let index = json!({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.index.v1+json",
        "manifests": [{
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "digest": manifest_digest.as_str(),
            "size": oci_manifest.len(),
            "annotations": {
                "io.containerd.image.name": fully_qualified(reference),
                "org.opencontainers.image.ref.name": tag,
            },
        }],
    });
    let docker = json!([{
        "Config": blob_path(&parts.config.0),
        "RepoTags": [reference],
        "Layers": parts.layers.iter().map(|(d, _)| blob_path(d)).collect::<Vec<_>>(),
    }]);

    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".nixery-archive-")
        .tempfile_in(dir)?;
    let mut file = tokio::fs::File::from_std(tmp.reopen()?);
    let mut w = TarWriter { out: &mut file };
    w.dir("blobs/").await?;
    w.dir("blobs/sha256/").await?;
    w.file("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)
        .await?;
    w.file("index.json", &serde_json::to_vec(&index)?).await?;
    w.file("manifest.json", &serde_json::to_vec(&docker)?)
        .await?;
    w.file(&blob_path(&manifest_digest), oci_manifest).await?;
    // A layer shared by two places in one image is stored once.
    let mut seen = std::collections::HashSet::new();
    for (digest, size) in std::iter::once(&parts.config).chain(&parts.layers) {
        if !seen.insert(digest.clone()) {
            continue;
        }
        let mut stream = store
            .get(digest, None)
            .await
            .map_err(io::Error::other)?
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::NotFound,
                    format!("blob {digest} is not stored"),
                )
            })?;
        w.header(&blob_path(digest), *size).await?;
        let mut written = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            written += chunk.len() as u64;
            w.out.write_all(&chunk).await?;
        }
        if written != *size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("blob {digest}: {written} bytes stored, the manifest says {size}"),
            ));
        }
        w.pad(*size).await?;
    }
    // The end of a tar: two zero blocks.
    w.out.write_all(&[0u8; 1024]).await?;
    file.sync_all().await?;
    drop(file);
    // Readable as any file a command writes (tempfile makes it 0600).
    std::fs::set_permissions(
        tmp.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o644),
    )?;
    tmp.persist(out).map_err(|e| e.error)?;
    Ok(())
}

struct TarWriter<'a> {
    out: &'a mut tokio::fs::File,
}

impl TarWriter<'_> {
    async fn entry(&mut self, path: &str, size: u64, kind: tar::EntryType) -> io::Result<()> {
        let mut h = tar::Header::new_ustar();
        h.set_path(path)?;
        h.set_size(size);
        h.set_mode(if kind.is_dir() { 0o755 } else { 0o644 });
        h.set_mtime(0);
        h.set_entry_type(kind);
        h.set_cksum();
        self.out.write_all(h.as_bytes()).await
    }

    async fn header(&mut self, path: &str, size: u64) -> io::Result<()> {
        self.entry(path, size, tar::EntryType::Regular).await
    }

    async fn dir(&mut self, path: &str) -> io::Result<()> {
        self.entry(path, 0, tar::EntryType::Directory).await
    }

    async fn pad(&mut self, size: u64) -> io::Result<()> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.out.write_all(&[0u8; 512][..512 - rem]).await?;
        }
        Ok(())
    }

    async fn file(&mut self, path: &str, data: &[u8]) -> io::Result<()> {
        self.header(path, data.len() as u64).await?;
        self.out.write_all(data).await?;
        self.pad(data.len() as u64).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{put_bytes, LocalStore};

    #[test]
    fn references_are_named_as_containerd_names_them() {
        assert_eq!(
            fully_qualified("nixery-agent:v1"),
            "docker.io/library/nixery-agent:v1"
        );
        assert_eq!(
            fully_qualified("shell/hello:latest"),
            "docker.io/shell/hello:latest"
        );
        assert_eq!(
            fully_qualified("127.0.0.1:5000/shell:x"),
            "127.0.0.1:5000/shell:x"
        );
        assert_eq!(fully_qualified("localhost/a:b"), "localhost/a:b");
        assert_eq!(fully_qualified("ghcr.io/o/a:b"), "ghcr.io/o/a:b");
    }

    /// The archive holds every blob once, under its digest, and both indexes
    /// point at them; a blob the store lacks fails the write and leaves no file.
    #[tokio::test]
    async fn archive_layout_and_missing_blob() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::open(&dir.path().join("blobs")).unwrap();
        let config = br#"{"architecture":"amd64","os":"linux"}"#;
        let layer = vec![7u8; 1000];
        let c = put_bytes(&store, config).await.unwrap();
        let l = put_bytes(&store, &layer).await.unwrap();
        let manifest = serde_json::to_vec(&json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": c.as_str(), "size": config.len()},
            "layers": [
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l.as_str(), "size": layer.len()},
                {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l.as_str(), "size": layer.len()},
            ],
        }))
        .unwrap();
        let out = dir.path().join("image.tar");
        write_archive(&store, &manifest, "demo:v1", &out)
            .await
            .unwrap();
        let mut files = std::collections::BTreeMap::new();
        let mut ar = tar::Archive::new(std::fs::File::open(&out).unwrap());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let path = e.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            std::io::Read::read_to_end(&mut e, &mut data).unwrap();
            assert!(files.insert(path, data).is_none(), "an entry appears twice");
        }
        assert_eq!(files[&format!("blobs/sha256/{}", c.hex())], config);
        assert_eq!(files[&format!("blobs/sha256/{}", l.hex())], layer);
        let m = Digest::of(&manifest);
        assert_eq!(files[&format!("blobs/sha256/{}", m.hex())], manifest);
        let docker: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(docker[0]["RepoTags"][0], "demo:v1");
        assert_eq!(docker[0]["Config"], format!("blobs/sha256/{}", c.hex()));
        assert_eq!(docker[0]["Layers"].as_array().unwrap().len(), 2);
        let index: serde_json::Value = serde_json::from_slice(&files["index.json"]).unwrap();
        assert_eq!(index["manifests"][0]["digest"], m.as_str());
        assert_eq!(
            index["manifests"][0]["annotations"]["io.containerd.image.name"],
            "docker.io/library/demo:v1"
        );
        assert_eq!(
            files.len(),
            8,
            "dirs, oci-layout, index, manifest.json, 3 blobs: {:?}",
            files.keys()
        );

        // A manifest naming a blob the store does not have.
        store.delete(&l).await.unwrap();
        let out2 = dir.path().join("broken.tar");
        let err = write_archive(&store, &manifest, "demo:v1", &out2)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("is not stored"), "{err}");
        assert!(!out2.exists());
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| {
                e.file_name()
                    .to_string_lossy()
                    .starts_with(".nixery-archive-")
            })
            .collect();
        assert!(leftovers.is_empty(), "a partial archive was left behind");
    }
}
