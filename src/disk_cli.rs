//! `kiln disk …` and `kiln image …`: disks and images through a running `kiln serve`.

use std::path::PathBuf;

use clap::{Subcommand, ValueEnum};
use client::wire::{
    AttachRequest, DiskCreate, DiskFormat, DiskPatch, DiskSourceSpec, ImageCreate, ImageKind,
};

use crate::endpoint::{size, Endpoint, Failed};
use crate::instance_cli::{fail_if, named};
use crate::table;
use crate::transfer::{download, upload, Source};

/// A disk image format.
#[derive(Clone, Copy, ValueEnum)]
pub enum Format {
    Raw,
    Qcow2,
}

impl From<Format> for DiskFormat {
    fn from(f: Format) -> Self {
        match f {
            Format::Raw => DiskFormat::Raw,
            Format::Qcow2 => DiskFormat::Qcow2,
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

impl From<Kind> for ImageKind {
    fn from(k: Kind) -> Self {
        match k {
            Kind::Kernel => ImageKind::Kernel,
            Kind::Initrd => ImageKind::Initrd,
            Kind::Disk => ImageKind::Disk,
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
        /// Size: 10G, 512M, 1GiB; a bare number is MiB. A copy is as large as its source by
        /// default.
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
    /// Show disks.
    Show {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
    /// Delete disks (they must not be attached).
    #[command(visible_alias = "rm")]
    Delete {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
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
        /// The new size: 20G, 512M; a bare number is MiB.
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
    /// Delete images.
    #[command(visible_alias = "rm")]
    Delete {
        /// Names or ids.
        #[arg(required = true)]
        names: Vec<String>,
    },
}

/// Runs `kiln disk …`; returns the exit status.
pub fn disk(ep: Endpoint, cmd: DiskCommand) -> i32 {
    ep.run(|ep, c| async move { disk_command(&ep, &c, cmd).await })
}

async fn disk_command(ep: &Endpoint, c: &client::Client, cmd: DiskCommand) -> Result<(), Failed> {
    match cmd {
        DiskCommand::Create {
            name,
            size: s,
            format,
            from_image,
            from_disk,
        } => {
            let source = match (from_image, from_disk) {
                (Some(image), _) => DiskSourceSpec::Image { image },
                (None, Some(disk)) => DiskSourceSpec::Disk { disk },
                (None, None) => DiskSourceSpec::Blank,
            };
            let spec = DiskCreate {
                name,
                description: String::new(),
                size: s.map(|s| size("--size", &s)).transpose()?,
                block_size: None,
                format: format.map(Into::into),
                source,
            };
            ep.show(&c.disk_create(&spec).await?.value, table::disks);
        }
        DiskCommand::List => ep.show(&c.disk_list().await?, table::disks),
        DiskCommand::Show { names } => {
            let mut disks = Vec::new();
            for n in &names {
                disks.push(c.disk_get(n).await?.value);
            }
            match disks.as_slice() {
                [one] => ep.show(one, table::disks),
                many => ep.show(&many, table::disks),
            }
        }
        DiskCommand::Delete { names } => {
            let mut failed = Vec::new();
            for n in &names {
                if let Err(e) = c.disk_delete(n).await {
                    failed.push(named(n, e)?);
                }
            }
            fail_if(failed)?
        }
        DiskCommand::Attach {
            instance,
            disk,
            read_only,
        } => {
            let inst = c
                .instance_disk_attach(&instance, &AttachRequest { disk, read_only })
                .await?;
            ep.show(&inst.value, table::instances);
        }
        DiskCommand::Detach { instance, disk } => {
            let inst = c.instance_disk_detach(&instance, &disk).await?;
            ep.show(&inst.value, table::instances);
        }
        DiskCommand::Grow { name, size: s } => {
            let patch = DiskPatch {
                size: Some(size("size", &s)?),
                ..Default::default()
            };
            ep.show(
                &c.disk_update(&name, &patch, None).await?.value,
                table::disks,
            );
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
            let d = upload(src, |body, len| {
                c.disk_import(&name, Some(format.into()), body, Some(len))
            })
            .await?;
            ep.show(&d.value, table::disks);
        }
        DiskCommand::Export { name, file, format } => {
            download(c.disk_export(&name, Some(format.into())).await?, &file).await?;
        }
    }
    Ok(())
}

/// Runs `kiln image …`; returns the exit status.
pub fn image(ep: Endpoint, cmd: ImageCommand) -> i32 {
    ep.run(|ep, c| async move { image_command(&ep, &c, cmd).await })
}

async fn image_command(ep: &Endpoint, c: &client::Client, cmd: ImageCommand) -> Result<(), Failed> {
    match cmd {
        ImageCommand::Add {
            name,
            kind,
            path,
            upload: file,
        } => {
            let img = match (path, file) {
                (_, Some(file)) => {
                    let src = Source::open(&file)?;
                    upload(src, |body, len| {
                        c.image_upload(&name, kind.into(), body, Some(len))
                    })
                    .await?
                }
                (Some(path), None) => {
                    // The server resolves paths on its own host: send an absolute one.
                    let path = std::path::absolute(&path)
                        .map_err(|e| format!("--path {}: {e}", path.display()))?;
                    let spec = ImageCreate {
                        name,
                        kind: kind.into(),
                        path: Some(path.display().to_string()),
                        source: None,
                        description: String::new(),
                    };
                    c.image_create(&spec).await?
                }
                (None, None) => return Err(Failed::Usage("give --path or --upload".into())),
            };
            ep.show(&img, table::images);
        }
        ImageCommand::List => ep.show(&c.image_list().await?, table::images),
        ImageCommand::Show { name } => ep.show(&c.image_get(&name).await?, table::images),
        ImageCommand::Delete { names } => {
            let mut failed = Vec::new();
            for n in &names {
                if let Err(e) = c.image_delete(n).await {
                    failed.push(named(n, e)?);
                }
            }
            fail_if(failed)?
        }
    }
    Ok(())
}
