//! `kiln disk …` and `kiln image …`: disks and images through a running `kiln serve`.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use hyper::Method;
use serde_json::{json, Value};

use crate::client::{path_escape, print_json, query_escape, run_command, size_value, Endpoint};
use crate::table;
use crate::transfer::{download, upload, Source};

/// A disk image format.
#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

impl Format {
    fn as_str(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
        }
    }
}

/// What an image is used as.
#[derive(Clone, Copy, ValueEnum)]
pub enum Kind {
    Kernel,
    Initrd,
    Disk,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Kernel => "kernel",
            Kind::Initrd => "initrd",
            Kind::Disk => "disk",
        }
    }
}

/// `kiln disk …`
#[derive(Subcommand)]
pub enum DiskCommand {
    /// Create a disk: blank, or a copy of an image (--from-image) or of a disk (--from-disk).
    Create {
        /// Its name (a-z, 0-9, '-').
        name: String,
        /// Size (10GiB, 512MiB, or bytes); a copy is as large as its source by default.
        #[arg(long, required_unless_present_any = ["from_image", "from_disk"])]
        size: Option<String>,
        /// Format on the host (the server's default when absent).
        #[arg(long, value_enum)]
        format: Option<Format>,
        /// Copy this disk image.
        #[arg(long, value_name = "IMAGE", conflicts_with = "from_disk")]
        from_image: Option<String>,
        /// Copy this disk.
        #[arg(long, value_name = "DISK")]
        from_disk: Option<String>,
    },
    /// List disks.
    List,
    /// Show one disk.
    Show {
        /// Name or id.
        name: String,
    },
    /// Delete a disk (it must not be attached).
    Delete {
        /// Name or id.
        name: String,
    },
    /// Attach a disk to a stopped instance.
    Attach {
        /// Instance name or id.
        instance: String,
        /// Disk name or id.
        disk: String,
        /// The guest may only read it.
        #[arg(long)]
        read_only: bool,
    },
    /// Detach a disk from a stopped instance.
    Detach {
        /// Instance name or id.
        instance: String,
        /// Disk name or id.
        disk: String,
    },
    /// Grow a detached disk to SIZE (disks never shrink).
    Grow {
        /// Name or id.
        name: String,
        /// The new size (20GiB, or bytes).
        size: String,
    },
    /// Create a disk from a local file, streamed to the server (progress on stderr).
    Import {
        /// A raw or qcow2 image file (or a block device).
        file: PathBuf,
        /// The new disk's name.
        #[arg(long)]
        name: String,
        /// The format to store the disk in (the file may be raw or qcow2 either way) [default: the file's own format].
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
    /// Save a disk's content into a local file (`-`: stdout), streamed (progress on stderr).
    ///
    /// The file is written beside FILE and renamed over it once complete; runs of zeros are
    /// left as holes.
    Export {
        /// Name or id.
        name: String,
        /// Where to write it.
        file: PathBuf,
        /// The format to write.
        #[arg(long, value_enum, default_value = "raw")]
        format: Format,
    },
}

/// `kiln image …`
#[derive(Subcommand)]
pub enum ImageCommand {
    /// Register an image: a file already in an image directory of the server (--path), or a
    /// local file streamed to it (--upload).
    Add {
        /// Its name (a-z, 0-9, '-').
        name: String,
        /// What it is.
        #[arg(long, value_enum)]
        kind: Kind,
        /// A file on the server host, inside one of its --image-dir directories.
        #[arg(
            long,
            value_name = "PATH",
            required_unless_present = "upload",
            conflicts_with = "upload"
        )]
        path: Option<PathBuf>,
        /// A local file to upload.
        #[arg(long, value_name = "FILE")]
        upload: Option<PathBuf>,
    },
    /// List images.
    List,
    /// Show one image.
    Show {
        /// Name or id.
        name: String,
    },
    /// Delete an image.
    Delete {
        /// Name or id.
        name: String,
    },
}

fn disk_path(name: &str) -> String {
    format!("/v1/disks/{}", path_escape(name))
}

/// Prints a disk (or a list) as a table or JSON.
fn show(ep: &Endpoint, v: &Value, table: fn(&[Value])) {
    if ep.json {
        if !v.is_null() {
            print_json(v);
        }
    } else if let Some(list) = v.as_array() {
        table(list);
    } else if v.is_object() && v.get("name").is_some() {
        table(std::slice::from_ref(v));
    }
}

/// Runs `kiln disk …`; returns the exit status.
pub fn disk(ep: Endpoint, cmd: DiskCommand) -> i32 {
    run_command(disk_async(ep, cmd))
}

async fn disk_async(ep: Endpoint, cmd: DiskCommand) -> Result<(), String> {
    match cmd {
        DiskCommand::Create {
            name,
            size,
            format,
            from_image,
            from_disk,
        } => {
            let source = match (from_image, from_disk) {
                (Some(image), _) => json!({"type": "image", "image": image}),
                (None, Some(disk)) => json!({"type": "disk", "disk": disk}),
                (None, None) => json!({"type": "blank"}),
            };
            let mut body = json!({"name": name, "source": source});
            if let Some(s) = size {
                body["size"] = size_value(&s);
            }
            if let Some(f) = format {
                body["format"] = json!(f.as_str());
            }
            let v = ep.call(Method::POST, "/v1/disks", Some(body)).await?;
            show(&ep, &v, table::disks);
        }
        DiskCommand::List => {
            let list = ep.list("/v1/disks").await?;
            show(&ep, &Value::Array(list), table::disks);
        }
        DiskCommand::Show { name } => {
            let v = ep.call(Method::GET, &disk_path(&name), None).await?;
            show(&ep, &v, table::disks);
        }
        DiskCommand::Delete { name } => {
            ep.call(Method::DELETE, &disk_path(&name), None).await?;
        }
        DiskCommand::Attach {
            instance,
            disk,
            read_only,
        } => {
            let path = format!("/v1/instances/{}/disks", path_escape(&instance));
            let body = json!({"disk": disk, "read_only": read_only});
            let v = ep.call(Method::POST, &path, Some(body)).await?;
            attach_answer(&ep, &v);
        }
        DiskCommand::Detach { instance, disk } => {
            let path = format!(
                "/v1/instances/{}/disks/{}",
                path_escape(&instance),
                path_escape(&disk)
            );
            let v = ep.call(Method::DELETE, &path, None).await?;
            attach_answer(&ep, &v);
        }
        DiskCommand::Grow { name, size } => {
            let body = json!({"size": size_value(&size)});
            let v = ep
                .call(Method::PATCH, &disk_path(&name), Some(body))
                .await?;
            show(&ep, &v, table::disks);
        }
        DiskCommand::Import { file, name, format } => {
            let mut src = Source::open(&file)?;
            let format = format.unwrap_or_else(|| {
                if src.magic() == *b"QFI\xfb" {
                    Format::Qcow2
                } else {
                    Format::Raw
                }
            });
            let path = format!(
                "/v1/disks/import?name={}&format={}",
                query_escape(&name),
                format.as_str()
            );
            let v = upload(&ep, &path, src).await?;
            show(&ep, &v, table::disks);
        }
        DiskCommand::Export { name, file, format } => {
            let path = format!("{}/export?format={}", disk_path(&name), format.as_str());
            download(&ep, &path, &file).await?;
        }
    }
    Ok(())
}

/// Attach and detach answer with the instance (or the attachment, or nothing).
fn attach_answer(ep: &Endpoint, v: &Value) {
    if ep.json {
        if !v.is_null() {
            print_json(v);
        }
    } else if v.get("vcpus").is_some() {
        table::instances(std::slice::from_ref(v));
    }
}

/// Runs `kiln image …`; returns the exit status.
pub fn image(ep: Endpoint, cmd: ImageCommand) -> i32 {
    run_command(image_async(ep, cmd))
}

async fn image_async(ep: Endpoint, cmd: ImageCommand) -> Result<(), String> {
    let image_path = |name: &str| format!("/v1/images/{}", path_escape(name));
    match cmd {
        ImageCommand::Add {
            name,
            kind,
            path,
            upload: file,
        } => {
            let v = match (path, file) {
                (_, Some(file)) => {
                    let src = Source::open(&file)?;
                    let path = format!(
                        "/v1/images/upload?name={}&kind={}",
                        query_escape(&name),
                        kind.as_str()
                    );
                    upload(&ep, &path, src).await?
                }
                (Some(path), None) => {
                    // The server resolves paths on its own host: send an absolute one.
                    let path = std::path::absolute(&path)
                        .map_err(|e| format!("--path {}: {e}", path.display()))?;
                    let body = json!({"name": name, "kind": kind.as_str(), "path": path});
                    ep.call(Method::POST, "/v1/images", Some(body)).await?
                }
                (None, None) => return Err("give --path or --upload".into()),
            };
            show(&ep, &v, table::images);
        }
        ImageCommand::List => {
            let list = ep.list("/v1/images").await?;
            show(&ep, &Value::Array(list), table::images);
        }
        ImageCommand::Show { name } => {
            let v = ep.call(Method::GET, &image_path(&name), None).await?;
            show(&ep, &v, table::images);
        }
        ImageCommand::Delete { name } => {
            ep.call(Method::DELETE, &image_path(&name), None).await?;
        }
    }
    Ok(())
}
