//! Files to the server (disk import, image upload) and a disk from it (export), with a
//! progress bar on stderr when stderr is a terminal. Files are never held in memory: the
//! client crate streams them in chunks ([`client::body::file`]).

use std::fs::File;
use std::future::Future;
use std::io::{IsTerminal, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use indicatif::{ProgressBar, ProgressStyle};

use crate::endpoint::Failed;

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

/// Sends the file with `call` (which gets the body, streamed, and its length); the bar counts
/// what the request takes. Returns the call's answer.
pub async fn upload<T, Fut>(
    src: Source,
    call: impl FnOnce(client::body::Body, u64) -> Fut,
) -> Result<T, Failed>
where
    Fut: Future<Output = Result<T, client::Error>>,
{
    let Source {
        file,
        len,
        path: file_path,
    } = src;
    let name = file_path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let pb = progress(Some(len), &format!("uploading {name}"));
    let counted = pb.clone();
    let body = client::body::file(file, len, move |n| counted.inc(n));
    let result = call(body, len).await;
    match &result {
        Ok(_) => done(&pb, &format!("uploaded {name}"), len),
        Err(_) => pb.finish_and_clear(),
    }
    Ok(result?)
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

/// An export's body streamed into `dest` (`-`: stdout); returns the bytes written.
pub async fn download(mut body: client::Streamed, dest: &Path) -> Result<u64, Failed> {
    let total = body.content_length();
    let mut sink = Sink::open(dest)?;
    let name = dest
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "-".into());
    let pb = progress(total, &format!("downloading {name}"));
    let mut written = 0u64;
    let result = async {
        while let Some(data) = body.chunk().await {
            let data = data.map_err(|e| format!("the download broke off: {e}"))?;
            sink.write(&data)
                .map_err(|e| format!("cannot write {}: {e}", dest.display()))?;
            written += data.len() as u64;
            pb.inc(data.len() as u64);
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
    Ok(result.map(|()| written)?)
}
