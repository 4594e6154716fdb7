//! Where `kiln`'s own logs go and how they look: stderr, plain text unless stderr is a
//! terminal (no ANSI colour in log files), or one JSON object per line for log shippers
//! (`kiln serve --log-format json`). `KILN_LOG` takes a tracing filter (`debug`,
//! `api=debug,vmm=info`); without it the daemon logs at `info` (its start-up line and an
//! access line per request) and the other commands only warnings and errors.

use std::io::IsTerminal;

use clap::ValueEnum;

/// How the daemon's log lines are written.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// One line of text per event.
    #[default]
    Text,
    /// One JSON object per line (`timestamp`, `level`, `fields`, `target`, `span`).
    Json,
}

/// Logging of the client commands and `kiln run`: warnings and errors unless `KILN_LOG`
/// says more (no filter is compiled without it: it costs start-up time).
pub fn init_cli() {
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match std::env::var("KILN_LOG") {
        Ok(spec) => fmt
            .with_env_filter(tracing_subscriber::EnvFilter::new(spec))
            .init(),
        Err(_) => fmt.with_max_level(tracing::Level::WARN).init(),
    }
}

/// Logging of `kiln serve`: `info` unless `KILN_LOG` says otherwise, in `format`.
pub fn init_daemon(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::new(
        std::env::var("KILN_LOG").unwrap_or_else(|_| "info".to_string()),
    );
    let fmt = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Text => fmt.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => fmt.json().with_ansi(false).init(),
    }
}

/// The daemon's start-up line: what it serves and where.
pub fn started(
    socket: &std::path::Path,
    tcp: Option<std::net::SocketAddr>,
    state_dir: &std::path::Path,
    state: &api::AppState,
) {
    let tcp = tcp.map_or("off".to_string(), |a| {
        format!("http://{a} (bearer token required)")
    });
    let (instances, running) = state.manager.0.as_ref().map_or((0, 0), |m| {
        let all = m.list();
        let running = all.iter().filter(|i| !i.status.state.is_stopped()).count();
        (all.len(), running)
    });
    tracing::info!(
        "kiln serve {} ready: API on unix:{} (mode 0660), TCP {}; state in {}; {} instance(s), \
         {} auto-started; OpenAPI document at /v1/openapi.json",
        env!("CARGO_PKG_VERSION"),
        socket.display(),
        tcp,
        state_dir.display(),
        instances,
        running,
    );
}
