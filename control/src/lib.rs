//! Kiln's control plane: every instance of the host, their state machine, console history,
//! events and operations, and their definitions in the state directory.

#![warn(missing_docs)]
mod console;
mod disks;
mod events;
mod images;
mod model;
mod operations;
mod store;

use std::fs::File;
use std::os::fd::FromRawFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::lock;
use uuid::Uuid;

pub use console::{ConsoleRing, CONSOLE_RING};
pub use disks::{Disk, DiskCreate, DiskDef, DiskPatch, DiskSource};
pub use events::{Event, EventLog};
pub use images::{Image, ImageCreate, ImageKind, PROBE_IMAGE_ID};
pub use model::{
    check_name, Action, ActionKind, AttachedDisk, BootSpec, DiskSpec, ExistingDisk, Instance,
    InstanceCreate, InstanceDef, InstancePatch, InstanceState, NewDisk, Nic, NicSpec, Size,
};
pub use operations::{Operation, OperationState, Operations};

use model::now;
use store::Store;
use vmm::config::{DiskConfig, KernelImage, MacAddr, NetConfig, VmConfig};
use vmm::host::Host;
use vmm::vm::{Console, Exit, Vm, VmEvent, VmHandle};

/// The image that is always there: the probe guest built into kiln.
pub const PROBE_IMAGE: &str = "kiln-probe";

/// Why a manager call was refused (each maps onto one API error code).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManagerError {
    /// No such resource.
    #[error("{0} {1} not found")]
    NotFound(&'static str, String),
    /// The action does not fit the current state.
    #[error("instance {name} is {state}; {hint}")]
    InvalidState {
        /// Instance name.
        name: String,
        /// Its state.
        state: InstanceState,
        /// What to do.
        hint: &'static str,
    },
    /// The name is taken (kind, name).
    #[error("{0} {1:?} already exists; pick another name")]
    AlreadyExists(&'static str, String),
    /// The resource is used by another one.
    #[error("{0}")]
    InUse(String),
    /// A field has a bad value.
    #[error("{field}: {message}")]
    InvalidValue {
        /// The field, dotted (`boot.kernel`).
        field: String,
        /// What is wrong.
        message: String,
    },
    /// More than the host can give.
    #[error("{0}")]
    InsufficientCapacity(String),
    /// `If-Match` does not match.
    #[error("the instance changed since you read it (ETag {0})")]
    PreconditionFailed(String),
    /// Something failed on the host.
    #[error("{0}")]
    Internal(String),
}

fn invalid(field: &str, message: impl Into<String>) -> ManagerError {
    ManagerError::InvalidValue {
        field: field.into(),
        message: message.into(),
    }
}

struct Runtime {
    state: InstanceState,
    reason: Option<String>,
    started_at: Option<String>,
    handle: Option<VmHandle>,
    thread: Option<JoinHandle<()>>,
    /// The write end of the serial input pipe (non-blocking), shared so that writers
    /// never hold `rt` while they write.
    input: Option<Arc<File>>,
}

struct Entry {
    def: Mutex<InstanceDef>,
    rt: Mutex<Runtime>,
    changed: Condvar,
    console: ConsoleRing,
}

impl Entry {
    /// A stopped instance with an empty console.
    fn new(def: InstanceDef) -> Self {
        Self {
            def: Mutex::new(def),
            rt: Mutex::new(Runtime {
                state: InstanceState::Stopped,
                reason: None,
                started_at: None,
                handle: None,
                thread: None,
                input: None,
            }),
            changed: Condvar::new(),
            console: ConsoleRing::default(),
        }
    }

    fn view(&self) -> Instance {
        let def = lock(&self.def).clone();
        let rt = lock(&self.rt);
        Instance {
            def,
            state: rt.state,
            state_reason: rt.reason.clone(),
            started_at: rt.started_at.clone(),
        }
    }

    fn resource(&self) -> String {
        format!("/v1/instances/{}", lock(&self.def).id)
    }

    /// Waits while `busy(state)`, at most `timeout`.
    fn wait_while(
        &self,
        timeout: Duration,
        busy: impl Fn(InstanceState) -> bool,
    ) -> MutexGuard<'_, Runtime> {
        let rt = lock(&self.rt);
        self.changed
            .wait_timeout_while(rt, timeout, |rt| busy(rt.state))
            .unwrap_or_else(|e| e.into_inner())
            .0
    }
}

/// The counters of one device of a running instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceCounters {
    /// `block` or `net`.
    pub kind: &'static str,
    /// The disk's or NIC's name.
    pub device: String,
    /// (counter, value): `requests`, `errors`, `read_bytes`, `write_bytes` for disks;
    /// `rx_frames`, `tx_frames`, `dropped` for NICs.
    pub counters: Vec<(&'static str, u64)>,
}

/// Where the manager keeps its files.
struct Dirs {
    /// `<state>/disks`: disk files and their definitions.
    disks: PathBuf,
    /// `<state>/images`: uploaded images and every image definition.
    images: PathBuf,
    /// Directories images may be registered from (resolved).
    image_dirs: Vec<PathBuf>,
}

/// Every instance of the host.
pub struct Manager {
    host: Arc<Host>,
    probe: Arc<[u8]>,
    store: Store,
    entries: Mutex<Vec<Arc<Entry>>>,
    dirs: Dirs,
    disk_store: Store,
    disks: Mutex<Vec<DiskDef>>,
    image_store: Store,
    images: Mutex<Vec<Image>>,
    /// Serialises changes to definitions (names, attachments), so checks and writes agree.
    changes: Mutex<()>,
    /// State changes and operation updates.
    pub events: EventLog,
    /// Long actions.
    pub operations: Operations,
}

/// How long a start may take to reach `running`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

impl Manager {
    /// Loads the definitions in `state_dir` (every instance `stopped`) and starts those with
    /// `auto_start`. `probe` is the image `kiln-probe`; images may be registered from files
    /// in `image_dirs`.
    pub fn open(
        host: Arc<Host>,
        state_dir: &Path,
        image_dirs: &[PathBuf],
        probe: Arc<[u8]>,
    ) -> Result<Arc<Self>, ManagerError> {
        let state_err = |e: std::io::Error| {
            ManagerError::Internal(format!("state directory {}: {e}", state_dir.display()))
        };
        let store = Store::open(&state_dir.join("instances")).map_err(state_err)?;
        let disk_store = Store::open(&state_dir.join("disks")).map_err(state_err)?;
        let image_store = Store::open(&state_dir.join("images")).map_err(state_err)?;
        let mut resolved = Vec::new();
        for d in image_dirs {
            resolved.push(d.canonicalize().map_err(|e| ManagerError::InvalidValue {
                field: "image-dir".into(),
                message: format!("{}: {e}", d.display()),
            })?);
        }
        let dirs = Dirs {
            disks: state_dir.join("disks").canonicalize().map_err(state_err)?,
            images: state_dir.join("images").canonicalize().map_err(state_err)?,
            image_dirs: resolved,
        };
        for dir in [&dirs.disks, &dirs.images, &state_dir.join("instances")] {
            sweep_leftovers(dir);
        }
        let defs: Vec<InstanceDef> = store.load_all().map_err(state_err)?;
        let disks: Vec<DiskDef> = disk_store.load_all().map_err(state_err)?;
        let images: Vec<Image> = image_store.load_all().map_err(state_err)?;
        let m = Arc::new(Self {
            host,
            probe,
            store,
            entries: Mutex::new(Vec::new()),
            dirs,
            disk_store,
            disks: Mutex::new(sorted(disks, |d| d.created_at.clone())),
            image_store,
            images: Mutex::new(sorted(images, |i| i.created_at.clone())),
            changes: Mutex::new(()),
            events: EventLog::default(),
            operations: Operations::default(),
        });
        let mut auto = Vec::new();
        for def in sorted(defs, |d| d.created_at.clone()) {
            if def.auto_start {
                auto.push(def.id.to_string());
            }
            lock(&m.entries).push(Arc::new(Entry::new(def)));
        }
        for id in auto {
            if let Err(e) = m.action(
                &id,
                Action {
                    action: ActionKind::Start,
                    force: false,
                    timeout_s: 30,
                },
            ) {
                tracing::warn!("auto-start of {id}: {e}");
            }
        }
        Ok(m)
    }

    fn find(&self, key: &str) -> Result<Arc<Entry>, ManagerError> {
        let entries = lock(&self.entries);
        entries
            .iter()
            .find(|e| {
                let d = lock(&e.def);
                d.name == key || d.id.to_string() == key
            })
            .cloned()
            .ok_or_else(|| ManagerError::NotFound("instance", key.into()))
    }

    /// Every instance, oldest first.
    pub fn list(&self) -> Vec<Instance> {
        lock(&self.entries).iter().map(|e| e.view()).collect()
    }

    /// One instance, by id or name.
    pub fn get(&self, key: &str) -> Result<Instance, ManagerError> {
        Ok(self.find(key)?.view())
    }

    /// Checks `spec` and builds the definition of a new instance.
    fn definition(&self, spec: &InstanceCreate) -> Result<InstanceDef, ManagerError> {
        check_name(&spec.name).map_err(|m| invalid("name", m))?;
        if spec.vcpus == 0 {
            return Err(invalid("vcpus", "must be at least 1"));
        }
        if spec.vcpus > u32::from(self.host.max_vcpus) {
            return Err(ManagerError::InsufficientCapacity(format!(
                "{} vCPUs requested; this host allows at most {}",
                spec.vcpus, self.host.max_vcpus
            )));
        }
        let memory = spec.memory.bytes().map_err(|m| invalid("memory", m))?;
        if memory < boot::layout::MIN_MEMORY {
            return Err(invalid(
                "memory",
                format!("at least {} MiB", boot::layout::MIN_MEMORY >> 20),
            ));
        }
        if memory > self.host.memory {
            return Err(ManagerError::InsufficientCapacity(format!(
                "{} MiB of memory requested; the host has {} MiB",
                memory >> 20,
                self.host.memory >> 20
            )));
        }
        self.kernel(&spec.boot.kernel)?;
        if let Some(i) = &spec.boot.initrd {
            self.initrd(i)?;
        }
        if spec.disks.len() + spec.network_interfaces.len() > vmm::config::MAX_VIRTIO_DEVICES {
            return Err(invalid(
                "disks",
                format!(
                    "at most {} disks and NICs together",
                    vmm::config::MAX_VIRTIO_DEVICES
                ),
            ));
        }
        let mut nics = Vec::new();
        for (i, n) in spec.network_interfaces.iter().enumerate() {
            let field = |f: &str| format!("network_interfaces[{i}].{f}");
            let mac = match &n.mac {
                Some(m) => m
                    .parse::<MacAddr>()
                    .map_err(|e| invalid(&field("mac"), e))?,
                None => MacAddr::random(),
            };
            let ok = !n.host_tap.is_empty()
                && n.host_tap.len() <= 15
                && !n.host_tap.contains(['/', ' ']);
            if !ok {
                return Err(invalid(
                    &field("host_tap"),
                    "1-15 characters, no '/' or spaces",
                ));
            }
            nics.push(Nic {
                name: n.name.clone().unwrap_or_else(|| format!("eth{i}")),
                host_tap: n.host_tap.clone(),
                mac: mac.to_string(),
            });
        }
        let t = now();
        Ok(InstanceDef {
            id: Uuid::new_v4(),
            name: spec.name.clone(),
            description: spec.description.clone(),
            vcpus: spec.vcpus as u8,
            memory,
            boot: spec.boot.clone(),
            disks: Vec::new(),
            network_interfaces: nics,
            auto_start: spec.auto_start,
            created_at: t.clone(),
            updated_at: t,
            generation: 1,
        })
    }

    /// The image of `kind` named `key`, for the field `field`.
    fn boot_image(&self, key: &str, kind: ImageKind, field: &str) -> Result<Image, ManagerError> {
        let img = self
            .image(key)
            .map_err(|_| invalid(field, format!("no image named {key:?}; see GET /v1/images")))?;
        if img.kind != kind {
            return Err(invalid(
                field,
                format!("image {} is a {}, not a {kind}", img.name, img.kind),
            ));
        }
        Ok(img)
    }

    fn kernel(&self, key: &str) -> Result<KernelImage, ManagerError> {
        let img = self.boot_image(key, ImageKind::Kernel, "boot.kernel")?;
        Ok(match img.path {
            None => KernelImage::Bytes(self.probe.clone()),
            Some(p) => KernelImage::File(p),
        })
    }

    fn initrd(&self, key: &str) -> Result<PathBuf, ManagerError> {
        let img = self.boot_image(key, ImageKind::Initrd, "boot.initrd")?;
        img.path
            .ok_or_else(|| invalid("boot.initrd", format!("image {} has no file", img.name)))
    }

    /// Resolves the disks of a create request: existing ones must be free; new ones are made
    /// (and returned, so that they can be removed if the instance is not created).
    fn resolve_disks(
        &self,
        spec: &[DiskSpec],
        made: &mut Vec<Uuid>,
    ) -> Result<Vec<AttachedDisk>, ManagerError> {
        let mut out: Vec<AttachedDisk> = Vec::new();
        for (i, d) in spec.iter().enumerate() {
            let a = match d {
                DiskSpec::Existing(e) => {
                    let disk = self.disk(&e.disk).map_err(|_| {
                        invalid(
                            &format!("disks[{i}].disk"),
                            format!("no disk named {:?}", e.disk),
                        )
                    })?;
                    if let Some(inst) = disk.attached_to {
                        return Err(ManagerError::InUse(format!(
                            "disk {} is already attached to instance {inst}",
                            disk.def.name
                        )));
                    }
                    AttachedDisk {
                        id: disk.def.id,
                        disk: disk.def.name,
                        read_only: e.read_only,
                    }
                }
                DiskSpec::Create(n) => {
                    let disk =
                        self.create_disk_locked(n.create.clone(), &format!("disks[{i}].create."))?;
                    made.push(disk.def.id);
                    AttachedDisk {
                        id: disk.def.id,
                        disk: disk.def.name,
                        read_only: n.read_only,
                    }
                }
            };
            if out.iter().any(|x| x.id == a.id) {
                return Err(invalid(
                    &format!("disks[{i}]"),
                    format!("disk {} is listed twice", a.disk),
                ));
            }
            out.push(a);
        }
        Ok(out)
    }

    /// Refuses unless the instance is stopped or failed; `hint` says what to do.
    fn check_stopped(&self, e: &Entry, hint: &'static str) -> Result<(), ManagerError> {
        let state = lock(&e.rt).state;
        if matches!(state, InstanceState::Stopped | InstanceState::Failed) {
            Ok(())
        } else {
            Err(ManagerError::InvalidState {
                name: lock(&e.def).name.clone(),
                state,
                hint,
            })
        }
    }

    /// Saves a changed definition (bumping its generation) and makes it current.
    fn save_instance(&self, e: &Entry, mut def: InstanceDef) -> Result<(), ManagerError> {
        def.generation += 1;
        def.updated_at = now();
        self.store
            .save(def.id, &def)
            .map_err(|err| ManagerError::Internal(format!("saving the definition: {err}")))?;
        let resource = format!("/v1/instances/{}", def.id);
        *lock(&e.def) = def;
        self.events.push(
            "instance.updated",
            resource,
            lock(&e.rt).state.to_string(),
            None,
        );
        Ok(())
    }

    /// Changes an instance's name, description or auto-start; vCPUs and memory only while it
    /// is stopped. With `if_match`, only when the ETag still matches.
    pub fn patch(
        &self,
        key: &str,
        patch: InstancePatch,
        if_match: Option<&str>,
    ) -> Result<Instance, ManagerError> {
        let _changes = lock(&self.changes);
        let e = self.find(key)?;
        let cur = e.view();
        model::check_if_match(if_match, &cur.etag())?;
        let mut def = cur.def.clone();
        if let Some(name) = patch.name {
            if name != def.name {
                check_name(&name).map_err(|m| invalid("name", m))?;
                if lock(&self.entries)
                    .iter()
                    .any(|x| lock(&x.def).name == name)
                {
                    return Err(ManagerError::AlreadyExists("instance", name));
                }
                def.name = name;
            }
        }
        if let Some(d) = patch.description {
            def.description = d;
        }
        if let Some(a) = patch.auto_start {
            def.auto_start = a;
        }
        if patch.vcpus.is_some() || patch.memory.is_some() {
            self.check_stopped(&e, "vcpus and memory change only while it is stopped")?;
            let probe = InstanceCreate {
                name: def.name.clone(),
                description: String::new(),
                vcpus: patch.vcpus.unwrap_or(u32::from(def.vcpus)),
                memory: patch.memory.clone().unwrap_or(Size::Bytes(def.memory)),
                boot: def.boot.clone(),
                disks: Vec::new(),
                network_interfaces: Vec::new(),
                auto_start: false,
                start: false,
            };
            let checked = self.definition(&probe)?;
            def.vcpus = checked.vcpus;
            def.memory = checked.memory;
        }
        self.save_instance(&e, def)?;
        Ok(e.view())
    }

    /// Creates an instance (stopped); with `start` it also starts it and returns the operation.
    pub fn create(
        self: &Arc<Self>,
        spec: InstanceCreate,
    ) -> Result<(Instance, Option<Operation>), ManagerError> {
        let mut def = self.definition(&spec)?;
        {
            let _changes = lock(&self.changes);
            if lock(&self.entries)
                .iter()
                .any(|e| lock(&e.def).name == def.name)
            {
                return Err(ManagerError::AlreadyExists("instance", def.name));
            }
            // Disks made for this instance are removed again if it cannot be created.
            let mut made = Vec::new();
            let r = self
                .resolve_disks(&spec.disks, &mut made)
                .and_then(|disks| {
                    def.disks = disks;
                    self.store
                        .save(def.id, &def)
                        .map_err(|e| ManagerError::Internal(format!("saving the definition: {e}")))
                });
            if let Err(e) = r {
                for id in made {
                    let _ = self.delete_disk_locked(&id.to_string());
                }
                return Err(e);
            }
            lock(&self.entries).push(Arc::new(Entry::new(def.clone())));
        }
        let key = def.id.to_string();
        self.events.push(
            "instance.state",
            format!("/v1/instances/{key}"),
            "stopped".into(),
            Some("created".into()),
        );
        let op = if spec.start {
            Some(self.action(
                &key,
                Action {
                    action: ActionKind::Start,
                    force: false,
                    timeout_s: 30,
                },
            )?)
        } else {
            None
        };
        Ok((self.get(&key)?, op))
    }

    /// Deletes a stopped or failed instance; `force` hard-stops a running one first.
    pub fn delete(&self, key: &str, force: bool) -> Result<(), ManagerError> {
        // Under the same lock as actions: no start slips in between the check and the removal.
        let _changes = lock(&self.changes);
        let e = self.find(key)?;
        let state = lock(&e.rt).state;
        if !matches!(state, InstanceState::Stopped | InstanceState::Failed) {
            if !force {
                return Err(ManagerError::InvalidState {
                    name: lock(&e.def).name.clone(),
                    state,
                    hint: "stop it first, or delete with force",
                });
            }
            self.hard_stop(&e);
        }
        let id = lock(&e.def).id;
        self.store
            .remove(id)
            .map_err(|e| ManagerError::Internal(format!("removing the definition: {e}")))?;
        lock(&self.entries).retain(|x| !Arc::ptr_eq(x, &e));
        self.events.push(
            "instance.state",
            format!("/v1/instances/{id}"),
            "deleted".into(),
            None,
        );
        Ok(())
    }

    /// The console history of an instance from `from` (or the last `tail` bytes).
    pub fn console(&self, key: &str) -> Result<ConsoleRing, ManagerError> {
        Ok(self.find(key)?.console.clone())
    }

    /// The counters of a running instance's devices: (kind `block` or `net`, disk or NIC name,
    /// counters). Empty when it is not running; they restart from zero at every boot.
    pub fn device_counters(&self, key: &str) -> Vec<DeviceCounters> {
        let Ok(e) = self.find(key) else {
            return Vec::new();
        };
        let handle = lock(&e.rt).handle.clone();
        let Some(counters) = handle.and_then(|h| h.device_counters().ok()) else {
            return Vec::new();
        };
        let def = lock(&e.def).clone();
        let names = def.disks.iter().map(|d| ("block", d.disk.clone())).chain(
            def.network_interfaces
                .iter()
                .map(|n| ("net", n.name.clone())),
        );
        names
            .zip(counters)
            .map(|((kind, device), counters)| DeviceCounters {
                kind,
                device,
                counters,
            })
            .collect()
    }

    /// Sends bytes to a running instance's serial port.
    pub fn console_input(&self, key: &str, bytes: &[u8]) -> Result<(), ManagerError> {
        use std::io::Write;
        let e = self.find(key)?;
        let (input, state) = {
            let rt = lock(&e.rt);
            (rt.input.clone(), rt.state)
        };
        let Some(f) = input else {
            return Err(ManagerError::InvalidState {
                name: lock(&e.def).name.clone(),
                state,
                hint: "start it first",
            });
        };
        // The pipe is non-blocking: a guest that does not read its serial port (or is
        // paused) fills it, and the writer gets an error instead of hanging.
        (&*f).write_all(bytes).map_err(|err| match err.kind() {
            std::io::ErrorKind::WouldBlock => ManagerError::InUse(
                "the guest is not reading its serial console; input not sent".into(),
            ),
            _ => ManagerError::Internal(format!("console input: {err}")),
        })
    }

    fn set_state(&self, e: &Entry, state: InstanceState, reason: Option<String>) {
        {
            let mut rt = lock(&e.rt);
            rt.state = state;
            rt.reason = reason.clone();
        }
        e.changed.notify_all();
        self.events
            .push("instance.state", e.resource(), state.to_string(), reason);
    }

    /// Starts an action; the returned operation ends when the instance reached its target.
    pub fn action(self: &Arc<Self>, key: &str, action: Action) -> Result<Operation, ManagerError> {
        use ActionKind::*;
        use InstanceState::*;
        // Checking the state and moving it happen under the definitions lock, which every
        // other change (delete, attach, PATCH) takes too: two starts cannot both pass.
        let _changes = lock(&self.changes);
        let e = self.find(key)?;
        let state = lock(&e.rt).state;
        let (fits, hint) = match action.action {
            Start => (
                matches!(state, Stopped | Failed),
                "it is already running; stop it first",
            ),
            Stop => (
                matches!(state, Running | Paused),
                "only a running or paused instance can stop",
            ),
            Reboot | Reset => (
                state == Running,
                "only a running instance can reboot or reset",
            ),
            Pause => (state == Running, "only a running instance can pause"),
            Resume => (state == Paused, "only a paused instance can resume"),
        };
        if !fits {
            return Err(ManagerError::InvalidState {
                name: lock(&e.def).name.clone(),
                state,
                hint,
            });
        }
        let kind = format!(
            "instance.{}",
            serde_json::to_value(action.action)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default()
        );
        let op = self.operations.begin(&kind, e.resource());
        // The state moves now, so that a second conflicting action is refused at once.
        match action.action {
            Start => self.set_state(&e, Starting, None),
            Stop => self.set_state(&e, Stopping, None),
            Reboot => self.set_state(&e, Rebooting, None),
            _ => {}
        }
        let (m, id) = (self.clone(), op.id);
        std::thread::spawn(move || {
            let r = m.perform(&e, action);
            m.operations.end(id, r.clone());
            m.events.push(
                "operation",
                format!("/v1/operations/{id}"),
                if r.is_ok() { "succeeded" } else { "failed" }.into(),
                r.err(),
            );
        });
        Ok(op)
    }

    fn perform(self: &Arc<Self>, e: &Arc<Entry>, action: Action) -> Result<(), String> {
        use ActionKind::*;
        let handle = lock(&e.rt).handle.clone();
        match action.action {
            Start => self.boot(e),
            Stop => {
                let h = handle.ok_or("not running")?;
                if action.force {
                    h.stop();
                } else {
                    h.resume();
                    let _ = h.press_power_button();
                    let stopped = e.wait_while(Duration::from_secs(action.timeout_s), |s| {
                        s == InstanceState::Stopping
                    });
                    let done = stopped.state != InstanceState::Stopping;
                    drop(stopped);
                    if !done {
                        tracing::info!(
                            "graceful stop timed out after {} s: hard stop",
                            action.timeout_s
                        );
                        h.stop();
                    }
                }
                self.join(e);
                Ok(())
            }
            Reboot if action.force => {
                handle
                    .ok_or("not running")?
                    .reset()
                    .map_err(|e| e.to_string())?;
                self.wait_running(e)
            }
            Reboot => {
                // A graceful reboot: the guest shuts down on the power button, then boots again.
                let h = handle.ok_or("not running")?;
                let _ = h.press_power_button();
                let r = e.wait_while(Duration::from_secs(action.timeout_s), |s| {
                    s == InstanceState::Rebooting
                });
                let guest_stopped = r.thread.as_ref().is_some_and(|t| t.is_finished());
                drop(r);
                if !guest_stopped {
                    h.stop();
                }
                self.join(e);
                self.set_state(e, InstanceState::Starting, Some("reboot".into()));
                self.boot(e)
            }
            Reset => {
                handle
                    .ok_or("not running")?
                    .reset()
                    .map_err(|e| e.to_string())?;
                self.wait_running(e)
            }
            Pause => {
                handle
                    .ok_or("not running")?
                    .pause(Duration::from_secs(10))
                    .map_err(|e| e.to_string())?;
                self.set_state(e, InstanceState::Paused, None);
                Ok(())
            }
            Resume => {
                handle.ok_or("not running")?.resume();
                self.set_state(e, InstanceState::Running, None);
                Ok(())
            }
        }
    }

    fn wait_running(&self, e: &Entry) -> Result<(), String> {
        let rt = e.wait_while(START_TIMEOUT, |s| {
            matches!(s, InstanceState::Starting | InstanceState::Rebooting)
        });
        match rt.state {
            InstanceState::Running => Ok(()),
            s => Err(rt
                .reason
                .clone()
                .unwrap_or_else(|| format!("instance is {s}"))),
        }
    }

    /// Builds the VM and runs it on a thread of its own; returns once it is running.
    fn boot(self: &Arc<Self>, e: &Arc<Entry>) -> Result<(), String> {
        let def = lock(&e.def).clone();
        let fail = |reason: String| {
            self.set_state(e, InstanceState::Failed, Some(reason.clone()));
            Err(reason)
        };
        let kernel = match self.kernel(&def.boot.kernel) {
            Ok(k) => k,
            Err(err) => return fail(err.to_string()),
        };
        let initrd = match def
            .boot
            .initrd
            .as_deref()
            .map(|i| self.initrd(i))
            .transpose()
        {
            Ok(i) => i,
            Err(err) => return fail(err.to_string()),
        };
        let mut disks = Vec::new();
        for a in &def.disks {
            match self.disk(&a.id.to_string()) {
                Ok(d) => disks.push(DiskConfig {
                    path: self.disk_path(&d.def),
                    read_only: a.read_only,
                    serial: d.def.name.chars().take(20).collect(),
                    backing_dirs: self.open_options().allowed_dirs,
                    block_size: d.def.block_size,
                }),
                Err(err) => return fail(err.to_string()),
            }
        }
        let nets = def
            .network_interfaces
            .iter()
            .map(|n| NetConfig {
                tap: n.host_tap.clone(),
                mac: n.mac.parse().unwrap_or_else(|_| MacAddr::random()),
            })
            .collect();
        let config = VmConfig {
            vcpus: def.vcpus,
            memory: def.memory,
            kernel,
            initrd,
            cmdline: def.boot.cmdline.clone(),
            disks,
            nets,
        };
        let mut fds = [0; 2];
        // SAFETY: pipe() fills two fds that we then own.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
            return fail(format!("console pipe: {}", std::io::Error::last_os_error()));
        }
        // SAFETY: fresh fds from pipe2.
        let (input_r, input_w) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
        // SAFETY: F_SETFL on an fd we own.
        unsafe { libc::fcntl(fds[1], libc::F_SETFL, libc::O_NONBLOCK) };
        let console = Console {
            output: Box::new(e.console.clone()),
            input: Some(input_r),
        };
        let mut vm = match Vm::new(self.host.clone(), config, console) {
            Ok(vm) => vm,
            Err(err) => return fail(err.to_string()),
        };
        let (m, entry) = (Arc::downgrade(self), Arc::downgrade(e));
        vm.set_observer(Arc::new(move |ev| {
            let (Some(m), Some(entry)) = (m.upgrade(), entry.upgrade()) else {
                return;
            };
            match ev {
                VmEvent::Booted { .. } => {
                    lock(&entry.rt).started_at.get_or_insert_with(now);
                    m.set_state(&entry, InstanceState::Running, None)
                }
                VmEvent::Rebooting { reason } => {
                    m.set_state(&entry, InstanceState::Rebooting, Some(reason.into()))
                }
            }
        }));
        {
            let mut rt = lock(&e.rt);
            rt.handle = Some(vm.handle());
            rt.input = Some(Arc::new(input_w));
            rt.started_at = None;
        }
        let (m, entry) = (self.clone(), e.clone());
        let name = format!("kiln-vm-{}", def.name);
        let thread = std::thread::Builder::new().name(name).spawn(move || {
            // A panic in the VM's own thread fails this instance only.
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.run()));
            let (state, reason) = match r {
                Ok(Ok(Exit::PowerOff)) => (
                    InstanceState::Stopped,
                    Some("the guest powered off".to_string()),
                ),
                Ok(Ok(Exit::Stopped)) => (InstanceState::Stopped, Some("stopped".to_string())),
                Ok(Err(err)) => (InstanceState::Failed, Some(err.to_string())),
                Err(_) => (
                    InstanceState::Failed,
                    Some("internal error: the VM thread panicked".to_string()),
                ),
            };
            {
                let mut rt = lock(&entry.rt);
                rt.handle = None;
                rt.input = None;
            }
            m.set_state(&entry, state, reason);
        });
        match thread {
            Ok(t) => lock(&e.rt).thread = Some(t),
            Err(err) => return fail(format!("cannot start the VM thread: {err}")),
        }
        self.wait_running(e)
    }

    fn join(&self, e: &Entry) {
        let t = lock(&e.rt).thread.take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    fn hard_stop(&self, e: &Entry) {
        let h = lock(&e.rt).handle.clone();
        if let Some(h) = h {
            h.stop();
        }
        self.join(e);
    }

    /// Hard-stops every instance (process shutdown).
    pub fn shutdown(&self) {
        let entries = lock(&self.entries).clone();
        for e in entries {
            self.hard_stop(&e);
        }
    }
}

/// Removes what a killed `kiln serve` may have left half-made: import spools
/// (`.NAME.RANDOM.import`) and definitions being written (`.ID.json.tmp`).
fn sweep_leftovers(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.ends_with(".import") || name.ends_with(".json.tmp")) {
            tracing::info!("removing the leftover {}", e.path().display());
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// `v` ordered by `key` (definitions load in directory order).
fn sorted<T, K: Ord>(mut v: Vec<T>, key: impl Fn(&T) -> K) -> Vec<T> {
    v.sort_by_key(|x| key(x));
    v
}
