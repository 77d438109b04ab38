//! The page at `/` in a real browser (Debian's chromium, headless): an image
//! built is listed with its digest; a build started while the page is open
//! appears on it with its stage, without a reload; a failed build shows its
//! reason; and a screenshot is taken.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser"].into_iter().find(|c| {
        Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {c}"))
            .output()
            .is_ok_and(|o| o.status.success())
    })
}

/// Headless chromium as root in a container, bounded in time.
fn headless(browser: &str) -> Command {
    let mut c = Command::new("timeout");
    c.args([
        "120",
        browser,
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
    ]);
    c
}

/// Loads a page in headless chromium (with `args`) and returns its DOM.
fn dump_dom(browser: &str, url: &str, args: &[&str]) -> String {
    let out = headless(browser)
        .args(args)
        .arg("--dump-dom")
        .arg(url)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The text of the element with this id in a DOM dump.
fn section<'a>(dom: &'a str, id: &str) -> &'a str {
    let start = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in:\n{dom}"));
    let rest = &dom[start..];
    &rest[..rest
        .find("</ul>")
        .or_else(|| rest.find("</table>"))
        .unwrap_or(rest.len())]
}

#[test]
fn the_page_in_a_real_browser() {
    let Some(browser) = chromium() else {
        if std::env::var("CI").is_ok() {
            panic!(
                "the_page_in_a_real_browser: chromium is not installed, and CI must run this test"
            );
        }
        skip("the_page_in_a_real_browser: chromium is not installed (.ci/run installs it)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(&dir.path().join("state"), &[]);
    let (code, manifest) = http_get(&server.url("/v2/shell/hello/manifests/latest"));
    assert_eq!(code, 200);
    let digest = nixery::name::Digest::of(manifest.as_bytes()).to_string();

    // After a build, the page lists the image with its digest.
    let dom = dump_dom(browser, &server.url("/"), &[]);
    let images = section(&dom, "images");
    assert!(
        images.contains("hello/shell") && images.contains(&digest),
        "{images}"
    );
    assert!(dom.contains(&format!("docker pull {}/shell/hello", server.addr)));

    // A build started while the page is open shows up, with its stage, from
    // the event stream alone (the page stops listening once it saw one, so
    // that the browser can finish).
    let slow_url = server.url("/v2/slow/manifests/latest");
    let slow = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_secs(2));
        http_get(&slow_url)
    });
    let dom = dump_dom(
        browser,
        &server.url("/?stop-when=building"),
        &["--virtual-time-budget=1000"],
    );
    let building = section(&dom, "building");
    assert!(building.contains("slow:latest"), "{building}");
    assert!(
        ["queued", "evaluating", "building"]
            .iter()
            .any(|s| building.contains(&format!("class=\"stage\">{s}"))),
        "{building}"
    );
    assert!(
        dom.contains("live updates: stopped"),
        "the update did not come from the stream"
    );
    // (The slow build goes on; the server and its Nix stop with the test.)
    drop(slow);

    // A failed build shows its reason and the end of Nix's log.
    let (code, _) = http_get(&server.url("/v2/broken/manifests/latest"));
    assert_eq!(code, 404);
    let dom = dump_dom(browser, &server.url("/"), &[]);
    assert!(
        section(&dom, "failures").contains("fails to build on purpose"),
        "{dom}"
    );

    // A screenshot, as a person would see it.
    let png = dir.path().join("page.png");
    let out = headless(browser)
        .arg("--window-size=1100,800")
        .arg(format!("--screenshot={}", png.display()))
        .arg(server.url("/"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let bytes = std::fs::read(&png).unwrap();
    assert!(
        bytes.starts_with(b"\x89PNG") && bytes.len() > 10_000,
        "{} bytes",
        bytes.len()
    );
}
