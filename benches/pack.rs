//! Layer packing throughput by gzip level, single-threaded, one layer per store
//! path as the pipeline packs them, against `tar | gzip -6` on the same paths.
//! Usage: cargo bench --bench pack -- PATHS_FILE   (one store path a line;
//! benches/registry.sh writes one with `nix-store -qR`).

use std::io::Write;
use std::process::{Command, Stdio};
use std::time::Instant;

fn main() {
    let file = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .expect("usage: pack PATHS_FILE");
    let paths: Vec<String> = std::fs::read_to_string(&file)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect();
    let input: u64 = paths
        .iter()
        .map(|p| nixery::oci::store_path_entries(std::slice::from_ref(p)).unwrap())
        .flat_map(|entries| entries.into_iter())
        .map(|e| match e {
            nixery::oci::Entry::File { source, .. } => std::fs::metadata(source).unwrap().len(),
            _ => 0,
        })
        .sum();

    let t = Instant::now();
    let mut tar = Command::new("tar")
        .args(["-cf", "-", "-T", &file])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let gz = Command::new("gzip")
        .arg("-6")
        .stdin(tar.stdout.take().unwrap())
        .output()
        .unwrap();
    tar.wait().unwrap();
    let gzip_secs = t.elapsed().as_secs_f64();
    let gzip_size = gz.stdout.len() as f64;
    println!(
        "input: {} paths, {:.1} MB of file data",
        paths.len(),
        input as f64 / 1e6
    );
    println!(
        "tar | gzip -6: {:.1} MB/s, {} bytes",
        input as f64 / 1e6 / gzip_secs,
        gzip_size
    );
    type Pack = fn(
        &[nixery::oci::Entry],
        std::io::Sink,
        i64,
    ) -> std::io::Result<(std::io::Sink, nixery::oci::LayerBlob)>;
    let gzip: Pack = |e, w, level| nixery::oci::pack_layer_gzip_on(e, w, level as u32, 1);
    let zstd: Pack = |e, w, level| nixery::oci::pack_layer_zstd(e, w, level as i32);
    for (name, levels, pack) in [
        ("gzip", vec![1, 2, 3, 4, 5, 6, 7, 8, 9], gzip),
        ("zstd", vec![1, 3, 6, 9], zstd),
    ] {
        println!("{name}   MB/s (1 core)  size/gzip-6  speed/gzip-6");
        for level in levels {
            let t = Instant::now();
            let mut size = 0u64;
            for p in &paths {
                let entries = nixery::oci::store_path_entries(std::slice::from_ref(p)).unwrap();
                let (mut sink, blob) = pack(&entries, std::io::sink(), level).unwrap();
                sink.flush().unwrap();
                size += blob.size;
            }
            let secs = t.elapsed().as_secs_f64();
            println!(
                "{level:>5}  {:>13.1}  {:>11.3}  {:>12.2}",
                input as f64 / 1e6 / secs,
                size as f64 / gzip_size,
                gzip_secs / secs
            );
        }
    }
}
