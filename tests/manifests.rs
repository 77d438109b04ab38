//! Generated and hand-written manifests are tested: the checked-in CRD equals
//! `nixery crd`, every YAML in deploy/ and examples/ parses into its typed
//! struct, and they agree with each other and with the code.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::{have_tool, repo_root};
use k8s_openapi::api::apps::v1::{DaemonSet, Deployment};
use k8s_openapi::api::core::v1::{Namespace, Pod, PodSpec, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use nixery::k8s::crd::NixImage;
use nixery::name::{parse_route, Reference, Repository, Route};
use serde::Deserialize;

#[derive(Default)]
struct Docs {
    namespaces: Vec<Namespace>,
    service_accounts: Vec<ServiceAccount>,
    roles: Vec<ClusterRole>,
    bindings: Vec<ClusterRoleBinding>,
    ns_roles: Vec<Role>,
    ns_bindings: Vec<RoleBinding>,
    daemonsets: Vec<DaemonSet>,
    crds: Vec<CustomResourceDefinition>,
    niximages: Vec<NixImage>,
    pods: Vec<(String, PodSpec)>,
}

/// Parses every document of every YAML file in `dir` into its typed struct.
fn load(dir: &Path) -> Docs {
    let mut docs = Docs::default();
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    for path in files {
        if path.extension().and_then(|e| e.to_str()) != Some("yaml")
            || path.file_name().unwrap() == "kustomization.yaml"
        {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        for doc in serde_yaml::Deserializer::from_str(&text) {
            let value = serde_yaml::Value::deserialize(doc).unwrap();
            let kind = value["kind"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: a document without kind", path.display()))
                .to_string();
            let ctx = format!("{} ({kind})", path.display());
            macro_rules! parse {
                () => {
                    serde_yaml::from_value(value.clone()).unwrap_or_else(|e| panic!("{ctx}: {e}"))
                };
            }
            match kind.as_str() {
                "Namespace" => docs.namespaces.push(parse!()),
                "ServiceAccount" => docs.service_accounts.push(parse!()),
                "ClusterRole" => docs.roles.push(parse!()),
                "ClusterRoleBinding" => docs.bindings.push(parse!()),
                "Role" => docs.ns_roles.push(parse!()),
                "RoleBinding" => docs.ns_bindings.push(parse!()),
                "DaemonSet" => docs.daemonsets.push(parse!()),
                "CustomResourceDefinition" => docs.crds.push(parse!()),
                "NixImage" => docs.niximages.push(parse!()),
                "Pod" => {
                    let pod: Pod = parse!();
                    docs.pods.push((ctx, pod.spec.unwrap()));
                }
                "Deployment" => {
                    let d: Deployment = parse!();
                    docs.pods.push((ctx, d.spec.template.spec.unwrap()));
                }
                other => panic!("{ctx}: unexpected kind {other}"),
            }
        }
    }
    docs
}

fn kustomization_resources(dir: &Path) -> Vec<String> {
    let k: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    k["resources"]
        .as_sequence()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn checked_in_crd_equals_nixery_crd() {
    let on_disk = std::fs::read_to_string(repo_root().join("crds/niximage.yaml")).unwrap();
    assert_eq!(
        on_disk,
        nixery::k8s::crd::crd_yaml(),
        "crds/niximage.yaml drifted: run `cargo run -- crd > crds/niximage.yaml`"
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_nixery"))
        .arg("crd")
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout), on_disk);
    assert_eq!(
        kustomization_resources(&repo_root().join("crds")),
        vec!["niximage.yaml"]
    );
}

#[test]
fn deploy_manifests_parse_and_agree() {
    let dir = repo_root().join("deploy/base");
    let docs = load(&dir);
    // The kustomization lists every file, and the CRD through ../../crds.
    let mut listed = kustomization_resources(&dir);
    listed.sort();
    let mut present: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|f| f.ends_with(".yaml") && f != "kustomization.yaml")
        .collect();
    present.push("../../crds".into());
    present.sort();
    assert_eq!(listed, present);

    let ns = docs.namespaces[0].metadata.name.clone().unwrap();
    let sa = &docs.service_accounts[0];
    let sa_name = sa.metadata.name.clone().unwrap();
    assert_eq!(sa.metadata.namespace.as_deref(), Some(ns.as_str()));

    // RBAC: the binding grants the role to the agent's service account.
    let role = &docs.roles[0];
    let binding = &docs.bindings[0];
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.name.as_str(), subject.namespace.as_deref()),
        (sa_name.as_str(), Some(ns.as_str()))
    );
    let crd = nixery::k8s::crd::crd_yaml();
    let crd: CustomResourceDefinition = serde_yaml::from_str(&crd).unwrap();
    let rules = role.rules.as_ref().unwrap();
    let grants_in = |rules: &[PolicyRule], group: &str, resource: &str, verb: &str| {
        rules.iter().any(|r| {
            r.api_groups.as_ref().unwrap().iter().any(|g| g == group)
                && r.resources.as_ref().unwrap().iter().any(|x| x == resource)
                && r.verbs.iter().any(|v| v == verb)
        })
    };
    let grants = |group: &str, resource: &str, verb: &str| grants_in(rules, group, resource, verb);
    for verb in ["get", "list", "watch", "patch"] {
        assert!(
            grants(&crd.spec.group, &crd.spec.names.plural, verb),
            "{verb} niximages"
        );
    }
    assert!(grants(
        &crd.spec.group,
        &format!("{}/status", crd.spec.names.plural),
        "patch"
    ));
    assert!(grants("events.k8s.io", "events", "create"));
    // Leases: a Role in the agent's own namespace, bound to its account,
    // with what creating, renewing and watching them takes.
    let lease_role = &docs.ns_roles[0];
    assert_eq!(lease_role.metadata.namespace.as_deref(), Some(ns.as_str()));
    let lease_rules = lease_role.rules.as_ref().unwrap();
    for verb in ["get", "list", "watch", "create", "patch"] {
        assert!(
            grants_in(lease_rules, "coordination.k8s.io", "leases", verb),
            "{verb} leases"
        );
    }
    let lease_binding = &docs.ns_bindings[0];
    assert_eq!(
        lease_binding.role_ref.name,
        lease_role.metadata.name.clone().unwrap()
    );
    assert_eq!(lease_binding.subjects.as_ref().unwrap()[0].name, sa_name);
    // Least privilege: no wildcards, no secrets, no deletes.
    for r in rules.iter().chain(lease_rules) {
        assert!(!r.verbs.iter().any(|v| v == "*" || v == "delete"), "{r:?}");
        assert!(
            !r.resources
                .as_ref()
                .unwrap()
                .iter()
                .any(|x| x == "*" || x == "secrets"),
            "{r:?}"
        );
    }

    // The DaemonSet: service account, node name, host /nix, probes on the
    // registry's port, and the registry on the node's loopback.
    let ds = &docs.daemonsets[0];
    let pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(sa_name.as_str()));
    assert_eq!(pod.host_network, Some(true));
    let c = &pod.containers[0];
    let args = c.args.clone().unwrap_or_default();
    let listen = args
        .iter()
        .find_map(|a| a.strip_prefix("--listen="))
        .expect("--listen");
    let port: i32 = listen.rsplit(':').next().unwrap().parse().unwrap();
    assert!(
        listen.starts_with("127.0.0.1:"),
        "the registry listens on the node's loopback"
    );
    assert_eq!(c.command.as_ref().unwrap()[1], "agent");
    // The flags are ones `nixery agent` accepts.
    let mut argv = vec![
        "nixery".to_string(),
        "agent".to_string(),
        "--node-name=n".to_string(),
    ];
    // The kubelet expands $(VAR) from the container's env.
    argv.extend(args.iter().map(|a| a.replace("$(HOST_IP)", "10.0.0.1")));
    <nixery::config::Cli as clap::Parser>::try_parse_from(argv)
        .expect("the DaemonSet's args parse");
    let env: BTreeMap<String, _> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| (e.name.clone(), e.clone()))
        .collect();
    let field = |name: &str| {
        env[name]
            .value_from
            .as_ref()
            .unwrap()
            .field_ref
            .as_ref()
            .unwrap()
            .field_path
            .clone()
    };
    assert_eq!(field("NODE_NAME"), "spec.nodeName");
    assert_eq!(field("HOST_IP"), "status.hostIP");
    assert_eq!(field("POD_NAMESPACE"), "metadata.namespace");
    assert_eq!(c.ports.as_ref().unwrap()[0].container_port, port);
    // Metrics on the node's IP, on the port Prometheus is told to scrape.
    let metrics = args
        .iter()
        .find_map(|a| a.strip_prefix("--metrics-listen=$(HOST_IP):"))
        .expect("--metrics-listen on the node's IP");
    let annotations = ds
        .spec
        .template
        .metadata
        .as_ref()
        .unwrap()
        .annotations
        .clone()
        .unwrap();
    assert_eq!(annotations["prometheus.io/port"], metrics);
    assert!(c
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .any(|p| p.name.as_deref() == Some("metrics") && p.container_port.to_string() == metrics));
    // Pre-pull: the node's /run, read-only, where the agent looks for the
    // runtime's CRI socket (/host + each of nixery::cri::SOCKETS).
    let run = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.mount_path == "/host/run")
        .expect("the node's /run is mounted at /host/run");
    assert_eq!(run.read_only, Some(true));
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == run.name)
        .unwrap();
    assert_eq!(volume.host_path.as_ref().unwrap().path, "/run");
    assert!(nixery::cri::SOCKETS.iter().any(|s| s.starts_with("/run/")));
    // Pod security: what the namespace admits is what the pod needs.
    let labels = docs.namespaces[0].metadata.labels.clone().unwrap();
    assert_eq!(labels["pod-security.kubernetes.io/enforce"], "privileged");
    assert_eq!(
        pod.security_context
            .as_ref()
            .unwrap()
            .seccomp_profile
            .as_ref()
            .unwrap()
            .type_,
        "RuntimeDefault"
    );
    assert_eq!(
        pod.priority_class_name.as_deref(),
        Some("system-node-critical")
    );
    for (probe, path) in [
        (&c.readiness_probe, "/readyz"),
        (&c.liveness_probe, "/healthz"),
    ] {
        let get = probe.as_ref().unwrap().http_get.as_ref().unwrap();
        assert_eq!(get.path.as_deref(), Some(path));
        assert_eq!(
            get.port,
            k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::Int(port)
        );
        assert_eq!(get.host.as_deref(), Some("127.0.0.1"));
    }
    let mounts: BTreeMap<String, String> = c
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .map(|m| (m.mount_path.clone(), m.name.clone()))
        .collect();
    let volumes: BTreeMap<String, _> = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .map(|v| (v.name.clone(), v.clone()))
        .collect();
    assert_eq!(
        volumes[&mounts["/nix"]].host_path.as_ref().unwrap().path,
        "/nix"
    );
    let state_dir = args
        .iter()
        .find_map(|a| a.strip_prefix("--state-dir="))
        .unwrap();
    assert!(
        mounts.contains_key(state_dir),
        "the state directory is a volume"
    );
    assert!(c.resources.as_ref().unwrap().requests.is_some());
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.privileged, None, "not privileged");
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert!(sc
        .capabilities
        .as_ref()
        .unwrap()
        .drop
        .as_ref()
        .unwrap()
        .contains(&"ALL".to_string()));
    assert_eq!(pod.init_containers.as_ref().unwrap()[0].image, c.image);
}

#[test]
fn examples_parse_and_refer_to_real_images() {
    let docs = load(&repo_root().join("examples"));
    let deploy = load(&repo_root().join("deploy/base"));
    let c = &deploy.daemonsets[0]
        .spec
        .template
        .spec
        .as_ref()
        .unwrap()
        .containers[0];
    let listen = c
        .args
        .as_ref()
        .unwrap()
        .iter()
        .find_map(|a| a.strip_prefix("--listen="))
        .unwrap()
        .to_string();
    assert!(docs
        .niximages
        .iter()
        .any(|n| n.metadata.name.as_deref() == Some("curl-and-jq")));
    // Each NixImage means what it says: its packages (`shell` expanded),
    // its tag (a revision only where the source has revisions) and its
    // config, field by field.
    let git = nixery::nix::Source::Git {
        url: "file:///pkgs".into(),
    };
    let channel = nixery::nix::Source::Channel("x".into());
    for img in &docs.niximages {
        let name = img.metadata.name.clone().unwrap();
        let spec = nixery::k8s::sources::image_spec(&img.spec, &git)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        let mut want: Vec<String> = Vec::new();
        for c in &img.spec.contents {
            if c == "shell" {
                want.extend(nixery::builder::SHELL.iter().map(|s| s.to_string()));
            } else {
                want.push(c.clone());
            }
        }
        want.sort();
        want.dedup();
        assert_eq!(spec.packages, want, "{name}");
        assert_eq!(spec.tag, img.spec.tag, "{name}: a git source keeps the tag");
        assert_eq!(
            nixery::k8s::sources::image_spec(&img.spec, &channel)
                .unwrap()
                .tag,
            "latest",
            "{name}: a channel has one revision"
        );
        let config = img.spec.config.clone().unwrap_or_default();
        assert_eq!(spec.run.entrypoint, config.entrypoint, "{name}");
        assert_eq!(spec.run.cmd, config.cmd, "{name}");
        assert_eq!(spec.run.working_dir, config.working_dir, "{name}");
        assert_eq!(spec.run.user, config.user, "{name}");
        assert_eq!(spec.run.exposed_ports, config.exposed_ports, "{name}");
        let env: Vec<String> = config
            .env
            .iter()
            .map(|e| format!("{}={}", e.name, e.value))
            .collect();
        assert_eq!(spec.run.env, env, "{name}");
    }
    let web = docs
        .niximages
        .iter()
        .find(|n| n.metadata.name.as_deref() == Some("web-server"))
        .expect("examples/web-server.yaml");
    let config = web.spec.config.as_ref().unwrap();
    assert_eq!(config.entrypoint.as_ref().unwrap()[0], "httpd");
    assert_eq!(config.env[0].name, "GREETING");
    assert!(docs.pods.len() >= 3);
    for (ctx, spec) in &docs.pods {
        for container in &spec.containers {
            let image = container.image.as_deref().unwrap();
            let (host, rest) = image.split_once('/').unwrap();
            assert_eq!(
                host, listen,
                "{ctx}: pods pull from the agent on their node"
            );
            let (path, tag) = rest.rsplit_once(':').unwrap_or((rest, "latest"));
            match parse_route(&format!("{path}/manifests/{tag}"))
                .unwrap_or_else(|e| panic!("{ctx}: {image}: {e}"))
            {
                Route::Manifest {
                    repo: Repository::Named { namespace, name },
                    reference: Reference::Tag(t),
                } => {
                    let found = docs.niximages.iter().any(|n| {
                        n.metadata.namespace.as_deref() == Some(namespace.as_str())
                            && n.metadata.name.as_deref() == Some(name.as_str())
                            && n.spec.tag == t
                    });
                    assert!(found, "{ctx}: {image} names no NixImage in examples/");
                }
                Route::Manifest {
                    repo: Repository::AdHoc(_),
                    ..
                } => {}
                other => panic!("{ctx}: {other:?}"),
            }
        }
    }
}

#[test]
fn the_shared_storage_overlay_patches_the_agent_into_s3_settings_it_accepts() {
    let dir = repo_root().join("deploy/shared-storage");
    assert_eq!(kustomization_resources(&dir), vec!["../base"]);
    let base = load(&repo_root().join("deploy/base"));
    let ds = &base.daemonsets[0];
    // A partial DaemonSet (no selector): read as YAML, its container typed.
    let patch: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(dir.join("agent-s3.yaml")).unwrap()).unwrap();
    // It names the base's DaemonSet and container, or kustomize would fail.
    assert_eq!(patch["kind"], "DaemonSet");
    assert_eq!(
        patch["metadata"]["name"].as_str(),
        ds.metadata.name.as_deref()
    );
    assert_eq!(
        patch["metadata"]["namespace"].as_str(),
        ds.metadata.namespace.as_deref()
    );
    let c: k8s_openapi::api::core::v1::Container =
        serde_yaml::from_value(patch["spec"]["template"]["spec"]["containers"][0].clone()).unwrap();
    let base_pod = ds.spec.template.spec.as_ref().unwrap();
    assert_eq!(c.name, base_pod.containers[0].name);
    // Its variables, with the Secret's values, are settings the agent takes:
    // the S3 backend on the endpoint and bucket given.
    let env: BTreeMap<String, String> = c
        .env
        .as_ref()
        .unwrap()
        .iter()
        .map(|e| {
            let v = match (&e.value, &e.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(from)) => {
                    let s = from.secret_key_ref.as_ref().expect("from the Secret");
                    assert_eq!(s.name, "nixery-s3");
                    format!("secret:{}", s.key)
                }
                _ => panic!("{} has no value", e.name),
            };
            (e.name.clone(), v)
        })
        .collect();
    assert_eq!(env["AWS_ACCESS_KEY_ID"], "secret:access-key-id");
    assert_eq!(env["AWS_SECRET_ACCESS_KEY"], "secret:secret-access-key");
    let mut cmd = <nixery::config::Cli as clap::CommandFactory>::command();
    let agent = cmd.find_subcommand_mut("agent").unwrap();
    let read: Vec<String> = agent
        .get_arguments()
        .filter_map(|a| a.get_env().map(|e| e.to_string_lossy().into_owned()))
        .collect();
    for name in env.keys().filter(|n| n.starts_with("NIXERY_")) {
        assert!(read.contains(name), "`nixery agent` reads no {name}");
    }
    let args = <nixery::config::Cli as clap::Parser>::try_parse_from([
        "nixery",
        "agent",
        "--node-name=n",
        &format!("--storage-backend={}", env["NIXERY_STORAGE_BACKEND"]),
        &format!("--s3-endpoint={}", env["NIXERY_S3_ENDPOINT"]),
        &format!("--s3-bucket={}", env["NIXERY_S3_BUCKET"]),
        &format!("--s3-region={}", env["NIXERY_S3_REGION"]),
    ])
    .unwrap();
    let nixery::config::Command::Agent(a) = args.command else {
        panic!("not agent")
    };
    let settings = a.common.resolve(|_| None).unwrap();
    let nixery::config::Storage::S3 { s3, .. } = settings.storage else {
        panic!("not s3")
    };
    assert_eq!(s3.bucket, env["NIXERY_S3_BUCKET"]);
    assert_eq!(
        s3.endpoint.as_deref(),
        Some(env["NIXERY_S3_ENDPOINT"].as_str())
    );
}

/// `kubectl kustomize DIR` (the kustomize that `kubectl apply -k` runs):
/// the DaemonSet it renders, or None (said) where kubectl is missing.
fn rendered_daemonset(dir: &str) -> Option<DaemonSet> {
    if !have_tool("kubectl", "the kustomize overlays") {
        return None;
    }
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(repo_root().join(dir))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl kustomize {dir}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let mut daemonsets = Vec::new();
    let mut kinds = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let value = serde_yaml::Value::deserialize(doc).unwrap();
        kinds.push(value["kind"].as_str().unwrap().to_string());
        if value["kind"] == "DaemonSet" {
            daemonsets.push(serde_yaml::from_value::<DaemonSet>(value).unwrap());
        }
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "DaemonSet",
            "Namespace",
            "Role",
            "RoleBinding",
            "ServiceAccount"
        ],
        "{dir} renders the whole install"
    );
    daemonsets.pop()
}

fn agent_env(ds: &DaemonSet) -> BTreeMap<String, Option<String>> {
    let c = &ds.spec.template.spec.as_ref().unwrap().containers[0];
    c.env
        .iter()
        .flatten()
        .map(|e| (e.name.clone(), e.value.clone()))
        .collect()
}

#[test]
fn every_kustomization_renders_with_real_kustomize() {
    let Some(base) = rendered_daemonset("deploy") else {
        return;
    };
    assert_eq!(
        agent_env(&base)["NIXERY_CHANNEL"].as_deref(),
        Some("nixos-unstable")
    );
    let caps = |ds: &DaemonSet| {
        let c = &ds.spec.template.spec.as_ref().unwrap().containers[0];
        let caps = c
            .security_context
            .as_ref()
            .unwrap()
            .capabilities
            .as_ref()
            .unwrap();
        (
            caps.add.clone().unwrap_or_default(),
            caps.drop.clone().unwrap_or_default(),
        )
    };
    assert!(caps(&base).0.contains(&"SETUID".to_string()));

    // On one bucket: the S3 settings, the rest as in the base.
    let s3 = rendered_daemonset("deploy/shared-storage").unwrap();
    let env = agent_env(&s3);
    assert_eq!(env["NIXERY_STORAGE_BACKEND"].as_deref(), Some("s3"));
    assert!(env.contains_key("AWS_ACCESS_KEY_ID"));
    assert!(env.contains_key("NODE_NAME"));

    // Through a nix-daemon: NIX_REMOTE=daemon and no capability at all.
    let daemon = rendered_daemonset("deploy/nix-daemon").unwrap();
    assert_eq!(agent_env(&daemon)["NIX_REMOTE"].as_deref(), Some("daemon"));
    assert_eq!(caps(&daemon), (vec![], vec!["ALL".to_string()]));

    // The offline set: no channel (one source only), the set and what it
    // wraps mounted read-only from the host.
    let offline = rendered_daemonset("deploy/offline").unwrap();
    let env = agent_env(&offline);
    assert!(!env.contains_key("NIXERY_CHANNEL"));
    assert_eq!(
        env["NIXERY_PKGS_PATH"].as_deref(),
        Some("/opt/nixery/offline-pkgs")
    );
    assert_eq!(env["NIXERY_NIX_OPTIONS"].as_deref(), Some("substituters="));
    let pod = offline.spec.template.spec.as_ref().unwrap();
    let mounts: BTreeMap<String, (String, bool)> = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| {
            (
                m.mount_path.clone(),
                (m.name.clone(), m.read_only == Some(true)),
            )
        })
        .collect();
    for (host, path) in [
        ("/opt/nixery/offline-pkgs", "/opt/nixery/offline-pkgs"),
        ("/usr", "/usr"),
        ("/etc/services", "/host/etc/services"),
        ("/etc/protocols", "/host/etc/protocols"),
        (
            "/etc/ssl/certs/ca-certificates.crt",
            "/host/etc/ssl/certs/ca-certificates.crt",
        ),
    ] {
        assert!(mounts[path].1, "{path} is mounted read-only");
        let volume = pod
            .volumes
            .iter()
            .flatten()
            .find(|v| v.name == mounts[path].0)
            .unwrap();
        assert_eq!(volume.host_path.as_ref().unwrap().path, host);
    }
    assert_eq!(env["NIXERY_OFFLINE_HOST_ETC"].as_deref(), Some("/host/etc"));

    // arm64 under emulation: Nix may build aarch64, the agent builds both
    // systems (a value `nixery agent` accepts), the roots of the offline
    // set's other architectures mounted read-only.
    let emulated = rendered_daemonset("deploy/arm64-emulation").unwrap();
    let emulated_env = agent_env(&emulated);
    assert_eq!(
        emulated_env["NIX_CONFIG"].as_deref(),
        Some("extra-platforms = aarch64-linux")
    );
    let systems = emulated_env["NIXERY_SYSTEMS"].clone().unwrap();
    let args = <nixery::config::Cli as clap::Parser>::try_parse_from([
        "nixery",
        "agent",
        "--node-name=n",
        &format!("--systems={systems}"),
    ])
    .unwrap();
    let nixery::config::Command::Agent(agent) = args.command else {
        unreachable!()
    };
    let settings = agent.common.resolve(|_| None).unwrap();
    assert_eq!(
        settings.systems,
        [nixery::name::Arch::Amd64, nixery::name::Arch::Arm64]
    );
    let pod = emulated.spec.template.spec.as_ref().unwrap();
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/var/cache/nixery-offline")
        .expect("the offline roots are mounted");
    assert_eq!(mount.read_only, Some(true));

    // Signing: the Secret's key mounted read-only where the flag points.
    let signing = rendered_daemonset("deploy/signing").unwrap();
    let key = agent_env(&signing)["NIXERY_SIGNING_KEY"].clone().unwrap();
    let pod = signing.spec.template.spec.as_ref().unwrap();
    let mount = pod.containers[0]
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| key.starts_with(&format!("{}/", m.mount_path)))
        .expect("the key's directory is mounted");
    assert_eq!(mount.read_only, Some(true));
    let volume = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .unwrap();
    assert_eq!(
        volume.secret.as_ref().unwrap().secret_name.as_deref(),
        Some("nixery-signing-key")
    );
    let cmd = <nixery::config::Cli as clap::CommandFactory>::command();
    assert!(
        cmd.find_subcommand("agent")
            .unwrap()
            .get_arguments()
            .any(|a| a.get_env().is_some_and(|e| e == "NIXERY_SIGNING_KEY")),
        "`nixery agent` reads NIXERY_SIGNING_KEY"
    );
    // The settings are ones `nixery agent` accepts together.
    let args = <nixery::config::Cli as clap::Parser>::try_parse_from([
        "nixery",
        "agent",
        "--node-name=n",
        &format!(
            "--pkgs-path={}",
            env["NIXERY_PKGS_PATH"].as_deref().unwrap()
        ),
        &format!(
            "--nix-option={}",
            env["NIXERY_NIX_OPTIONS"].as_deref().unwrap()
        ),
    ]);
    assert!(args.is_ok(), "{args:?}");
}
