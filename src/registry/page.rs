//! The page for people at `/`: what to pull, the images built, builds in
//! progress with their live stage, recent failures with the end of Nix's log,
//! and (in agent mode) the NixImages this node serves. Rendered on the server
//! (it works without JavaScript), then kept live by a few lines of our own
//! JavaScript reading `/events` (server-sent events of `/api/status`).

use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use futures::Stream;

use super::AppState;
use crate::catalog::NamedEntry;

/// Everything the page shows, as `/api/status` answers it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Status {
    /// The host clients pull from (as this request named it).
    pub host: String,
    pub images: Vec<crate::catalog::ImageSummary>,
    pub building: Vec<crate::builder::BuildState>,
    /// Newest first.
    pub failures: Vec<crate::builder::Failure>,
    pub named: Vec<NamedStatus>,
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct NamedStatus {
    pub namespace: String,
    pub name: String,
    pub tag: String,
    pub ready: bool,
    pub digest: Option<String>,
    pub message: Option<String>,
}

impl PartialEq for crate::catalog::ImageSummary {
    fn eq(&self, o: &Self) -> bool {
        (
            &self.names,
            &self.digest,
            self.layers,
            self.size,
            self.built,
            self.pulls,
            &self.sbom,
            &self.signature,
        ) == (
            &o.names,
            &o.digest,
            o.layers,
            o.size,
            o.built,
            o.pulls,
            &o.sbom,
            &o.signature,
        )
    }
}

impl PartialEq for crate::builder::Failure {
    fn eq(&self, o: &Self) -> bool {
        (&self.image, &self.tag, &self.error, &self.log, self.at)
            == (&o.image, &o.tag, &o.error, &o.log, o.at)
    }
}

fn host(headers: &HeaderMap) -> String {
    headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .filter(|h| {
            h.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".:-[]".contains(&b))
        })
        .unwrap_or("127.0.0.1:5000")
        .to_string()
}

pub fn status(app: &AppState, host: String) -> Status {
    let mut building: Vec<_> = app
        .builder
        .running()
        .iter()
        .map(|s| s.borrow().clone())
        .collect();
    building.sort_by(|a, b| a.image.cmp(&b.image));
    let mut failures = app.builder.recent_failures();
    failures.reverse();
    let named = app
        .catalog
        .named
        .entries()
        .into_iter()
        .map(|(namespace, name, e)| match e {
            NamedEntry::Ready { tag, image, .. } => NamedStatus {
                namespace,
                name,
                tag,
                ready: true,
                digest: Some(image.oci_digest.to_string()),
                message: None,
            },
            NamedEntry::Pending { tag, message } => NamedStatus {
                namespace,
                name,
                tag,
                ready: false,
                digest: None,
                message: Some(message),
            },
        })
        .collect();
    // With a key, each image's signature as a client that pulls its first
    // name from this host gets it (made once, then kept).
    let mut images = app.catalog.list();
    if let Some(signer) = app.builder.signer() {
        let public = app.public_host.as_deref().unwrap_or(&host);
        for i in &mut images {
            let Some(name) = i.names.first() else {
                continue;
            };
            let key = super::signatures::Key {
                identity: super::signatures::identity(Some(public), &Default::default(), name),
                subject: i.digest.clone(),
                attestations: false,
            };
            i.signature = Some(app.signatures.signature(signer, key).digest.clone());
        }
    }
    Status {
        host,
        images,
        building,
        failures,
        named,
    }
}

pub async fn api_status(State(app): State<AppState>, headers: HeaderMap) -> Response {
    let body = serde_json::to_string(&status(&app, host(&headers))).expect("serialisable");
    ([(header::CONTENT_TYPE, "application/json")], body).into_response()
}

/// The status, sent again whenever it changes (checked twice a second).
pub async fn events(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Sse<impl Stream<Item = Result<Event, std::convert::Infallible>>> {
    let host = host(&headers);
    let stream = futures::stream::unfold(None::<Status>, move |last| {
        let (app, host) = (app.clone(), host.clone());
        async move {
            loop {
                let now = status(&app, host.clone());
                if last.as_ref() != Some(&now) {
                    let event = Event::default()
                        .event("status")
                        .data(serde_json::to_string(&now).expect("serialisable"));
                    return Some((Ok(event), Some(now)));
                }
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

/// Text made safe for HTML.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Seconds since the epoch as `2026-11-28 01:55`.
fn when(secs: u64) -> String {
    k8s_openapi::jiff::Timestamp::from_second(secs as i64)
        .map(|t| t.strftime("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_default()
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

/// The sections, rendered on the server from a status (the page's script
/// renders the same from each event).
fn sections(s: &Status) -> String {
    let mut out = String::new();
    out.push_str("<h2>Building now</h2><ul id=\"building\">");
    if s.building.is_empty() {
        out.push_str("<li class=\"none\">nothing</li>");
    }
    for b in &s.building {
        let layers = b
            .layers
            .map(|(d, t)| format!(" {d}/{t}"))
            .unwrap_or_default();
        let last = b.log.back().map(|l| escape(l)).unwrap_or_default();
        out.push_str(&format!(
            "<li><code>{}:{}</code> <span class=\"stage\">{}{layers}</span> <small>{last}</small></li>",
            escape(&b.image),
            escape(&b.tag),
            escape(&b.stage)
        ));
    }
    out.push_str("</ul><h2>Images</h2><table id=\"images\"><tr><th>name</th><th>digest</th><th>layers</th><th>size</th><th>built (UTC)</th><th>pulls</th><th>SBOM</th><th>signed</th></tr>");
    for i in &s.images {
        out.push_str(&format!(
            "<tr><td><code>{}</code></td><td><code>{}</code></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td></tr>",
            escape(&i.names.join(", ")),
            escape(i.digest.as_str()),
            i.layers,
            mib(i.size),
            when(i.built),
            i.pulls,
            escape(i.sbom.as_ref().map(|d| d.as_str()).unwrap_or("")),
            if i.signature.is_some() { "yes" } else { "no" }
        ));
    }
    out.push_str("</table>");
    if !s.named.is_empty() {
        out.push_str("<h2>NixImages on this node</h2><ul id=\"named\">");
        for n in &s.named {
            out.push_str(&format!(
                "<li><code>niximage/{}/{}:{}</code> {}</li>",
                escape(&n.namespace),
                escape(&n.name),
                escape(&n.tag),
                escape(n.digest.as_deref().or(n.message.as_deref()).unwrap_or(""))
            ));
        }
        out.push_str("</ul>");
    }
    out.push_str("<h2>Recent failures</h2><ul id=\"failures\">");
    if s.failures.is_empty() {
        out.push_str("<li class=\"none\">none</li>");
    }
    for f in &s.failures {
        out.push_str(&format!(
            "<li><code>{}:{}</code>: {}<pre>{}</pre></li>",
            escape(&f.image),
            escape(&f.tag),
            escape(&f.error),
            escape(&f.log.join("\n"))
        ));
    }
    out.push_str("</ul>");
    out
}

pub async fn index(State(app): State<AppState>, headers: HeaderMap) -> Html<String> {
    let s = status(&app, host(&headers));
    let host = escape(&s.host);
    Html(format!(
        r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nixery</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 15px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 72em; padding: 0 1em; color: #222; }}
code, pre {{ font: 13px ui-monospace, monospace; }}
pre {{ background: #f6f6f6; padding: .5em; overflow-x: auto; max-height: 12em; }}
table {{ border-collapse: collapse; width: 100%; }} th, td {{ text-align: left; padding: .2em .6em; border-bottom: 1px solid #ddd; }}
.stage {{ font-weight: 600; color: #2a6; }} .none {{ color: #888; }} #live {{ color: #888; font-size: 13px; }}
</style></head>
<body>
<h1>nixery</h1>
<p>Container images built by Nix on demand. Every path component is a package:</p>
<pre>docker pull {host}/shell/hello
docker run --rm {host}/shell/curl/jq curl --version</pre>
{provenance}
<p id="live">live updates: connecting</p>
<div id="sections">{sections}</div>
<script>
// Our own few lines: re-render the sections from each status event.
(function () {{
  function el(tag, text, cls) {{ var e = document.createElement(tag); if (text !== undefined) e.textContent = text; if (cls) e.className = cls; return e; }}
  function mib(b) {{ return (b / 1048576).toFixed(1) + " MiB"; }}
  function render(s) {{
    var root = document.getElementById("sections"); root.textContent = "";
    root.appendChild(el("h2", "Building now"));
    var ul = el("ul"); ul.id = "building";
    if (!s.building.length) ul.appendChild(el("li", "nothing", "none"));
    s.building.forEach(function (b) {{
      var li = el("li"); li.appendChild(el("code", b.image + ":" + b.tag)); li.appendChild(document.createTextNode(" "));
      li.appendChild(el("span", b.stage + (b.layers ? " " + b.layers[0] + "/" + b.layers[1] : ""), "stage"));
      if (b.log.length) {{ li.appendChild(document.createTextNode(" ")); li.appendChild(el("small", b.log[b.log.length - 1])); }}
      ul.appendChild(li);
    }});
    root.appendChild(ul);
    root.appendChild(el("h2", "Images"));
    var t = el("table"); t.id = "images";
    var hr = el("tr"); ["name", "digest", "layers", "size", "built (UTC)", "pulls", "SBOM", "signed"].forEach(function (h) {{ hr.appendChild(el("th", h)); }}); t.appendChild(hr);
    s.images.forEach(function (i) {{
      var tr = el("tr"); var n = el("td"); n.appendChild(el("code", i.names.join(", "))); tr.appendChild(n);
      var d = el("td"); d.appendChild(el("code", i.digest)); tr.appendChild(d);
      tr.appendChild(el("td", String(i.layers))); tr.appendChild(el("td", mib(i.size)));
      tr.appendChild(el("td", new Date(i.built * 1000).toISOString().slice(0, 16).replace("T", " "))); tr.appendChild(el("td", String(i.pulls)));
      var sb = el("td"); sb.appendChild(el("code", i.sbom || "")); tr.appendChild(sb); tr.appendChild(el("td", i.signature ? "yes" : "no"));
      t.appendChild(tr);
    }});
    root.appendChild(t);
    if (s.named.length) {{
      root.appendChild(el("h2", "NixImages on this node"));
      var nl = el("ul"); nl.id = "named";
      s.named.forEach(function (n) {{ var li = el("li"); li.appendChild(el("code", "niximage/" + n.namespace + "/" + n.name + ":" + n.tag)); li.appendChild(document.createTextNode(" " + (n.digest || n.message || ""))); nl.appendChild(li); }});
      root.appendChild(nl);
    }}
    root.appendChild(el("h2", "Recent failures"));
    var fl = el("ul"); fl.id = "failures";
    if (!s.failures.length) fl.appendChild(el("li", "none", "none"));
    s.failures.forEach(function (f) {{ var li = el("li"); li.appendChild(el("code", f.image + ":" + f.tag)); li.appendChild(document.createTextNode(": " + f.error)); li.appendChild(el("pre", f.log.join("\n"))); fl.appendChild(li); }});
    root.appendChild(fl);
  }}
  if (!window.EventSource) return;
  var live = document.getElementById("live");
  var es = new EventSource("/events");
  es.addEventListener("status", function (e) {{
    var s = JSON.parse(e.data); render(s); live.textContent = "live updates: on";
  }});
  es.onerror = function () {{ live.textContent = "live updates: reconnecting"; }};
}})();
</script>
</body></html>"#,
        sections = sections(&s),
        provenance = provenance(&app, &host),
    ))
}

/// How to read an image's SBOMs and provenance, and check its signature.
fn provenance(app: &AppState, host: &str) -> String {
    let verify = if app.builder.signer().is_some() {
        format!(
            "<p id=\"signing\">Every image is signed: the public key is at <a href=\"/cosign.pub\">/cosign.pub</a>.</p>\
             <pre>curl -so cosign.pub http://{host}/cosign.pub\n\
             cosign verify --key cosign.pub --insecure-ignore-tlog --allow-http-registry {host}/shell/hello\n\
             cosign verify-attestation --type cyclonedx --key cosign.pub --insecure-ignore-tlog --allow-http-registry {host}/shell/hello</pre>"
        )
    } else {
        "<p id=\"signing\">Images are not signed (the registry has no <code>--signing-key</code>).</p>".to_string()
    };
    format!(
        "<p>Each image carries SBOMs (CycloneDX, SPDX) and SLSA provenance as OCI referrers:</p>\
         <pre>oras discover --plain-http {host}/shell/hello:latest</pre>{verify}"
    )
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_what_html_would_read() {
        assert_eq!(
            super::escape("<script>\"x\" & 'y'</script>"),
            "&lt;script&gt;&quot;x&quot; &amp; &#39;y&#39;&lt;/script&gt;"
        );
    }
}
