//! The CLI client: `kiln instance …` talks to `kiln serve` over its Unix socket (or TCP with a
//! bearer token) and prints tables, or JSON with `--json`.

use std::path::PathBuf;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

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
    json: bool,
}

/// `kiln instance …`
#[derive(Subcommand)]
pub enum InstanceCommand {
    /// List instances.
    List,
    /// Show one instance.
    Show {
        /// Name or id.
        name: String,
    },
    /// Create an instance.
    Create {
        /// Its name (a-z, 0-9, '-').
        name: String,
        /// vCPUs.
        #[arg(long, default_value_t = 1)]
        vcpus: u32,
        /// Memory (512MiB, 2GiB, or bytes).
        #[arg(long, default_value = "256MiB")]
        memory: String,
        /// Kernel image name.
        #[arg(long, default_value = "kiln-probe")]
        kernel: String,
        /// Kernel command line.
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        /// A NIC on this host TAP device (repeatable).
        #[arg(long = "tap", value_name = "TAP")]
        taps: Vec<String>,
        /// Start it too.
        #[arg(long)]
        start: bool,
    },
    /// Start an instance.
    Start {
        /// Name or id.
        name: String,
    },
    /// Stop an instance: ACPI power button, then a hard stop after --timeout.
    Stop {
        /// Name or id.
        name: String,
        /// Hard stop at once.
        #[arg(long)]
        force: bool,
        /// Seconds to wait for the guest before a hard stop.
        #[arg(long, default_value_t = 30)]
        timeout: u64,
    },
    /// Reboot an instance (--force: hard reset).
    Reboot {
        /// Name or id.
        name: String,
        /// Hard reset at once.
        #[arg(long)]
        force: bool,
    },
    /// Delete a stopped instance (--force: stop it first).
    Delete {
        /// Name or id.
        name: String,
        /// Hard-stop a running instance first.
        #[arg(long)]
        force: bool,
    },
}

impl Endpoint {
    async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kiln")
            .header("content-type", "application/json");
        let sender = match &self.url {
            Some(url) => {
                let addr = url.trim_start_matches("http://").trim_end_matches('/');
                let token = self
                    .token
                    .as_deref()
                    .ok_or("--url needs --token (or KILN_TOKEN)")?;
                req = req.header("authorization", format!("Bearer {token}"));
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                handshake(stream).await?
            }
            None => {
                let stream = tokio::net::UnixStream::connect(&self.socket)
                    .await
                    .map_err(|e| {
                        format!(
                            "cannot connect to {}: {e} (is `kiln serve` running? see --socket)",
                            self.socket.display()
                        )
                    })?;
                handshake(stream).await?
            }
        };
        let mut sender = sender;
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, value))
    }
}

async fn handshake<S>(
    stream: S,
) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake: {e}"))?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// The API's error message, or the status.
fn api_error(status: StatusCode, v: &Value) -> String {
    match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
        (Some(code), Some(msg)) => format!("{msg} ({code})"),
        _ => format!("the server answered {status}"),
    }
}

fn table(instances: &[Value]) {
    println!(
        "{:<20} {:<10} {:>5} {:>10}  ID",
        "NAME", "STATE", "VCPUS", "MEMORY"
    );
    for i in instances {
        println!(
            "{:<20} {:<10} {:>5} {:>10}  {}",
            i["name"].as_str().unwrap_or(""),
            i["state"].as_str().unwrap_or(""),
            i["vcpus"],
            format!("{}MiB", i["memory"].as_u64().unwrap_or(0) >> 20),
            i["id"].as_str().unwrap_or("")
        );
    }
}

/// Runs `kiln instance …`; returns the exit status.
pub fn instance(ep: Endpoint, cmd: InstanceCommand) -> i32 {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln: {e}");
            return 1;
        }
    };
    let action = |name: &str, body: Value| {
        (
            Method::POST,
            format!("/v1/instances/{name}/actions?wait=true"),
            Some(body),
        )
    };
    let (method, path, body) = match &cmd {
        InstanceCommand::List => (Method::GET, "/v1/instances".to_string(), None),
        InstanceCommand::Show { name } => (Method::GET, format!("/v1/instances/{name}"), None),
        InstanceCommand::Create {
            name,
            vcpus,
            memory,
            kernel,
            cmdline,
            taps,
            start,
        } => {
            let nics: Vec<Value> = taps.iter().map(|t| json!({"host_tap": t})).collect();
            let body = json!({"name": name, "vcpus": vcpus, "memory": memory,
                "boot": {"kernel": kernel, "cmdline": cmdline},
                "network_interfaces": nics, "start": start});
            (Method::POST, "/v1/instances".to_string(), Some(body))
        }
        InstanceCommand::Start { name } => action(name, json!({"action": "start"})),
        InstanceCommand::Stop {
            name,
            force,
            timeout,
        } => action(
            name,
            json!({"action": "stop", "force": force, "timeout_s": timeout}),
        ),
        InstanceCommand::Reboot { name, force } => {
            action(name, json!({"action": "reboot", "force": force}))
        }
        InstanceCommand::Delete { name, force } => (
            Method::DELETE,
            format!("/v1/instances/{name}?force={force}"),
            None,
        ),
    };
    match rt.block_on(ep.request(method, &path, body)) {
        Err(e) => {
            eprintln!("kiln: {e}");
            1
        }
        Ok((status, v)) if !status.is_success() => {
            eprintln!("kiln: {}", api_error(status, &v));
            1
        }
        Ok((_, v)) => {
            if ep.json {
                println!("{}", serde_json::to_string_pretty(&v).unwrap_or_default());
            } else if let Some(list) = v.as_array().or_else(|| v["items"].as_array()) {
                table(list);
            } else if v.is_object() && v.get("name").is_some() {
                table(std::slice::from_ref(&v));
            }
            0
        }
    }
}
