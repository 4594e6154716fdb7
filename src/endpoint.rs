//! How the CLI's client commands (`kiln instance`, `disk`, `image`, `console`) reach `kiln
//! serve`: the connection flags, the typed client they make, and how a command's result is
//! printed (a table, or JSON with `--json`) and turned into an exit status.

use std::path::{Path, PathBuf};

use clap::Args;
use serde::Serialize;

/// The socket `kiln serve` and the client commands use when neither a flag nor `KILN_SOCKET`
/// names one.
pub const DEFAULT_SOCKET: &str = "/run/kiln/kiln.sock";

/// Where `kiln serve` listens: the connection flags of a client command, given after its
/// subcommand (`kiln instance list --socket X`). Those given before it
/// ([`TopEndpoint`]: `kiln --socket X instance list`) and the environment fill what is not
/// given here.
#[derive(Args, Clone, Default)]
pub struct Endpoint {
    /// The server's Unix socket [env: KILN_SOCKET] [default: /run/kiln/kiln.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The server's TCP address instead (http://HOST:PORT); needs --token [env: KILN_URL].
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// Bearer token for --url [env: KILN_TOKEN].
    #[arg(long, global = true, value_name = "TOKEN")]
    token: Option<String>,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

/// The connection flags given before the subcommand (`kiln --socket X instance list`).
#[derive(Args, Clone, Default)]
pub struct TopEndpoint {
    /// The server's Unix socket [env: KILN_SOCKET] [default: /run/kiln/kiln.sock].
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// The server's TCP address instead (http://HOST:PORT); needs --token [env: KILN_URL].
    #[arg(long, value_name = "URL")]
    url: Option<String>,
    /// Bearer token for --url [env: KILN_TOKEN].
    #[arg(long, value_name = "TOKEN")]
    token: Option<String>,
    /// Print the server's JSON instead of a table.
    #[arg(long)]
    json: bool,
}

impl TopEndpoint {
    /// The socket named before the subcommand, else by `KILN_SOCKET`, else the default: the
    /// one `kiln serve` serves on when its own `--socket` is not given.
    pub fn socket(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(env_socket)
    }
}

/// `KILN_SOCKET`, else the default socket.
fn env_socket() -> PathBuf {
    env("KILN_SOCKET")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// A non-empty environment variable.
fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.is_empty())
}

impl Endpoint {
    /// These flags, with those given before the subcommand and then the environment
    /// (`KILN_SOCKET`, `KILN_URL`, `KILN_TOKEN`) for what is not given here.
    pub fn resolve(self, top: &TopEndpoint) -> Endpoint {
        let socket = self.socket.or_else(|| top.socket.clone());
        let url = self.url.or_else(|| top.url.clone());
        // A socket given as a flag wins over KILN_URL.
        let url = match (&url, &socket) {
            (None, None) => env("KILN_URL"),
            _ => url,
        };
        Endpoint {
            socket: Some(socket.unwrap_or_else(env_socket)),
            url,
            token: self
                .token
                .or_else(|| top.token.clone())
                .or_else(|| env("KILN_TOKEN")),
            json: self.json || top.json,
        }
    }

    fn socket_path(&self) -> PathBuf {
        self.socket.clone().unwrap_or_else(env_socket)
    }

    /// The client of the server these flags name.
    pub fn client(&self) -> Result<client::Client, String> {
        Ok(client::Client::new(match &self.url {
            Some(url) => {
                let token = self
                    .token
                    .as_deref()
                    .ok_or("--url needs --token (or KILN_TOKEN)")?;
                client::Endpoint::tcp(url, token)
            }
            None => client::Endpoint::Unix(self.socket_path()),
        }))
    }

    /// A command's failure, for the user: on the Unix socket, a connection refused says
    /// which flag names it, and a permission denied whose the socket is and its mode.
    pub fn explain(&self, e: Failed) -> String {
        match e {
            Failed::Call(client::Error::Connect { target, source }) if self.url.is_none() => {
                connect_hint(&self.socket_path(), &target, &source)
            }
            Failed::Call(e) => e.to_string(),
            Failed::Usage(e) => e,
        }
    }

    /// Runs a client command with the client these flags name; prints its error in one line.
    /// Returns the exit status.
    pub fn run<F, Fut>(self, command: F) -> i32
    where
        F: FnOnce(Endpoint, client::Client) -> Fut,
        Fut: std::future::Future<Output = Result<(), Failed>>,
    {
        run_command(async move {
            let c = self.client()?;
            let ep = self.clone();
            command(ep, c).await.map_err(|e| self.explain(e))
        })
    }

    /// Prints a result: its JSON with `--json`, else the table `table` makes of it.
    pub fn show<T: Serialize>(&self, value: &T, table: fn(&[serde_json::Value])) {
        let v = serde_json::to_value(value).unwrap_or_default();
        if self.json {
            print_json(&v);
        } else if let Some(list) = v.as_array() {
            table(list);
        } else if v.is_object() {
            table(std::slice::from_ref(&v));
        }
    }
}

/// Why the Unix socket at `path` could not be reached, and what to do.
fn connect_hint(path: &Path, target: &str, source: &std::io::Error) -> String {
    use std::io::ErrorKind;
    use std::os::unix::fs::MetadataExt;
    match source.kind() {
        ErrorKind::PermissionDenied => {
            // SAFETY: geteuid has no preconditions and cannot fail.
            let uid = unsafe { libc::geteuid() };
            let who = match std::fs::metadata(path) {
                Ok(m) => format!(
                    " (owner {}:{}, mode {:04o}; you are uid {})",
                    user_name(m.uid()),
                    group_name(m.gid()),
                    m.mode() & 0o7777,
                    uid
                ),
                Err(_) => String::new(),
            };
            format!(
                "cannot connect to {target}: permission denied{who}: run as its owner or a \
                 member of its group, or use --url with a token"
            )
        }
        _ => format!(
            "cannot connect to {target}: {source} (is `kiln serve` running? set --socket or \
             KILN_SOCKET)"
        ),
    }
}

/// A user's name from /etc/passwd, else the number.
fn user_name(uid: u32) -> String {
    name_in("/etc/passwd", uid).unwrap_or_else(|| uid.to_string())
}

/// A group's name from /etc/group, else the number.
fn group_name(gid: u32) -> String {
    name_in("/etc/group", gid).unwrap_or_else(|| gid.to_string())
}

/// The name of the entry with this id (third field) in a passwd-style file.
fn name_in(file: &str, id: u32) -> Option<String> {
    let text = std::fs::read_to_string(file).ok()?;
    text.lines().find_map(|l| {
        let mut f = l.split(':');
        let name = f.next()?;
        (f.nth(1)?.parse::<u32>().ok()? == id).then(|| name.to_string())
    })
}

/// Why a client command failed: a call refused, or something about the command itself.
pub enum Failed {
    /// A call of the API failed.
    Call(client::Error),
    /// The command line or a local file.
    Usage(String),
}

impl From<client::Error> for Failed {
    fn from(e: client::Error) -> Self {
        Failed::Call(e)
    }
}

impl From<String> for Failed {
    fn from(e: String) -> Self {
        Failed::Usage(e)
    }
}

/// A current-thread runtime for one CLI command.
pub fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
}

/// Runs a CLI command's future; prints its error in one line. Returns the exit status.
pub fn run_command(fut: impl std::future::Future<Output = Result<(), String>>) -> i32 {
    let rt = match runtime() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: {e}");
            return 1;
        }
    };
    match rt.block_on(fut) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("kiln: {e}");
            1
        }
    }
}

/// Prints JSON, pretty.
pub fn print_json(v: &serde_json::Value) {
    out(&format!(
        "{}\n",
        serde_json::to_string_pretty(v).unwrap_or_default()
    ));
}

/// Writes `text` to stdout. When stdout is a pipe that was closed (`kiln … | head -1`), the
/// command ends there, quietly and with status 0, as Unix tools do; another write error
/// ends it with status 1 and one line.
pub fn out(text: &str) {
    out_bytes(text.as_bytes());
}

/// [`out`] for bytes (console output).
pub fn out_bytes(bytes: &[u8]) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_all(bytes).and_then(|()| stdout.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("kiln: writing to stdout: {e}");
        std::process::exit(1);
    }
}

/// A size from the command line, in the one syntax of every size flag: a number with a
/// binary unit (`256M`, `1G`, `512MiB`, `4096B`); a bare number is MiB.
pub fn size(flag: &str, s: &str) -> Result<client::wire::Size, Failed> {
    vmm::parse_size(s, 1 << 20)
        .map(client::wire::Size)
        .map_err(|e| Failed::Usage(format!("{flag}: {e}")))
}
