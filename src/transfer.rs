//! Streaming a file to the server (disk import, image upload) and a disk from it (export),
//! with a progress bar on stderr when stderr is a terminal. Files are never held in memory:
//! they move in chunks of [`CHUNK`] bytes.

use std::fs::File;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper::body::{Frame, SizeHint};
use hyper::Method;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;

use crate::client::{api_error, read_json, Body, BoxError, Endpoint};

/// Bytes read from the file per request body frame.
const CHUNK: usize = 1 << 20;

/// A progress bar of bytes on stderr, hidden when stderr is not a terminal.
fn progress(total: Option<u64>, what: &str) -> ProgressBar {
    if !std::io::stderr().is_terminal() {
        return ProgressBar::hidden();
    }
    let pb = match total {
        Some(n) => {
            let pb = ProgressBar::new(n);
            pb.set_style(
                ProgressStyle::with_template(
                    "{msg} [{bar:30}] {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} ETA {eta}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            pb
        }
        None => {
            let pb = ProgressBar::new_spinner();
            pb.set_style(
                ProgressStyle::with_template(
                    "{spinner} {msg} {binary_bytes} {binary_bytes_per_sec} {elapsed}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            pb
        }
    };
    pb.set_message(what.to_string());
    pb.enable_steady_tick(std::time::Duration::from_millis(200));
    pb
}

/// Ends a bar: on a terminal, its line gives way to a one-line summary.
fn done(pb: &ProgressBar, what: &str, bytes: u64) {
    if pb.is_hidden() {
        return;
    }
    let secs = pb.elapsed().as_secs_f64().max(1e-3);
    pb.finish_and_clear();
    let mib = bytes as f64 / (1u64 << 20) as f64;
    eprintln!(
        "{what}: {mib:.1} MiB in {secs:.1} s ({:.1} MiB/s)",
        mib / secs
    );
}

/// A request body fed by a thread that reads the file; counts what hyper takes on the bar.
struct FileBody {
    rx: tokio::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    left: u64,
    pb: ProgressBar,
}

impl hyper::body::Body for FileBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.rx.poll_recv(cx) {
            Poll::Ready(Some(Ok(b))) => {
                self.left = self.left.saturating_sub(b.len() as u64);
                self.pb.inc(b.len() as u64);
                Poll::Ready(Some(Ok(Frame::data(b))))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.left)
    }
}

/// An opened source file and its length (block devices included).
pub struct Source {
    file: File,
    len: u64,
    path: PathBuf,
}

impl Source {
    pub fn open(path: &Path) -> Result<Source, String> {
        let shown = path.display();
        let mut file = File::open(path).map_err(|e| format!("cannot open {shown}: {e}"))?;
        if file.metadata().is_ok_and(|m| m.is_dir()) {
            return Err(format!("{shown} is a directory"));
        }
        let len = file
            .seek(SeekFrom::End(0))
            .and_then(|n| file.rewind().map(|_| n))
            .map_err(|e| format!("cannot read {shown}: {e}"))?;
        Ok(Source {
            file,
            len,
            path: path.to_path_buf(),
        })
    }

    /// The first bytes of the file (for format detection), leaving the position at 0.
    pub fn magic(&mut self) -> [u8; 4] {
        let mut m = [0u8; 4];
        let _ = self.file.read_exact(&mut m);
        let _ = self.file.rewind();
        m
    }
}

/// `POST path` with the file as the body, streamed; returns the server's JSON answer.
pub async fn upload(ep: &Endpoint, path: &str, src: Source) -> Result<Value, String> {
    let Source {
        mut file,
        len,
        path: file_path,
    } = src;
    let name = file_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pb = progress(Some(len), &format!("uploading {name}"));
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    std::thread::spawn(move || loop {
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                buf.truncate(n);
                if tx.blocking_send(Ok(Bytes::from(buf))).is_err() {
                    break;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                let _ = tx.blocking_send(Err(e));
                break;
            }
        }
    });
    let body = FileBody {
        rx,
        left: len,
        pb: pb.clone(),
    };
    let req = ep
        .builder(Method::POST, path)?
        .header("content-type", "application/octet-stream")
        .header("content-length", len)
        .body(Body::new(body))
        .map_err(|e| e.to_string())?;
    let result = async {
        let resp = ep.send(req).await?;
        let (status, v) = read_json(resp).await?;
        if status.is_success() {
            Ok(v)
        } else {
            Err(api_error(status, &v))
        }
    }
    .await;
    match &result {
        Ok(_) => done(&pb, &format!("uploaded {name}"), len),
        Err(_) => pb.finish_and_clear(),
    }
    result
}

/// Where an export goes: stdout, a file written in place (devices, FIFOs), or a new file
/// written beside its destination and renamed over it once complete.
enum Sink {
    Stdout(std::io::Stdout),
    InPlace(File),
    Temp {
        file: File,
        temp: PathBuf,
        dest: PathBuf,
        /// Position and length written so far: zero chunks are skipped (a sparse file).
        pos: u64,
        done: bool,
    },
}

impl Sink {
    fn open(dest: &Path) -> Result<Sink, String> {
        let shown = dest.display();
        if dest == Path::new("-") {
            return Ok(Sink::Stdout(std::io::stdout()));
        }
        match std::fs::metadata(dest) {
            Ok(m) if m.is_dir() => return Err(format!("{shown} is a directory")),
            Ok(m) if !m.is_file() => {
                let f = std::fs::OpenOptions::new()
                    .write(true)
                    .open(dest)
                    .map_err(|e| format!("cannot open {shown}: {e}"))?;
                return Ok(Sink::InPlace(f));
            }
            _ => {}
        }
        let dir = match dest.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let base = dest
            .file_name()
            .ok_or_else(|| format!("{shown} is not a file name"))?
            .to_string_lossy()
            .into_owned();
        let temp = dir.join(format!(".{base}.kiln-part-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&temp)
            .map_err(|e| format!("cannot create {}: {e}", temp.display()))?;
        Ok(Sink::Temp {
            file,
            temp,
            dest: dest.to_path_buf(),
            pos: 0,
            done: false,
        })
    }

    fn write(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Sink::Stdout(s) => s.lock().write_all(data),
            Sink::InPlace(f) => f.write_all(data),
            Sink::Temp { file, pos, .. } => {
                if data.iter().all(|&b| b == 0) {
                    file.seek(SeekFrom::Current(data.len() as i64))?;
                } else {
                    file.write_all(data)?;
                }
                *pos += data.len() as u64;
                Ok(())
            }
        }
    }

    fn finish(mut self) -> std::io::Result<()> {
        match &mut self {
            Sink::Stdout(s) => s.lock().flush(),
            Sink::InPlace(f) => f.sync_all(),
            Sink::Temp {
                file,
                temp,
                dest,
                pos,
                done,
            } => {
                file.set_len(*pos)?;
                file.sync_all()?;
                std::fs::rename(&*temp, &*dest)?;
                *done = true;
                Ok(())
            }
        }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        if let Sink::Temp {
            temp, done: false, ..
        } = self
        {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// `GET path` streamed into `dest` (`-`: stdout); returns the bytes written.
pub async fn download(ep: &Endpoint, path: &str, dest: &Path) -> Result<u64, String> {
    let req = ep
        .builder(Method::GET, path)?
        .body(Body::new(Empty::new().map_err(|never| match never {})))
        .map_err(|e| e.to_string())?;
    let resp = ep.send(req).await?;
    if !resp.status().is_success() {
        let (status, v) = read_json(resp).await?;
        return Err(api_error(status, &v));
    }
    let total = resp
        .headers()
        .get("content-length")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut sink = Sink::open(dest)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "-".into());
    let pb = progress(total, &format!("downloading {name}"));
    let mut body = resp.into_body();
    let mut written = 0u64;
    let result = async {
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| format!("the download broke off: {e}"))?;
            if let Ok(data) = frame.into_data() {
                sink.write(&data)
                    .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
                written += data.len() as u64;
                pb.inc(data.len() as u64);
            }
        }
        if let Some(t) = total {
            if written != t {
                return Err(format!(
                    "the download broke off after {written} of {t} bytes"
                ));
            }
        }
        sink.finish()
            .map_err(|e| format!("cannot write {}: {e}", dest.display()))
    }
    .await;
    match &result {
        Ok(()) => done(&pb, &format!("downloaded {name}"), written),
        Err(_) => pb.finish_and_clear(),
    }
    result.map(|()| written)
}
