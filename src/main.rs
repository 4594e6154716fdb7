//! `kiln`: the Kiln virtual machine monitor.

mod client;
mod run;
mod serve;

use clap::{Parser, Subcommand};

/// Kiln: a KVM virtual machine monitor.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot one VM in the foreground, its serial console on this terminal.
    ///
    /// Without --kernel it boots the probe guest built into kiln. The exit status is 0 when
    /// the guest powers off, 1 when the VM fails, 130 when stopped with Ctrl-C.
    Run(run::RunArgs),
    /// Serve the REST API on a Unix socket (and TCP with a token): the host daemon.
    Serve(serve::ServeArgs),
    /// Manage instances through a running `kiln serve`.
    Instance {
        #[command(subcommand)]
        command: client::InstanceCommand,
        #[command(flatten)]
        endpoint: client::Endpoint,
    },
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Serve(args) => serve::serve(args),
        Command::Instance { command, endpoint } => client::instance(endpoint, command),
    };
    std::process::exit(code);
}

/// Logs go to stderr; `KILN_LOG` takes a tracing filter (`info`, `vmm=debug`). Without it only
/// warnings and errors are shown, and no filter is compiled (it costs startup time).
fn init_logging() {
    let fmt = tracing_subscriber::fmt().with_writer(std::io::stderr);
    match std::env::var("KILN_LOG") {
        Ok(spec) => fmt
            .with_env_filter(tracing_subscriber::EnvFilter::new(spec))
            .init(),
        Err(_) => fmt.with_max_level(tracing::Level::WARN).init(),
    }
}
