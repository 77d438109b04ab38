//! The `nixery` binary: parses the command line, runs one subcommand, and is
//! the only place that exits.

use std::io::IsTerminal;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use nixery::builder::{ImageSpec, Progress};
use nixery::config::{AgentArgs, BuildArgs, Cli, Command, CommonArgs};
use nixery::name::{self, Repository};

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    nixery::telemetry::init(cli.log_format == "json");
    let result = tokio::runtime::Runtime::new()
        .context("starting the runtime")
        .and_then(|rt| match cli.command {
            Command::Serve(args) => rt.block_on(serve(args)),
            Command::Build(args) => rt.block_on(build(args)),
            Command::Agent(args) => rt.block_on(agent(args)),
            Command::Crd => {
                print!("{}", nixery::k8s::crd::crd_yaml());
                Ok(())
            }
        });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // An expected failure is a sentence (with its causes), not a
            // backtrace.
            eprintln!("nixery: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// What to do when a package source cannot be fetched (no network here).
fn offline_hint(source: &nixery::nix::Source, error: &str) -> Option<String> {
    let unreachable = [
        "resolve host",
        "unable to download",
        "Could not resolve",
        "Couldn't resolve",
    ]
    .iter()
    .any(|m| error.contains(m));
    (unreachable && !matches!(source, nixery::nix::Source::Path(_))).then(|| {
        format!(
            "the package source ({}) cannot be fetched from here. Without network, use a local package set: \
             --pkgs-path nix/offline-pkgs --nix-option substituters= (the offline set in this repository)",
            source.describe()
        )
    })
}

fn env(key: &str) -> Option<String> {
    std::env::var(key).ok()
}

async fn serve(args: CommonArgs) -> anyhow::Result<()> {
    let settings = args.resolve(env)?;
    let state = nixery::app_state(&settings).await?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, source = %settings.source.describe(), state_dir = %settings.state_dir.display(), "nixery registry listening");
    eprintln!(
        "nixery: serving images built from {} on http://{addr}",
        settings.source.describe()
    );
    eprintln!("nixery: try   docker run --rm {addr}/shell/hello hello");
    nixery::serve_on(listener, state, shutdown_signal()).await?;
    Ok(())
}

/// `nixery agent`: the registry plus the NixImage controller for this node.
async fn agent(args: AgentArgs) -> anyhow::Result<()> {
    let mut settings = args.common.resolve(env)?;
    let listener = tokio::net::TcpListener::bind(settings.listen)
        .await
        .with_context(|| format!("listening on {}", settings.listen))?;
    let addr = listener.local_addr()?;
    // Pods on this node pull from its loopback: that is the host their
    // signatures name and their status entries write.
    let public_host = settings
        .public_host
        .get_or_insert_with(|| format!("127.0.0.1:{}", addr.port()))
        .clone();
    let state = nixery::app_state(&settings).await?;
    // Not ready before the controller says so (it waits for its watch and Lease).
    state.ready.wait_for(
        nixery::k8s::controller::READINESS_PART,
        "waiting for the controller to start",
    );
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in cluster, or KUBECONFIG)")?;
    let (mut ctx, wiring) = nixery::k8s::context::Context::new(
        client,
        state.builder.clone(),
        state.catalog.clone(),
        state.metrics.clone(),
        &args.node_name,
        &public_host,
    );
    ctx.allowed_sources = args.allowed_sources.clone();
    ctx.prepull = pre_puller(&args, &settings.state_dir).await;
    eprintln!(
        "nixery: agent on node {} serving on http://{addr}",
        args.node_name
    );
    let ready = state.ready.clone();
    let ops = match args.metrics_listen {
        Some(metrics_addr) => {
            let l = tokio::net::TcpListener::bind(metrics_addr)
                .await
                .with_context(|| format!("listening on {metrics_addr} for metrics"))?;
            eprintln!("nixery: metrics on http://{}/metrics", l.local_addr()?);
            let router = nixery::registry::ops_router(state.clone());
            Some(tokio::spawn(async move { axum::serve(l, router).await }))
        }
        None => None,
    };
    let server = tokio::spawn(nixery::serve_on(listener, state, shutdown_signal()));
    nixery::k8s::controller::run(
        ctx,
        wiring,
        nixery::k8s::controller::Scope {
            lease_namespace: args.lease_namespace.clone(),
            watch_namespace: args.watch_namespace.clone(),
        },
        ready,
    )
    .await?;
    server.abort();
    if let Some(ops) = ops {
        ops.abort();
    }
    Ok(())
}

/// The node's container runtime for pre-pulls: the socket named, else the
/// first found at the usual paths; none when pre-pull is off or no runtime
/// is found (then Pods pull as from any registry).
async fn pre_puller(
    args: &AgentArgs,
    state_dir: &std::path::Path,
) -> Option<Arc<nixery::k8s::prepull::Prepuller>> {
    if !args.pre_pull {
        tracing::info!("pre-pull is off (--pre-pull=false)");
        return None;
    }
    let socket = match &args.cri_socket {
        Some(s) => s.clone(),
        None => {
            let roots = [std::path::Path::new("/"), std::path::Path::new("/host")];
            let Some(s) = nixery::cri::find_socket(&roots) else {
                tracing::warn!(
                    paths = ?nixery::cri::SOCKETS,
                    "no container runtime socket found (on the host or under /host): pre-pull is off; name one with --cri-socket"
                );
                return None;
            };
            s
        }
    };
    let runtime = match nixery::cri::Runtime::new(&socket) {
        Ok(r) => r,
        Err(e) => {
            tracing::warn!(error = %e, "pre-pull is off");
            return None;
        }
    };
    match runtime.version().await {
        Ok(v) => {
            tracing::info!(socket = %socket.display(), runtime = %v, "pre-pulling ready images into the container runtime")
        }
        // Tried again for every image: the runtime may come up later.
        Err(e) => {
            tracing::warn!(socket = %socket.display(), error = %e, "the container runtime does not answer yet")
        }
    }
    Some(Arc::new(nixery::k8s::prepull::Prepuller::new(
        runtime, state_dir,
    )))
}

async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing SIGTERM handler");
    tokio::select! {
        _ = ctrl_c => {},
        _ = term.recv() => {},
    }
    tracing::info!("shutting down");
}

/// `nixery build shell/curl[:tag]`: live progress on stderr, result on stdout.
async fn build(args: BuildArgs) -> anyhow::Result<()> {
    let image = args.image.as_str();
    let settings = args.common.resolve(env)?;
    let (path, tag) = match image.rsplit_once(':') {
        Some((p, t)) => (p, t),
        None => (image, "latest"),
    };
    name::validate_tag(tag)?;
    let parts: Vec<&str> = path.split('/').collect();
    let img = match name::parse_repository(&parts)? {
        Repository::AdHoc(img) => img,
        Repository::Named { .. } => anyhow::bail!(
            "niximage/... names are built by the controller; `nixery build` takes package names"
        ),
    };
    let mut spec = ImageSpec::ad_hoc(&img, tag);
    spec.run.entrypoint = (!args.entrypoint.is_empty()).then(|| args.entrypoint.clone());
    spec.run.cmd = (!args.cmd.is_empty()).then(|| args.cmd.clone());
    spec.run.env = args.env.clone();
    spec.run.exposed_ports = args.expose.clone();
    let state = nixery::app_state(&settings).await?;
    // As `serve` does: an image of the first of --systems unless the name
    // says `arm64`, and with several systems, an index of them all.
    let pinned = img.arch != name::Arch::host();
    let systems = state.builder.systems().to_vec();
    if !pinned {
        spec.arch = systems[0];
    }
    let all = (!pinned && systems.len() > 1).then(|| spec.clone());
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new_spinner();
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                .expect("template"),
        );
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let started = std::time::Instant::now();
    let progress = {
        let bar = bar.clone();
        Arc::new(move |p: Progress| {
            let line = match &p {
                Progress::Queued => "waiting for a build slot".to_string(),
                Progress::Stage(s) => s.to_string(),
                Progress::NixLog(l) => format!("nix: {l}"),
                Progress::Layers { done, total } => format!("packing layers {done}/{total}"),
                Progress::Done => "done".to_string(),
            };
            if tty {
                if let Progress::Layers { done, total } = p {
                    bar.set_length(total as u64);
                    bar.set_position(done as u64);
                }
                bar.set_message(line);
            } else {
                eprintln!("[{:>6.1}s] {line}", started.elapsed().as_secs_f64());
            }
        })
    };
    let result = state.builder.get_or_build(spec, Some(progress)).await;
    bar.finish_and_clear();
    let built = result.map_err(|e| {
        let e = e.to_string();
        match offline_hint(&settings.source, &e) {
            Some(hint) => anyhow::anyhow!("{hint}"),
            None => anyhow::anyhow!("{e}"),
        }
    })?;
    eprintln!(
        "built {} in {:.1}s: {} layers, {:.1} MiB",
        img.name(),
        started.elapsed().as_secs_f64(),
        built.layers,
        built.size as f64 / (1024.0 * 1024.0)
    );
    if let Some(out) = &args.output {
        let reference = args
            .reference
            .clone()
            .unwrap_or_else(|| format!("{}:{tag}", img.name()));
        nixery::archive::write_archive(
            &**state.builder.store(),
            &built.oci_manifest,
            &reference,
            out,
        )
        .await
        .with_context(|| format!("writing {}", out.display()))?;
        eprintln!(
            "wrote {} as {reference}: docker load -i {0}, or ctr images import {0}",
            out.display()
        );
    }
    if let Some(file) = &args.sbom {
        let spdx = file.to_string_lossy().ends_with(".spdx.json");
        let wanted = if spdx {
            nixery::attest::SPDX
        } else {
            nixery::attest::CYCLONEDX
        };
        let digest = nixery::attest::document_digest(&built.attached, wanted)
            .with_context(|| format!("{} has no {wanted} SBOM", img.name()))?;
        let bytes = nixery::store::get_small(&**state.builder.store(), &digest, 64 << 20)
            .await
            .map_err(|e| anyhow::anyhow!("reading the SBOM {digest}: {e}"))?
            .with_context(|| format!("the SBOM {digest} is not stored"))?;
        std::fs::write(file, bytes).with_context(|| format!("writing {}", file.display()))?;
        eprintln!("wrote the {wanted} SBOM ({digest}) to {}", file.display());
    }
    let mut digest = built.oci_digest.clone();
    if let Some(spec) = all {
        let images = state
            .builder
            .get_or_build_all(&spec)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let (_, index, _) = state.builder.index(false, &images);
        for (arch, i) in &images {
            eprintln!("  {}: {}", arch.oci(), i.oci_digest);
        }
        eprintln!("index of {} systems: {index}", images.len());
        digest = index;
    }
    println!("{}/{}:{tag}@{}", settings.listen, img.name(), digest);
    Ok(())
}
