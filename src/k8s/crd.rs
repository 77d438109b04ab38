//! The NixImage custom resource (`k8s.nixos.org/v1alpha1`): a package list
//! and image config in `spec`, per-node and aggregate build state in `status`.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::core::{Reason, Rule};
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A nixpkgs attribute path, as `name::is_attr_path` accepts.
pub const ATTR_PATTERN: &str = r"^[A-Za-z0-9_][A-Za-z0-9_'+-]*(\.[A-Za-z0-9_][A-Za-z0-9_'+-]*)*$";
/// An OCI tag.
pub const TAG_PATTERN: &str = r"^[A-Za-z0-9_][A-Za-z0-9._-]{0,127}$";

/// A container image built by Nix from a list of packages, served by the
/// nixery agent on every node as `niximage/<namespace>/<name>:<tag>`.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, KubeSchema)]
#[kube(
    group = "k8s.nixos.org",
    version = "v1alpha1",
    kind = "NixImage",
    plural = "niximages",
    shortname = "nimg",
    namespaced,
    status = "NixImageStatus",
    doc = "A container image that Nix builds from a list of packages. The nixery agent on every node builds it into the node's /nix/store and serves it from the node's own registry, so Pods use `image: 127.0.0.1:5000/niximage/<namespace>/<name>:<tag>`; status.image is that reference with its digest.",
    printcolumn = r#"{"name":"Tag","type":"string","jsonPath":".spec.tag"}"#,
    printcolumn = r#"{"name":"Phase","type":"string","jsonPath":".status.phase"}"#,
    printcolumn = r#"{"name":"Nodes","type":"string","description":"nodes that serve the current generation, of all nodes","jsonPath":".status.readyNodes"}"#,
    printcolumn = r#"{"name":"Image","type":"string","jsonPath":".status.image"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#,
    printcolumn = r#"{"name":"Size","type":"integer","description":"compressed bytes","priority":1,"jsonPath":".status.size"}"#,
    printcolumn = r#"{"name":"Message","type":"string","priority":1,"jsonPath":".status.conditions[?(@.type==\"Ready\")].message"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct NixImageSpec {
    /// Package attribute paths (e.g. `curl`, `python3Packages.requests`);
    /// `shell` adds bash, coreutils and the usual interactive tools.
    #[schemars(length(max = 64), inner(length(max = 255)))]
    #[x_kube(validation = contents_not_empty(), validation = contents_are_attribute_paths())]
    pub contents: Vec<String>,
    /// The image tag; with a git package source it also names the revision.
    #[serde(default = "default_tag")]
    #[schemars(length(max = 128))]
    #[x_kube(validation = tag_is_valid())]
    pub tag: String,
    /// Overrides the agent's package source for this image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<PackageSource>,
    /// Image config: entrypoint, cmd, env, workingDir, user, exposedPorts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config: Option<ImageConfig>,
}

fn default_tag() -> String {
    "latest".into()
}

// Admission rules (CEL, `x-kubernetes-validations`): the API server refuses
// what can never build, and `kubectl apply` shows why.

fn contents_not_empty() -> Rule {
    Rule::new("self.size() > 0")
        .message("contents must name at least one package")
        .reason(Reason::FieldValueRequired)
}

fn contents_are_attribute_paths() -> Rule {
    let ok = format!(r#"p.matches(r"{ATTR_PATTERN}")"#);
    Rule::new(format!("self.all(p, {ok})")).message(kube::core::Message::Expression(format!(
        r#"'"' + self.filter(p, !({ok}))[0] + '" is not a package attribute path (such as curl or python3Packages.requests)'"#
    )))
}

fn tag_is_valid() -> Rule {
    Rule::new(format!(r#"self.matches(r"{TAG_PATTERN}")"#)).message(
        "tag must be 1 to 128 letters, digits, '_', '.' or '-', and not start with '.' or '-'",
    )
}

fn exactly_one_source() -> Rule {
    Rule::new(
        "[has(self.path), has(self.repo), has(self.channel), has(self.flake)].filter(x, x).size() == 1",
    )
    .message("source names exactly one of path, repo, channel or flake")
}

/// One of `path`, `repo`, `channel` or `flake`.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = exactly_one_source())]
pub struct PackageSource {
    /// A nixpkgs-shaped directory on the node.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A git repository URL; `spec.tag` names the revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub repo: Option<String>,
    /// A nixpkgs channel name or tarball URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<String>,
    /// A flake reference (`github:acme/app`, `git+https://host/app?ref=main`):
    /// `contents` name its outputs, found as `nix build FLAKE#NAME` finds
    /// them (`packages.<system>.NAME`, then `legacyPackages.<system>.NAME`).
    /// The agents lock it (status.revision) and lock it again after their
    /// cache TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub flake: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Ports as `8080/tcp`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(inner(pattern(r"^[0-9]{1,5}(/(tcp|udp|sctp))?$")))]
    pub exposed_ports: Vec<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
pub struct EnvVar {
    #[schemars(pattern(r"^[^=]+$"))]
    pub name: String,
    #[serde(default)]
    pub value: String,
}

/// Build state: one entry per node (each agent writes its own), and an
/// aggregate that says whether the image is ready everywhere.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NixImageStatus {
    /// The generation every node has built.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Pending, Building, Ready, Failed or Inconsistent (nodes disagree on the digest).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// A pullable reference with digest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<i64>,
    /// Compressed size in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// The digest of the image's CycloneDX SBOM (a blob of the image's
    /// repository; listed by the referrers API with the SPDX SBOM and the
    /// provenance).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<String>,
    /// The digest of the image's cosign signature manifest (tag
    /// `sha256-<hex>.sig`), when the agents sign (`--signing-key`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// What a moving source was resolved to, which every node builds: the
    /// commit of a git branch or tag, a flake's locked reference (with its
    /// `rev` and `narHash`), or `sha256:<hash>` of a channel tarball's
    /// unpacked contents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// What `revision` resolves: `<repository>#<branch or tag>`, the flake
    /// reference, or the channel's URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_of: Option<String>,
    /// When `revision` was resolved (RFC 3339); it is resolved again after
    /// the agents' cache TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision_resolved: Option<String>,
    /// `ready/total` nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_nodes: Option<String>,
    /// The image of each architecture the nodes built. With more than one,
    /// `digest` names the image index that lists them.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["architecture"]))]
    pub platforms: Vec<PlatformImage>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["node"]))]
    pub nodes: Vec<NodeStatus>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// An architecture's image (its OCI manifest).
#[derive(
    Deserialize, Serialize, Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Default, JsonSchema,
)]
#[serde(rename_all = "camelCase")]
pub struct PlatformImage {
    /// OCI architecture: amd64 or arm64.
    pub architecture: String,
    pub digest: String,
    /// The manifest's size in bytes, as an index lists it.
    pub size: i64,
}

/// One node's build of the image.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Default, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub node: String,
    /// Building, Ready or Failed.
    pub phase: String,
    pub observed_generation: i64,
    /// The node's architecture (OCI name); nodes are compared only with
    /// nodes of their own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    /// The digest of the node's image of its own architecture.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    /// Every architecture's image this node built (`--systems`): its own,
    /// and others under emulation or from a binary cache.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub platforms: Vec<PlatformImage>,
    /// The revision (git commit or channel hash) this node built, for a moving source.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Where pods on this node pull the image from (its own registry host).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Why the build failed: BuildFailed, UnknownPackages, InvalidSpec,
    /// SourceNotAllowed or UnsupportedSystem.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layers: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<i64>,
    /// The digest of the CycloneDX SBOM this node attached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sbom: Option<String>,
    /// The digest of this node's cosign signature manifest, when it signs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signature: Option<String>,
    /// The container runtime that holds the image already (`containerd
    /// 1.6.20`), pulled by the agent when it became ready: a Pod on this node
    /// starts without pulling it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pre_pulled: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// The CRD as YAML, as `nixery crd` prints it and `crds/niximage.yaml` holds.
pub fn crd_yaml() -> String {
    use kube::CustomResourceExt;
    serde_yaml::to_string(&NixImage::crd()).expect("the CRD serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attr_pattern_agrees_with_the_name_parser() {
        // The API server enforces ATTR_PATTERN (a regular expression); the
        // registry enforces is_attr_path. They must accept the same names.
        let re = regex::Regex::new(ATTR_PATTERN).unwrap();
        for s in [
            "curl",
            "python3Packages.requests",
            "iana-etc",
            "a.b.c",
            "gtk+3",
            "_private",
            "it's",
            "",
            "a..b",
            ".a",
            "a.",
            "-a",
            "a b",
            "$(x)",
            "a/b",
            "a;b",
            "ä",
            "a\n",
        ] {
            assert_eq!(re.is_match(s), crate::name::is_attr_path(s), "{s:?}");
        }
        let tag = regex::Regex::new(TAG_PATTERN).unwrap();
        for t in [
            "latest",
            "v1.2_3-rc",
            "_x",
            ".x",
            "-x",
            "",
            &"t".repeat(128),
            &"t".repeat(129),
        ] {
            assert_eq!(
                tag.is_match(t),
                crate::name::validate_tag(t).is_ok(),
                "{t:?}"
            );
        }
    }

    #[test]
    fn crd_has_the_contracted_names_and_columns() {
        let yaml = crd_yaml();
        let crd: k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(
            crd.metadata.name.as_deref(),
            Some("niximages.k8s.nixos.org")
        );
        assert_eq!(crd.spec.names.kind, "NixImage");
        assert_eq!(crd.spec.names.short_names, Some(vec!["nimg".to_string()]));
        assert_eq!(crd.spec.scope, "Namespaced");
        let v = &crd.spec.versions[0];
        assert_eq!(v.name, "v1alpha1");
        assert!(v.subresources.as_ref().unwrap().status.is_some());
        let cols: Vec<&str> = v
            .additional_printer_columns
            .as_ref()
            .unwrap()
            .iter()
            .map(|c| c.name.as_str())
            .collect();
        for c in ["Tag", "Phase", "Image", "Age"] {
            assert!(cols.contains(&c), "{cols:?}");
        }
        // Validation the API server enforces (tests/e2e_kube.rs tries it on a
        // real one): the same patterns as the registry's parser, as CEL rules.
        assert!(
            yaml.contains(&format!(r#"self.matches(r"{TAG_PATTERN}")"#)),
            "{yaml}"
        );
        assert!(
            yaml.contains(&format!(r#"p.matches(r"{ATTR_PATTERN}")"#)),
            "{yaml}"
        );
        assert!(yaml.contains("rule: self.size() > 0"), "{yaml}");
        assert!(!yaml.contains("Auto-generated"), "{yaml}");
        let schema = serde_json::to_value(&v.schema).unwrap();
        let status = &schema["openAPIV3Schema"]["properties"]["status"]["properties"];
        assert_eq!(status["nodes"]["x-kubernetes-list-type"], "map");
        assert_eq!(
            status["nodes"]["x-kubernetes-list-map-keys"],
            serde_json::json!(["node"])
        );
        assert_eq!(
            status["conditions"]["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
    }
}
