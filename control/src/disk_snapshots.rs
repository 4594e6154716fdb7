//! Disk snapshots: a disk's content at one instant, also of a disk whose instance runs
//! (crash-consistent: every write the guest saw complete is in it, none after).
//!
//! A qcow2 disk keeps them inside its file as internal snapshots (`qemu-img snapshot -l`
//! lists them); a raw disk as files `<state>/disks/<id>.snapshots/<name>.raw`, reflinks where
//! the file system has them, else copies of the data. Either way the disk's own file is the
//! record: nothing else to keep in step, and they survive a restart of `kiln serve`.
//! A disk can be rolled back to one of its snapshots while no VM has it open, and new disks
//! can be made from one (`source: {"type": "snapshot"}`).

use std::path::PathBuf;

use devices::bus::lock;
use images::{Format, Qcow2Disk};
use vmm::snapshot::DiskSnapshot;

use crate::catalog::{Catalog, Reading};
use crate::error::{invalid, Error, Kind, Result};
use crate::events::Subject;
use crate::lifecycle::InstanceState;
use crate::model::{check_name, DiskDef};
use crate::Manager;

/// A snapshot of a disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DiskSnapshotView {
    /// The disk's name.
    pub disk: String,
    /// The snapshot's name (unique per disk).
    pub name: String,
    /// The disk's virtual size when it was taken.
    pub size: u64,
    /// When it was taken (RFC 3339).
    pub created_at: String,
    /// For a raw disk, bytes its copy takes on the host (near zero for a reflink); qcow2
    /// snapshots share the disk's file.
    pub actual_size: Option<u64>,
}

/// Where the disk's VM is, for a change of its snapshots.
enum Holder {
    /// No VM has it open: the disk is marked as being read meanwhile.
    Nobody { _reading: Reading },
    /// A running VM has it as disk `index`.
    Running(vmm::VmHandle, usize),
}

fn rfc3339(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// An image error: a refusal of the image library names `field`; a failing host is internal.
fn image_err(what: &str) -> impl Fn(images::Error) -> Error + '_ {
    move |e| match e {
        images::Error::Io { .. } => Error::internal(what, e),
        e => crate::disks::image_error("snapshot", e),
    }
}

impl Manager {
    /// `<state>/disks/<id>.snapshots`: a raw disk's snapshots.
    fn raw_snapshots_dir(&self, def: &DiskDef) -> PathBuf {
        self.store.disks_dir().join(format!("{}.snapshots", def.id))
    }

    /// The file of a raw disk's snapshot.
    pub(crate) fn raw_snapshot_file(&self, def: &DiskDef, name: &str) -> PathBuf {
        self.raw_snapshots_dir(def).join(format!("{name}.raw"))
    }

    fn list_of(&self, def: &DiskDef) -> Result<Vec<DiskSnapshotView>> {
        let mut out = Vec::new();
        match def.format {
            Format::Qcow2 => {
                let disk = Qcow2Disk::open(self.store.disk_file(def), true, &self.open_options())
                    .map_err(image_err("reading the disk's snapshots"))?;
                for s in disk.snapshots() {
                    let t =
                        std::time::UNIX_EPOCH + std::time::Duration::new(s.date.0.into(), s.date.1);
                    out.push(DiskSnapshotView {
                        disk: def.name.clone(),
                        name: s.name,
                        size: s.disk_size,
                        created_at: rfc3339(t),
                        actual_size: None,
                    });
                }
            }
            Format::Raw => {
                use std::os::unix::fs::MetadataExt;
                let Ok(entries) = std::fs::read_dir(self.raw_snapshots_dir(def)) else {
                    return Ok(out);
                };
                for e in entries.flatten() {
                    let path = e.path();
                    let (Some(name), Ok(meta)) = (
                        path.file_name()
                            .and_then(|n| n.to_str())
                            .and_then(|n| n.strip_suffix(".raw")),
                        e.metadata(),
                    ) else {
                        continue;
                    };
                    out.push(DiskSnapshotView {
                        disk: def.name.clone(),
                        name: name.to_string(),
                        size: meta.len(),
                        created_at: meta.modified().map(rfc3339).unwrap_or_default(),
                        actual_size: Some(meta.blocks() * 512),
                    });
                }
                out.sort_by(|a, b| a.created_at.cmp(&b.created_at).then(a.name.cmp(&b.name)));
            }
        }
        Ok(out)
    }

    /// The snapshots of this disk.
    pub(crate) fn disk_snapshots_of(&self, def: &DiskDef) -> Result<Vec<DiskSnapshotView>> {
        self.list_of(def)
    }

    /// The snapshots of a disk, oldest first.
    pub fn disk_snapshots(&self, disk: &str) -> Result<Vec<DiskSnapshotView>> {
        let def = lock(&self.catalog).disk(disk)?.clone();
        self.list_of(&def)
    }

    /// One snapshot of a disk.
    pub fn disk_snapshot(&self, disk: &str, name: &str) -> Result<DiskSnapshotView> {
        self.disk_snapshots(disk)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| Error::not_found(Kind::Snapshot, format!("{name} of disk {disk}")))
    }

    /// Who has the disk open: nobody (then it is marked as being read until the holder is
    /// dropped) or a running VM. A disk whose instance is between states is refused.
    fn holder(&self, cat: &Catalog, def: &DiskDef, running_ok: bool, what: &str) -> Result<Holder> {
        if let Some(inst) = cat.attached_to(def.id) {
            let slot = self.slot(inst.id)?;
            let state = slot.state();
            if !state.is_stopped() {
                let index = inst.disks.iter().position(|a| a.disk == def.id);
                return match (state, slot.handle(), index) {
                    (InstanceState::Running | InstanceState::Paused, Some(h), Some(i))
                        if running_ok =>
                    {
                        Ok(Holder::Running(h, i))
                    }
                    _ => Err(Error::InUse(format!(
                        "cannot {what}: disk {} is attached to instance {}, which is {state}; stop it first",
                        def.name, inst.name
                    ))),
                };
            }
        }
        cat.check_not_read(def, what)?;
        Ok(Holder::Nobody {
            _reading: Reading::begin(cat, def.id),
        })
    }

    /// Takes a snapshot of a disk, also while its instance runs (crash-consistent, the guest
    /// keeps running). Blocks while a raw disk is copied.
    pub fn create_disk_snapshot(&self, disk: &str, name: &str) -> Result<DiskSnapshotView> {
        check_name(name).map_err(|m| invalid("name", m))?;
        let (def, holder) = {
            let cat = lock(&self.catalog);
            let def = cat.disk(disk)?.clone();
            let holder = self.holder(&cat, &def, true, "snapshot it")?;
            (def, holder)
        };
        if self.list_of(&def)?.iter().any(|s| s.name == name) {
            return Err(Error::AlreadyExists {
                kind: Kind::Snapshot,
                name: format!("{name} (of disk {})", def.name),
            });
        }
        let path = self.store.disk_file(&def);
        let target = match def.format {
            Format::Qcow2 => DiskSnapshot::Internal(name.to_string()),
            Format::Raw => {
                let dir = self.raw_snapshots_dir(&def);
                std::fs::create_dir_all(&dir)
                    .map_err(|e| Error::internal("making the snapshot directory", e))?;
                DiskSnapshot::File(self.raw_snapshot_file(&def, name))
            }
        };
        match (&holder, &target) {
            (Holder::Running(h, index), _) => {
                let r = h
                    .snapshot_disk(*index, &target)
                    .map_err(|e| Error::internal("taking the disk snapshot", e))?;
                tracing::info!(
                    "snapshot {name} of running disk {}: device held {:?}, raw copy {:?}",
                    def.name,
                    r.held_for,
                    r.raw_copy
                );
            }
            (Holder::Nobody { .. }, DiskSnapshot::Internal(n)) => {
                Qcow2Disk::open(&path, false, &self.open_options())
                    .and_then(|mut d| d.create_snapshot(n).map(|_| ()))
                    .map_err(image_err("taking the disk snapshot"))?;
            }
            (Holder::Nobody { .. }, DiskSnapshot::File(dst)) => {
                let copy = images::snapshot_raw(&path, dst)
                    .map_err(image_err("taking the disk snapshot"))?;
                tracing::info!("snapshot {name} of raw disk {}: {copy:?}", def.name);
            }
        }
        drop(holder);
        self.events
            .push(Subject::Disk(def.id), "snapshot.created", Some(name.into()));
        self.disk_snapshot(&def.id.to_string(), name)
    }

    /// Deletes a snapshot of a disk that no VM has open.
    pub fn delete_disk_snapshot(&self, disk: &str, name: &str) -> Result<()> {
        let (def, holder) = {
            let cat = lock(&self.catalog);
            let def = cat.disk(disk)?.clone();
            let holder = self.holder(&cat, &def, false, "delete its snapshot")?;
            (def, holder)
        };
        self.disk_snapshot(&def.id.to_string(), name)?;
        match def.format {
            Format::Qcow2 => {
                Qcow2Disk::open(self.store.disk_file(&def), false, &self.open_options())
                    .and_then(|mut d| d.delete_snapshot(name))
                    .map_err(image_err("deleting the disk snapshot"))?
            }
            Format::Raw => std::fs::remove_file(self.raw_snapshot_file(&def, name))
                .map_err(|e| Error::internal("deleting the disk snapshot", e))?,
        }
        drop(holder);
        self.events
            .push(Subject::Disk(def.id), "snapshot.deleted", Some(name.into()));
        Ok(())
    }

    /// Rolls a disk back to one of its snapshots: detached, or attached to a stopped
    /// instance. Everything written since is lost; the snapshot stays.
    pub fn rollback_disk(&self, disk: &str, name: &str) -> Result<crate::DiskView> {
        let (def, holder) = {
            let cat = lock(&self.catalog);
            let def = cat.disk(disk)?.clone();
            let holder = self.holder(&cat, &def, false, "roll it back")?;
            (def, holder)
        };
        let snap = self.disk_snapshot(&def.id.to_string(), name)?;
        if snap.size != def.size {
            return Err(invalid(
                "snapshot",
                format!(
                    "disk {} was grown since snapshot {name} ({} bytes then, {} now): rolling back would shrink it",
                    def.name, snap.size, def.size
                ),
            ));
        }
        let path = self.store.disk_file(&def);
        match def.format {
            Format::Qcow2 => Qcow2Disk::open(&path, false, &self.open_options())
                .and_then(|mut d| d.revert_to_snapshot(name))
                .map_err(image_err("rolling the disk back"))?,
            Format::Raw => {
                let tmp = self.store.disks_dir().join(format!(".{}.rollback", def.id));
                let _ = std::fs::remove_file(&tmp);
                images::snapshot_raw(&self.raw_snapshot_file(&def, name), &tmp)
                    .map_err(image_err("rolling the disk back"))?;
                std::fs::rename(&tmp, &path)
                    .map_err(|e| Error::internal("rolling the disk back", e))?;
            }
        }
        drop(holder);
        self.events.push(
            Subject::Disk(def.id),
            "snapshot.rolled_back",
            Some(name.into()),
        );
        self.disk(&def.id.to_string())
    }
}
