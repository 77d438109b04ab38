//! A TCP proxy between nixery and a real server that a test can turn into a
//! fault: down (connections refused at once), slow (every chunk delayed), or
//! cutting every connection after some bytes sent upstream (a failure in the
//! middle of an upload).

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const PASS: u8 = 0;
const DOWN: u8 = 1;
const CUT: u8 = 2;
const SLOW: u8 = 3;

pub struct Proxy {
    pub port: u16,
    mode: Arc<AtomicU8>,
    cut_after: Arc<AtomicU64>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl Proxy {
    /// Listens on a free loopback port and forwards to `upstream`, on a
    /// thread of its own (so tests may block while it runs).
    pub fn start(upstream: u16) -> Proxy {
        let mode = Arc::new(AtomicU8::new(PASS));
        let cut_after = Arc::new(AtomicU64::new(u64::MAX));
        let (m, c) = (mode.clone(), cut_after.clone());
        let (port, stop) =
            super::files::serve_on_own_thread(move |listener| serve(listener, m, c, upstream));
        Proxy {
            port,
            mode,
            cut_after,
            _stop: stop,
        }
    }
}

async fn serve(listener: TcpListener, m: Arc<AtomicU8>, c: Arc<AtomicU64>, upstream: u16) {
    loop {
        let Ok((client, _)) = listener.accept().await else {
            return;
        };
        let mode = m.load(Ordering::SeqCst);
        if mode == DOWN {
            drop(client);
            continue;
        }
        let (m, c) = (m.clone(), c.clone());
        tokio::spawn(async move {
            let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
                return;
            };
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = pipe(cr, sw, Some(c), m.clone());
            let down = pipe(sr, cw, None, m);
            // Either direction ending ends the connection.
            tokio::select! { _ = up => {}, _ = down => {} }
        });
    }
}

impl Proxy {
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Forwards faithfully.
    pub fn pass(&self) {
        self.mode.store(PASS, Ordering::SeqCst);
    }

    /// Refuses connections: new ones are closed at once, open ones at
    /// their next bytes.
    pub fn down(&self) {
        self.mode.store(DOWN, Ordering::SeqCst);
    }

    /// Every connection is cut after `bytes` more sent upstream.
    pub fn cut_after(&self, bytes: u64) {
        self.cut_after.store(bytes, Ordering::SeqCst);
        self.mode.store(CUT, Ordering::SeqCst);
    }

    /// Every chunk in either direction waits a second first.
    pub fn slow(&self) {
        self.mode.store(SLOW, Ordering::SeqCst);
    }
}

async fn pipe(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    cut: Option<Arc<AtomicU64>>,
    mode: Arc<AtomicU8>,
) {
    let mut buf = vec![0u8; 64 * 1024];
    // Bytes sent upstream while cutting (a pooled connection counts too).
    let mut sent_cutting = 0u64;
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let mut n = n;
        match mode.load(Ordering::SeqCst) {
            DOWN => return,
            SLOW => tokio::time::sleep(Duration::from_secs(1)).await,
            CUT => {
                if let Some(limit) = &cut {
                    let left = limit.load(Ordering::SeqCst).saturating_sub(sent_cutting);
                    if left == 0 {
                        return;
                    }
                    n = n.min(left as usize);
                    sent_cutting += n as u64;
                }
            }
            _ => {}
        }
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}
