//! How the CLI's client commands (`kiln instance`, `disk`, `image`, `console`) reach `kiln
//! serve`: the connection flags, the typed client they make, and how a command's result is
//! printed (a table, or JSON with `--json`) and turned into an exit status.

use std::path::PathBuf;

use clap::Args;
use serde::Serialize;

/// Where `kiln serve` listens.
#[derive(Args, Clone)]
pub struct Endpoint {
    /// The server's Unix socket.
    #[arg(
        long,
        global = true,
        value_name = "PATH",
        default_value = "/run/kiln/kiln.sock"
    )]
    socket: PathBuf,
    /// The server's TCP address instead (http://HOST:PORT); needs --token.
    #[arg(long, global = true, value_name = "URL")]
    url: Option<String>,
    /// Bearer token for --url.
    #[arg(
        long,
        global = true,
        value_name = "TOKEN",
        env = "KILN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Print the server's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

impl Endpoint {
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
            None => client::Endpoint::Unix(self.socket.clone()),
        }))
    }

    /// A command's failure, for the user: on the Unix socket, a connection refused says
    /// which flag names it.
    pub fn explain(&self, e: Failed) -> String {
        match e {
            Failed::Call(e @ client::Error::Connect { .. }) if self.url.is_none() => {
                format!("{e} (is `kiln serve` running? see --socket)")
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
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// A size as the API takes it, from the command line: an integer when the text is only
/// digits (bytes), else the text with its unit (`512MiB`). The API's own rule parses it.
pub fn size(flag: &str, s: &str) -> Result<client::wire::Size, Failed> {
    let v = match s.trim().parse::<u64>() {
        Ok(n) => serde_json::json!(n),
        Err(_) => serde_json::json!(s.trim()),
    };
    serde_json::from_value(v).map_err(|e| Failed::Usage(format!("{flag}: {e}")))
}
