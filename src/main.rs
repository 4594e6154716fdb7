//! `kiln`: the Kiln virtual machine monitor.

mod console;
mod disk_cli;
mod endpoint;
mod instance_cli;
mod run;
mod serve;
mod table;
mod transfer;

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
        command: instance_cli::InstanceCommand,
        #[command(flatten)]
        endpoint: endpoint::Endpoint,
    },
    /// Attach to the serial console of a running instance (detach with Ctrl-]).
    ///
    /// What you type goes to the guest's COM1 and its output comes to stdout. When stdin is a
    /// terminal it is put in raw mode (Ctrl-C goes to the guest) until you detach with Ctrl-]
    /// (restored on every exit). When stdin is not a terminal, it is forwarded until it ends
    /// (a Ctrl-] byte in it detaches there); then the output is printed until the guest has
    /// been quiet for --timeout seconds. Either way the console ends, with status 0, when the
    /// instance stops or the server closes the connection. Only output from the moment of
    /// connection is shown; the history is in GET /v1/instances/NAME/console.
    Console {
        #[command(flatten)]
        args: console::ConsoleArgs,
        #[command(flatten)]
        endpoint: endpoint::Endpoint,
    },
    /// Manage disks through a running `kiln serve`.
    Disk {
        #[command(subcommand)]
        command: disk_cli::DiskCommand,
        #[command(flatten)]
        endpoint: endpoint::Endpoint,
    },
    /// Manage kernels, initrds and base disk images through a running `kiln serve`.
    Image {
        #[command(subcommand)]
        command: disk_cli::ImageCommand,
        #[command(flatten)]
        endpoint: endpoint::Endpoint,
    },
}

fn main() {
    init_logging();
    let cli = Cli::parse();
    let code = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Serve(args) => serve::serve(args),
        Command::Instance { command, endpoint } => instance_cli::instance(endpoint, command),
        Command::Console { args, endpoint } => console::console(endpoint, args),
        Command::Disk { command, endpoint } => disk_cli::disk(endpoint, command),
        Command::Image { command, endpoint } => disk_cli::image(endpoint, command),
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
