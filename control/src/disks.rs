//! The manager's calls on disks: image files in the state directory that instances attach as
//! virtio-blk. A disk made from an image is a qcow2 overlay on the image's file (the image is
//! never written), or a full raw copy when asked for raw.
//!
//! Making a disk's file (a copy, an import) and exporting one take long: they run without the
//! catalog's lock, the name checked before and again when the disk is recorded, and a disk
//! they read marked as being read meanwhile (it does not start, grow or go).

use std::io::{Read, Write};
use std::path::PathBuf;

use devices::bus::lock;
use images::Format;
use uuid::Uuid;

use crate::catalog::{Catalog, Reading};
use crate::error::{invalid, Error, Kind, Result};
use crate::events::Subject;
use crate::instances::check_revision;
use crate::model::{now, DiskDef, ImageKind, Origin, Revision};
use crate::spec::{DiskChanges, NewDisk, SourceRef};
use crate::store::FileGuard;
use crate::Manager;

/// A disk as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskView {
    /// The definition.
    pub def: DiskDef,
    /// Bytes the file takes on the host.
    pub actual_size: u64,
    /// The instance it is attached to (its name).
    pub attached_to: Option<String>,
}

/// How a planned disk's file is made.
enum Making {
    /// A sparse file of zeros.
    Blank,
    /// A qcow2 overlay on this image file.
    Overlay(PathBuf),
    /// A copy of this file, grown to the disk's size.
    Copy(PathBuf),
    /// A copy of this qcow2 file's internal snapshot of this name, grown to the disk's size.
    FromSnapshot(PathBuf, String),
}

/// A disk checked against the catalog, whose file is still to be made.
pub(crate) struct DiskPlan {
    /// Its definition.
    pub def: DiskDef,
    making: Making,
    /// The disk it copies, marked as being read until the plan is dropped.
    _reading: Option<Reading>,
}

/// A disk ready to be exported: marked as being read until this is dropped.
pub struct DiskExport {
    path: PathBuf,
    format: Format,
    opts: images::OpenOptions,
    /// The disk's virtual size (the length of a raw export).
    pub size: u64,
    _reading: Reading,
}

impl DiskExport {
    /// Streams the disk's content into `out`; returns the bytes written. Blocks.
    pub fn write_to(self, out: &mut dyn Write) -> Result<u64> {
        images::export(&self.path, self.format, out, &self.opts, &mut |_| {})
            .map_err(|e| Error::Internal(e.to_string()))
    }
}

pub(crate) fn image_error(field: &str, e: images::Error) -> Error {
    use std::io::ErrorKind::{FileTooLarge, StorageFull};
    match e {
        // The host's file system cannot hold it: more than the host can give.
        images::Error::Io { ref source, .. }
            if matches!(source.kind(), FileTooLarge | StorageFull) =>
        {
            Error::InsufficientCapacity(format!("{field}: {e}"))
        }
        images::Error::Io { .. } => Error::Internal(e.to_string()),
        other => invalid(field, other.to_string()),
    }
}

/// Sizes a disk may have: whole sectors, at least one, at most 64 TiB.
fn check_size(field: &str, size: u64) -> Result<()> {
    if size == 0 || !size.is_multiple_of(512) || size > MAX_DISK {
        return Err(invalid(
            field,
            format!(
                "{size} bytes: a disk is a whole number of 512-byte sectors, 1 sector to 64 TiB"
            ),
        ));
    }
    Ok(())
}

/// Largest disk: 64 TiB.
const MAX_DISK: u64 = 64 << 40;

/// An import stream, refused as soon as it shows a disk over [`MAX_DISK`]: a qcow2 header
/// whose virtual size is larger (before anything is spooled), or a raw stream that goes on
/// past it.
struct LimitedImport<'a> {
    head: std::io::Cursor<Vec<u8>>,
    rest: &'a mut dyn Read,
    read: u64,
    /// The refusal, when the stream was cut for being too large.
    over: Option<Error>,
}

impl<'a> LimitedImport<'a> {
    fn new(rest: &'a mut dyn Read) -> Result<Self> {
        let mut head = vec![0; 32];
        let mut n = 0;
        while n < head.len() {
            match rest.read(&mut head[n..]) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(invalid("body", format!("reading the stream: {e}"))),
            }
        }
        head.truncate(n);
        if n == 32 && head[..4] == *b"QFI\xfb" {
            let size = u64::from_be_bytes(head[24..32].try_into().expect("8 bytes"));
            if size > MAX_DISK {
                return Err(invalid(
                    "body",
                    format!(
                        "the qcow2 image's virtual size is {size} bytes; a disk is at most 64 TiB"
                    ),
                ));
            }
        }
        Ok(Self {
            head: std::io::Cursor::new(head),
            rest,
            read: 0,
            over: None,
        })
    }
}

impl Read for LimitedImport<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match self.head.read(buf)? {
            0 => self.rest.read(buf)?,
            n => n,
        };
        self.read += n as u64;
        if self.read > MAX_DISK {
            self.over = Some(invalid(
                "body",
                "the stream is longer than 64 TiB, the largest disk",
            ));
            return Err(std::io::Error::other("the stream is longer than 64 TiB"));
        }
        Ok(n)
    }
}

fn new_def(
    name: &str,
    description: &str,
    format: Format,
    size: u64,
    block_size: u32,
    source: Origin,
) -> DiskDef {
    let t = now();
    DiskDef {
        id: Uuid::new_v4(),
        name: name.into(),
        description: description.into(),
        format,
        size,
        block_size,
        source,
        created_at: t.clone(),
        updated_at: t,
        generation: 1,
    }
}

impl Manager {
    fn disk_view(&self, cat: &Catalog, def: &DiskDef) -> DiskView {
        use std::os::unix::fs::MetadataExt;
        let actual_size = std::fs::metadata(self.store.disk_file(def))
            .map(|m| m.blocks() * 512)
            .unwrap_or(0);
        DiskView {
            def: def.clone(),
            actual_size,
            attached_to: cat.attached_to(def.id).map(|i| i.name.clone()),
        }
    }

    /// Every disk, oldest first.
    pub fn disks(&self) -> Vec<DiskView> {
        let cat = lock(&self.catalog);
        cat.disks.iter().map(|d| self.disk_view(&cat, d)).collect()
    }

    /// One disk, by id or name.
    pub fn disk(&self, key: &str) -> Result<DiskView> {
        let cat = lock(&self.catalog);
        Ok(self.disk_view(&cat, cat.disk(key)?))
    }

    /// Checks a new disk against the catalog: its definition and how its file is made. Field
    /// names in errors are those of [`NewDisk`] (`size`, `source.image`, …).
    pub(crate) fn plan_disk(&self, cat: &Catalog, spec: &NewDisk) -> Result<DiskPlan> {
        cat.check_new_name(Kind::Disk, &spec.name)?;
        let block_size = spec.block_size.unwrap_or(512);
        devices::virtio::block::check_block_size(block_size)
            .map_err(|m| invalid("block_size", m))?;
        if let Some(size) = spec.size {
            check_size("size", size)?;
        }
        let opts = self.open_options();
        let (format, size, origin, making, reading) = match &spec.source {
            SourceRef::Blank => {
                let size = spec
                    .size
                    .ok_or_else(|| invalid("size", "required for a blank disk"))?;
                let format = spec.format.unwrap_or(Format::Raw);
                (format, size, Origin::Blank, Making::Blank, None)
            }
            SourceRef::Image(key) => {
                let img = cat
                    .image(key)
                    .map_err(|_| invalid("source.image", format!("no image named {key:?}")))?;
                if img.kind != ImageKind::Disk {
                    return Err(invalid(
                        "source.image",
                        format!("image {} is a {}, not a disk image", img.name, img.kind),
                    ));
                }
                let path = img.path.clone().unwrap_or_default();
                let info =
                    images::info(&path, &opts).map_err(|e| image_error("source.image", e))?;
                let size = spec.size.unwrap_or(info.virtual_size);
                if size < info.virtual_size {
                    return Err(invalid(
                        "size",
                        format!("smaller than the image ({} bytes)", info.virtual_size),
                    ));
                }
                let format = spec.format.unwrap_or(Format::Qcow2);
                let making = match format {
                    Format::Qcow2 => Making::Overlay(path),
                    Format::Raw => Making::Copy(path),
                };
                (format, size, Origin::Image { image: img.id }, making, None)
            }
            SourceRef::Disk(key) => {
                let src = cat
                    .disk(key)
                    .map_err(|_| invalid("source.disk", format!("no disk named {key:?}")))?
                    .clone();
                self.check_detached_or_stopped(cat, &src, "copy it")?;
                let size = spec.size.unwrap_or(src.size);
                if size < src.size {
                    return Err(invalid(
                        "size",
                        format!("smaller than disk {} ({} bytes)", src.name, src.size),
                    ));
                }
                let making = Making::Copy(self.store.disk_file(&src));
                let format = spec.format.unwrap_or(src.format);
                (
                    format,
                    size,
                    Origin::Disk { disk: src.id },
                    making,
                    Some(src.id),
                )
            }
            SourceRef::Snapshot { disk, snapshot } => {
                let field = "source.snapshot";
                let src = cat
                    .disk(disk)
                    .map_err(|_| invalid("source.disk", format!("no disk named {disk:?}")))?
                    .clone();
                self.check_detached_or_stopped(cat, &src, "copy its snapshot")?;
                let snap = self
                    .disk_snapshots_of(&src)?
                    .into_iter()
                    .find(|s| s.name == *snapshot)
                    .ok_or_else(|| {
                        invalid(
                            field,
                            format!("disk {} has no snapshot {snapshot:?}", src.name),
                        )
                    })?;
                let size = spec.size.unwrap_or(snap.size);
                if size < snap.size {
                    return Err(invalid(
                        "size",
                        format!("smaller than the snapshot ({} bytes)", snap.size),
                    ));
                }
                let making = match src.format {
                    Format::Qcow2 => {
                        Making::FromSnapshot(self.store.disk_file(&src), snapshot.clone())
                    }
                    Format::Raw => Making::Copy(self.raw_snapshot_file(&src, snapshot)),
                };
                let format = spec.format.unwrap_or(src.format);
                (
                    format,
                    size,
                    Origin::Disk { disk: src.id },
                    making,
                    Some(src.id),
                )
            }
        };
        check_size("size", size)?;
        Ok(DiskPlan {
            def: new_def(
                &spec.name,
                &spec.description,
                format,
                size,
                block_size,
                origin,
            ),
            making,
            _reading: reading.map(|disk| Reading::begin(cat, disk)),
        })
    }

    /// Makes a planned disk's file; it is removed again when the guard is dropped unkept.
    /// Blocks (a copy takes as long as the copy).
    pub(crate) fn make_disk(&self, plan: &DiskPlan) -> Result<FileGuard> {
        let path = self.store.disk_file(&plan.def);
        let guard = FileGuard::new(path.clone());
        let opts = self.open_options();
        let (format, size) = (plan.def.format, plan.def.size);
        let fail = |e: images::Error| image_error("source", e);
        match &plan.making {
            Making::Blank => images::create_blank(&path, format, size).map_err(fail)?,
            Making::Overlay(base) => {
                images::create_overlay(&path, base, Some(size), &opts).map_err(fail)?
            }
            Making::Copy(_) | Making::FromSnapshot(..) => {
                match &plan.making {
                    Making::FromSnapshot(src, name) => {
                        images::create_from_snapshot(src, name, &path, format, &opts, &mut |_| {})
                    }
                    Making::Copy(src) => {
                        images::clone_image(src, &path, format, &opts, &mut |_| {})
                    }
                    _ => unreachable!("matched above"),
                }
                .map_err(fail)?;
                let have = images::info(&path, &opts).map_err(fail)?.virtual_size;
                if size > have {
                    images::grow(&path, size, &opts).map_err(fail)?;
                }
            }
        }
        Ok(guard)
    }

    /// Records a disk whose file is in place.
    pub(crate) fn commit_disk(&self, cat: &mut Catalog, def: &DiskDef) -> Result<()> {
        if let Origin::Image { image } = def.source {
            if cat.image_by_id(image).is_none() {
                return Err(Error::not_found(Kind::Image, image.to_string()));
            }
        }
        self.store
            .save(def)
            .map_err(|e| Error::internal("saving the disk definition", e))?;
        cat.disks.push(def.clone());
        self.events.name(def.id, &def.name);
        self.events.push(Subject::Disk(def.id), "created", None);
        Ok(())
    }

    /// Removes a disk's definition and file.
    pub(crate) fn remove_disk(&self, cat: &mut Catalog, id: Uuid) -> Result<()> {
        let Some(index) = cat.disks.iter().position(|d| d.id == id) else {
            return Ok(());
        };
        self.store
            .remove::<DiskDef>(id)
            .map_err(|e| Error::internal("removing the disk definition", e))?;
        let def = cat.disks.remove(index);
        let _ = std::fs::remove_file(self.store.disk_file(&def));
        self.events.push(Subject::Disk(id), "deleted", None);
        Ok(())
    }

    /// Creates a disk: blank (sparse), from an image (a qcow2 overlay on it, or a raw copy) or
    /// from another disk (a copy). Blocks while the file is made.
    pub fn create_disk(&self, spec: NewDisk) -> Result<DiskView> {
        let plan = self.plan_disk(&lock(&self.catalog), &spec)?;
        let file = self.make_disk(&plan)?;
        let def = plan.def.clone();
        drop(plan);
        let mut cat = lock(&self.catalog);
        cat.check_new_name(Kind::Disk, &def.name)?;
        self.commit_disk(&mut cat, &def)?;
        file.keep();
        Ok(self.disk_view(&cat, &def))
    }

    /// Creates a disk from a byte stream (raw or qcow2, validated; self-contained qcow2 only),
    /// stored in `format`. Nothing is left behind when the stream is refused. Blocks while
    /// the stream is read.
    pub fn import_disk(&self, name: &str, format: Format, body: &mut dyn Read) -> Result<DiskView> {
        lock(&self.catalog).check_new_name(Kind::Disk, name)?;
        let mut def = new_def(name, "", format, 0, 512, Origin::Import);
        let path = self.store.disk_file(&def);
        let file = FileGuard::new(path.clone());
        let mut body = LimitedImport::new(body)?;
        let summary = images::import(&mut body, &path, format, &self.open_options(), &mut |_| {})
            .map_err(|e| match body.over.take() {
            Some(over) => over,
            None => image_error("body", e),
        })?;
        check_size("body", summary.virtual_size)?;
        def.size = summary.virtual_size;
        if def.size == 0 {
            return Err(invalid("body", "the stream is empty"));
        }
        let mut cat = lock(&self.catalog);
        cat.check_new_name(Kind::Disk, name)?;
        self.commit_disk(&mut cat, &def)?;
        file.keep();
        Ok(self.disk_view(&cat, &def))
    }

    /// Prepares the export of a disk as `format`. Refused while an instance that has the
    /// disk attached is running (its guest could change the bytes under the export); until
    /// the export is dropped, that instance does not start.
    pub fn export_disk(&self, key: &str, format: Format) -> Result<DiskExport> {
        let cat = lock(&self.catalog);
        let def = cat.disk(key)?.clone();
        self.check_detached_or_stopped(&cat, &def, "export it")?;
        Ok(DiskExport {
            path: self.store.disk_file(&def),
            format,
            opts: self.open_options(),
            size: def.size,
            _reading: Reading::begin(&cat, def.id),
        })
    }

    pub(crate) fn check_detached_or_stopped(
        &self,
        cat: &Catalog,
        def: &DiskDef,
        what: &str,
    ) -> Result<()> {
        if let Some(inst) = cat.attached_to(def.id) {
            let state = self.slot(inst.id)?.state();
            if !state.is_stopped() {
                return Err(Error::InUse(format!(
                    "cannot {what}: disk {} is attached to instance {}, which is {state}; stop it first",
                    def.name, inst.name
                )));
            }
        }
        Ok(())
    }

    /// Renames, re-describes or grows a disk (growing only while detached). With `expected`,
    /// only when the definition is still at that revision.
    pub fn patch_disk(
        &self,
        key: &str,
        changes: DiskChanges,
        expected: Option<Revision>,
    ) -> Result<DiskView> {
        let mut cat = lock(&self.catalog);
        let cur = cat.disk(key)?.clone();
        check_revision(Kind::Disk, cur.revision(), expected)?;
        let mut def = cur.clone();
        if let Some(name) = changes.name.filter(|n| *n != def.name) {
            cat.check_new_name(Kind::Disk, &name)?;
            def.name = name;
        }
        if let Some(d) = changes.description {
            def.description = d;
        }
        if let Some(size) = changes.size {
            check_size("size", size)?;
            if size < def.size {
                return Err(invalid(
                    "size",
                    format!("a disk can only grow (it has {} bytes)", def.size),
                ));
            }
            if let Some(inst) = cat.attached_to(def.id) {
                return Err(Error::InUse(format!(
                    "disk {} is attached to instance {}; detach it to grow it",
                    def.name, inst.name
                )));
            }
            cat.check_not_read(&def, "grow it")?;
            if size > def.size {
                images::grow(&self.store.disk_file(&def), size, &self.open_options())
                    .map_err(|e| image_error("size", e))?;
                def.size = size;
            }
        }
        def.generation += 1;
        def.updated_at = now();
        self.store
            .save(&def)
            .map_err(|e| Error::internal("saving the disk definition", e))?;
        if let Some(d) = cat.disks.iter_mut().find(|d| d.id == def.id) {
            *d = def.clone();
        }
        Ok(self.disk_view(&cat, &def))
    }

    /// Deletes a detached disk and its file.
    pub fn delete_disk(&self, key: &str) -> Result<()> {
        let mut cat = lock(&self.catalog);
        let def = cat.disk(key)?.clone();
        if let Some(inst) = cat.attached_to(def.id) {
            return Err(Error::InUse(format!(
                "disk {} is attached to instance {}; detach it first",
                def.name, inst.name
            )));
        }
        cat.check_not_read(&def, "delete it")?;
        self.remove_disk(&mut cat, def.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_the_host_cannot_hold_is_insufficient_capacity() {
        let io = |kind| images::Error::Io {
            context: "creating raw image /x.raw".into(),
            source: std::io::Error::from(kind),
        };
        for kind in [
            std::io::ErrorKind::FileTooLarge,
            std::io::ErrorKind::StorageFull,
        ] {
            assert!(matches!(
                image_error("size", io(kind)),
                Error::InsufficientCapacity(m) if m.starts_with("size: ")
            ));
        }
        assert!(matches!(
            image_error("size", io(std::io::ErrorKind::PermissionDenied)),
            Error::Internal(_)
        ));
        assert!(matches!(
            check_size("size", 1000),
            Err(Error::InvalidValue { .. })
        ));
        check_size("size", 64 << 40).unwrap();
    }
}
