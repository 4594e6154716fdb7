//! `kiln`: the Kiln virtual machine monitor.

mod console;
mod disk_cli;
mod docs;
mod endpoint;
mod instance_cli;
mod logging;
mod logs;
mod operation_cli;
mod progress;
mod run;
mod serve;
mod snapshot_cli;
mod table;
mod transfer;

use clap::{Parser, Subcommand};

/// Kiln: a KVM virtual machine monitor.
///
/// The client commands (instance, console, logs, events, operation, disk, image) talk to a
/// running `kiln serve` on its Unix socket (--socket, or KILN_SOCKET; /run/kiln/kiln.sock by
/// default) or over TCP (--url and --token, or KILN_URL and KILN_TOKEN). The connection flags
/// go before or after the subcommand.
#[derive(Parser)]
#[command(name = "kiln", version, about, long_about)]
pub struct Cli {
    #[command(flatten)]
    endpoint: endpoint::TopEndpoint,
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
    /// connection is shown; the history is `kiln logs NAME`.
    Console {
        #[command(flatten)]
        args: console::ConsoleArgs,
        #[command(flatten)]
        endpoint: endpoint::Endpoint,
    },
    /// Print an instance's console history (kept across reboots and daemon restarts);
    /// --follow keeps printing new output.
    Logs {
        #[command(flatten)]
        args: logs::LogsArgs,
        #[command(flatten)]
        endpoint: endpoint::Endpoint,
    },
    /// Print the server's events (state changes, operations); --follow waits for new ones.
    Events {
        #[command(flatten)]
        args: logs::EventsArgs,
        #[command(flatten)]
        endpoint: endpoint::Endpoint,
    },
    /// List, show and wait for operations (long actions such as start and stop).
    Operation {
        #[command(subcommand)]
        command: operation_cli::OperationCommand,
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
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    ///
    /// For bash: `kiln completions bash > /etc/bash_completion.d/kiln`.
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff): `kiln man | man -l -`.
    Man,
    /// Snapshots through a running `kiln serve`: of instances (restore, clone) and of disks.
    Snapshot {
        #[command(subcommand)]
        command: snapshot_cli::SnapshotCommand,
        #[command(flatten)]
        endpoint: endpoint::Endpoint,
    },
}

fn main() {
    // `kiln run` and `kiln serve` are parsed with their own arguments only: clap builds the
    // whole CLI's tree (every subcommand's arguments) before parsing, which cost a VM's
    // start ~0.5 ms and most of its heap here. Anything this parse refuses (a mistake,
    // --help) goes through the full parser below, which answers as it always does.
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    match argv.get(1).and_then(|a| a.to_str()) {
        Some("run") => {
            if let Some(args) = parse_alone::<run::RunArgs>(&argv[2..]) {
                logging::init_cli();
                std::process::exit(run::run(args));
            }
        }
        Some("serve") => {
            if let Some(args) = parse_alone::<serve::ServeArgs>(&argv[2..]) {
                // No connection flags came before the subcommand.
                let socket = endpoint::TopEndpoint::default().socket();
                std::process::exit(serve::serve(args, socket));
            }
        }
        _ => {}
    }
    let cli = Cli::parse();
    let top = cli.endpoint;
    let code = match cli.command {
        Command::Run(args) => {
            logging::init_cli();
            run::run(args)
        }
        Command::Serve(args) => serve::serve(args, top.socket()),
        command => {
            logging::init_cli();
            client_command(command, &top)
        }
    };
    std::process::exit(code);
}

/// One subcommand's arguments parsed on their own (see `main`); `None` when they do not
/// parse, `--help` included (the full parser then says why).
fn parse_alone<T: clap::Args>(args: &[std::ffi::OsString]) -> Option<T> {
    let cmd = T::augment_args(
        clap::Command::new("kiln")
            .no_binary_name(true)
            .disable_help_flag(true)
            .disable_version_flag(true),
    );
    let matches = cmd.try_get_matches_from(args).ok()?;
    T::from_arg_matches(&matches).ok()
}

fn client_command(command: Command, top: &endpoint::TopEndpoint) -> i32 {
    match command {
        Command::Run(_) | Command::Serve(_) => unreachable!("not a client command"),
        Command::Instance { command, endpoint } => {
            instance_cli::instance(endpoint.resolve(top), command)
        }
        Command::Console { args, endpoint } => console::console(endpoint.resolve(top), args),
        Command::Logs { args, endpoint } => logs::logs(endpoint.resolve(top), args),
        Command::Events { args, endpoint } => logs::events(endpoint.resolve(top), args),
        Command::Operation { command, endpoint } => {
            operation_cli::operation(endpoint.resolve(top), command)
        }
        Command::Disk { command, endpoint } => disk_cli::disk(endpoint.resolve(top), command),
        Command::Image { command, endpoint } => disk_cli::image(endpoint.resolve(top), command),
        Command::Completions { shell } => docs::completions(shell),
        Command::Man => docs::man(),
        Command::Snapshot { command, endpoint } => {
            snapshot_cli::snapshot(endpoint.resolve(top), command)
        }
    }
}
