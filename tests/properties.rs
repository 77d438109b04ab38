//! Property tests (proptest) of the parts that face the network or decide
//! what an image holds: request paths and names, `Range`, layer planning,
//! and the reproducibility of tar and gzip output. Each property holds for
//! every input proptest generates, shrunk to the smallest failing one.

use std::collections::BTreeSet;
use std::io::Read;

use nixery::layers::{plan, PathInfo};
use nixery::name::{self, Reference, Repository, Route};
use nixery::oci::{self, Entry};
use proptest::prelude::*;

/// Attribute paths of the shapes package names take (`curl`,
/// `python3Packages.requests`, `gtk+3`).
fn package() -> impl Strategy<Value = String> {
    "[a-zA-Z_][a-zA-Z0-9_+-]{0,11}(\\.[a-zA-Z_][a-zA-Z0-9_+-]{0,7})?"
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Any path parses or is refused, never panics; every package name an
    /// accepted path carries is an attribute path (what Nix is given is
    /// validated); the canonical name parses back to the same image.
    #[test]
    fn request_paths_parse_to_validated_names(
        parts in proptest::collection::vec("[ -~]{0,12}", 1..6),
        tag in "[ -~]{0,12}",
    ) {
        let path = format!("{}/manifests/{tag}", parts.join("/"));
        if let Ok(Route::Manifest { repo: Repository::AdHoc(img), reference }) = name::parse_route(&path) {
            for p in &img.packages {
                prop_assert!(name::is_attr_path(p), "{p:?} reached the image unvalidated");
            }
            if let Reference::Tag(t) = &reference {
                prop_assert!(name::validate_tag(t).is_ok());
            }
            let again = name::parse_route(&format!("{}/manifests/latest", img.name())).unwrap();
            match again {
                Route::Manifest { repo: Repository::AdHoc(back), .. } => prop_assert_eq!(back, img),
                other => prop_assert!(false, "the canonical name parsed as {:?}", other),
            }
        }
    }

    /// Package lists in any order and with repeats name one image.
    #[test]
    fn package_order_and_repeats_do_not_matter(
        mut pkgs in proptest::collection::vec(package(), 1..6),
        seed in any::<u64>(),
    ) {
        pkgs.retain(|p| p != "niximage" && !p.starts_with("shell") && !p.starts_with("arm64"));
        prop_assume!(!pkgs.is_empty());
        let a = name::parse_packages(&pkgs);
        let mut shuffled = pkgs.clone();
        shuffled.push(pkgs[(seed % pkgs.len() as u64) as usize].clone());
        let k = (seed % shuffled.len() as u64) as usize;
        shuffled.rotate_left(k);
        let b = name::parse_packages(&shuffled);
        match (a, b) {
            (Ok(a), Ok(b)) => prop_assert_eq!(a.name(), b.name()),
            (Err(_), Err(_)) => {}
            (a, b) => prop_assert!(false, "{:?} vs {:?}", a, b),
        }
    }

    /// `Range`: never a panic; a satisfiable range lies inside the blob; one
    /// `bytes=a-b` range means exactly those bytes, a suffix the last ones.
    #[test]
    fn ranges_stay_inside_the_blob(header in "[ -~]{0,24}", size in 0u64..10_000) {
        if let Ok(Some((start, end))) = nixery::registry::parse_range(&header, size) {
            prop_assert!(start < end && end <= size, "{header:?} on {size}: {start}..{end}");
        }
    }

    #[test]
    fn byte_ranges_mean_what_they_say(size in 1u64..10_000, a in 0u64..10_000, len in 0u64..10_000) {
        let start = a % size;
        let last = start + len;
        let got = nixery::registry::parse_range(&format!("bytes={start}-{last}"), size);
        prop_assert_eq!(got.ok().flatten(), Some((start, (last + 1).min(size))));
        let suffix = len % size + 1;
        let got = nixery::registry::parse_range(&format!("bytes=-{suffix}"), size);
        prop_assert_eq!(got.ok().flatten(), Some((size - suffix, size)));
        let beyond = nixery::registry::parse_range(&format!("bytes={}-", size + a), size);
        prop_assert!(beyond.is_err(), "a range past the end is 416");
    }
}

/// A closure as a DAG: path i may refer to any later path, and to itself.
fn closure() -> impl Strategy<Value = (Vec<PathInfo>, Vec<Vec<String>>)> {
    (1usize..40).prop_flat_map(|n| {
        (
            proptest::collection::vec(proptest::collection::vec(any::<bool>(), n), n),
            proptest::collection::vec(1u64..50_000_000, n),
            1..=n.min(6),
        )
            .prop_map(move |(refs, sizes, roots)| {
                let path = |i: usize| format!("/nix/store/{:0>32}-p{i}", i);
                let infos: Vec<PathInfo> = (0..n)
                    .map(|i| PathInfo {
                        path: path(i),
                        nar_size: sizes[i],
                        references: (i..n).filter(|j| refs[i][*j]).map(path).collect(),
                        ..Default::default()
                    })
                    .collect();
                // Each root's closure (what Nix would have listed).
                let roots = (0..roots).map(|r| vec![path(r)]).collect();
                (infos, roots)
            })
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]

    /// Layer planning: within the budget (the customisation layer counts),
    /// every store path in exactly one layer, sizes that add up, and the
    /// same plan whatever order the closure came in.
    #[test]
    fn layer_plans_keep_their_invariants((closure, roots) in closure(), budget in 2usize..20, seed in any::<u64>()) {
        let layers = plan(&closure, &roots, budget, None);
        prop_assert!(layers.len() < budget, "{} layers for a budget of {budget}", layers.len());
        let mut placed: Vec<&str> = layers.iter().flat_map(|l| l.paths.iter().map(String::as_str)).collect();
        let total = placed.len();
        placed.sort();
        placed.dedup();
        prop_assert_eq!(placed.len(), total, "a path in two layers");
        let all: BTreeSet<&str> = closure.iter().map(|p| p.path.as_str()).collect();
        prop_assert_eq!(placed.into_iter().collect::<BTreeSet<_>>(), all);
        for l in &layers {
            let sum: u64 = l.paths.iter().map(|p| closure.iter().find(|c| &c.path == p).unwrap().nar_size).sum();
            prop_assert_eq!(l.nar_size, sum);
            let mut sorted = l.paths.clone();
            sorted.sort();
            prop_assert_eq!(&l.paths, &sorted, "a layer's paths are sorted");
        }
        let mut shuffled = closure.clone();
        let k = (seed % shuffled.len() as u64) as usize;
        shuffled.rotate_left(k);
        shuffled.reverse();
        prop_assert_eq!(plan(&shuffled, &roots, budget, None), layers);
    }
}

/// Tar entries with safe, distinct paths.
fn entries() -> impl Strategy<Value = Vec<Entry>> {
    proptest::collection::btree_map(
        "[a-z0-9]{1,8}(/[a-z0-9][a-z0-9._-]{0,7}){0,2}",
        (
            0u8..3,
            proptest::collection::vec(any::<u8>(), 0..3000),
            0o400u32..0o777,
        ),
        0..12,
    )
    .prop_map(|m| {
        let mut out = Vec::new();
        let mut dirs = BTreeSet::new();
        for (path, (kind, data, mode)) in m {
            // Every parent directory first, once (as a real layer has them).
            let parts: Vec<&str> = path.split('/').collect();
            for i in 1..parts.len() {
                let d = parts[..i].join("/");
                if dirs.insert(d.clone()) {
                    out.push(Entry::Dir {
                        path: d,
                        mode: 0o755,
                    });
                }
            }
            if dirs.contains(&path) {
                continue;
            }
            out.push(match kind {
                0 => Entry::Inline { path, mode, data },
                1 => Entry::Symlink {
                    path,
                    target: "../x".into(),
                },
                _ => {
                    dirs.insert(path.clone());
                    Entry::Dir { path, mode: 0o755 }
                }
            });
        }
        out
    })
}

/// (path, kind, contents or target) of a tar archive, as the `tar` crate reads it.
fn read_tar(bytes: &[u8]) -> Vec<(String, char, Vec<u8>)> {
    let mut a = tar::Archive::new(bytes);
    a.entries()
        .unwrap()
        .map(|e| {
            let mut e = e.unwrap();
            let path = e
                .path()
                .unwrap()
                .to_string_lossy()
                .trim_end_matches('/')
                .to_string();
            let kind = match e.header().entry_type() {
                tar::EntryType::Directory => 'd',
                tar::EntryType::Symlink => 'l',
                _ => 'f',
            };
            let mut data = Vec::new();
            if kind == 'l' {
                data = e
                    .link_name()
                    .unwrap()
                    .unwrap()
                    .to_string_lossy()
                    .as_bytes()
                    .to_vec();
            } else {
                e.read_to_end(&mut data).unwrap();
            }
            (path, kind, data)
        })
        .collect()
}

fn expected(entries: &[Entry]) -> Vec<(String, char, Vec<u8>)> {
    entries
        .iter()
        .map(|e| match e {
            Entry::Dir { path, .. } => (path.clone(), 'd', vec![]),
            Entry::Inline { path, data, .. } => (path.clone(), 'f', data.clone()),
            Entry::Symlink { path, target } => (path.clone(), 'l', target.as_bytes().to_vec()),
            Entry::File { .. } => unreachable!("not generated"),
        })
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    /// tar and gzip: the same entries give the same bytes (on one thread or
    /// several), and the layer decodes back to the entries, with a diff ID
    /// that is the tar's digest.
    #[test]
    fn layers_are_reproducible_and_decode_back(entries in entries(), threads in 1usize..4) {
        let (a, blob_a) = oci::pack_layer_gzip_on(&entries, Vec::new(), oci::GZIP_LEVEL, 1).unwrap();
        let (b, blob_b) = oci::pack_layer_gzip_on(&entries, Vec::new(), oci::GZIP_LEVEL, threads).unwrap();
        prop_assert!(a == b, "gzip output depends on the threads");
        prop_assert_eq!(&blob_a, &blob_b);
        prop_assert_eq!(blob_a.digest.clone(), name::Digest::of(&a));
        let mut tar = Vec::new();
        flate2::read::MultiGzDecoder::new(a.as_slice()).read_to_end(&mut tar).unwrap();
        prop_assert_eq!(blob_a.diff_id.clone(), name::Digest::of(&tar));
        prop_assert_eq!(read_tar(&tar), expected(&entries));
        let plain = oci::write_tar(&entries, Vec::new()).unwrap();
        prop_assert!(plain == tar, "the tar inside is write_tar's");
    }
}

/// GNU tar (what people and many tools use) reads the same layers: a few
/// generated cases, each listed and extracted by the real `tar`.
#[test]
fn gnu_tar_reads_the_layers() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    for _ in 0..8 {
        let entries = entries().new_tree(&mut runner).unwrap().current();
        let (gz, _) = oci::pack_layer_gzip(&entries, Vec::new(), oci::GZIP_LEVEL).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("layer.tar.gz");
        std::fs::write(&file, &gz).unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir(&out).unwrap();
        let status = std::process::Command::new("tar")
            .args(["-xzf"])
            .arg(&file)
            .arg("-C")
            .arg(&out)
            .status()
            .unwrap();
        assert!(status.success(), "GNU tar refused {entries:?}");
        for e in &entries {
            match e {
                Entry::Inline { path, data, .. } => {
                    assert_eq!(&std::fs::read(out.join(path)).unwrap(), data, "{path}")
                }
                Entry::Dir { path, .. } => assert!(out.join(path).is_dir(), "{path}"),
                Entry::Symlink { path, target } => assert_eq!(
                    std::fs::read_link(out.join(path))
                        .unwrap()
                        .to_string_lossy(),
                    target.as_str()
                ),
                Entry::File { .. } => unreachable!(),
            }
        }
    }
}
