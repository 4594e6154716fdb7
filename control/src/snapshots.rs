//! Instance snapshots: a running instance's memory, machine state and disks saved at one
//! instant, and instances restored (or cloned) from them.
//!
//! ```text
//! <state>/snapshots/<id>.json   the snapshot's definition (what the instance was)
//! <state>/snapshots/<id>/       the VM's snapshot (see `vmm::snapshot`: state, memory,
//!                               disk-<N>.<format>) and `console`, the console history then
//! ```
//!
//! An instance created from a snapshot gets its own disks, qcow2 overlays on the snapshot's
//! disk copies (so a snapshot that disks are made from cannot be deleted), and its first
//! start restores the snapshot instead of booting the kernel: the guest continues where it
//! was paused. Every instance restored from one snapshot maps its memory file copy-on-write
//! (one loaded [`vmm::Snapshot`] per snapshot, shared), so a clone costs the pages it writes.
//! A snapshot is loaded and checked (format, Kiln version, checksum) before anything is
//! created from it: a corrupt or foreign one is refused with nothing made.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use devices::bus::lock;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vmm::snapshot::PreparedVm;
use vmm::{MacAddr, NetConfig, RestoreOptions, Vm};

use crate::error::{invalid, Error, Kind, Result};
use crate::events::Subject;
use crate::lifecycle::{Action, InstanceState};
use crate::model::{check_name, now, Attachment, Boot, DiskDef, InstanceDef, Nic, Origin};
use crate::operations::Operation;
use crate::spec::ActionRequest;
use crate::store::{FileGuard, Record, Store};
use crate::Manager;

/// Most instances one request may clone from a snapshot.
pub const MAX_CLONES: u32 = 256;

/// How long the vCPUs get to stop for a snapshot that leaves the instance stopped.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(10);

/// The console history file inside a snapshot's directory.
const CONSOLE_FILE: &str = "console";

/// A disk of the instance a snapshot was taken of.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotDisk {
    /// The disk's name then.
    pub name: String,
    /// Its virtual size.
    pub size: u64,
    /// Its logical block size.
    pub block_size: u32,
    /// The guest could not write it.
    pub read_only: bool,
}

/// An instance snapshot's definition (`<state>/snapshots/<id>.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SnapshotDef {
    /// UUID.
    pub id: Uuid,
    /// Unique name among instance snapshots.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The instance it was taken of (its id; the instance may be gone).
    pub instance: Uuid,
    /// That instance's name then.
    pub instance_name: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// How the instance boots (for a restored instance's later boots).
    pub boot: Boot,
    /// Its disks, in guest order.
    pub disks: Vec<SnapshotDisk>,
    /// Its NICs.
    pub network_interfaces: Vec<Nic>,
    /// Bytes of guest memory saved (touched pages only).
    pub memory_saved: u64,
    /// How long the guest was paused for it, in microseconds.
    pub paused_us: u64,
    /// RFC 3339.
    pub created_at: String,
}

impl Record for SnapshotDef {
    const DIR: &'static str = "snapshots";
    fn id(&self) -> Uuid {
        self.id
    }
}

/// What a snapshot is used by, as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotView {
    /// The definition.
    pub def: SnapshotDef,
    /// Bytes its files take on the host.
    pub actual_size: u64,
}

/// A snapshot to take.
#[derive(Clone, Debug, Default)]
pub struct NewSnapshot {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Leave the instance stopped afterwards (else it resumes).
    pub stop: bool,
}

/// A NIC of an instance restored from a snapshot: what to change of the snapshot's.
#[derive(Clone, Debug, Default)]
pub struct RestoreNic {
    /// Another host TAP device.
    pub host_tap: Option<String>,
    /// Another MAC.
    pub mac: Option<MacAddr>,
}

/// Instances to create from a snapshot.
#[derive(Clone, Debug, Default)]
pub struct NewRestore {
    /// The name; with `count`, the prefix of the names (`<name>-1` … `<name>-<count>`).
    pub name: String,
    /// Free text.
    pub description: String,
    /// The snapshot (name or id).
    pub snapshot: String,
    /// Clones: this many instances, each with its own disks, MACs and name.
    pub count: Option<u32>,
    /// A fresh MAC for each NIC (clones always get fresh ones).
    pub fresh_mac: bool,
    /// Per NIC, in order: changes to the snapshot's.
    pub nics: Vec<RestoreNic>,
    /// Start again when the control plane opens (boots afresh then).
    pub auto_start: bool,
    /// Start (restore) them once created.
    pub start: bool,
}

/// The instance snapshots of the host, and what makes restores fast.
pub(crate) struct Snapshots {
    dir: PathBuf,
    defs: Mutex<Vec<SnapshotDef>>,
    /// Snapshots loaded and checked, shared by every VM restored from them.
    loaded: Mutex<HashMap<Uuid, Arc<vmm::Snapshot>>>,
    /// One VM shell per snapshot restored before, prepared for the next restore.
    prepared: Arc<Mutex<HashMap<Uuid, PreparedVm>>>,
    /// Snapshots whose shell is being prepared: at most one preparing thread per snapshot,
    /// however many restores a burst (`count`) makes.
    preparing: Arc<Mutex<HashSet<Uuid>>>,
    /// Names being taken (a snapshot is written without the lock).
    taking: Mutex<Vec<String>>,
}

impl Snapshots {
    /// The snapshots in the store's `snapshots` directory; directories without a definition
    /// (a snapshot cut short by a crash) are removed.
    pub fn open(store: &Store) -> std::io::Result<Self> {
        let dir = store.disks_dir().with_file_name(SnapshotDef::DIR);
        std::fs::create_dir_all(&dir)?;
        let defs: Vec<SnapshotDef> = store.load_all(|s: &SnapshotDef| &s.created_at)?;
        for e in std::fs::read_dir(&dir)?.flatten() {
            let path = e.path();
            let known = defs
                .iter()
                .any(|d| path.file_name() == Some(d.id.to_string().as_ref()));
            if path.is_dir() && !known {
                tracing::info!("removing the leftover snapshot {}", path.display());
                let _ = std::fs::remove_dir_all(&path);
            }
        }
        Ok(Self {
            dir,
            defs: Mutex::new(defs),
            loaded: Mutex::default(),
            prepared: Arc::default(),
            preparing: Arc::default(),
            taking: Mutex::default(),
        })
    }

    /// The directory of the snapshots (an allowed place for backing files).
    pub fn dir(&self) -> PathBuf {
        self.dir.clone()
    }

    fn files(&self, id: Uuid) -> PathBuf {
        self.dir.join(id.to_string())
    }

    fn find(&self, key: &str) -> Result<SnapshotDef> {
        lock(&self.defs)
            .iter()
            .find(|d| d.name == key || d.id.to_string() == key)
            .cloned()
            .ok_or_else(|| Error::not_found(Kind::Snapshot, key))
    }

    /// The snapshot loaded and checked, once per snapshot.
    fn load(&self, def: &SnapshotDef) -> std::result::Result<Arc<vmm::Snapshot>, String> {
        if let Some(s) = lock(&self.loaded).get(&def.id) {
            return Ok(s.clone());
        }
        let s = Arc::new(vmm::Snapshot::load(self.files(def.id)).map_err(|e| e.to_string())?);
        if s.config().disks.len() != def.disks.len()
            || s.config().nets.len() != def.network_interfaces.len()
        {
            return Err(format!(
                "snapshot {} does not match its definition (disks or NICs differ)",
                def.name
            ));
        }
        Ok(lock(&self.loaded).entry(def.id).or_insert(s).clone())
    }
}

/// Bytes the files under `dir` take on the host.
fn allocated(dir: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.blocks() * 512)
                .sum()
        })
        .unwrap_or(0)
}

/// Releases a name reserved for a snapshot being taken.
struct Taking<'a>(&'a Mutex<Vec<String>>, String);

impl Drop for Taking<'_> {
    fn drop(&mut self) {
        lock(self.0).retain(|n| *n != self.1);
    }
}

impl Manager {
    fn snapshot_view(&self, def: SnapshotDef) -> SnapshotView {
        SnapshotView {
            actual_size: allocated(&self.snapshots.files(def.id)),
            def,
        }
    }

    /// Every instance snapshot, oldest first.
    pub fn snapshots(&self) -> Vec<SnapshotView> {
        let defs = lock(&self.snapshots.defs).clone();
        defs.into_iter().map(|d| self.snapshot_view(d)).collect()
    }

    /// One instance snapshot, by name or id.
    pub fn snapshot(&self, key: &str) -> Result<SnapshotView> {
        Ok(self.snapshot_view(self.snapshots.find(key)?))
    }

    /// Takes a snapshot of a running (or paused) instance: it is paused, its memory, machine
    /// state, disks and console history saved, then it resumes (or, with `stop`, is stopped).
    /// Blocks while the snapshot is written.
    pub fn take_snapshot(&self, key: &str, spec: NewSnapshot) -> Result<SnapshotView> {
        check_name(&spec.name).map_err(|m| invalid("name", m))?;
        let (def, slot) = {
            let cat = lock(&self.catalog);
            let def = cat.instance(key)?.clone();
            let slot = self.slot(def.id)?;
            let parts = cat.parts(&def)?;
            let disks: Vec<SnapshotDisk> = def
                .disks
                .iter()
                .zip(&parts.disks)
                .map(|(a, d)| SnapshotDisk {
                    name: d.name.clone(),
                    size: d.size,
                    block_size: d.block_size,
                    read_only: a.read_only,
                })
                .collect();
            ((def, disks), slot)
        };
        let ((def, disks), state) = (def, slot.state());
        let handle = match state {
            InstanceState::Running | InstanceState::Paused => slot.handle(),
            _ => None,
        }
        .ok_or_else(|| Error::InvalidState {
            name: def.name.clone(),
            state,
            hint: "a snapshot is taken of a running or paused instance; start it first",
        })?;
        let _taking = {
            let defs = lock(&self.snapshots.defs);
            let mut taking = lock(&self.snapshots.taking);
            if defs.iter().any(|d| d.name == spec.name) || taking.contains(&spec.name) {
                return Err(Error::AlreadyExists {
                    kind: Kind::Snapshot,
                    name: spec.name,
                });
            }
            taking.push(spec.name.clone());
            Taking(&self.snapshots.taking, spec.name.clone())
        };
        let id = Uuid::new_v4();
        let dir = self.snapshots.files(id);
        if spec.stop {
            // Paused first, so that it stays paused after the snapshot until it is stopped.
            handle
                .pause(PAUSE_TIMEOUT)
                .map_err(|e| Error::internal("pausing the instance", e))?;
        }
        let report = match handle.snapshot(&dir) {
            Ok(r) => r,
            Err(e) => {
                if spec.stop && state == InstanceState::Running {
                    handle.resume();
                }
                return Err(Error::internal("taking the snapshot", e));
            }
        };
        let guard = DirGuard(Some(dir.clone()));
        let (_, history) = slot.console.tail(crate::CONSOLE_RING as u64);
        std::fs::write(dir.join(CONSOLE_FILE), history)
            .map_err(|e| Error::internal("saving the console history", e))?;
        let snap = SnapshotDef {
            id,
            name: spec.name,
            description: spec.description,
            instance: def.id,
            instance_name: def.name.clone(),
            vcpus: def.vcpus,
            memory: def.memory,
            boot: def.boot.clone(),
            disks,
            network_interfaces: def.network_interfaces.clone(),
            memory_saved: report.memory_written,
            paused_us: report.paused_for.as_micros() as u64,
            created_at: now(),
        };
        self.store
            .save(&snap)
            .map_err(|e| Error::internal("saving the snapshot's definition", e))?;
        std::mem::forget(guard);
        lock(&self.snapshots.defs).push(snap.clone());
        tracing::info!(
            "snapshot {} of {}: paused {:?}, {} of {} bytes of memory written, disks copied in {:?}",
            snap.name,
            def.name,
            report.paused_for,
            report.memory_written,
            report.memory_total,
            report.disk_copy
        );
        if spec.stop {
            slot.set(InstanceState::Stopping, Some("snapshot taken".into()));
            slot.hard_stop();
        }
        Ok(self.snapshot_view(snap))
    }

    /// Deletes an instance snapshot; refused while disks made from it exist or an instance
    /// waits to be restored from it.
    pub fn delete_snapshot(&self, key: &str) -> Result<()> {
        let cat = lock(&self.catalog);
        let def = self.snapshots.find(key)?;
        let origin = Origin::Snapshot { snapshot: def.id };
        if let Some(d) = cat.disks.iter().find(|d| d.source == origin) {
            return Err(Error::InUse(format!(
                "snapshot {} is the base of disk {}; delete that disk first",
                def.name, d.name
            )));
        }
        if let Some(i) = cat.instances.iter().find(|i| i.restore == Some(def.id)) {
            return Err(Error::InUse(format!(
                "instance {} is to be restored from snapshot {}; start or delete it first",
                i.name, def.name
            )));
        }
        self.store
            .remove::<SnapshotDef>(def.id)
            .map_err(|e| Error::internal("removing the snapshot's definition", e))?;
        lock(&self.snapshots.defs).retain(|d| d.id != def.id);
        lock(&self.snapshots.loaded).remove(&def.id);
        lock(&self.snapshots.prepared).remove(&def.id);
        let _ = std::fs::remove_dir_all(self.snapshots.files(def.id));
        Ok(())
    }

    /// Creates instances from a snapshot: one, or `count` clones. Each gets its own disks
    /// (qcow2 overlays on the snapshot's disk copies); its first start restores the snapshot.
    /// The snapshot is checked first: a corrupt or foreign one is refused with nothing made.
    /// Blocks while the disks are made.
    pub fn restore(
        self: &Arc<Self>,
        spec: NewRestore,
    ) -> Result<Vec<(InstanceView, Option<Operation>)>> {
        let field = "source.snapshot";
        let snap = self
            .snapshots
            .find(&spec.snapshot)
            .map_err(|_| invalid(field, format!("no snapshot named {:?}", spec.snapshot)))?;
        let names: Vec<String> = match spec.count {
            None => vec![spec.name.clone()],
            Some(n) if (1..=MAX_CLONES).contains(&n) => {
                (1..=n).map(|i| format!("{}-{i}", spec.name)).collect()
            }
            Some(n) => {
                return Err(invalid(
                    "count",
                    format!("{n}: between 1 and {MAX_CLONES} clones per request"),
                ))
            }
        };
        let loaded = self.snapshots.load(&snap).map_err(|m| invalid(field, m))?;
        if spec.nics.len() > snap.network_interfaces.len() {
            return Err(invalid(
                "network_interfaces",
                format!(
                    "the snapshot has {} NICs; {} given",
                    snap.network_interfaces.len(),
                    spec.nics.len()
                ),
            ));
        }
        let mut planned = Vec::new();
        {
            let cat = lock(&self.catalog);
            if cat.image_by_id(snap.boot.kernel).is_none() {
                return Err(invalid(
                    field,
                    "the kernel image the snapshot's instance boots from is gone",
                ));
            }
            for (i, name) in names.iter().enumerate() {
                let field = if spec.count.is_some() {
                    "name (prefix)"
                } else {
                    "name"
                };
                cat.check_new_name(Kind::Instance, name)
                    .map_err(|e| e.in_field(""))
                    .map_err(|e| match e {
                        Error::InvalidValue { message, .. } => invalid(field, message),
                        e => e,
                    })?;
                let clone = spec.count.map(|_| i + 1);
                planned.push(self.plan_restored(&cat, &snap, &spec, name, clone)?);
            }
        }
        // The disks' files, removed again unless everything is recorded.
        let opts = self.open_options();
        let mut files = Vec::new();
        for (_, disks) in &planned {
            for (j, d) in disks.iter().enumerate() {
                let (base, _) = loaded
                    .disk_copy(j)
                    .ok_or_else(|| invalid(field, "the snapshot lacks a disk copy"))?;
                let path = self.store.disk_file(d);
                let guard = FileGuard::new(path.clone());
                images::create_overlay(&path, &base, Some(d.size), &opts)
                    .map_err(|e| Error::internal("making a disk on the snapshot", e))?;
                files.push(guard);
            }
        }
        {
            let mut cat = lock(&self.catalog);
            for (def, disks) in &planned {
                cat.check_new_name(Kind::Instance, &def.name)?;
                for d in disks {
                    cat.check_new_name(Kind::Disk, &d.name)?;
                }
            }
            let mut done: Vec<&InstanceDef> = Vec::new();
            for (def, disks) in &planned {
                let r = disks
                    .iter()
                    .try_for_each(|d| self.commit_disk(&mut cat, d))
                    .and_then(|()| {
                        self.store
                            .save(def)
                            .map_err(|e| Error::internal("saving the definition", e))
                    });
                if let Err(e) = r {
                    for d in planned.iter().flat_map(|(_, ds)| ds) {
                        let _ = self.remove_disk(&mut cat, d.id);
                    }
                    for def in done {
                        let _ = self.store.remove::<InstanceDef>(def.id);
                        cat.instances.retain(|i| i.id != def.id);
                        lock(&self.slots).remove(&def.id);
                    }
                    return Err(e);
                }
                cat.instances.push(def.clone());
                lock(&self.slots).insert(
                    def.id,
                    crate::runtime::Slot::new(def.id, self.events.clone()),
                );
                done.push(def);
            }
            files.into_iter().for_each(|f| f.keep());
        }
        let mut out = Vec::new();
        for (def, _) in &planned {
            self.events.push(
                Subject::InstanceState(def.id),
                InstanceState::Stopped.as_str(),
                Some(format!("created from snapshot {}", snap.name)),
            );
            let key = def.id.to_string();
            let op = if spec.start {
                Some(self.action(&key, ActionRequest::new(Action::Start))?)
            } else {
                None
            };
            out.push((self.get(&key)?, op));
        }
        Ok(out)
    }

    /// The definition of one instance restored from `snap`, and of its disks.
    fn plan_restored(
        &self,
        cat: &crate::catalog::Catalog,
        snap: &SnapshotDef,
        spec: &NewRestore,
        name: &str,
        clone: Option<usize>,
    ) -> Result<(InstanceDef, Vec<DiskDef>)> {
        let t = now();
        let disks: Vec<DiskDef> = snap
            .disks
            .iter()
            .enumerate()
            .map(|(j, d)| {
                let disk_name = format!("{name}-disk{j}");
                cat.check_new_name(Kind::Disk, &disk_name)
                    .map_err(|e| e.in_field("disks."))?;
                Ok(DiskDef {
                    id: Uuid::new_v4(),
                    name: disk_name,
                    description: format!("{} of snapshot {}", d.name, snap.name),
                    format: images::Format::Qcow2,
                    size: d.size,
                    block_size: d.block_size,
                    source: Origin::Snapshot { snapshot: snap.id },
                    created_at: t.clone(),
                    updated_at: t.clone(),
                    generation: 1,
                })
            })
            .collect::<Result<_>>()?;
        let nics = snap
            .network_interfaces
            .iter()
            .enumerate()
            .map(|(j, n)| {
                let change = spec.nics.get(j).cloned().unwrap_or_default();
                let mut host_tap = change.host_tap.unwrap_or_else(|| n.host_tap.clone());
                if let Some(i) = clone {
                    host_tap = format!("{host_tap}{i}");
                }
                devices::virtio::tap::check_name(&host_tap)
                    .map_err(|m| invalid(&format!("network_interfaces[{j}].host_tap"), m))?;
                let mac = match change.mac {
                    Some(m) if clone.is_none() => m,
                    _ if spec.fresh_mac || clone.is_some() => MacAddr::random(),
                    _ => n.mac,
                };
                Ok(Nic {
                    name: n.name.clone(),
                    host_tap,
                    mac,
                })
            })
            .collect::<Result<_>>()?;
        let def = InstanceDef {
            id: Uuid::new_v4(),
            name: name.into(),
            description: spec.description.clone(),
            vcpus: snap.vcpus,
            memory: snap.memory,
            boot: snap.boot.clone(),
            disks: disks
                .iter()
                .zip(&snap.disks)
                .map(|(d, s)| Attachment {
                    disk: d.id,
                    read_only: s.read_only,
                })
                .collect(),
            network_interfaces: nics,
            auto_start: spec.auto_start,
            restore: Some(snap.id),
            created_at: t.clone(),
            updated_at: t,
            generation: 1,
        };
        Ok((def, disks))
    }

    /// Starts an instance by restoring `snapshot` into a VM with the instance's disks and
    /// NICs (`config`): from a VM shell prepared ahead when there is one. Once it runs, its
    /// later starts boot the kernel. Blocks while the VM is built.
    pub(crate) fn launch_restored(
        &self,
        slot: &Arc<crate::runtime::Slot>,
        snapshot: Uuid,
        config: vmm::VmConfig,
        name: &str,
    ) -> std::result::Result<(), String> {
        let def = lock(&self.snapshots.defs)
            .iter()
            .find(|d| d.id == snapshot)
            .cloned()
            .ok_or("its snapshot was deleted")?;
        let loaded = self.snapshots.load(&def)?;
        let options = RestoreOptions {
            disks: config.disks.iter().map(|d| Some(d.path.clone())).collect(),
            nets: config
                .nets
                .iter()
                .map(|n| {
                    Some(NetConfig {
                        tap: n.tap.clone(),
                        mac: n.mac,
                    })
                })
                .collect(),
        };
        if slot.console.bounds().1 == 0 {
            if let Ok(history) = std::fs::read(self.snapshots.files(def.id).join(CONSOLE_FILE)) {
                use std::io::Write;
                let _ = slot.console.clone().write_all(&history);
            }
        }
        let prepared = lock(&self.snapshots.prepared).remove(&def.id);
        let host = self.host.clone();
        let start = Instant::now();
        let fast = prepared.is_some();
        slot.launch_with(name, |console| {
            match prepared {
                Some(p) => Vm::restore_prepared(host, p, &options, console),
                None => Vm::restore(host, loaded.clone(), &options, console),
            }
            .map_err(|e| e.to_string())
        })?;
        // The VM reports its boot (its vCPUs running with the saved state) from its thread.
        let built = start.elapsed();
        // Called on the blocking pool (never on a runtime thread), so it may wait on the
        // state's watch here.
        self.runtime
            .block_on(slot.wait_while(Duration::from_secs(1), |s| s == InstanceState::Starting));
        tracing::info!(
            "instance {name} restored from snapshot {} ({}): VM built in {} us, running after {} us",
            def.name,
            if fast { "prepared shell" } else { "cold" },
            built.as_micros(),
            start.elapsed().as_micros()
        );
        {
            let mut cat = lock(&self.catalog);
            if let Some(d) = cat.instances.iter_mut().find(|d| d.id == slot.id()) {
                d.restore = None;
                if let Err(e) = self.store.save(&*d) {
                    tracing::warn!("saving the definition of {name}: {e}");
                }
            }
        }
        // The next restore of this snapshot need not wait for KVM to register memory.
        let (host, prepared, id) = (self.host.clone(), self.snapshots.prepared.clone(), def.id);
        let preparing = self.snapshots.preparing.clone();
        if lock(&prepared).contains_key(&id) || !lock(&preparing).insert(id) {
            return Ok(());
        }
        let spawned = std::thread::Builder::new()
            .name("kiln-prepare".into())
            .spawn(move || {
                match PreparedVm::new(&host, loaded) {
                    Ok(p) => {
                        lock(&prepared).entry(id).or_insert(p);
                    }
                    Err(e) => tracing::warn!("preparing a restore: {e}"),
                }
                lock(&preparing).remove(&id);
            });
        if spawned.is_err() {
            lock(&self.snapshots.preparing).remove(&id);
        }
        Ok(())
    }
}

use crate::instances::InstanceView;

/// Removes a snapshot directory unless forgotten.
struct DirGuard(Option<PathBuf>);

impl Drop for DirGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
}
