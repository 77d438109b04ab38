//! A real HTTP server of a directory's files (GET; 404 for anything else),
//! for channel tarballs: what a channel URL answers, served from this host.
//! And `serve_on_own_thread`, which it shares with the fault proxy.

use std::future::Future;
use std::path::{Path, PathBuf};

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};

/// Listens on a free loopback port and runs `serve` with that listener on a
/// thread of its own (so tests may block while it runs), until the returned
/// sender is dropped.
pub fn serve_on_own_thread<F, Fut>(serve: F) -> (u16, tokio::sync::oneshot::Sender<()>)
where
    F: FnOnce(tokio::net::TcpListener) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::from_std(listener).unwrap();
            tokio::select! {
                _ = serve(listener) => {}
                _ = stopped => {}
            }
        });
    });
    (port, stop)
}

pub struct FileServer {
    pub port: u16,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl FileServer {
    /// Serves `dir` on a free loopback port, on a thread of its own.
    pub fn start(dir: PathBuf) -> FileServer {
        let (port, stop) = serve_on_own_thread(move |listener| async move {
            let app = axum::Router::new().fallback(move |req: Request<Body>| {
                let dir = dir.clone();
                async move {
                    let rel = req.uri().path().trim_start_matches('/').to_string();
                    let file = (!rel.contains("..")).then(|| dir.join(rel));
                    match file.map(std::fs::read) {
                        Some(Ok(bytes)) => Response::new(Body::from(bytes)),
                        _ => Response::builder()
                            .status(StatusCode::NOT_FOUND)
                            .body(Body::from("not found"))
                            .unwrap(),
                    }
                }
            });
            let _ = axum::serve(listener, app).await;
        });
        FileServer { port, _stop: stop }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }
}

/// A channel tarball `web/<name>` holding `files` (name, contents) in one
/// top-level directory, as GitHub's and channels.nixos.org's tarballs are,
/// and the hash Nix pins its unpacked contents by, from `nix-hash` run on
/// the directory the tarball was made of.
pub fn channel_tarball(web: &Path, name: &str, files: &[(&str, &[u8])]) -> String {
    let staging = tempfile::tempdir_in({
        std::fs::create_dir_all(web).unwrap();
        web
    })
    .unwrap();
    let src = staging.path().join("nixpkgs");
    std::fs::create_dir_all(&src).unwrap();
    for (file, contents) in files {
        std::fs::write(src.join(file), contents).unwrap();
    }
    let (ok, _, err) = super::run(
        std::process::Command::new("tar")
            .arg("-czf")
            .arg(web.join(name))
            .arg("-C")
            .arg(staging.path())
            .arg("nixpkgs"),
    );
    assert!(ok, "tar: {err}");
    let (ok, out, err) = super::run(
        std::process::Command::new("nix-hash")
            .args(["--type", "sha256", "--base32"])
            .arg(&src),
    );
    assert!(ok, "nix-hash: {err}");
    out.trim().to_string()
}
