//! Logging: tracing to stderr, filtered by `RUST_LOG` (default `info`); colour
//! only on a terminal (and never with `NO_COLOR`), or JSON lines for log
//! collectors with `--log-format json` (`NIXERY_LOG_FORMAT=json`).

use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;

/// Whether log lines may carry colour codes.
pub fn colour(is_terminal: bool, no_color: Option<&str>) -> bool {
    is_terminal && no_color.is_none_or(str::is_empty)
}

pub fn init(json: bool) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = if json {
        builder.json().try_init()
    } else {
        let ansi = colour(
            std::io::stderr().is_terminal(),
            std::env::var("NO_COLOR").ok().as_deref(),
        );
        builder.with_ansi(ansi).try_init()
    };
}

#[cfg(test)]
mod tests {
    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        use super::colour;
        assert!(colour(true, None));
        assert!(!colour(false, None));
        assert!(!colour(true, Some("1")));
        // NO_COLOR set but empty does not count (no-color.org).
        assert!(colour(true, Some("")));
    }
}
