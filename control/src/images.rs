//! Images: kernels, initrds and base disk images that instances and disks refer to.
//!
//! An image is a file registered from an allowed image directory (`kiln serve --image-dir`),
//! or uploaded into `<state>/images/<id>.img`. Its definition is `<state>/images/<id>.json`.
//! Kiln never writes an image file after it is registered; `kiln-probe` is built in.

use std::io::Read;
use std::path::{Path, PathBuf};

use devices::bus::lock;
use images::Format;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::disks::FileGuard;
use crate::model::{check_name, now};
use crate::{invalid, Manager, ManagerError, PROBE_IMAGE};

/// What an image is for.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    /// A guest kernel (`boot.kernel`).
    Kernel,
    /// An initrd (`boot.initrd`).
    Initrd,
    /// A base disk image that disks are made from.
    Disk,
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ImageKind::Kernel => "kernel",
            ImageKind::Initrd => "initrd",
            ImageKind::Disk => "disk",
        })
    }
}

impl ImageKind {
    /// Parses `kernel`, `initrd` or `disk`.
    pub fn from_name(s: &str) -> Option<Self> {
        match s {
            "kernel" => Some(Self::Kernel),
            "initrd" => Some(Self::Initrd),
            "disk" => Some(Self::Disk),
            _ => None,
        }
    }
}

/// The body of `POST /v1/images`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageCreate {
    /// Unique name.
    pub name: String,
    /// What it is for.
    pub kind: ImageKind,
    /// A file inside an allowed image directory.
    pub path: PathBuf,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// An image, as stored and as clients see it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    /// UUID.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// What it is for.
    pub kind: ImageKind,
    /// The file (absent for the built-in probe guest).
    pub path: Option<PathBuf>,
    /// For disk images: `raw` or `qcow2`.
    pub format: Option<String>,
    /// For disk images the virtual size, else the file's size.
    pub size: u64,
    /// Uploaded into the state directory (deleted with the image) or registered in place.
    pub uploaded: bool,
    /// Built into kiln; cannot be deleted.
    #[serde(default)]
    pub builtin: bool,
    /// RFC 3339.
    pub created_at: String,
}

/// The id of the built-in probe image (fixed, so that it is the same on every host).
pub const PROBE_IMAGE_ID: Uuid = Uuid::from_u128(0x6b696c6e_7072_6f62_6500_000000000001);

impl Manager {
    fn probe_image(&self) -> Image {
        Image {
            id: PROBE_IMAGE_ID,
            name: PROBE_IMAGE.into(),
            description: "the probe guest built into kiln".into(),
            kind: ImageKind::Kernel,
            path: None,
            format: None,
            size: self.probe.len() as u64,
            uploaded: false,
            builtin: true,
            created_at: "1970-01-01T00:00:00Z".into(),
        }
    }

    /// Every image, the built-in one first.
    pub fn images(&self) -> Vec<Image> {
        let mut v = vec![self.probe_image()];
        v.extend(lock(&self.images).iter().cloned());
        v
    }

    /// One image by id or name.
    pub fn image(&self, key: &str) -> Result<Image, ManagerError> {
        self.images()
            .into_iter()
            .find(|i| i.name == key || i.id.to_string() == key)
            .ok_or_else(|| ManagerError::NotFound("image", key.into()))
    }

    pub(crate) fn image_path(&self, img: &Image) -> PathBuf {
        img.path.clone().unwrap_or_default()
    }

    fn check_new_image_name(&self, name: &str) -> Result<(), ManagerError> {
        check_name(name).map_err(|m| invalid("name", m))?;
        if self.images().iter().any(|i| i.name == name) {
            return Err(ManagerError::AlreadyExists("image", name.into()));
        }
        Ok(())
    }

    /// Resolves `path` (symlinks and `..`) and checks that it is a regular file inside an
    /// allowed image directory.
    fn allowed_image_file(&self, path: &Path) -> Result<PathBuf, ManagerError> {
        let field = "path";
        if self.dirs.image_dirs.is_empty() {
            return Err(invalid(
                field,
                "this server has no image directory; start kiln serve with --image-dir DIR, or upload the image",
            ));
        }
        let real = path
            .canonicalize()
            .map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
        if !self.dirs.image_dirs.iter().any(|d| real.starts_with(d)) {
            return Err(invalid(
                field,
                format!(
                    "{} is outside the image directories ({})",
                    path.display(),
                    self.dirs
                        .image_dirs
                        .iter()
                        .map(|d| d.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        if !real.metadata().is_ok_and(|m| m.is_file()) {
            return Err(invalid(
                field,
                format!("{} is not a regular file", path.display()),
            ));
        }
        Ok(real)
    }

    /// Checks an image file for its kind; returns its format (disk images) and size.
    fn inspect(&self, kind: ImageKind, path: &Path) -> Result<(Option<String>, u64), ManagerError> {
        match kind {
            ImageKind::Disk => {
                let info = images::info(path, &self.open_options())
                    .map_err(|e| invalid("path", e.to_string()))?;
                Ok((Some(info.format.name().into()), info.virtual_size))
            }
            _ => {
                let len = std::fs::metadata(path)
                    .map_err(|e| invalid("path", e.to_string()))?
                    .len();
                if len == 0 {
                    return Err(invalid("path", "the file is empty"));
                }
                Ok((None, len))
            }
        }
    }

    fn commit_image(&self, img: Image) -> Result<Image, ManagerError> {
        self.image_store
            .save(img.id, &img)
            .map_err(|e| ManagerError::Internal(format!("saving the image definition: {e}")))?;
        lock(&self.images).push(img.clone());
        self.events.push(
            "image",
            format!("/v1/images/{}", img.id),
            "created".into(),
            None,
        );
        Ok(img)
    }

    /// Registers a file inside an allowed image directory.
    pub fn add_image(&self, spec: ImageCreate) -> Result<Image, ManagerError> {
        let _changes = lock(&self.changes);
        self.check_new_image_name(&spec.name)?;
        let path = self.allowed_image_file(&spec.path)?;
        let (format, size) = self.inspect(spec.kind, &path)?;
        self.commit_image(Image {
            id: Uuid::new_v4(),
            name: spec.name,
            description: spec.description,
            kind: spec.kind,
            path: Some(path),
            format,
            size,
            uploaded: false,
            builtin: false,
            created_at: now(),
        })
    }

    /// Registers an image from a byte stream, stored in the state directory. A disk image is
    /// validated (and kept in its own format); nothing is left behind when it is refused.
    pub fn upload_image(
        &self,
        name: &str,
        kind: &str,
        body: &mut dyn Read,
    ) -> Result<Image, ManagerError> {
        let kind = ImageKind::from_name(kind)
            .ok_or_else(|| invalid("kind", format!("{kind:?}: use kernel, initrd or disk")))?;
        {
            let _changes = lock(&self.changes);
            self.check_new_image_name(name)?;
        }
        let id = Uuid::new_v4();
        let path = self.dirs.images.join(format!("{id}.img"));
        let guard = FileGuard(Some(path.clone()));
        match kind {
            ImageKind::Disk => {
                // Sniff the format from the first bytes, then import in that format.
                let mut head = [0u8; 4];
                let mut got = 0;
                while got < 4 {
                    match body.read(&mut head[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return Err(invalid("body", e.to_string())),
                    }
                }
                let format = if got == 4 && head == images::qcow2::MAGIC {
                    Format::Qcow2
                } else {
                    Format::Raw
                };
                let mut chained = std::io::Read::chain(&head[..got], body);
                images::import(
                    &mut chained,
                    &path,
                    format,
                    &self.open_options(),
                    &mut |_| {},
                )
                .map_err(|e| invalid("body", e.to_string()))?;
            }
            _ => {
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(&path)
                    .map_err(|e| ManagerError::Internal(format!("{}: {e}", path.display())))?;
                std::io::copy(body, &mut f).map_err(|e| invalid("body", e.to_string()))?;
                f.sync_all()
                    .map_err(|e| ManagerError::Internal(format!("{}: {e}", path.display())))?;
            }
        }
        let (format, size) = self.inspect(kind, &path)?;
        let _changes = lock(&self.changes);
        self.check_new_image_name(name)?;
        let img = self.commit_image(Image {
            id,
            name: name.into(),
            description: String::new(),
            kind,
            path: Some(path),
            format,
            size,
            uploaded: true,
            builtin: false,
            created_at: now(),
        })?;
        guard.keep();
        Ok(img)
    }

    /// Deletes an image no instance boots from and no disk is an overlay on.
    pub fn delete_image(&self, key: &str) -> Result<(), ManagerError> {
        let _changes = lock(&self.changes);
        let img = self.image(key)?;
        if img.builtin {
            return Err(ManagerError::InUse(format!(
                "image {} is built into kiln and cannot be deleted",
                img.name
            )));
        }
        let id = img.id.to_string();
        let user = lock(&self.entries).iter().find_map(|e| {
            let d = lock(&e.def);
            let refs = [Some(&d.boot.kernel), d.boot.initrd.as_ref()];
            refs.iter()
                .flatten()
                .any(|r| **r == img.name || **r == id)
                .then(|| d.name.clone())
        });
        if let Some(inst) = user {
            return Err(ManagerError::InUse(format!(
                "image {} is used by instance {inst}",
                img.name
            )));
        }
        if let Some(disk) = self.image_in_use_by_disk(img.id) {
            return Err(ManagerError::InUse(format!(
                "image {} is the base of disk {disk}",
                img.name
            )));
        }
        self.image_store
            .remove(img.id)
            .map_err(|e| ManagerError::Internal(format!("removing the image definition: {e}")))?;
        if img.uploaded {
            if let Some(p) = &img.path {
                let _ = std::fs::remove_file(p);
            }
        }
        lock(&self.images).retain(|i| i.id != img.id);
        self.events.push(
            "image",
            format!("/v1/images/{}", img.id),
            "deleted".into(),
            None,
        );
        Ok(())
    }
}
