//! The HTTP path parser: any bytes as a request path after `/v2/`, decoded
//! and parsed; a crash or a package name that is no attribute path fails.
fn main() {
    afl::fuzz!(|data: &[u8]| {
        let Ok(raw) = std::str::from_utf8(data) else {
            return;
        };
        let Ok(path) = nixery::name::decode_path(raw) else {
            return;
        };
        if let Ok(nixery::name::Route::Manifest {
            repo: nixery::name::Repository::AdHoc(img),
            ..
        }) = nixery::name::parse_route(&path)
        {
            for p in &img.packages {
                assert!(nixery::name::is_attr_path(p), "{p:?}");
            }
        }
    });
}
