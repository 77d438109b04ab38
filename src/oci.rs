//! Image format: reproducible layer tarballs, the customisation layer, and the
//! image config and manifests (OCI and Docker schema2) built with oci-spec.

use std::collections::BTreeMap;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use oci_spec::image as spec;
use sha2::Digest as _;

use crate::name::{Arch, Digest};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
pub const DOCKER_LAYER_TAR: &str = "application/vnd.docker.image.rootfs.diff.tar";
pub const OCI_LAYER_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Every file in every layer has this mtime (the Nix store's own), and the
/// config's `created` is the matching instant: no build time leaks in.
pub const EPOCH_MTIME: u64 = 1;
pub const CREATED: &str = "1970-01-01T00:00:01Z";
/// gzip level for layers (libdeflate's scale, 0 to 12); see benches/ and
/// docs/benchmarks.md for how it was chosen: what a user waits for on a cold pull is
/// packing more than transfer.
pub const GZIP_LEVEL: u32 = 3;
/// zstd level for layers when zstd is chosen; see benches/pack.rs.
pub const ZSTD_LEVEL: i32 = 3;

/// How layers are compressed. gzip is the default: every client reads it.
/// zstd is smaller and faster, but only OCI manifests can declare it, and
/// only newer runtimes read it (containerd 1.5+, Docker 23+, podman).
/// `none` stores plain tar (OCI `tar`, Docker `rootfs.diff.tar`): no CPU on
/// either end, for pulls that only cross a node's loopback.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, clap::ValueEnum)]
pub enum Compression {
    #[default]
    Gzip,
    Zstd,
    None,
}

impl Compression {
    /// Part of the layer cache key: a layer is the same only with the same
    /// compression and level.
    pub fn cache_tag(self) -> String {
        match self {
            Compression::Gzip => format!("gzip-libdeflate-{GZIP_LEVEL}"),
            Compression::Zstd => format!("zstd-{ZSTD_LEVEL}"),
            Compression::None => "none".into(),
        }
    }
    pub fn oci_layer_media_type(self) -> &'static str {
        match self {
            Compression::Gzip => OCI_LAYER_GZIP,
            Compression::Zstd => OCI_LAYER_ZSTD,
            Compression::None => OCI_LAYER_TAR,
        }
    }
    /// The Docker schema2 layer type, where schema2 can declare the layers
    /// (it has no zstd).
    pub fn docker_layer_media_type(self) -> Option<&'static str> {
        match self {
            Compression::Gzip => Some(DOCKER_LAYER_GZIP),
            Compression::Zstd => None,
            Compression::None => Some(DOCKER_LAYER_TAR),
        }
    }
}

/// A layer as stored: compressed digest, uncompressed digest, compressed size.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LayerBlob {
    pub digest: Digest,
    pub diff_id: Digest,
    pub size: u64,
}

/// A writer that hashes and counts what passes through it.
pub struct HashingWriter<W> {
    inner: W,
    hasher: sha2::Sha256,
    count: u64,
}

impl<W: Write> HashingWriter<W> {
    pub fn new(inner: W) -> Self {
        Self {
            inner,
            hasher: sha2::Sha256::new(),
            count: 0,
        }
    }
    pub fn finish(self) -> (W, Digest, u64) {
        (
            self.inner,
            Digest::from_sha256(self.hasher.finalize().into()),
            self.count,
        )
    }
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hasher.update(&buf[..n]);
        self.count += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// One entry of a layer tarball, in archive order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
        mode: u32,
    },
    /// Contents are read from `source` when the tarball is written.
    File {
        path: String,
        mode: u32,
        source: PathBuf,
    },
    Inline {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
}

impl Entry {
    pub fn path(&self) -> &str {
        match self {
            Entry::Dir { path, .. }
            | Entry::File { path, .. }
            | Entry::Inline { path, .. }
            | Entry::Symlink { path, .. } => path,
        }
    }
}

/// Lists store paths as tar entries (`nix/store/...`), sorted by path.
pub fn store_path_entries(paths: &[String]) -> io::Result<Vec<Entry>> {
    let mut entries = vec![
        Entry::Dir {
            path: "nix".into(),
            mode: 0o755,
        },
        Entry::Dir {
            path: "nix/store".into(),
            mode: 0o755,
        },
    ];
    for p in paths {
        let rel = p.trim_start_matches('/').to_string();
        walk(Path::new(p), &rel, &mut entries)?;
    }
    entries.sort_by(|a, b| a.path().as_bytes().cmp(b.path().as_bytes()));
    Ok(entries)
}

fn walk(src: &Path, rel: &str, out: &mut Vec<Entry>) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::symlink_metadata(src)?;
    let ft = meta.file_type();
    if ft.is_symlink() {
        let target = std::fs::read_link(src)?;
        out.push(Entry::Symlink {
            path: rel.into(),
            target: target.to_string_lossy().into_owned(),
        });
    } else if ft.is_dir() {
        out.push(Entry::Dir {
            path: rel.into(),
            mode: 0o555,
        });
        let mut names: Vec<_> = std::fs::read_dir(src)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<_>>()?;
        names.sort();
        for name in names {
            walk(
                &src.join(&name),
                &format!("{rel}/{}", name.to_string_lossy()),
                out,
            )?;
        }
    } else {
        // The store keeps only the executable bit; so do we.
        let mode = if meta.permissions().mode() & 0o111 != 0 {
            0o555
        } else {
            0o444
        };
        out.push(Entry::File {
            path: rel.into(),
            mode,
            source: src.to_path_buf(),
        });
    }
    Ok(())
}

/// Writes entries as a reproducible tarball: fixed mtime, uid, gid and owner
/// names, entries in the given order.
pub fn write_tar<W: Write>(entries: &[Entry], w: W) -> io::Result<W> {
    let mut tar = tar::Builder::new(w);
    tar.follow_symlinks(false);
    for e in entries {
        let mut h = tar::Header::new_gnu();
        h.set_mtime(EPOCH_MTIME);
        h.set_uid(0);
        h.set_gid(0);
        match e {
            Entry::Dir { path, mode } => {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_mode(*mode);
                h.set_size(0);
                tar.append_data(&mut h, format!("{path}/"), io::empty())?;
            }
            Entry::File { path, mode, source } => {
                let f = std::fs::File::open(source)?;
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(f.metadata()?.len());
                tar.append_data(&mut h, path, io::BufReader::with_capacity(256 * 1024, f))?;
            }
            Entry::Inline { path, mode, data } => {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_mode(*mode);
                h.set_size(data.len() as u64);
                tar.append_data(&mut h, path, data.as_slice())?;
            }
            Entry::Symlink { path, target } => {
                h.set_entry_type(tar::EntryType::Symlink);
                h.set_mode(0o777);
                h.set_size(0);
                tar.append_link(&mut h, path, target)?;
            }
        }
    }
    tar.into_inner()
}

/// Streams entries through tar and the compressor into `w`, hashing both
/// sides; memory use does not depend on the layer's size.
pub fn pack_layer<W: Write>(
    entries: &[Entry],
    w: W,
    compression: Compression,
) -> io::Result<(W, LayerBlob)> {
    match compression {
        Compression::Gzip => pack_layer_gzip(entries, w, GZIP_LEVEL),
        Compression::Zstd => pack_layer_zstd(entries, w, ZSTD_LEVEL),
        // The blob is the tar itself: its digest is its diff ID.
        Compression::None => pack_with(entries, w, Ok, Ok),
    }
}

type Sink<W> = HashingWriter<io::BufWriter<W>>;

/// gzip at a given level, with a fixed header (no name, no mtime), deflated
/// on every core (see `ParallelGz`).
pub fn pack_layer_gzip<W: Write>(
    entries: &[Entry],
    w: W,
    level: u32,
) -> io::Result<(W, LayerBlob)> {
    pack_layer_gzip_on(entries, w, level, parallelism())
}

/// `pack_layer_gzip` on at most `threads` threads (the same bytes).
pub fn pack_layer_gzip_on<W: Write>(
    entries: &[Entry],
    w: W,
    level: u32,
    threads: usize,
) -> io::Result<(W, LayerBlob)> {
    pack_with(
        entries,
        w,
        |sink| ParallelGz::new(sink, level, threads),
        ParallelGz::finish,
    )
}

fn parallelism() -> usize {
    std::thread::available_parallelism().map_or(2, |n| n.get())
}

/// Input bytes per block that `ParallelGz` compresses on its own.
const GZ_BLOCK: usize = 1 << 20;

/// gzip compressed on several threads: the input is cut into 1 MiB blocks,
/// each compressed by libdeflate on a thread of its own into a gzip member
/// of its own (header, deflate stream, CRC-32 and length), and the members
/// are written in order. A gzip file is a series of members (RFC 1952 §2.2):
/// Go's compress/gzip (docker, containerd, podman, skopeo), GNU gzip, pigz
/// and zlib's gunzip read them all, and eStargz layers are built the same
/// way. libdeflate has no streaming and no dictionaries, hence members
/// rather than one stream; it is 1.35x zlib-rs's speed at level 3 for 4 %
/// fewer bytes (docs/benchmarks.md), and 1 MiB members cost under 0.1 %.
/// The bytes depend on the input and level only, never on the number of
/// threads. Threads compressing at once are one per core over all layers
/// (`DeflateTurn`).
pub struct ParallelGz<W: Write> {
    out: W,
    level: libdeflater::CompressionLvl,
    block: Vec<u8>,
    /// Members written or handed to a thread.
    members: u64,
    running: std::collections::VecDeque<std::thread::JoinHandle<io::Result<Vec<u8>>>>,
    threads: usize,
}

impl<W: Write> ParallelGz<W> {
    /// `level` is libdeflate's, 0 to 12 (6 is gzip's default).
    pub fn new(out: W, level: u32, threads: usize) -> io::Result<Self> {
        let level = i32::try_from(level)
            .ok()
            .and_then(|l| libdeflater::CompressionLvl::new(l).ok())
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidInput,
                    format!("gzip level {level} is not one of libdeflate's (0 to 12)"),
                )
            })?;
        Ok(Self {
            out,
            level,
            block: Vec::with_capacity(GZ_BLOCK),
            members: 0,
            running: Default::default(),
            threads: threads.max(1),
        })
    }

    /// Hands the current block to a thread (or compresses it here: on one
    /// thread, and when it is the last and nothing else runs, so that a small
    /// layer needs no thread).
    fn dispatch(&mut self, last: bool) -> io::Result<()> {
        let block = std::mem::replace(&mut self.block, Vec::with_capacity(GZ_BLOCK));
        self.members += 1;
        let level = self.level;
        if self.threads == 1 || (last && self.running.is_empty()) {
            let out = gzip_member(&block, level)?;
            return self.out.write_all(&out);
        }
        while self.running.len() >= self.threads {
            self.write_oldest()?;
        }
        let turn = DeflateTurn::take();
        self.running.push_back(
            std::thread::Builder::new()
                .name("nixery-gzip".into())
                .spawn(move || {
                    let _turn = turn;
                    gzip_member(&block, level)
                })?,
        );
        Ok(())
    }

    fn write_oldest(&mut self) -> io::Result<()> {
        if let Some(t) = self.running.pop_front() {
            let out = t
                .join()
                .map_err(|_| io::Error::other("a gzip thread panicked"))??;
            self.out.write_all(&out)?;
        }
        Ok(())
    }

    /// Compresses what is left and returns the writer. Empty input is one
    /// empty member: a gzip file has at least one.
    pub fn finish(mut self) -> io::Result<W> {
        if !self.block.is_empty() || self.members == 0 {
            self.dispatch(true)?;
        }
        while !self.running.is_empty() {
            self.write_oldest()?;
        }
        Ok(self.out)
    }
}

/// One gzip member of `input`, as libdeflate writes it: no name, mtime 0.
fn gzip_member(input: &[u8], level: libdeflater::CompressionLvl) -> io::Result<Vec<u8>> {
    let mut z = libdeflater::Compressor::new(level);
    let mut out = vec![0; z.gzip_compress_bound(input.len())];
    let n = z
        .gzip_compress(input, &mut out)
        .map_err(|e| io::Error::other(format!("gzip: {e:?}")))?;
    out.truncate(n);
    Ok(out)
}

impl<W: Write> Write for ParallelGz<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = buf.len().min(GZ_BLOCK - self.block.len());
        self.block.extend_from_slice(&buf[..n]);
        if self.block.len() == GZ_BLOCK {
            self.dispatch(false)?;
        }
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// A turn to deflate a block on a thread of its own. Turns are counted over
/// every layer being packed (one per core), so blocks in memory stay about
/// 2 MiB per core however many layers pack at once; a block waits for one.
struct DeflateTurn;

static DEFLATE_TURNS: std::sync::OnceLock<(std::sync::Mutex<usize>, std::sync::Condvar)> =
    std::sync::OnceLock::new();

impl DeflateTurn {
    fn turns() -> &'static (std::sync::Mutex<usize>, std::sync::Condvar) {
        DEFLATE_TURNS.get_or_init(|| (std::sync::Mutex::new(parallelism()), Default::default()))
    }

    fn take() -> Self {
        let (free, freed) = Self::turns();
        let mut free = free.lock().unwrap_or_else(|e| e.into_inner());
        while *free == 0 {
            free = freed.wait(free).unwrap_or_else(|e| e.into_inner());
        }
        *free -= 1;
        DeflateTurn
    }
}

impl Drop for DeflateTurn {
    fn drop(&mut self) {
        let (free, freed) = Self::turns();
        *free.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        freed.notify_one();
    }
}

/// zstd at a given level, single-threaded so the output is reproducible
/// (layers are packed in parallel instead), with a checksum and no dictionary.
pub fn pack_layer_zstd<W: Write>(
    entries: &[Entry],
    w: W,
    level: i32,
) -> io::Result<(W, LayerBlob)> {
    pack_with(
        entries,
        w,
        |sink| {
            let mut z = zstd::stream::write::Encoder::new(sink, level)?;
            z.include_checksum(true)?;
            Ok(z)
        },
        zstd::stream::write::Encoder::finish,
    )
}

fn pack_with<W: Write, E: Write>(
    entries: &[Entry],
    w: W,
    start: impl FnOnce(Sink<W>) -> io::Result<E>,
    finish: impl FnOnce(E) -> io::Result<Sink<W>>,
) -> io::Result<(W, LayerBlob)> {
    let compressor = start(HashingWriter::new(io::BufWriter::with_capacity(
        256 * 1024,
        w,
    )))?;
    let tar_side = write_tar(entries, HashingWriter::new(compressor))?;
    let (compressor, diff_id, _) = tar_side.finish();
    let (buf, digest, size) = finish(compressor)?.finish();
    let w = buf.into_inner().map_err(|e| e.into_error())?;
    Ok((
        w,
        LayerBlob {
            digest,
            diff_id,
            size,
        },
    ))
}

/// What the customisation layer holds, and what the config derives from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Customisation {
    pub entries: Vec<Entry>,
    /// Names in `/bin`, for choosing `Cmd`.
    pub bin: Vec<String>,
}

enum Node {
    Dir(BTreeMap<String, Node>),
    Link(PathBuf),
}

/// Builds the customisation layer: a `/bin`, `/lib`, `/share`, `/etc`, ...
/// symlink tree into the given package paths (merged as nixpkgs' buildEnv
/// does: a directory found in several packages becomes a real directory; on a
/// file conflict the first package wins), plus `/tmp`, `/usr/bin/env`, and a
/// minimal `/etc/passwd` and `/etc/group` unless a package provides them.
pub fn customisation(roots: &[PathBuf]) -> io::Result<Customisation> {
    let mut top: BTreeMap<String, Node> = BTreeMap::new();
    for root in roots {
        let meta = std::fs::metadata(root)?;
        if !meta.is_dir() {
            continue;
        }
        for (name, path) in sorted_children(root)? {
            if name == "nix-support" {
                continue;
            }
            if path.is_dir() {
                let node = top
                    .entry(name)
                    .or_insert_with(|| Node::Dir(BTreeMap::new()));
                if let Node::Dir(children) = node {
                    for (n, p) in sorted_children(&path)? {
                        merge(children, n, p)?;
                    }
                }
            } else {
                top.entry(name).or_insert(Node::Link(path));
            }
        }
    }
    let bin: Vec<String> = match top.get("bin") {
        Some(Node::Dir(children)) => children.keys().cloned().collect(),
        _ => vec![],
    };
    let etc = top
        .entry("etc".into())
        .or_insert_with(|| Node::Dir(BTreeMap::new()));
    let mut extra = Vec::new();
    if let Node::Dir(children) = etc {
        if !children.contains_key("passwd") {
            extra.push(Entry::Inline {
                path: "etc/passwd".into(),
                mode: 0o644,
                data: b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/var/empty:/bin/false\n".to_vec(),
            });
        }
        if !children.contains_key("group") {
            extra.push(Entry::Inline {
                path: "etc/group".into(),
                mode: 0o644,
                data: b"root:x:0:\nnogroup:x:65534:\n".to_vec(),
            });
        }
    }
    let mut entries = Vec::new();
    flatten(&top, "", &mut entries);
    entries.extend(extra);
    entries.push(Entry::Dir {
        path: "tmp".into(),
        mode: 0o1777,
    });
    if bin.iter().any(|b| b == "env") && !top.contains_key("usr") {
        entries.push(Entry::Dir {
            path: "usr".into(),
            mode: 0o755,
        });
        entries.push(Entry::Dir {
            path: "usr/bin".into(),
            mode: 0o755,
        });
        entries.push(Entry::Symlink {
            path: "usr/bin/env".into(),
            target: "/bin/env".into(),
        });
    }
    entries.sort_by(|a, b| a.path().as_bytes().cmp(b.path().as_bytes()));
    Ok(Customisation { entries, bin })
}

fn sorted_children(dir: &Path) -> io::Result<Vec<(String, PathBuf)>> {
    let mut v: Vec<(String, PathBuf)> = std::fs::read_dir(dir)?
        .map(|e| e.map(|e| (e.file_name().to_string_lossy().into_owned(), e.path())))
        .collect::<io::Result<_>>()?;
    v.sort();
    Ok(v)
}

fn merge(map: &mut BTreeMap<String, Node>, name: String, src: PathBuf) -> io::Result<()> {
    match map.get_mut(&name) {
        None => {
            map.insert(name, Node::Link(src));
        }
        Some(Node::Dir(children)) if src.is_dir() => {
            for (n, p) in sorted_children(&src)? {
                merge(children, n, p)?;
            }
        }
        Some(node @ Node::Link(_)) => {
            let Node::Link(existing) = &*node else {
                unreachable!()
            };
            if existing.is_dir() && src.is_dir() {
                let mut children = BTreeMap::new();
                for (n, p) in sorted_children(existing)? {
                    merge(&mut children, n, p)?;
                }
                for (n, p) in sorted_children(&src)? {
                    merge(&mut children, n, p)?;
                }
                *node = Node::Dir(children);
            }
            // Otherwise a conflict: the first package keeps the name.
        }
        Some(Node::Dir(_)) => {}
    }
    Ok(())
}

fn flatten(map: &BTreeMap<String, Node>, prefix: &str, out: &mut Vec<Entry>) {
    for (name, node) in map {
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}/{name}")
        };
        match node {
            Node::Dir(children) => {
                out.push(Entry::Dir {
                    path: path.clone(),
                    mode: 0o755,
                });
                flatten(children, &path, out);
            }
            Node::Link(target) => out.push(Entry::Symlink {
                path,
                target: target.to_string_lossy().into_owned(),
            }),
        }
    }
}

/// The runtime config of an image: never empty, since runtimes read it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RunConfig {
    pub entrypoint: Option<Vec<String>>,
    pub cmd: Option<Vec<String>>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    pub exposed_ports: Vec<String>,
}

/// Picks a `Cmd` that makes sense: a shell when there is one, else the one
/// program of a single-package image.
/// The shell when the image has one, else the program of a one-package
/// image (its `meta.mainProgram` or `pname`) when it is in `/bin`.
pub fn default_cmd(bin: &[String], program: Option<&str>) -> Option<Vec<String>> {
    for shell in ["bash", "sh"] {
        if bin.iter().any(|b| b == shell) {
            return Some(vec![shell.into()]);
        }
    }
    let program = program?;
    bin.iter()
        .any(|b| b == program)
        .then(|| vec![program.to_string()])
}

/// The base environment every image gets; user entries override by name.
pub fn base_env() -> Vec<String> {
    vec![
        "PATH=/bin:/usr/bin:/sbin".into(),
        "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt".into(),
    ]
}

fn merge_env(base: Vec<String>, user: &[String]) -> Vec<String> {
    let key = |e: &str| e.split('=').next().unwrap_or("").to_string();
    let mut out: Vec<String> = base
        .into_iter()
        .filter(|b| !user.iter().any(|u| key(u) == key(b)))
        .collect();
    out.extend(user.iter().cloned());
    out
}

/// The image config JSON: reproducible (fixed `created`, no host data).
pub fn image_config(
    arch: Arch,
    layers: &[LayerBlob],
    run: &RunConfig,
    history: &[String],
) -> Result<Vec<u8>, oci_spec::OciSpecError> {
    let mut cfg = spec::ConfigBuilder::default()
        .env(merge_env(base_env(), &run.env))
        .working_dir(run.working_dir.clone().unwrap_or_else(|| "/".into()))
        .user(run.user.clone().unwrap_or_else(|| "0:0".into()));
    if let Some(cmd) = &run.cmd {
        cfg = cfg.cmd(cmd.clone());
    }
    if let Some(ep) = &run.entrypoint {
        cfg = cfg.entrypoint(ep.clone());
    }
    if !run.exposed_ports.is_empty() {
        cfg = cfg.exposed_ports(run.exposed_ports.clone());
    }
    let rootfs = spec::RootFsBuilder::default()
        .typ("layers")
        .diff_ids(
            layers
                .iter()
                .map(|l| l.diff_id.to_string())
                .collect::<Vec<_>>(),
        )
        .build()?;
    let history = history
        .iter()
        .map(|h| {
            spec::HistoryBuilder::default()
                .created(CREATED)
                .created_by(h.clone())
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let config = spec::ImageConfigurationBuilder::default()
        .created(CREATED)
        .architecture(match arch {
            Arch::Amd64 => spec::Arch::Amd64,
            Arch::Arm64 => spec::Arch::ARM64,
        })
        .os(spec::Os::Linux)
        .config(cfg.build()?)
        .rootfs(rootfs)
        .history(history)
        .build()?;
    Ok(config.to_string()?.into_bytes())
}

/// The manifest JSON for an image, in OCI or Docker schema2 media types
/// (schema2 has no zstd layers: ask for it only with gzip).
pub fn manifest(
    docker: bool,
    config: &[u8],
    layers: &[LayerBlob],
    compression: Compression,
) -> Result<Vec<u8>, oci_spec::OciSpecError> {
    let (m, c, l) = if docker {
        let l = compression.docker_layer_media_type().ok_or_else(|| {
            oci_spec::OciSpecError::Other("Docker schema2 cannot declare zstd layers".into())
        })?;
        (DOCKER_MANIFEST, DOCKER_CONFIG, l)
    } else {
        (OCI_MANIFEST, OCI_CONFIG, compression.oci_layer_media_type())
    };
    let digest =
        |d: &Digest| -> Result<spec::Digest, oci_spec::OciSpecError> { d.as_str().parse() };
    let config_desc = spec::Descriptor::new(
        spec::MediaType::Other(c.into()),
        config.len() as u64,
        digest(&Digest::of(config))?,
    );
    let layers = layers
        .iter()
        .map(|b| {
            Ok(spec::Descriptor::new(
                spec::MediaType::Other(l.into()),
                b.size,
                digest(&b.digest)?,
            ))
        })
        .collect::<Result<Vec<_>, oci_spec::OciSpecError>>()?;
    let manifest = spec::ImageManifestBuilder::default()
        .schema_version(2u32)
        .media_type(spec::MediaType::Other(m.into()))
        .config(config_desc)
        .layers(layers)
        .build()?;
    Ok(manifest.to_string()?.into_bytes())
}

/// An image index (OCI) or manifest list (Docker schema2) of one manifest
/// per architecture, in the order given: the same manifests give the same
/// bytes, on any node.
pub fn image_index(docker: bool, manifests: &[(Arch, &[u8])]) -> Vec<u8> {
    if !docker {
        let listed: Vec<(Arch, Digest, u64)> = manifests
            .iter()
            .map(|(a, m)| (*a, Digest::of(m), m.len() as u64))
            .collect();
        return index_of_digests(&listed);
    }
    let (index_type, manifest_type) = (DOCKER_LIST, DOCKER_MANIFEST);
    let entries: Vec<serde_json::Value> = manifests
        .iter()
        .map(|(arch, m)| {
            serde_json::json!({
                "mediaType": manifest_type,
                "digest": Digest::of(m).as_str(),
                "size": m.len(),
                "platform": { "architecture": arch.oci(), "os": "linux" },
            })
        })
        .collect();
    index_of(index_type, entries)
}

/// An OCI image index of manifests given as (architecture, digest, size).
pub fn index_of_digests(manifests: &[(Arch, Digest, u64)]) -> Vec<u8> {
    let entries = manifests
        .iter()
        .map(|(arch, digest, size)| {
            serde_json::json!({
                "mediaType": OCI_MANIFEST,
                "digest": digest.as_str(),
                "size": size,
                "platform": { "architecture": arch.oci(), "os": "linux" },
            })
        })
        .collect();
    index_of(OCI_INDEX, entries)
}

fn index_of(media_type: &str, entries: Vec<serde_json::Value>) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "mediaType": media_type,
        "manifests": entries,
    }))
    .expect("an index serialises")
}

/// The media type a stored manifest declares, if the bytes are a manifest.
pub fn manifest_media_type(bytes: &[u8]) -> Option<&'static str> {
    #[derive(serde::Deserialize)]
    struct Probe {
        #[serde(rename = "mediaType")]
        media_type: Option<String>,
        #[serde(rename = "schemaVersion")]
        schema_version: Option<u32>,
    }
    let probe: Probe = serde_json::from_slice(bytes).ok()?;
    if probe.schema_version != Some(2) {
        return None;
    }
    match probe.media_type.as_deref() {
        Some(OCI_MANIFEST) => Some(OCI_MANIFEST),
        Some(DOCKER_MANIFEST) => Some(DOCKER_MANIFEST),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Compressible and incompressible runs, as binaries and text mix.
    fn sample(len: usize) -> Vec<u8> {
        let mut x: u64 = 0x9e3779b97f4a7c15;
        (0..len)
            .map(|i| {
                if (i / 50_000) % 2 == 0 {
                    (i % 251) as u8
                } else {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                }
            })
            .collect()
    }

    fn parallel_gz(data: &[u8], threads: usize) -> Vec<u8> {
        let mut gz = ParallelGz::new(Vec::new(), GZIP_LEVEL, threads).unwrap();
        // In uneven writes, as tar writes them.
        for chunk in data.chunks(4096 + 17) {
            gz.write_all(chunk).unwrap();
        }
        gz.finish().unwrap()
    }

    #[test]
    fn deflate_threads_are_one_per_core_over_all_layers() {
        let all: Vec<DeflateTurn> = (0..parallelism()).map(|_| DeflateTurn::take()).collect();
        let (tx, rx) = std::sync::mpsc::channel();
        let waiting = std::thread::spawn(move || {
            let turn = DeflateTurn::take();
            tx.send(()).unwrap();
            drop(turn);
        });
        // Every turn is taken: one more waits (however long we look).
        assert!(rx
            .recv_timeout(std::time::Duration::from_millis(200))
            .is_err());
        drop(all);
        rx.recv().unwrap();
        waiting.join().unwrap();
    }

    /// The gzip members in `gz`, each decoded on its own.
    fn members(gz: &[u8]) -> Vec<Vec<u8>> {
        let mut rest = gz;
        let mut out = Vec::new();
        while !rest.is_empty() {
            let mut d = flate2::bufread::GzDecoder::new(rest);
            let mut member = Vec::new();
            io::Read::read_to_end(&mut d, &mut member).unwrap();
            rest = d.into_inner();
            out.push(member);
        }
        out
    }

    #[test]
    fn parallel_gzip_is_the_same_members_whatever_the_threads() {
        for len in [
            0,
            1,
            GZ_BLOCK - 1,
            GZ_BLOCK,
            GZ_BLOCK + 1,
            3 * GZ_BLOCK + GZ_BLOCK / 2,
        ] {
            let data = sample(len);
            let one = parallel_gz(&data, 1);
            for threads in [2, 8] {
                assert!(
                    one == parallel_gz(&data, threads),
                    "{len} bytes, {threads} threads"
                );
            }
            // One member per 1 MiB block, in order, each checked (CRC and
            // length) on its own; empty input is one empty member.
            let members = members(&one);
            assert_eq!(members.len(), len.div_ceil(GZ_BLOCK).max(1), "{len} bytes");
            assert!(members.iter().all(|m| m.len() <= GZ_BLOCK));
            assert!(members.concat() == data, "{len} bytes came back different");
            // A multi-member decoder (as Go's, which docker and containerd
            // use) reads the whole input.
            let mut back = Vec::new();
            io::Read::read_to_end(
                &mut flate2::read::MultiGzDecoder::new(one.as_slice()),
                &mut back,
            )
            .unwrap();
            assert!(back == data, "{len} bytes came back different");
            // As the real gzip reads it.
            let mut child = std::process::Command::new("gzip")
                .args(["-d", "-c"])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut stdin = child.stdin.take().unwrap();
            let input = one.clone();
            let feeder = std::thread::spawn(move || stdin.write_all(&input));
            let out = child.wait_with_output().unwrap();
            feeder.join().unwrap().unwrap();
            assert!(out.status.success(), "gzip -d failed on {len} bytes");
            assert!(out.stdout == data, "gzip -d gave other bytes for {len}");
            // Members cost little: within 1 % (+ 64 bytes) of one member of
            // the whole input at the same level.
            let mut z = libdeflater::Compressor::new(
                libdeflater::CompressionLvl::new(GZIP_LEVEL as i32).unwrap(),
            );
            let mut whole = vec![0; z.gzip_compress_bound(data.len())];
            let whole = z.gzip_compress(&data, &mut whole).unwrap();
            assert!(
                one.len() <= whole + whole / 100 + 64,
                "{len}: {} vs {whole}",
                one.len()
            );
        }
    }

    #[test]
    fn a_gzip_level_libdeflate_lacks_is_an_error_not_a_panic() {
        for level in [13, 100, u32::MAX] {
            let e = ParallelGz::new(Vec::new(), level, 2).err().unwrap();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            assert!(e.to_string().contains("0 to 12"), "{e}");
        }
        assert!(ParallelGz::new(Vec::new(), 12, 2).is_ok());
    }

    fn fixture() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path();
        std::fs::create_dir_all(p.join("pkg-a/bin")).unwrap();
        std::fs::create_dir_all(p.join("pkg-a/share/doc/a")).unwrap();
        std::fs::create_dir_all(p.join("pkg-b/bin")).unwrap();
        std::fs::create_dir_all(p.join("pkg-b/share/doc/b")).unwrap();
        std::fs::write(p.join("pkg-a/bin/bash"), b"#!a").unwrap();
        std::fs::write(p.join("pkg-a/bin/env"), b"env").unwrap();
        std::fs::write(p.join("pkg-b/bin/bash"), b"#!b").unwrap();
        std::fs::write(p.join("pkg-b/bin/curl"), b"curl").unwrap();
        std::os::unix::fs::symlink("bash", p.join("pkg-a/bin/sh")).unwrap();
        dir
    }

    fn pack(entries: &[Entry]) -> (Vec<u8>, LayerBlob) {
        pack_layer(entries, Vec::new(), Compression::Gzip).unwrap()
    }

    #[test]
    fn tarballs_are_reproducible_and_hashes_are_right() {
        let dir = fixture();
        let entries =
            store_path_entries(&[dir.path().join("pkg-a").to_string_lossy().into_owned()]).unwrap();
        let (bytes1, blob1) = pack(&entries);
        // Touch the files: mtimes must not matter.
        std::fs::write(dir.path().join("pkg-a/bin/bash"), b"#!a").unwrap();
        let (bytes2, blob2) = pack(&entries);
        assert_eq!(bytes1, bytes2);
        assert_eq!(blob1, blob2);
        assert_eq!(blob1.digest, Digest::of(&bytes1));
        assert_eq!(blob1.size, bytes1.len() as u64);
        let mut tar = Vec::new();
        io::Read::read_to_end(
            &mut flate2::read::MultiGzDecoder::new(bytes1.as_slice()),
            &mut tar,
        )
        .unwrap();
        assert_eq!(blob1.diff_id, Digest::of(&tar));
        // Entries are sorted, owned by root, with the fixed mtime.
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut names = Vec::new();
        for e in archive.entries().unwrap() {
            let e = e.unwrap();
            assert_eq!(e.header().mtime().unwrap(), EPOCH_MTIME);
            assert_eq!(e.header().uid().unwrap(), 0);
            names.push(e.path().unwrap().to_string_lossy().into_owned());
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(names[0] == "nix/" && names[1] == "nix/store/");
    }

    #[test]
    fn zstd_layers_are_reproducible_and_hash_their_tar() {
        let dir = fixture();
        let entries =
            store_path_entries(&[dir.path().join("pkg-b").to_string_lossy().into_owned()]).unwrap();
        let (a, blob) = pack_layer(&entries, Vec::new(), Compression::Zstd).unwrap();
        let (b, _) = pack_layer(&entries, Vec::new(), Compression::Zstd).unwrap();
        assert_eq!(a, b);
        assert_eq!(&a[..4], &[0x28, 0xb5, 0x2f, 0xfd], "a zstd frame");
        assert_eq!(blob.digest, Digest::of(&a));
        assert_eq!(
            blob.diff_id,
            Digest::of(&zstd::decode_all(a.as_slice()).unwrap())
        );
        let (_, gz) = pack_layer(&entries, Vec::new(), Compression::Gzip).unwrap();
        assert_eq!(gz.diff_id, blob.diff_id, "the same tar either way");
        let m = manifest(false, b"{}", &[blob], Compression::Zstd).unwrap();
        let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
        assert_eq!(v["layers"][0]["mediaType"], OCI_LAYER_ZSTD);
    }

    #[test]
    fn uncompressed_layers_are_their_own_diff() {
        let entries = vec![Entry::Inline {
            path: "etc/x".into(),
            mode: 0o644,
            data: b"plain".to_vec(),
        }];
        let (tar, blob) = pack_layer(&entries, Vec::new(), Compression::None).unwrap();
        assert_eq!(blob.digest, blob.diff_id);
        assert_eq!(blob.digest, Digest::of(&tar));
        assert_eq!(blob.size, tar.len() as u64);
        let names: Vec<String> = tar::Archive::new(&tar[..])
            .entries()
            .unwrap()
            .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().any(|n| n == "etc/x"), "{names:?}");
        let oci: serde_json::Value = serde_json::from_slice(
            &manifest(false, b"{}", std::slice::from_ref(&blob), Compression::None).unwrap(),
        )
        .unwrap();
        assert_eq!(oci["layers"][0]["mediaType"], OCI_LAYER_TAR);
        let docker: serde_json::Value = serde_json::from_slice(
            &manifest(true, b"{}", std::slice::from_ref(&blob), Compression::None).unwrap(),
        )
        .unwrap();
        assert_eq!(docker["layers"][0]["mediaType"], DOCKER_LAYER_TAR);
        assert!(manifest(true, b"{}", &[blob], Compression::Zstd).is_err());
    }
    #[test]
    fn customisation_merges_like_buildenv() {
        let dir = fixture();
        let roots = vec![dir.path().join("pkg-a"), dir.path().join("pkg-b")];
        let c = customisation(&roots).unwrap();
        let find = |p: &str| c.entries.iter().find(|e| e.path() == p).cloned();
        // First package wins a conflict.
        assert_eq!(
            find("bin/bash"),
            Some(Entry::Symlink {
                path: "bin/bash".into(),
                target: roots[0].join("bin/bash").to_string_lossy().into()
            })
        );
        assert!(matches!(find("bin/curl"), Some(Entry::Symlink { .. })));
        // A directory present in both packages becomes a real directory.
        assert!(matches!(find("share/doc"), Some(Entry::Dir { .. })));
        assert!(matches!(find("share/doc/a"), Some(Entry::Symlink { .. })));
        assert_eq!(
            find("tmp"),
            Some(Entry::Dir {
                path: "tmp".into(),
                mode: 0o1777
            })
        );
        assert_eq!(
            find("usr/bin/env"),
            Some(Entry::Symlink {
                path: "usr/bin/env".into(),
                target: "/bin/env".into()
            })
        );
        assert!(matches!(find("etc/passwd"), Some(Entry::Inline { .. })));
        assert_eq!(c.bin, vec!["bash", "curl", "env", "sh"]);
    }

    #[test]
    fn cmd_prefers_a_shell() {
        let bin = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            default_cmd(&bin(&["bash", "curl"]), Some("curl")),
            Some(vec!["bash".to_string()])
        );
        assert_eq!(
            default_cmd(&bin(&["curl"]), Some("curl")),
            Some(vec!["curl".to_string()])
        );
        // A program the image does not have, or none declared: no command.
        assert_eq!(default_cmd(&bin(&["jq", "curl"]), Some("requests")), None);
        assert_eq!(default_cmd(&bin(&["jq", "curl"]), None), None);
    }

    #[test]
    fn config_and_manifests() {
        let layer = LayerBlob {
            digest: Digest::of(b"l"),
            diff_id: Digest::of(b"d"),
            size: 1,
        };
        let run = RunConfig {
            cmd: Some(vec!["bash".into()]),
            env: vec!["PATH=/custom".into(), "FOO=1".into()],
            ..Default::default()
        };
        let cfg = image_config(
            Arch::Amd64,
            std::slice::from_ref(&layer),
            &run,
            &["nixery".into()],
        )
        .unwrap();
        let v: serde_json::Value = serde_json::from_slice(&cfg).unwrap();
        assert_eq!(v["created"], CREATED);
        assert_eq!(v["architecture"], "amd64");
        assert_eq!(v["config"]["User"], "0:0");
        assert_eq!(v["config"]["Cmd"][0], "bash");
        let env: Vec<&str> = v["config"]["Env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e.as_str().unwrap())
            .collect();
        assert_eq!(
            env,
            vec![
                "SSL_CERT_FILE=/etc/ssl/certs/ca-bundle.crt",
                "PATH=/custom",
                "FOO=1"
            ]
        );
        assert_eq!(v["rootfs"]["diff_ids"][0], layer.diff_id.as_str());
        for docker in [false, true] {
            let m = manifest(
                docker,
                &cfg,
                std::slice::from_ref(&layer),
                Compression::Gzip,
            )
            .unwrap();
            let mt = manifest_media_type(&m).unwrap();
            assert_eq!(
                mt,
                if docker {
                    DOCKER_MANIFEST
                } else {
                    OCI_MANIFEST
                }
            );
            let v: serde_json::Value = serde_json::from_slice(&m).unwrap();
            assert_eq!(v["config"]["digest"], Digest::of(&cfg).as_str());
            assert_eq!(v["config"]["size"], cfg.len());
            assert_eq!(v["layers"][0]["digest"], layer.digest.as_str());
        }
        assert_eq!(manifest_media_type(b"{\"not\":\"a manifest\"}"), None);
    }
}
