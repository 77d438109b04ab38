//! Pure layer planning: which store paths go into which layer, within a layer
//! budget, so that popular paths get layers of their own and images share blobs.
//!
//! Paths are ranked by popularity (from a popularity table when given, else by
//! how many paths of this closure depend on them), then by size. Within the
//! budget every path gets its own layer; past it, the least popular paths are
//! merged into one. A path's own layer is the same blob in every image, which is
//! what makes different images share glibc, openssl and the like.

use std::collections::{BTreeMap, BTreeSet, HashMap};

/// One store path of a closure, as `nix path-info --json` reports it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PathInfo {
    pub path: String,
    pub nar_size: u64,
    #[serde(default)]
    pub references: Vec<String>,
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

/// Plans the store-path layers. `budget` counts every layer of the image,
/// including the customisation layer, so at most `budget - 1` are returned.
pub fn plan(
    closure: &[PathInfo],
    budget: usize,
    popularity: Option<&Popularity>,
) -> Vec<PlannedLayer> {
    let store_budget = budget.max(2) - 1;
    let by_path: BTreeMap<&str, &PathInfo> = closure.iter().map(|p| (p.path.as_str(), p)).collect();
    let local = closure_popularity(&by_path);
    let score = |p: &str| -> u64 {
        popularity
            .and_then(|table| {
                let base = p.rsplit('/').next().unwrap_or(p);
                let name = base.split_once('-').map(|(_, n)| n).unwrap_or(base);
                table.get(base).or_else(|| table.get(name)).copied()
            })
            .unwrap_or_else(|| local[p])
    };
    let mut ranked: Vec<&PathInfo> = by_path.values().copied().collect();
    ranked.sort_by(|a, b| {
        score(&b.path)
            .cmp(&score(&a.path))
            .then(b.nar_size.cmp(&a.nar_size))
            .then(a.path.cmp(&b.path))
    });
    let own = if ranked.len() <= store_budget {
        ranked.len()
    } else {
        store_budget - 1
    };
    let mut layers: Vec<PlannedLayer> = ranked[..own]
        .iter()
        .map(|p| PlannedLayer {
            paths: vec![p.path.clone()],
            nar_size: p.nar_size,
        })
        .collect();
    if own < ranked.len() {
        let rest = &ranked[own..];
        let mut paths: Vec<String> = rest.iter().map(|p| p.path.clone()).collect();
        paths.sort();
        layers.push(PlannedLayer {
            paths,
            nar_size: rest.iter().map(|p| p.nar_size).sum(),
        });
    }
    layers
}

/// For every path, the number of closure paths that depend on it, itself
/// included (so a leaf that nothing references scores 1).
fn closure_popularity<'a>(by_path: &BTreeMap<&'a str, &'a PathInfo>) -> HashMap<&'a str, u64> {
    let mut reverse: HashMap<&str, Vec<&str>> = HashMap::new();
    for (path, info) in by_path {
        for r in &info.references {
            if r != path && by_path.contains_key(r.as_str()) {
                reverse.entry(r.as_str()).or_default().push(path);
            }
        }
    }
    by_path
        .keys()
        .map(|&p| {
            let mut seen: BTreeSet<&str> = BTreeSet::from([p]);
            let mut stack = vec![p];
            while let Some(x) = stack.pop() {
                for &up in reverse.get(x).map(Vec::as_slice).unwrap_or(&[]) {
                    if seen.insert(up) {
                        stack.push(up);
                    }
                }
            }
            (p, seen.len() as u64)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, size: u64, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: format!("/nix/store/{path}"),
            nar_size: size,
            references: refs.iter().map(|r| format!("/nix/store/{r}")).collect(),
        }
    }

    /// app-N -> lib-N -> glibc, for n apps.
    fn fan(n: usize) -> Vec<PathInfo> {
        let mut v = vec![info("g-glibc", 1000, &["g-glibc"])];
        for i in 0..n {
            v.push(info(&format!("l{i:03}-lib"), 10, &["g-glibc"]));
            v.push(info(&format!("a{i:03}-app"), 5, &[&format!("l{i:03}-lib")]));
        }
        v
    }

    #[test]
    fn within_budget_every_path_has_its_own_layer() {
        let c = fan(3);
        let layers = plan(&c, 100, None);
        assert_eq!(layers.len(), c.len());
        assert!(layers.iter().all(|l| l.paths.len() == 1));
        // glibc is the most popular: every path depends on it.
        assert_eq!(layers[0].paths, vec!["/nix/store/g-glibc".to_string()]);
    }

    #[test]
    fn budget_is_respected_and_sizes_add_up() {
        let c = fan(100); // 201 paths
        for budget in [2, 3, 10, 100] {
            let layers = plan(&c, budget, None);
            assert_eq!(layers.len(), budget - 1, "budget {budget}");
            let total: u64 = layers.iter().map(|l| l.nar_size).sum();
            assert_eq!(total, c.iter().map(|p| p.nar_size).sum::<u64>());
            let mut all: Vec<&String> = layers.iter().flat_map(|l| &l.paths).collect();
            all.sort();
            all.dedup();
            assert_eq!(all.len(), c.len(), "every path exactly once");
        }
    }

    #[test]
    fn planning_is_deterministic_whatever_the_input_order() {
        let c = fan(60);
        let mut reversed = c.clone();
        reversed.reverse();
        assert_eq!(plan(&c, 50, None), plan(&reversed, 50, None));
    }

    #[test]
    fn shared_paths_get_the_same_layer_in_different_images() {
        // Two images sharing glibc and lib000 but otherwise different.
        let a = vec![
            info("g-glibc", 1000, &[]),
            info("l000-lib", 10, &["g-glibc"]),
            info("a-app", 1, &["l000-lib"]),
        ];
        let b = vec![
            info("g-glibc", 1000, &[]),
            info("l000-lib", 10, &["g-glibc"]),
            info("b-app", 1, &["l000-lib", "x-extra"]),
            info("x-extra", 7, &["g-glibc"]),
        ];
        let la = plan(&a, 100, None);
        let lb = plan(&b, 100, None);
        for shared in ["/nix/store/g-glibc", "/nix/store/l000-lib"] {
            let find = |ls: &[PlannedLayer]| {
                ls.iter()
                    .find(|l| l.paths.contains(&shared.to_string()))
                    .cloned()
                    .unwrap()
            };
            assert_eq!(find(&la), find(&lb));
            assert_eq!(find(&la).paths.len(), 1);
        }
    }

    #[test]
    fn popularity_table_overrides_local_ranking() {
        let c = vec![info("aaa-big", 10_000, &[]), info("bbb-tiny", 1, &[])];
        let mut table = Popularity::new();
        table.insert("tiny".into(), 500);
        let layers = plan(&c, 2, Some(&table));
        assert_eq!(layers.len(), 1);
        let layers = plan(&c, 3, Some(&table));
        assert_eq!(layers[0].paths, vec!["/nix/store/bbb-tiny".to_string()]);
    }
}
