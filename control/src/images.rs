//! The manager's calls on images: kernels, initrds and base disk images that instances and
//! disks refer to. An image is a file registered from an allowed image directory
//! (`kiln serve --image-dir`), or uploaded into `<state>/images/<id>.img`. Kiln never writes
//! an image file after it is registered; `kiln-probe` is built in.

use std::io::Read;
use std::path::{Path, PathBuf};

use devices::bus::lock;
use images::Format;
use uuid::Uuid;

use crate::catalog::Catalog;
use crate::error::{invalid, Error, Kind, Result};
use crate::events::Subject;
use crate::model::{now, Image, ImageKind, PROBE_IMAGE, PROBE_IMAGE_ID};
use crate::spec::NewImage;
use crate::store::FileGuard;
use crate::Manager;

/// The built-in probe guest, `size` bytes long.
pub(crate) fn probe_image(size: u64) -> Image {
    Image {
        id: PROBE_IMAGE_ID,
        name: PROBE_IMAGE.into(),
        description: "the probe guest built into kiln".into(),
        kind: ImageKind::Kernel,
        path: None,
        format: None,
        size,
        uploaded: false,
        builtin: true,
        created_at: "1970-01-01T00:00:00Z".into(),
    }
}

impl Manager {
    /// Every image, the built-in one first.
    pub fn images(&self) -> Vec<Image> {
        lock(&self.catalog).images.clone()
    }

    /// One image by id or name.
    pub fn image(&self, key: &str) -> Result<Image> {
        lock(&self.catalog).image(key).cloned()
    }

    /// Resolves `path` (symlinks and `..`) and checks that it is a regular file inside an
    /// allowed image directory.
    fn allowed_image_file(&self, path: &Path) -> Result<PathBuf> {
        let field = "path";
        if self.image_dirs.is_empty() {
            return Err(invalid(
                field,
                "this server has no image directory; start kiln serve with --image-dir DIR, or upload the image",
            ));
        }
        let real = path
            .canonicalize()
            .map_err(|e| invalid(field, format!("{}: {e}", path.display())))?;
        if !self.image_dirs.iter().any(|d| real.starts_with(d)) {
            let dirs: Vec<_> = self
                .image_dirs
                .iter()
                .map(|d| d.display().to_string())
                .collect();
            return Err(invalid(
                field,
                format!(
                    "{} is outside the image directories ({})",
                    path.display(),
                    dirs.join(", ")
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
    fn inspect(&self, kind: ImageKind, path: &Path) -> Result<(Option<Format>, u64)> {
        match kind {
            ImageKind::Disk => {
                let info = images::info(path, &self.open_options())
                    .map_err(|e| invalid("path", e.to_string()))?;
                Ok((Some(info.format), info.virtual_size))
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

    fn commit_image(&self, cat: &mut Catalog, img: &Image) -> Result<()> {
        cat.check_new_name(Kind::Image, &img.name)?;
        self.store
            .save(img)
            .map_err(|e| Error::internal("saving the image definition", e))?;
        cat.images.push(img.clone());
        self.events.name(img.id, &img.name);
        self.events.push(Subject::Image(img.id), "created", None);
        Ok(())
    }

    /// Registers a file inside an allowed image directory.
    pub fn add_image(&self, spec: NewImage) -> Result<Image> {
        lock(&self.catalog).check_new_name(Kind::Image, &spec.name)?;
        let path = self.allowed_image_file(&spec.path)?;
        let (format, size) = self.inspect(spec.kind, &path)?;
        let img = Image {
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
        };
        self.commit_image(&mut lock(&self.catalog), &img)?;
        Ok(img)
    }

    /// Registers an image from a byte stream, stored in the state directory. A disk image is
    /// validated (and kept in its own format); nothing is left behind when it is refused.
    /// Blocks while the stream is read.
    pub fn upload_image(&self, name: &str, kind: ImageKind, body: &mut dyn Read) -> Result<Image> {
        lock(&self.catalog).check_new_name(Kind::Image, name)?;
        let id = Uuid::new_v4();
        let path = self.store.upload_file(id);
        let file = FileGuard::new(path.clone());
        match kind {
            ImageKind::Disk => {
                // Sniff the format from the first bytes, then import in that format.
                let mut head = [0u8; 4];
                let mut got = 0;
                while got < head.len() {
                    match body.read(&mut head[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) => return Err(invalid("body", e.to_string())),
                    }
                }
                let format = if got == head.len() && head == images::qcow2::MAGIC {
                    Format::Qcow2
                } else {
                    Format::Raw
                };
                let mut chained = Read::chain(&head[..got], body);
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
                    .map_err(|e| Error::internal(&path.display().to_string(), e))?;
                std::io::copy(body, &mut f).map_err(|e| invalid("body", e.to_string()))?;
                f.sync_all()
                    .map_err(|e| Error::internal(&path.display().to_string(), e))?;
            }
        }
        let (format, size) = self.inspect(kind, &path)?;
        let img = Image {
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
        };
        self.commit_image(&mut lock(&self.catalog), &img)?;
        file.keep();
        Ok(img)
    }

    /// Makes a disk image, stored in the state directory, from a snapshot of a disk (detached,
    /// or attached to a stopped instance): an independent file in the disk's format, holding
    /// the disk as it was when the snapshot was taken. Nothing is left behind on failure.
    /// Blocks while the file is copied; the catalog's lock is not held meanwhile.
    pub fn image_from_disk_snapshot(
        &self,
        name: &str,
        description: &str,
        disk: &str,
        snapshot: &str,
    ) -> Result<Image> {
        let (src, _reading) = {
            let cat = lock(&self.catalog);
            cat.check_new_name(Kind::Image, name)?;
            let src = cat
                .disk(disk)
                .map_err(|_| invalid("source.disk", format!("no disk named {disk:?}")))?
                .clone();
            self.check_detached_or_stopped(&cat, &src, "copy its snapshot")?;
            let reading = crate::catalog::Reading::begin(&cat, src.id);
            (src, reading)
        };
        if !self
            .disk_snapshots_of(&src)?
            .iter()
            .any(|s| s.name == snapshot)
        {
            return Err(invalid(
                "source.snapshot",
                format!("disk {} has no snapshot {snapshot:?}", src.name),
            ));
        }
        let id = Uuid::new_v4();
        let path = self.store.upload_file(id);
        let file = FileGuard::new(path.clone());
        let opts = self.open_options();
        match src.format {
            Format::Qcow2 => images::create_from_snapshot(
                &self.store.disk_file(&src),
                snapshot,
                &path,
                Format::Qcow2,
                &opts,
                &mut |_| {},
            ),
            Format::Raw => images::clone_image(
                &self.raw_snapshot_file(&src, snapshot),
                &path,
                Format::Raw,
                &opts,
                &mut |_| {},
            ),
        }
        .map_err(|e| crate::disks::image_error("source.snapshot", e))?;
        let (format, size) = self.inspect(ImageKind::Disk, &path)?;
        let img = Image {
            id,
            name: name.into(),
            description: description.into(),
            kind: ImageKind::Disk,
            path: Some(path),
            format,
            size,
            uploaded: true,
            builtin: false,
            created_at: now(),
        };
        self.commit_image(&mut lock(&self.catalog), &img)?;
        file.keep();
        Ok(img)
    }

    /// Deletes an image no instance boots from and no disk is an overlay on.
    pub fn delete_image(&self, key: &str) -> Result<()> {
        let mut cat = lock(&self.catalog);
        let img = cat.image(key)?.clone();
        if img.builtin {
            return Err(Error::InUse(format!(
                "image {} is built into kiln and cannot be deleted",
                img.name
            )));
        }
        if let Some(user) = cat.image_user(img.id) {
            return Err(Error::InUse(format!("image {} {user}", img.name)));
        }
        self.store
            .remove::<Image>(img.id)
            .map_err(|e| Error::internal("removing the image definition", e))?;
        if img.uploaded {
            if let Some(p) = &img.path {
                let _ = std::fs::remove_file(p);
            }
        }
        cat.images.retain(|i| i.id != img.id);
        self.events.push(Subject::Image(img.id), "deleted", None);
        Ok(())
    }
}
