#!/usr/bin/env python3
"""Months on a node, compressed: a bounded soak run (benches/soak.sh runs it).

One `nixery serve` under a small --storage-limit and, with --agent, one
`nixery agent` against the real Kubernetes KUBECONFIG names, both the built
binary, for --minutes (default 10):
  - distinct ad-hoc images (every subset of the offline set's packages, in a
    shuffled order) built, pulled and evicted, and old ones pulled again;
  - NixImages created, changed and deleted, and pulled from the agent;
  - the server restarted every --restart-every seconds, and the API server
    once if --restart-apiserver gives the command that does it;
  - every manifest's digest checked against its bytes, and its config and
    smallest layer fetched and checked too.
Every 10 s it samples, for both processes: RSS, open file descriptors,
threads; catalog.json's size, the images it lists and the GC root
directories; the bytes stored against the limit; the p99 latency of cached
manifest GETs. It writes the samples (CSV), a plot (SVG) and a section of
benches/results.md, and fails when a figure grows without bound (its
highest in the last third of the run is over 1.5x its highest in the middle
third, and more than a small absolute step), when the store passes its limit
by more than what the collection kept and said why (nixery_storage_kept_bytes,
docs/storage.md's bound), or when any digest does not verify.
"""
import argparse
import hashlib
import itertools
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ["hello", "curl", "jq", "less", "nano", "gnugrep", "gnused", "findutils",
            "coreutils", "moreutils", "busybox", "bashInteractive", "appA", "appB",
            "wide", "deep", "zlib", "openssl", "glibc", "cacert"]
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
NS = "nixery-soak"


def log(msg):
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Proc:
    """A nixery process, restartable, its stderr kept in a file."""

    def __init__(self, name, args, env, logfile):
        self.name, self.args, self.env, self.logfile = name, args, env, logfile
        self.p = None
        self.restarts = 0

    def start(self, url):
        out = open(self.logfile, "ab")
        self.p = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=out)
        for _ in range(300):
            try:
                urllib.request.urlopen(url + "/v2/", timeout=2).read()
                return
            except Exception:
                if self.p.poll() is not None:
                    raise SystemExit(f"{self.name} exited; see {self.logfile}")
                time.sleep(0.2)
        raise SystemExit(f"{self.name} did not start; see {self.logfile}")

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(30)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()

    def sample(self):
        pid = self.p.pid
        status = open(f"/proc/{pid}/status").read()
        rss = int(re.search(r"VmRSS:\s+(\d+)", status).group(1)) / 1024
        threads = int(re.search(r"Threads:\s+(\d+)", status).group(1))
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        return rss, fds, threads


def get(url, accept=OCI_MANIFEST, timeout=120):
    req = urllib.request.Request(url, headers={"Accept": accept})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        # Header names as HTTP/1.1 sends them may be lower case.
        return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.warm = []          # (time, seconds) of cached manifest GETs
        self.cold = []          # seconds of manifest GETs that built
        self.built = set()
        self.pulls = 0
        self.largest = 0        # bytes of the largest image pulled (config and layers)
        self.verified = 0
        self.mismatches = []
        self.refused = []
        self.errors = {}
        self.niximages = {"created": 0, "changed": 0, "deleted": 0, "pulled": 0}

    def error(self, what):
        with self.lock:
            self.errors[what] = self.errors.get(what, 0) + 1


def pull_and_verify(base, repo, stats, cold):
    t = time.monotonic()
    _, headers, body = get(f"{base}/v2/{repo}/manifests/latest")
    took = time.monotonic() - t
    digest = "sha256:" + hashlib.sha256(body).hexdigest()
    ok = headers.get("docker-content-digest") == digest
    manifest = json.loads(body)
    size = manifest["config"]["size"] + sum(l["size"] for l in manifest["layers"])
    blobs = [manifest["config"]] + sorted(manifest["layers"], key=lambda l: l["size"])[:1]
    for b in blobs:
        _, _, data = get(f"{base}/v2/{repo}/blobs/{b['digest']}", accept="*/*")
        ok = ok and "sha256:" + hashlib.sha256(data).hexdigest() == b["digest"] and len(data) == b["size"]
    # The same manifest again, from the cache: the latency the soak watches.
    t2 = time.monotonic()
    _, headers2, body2 = get(f"{base}/v2/{repo}/manifests/latest")
    warm = time.monotonic() - t2
    ok = ok and body2 == body
    with stats.lock:
        stats.largest = max(stats.largest, size)
        stats.pulls += 1
        (stats.cold if cold else []).append(took)
        stats.warm.append((time.time(), warm))
        if ok:
            stats.verified += 1
        else:
            stats.mismatches.append(repo)


def adhoc_load(base, stats, stop, seed):
    rng = random.Random(seed)
    # 6,195 package sets of one to four packages, in a shuffled order; past
    # the last, again (each one cached, or evicted and built anew).
    combos = [c for n in (1, 2, 3, 4) for c in itertools.combinations(PACKAGES, n)]
    rng.shuffle(combos)
    for combo in itertools.cycle(combos):
        if stop.is_set():
            return
        repo = "/".join(sorted(combo))
        try:
            pull_and_verify(base, repo, stats, cold=True)
            with stats.lock:
                stats.built.add(repo)
                earlier = rng.choice(sorted(stats.built)) if len(stats.built) > 5 else None
            if earlier and rng.random() < 0.3:
                # An older image again: cached, or evicted and built anew.
                pull_and_verify(base, earlier, stats, cold=False)
        except urllib.error.HTTPError as e:
            # A registry that answered and refused: only a full queue or a
            # stopping server may; anything else fails the run.
            body = e.read()[:160].decode(errors='replace')
            stats.error(f"ad hoc: HTTP {e.code} {body}")
            if e.code not in (429, 503):
                with stats.lock:
                    stats.refused.append(f"{repo}: {e.code} {body}")
            time.sleep(0.5)
        except (urllib.error.URLError, ConnectionError, OSError) as e:
            stats.error(f"ad hoc: {type(e).__name__}")
            time.sleep(0.5)
        except Exception as e:  # noqa: BLE001 - counted, the run goes on
            stats.error(f"ad hoc: {e}")
            time.sleep(0.5)


def kubectl(*args, input=None, check=True):
    r = subprocess.run(["kubectl", *args], input=input, capture_output=True, text=True)
    if check and r.returncode != 0:
        raise RuntimeError(f"kubectl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def niximage_load(agent_base, stats, stop, seed):
    rng = random.Random(seed)
    live = []
    n = 0
    while not stop.wait(12):
        try:
            n += 1
            name = f"soak-{n}"
            contents = rng.sample(PACKAGES[:12], rng.randint(1, 3))
            obj = {"apiVersion": "k8s.nixos.org/v1alpha1", "kind": "NixImage",
                   "metadata": {"name": name, "namespace": NS},
                   "spec": {"contents": contents, "tag": "v1"}}
            kubectl("apply", "-f", "-", input=json.dumps(obj))
            stats.niximages["created"] += 1
            live.append(name)
            if len(live) > 2 and rng.random() < 0.5:
                other = rng.choice(live[:-1])
                patch = {"spec": {"contents": rng.sample(PACKAGES[:12], 2)}}
                kubectl("-n", NS, "patch", "nimg", other, "--type=merge", "-p", json.dumps(patch))
                stats.niximages["changed"] += 1
            if len(live) > 4:
                gone = live.pop(0)
                kubectl("-n", NS, "delete", "nimg", gone, "--wait=false")
                stats.niximages["deleted"] += 1
            # A Ready object's image, from the agent's registry.
            for other in live:
                phase = kubectl("-n", NS, "get", "nimg", other, "-o", "jsonpath={.status.phase}", check=False)
                if phase == "Ready":
                    verify_named(agent_base, other, stats)
        except Exception as e:  # noqa: BLE001
            stats.error(f"NixImage: {str(e)[:120]}")


def verify_named(base, name, stats):
    _, headers, body = get(f"{base}/v2/niximage/{NS}/{name}/manifests/v1")
    ok = headers.get("docker-content-digest") == "sha256:" + hashlib.sha256(body).hexdigest()
    with stats.lock:
        stats.niximages["pulled"] += 1
        if ok:
            stats.verified += 1
        else:
            stats.mismatches.append(f"niximage {name}")


def metric(base, name):
    try:
        _, _, body = get(base + "/metrics", accept="*/*", timeout=10)
    except Exception:
        return None
    m = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", body.decode(), re.M)
    return float(m.group(1)) if m else None


def storage_figures(base):
    """Stored bytes and what the last collection kept over the limit, by
    reason, from one /metrics answer (both from the same collection)."""
    try:
        _, _, body = get(base + "/metrics", accept="*/*", timeout=10)
    except Exception:
        return None, {}
    text = body.decode()
    m = re.search(r"^nixery_stored_bytes (\S+)$", text, re.M)
    kept = {r: float(v) for r, v in re.findall(r'^nixery_storage_kept_bytes\{reason="(\w+)"\} (\S+)$', text, re.M)}
    return (float(m.group(1)) if m else None), kept


def state_figures(state):
    try:
        cat = os.path.join(state, "catalog.json")
        size = os.path.getsize(cat)
        images = len(json.load(open(cat)).get("images", {}))
    except (OSError, ValueError):
        size, images = 0, 0
    roots = os.path.join(state, "gcroots")
    gcroots = len(os.listdir(roots)) if os.path.isdir(roots) else 0
    return size, images, gcroots


def p99(values):
    if not values:
        return 0.0
    v = sorted(values)
    return v[min(len(v) - 1, int(round(0.99 * (len(v) - 1))))]


def restart_apiserver(command):
    """The operator's own command that restarts the cluster's API server."""
    subprocess.run(command, shell=True, check=True, capture_output=True)


def svg_plot(samples, columns, path):
    """A small line plot: each figure scaled to its own maximum."""
    w, h, pad = 720, 300, 40
    t0, t1 = samples[0]["t"], max(samples[-1]["t"], samples[0]["t"] + 1)
    colors = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h + 20 * len(columns)}" font-family="sans-serif" font-size="12">',
             f'<rect width="100%" height="100%" fill="white"/>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - 10}" y2="{h - pad}" stroke="black"/>',
             f'<line x1="{pad}" y1="10" x2="{pad}" y2="{h - pad}" stroke="black"/>',
             f'<text x="{w / 2}" y="{h - 10}" text-anchor="middle">minutes (each line scaled to its own maximum)</text>']
    for i, col in enumerate(columns):
        top = max(s[col] for s in samples) or 1
        pts = " ".join(
            f"{pad + (s['t'] - t0) / (t1 - t0) * (w - pad - 10):.1f},{h - pad - s[col] / top * (h - pad - 20):.1f}"
            for s in samples)
        c = colors[i % len(colors)]
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{pts}"/>')
        parts.append(f'<text x="{pad}" y="{h + 15 + 20 * i}" fill="{c}">{col} (max {top:g})</text>')
    parts.append("</svg>")
    open(path, "w").write("\n".join(parts))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--minutes", type=float, default=10)
    ap.add_argument("--restart-every", type=float, default=180, help="seconds between server restarts")
    ap.add_argument("--storage-limit", default="40MiB")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--agent", action="store_true", help="also run an agent against the cluster KUBECONFIG names")
    ap.add_argument("--restart-apiserver", help="a shell command that restarts the cluster's API server, run once")
    ap.add_argument("--results", default=os.path.join(REPO, "benches/results.md"))
    args = ap.parse_args()
    work = args.work
    serve_state, agent_state = os.path.join(work, "serve"), os.path.join(work, "agent")
    env = dict(os.environ, RUST_LOG="info")
    offline = os.path.join(REPO, "nix/offline-pkgs")
    common = ["--pkgs-path", offline, "--nix-option", "substituters="]
    serve = Proc("serve", [args.bin, "serve", "--listen", "127.0.0.1:5090", "--state-dir", serve_state,
                           "--storage-limit", args.storage_limit, *common], env, os.path.join(work, "serve.log"))
    agent = args.agent and Proc("agent", [args.bin, "agent", "--node-name", "soak-node", "--listen", "127.0.0.1:5091",
                           "--lease-namespace", NS, "--watch-namespace", NS, "--state-dir", agent_state,
                           "--storage-limit", args.storage_limit, *common], env, os.path.join(work, "agent.log"))
    serve_base, agent_base = "http://127.0.0.1:5090", "http://127.0.0.1:5091"
    limit = int(re.match(r"(\d+)MiB", args.storage_limit).group(1)) << 20
    serve.start(serve_base)
    if agent:
        agent.start(agent_base)
    stats, stop = Stats(), threading.Event()
    threads = [threading.Thread(target=adhoc_load, args=(serve_base, stats, stop, s), daemon=True) for s in (1, 2)]
    if agent:
        threads.append(threading.Thread(target=niximage_load, args=(agent_base, stats, stop, 3), daemon=True))
    for t in threads:
        t.start()
    samples, events = [], []
    start = time.time()
    end = start + args.minutes * 60
    next_restart = start + args.restart_every
    api_restart_at = args.restart_apiserver and start + args.minutes * 60 * 0.6
    restarting = threading.Lock()
    while time.time() < end:
        time.sleep(10)
        now = time.time()
        if now >= next_restart:
            log("restarting the server")
            with restarting:
                serve.stop()
                serve.start(serve_base)
                serve.restarts += 1
            events.append((now - start, "server restart"))
            next_restart = now + args.restart_every
        if api_restart_at and now >= api_restart_at:
            log("restarting the kube-apiserver")
            restart_apiserver(args.restart_apiserver)
            events.append((now - start, "kube-apiserver restart"))
            api_restart_at = None
        try:
            s_rss, s_fds, s_thr = serve.sample()
            a_rss, a_fds, a_thr = agent.sample() if agent else (0, 0, 0)
        except (OSError, AttributeError):
            continue
        cat_size, cat_images, gcroots = state_figures(serve_state)
        _, a_images, a_gcroots = state_figures(agent_state) if agent else (0, 0, 0)
        with stats.lock:
            window = [d for (t, d) in stats.warm if t > now - 60]
            built = len(stats.built)
        stored, kept = storage_figures(serve_base)
        stored = stored or 0
        samples.append({
            "t": now - start, "serve_rss_mib": round(s_rss, 1), "serve_fds": s_fds, "serve_threads": s_thr,
            "agent_rss_mib": round(a_rss, 1), "agent_fds": a_fds, "agent_threads": a_thr,
            "catalog_bytes": cat_size, "catalog_images": cat_images, "gcroots": gcroots,
            "agent_images": a_images, "agent_gcroots": a_gcroots,
            "stored_mib": round(stored / 2**20, 1), "p99_warm_ms": round(p99(window) * 1000, 2),
            "images_built": built,
            "kept_mib": round(sum(kept.values()) / 2**20, 2),
            "kept_recent_mib": round(kept.get("recent", 0) / 2**20, 2),
        })
        s = samples[-1]
        log(f"{(now - start) / 60:4.1f} min: built {built}, serve {s['serve_rss_mib']} MiB/{s_fds} fds/{s_thr} thr, "
            f"agent {s['agent_rss_mib']} MiB/{a_fds} fds, catalog {cat_images} img {cat_size} B, gcroots {gcroots}, "
            f"stored {s['stored_mib']} MiB, p99 {s['p99_warm_ms']} ms")
    stop.set()
    for t in threads:
        t.join(60)
    serve.stop()
    if agent:
        agent.stop()

    columns = ["serve_rss_mib", "serve_fds", "serve_threads", "agent_rss_mib", "agent_fds", "agent_threads",
               "catalog_bytes", "catalog_images", "gcroots", "stored_mib", "p99_warm_ms"]
    if not agent:
        columns = [c for c in columns if not c.startswith("agent_")]
    with open(os.path.join(work, "soak.csv"), "w") as f:
        keys = list(samples[0].keys())
        f.write(",".join(keys) + "\n")
        for s in samples:
            f.write(",".join(str(s[k]) for k in keys) + "\n")
    plot = os.path.join(REPO, "benches/soak.svg")
    svg_plot(samples, columns, plot)

    # Growth: the last third's highest against the middle third's, for what
    # must stay bounded; small absolute steps are noise, not growth.
    third = max(1, len(samples) // 3)
    middle, last = samples[third:2 * third], samples[2 * third:]
    slack = {"stored_mib": 16, "serve_rss_mib": 32, "agent_rss_mib": 32, "serve_fds": 16, "agent_fds": 16, "serve_threads": 4,
             "agent_threads": 4, "catalog_bytes": 65536, "catalog_images": 20, "gcroots": 20, "p99_warm_ms": 20}
    verdicts = []
    failed = []
    for col, step in slack.items():
        if col not in columns:
            continue
        m, l = max(s[col] for s in middle), max(s[col] for s in last)
        grows = l > 1.5 * m and l - m > step
        verdicts.append((col, samples[0][col], m, l, "grows" if grows else "bounded"))
        if grows:
            failed.append(col)
    # The stated bound (docs/storage.md): stored bytes pass the limit only by
    # what the collection kept and said why (nixery_storage_kept_bytes), and
    # of that, images asked for within --eviction-grace by at most a quarter
    # of the limit plus one image. Sampled values are rounded to 0.1 MiB.
    over = max(s["stored_mib"] for s in samples) * 2**20
    largest_mib = stats.largest / 2**20
    outside = [s for s in samples if s["stored_mib"] > (limit >> 20) + s["kept_mib"] + 0.1]
    recent_over = [s for s in samples if s["kept_recent_mib"] > (limit >> 20) / 4 + largest_mib + 0.1]
    if outside:
        failed.append(f"{len(outside)} samples stored more than the limit plus what was kept, e.g. "
                      f"{outside[0]['stored_mib']} MiB with {outside[0]['kept_mib']} MiB kept")
    if recent_over:
        failed.append(f"{len(recent_over)} samples kept more than a quarter of the limit plus one image for recent pulls, "
                      f"e.g. {recent_over[0]['kept_recent_mib']} MiB")
    leaks = max(s["gcroots"] - s["catalog_images"] for s in samples)
    if leaks > 4:  # builds in flight (two workers) and evictions under way
        failed.append(f"{leaks} GC root directories without a catalogued image")
    if stats.refused:
        failed.append(f"{len(stats.refused)} pulls refused: {stats.refused[:2]}")
    if stats.mismatches:
        failed.append(f"{len(stats.mismatches)} digests did not verify: {stats.mismatches[:3]}")

    minutes = (samples[-1]["t"]) / 60
    lines = [
        "", f"## Soak (benches/soak.sh), {time.strftime('%Y-%m-%dT%H:%MZ', time.gmtime())}", "",
        f"{minutes:.1f} minutes on {os.cpu_count()} cores: one `nixery serve` (--storage-limit {args.storage_limit}) "
        f"{'and one `nixery agent` on a real cluster' if agent else '(no agent: KUBECONFIG was not set)'}; {len(stats.built)} distinct ad-hoc images built and pulled "
        f"({stats.pulls} pulls, {stats.verified} digests verified against their bytes, "
        f"{len(stats.mismatches)} mismatches), NixImages {stats.niximages['created']} created, "
        f"{stats.niximages['changed']} changed, {stats.niximages['deleted']} deleted, "
        f"{stats.niximages['pulled']} pulled from the agent; the server restarted {serve.restarts} times, "
        f"{'the kube-apiserver once' if args.restart_apiserver else 'the kube-apiserver never'}. Cold pulls (a build each): median {sorted(stats.cold)[len(stats.cold) // 2] if stats.cold else 0:.2f} s. "
        f"Requests that failed: {sum(stats.errors.values())} ({len(stats.refused)} refused by the registry; "
        f"the rest cut by the restarts: {', '.join(sorted(k for k in stats.errors if 'HTTP' not in k)) or 'none'}).", "",
        "| figure | first sample | highest, middle third | highest, last third | |", "|---|---|---|---|---|",
    ]
    for col, first, m, l, v in verdicts:
        lines.append(f"| {col} | {first} | {m} | {l} | {v} |")
    lines += ["", f"Stored bytes peaked at {over / 2**20:.1f} MiB against the {limit >> 20} MiB limit "
              f"({over / limit:.2f}×); the bound (the limit plus what a collection kept, and of that, recent pulls "
              f"within a quarter of the limit plus one image of at most {largest_mib:.1f} MiB) held in "
              f"{len(samples) - len(outside)} of {len(samples)} samples, recent pulls peaked at "
              f"{max(s['kept_recent_mib'] for s in samples):.1f} MiB kept; "
              f"GC root directories minus catalogued images, at most: {leaks}. Samples every 10 s "
              f"(`soak.csv` in the run's directory); plot: `benches/soak.svg`.",
              "", f"Verdict: {'PASS' if not failed else 'FAIL: ' + '; '.join(failed)}", ""]
    with open(args.results, "a") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
