//! The CLI client: `kiln instance …` (and `kiln disk`, `kiln image`, `kiln console`) talk to
//! `kiln serve` over its Unix socket (or TCP with a bearer token) and print tables, or JSON with
//! `--json`.

use std::path::PathBuf;

use bytes::Bytes;
use clap::{Args, Subcommand};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};

use crate::table;

/// Any error a request body can fail with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The body of every request the client sends: JSON text or a stream.
pub type Body = http_body_util::combinators::BoxBody<Bytes, BoxError>;

/// A byte stream to the server: Unix socket or TCP.
pub trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

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
        /// Initrd image name.
        #[arg(long)]
        initrd: Option<String>,
        /// Kernel command line.
        #[arg(long, default_value = "console=ttyS0")]
        cmdline: String,
        /// Attach a disk (name; append `:ro` for read-only; repeatable, in guest order).
        #[arg(long = "disk", value_name = "DISK[:ro]")]
        disks: Vec<String>,
        /// Start it again whenever `kiln serve` starts.
        #[arg(long)]
        auto_start: bool,
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
    /// True when the server is reached over TCP (and requests carry the bearer token).
    fn token_for_tcp(&self) -> Result<Option<&str>, String> {
        match &self.url {
            Some(_) => self
                .token
                .as_deref()
                .map(Some)
                .ok_or_else(|| "--url needs --token (or KILN_TOKEN)".to_string()),
            None => Ok(None),
        }
    }

    /// The `Authorization` header value, for TCP.
    pub fn authorization(&self) -> Result<Option<String>, String> {
        Ok(self.token_for_tcp()?.map(|t| format!("Bearer {t}")))
    }

    /// The host and port of --url.
    fn tcp_addr(url: &str) -> &str {
        url.trim_start_matches("http://").trim_end_matches('/')
    }

    /// A connected byte stream to the server.
    pub async fn connect(&self) -> Result<Box<dyn Io>, String> {
        match &self.url {
            Some(url) => {
                self.token_for_tcp()?;
                let addr = Self::tcp_addr(url);
                let stream = tokio::net::TcpStream::connect(addr)
                    .await
                    .map_err(|e| format!("cannot connect to {addr}: {e}"))?;
                let _ = stream.set_nodelay(true);
                Ok(Box::new(stream))
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
                Ok(Box::new(stream))
            }
        }
    }

    /// A request to `path` with the headers every request carries (host, token).
    pub fn builder(
        &self,
        method: Method,
        path: &str,
    ) -> Result<hyper::http::request::Builder, String> {
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header("host", "kiln");
        if let Some(auth) = self.authorization()? {
            req = req.header("authorization", auth);
        }
        Ok(req)
    }

    /// Sends one request on a new connection; the response body is still to be read.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Incoming>, String> {
        let stream = self.connect().await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| format!("HTTP handshake: {e}"))?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        sender
            .send_request(req)
            .await
            .map_err(|e| format!("request failed: {e}"))
    }

    /// One JSON request; returns the status and the body (JSON, text as a string, or null).
    pub async fn request(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), String> {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let req = self
            .builder(method, path)?
            .header("content-type", "application/json")
            .body(json_body(body))
            .map_err(|e| e.to_string())?;
        let resp = self.send(req).await?;
        read_json(resp).await
    }

    /// [`Endpoint::request`], with an error status turned into the server's message.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<Value, String> {
        let (status, v) = self.request(method, path, body).await?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(api_error(status, &v))
        }
    }

    /// Every item of a list, following the `x-next-page-token` header when the server pages.
    pub async fn list(&self, path: &str) -> Result<Vec<Value>, String> {
        let mut items = Vec::new();
        let mut page = None::<String>;
        loop {
            let p = match &page {
                Some(t) => format!("{path}?page_token={}", query_escape(t)),
                None => path.to_string(),
            };
            let req = self
                .builder(Method::GET, &p)?
                .body(json_body(String::new()))
                .map_err(|e| e.to_string())?;
            let resp = self.send(req).await?;
            let next = resp
                .headers()
                .get("x-next-page-token")
                .and_then(|v| v.to_str().ok())
                .map(String::from);
            let (status, v) = read_json(resp).await?;
            if !status.is_success() {
                return Err(api_error(status, &v));
            }
            match v {
                Value::Array(a) => items.extend(a),
                other => return Err(format!("unexpected answer from the server: {other}")),
            }
            match next {
                Some(t) if !t.is_empty() && page.as_deref() != Some(t.as_str()) => page = Some(t),
                _ => return Ok(items),
            }
        }
    }
}

/// A request body of JSON text.
pub fn json_body(text: String) -> Body {
    Full::new(Bytes::from(text))
        .map_err(|never| match never {})
        .boxed()
}

/// Reads a whole response as JSON (text that is not JSON becomes a string).
pub async fn read_json(resp: Response<Incoming>) -> Result<(StatusCode, Value), String> {
    let status = resp.status();
    let bytes = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("reading the answer: {e}"))?
        .to_bytes();
    let value = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes)
            .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok((status, value))
}

/// The API's error message, or the status.
pub fn api_error(status: StatusCode, v: &Value) -> String {
    match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
        (Some(code), Some(msg)) => format!("{msg} ({code})"),
        _ => match v.as_str() {
            Some(text) if !text.trim().is_empty() && text.len() < 200 => {
                format!("the server answered {status}: {}", text.trim())
            }
            _ => format!("the server answered {status}"),
        },
    }
}

/// Percent-encodes a query parameter value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Percent-encodes one path segment (names and ids are plain, but a user may type anything).
pub fn path_escape(s: &str) -> String {
    query_escape(s)
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
pub fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// Runs `kiln instance …`; returns the exit status.
pub fn instance(ep: Endpoint, cmd: InstanceCommand) -> i32 {
    run_command(instance_async(ep, cmd))
}

async fn instance_async(ep: Endpoint, cmd: InstanceCommand) -> Result<(), String> {
    let action = |name: &str, body: Value| {
        (
            Method::POST,
            format!("/v1/instances/{}/actions?wait=true", path_escape(name)),
            Some(body),
        )
    };
    let (method, path, body) = match &cmd {
        InstanceCommand::List => {
            let list = ep.list("/v1/instances").await?;
            if ep.json {
                print_json(&Value::Array(list));
            } else {
                table::instances(&list);
            }
            return Ok(());
        }
        InstanceCommand::Show { name } => (
            Method::GET,
            format!("/v1/instances/{}", path_escape(name)),
            None,
        ),
        InstanceCommand::Create {
            name,
            vcpus,
            memory,
            kernel,
            initrd,
            cmdline,
            disks,
            auto_start,
            taps,
            start,
        } => {
            let nics: Vec<Value> = taps.iter().map(|t| json!({"host_tap": t})).collect();
            let disks: Vec<Value> = disks
                .iter()
                .map(|d| match d.strip_suffix(":ro") {
                    Some(d) => json!({"disk": d, "read_only": true}),
                    None => json!({"disk": d}),
                })
                .collect();
            let mut boot = json!({"kernel": kernel, "cmdline": cmdline});
            if let Some(i) = initrd {
                boot["initrd"] = json!(i);
            }
            let body = json!({"name": name, "vcpus": vcpus, "memory": size_value(memory),
                "boot": boot, "disks": disks, "auto_start": auto_start,
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
            format!("/v1/instances/{}?force={force}", path_escape(name)),
            None,
        ),
    };
    let v = ep.call(method, &path, body).await?;
    if ep.json {
        if !v.is_null() {
            print_json(&v);
        }
    } else if v.is_object() && v.get("name").is_some() {
        table::instances(std::slice::from_ref(&v));
    }
    Ok(())
}

/// A size as the API takes it: an integer when the text is only digits, else the text
/// (`"512MiB"`), which the server checks.
pub fn size_value(s: &str) -> Value {
    match s.trim().parse::<u64>() {
        Ok(n) => json!(n),
        Err(_) => json!(s.trim()),
    }
}
