//! Pure layer planning: which store paths go into which layer, within a layer
//! budget, so that pulls need few layers and images share the ones they have
//! in common, as identical blobs *and* as identical prefixes (Docker and
//! containerd reuse a layer only under the same parent chain).
//!
//! The closure is divided among the image's root packages in a fixed order:
//! the packages every image gets (`cacert`, `iana-etc`), then the `shell`
//! set, then the user's packages (by popularity when a table is given, else
//! by name). Each root's group holds the paths of its closure that no earlier
//! root holds. Groups become layers in that order: a group's large paths
//! (at least [`OWN_LAYER_MIN`] bytes, the largest first, by popularity first
//! with a table) get layers of their own while the budget allows, ordered so
//! that a path comes before the paths that depend on it (glibc first), and the
//! rest of the group shares one layer. One layer is always kept for the groups
//! after the current one, so how a group is split never depends on how many
//! packages follow it; when the budget runs out, every remaining group
//! shares the last layer. So `shell/curl`, `shell/jq` and `shell/curl/jq` begin
//! with the same layers, and a large path such as glibc is one blob in every
//! image that gives it a layer of its own.
use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One store path of a closure, as `nix path-info --json` reports it.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathInfo {
    pub path: String,
    pub nar_size: u64,
    #[serde(default)]
    pub references: Vec<String>,
    /// The NAR hash as Nix prints it (empty where unknown), for SBOMs.
    #[serde(default)]
    pub nar_hash: String,
    /// The derivation that built it (empty where unknown).
    #[serde(default)]
    pub deriver: String,
}

/// A planned layer: store paths (sorted) and their total NAR size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedLayer {
    pub paths: Vec<String>,
    pub nar_size: u64,
}

/// Popularity counts keyed by store path basename (`<hash>-<name>`) or by
/// name without the hash; Nixery's popularity files use the latter.
pub type Popularity = HashMap<String, u64>;

/// A path at least this large (NAR bytes) may get a layer of its own.
pub const OWN_LAYER_MIN: u64 = 512 * 1024;

/// A store path's count in a popularity table (by basename, else by name
/// without the hash); 0 without a table or an entry.
pub fn popularity_of(popularity: Option<&Popularity>, path: &str) -> u64 {
    let Some(table) = popularity else { return 0 };
    let base = path.rsplit('/').next().unwrap_or(path);
    let name = base.split_once('-').map(|(_, n)| n).unwrap_or(base);
    table
        .get(base)
        .or_else(|| table.get(name))
        .copied()
        .unwrap_or(0)
}

/// Plans the store-path layers. `roots` are the image's packages, as sets
/// that make one group each, in the order their groups take (see the
/// module's text); `budget` counts every
/// layer of the image, the customisation layer included, so at most
/// `budget - 1` are returned.
pub fn plan(
    closure: &[PathInfo],
    roots: &[Vec<String>],
    budget: usize,
    popularity: Option<&Popularity>,
) -> Vec<PlannedLayer> {
    let store_budget = budget.max(2) - 1;
    let by_path: BTreeMap<&str, &PathInfo> = closure.iter().map(|p| (p.path.as_str(), p)).collect();
    let groups = root_groups(&by_path, roots);
    let depth = closure_counts(&by_path);
    let score = |p: &str| popularity_of(popularity, p);
    let layer = |paths: Vec<&str>| PlannedLayer {
        nar_size: paths.iter().map(|p| by_path[p].nar_size).sum(),
        paths: {
            let mut v: Vec<String> = paths.iter().map(|p| p.to_string()).collect();
            v.sort();
            v
        },
    };
    let mut layers: Vec<PlannedLayer> = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        let later = i + 1 < groups.len();
        let left = store_budget - layers.len();
        // The budget is down to one layer: this group and all after it share it.
        if left <= 1 {
            layers.push(layer(groups[i..].iter().flatten().copied().collect()));
            break;
        }
        // Layers this group may take: keep one for its rest, one for later groups.
        let room = left.saturating_sub(1 + usize::from(later));
        let mut large: Vec<&str> = group
            .iter()
            .copied()
            .filter(|p| by_path[p].nar_size >= OWN_LAYER_MIN)
            .collect();
        large.sort_by(|a, b| {
            score(b)
                .cmp(&score(a))
                .then(by_path[b].nar_size.cmp(&by_path[a].nar_size))
                .then(a.cmp(b))
        });
        large.truncate(room);
        // A path before the paths that depend on it.
        large.sort_by(|a, b| depth[a].cmp(&depth[b]).then(a.cmp(b)));
        let rest: Vec<&str> = group
            .iter()
            .copied()
            .filter(|p| !large.contains(p))
            .collect();
        layers.extend(large.iter().map(|p| layer(vec![p])));
        if !rest.is_empty() {
            layers.push(layer(rest));
        }
    }
    layers
}

/// Divides the closure among the roots, in order: each root's group is the
/// part of its closure that no earlier root's holds. Paths no root reaches
/// (none, for a closure Nix computed) form a last group.
fn root_groups<'a>(
    by_path: &BTreeMap<&'a str, &'a PathInfo>,
    roots: &[Vec<String>],
) -> Vec<Vec<&'a str>> {
    let mut taken: BTreeSet<&str> = BTreeSet::new();
    let mut groups = Vec::new();
    for set in roots {
        let mut group = Vec::new();
        let mut stack: Vec<&str> = set
            .iter()
            .filter_map(|r| by_path.get_key_value(r.as_str()).map(|(&k, _)| k))
            .collect();
        while let Some(p) = stack.pop() {
            if !taken.insert(p) {
                continue;
            }
            group.push(p);
            for r in &by_path[p].references {
                if let Some((&r, _)) = by_path.get_key_value(r.as_str()) {
                    if !taken.contains(r) {
                        stack.push(r);
                    }
                }
            }
        }
        if !group.is_empty() {
            group.sort();
            groups.push(group);
        }
    }
    let rest: Vec<&str> = by_path
        .keys()
        .copied()
        .filter(|p| !taken.contains(p))
        .collect();
    if !rest.is_empty() {
        groups.push(rest);
    }
    groups
}

/// For every path, the number of paths in its own closure (itself included):
/// a property of the path alone, the same in every image.
fn closure_counts<'a>(by_path: &BTreeMap<&'a str, &'a PathInfo>) -> HashMap<&'a str, usize> {
    by_path
        .keys()
        .map(|&p| {
            let mut seen: BTreeSet<&str> = BTreeSet::from([p]);
            let mut stack = vec![p];
            while let Some(x) = stack.pop() {
                for r in &by_path[x].references {
                    if let Some((&r, _)) = by_path.get_key_value(r.as_str()) {
                        if seen.insert(r) {
                            stack.push(r);
                        }
                    }
                }
            }
            (p, seen.len())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: u64 = 1 << 20;

    fn info(path: &str, size: u64, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: format!("/nix/store/{path}"),
            nar_size: size,
            references: refs.iter().map(|r| format!("/nix/store/{r}")).collect(),
            ..Default::default()
        }
    }

    fn roots(sets: &[&[&str]]) -> Vec<Vec<String>> {
        sets.iter()
            .map(|s| s.iter().map(|r| format!("/nix/store/{r}")).collect())
            .collect()
    }

    /// A shell-like base (certs, glibc, bash, coreutils with a big library
    /// and small ones) plus, for each extra package, its own closure of one
    /// large and `n` small libraries.
    fn image(extra: &[(&str, usize)]) -> (Vec<PathInfo>, Vec<Vec<String>>) {
        let mut c = vec![
            info("c-cacert", 100_000, &[]),
            info("i-iana-etc", 10_000, &[]),
            info("g-glibc", 3 * MB, &[]),
            info("t-tinfo", 200_000, &["g-glibc"]),
            info("b-bash", MB + 300_000, &["g-glibc", "t-tinfo"]),
            info("p-pcre2", 600_000, &["g-glibc"]),
            info("s-selinux", 180_000, &["g-glibc", "p-pcre2"]),
            info("u-coreutils", 7 * MB, &["g-glibc", "s-selinux"]),
        ];
        let mut sets: Vec<Vec<&str>> = vec![
            vec!["c-cacert", "i-iana-etc"],
            vec!["b-bash"],
            vec!["u-coreutils"],
        ];
        let mut names: Vec<String> = Vec::new();
        for (name, n) in extra {
            let big = format!("x-{name}-big");
            c.push(info(&big, 2 * MB, &["g-glibc"]));
            let mut refs = vec![big.clone()];
            for i in 0..*n {
                let small = format!("x-{name}-small{i:03}");
                c.push(info(&small, 50_000, &["g-glibc"]));
                refs.push(small);
            }
            let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
            c.push(info(&format!("y-{name}"), 300_000, &refs));
            names.push(format!("y-{name}"));
        }
        let mut out = roots(&sets.iter().map(Vec::as_slice).collect::<Vec<_>>());
        sets.clear();
        out.extend(names.into_iter().map(|n| vec![format!("/nix/store/{n}")]));
        (c, out)
    }

    fn plan_of(extra: &[(&str, usize)], budget: usize) -> Vec<PlannedLayer> {
        let (c, r) = image(extra);
        plan(&c, &r, budget, None)
    }

    #[test]
    fn large_paths_get_own_layers_dependencies_first() {
        let layers = plan_of(&[], 12);
        let names: Vec<Vec<&str>> = layers
            .iter()
            .map(|l| l.paths.iter().map(|p| &p[11..]).collect())
            .collect();
        assert_eq!(
            names,
            vec![
                vec!["c-cacert", "i-iana-etc"],
                vec!["g-glibc"],
                vec!["b-bash"],
                vec!["t-tinfo"],
                vec!["p-pcre2"],
                vec!["u-coreutils"],
                vec!["s-selinux"],
            ]
        );
    }

    #[test]
    fn images_with_one_base_begin_with_the_same_layers() {
        let base = plan_of(&[], 12);
        for extra in [
            vec![("curl", 30)],
            vec![("jq", 3)],
            vec![("curl", 30), ("jq", 3)],
            vec![("a", 1), ("b", 1), ("c", 1), ("d", 1), ("e", 1)],
        ] {
            let layers = plan_of(&extra, 12);
            assert_eq!(layers[..base.len()], base[..], "{extra:?}");
            assert!(layers.len() <= 11, "{extra:?}: {}", layers.len());
        }
        // Two extras share the base; each gets what is left.
        let curl = plan_of(&[("curl", 30)], 12);
        let jq = plan_of(&[("jq", 3)], 12);
        let shared = curl.iter().filter(|l| jq.contains(l)).count();
        assert_eq!(shared, base.len());
    }

    #[test]
    fn budget_is_respected_and_every_path_is_in_one_layer() {
        let (c, r) = image(&[("curl", 30), ("jq", 3), ("z", 50)]);
        for budget in 2..=40 {
            let layers = plan(&c, &r, budget, None);
            assert!(layers.len() < budget, "budget {budget}: {}", layers.len());
            let total: u64 = layers.iter().map(|l| l.nar_size).sum();
            assert_eq!(total, c.iter().map(|p| p.nar_size).sum::<u64>());
            let mut all: Vec<&String> = layers.iter().flat_map(|l| &l.paths).collect();
            all.sort();
            let n = all.len();
            all.dedup();
            assert_eq!((all.len(), n), (c.len(), c.len()), "budget {budget}");
        }
        // The smallest budget: one store layer holding everything.
        assert_eq!(plan(&c, &r, 2, None).len(), 1);
        // A roomy budget: every large path alone, each group's rest together.
        let layers = plan(&c, &r, 40, None);
        assert!(layers
            .iter()
            .filter(|l| l.nar_size >= OWN_LAYER_MIN)
            .all(|l| l.paths.len() == 1 || l.paths.iter().all(|p| !p.contains("big"))));
    }

    #[test]
    fn planning_is_deterministic_whatever_the_input_order() {
        let (c, r) = image(&[("curl", 30), ("jq", 3)]);
        let mut reversed = c.clone();
        reversed.reverse();
        for budget in [3, 8, 12, 30] {
            assert_eq!(
                plan(&c, &r, budget, None),
                plan(&reversed, &r, budget, None)
            );
        }
    }

    #[test]
    fn a_large_path_is_one_blob_in_every_image_that_has_room() {
        // glibc reached from different roots: its own layer either way.
        let a = vec![
            info("g-glibc", 3 * MB, &[]),
            info("a-app", 10, &["g-glibc"]),
        ];
        let b = vec![
            info("g-glibc", 3 * MB, &[]),
            info("x-extra", 7, &["g-glibc"]),
            info("b-app", 1, &["x-extra"]),
        ];
        let la = plan(&a, &roots(&[&["a-app"]]), 12, None);
        let lb = plan(&b, &roots(&[&["b-app"]]), 12, None);
        assert_eq!(la[0], lb[0]);
        assert_eq!(la[0].paths, vec!["/nix/store/g-glibc".to_string()]);
    }

    #[test]
    fn popularity_table_chooses_which_large_paths_get_layers() {
        let c = vec![
            info("aaa-big", 10 * MB, &[]),
            info("bbb-popular", MB, &[]),
            info("r-root", 1, &["aaa-big", "bbb-popular"]),
        ];
        let r = roots(&[&["r-root"]]);
        // Room for one own layer: by size without a table...
        let layers = plan(&c, &r, 3, None);
        assert_eq!(layers[0].paths, vec!["/nix/store/aaa-big".to_string()]);
        // ...by popularity with one.
        let mut table = Popularity::new();
        table.insert("popular".into(), 500);
        let layers = plan(&c, &r, 3, Some(&table));
        assert_eq!(layers[0].paths, vec!["/nix/store/bbb-popular".to_string()]);
    }
}
