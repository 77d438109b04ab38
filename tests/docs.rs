//! The documentation stays true: every relative link and anchor in README.md
//! and docs/ resolves, and docs/configuration.md lists exactly the flags
//! (and the environment variables) that `nixery --help` lists.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::repo_root;

/// The Markdown files of the documentation.
fn documents() -> Vec<PathBuf> {
    let root = repo_root();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// A document's lines outside code fences.
fn prose(text: &str) -> Vec<&str> {
    let mut fenced = false;
    text.lines()
        .filter(|l| {
            if l.trim_start().starts_with("```") {
                fenced = !fenced;
                return false;
            }
            !fenced
        })
        .collect()
}

/// GitHub's anchor for a heading: lowercase, punctuation dropped (but `-`
/// and `_`), spaces as `-`; a repeated heading gets `-1`, `-2`, ...
fn anchors(text: &str) -> BTreeSet<String> {
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let mut out = BTreeSet::new();
    for line in prose(text) {
        let Some(title) = line.strip_prefix('#') else {
            continue;
        };
        let title = title.trim_start_matches('#').trim();
        let slug: String = title
            .to_lowercase()
            .chars()
            .filter(|c| c.is_alphanumeric() || matches!(c, ' ' | '-' | '_'))
            .map(|c| if c == ' ' { '-' } else { c })
            .collect();
        let n = seen.entry(slug.clone()).or_insert(0);
        out.insert(if *n == 0 {
            slug.clone()
        } else {
            format!("{slug}-{n}")
        });
        *n += 1;
    }
    out
}

/// Every `[text](target)` and `![alt](target)` target outside code.
fn links(text: &str) -> Vec<String> {
    let re = regex::Regex::new(r"\]\(([^)\s]+)\)").unwrap();
    prose(text)
        .iter()
        .flat_map(|l| {
            // Inline code spans are not links.
            let l = regex::Regex::new(r"`[^`]*`").unwrap().replace_all(l, "");
            re.captures_iter(&l)
                .map(|c| c[1].to_string())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// What is wrong with one link of `from`, if anything.
fn broken(from: &Path, target: &str) -> Option<String> {
    if target.contains("://") || target.starts_with("mailto:") {
        return None;
    }
    let (path, anchor) = match target.split_once('#') {
        Some((p, a)) => (p, Some(a)),
        None => (target, None),
    };
    let file = if path.is_empty() {
        from.to_path_buf()
    } else {
        from.parent().unwrap().join(path)
    };
    if !file.exists() {
        return Some(format!("{target}: no such file {}", file.display()));
    }
    let anchor = anchor?;
    if file.is_dir() || file.extension().is_none_or(|e| e != "md") {
        return Some(format!(
            "{target}: an anchor into a file that is not Markdown"
        ));
    }
    let text = std::fs::read_to_string(&file).unwrap();
    (!anchors(&text).contains(anchor)).then(|| {
        format!(
            "{target}: {} has no heading #{anchor} (it has: {:?})",
            file.display(),
            anchors(&text)
        )
    })
}

#[test]
fn every_relative_link_and_anchor_resolves() {
    let mut problems = Vec::new();
    let mut checked = 0;
    for doc in documents() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for target in links(&text) {
            checked += 1;
            if let Some(p) = broken(&doc, &target) {
                problems.push(format!("{}: {p}", doc.display()));
            }
        }
    }
    assert!(
        checked > 20,
        "only {checked} links found: the parser is off"
    );
    assert!(
        problems.is_empty(),
        "broken links:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_link_check_catches_what_it_should() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.md");
    std::fs::write(
        &a,
        "# Title\n\n## Pods start: pre-pull\n\n## Pods start: pre-pull\n",
    )
    .unwrap();
    assert_eq!(broken(&a, "a.md#title"), None);
    assert_eq!(broken(&a, "#pods-start-pre-pull"), None);
    assert_eq!(broken(&a, "#pods-start-pre-pull-1"), None);
    assert!(broken(&a, "#pods-start").is_some());
    assert!(broken(&a, "b.md").is_some());
    assert_eq!(broken(&a, "https://example.com/x#y"), None);
    assert_eq!(
        links("see [a](a.md#x) and `[not](a link)`\n```\n[no](b.md)\n```\n![pic](p.png)"),
        vec!["a.md#x", "p.png"]
    );
}

/// Every long flag and environment variable of every command, as `--help`
/// shows them.
fn help_flags() -> (BTreeSet<String>, BTreeSet<String>) {
    let cli = <nixery::config::Cli as clap::CommandFactory>::command();
    let mut flags = BTreeSet::new();
    let mut envs = BTreeSet::new();
    let commands = std::iter::once(&cli).chain(cli.get_subcommands());
    for cmd in commands {
        for arg in cmd.get_arguments() {
            if let Some(long) = arg.get_long() {
                if !matches!(long, "help" | "version") {
                    flags.insert(format!("--{long}"));
                }
            }
            if let Some(env) = arg.get_env() {
                envs.insert(env.to_string_lossy().into_owned());
            }
        }
    }
    (flags, envs)
}

#[test]
fn the_configuration_doc_lists_exactly_the_flags_of_help() {
    let doc = std::fs::read_to_string(repo_root().join("docs/configuration.md")).unwrap();
    let re = regex::Regex::new(r"--[a-z][a-z0-9-]*[a-z0-9]").unwrap();
    let listed: BTreeSet<String> = prose(&doc)
        .iter()
        .flat_map(|l| {
            re.find_iter(l)
                .map(|m| m.as_str().to_string())
                .collect::<Vec<_>>()
        })
        .filter(|f| f != "--help")
        .collect();
    let (flags, envs) = help_flags();
    assert!(flags.len() > 30, "{flags:?}");
    let undocumented: Vec<_> = flags.difference(&listed).collect();
    let unknown: Vec<_> = listed.difference(&flags).collect();
    assert!(
        undocumented.is_empty(),
        "--help lists flags docs/configuration.md lacks: {undocumented:?}"
    );
    assert!(
        unknown.is_empty(),
        "docs/configuration.md lists flags --help lacks: {unknown:?}"
    );
    let missing_env: Vec<_> = envs.iter().filter(|e| !doc.contains(e.as_str())).collect();
    assert!(
        missing_env.is_empty(),
        "environment variables docs/configuration.md lacks: {missing_env:?}"
    );
}
