//! A Pod start through the CRI, as a kubelet makes it, on a private
//! containerd: the same image pre-pulled (what the agent does when a NixImage
//! becomes ready), pulled from nixery with each layer compression, and pulled
//! from the CNCF reference registry. Run by benches/cri.sh, which starts the
//! registries; this measures, alternating the variants round by round, and
//! prints a Markdown section.
//!
//! Environment: NIXERY_BENCH_IMAGE (repository:tag), NIXERY_BENCH_OURS
//! (`gzip=HOST,zstd=HOST,none=HOST`), NIXERY_BENCH_REF (docker-registry's
//! HOST, holding the gzip image), NIXERY_BENCH_PAUSE (the sandbox image),
//! NIXERY_BENCH_ROUNDS, NIXERY_BENCH_COMMAND (the container's command).

#[path = "../tests/common/cri.rs"]
mod cri;

use std::path::Path;
use std::time::{Duration, Instant};

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set (run benches/cri.sh)"))
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn du(p: &Path) -> u64 {
    let out = std::process::Command::new("du")
        .args(["-sb", "--"])
        .arg(p)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        // `cargo test --benches` lists benches; this one only runs on demand.
        return;
    }
    if let Some(why) = cri::unavailable() {
        eprintln!("cri_start: {why}");
        std::process::exit(1);
    }
    let image = env("NIXERY_BENCH_IMAGE");
    let rounds: usize = env("NIXERY_BENCH_ROUNDS").parse().unwrap();
    let command: Vec<String> = env("NIXERY_BENCH_COMMAND")
        .split(' ')
        .map(String::from)
        .collect();
    let command: Vec<&str> = command.iter().map(String::as_str).collect();
    let ours: Vec<(String, String)> = env("NIXERY_BENCH_OURS")
        .split(',')
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap();
            (k.to_string(), v.to_string())
        })
        .collect();
    let reference = env("NIXERY_BENCH_REF");
    let pause = env("NIXERY_BENCH_PAUSE");

    let containerd = cri::Containerd::start(&pause).await;
    let runtime = containerd.runtime.clone();
    runtime.pull(&pause).await.unwrap();
    let root = containerd.dir.path().join("root");
    let timeout = Duration::from_secs(600);

    // Variants: (label, reference, pre-pulled).
    let gzip = &ours.iter().find(|(c, _)| c == "gzip").unwrap().1;
    let mut variants: Vec<(String, String, bool)> = vec![(
        "pre-pulled from nixery (gzip)".into(),
        format!("{gzip}/{image}"),
        true,
    )];
    for (c, host) in &ours {
        variants.push((
            format!("pull from nixery ({c})"),
            format!("{host}/{image}"),
            false,
        ));
    }
    variants.push((
        "pull from docker-registry (gzip)".into(),
        format!("{reference}/{image}"),
        false,
    ));

    let mut starts: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut pre_pulls: Vec<f64> = Vec::new();
    let mut disk: Vec<(u64, u64)> = Vec::new();
    let mut output = String::new();
    for round in 0..=rounds {
        for (i, (label, r, pre_pulled)) in variants.iter().enumerate() {
            // Each start begins from a runtime without the image, under any
            // name: the variants' layers unpack to the same snapshots, and
            // containerd fetches no layer whose snapshot it has.
            for (_, other, _) in &variants {
                if let Some(img) = runtime.image(other).await.unwrap() {
                    runtime.remove(&img.id).await.unwrap();
                }
            }
            if *pre_pulled {
                let before = du(&root);
                let t = Instant::now();
                runtime.pull(r).await.unwrap();
                let took = t.elapsed().as_secs_f64();
                if round > 0 {
                    pre_pulls.push(took);
                    disk.push((before, du(&root)));
                }
            }
            let pod = containerd
                .run_pod(&format!("bench-{round}-{i}"), r, &command, timeout)
                .await;
            assert_eq!(pod.exit_code, 0, "{label}: {}", pod.output);
            assert_eq!(pod.pulled, !pre_pulled, "{label}");
            output = pod.output.clone();
            // Round 0 warms the registries' caches and the page cache.
            if round > 0 {
                starts[i].push(pod.elapsed.as_secs_f64());
            }
            containerd.remove_pod(&pod.sandbox).await;
            eprintln!("round {round}: {label}: {:.3} s", pod.elapsed.as_secs_f64());
        }
    }
    if let Some(img) = runtime.image(&variants[0].1).await.unwrap() {
        runtime.remove(&img.id).await.unwrap();
    }

    let medians: Vec<f64> = starts.iter_mut().map(|v| median(v)).collect();
    let reference_pull = *medians.last().unwrap();
    println!(
        "CRI Pod start of `{image}` (RunPodSandbox on the host network, CreateContainer, \
         StartContainer, until the container exits; a kubelet's ImageStatus and, where the image \
         is absent, PullImage first), on a private containerd {}, median of {rounds} rounds \
         after one warm-up, variants alternating. The container printed: `{output}`.\n",
        runtime
            .version()
            .await
            .unwrap()
            .trim_start_matches("containerd ")
    );
    println!("| start | median | / docker-registry pull |");
    println!("|---|---|---|");
    for ((label, _, _), m) in variants.iter().zip(&medians) {
        println!("| {label} | {m:.3} s | {:.2}× |", m / reference_pull);
    }
    let added: Vec<f64> = disk.iter().map(|(b, a)| (a - b) as f64).collect();
    let mut added = added;
    println!(
        "\nPre-pull (the agent's CRI PullImage after Ready, gzip): median {:.3} s; it adds {:.0} MiB \
         to containerd's root (compressed layers in its content store, unpacked in its snapshots).",
        median(&mut pre_pulls),
        median(&mut added) / 1048576.0
    );
}
