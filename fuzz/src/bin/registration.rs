//! The closure-graph reader: any bytes as `nix-store --dump-db` output.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        if let Ok(text) = std::str::from_utf8(data) {
            if let Ok(infos) = nixery::nix::parse_registration(text) {
                for i in &infos {
                    assert!(i.path.starts_with('/'));
                }
            }
        }
    });
}
