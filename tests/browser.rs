//! The page at `/` in a real browser (Debian's chromium, headless), driven
//! over WebDriver (chromedriver) as a person would use it: the page stays
//! open with its event stream, and the test waits for text to appear. An
//! image built is listed with its digest; a build started while the page is
//! open appears with its stage, and a failed one with its reason, without a
//! reload; and a screenshot is taken.

mod common;

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use fantoccini::{Client, ClientBuilder, Locator};

/// chromedriver on a free loopback port, stopped with the test.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    async fn start() -> Driver {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        // Ready once its status says so (it takes a moment to listen).
        let status = format!("{url}/status");
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let s = status.clone();
            let (code, body) = tokio::task::spawn_blocking(move || http_get(&s))
                .await
                .unwrap();
            if code == 200 && body.contains("\"ready\":true") {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Driver { child, url }
    }

    /// A headless chromium session (as root in a container: no sandbox).
    async fn browser(&self) -> Client {
        let mut caps = serde_json::Map::new();
        caps.insert(
            "goog:chromeOptions".into(),
            serde_json::json!({ "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu",
                "--disable-dev-shm-usage", "--window-size=1100,800"
            ] }),
        );
        ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(caps)
            .connect(&self.url)
            .await
            .expect("a chromium session from chromedriver")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until the text of `#id` satisfies `ok`, and returns it; fails with
/// the last text seen after a generous bound (the page updates within
/// seconds; the bound only stops a broken test from hanging).
async fn text_of(page: &Client, id: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    loop {
        if let Ok(e) = page.find(Locator::Id(id)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return t;
                }
                last = t;
            }
        }
        assert!(
            Instant::now() < deadline,
            "#{id} never showed {what}; it said:\n{last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test]
async fn the_page_in_a_real_browser() {
    let test = "the_page_in_a_real_browser";
    if !have_tool("chromium", test) || !have_tool("chromedriver", test) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[]);
    let hello = server.url("/v2/shell/hello/manifests/latest");
    let (code, manifest) = tokio::task::spawn_blocking(move || http_get(&hello))
        .await
        .unwrap();
    assert_eq!(code, 200);
    let digest = nixery::name::Digest::of(manifest.as_bytes()).to_string();

    let driver = Driver::start().await;
    let page = driver.browser().await;
    page.goto(&server.url("/")).await.unwrap();

    // The image built is listed with its digest, and the page says how to pull.
    text_of(&page, "images", "hello/shell with its digest", |t| {
        t.contains("hello/shell") && t.contains(&digest)
    })
    .await;
    let intro = page
        .find(Locator::Css("pre"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        intro.contains(&format!("docker pull {}/shell/hello", server.addr)),
        "{intro}"
    );
    text_of(&page, "live", "that live updates are on", |t| {
        t == "live updates: on"
    })
    .await;

    // The page is never reloaded from here on: a mark left in it must stay.
    page.execute("window.nixeryTestMark = 'still here'; return null;", vec![])
        .await
        .unwrap();
    let mark = || async {
        page.execute("return window.nixeryTestMark || null;", vec![])
            .await
            .unwrap()
    };

    // A build started while the page is open shows up with its stage.
    let slow_url = server.url("/v2/slow/manifests/latest");
    let slow = std::thread::spawn(move || http_get(&slow_url));
    let building = text_of(&page, "building", "slow:latest with its stage", |t| {
        t.contains("slow:latest")
            && ["queued", "evaluating", "building"]
                .iter()
                .any(|s| t.contains(s))
    })
    .await;
    assert!(!building.contains("nothing"), "{building}");
    assert_eq!(mark().await, serde_json::json!("still here"));

    // A failed build shows its reason, still without a reload.
    let broken = server.url("/v2/broken/manifests/latest");
    let (code, _) = tokio::task::spawn_blocking(move || http_get(&broken))
        .await
        .unwrap();
    assert_eq!(code, 404);
    text_of(&page, "failures", "the broken build's reason", |t| {
        t.contains("broken:latest") && t.contains("fails to build on purpose")
    })
    .await;
    assert_eq!(mark().await, serde_json::json!("still here"));

    // A screenshot, as a person would see the page.
    let png = page.screenshot().await.unwrap();
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    std::fs::write(dir.path().join("page.png"), &png).unwrap();
    page.close().await.unwrap();
    // (The slow build goes on; the server and its Nix stop with the test.)
    drop(slow);
}
