//! Kiln's control plane: every instance, disk and image of the host, between the VM (`vmm`)
//! and the REST API (`api`). Nothing here knows HTTP: the API names resources, renders
//! revisions as ETags and owns the wire types.
//!
//! - [`catalog`](crate::catalog): the definitions, under one lock, kept by one store;
//!   definitions refer to each other by id and names are derived;
//! - [`lifecycle`]: the state machine as a pure transition table;
//! - `runtime`: booting and joining VMs, console pipes; the state of each instance;
//! - `vm_config`: the one conversion from a definition to a `VmConfig`;
//! - [`operations`], [`events`], [`console`]: what clients poll or wait on (woken by async
//!   notification, no thread per waiter); operations run on a bounded pool;
//! - `instances`, `disks`, `images`: the [`Manager`]'s calls, by resource.
//!
//! Calls that may take long (disk copies and imports, a forced delete) block: call them off
//! the async workers (`spawn_blocking`). They never hold the catalog's lock while they copy,
//! build or tear down.

#![warn(missing_docs)]

mod catalog;
pub mod console;
mod disk_snapshots;
mod disks;
mod error;
pub mod events;
mod images;
mod instances;
mod legacy;
pub mod lifecycle;
mod model;
pub mod operations;
mod runtime;
mod shells;
mod snapshots;
mod spec;
mod store;
mod vm_config;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use devices::bus::lock;
use uuid::Uuid;
use vmm::Host;

pub use console::{ConsoleRing, CONSOLE_RING};
pub use disk_snapshots::DiskSnapshotView;
pub use disks::DiskView;
pub use error::{Error, Kind, Result};
pub use events::{Event, EventLog, Subject};
pub use instances::{AttachedDisk, DeviceCounters, InstanceView};
pub use lifecycle::{Action, InstanceState};
pub use model::{
    check_name, Attachment, Boot, DiskDef, Image, ImageKind, InstanceDef, Nic, Origin, Revision,
    PROBE_IMAGE, PROBE_IMAGE_ID,
};
pub use operations::{Operation, OperationState, Operations};
pub use runtime::Status;
pub use snapshots::{
    NewRestore, NewSnapshot, RestoreNic, SnapshotDef, SnapshotDisk, SnapshotView, MAX_CLONES,
};
pub use spec::{
    ActionRequest, DiskChanges, DiskChoice, InstanceChanges, NewDisk, NewImage, NewInstance,
    NewNic, SourceRef, DEFAULT_STOP_TIMEOUT,
};

use catalog::Catalog;
use legacy::StoredInstance;
use runtime::Slot;
use store::Store;

/// Every instance, disk and image of the host.
pub struct Manager {
    host: Arc<Host>,
    probe: bytes::Bytes,
    store: Store,
    /// Directories images may be registered from (resolved).
    image_dirs: Vec<PathBuf>,
    catalog: Mutex<Catalog>,
    /// The runtime of each instance, by id. Taken after `catalog` when both are held.
    slots: Mutex<HashMap<Uuid, Arc<Slot>>>,
    events: Arc<EventLog>,
    operations: Arc<Operations>,
    /// Where operations run.
    runtime: tokio::runtime::Handle,
    /// Instance snapshots.
    snapshots: snapshots::Snapshots,
    /// VM shells built ahead of starts (none unless asked for).
    shells: Arc<shells::ShellPool>,
}

impl Manager {
    /// Loads the definitions in `state_dir` (every instance `stopped`) and starts those with
    /// `auto_start`. `probe` is the image `kiln-probe`; images may be registered from files in
    /// `image_dirs`. Operations run on `runtime`.
    pub fn open(
        host: Arc<Host>,
        state_dir: &Path,
        image_dirs: &[PathBuf],
        probe: bytes::Bytes,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Self>> {
        let m = Self::load(host, state_dir, image_dirs, probe, runtime)?;
        m.start_auto();
        Ok(m)
    }

    /// [`Manager::open`] without starting anything: the state directory is locked, swept of
    /// what a killed daemon left and loaded; [`Manager::start_auto`] starts the instances.
    pub fn load(
        host: Arc<Host>,
        state_dir: &Path,
        image_dirs: &[PathBuf],
        probe: bytes::Bytes,
        runtime: tokio::runtime::Handle,
    ) -> Result<Arc<Self>> {
        let state_err = |e: std::io::Error| {
            Error::internal(&format!("state directory {}", state_dir.display()), e)
        };
        let store = Store::open(state_dir).map_err(state_err)?;
        let mut resolved = Vec::new();
        for d in image_dirs {
            resolved.push(
                d.canonicalize()
                    .map_err(|e| error::invalid("image-dir", format!("{}: {e}", d.display())))?,
            );
        }
        let disks = store
            .load_all(|d: &DiskDef| &d.created_at)
            .map_err(state_err)?;
        let mut all_images = vec![crate::images::probe_image(probe.len() as u64)];
        all_images.extend(
            store
                .load_all(|i: &Image| &i.created_at)
                .map_err(state_err)?,
        );
        let instances: Vec<InstanceDef> = store
            .load_all(StoredInstance::created_at)
            .map_err(state_err)?
            .into_iter()
            .filter_map(|s| match s {
                StoredInstance::Current(d) => Some(d),
                StoredInstance::Legacy(old) => {
                    let def = old.convert(&all_images)?;
                    if let Err(e) = store.save(&def) {
                        tracing::warn!("rewriting the definition of {}: {e}", def.name);
                    }
                    Some(def)
                }
            })
            .collect();
        let mut named: Vec<PathBuf> = disks.iter().map(|d| store.disk_file(d)).collect();
        for i in &all_images {
            named.extend(i.path.clone());
            if i.uploaded {
                named.push(store.upload_file(i.id));
            }
        }
        store.sweep_orphans(&named);
        let snapshots = snapshots::Snapshots::open(&store).map_err(state_err)?;
        let events = Arc::new(EventLog::default());
        for (id, name) in instances
            .iter()
            .map(|d| (d.id, &d.name))
            .chain(disks.iter().map(|d| (d.id, &d.name)))
            .chain(all_images.iter().map(|i| (i.id, &i.name)))
        {
            events.name(id, name);
        }
        let slots = instances
            .iter()
            .map(|d| {
                let slot = Slot::new(d.id, events.clone());
                keep_console(&store, &slot);
                (d.id, slot)
            })
            .collect();
        let m = Arc::new(Self {
            host,
            probe,
            store,
            image_dirs: resolved,
            catalog: Mutex::new(Catalog::new(instances, disks, all_images)),
            slots: Mutex::new(slots),
            events,
            operations: Arc::default(),
            runtime,
            snapshots,
            shells: Arc::default(),
        });
        Ok(m)
    }

    /// Keeps `n` VM shells ready (built in the background) so that an instance's start does
    /// not wait for KVM to register its memory; 0 keeps none.
    pub fn keep_vm_shells(&self, n: usize) {
        self.shells.resize(&self.host, n);
    }

    /// VM shells ready now, by memory size in bytes.
    pub fn vm_shells_ready(&self) -> Vec<(u64, usize)> {
        self.shells.ready()
    }

    /// Starts every instance with `auto_start`.
    pub fn start_auto(self: &Arc<Self>) {
        let auto: Vec<Uuid> = lock(&self.catalog)
            .instances
            .iter()
            .filter(|d| d.auto_start)
            .map(|d| d.id)
            .collect();
        for id in auto {
            if let Err(e) = self.action(&id.to_string(), ActionRequest::new(Action::Start)) {
                tracing::warn!("auto-start of {id}: {e}");
            }
        }
    }

    /// State changes and operation updates.
    pub fn events(&self) -> &EventLog {
        &self.events
    }

    /// Long actions.
    pub fn operations(&self) -> &Operations {
        &self.operations
    }

    /// Stops every instance (process shutdown): guests that listen to the ACPI power button
    /// get it and up to `grace` to power off; the others, and those still running then, are
    /// stopped hard. Blocks.
    pub fn shutdown(&self, grace: Duration) {
        let slots: Vec<_> = lock(&self.slots).values().cloned().collect();
        let mut asked = Vec::new();
        let mut at_once = 0;
        for s in &slots {
            let Some(h) = s.handle() else { continue };
            h.resume();
            if h.listens_to_power_button() && h.press_power_button().is_ok() {
                asked.push(s.clone());
            } else {
                h.stop();
                at_once += 1;
            }
        }
        let end = std::time::Instant::now() + grace;
        while asked.iter().any(|s| !s.vm_ended()) && std::time::Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        let late = asked.iter().filter(|s| !s.vm_ended()).count();
        for s in &slots {
            s.hard_stop();
        }
        tracing::info!(
            "shutdown: {} guest(s) powered off on the power button, {at_once} stopped at once \
             (not listening to it), {late} stopped hard after {} s",
            asked.len() - late,
            grace.as_secs()
        );
    }

    /// The runtime of the instance with this id.
    fn slot(&self, id: Uuid) -> Result<Arc<Slot>> {
        lock(&self.slots)
            .get(&id)
            .cloned()
            .ok_or_else(|| Error::not_found(Kind::Instance, id.to_string()))
    }

    /// How disk files are opened: backing files only in the state's and the image directories.
    fn open_options(&self) -> ::images::OpenOptions {
        let mut allowed = vec![
            self.store.images_dir(),
            self.store.disks_dir(),
            self.snapshots.dir(),
        ];
        allowed.extend(self.image_dirs.iter().cloned());
        ::images::OpenOptions {
            allowed_dirs: allowed,
            ..Default::default()
        }
    }
}

/// Backs an instance's console history with its file in the state directory (a failure is
/// logged: the history is then kept in memory only).
fn keep_console(store: &Store, slot: &Slot) {
    let path = store.console_file(slot.id());
    if let Err(e) = slot.console.persist(&path) {
        tracing::warn!("console history {}: {e}", path.display());
    }
}
