//! Disks: image files in the state directory that instances attach as virtio-blk.
//!
//! Every disk is `<state>/disks/<id>.<format>` with its definition beside it as
//! `<id>.json`. A disk made from an image is a qcow2 overlay on the image's file (the image is
//! never written), or a full raw copy when asked for raw.

use std::io::{Read, Write};
use std::path::PathBuf;

use devices::bus::lock;
use images::Format;
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::images::ImageKind;
use crate::model::{check_name, now, Size};
use crate::{invalid, InstanceState, Manager, ManagerError};

/// Where a disk's first content came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DiskSource {
    /// Zeros.
    Blank,
    /// A base disk image (name or id).
    Image {
        /// The image.
        image: String,
    },
    /// Another disk (name or id), copied.
    Disk {
        /// The disk.
        disk: String,
    },
    /// A byte stream sent to `POST /v1/disks/import`.
    Import,
}

/// The body of `POST /v1/disks`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskCreate {
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Virtual size; for an image or disk source it defaults to the source's size.
    #[serde(default)]
    pub size: Option<Size>,
    /// 512 or 4096.
    #[serde(default)]
    pub block_size: Option<u32>,
    /// `raw` or `qcow2`; qcow2 by default for an image source, raw otherwise.
    #[serde(default)]
    pub format: Option<String>,
    /// Where the content comes from; blank by default.
    #[serde(default = "blank")]
    pub source: DiskSource,
}

fn blank() -> DiskSource {
    DiskSource::Blank
}

/// What the state directory keeps of a disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskDef {
    /// UUID.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// `raw` or `qcow2`.
    pub format: String,
    /// Virtual size in bytes.
    pub size: u64,
    /// Logical block size the guest sees.
    pub block_size: u32,
    /// Where the content came from.
    pub source: DiskSource,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Bumped on every change; the ETag.
    pub generation: u64,
}

/// A disk as clients see it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Disk {
    /// The definition.
    #[serde(flatten)]
    pub def: DiskDef,
    /// Bytes the file takes on the host.
    pub actual_size: u64,
    /// The instance it is attached to (name).
    pub attached_to: Option<String>,
}

impl Disk {
    /// The entity tag of the definition (`If-Match`).
    pub fn etag(&self) -> String {
        super::model::etag(self.def.id, self.def.generation)
    }
}

/// The body of `PATCH /v1/disks/{disk}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskPatch {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
    /// New size: it may only grow, and only while the disk is detached.
    #[serde(default)]
    pub size: Option<Size>,
}

/// Removes a file on drop unless disarmed: nothing half-made is left behind.
pub(crate) struct FileGuard(pub Option<PathBuf>);

impl FileGuard {
    pub(crate) fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn parse_format(f: Option<&str>, default: Format) -> Result<Format, ManagerError> {
    match f {
        None => Ok(default),
        Some(s) => Format::from_name(s)
            .ok_or_else(|| invalid("format", format!("{s:?}: use \"raw\" or \"qcow2\""))),
    }
}

fn image_error(field: &str, e: images::Error) -> ManagerError {
    match e {
        images::Error::Io { .. } => ManagerError::Internal(e.to_string()),
        other => invalid(field, other.to_string()),
    }
}

/// Sizes a disk may have: whole sectors, at least one, at most 64 TiB.
fn check_size(field: &str, size: u64) -> Result<(), ManagerError> {
    if size == 0 || !size.is_multiple_of(512) || size > 64 << 40 {
        return Err(invalid(
            field,
            format!(
                "{size} bytes: a disk is a whole number of 512-byte sectors, 1 sector to 64 TiB"
            ),
        ));
    }
    Ok(())
}

impl Manager {
    pub(crate) fn disk_path(&self, def: &DiskDef) -> PathBuf {
        self.dirs.disks.join(format!("{}.{}", def.id, def.format))
    }

    /// How disk files are opened: backing files only in the image directories.
    pub(crate) fn open_options(&self) -> images::OpenOptions {
        let mut allowed = vec![self.dirs.images.clone(), self.dirs.disks.clone()];
        allowed.extend(self.dirs.image_dirs.iter().cloned());
        images::OpenOptions {
            allowed_dirs: allowed,
            ..Default::default()
        }
    }

    fn find_disk(&self, key: &str) -> Result<DiskDef, ManagerError> {
        lock(&self.disks)
            .iter()
            .find(|d| d.name == key || d.id.to_string() == key)
            .cloned()
            .ok_or_else(|| ManagerError::NotFound("disk", key.into()))
    }

    /// The instance a disk is attached to (its name), if any.
    fn attached_to(&self, id: Uuid) -> Option<String> {
        lock(&self.entries).iter().find_map(|e| {
            let d = lock(&e.def);
            d.disks.iter().any(|a| a.id == id).then(|| d.name.clone())
        })
    }

    fn disk_view(&self, def: DiskDef) -> Disk {
        use std::os::unix::fs::MetadataExt;
        let actual_size = std::fs::metadata(self.disk_path(&def))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        let attached_to = self.attached_to(def.id);
        Disk {
            def,
            actual_size,
            attached_to,
        }
    }

    /// Every disk, oldest first.
    pub fn disks(&self) -> Vec<Disk> {
        let defs = lock(&self.disks).clone();
        defs.into_iter().map(|d| self.disk_view(d)).collect()
    }

    /// One disk, by id or name.
    pub fn disk(&self, key: &str) -> Result<Disk, ManagerError> {
        Ok(self.disk_view(self.find_disk(key)?))
    }

    fn check_new_disk_name(&self, name: &str) -> Result<(), ManagerError> {
        check_name(name).map_err(|m| invalid("name", m))?;
        if lock(&self.disks).iter().any(|d| d.name == name) {
            return Err(ManagerError::AlreadyExists("disk", name.into()));
        }
        Ok(())
    }

    /// Records a disk whose file is in place; removes the file when that fails.
    fn commit_disk(&self, def: DiskDef, file: FileGuard) -> Result<Disk, ManagerError> {
        self.disk_store
            .save(def.id, &def)
            .map_err(|e| ManagerError::Internal(format!("saving the disk definition: {e}")))?;
        file.keep();
        lock(&self.disks).push(def.clone());
        self.events.push(
            "disk",
            format!("/v1/disks/{}", def.id),
            "created".into(),
            None,
        );
        Ok(self.disk_view(def))
    }

    fn new_def(
        spec: &DiskCreate,
        format: Format,
        size: u64,
        block_size: u32,
        source: DiskSource,
    ) -> DiskDef {
        let t = now();
        DiskDef {
            id: Uuid::new_v4(),
            name: spec.name.clone(),
            description: spec.description.clone(),
            format: format.name().into(),
            size,
            block_size,
            source,
            created_at: t.clone(),
            updated_at: t,
            generation: 1,
        }
    }

    /// Creates a disk: blank (sparse), from an image (a qcow2 overlay on it, or a raw copy) or
    /// from another disk (a copy). `field` prefixes field names in errors (`disks[0].create.`).
    pub fn create_disk(&self, spec: DiskCreate) -> Result<Disk, ManagerError> {
        let _changes = lock(&self.changes);
        self.create_disk_locked(spec, "")
    }

    pub(crate) fn create_disk_locked(
        &self,
        spec: DiskCreate,
        field: &str,
    ) -> Result<Disk, ManagerError> {
        let f = |name: &str| format!("{field}{name}");
        let with_field = |e: ManagerError| match e {
            ManagerError::InvalidValue { field: x, message } => invalid(&f(&x), message),
            e => e,
        };
        self.check_new_disk_name(&spec.name).map_err(with_field)?;
        let block_size = spec.block_size.unwrap_or(512);
        if block_size != 512 && block_size != 4096 {
            return Err(invalid(&f("block_size"), "512 or 4096"));
        }
        let size = match &spec.size {
            Some(s) => {
                let b = s.bytes().map_err(|m| invalid(&f("size"), m))?;
                check_size(&f("size"), b)?;
                Some(b)
            }
            None => None,
        };
        let opts = self.open_options();
        let (format, size, src_path, source) = match &spec.source {
            DiskSource::Blank => {
                let size = size.ok_or_else(|| invalid(&f("size"), "required for a blank disk"))?;
                let format =
                    parse_format(spec.format.as_deref(), Format::Raw).map_err(with_field)?;
                (format, size, None, DiskSource::Blank)
            }
            DiskSource::Image { image } => {
                let img = self.image(image).map_err(|_| {
                    invalid(&f("source.image"), format!("no image named {image:?}"))
                })?;
                if img.kind != ImageKind::Disk {
                    return Err(invalid(
                        &f("source.image"),
                        format!("image {} is a {}, not a disk image", img.name, img.kind),
                    ));
                }
                let format =
                    parse_format(spec.format.as_deref(), Format::Qcow2).map_err(with_field)?;
                let path = self.image_path(&img);
                let info =
                    images::info(&path, &opts).map_err(|e| image_error(&f("source.image"), e))?;
                let size = size.unwrap_or(info.virtual_size);
                if size < info.virtual_size {
                    return Err(invalid(
                        &f("size"),
                        format!("smaller than the image ({} bytes)", info.virtual_size),
                    ));
                }
                let source = DiskSource::Image {
                    image: img.id.to_string(),
                };
                (format, size, Some(path), source)
            }
            DiskSource::Disk { disk } => {
                let src = self
                    .find_disk(disk)
                    .map_err(|_| invalid(&f("source.disk"), format!("no disk named {disk:?}")))?;
                self.check_detached_or_stopped(&src, "copy it")?;
                let format = parse_format(
                    spec.format.as_deref(),
                    Format::from_name(&src.format).unwrap_or(Format::Raw),
                )
                .map_err(with_field)?;
                let size = size.unwrap_or(src.size);
                if size < src.size {
                    return Err(invalid(
                        &f("size"),
                        format!("smaller than disk {} ({} bytes)", src.name, src.size),
                    ));
                }
                let source = DiskSource::Disk {
                    disk: src.id.to_string(),
                };
                (format, size, Some(self.disk_path(&src)), source)
            }
            DiskSource::Import => {
                return Err(invalid(
                    &f("source.type"),
                    "use POST /v1/disks/import to import a disk",
                ))
            }
        };
        check_size(&f("size"), size)?;
        let def = Self::new_def(&spec, format, size, block_size, source.clone());
        let path = self.disk_path(&def);
        let guard = FileGuard(Some(path.clone()));
        let fail = |e: images::Error| image_error(&f("source"), e);
        match (&source, src_path) {
            (DiskSource::Blank, _) => images::create_blank(&path, format, size).map_err(fail)?,
            (DiskSource::Image { .. }, Some(src)) if format == Format::Qcow2 => {
                images::create_overlay(&path, &src, Some(size), &opts).map_err(fail)?
            }
            (_, Some(src)) => {
                images::clone_image(&src, &path, format, &opts, &mut |_| {}).map_err(fail)?;
                let have = images::info(&path, &opts).map_err(fail)?.virtual_size;
                if size > have {
                    images::grow(&path, size, &opts).map_err(fail)?;
                }
            }
            (_, None) => return Err(ManagerError::Internal("disk source without a file".into())),
        }
        self.commit_disk(def, guard)
    }

    /// Creates a disk from a byte stream (raw or qcow2, validated; self-contained qcow2 only),
    /// stored in `format`. Nothing is left behind when the stream is refused.
    pub fn import_disk(
        &self,
        name: &str,
        format: Option<&str>,
        body: &mut dyn Read,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Disk, ManagerError> {
        let format = parse_format(format, Format::Raw)?;
        let spec = DiskCreate {
            name: name.into(),
            description: String::new(),
            size: None,
            block_size: None,
            format: Some(format.name().into()),
            source: DiskSource::Import,
        };
        // The name is checked first and again when the disk is recorded: the import itself
        // runs without the catalog lock, as it may take minutes.
        {
            let _changes = lock(&self.changes);
            self.check_new_disk_name(name)?;
        }
        let mut def = Self::new_def(&spec, format, 0, 512, DiskSource::Import);
        let path = self.disk_path(&def);
        let guard = FileGuard(Some(path.clone()));
        let summary = images::import(body, &path, format, &self.open_options(), progress)
            .map_err(|e| image_error("body", e))?;
        def.size = summary.virtual_size;
        if def.size == 0 {
            return Err(invalid("body", "the stream is empty"));
        }
        let _changes = lock(&self.changes);
        self.check_new_disk_name(name)?;
        self.commit_disk(def, guard)
    }

    /// Streams a disk's content as `format` into `out`. Refused while an instance that has
    /// the disk attached is running (its guest could change the bytes under the export).
    pub fn export_disk(
        &self,
        key: &str,
        format: Option<&str>,
        out: &mut dyn Write,
    ) -> Result<u64, ManagerError> {
        let def = self.find_disk(key)?;
        self.check_detached_or_stopped(&def, "export it")?;
        let format = parse_format(format, Format::Raw)?;
        images::export(
            &self.disk_path(&def),
            format,
            out,
            &self.open_options(),
            &mut |_| {},
        )
        .map_err(|e| ManagerError::Internal(e.to_string()))
    }

    /// Checks a disk before an export: `format` and the instance it is attached to.
    pub fn check_export(&self, key: &str, format: Option<&str>) -> Result<Disk, ManagerError> {
        let def = self.find_disk(key)?;
        parse_format(format, Format::Raw)?;
        self.check_detached_or_stopped(&def, "export it")?;
        Ok(self.disk_view(def))
    }

    fn check_detached_or_stopped(&self, def: &DiskDef, what: &str) -> Result<(), ManagerError> {
        if let Some(inst) = self.attached_to(def.id) {
            let state = self.get(&inst).map(|i| i.state)?;
            if !matches!(state, InstanceState::Stopped | InstanceState::Failed) {
                return Err(ManagerError::InUse(format!(
                    "cannot {what}: disk {} is attached to instance {inst}, which is {state}; stop it first",
                    def.name
                )));
            }
        }
        Ok(())
    }

    /// Renames, re-describes or grows a disk (growing only while detached).
    pub fn patch_disk(
        &self,
        key: &str,
        patch: DiskPatch,
        if_match: Option<&str>,
    ) -> Result<Disk, ManagerError> {
        let _changes = lock(&self.changes);
        let cur = self.disk_view(self.find_disk(key)?);
        super::model::check_if_match(if_match, &cur.etag())?;
        let mut def = cur.def.clone();
        if let Some(name) = &patch.name {
            if *name != def.name {
                self.check_new_disk_name(name)?;
                def.name = name.clone();
            }
        }
        if let Some(d) = patch.description {
            def.description = d;
        }
        if let Some(size) = &patch.size {
            let size = size.bytes().map_err(|m| invalid("size", m))?;
            check_size("size", size)?;
            if size < def.size {
                return Err(invalid(
                    "size",
                    format!("a disk can only grow (it has {} bytes)", def.size),
                ));
            }
            if let Some(inst) = &cur.attached_to {
                return Err(ManagerError::InUse(format!(
                    "disk {} is attached to instance {inst}; detach it to grow it",
                    def.name
                )));
            }
            if size > def.size {
                images::grow(&self.disk_path(&def), size, &self.open_options())
                    .map_err(|e| image_error("size", e))?;
                def.size = size;
            }
        }
        def.generation += 1;
        def.updated_at = now();
        self.disk_store
            .save(def.id, &def)
            .map_err(|e| ManagerError::Internal(format!("saving the disk definition: {e}")))?;
        if let Some(d) = lock(&self.disks).iter_mut().find(|d| d.id == def.id) {
            *d = def.clone();
        }
        // Attachments show the disk's name.
        for e in lock(&self.entries).iter() {
            let mut idef = lock(&e.def);
            let mut changed = false;
            for a in idef.disks.iter_mut().filter(|a| a.id == def.id) {
                a.disk = def.name.clone();
                changed = true;
            }
            if changed {
                let _ = self.store.save(idef.id, &*idef);
            }
        }
        Ok(self.disk_view(def))
    }

    /// Deletes a detached disk and its file.
    pub fn delete_disk(&self, key: &str) -> Result<(), ManagerError> {
        let _changes = lock(&self.changes);
        self.delete_disk_locked(key)
    }

    pub(crate) fn delete_disk_locked(&self, key: &str) -> Result<(), ManagerError> {
        let def = self.find_disk(key)?;
        if let Some(inst) = self.attached_to(def.id) {
            return Err(ManagerError::InUse(format!(
                "disk {} is attached to instance {inst}; detach it first",
                def.name
            )));
        }
        self.disk_store
            .remove(def.id)
            .map_err(|e| ManagerError::Internal(format!("removing the disk definition: {e}")))?;
        let _ = std::fs::remove_file(self.disk_path(&def));
        lock(&self.disks).retain(|d| d.id != def.id);
        self.events.push(
            "disk",
            format!("/v1/disks/{}", def.id),
            "deleted".into(),
            None,
        );
        Ok(())
    }

    /// The disk that is an overlay on the image `image_id`, if any (copies have no backing).
    pub(crate) fn image_in_use_by_disk(&self, image_id: Uuid) -> Option<String> {
        lock(&self.disks)
            .iter()
            .find(|d| {
                d.source
                    == DiskSource::Image {
                        image: image_id.to_string(),
                    }
                    && d.format == "qcow2"
            })
            .map(|d| d.name.clone())
    }

    /// Attaches a disk to a stopped instance.
    pub fn attach_disk(
        &self,
        instance: &str,
        disk: &str,
        read_only: bool,
    ) -> Result<super::Instance, ManagerError> {
        let _changes = lock(&self.changes);
        let e = self.find(instance)?;
        let def = self
            .find_disk(disk)
            .map_err(|_| invalid("disk", format!("no disk named {disk:?}")))?;
        self.check_stopped(&e, "stop it to attach a disk")?;
        if let Some(other) = self.attached_to(def.id) {
            return Err(ManagerError::InUse(format!(
                "disk {} is already attached to instance {other}",
                def.name
            )));
        }
        let mut idef = lock(&e.def).clone();
        if idef.disks.len() + idef.network_interfaces.len() >= vmm::config::MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "disk",
                format!(
                    "an instance has at most {} disks and NICs together",
                    vmm::config::MAX_VIRTIO_DEVICES
                ),
            ));
        }
        idef.disks.push(super::model::AttachedDisk {
            id: def.id,
            disk: def.name.clone(),
            read_only,
        });
        self.save_instance(&e, idef)?;
        Ok(e.view())
    }

    /// Detaches a disk from a stopped instance.
    pub fn detach_disk(&self, instance: &str, disk: &str) -> Result<super::Instance, ManagerError> {
        let _changes = lock(&self.changes);
        let e = self.find(instance)?;
        self.check_stopped(&e, "stop it to detach a disk")?;
        let mut idef = lock(&e.def).clone();
        let before = idef.disks.len();
        idef.disks
            .retain(|a| a.disk != disk && a.id.to_string() != disk);
        if idef.disks.len() == before {
            return Err(ManagerError::NotFound(
                "disk",
                format!("{disk} (attached to instance {})", idef.name),
            ));
        }
        self.save_instance(&e, idef)?;
        Ok(e.view())
    }
}
