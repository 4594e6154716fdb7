//! The manager's calls on instances: create, change, attach and detach disks, delete, actions
//! (run as operations on the pool), console and device counters.

use std::sync::Arc;
use std::time::Duration;

use devices::bus::lock;
use uuid::Uuid;
use vmm::ConfigError;

use crate::catalog::Catalog;
use crate::console::ConsoleRing;
use crate::disks::DiskPlan;
use crate::error::{invalid, Error, Kind, Result};
use crate::events::Subject;
use crate::lifecycle::{self, Action, InstanceState};
use crate::model::{now, Attachment, Boot, DiskDef, ImageKind, InstanceDef, Nic, Revision};
use crate::operations::Operation;
use crate::runtime::{InputRefused, Slot, Status};
use crate::spec::{ActionRequest, DiskChoice, InstanceChanges, NewInstance};
use crate::vm_config::{config_error, Parts};
use crate::Manager;

/// How long a start (or the boot after a reboot) may take to reach `running`.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// How long a forced delete waits for a start, stop or reboot under way to end.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(120);

/// A disk attached to an instance, with its name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AttachedDisk {
    /// The disk's id.
    pub id: Uuid,
    /// The disk's name.
    pub name: String,
    /// The guest may not write.
    pub read_only: bool,
}

/// An instance as clients see it: its definition, the names of what it refers to, its status.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceView {
    /// The definition.
    pub def: InstanceDef,
    /// The kernel image's name.
    pub kernel: String,
    /// The initrd image's name.
    pub initrd: Option<String>,
    /// The attached disks, in guest order.
    pub disks: Vec<AttachedDisk>,
    /// Its state.
    pub status: Status,
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

/// Refuses unless `expected` (when given) is the definition's revision now.
pub(crate) fn check_revision(
    kind: Kind,
    current: Revision,
    expected: Option<Revision>,
) -> Result<()> {
    match expected {
        Some(e) if e != current => Err(Error::Changed { kind, current }),
        _ => Ok(()),
    }
}

impl Manager {
    fn view(&self, cat: &Catalog, def: &InstanceDef) -> InstanceView {
        let status = self.slot(def.id).map(|s| s.status()).unwrap_or(Status {
            state: InstanceState::Stopped,
            reason: None,
            started_at: None,
        });
        InstanceView {
            kernel: cat.image_name(def.boot.kernel),
            initrd: def.boot.initrd.map(|i| cat.image_name(i)),
            disks: def
                .disks
                .iter()
                .map(|a| AttachedDisk {
                    id: a.disk,
                    name: cat.disk_name(a.disk),
                    read_only: a.read_only,
                })
                .collect(),
            def: def.clone(),
            status,
        }
    }

    /// Every instance, oldest first.
    pub fn list(&self) -> Vec<InstanceView> {
        let cat = lock(&self.catalog);
        cat.instances.iter().map(|d| self.view(&cat, d)).collect()
    }

    /// One instance, by id or name.
    pub fn get(&self, key: &str) -> Result<InstanceView> {
        let cat = lock(&self.catalog);
        let def = cat.instance(key)?;
        Ok(self.view(&cat, def))
    }

    /// A vCPU count an instance may have: at most the host's online CPUs (as memory is at
    /// most the host's), and what KVM allows.
    fn vcpus(&self, vcpus: u32) -> Result<u8> {
        let cpus = host_cpus();
        if vcpus as usize > cpus {
            return Err(Error::InsufficientCapacity(format!(
                "{vcpus} vCPUs asked for, but the host has only {cpus} CPUs"
            )));
        }
        u8::try_from(vcpus).map_err(|_| {
            config_error(ConfigError::TooManyVcpus(
                vcpus as usize,
                self.host.max_vcpus,
            ))
        })
    }

    /// Checks a definition against the VM's limits (vCPUs, memory, devices, …).
    fn check_limits(&self, def: &InstanceDef, parts: &Parts) -> Result<()> {
        self.vm_config(def, parts)?
            .check_limits(&self.host)
            .map_err(config_error)
    }

    /// Creates an instance (stopped); with `start` it also starts it and returns the
    /// operation. Disks made for it are made without the catalog's lock and removed again if
    /// it cannot be created. Blocks while they are made.
    pub fn create(
        self: &Arc<Self>,
        spec: NewInstance,
    ) -> Result<(InstanceView, Option<Operation>)> {
        let (def, plans) = self.plan_instance(&spec)?;
        let mut files = Vec::new();
        for p in &plans {
            files.push(self.make_disk(p)?);
        }
        let disks: Vec<DiskDef> = plans.into_iter().map(|p| p.def).collect();
        {
            let mut cat = lock(&self.catalog);
            // What was checked before the disks were made may have changed since.
            cat.check_new_name(Kind::Instance, &def.name)?;
            for (i, d) in disks.iter().enumerate() {
                cat.check_new_name(Kind::Disk, &d.name)
                    .map_err(|e| e.in_field(&format!("disks[{i}].create.")))?;
            }
            for a in def
                .disks
                .iter()
                .filter(|a| disks.iter().all(|d| d.id != a.disk))
            {
                let name = cat.disk_name(a.disk);
                if cat.disk_by_id(a.disk).is_none() {
                    return Err(Error::not_found(Kind::Disk, name));
                }
                if let Some(other) = cat.attached_to(a.disk) {
                    return Err(Error::InUse(format!(
                        "disk {name} is already attached to instance {}",
                        other.name
                    )));
                }
            }
            let images = [Some(def.boot.kernel), def.boot.initrd];
            if let Some(id) = images
                .into_iter()
                .flatten()
                .find(|i| cat.image_by_id(*i).is_none())
            {
                return Err(Error::not_found(Kind::Image, id.to_string()));
            }
            for d in &disks {
                self.commit_disk(&mut cat, d)?;
            }
            if let Err(e) = self.store.save(&def) {
                for d in &disks {
                    let _ = self.remove_disk(&mut cat, d.id);
                }
                return Err(Error::internal("saving the definition", e));
            }
            files.into_iter().for_each(|f| f.keep());
            cat.instances.push(def.clone());
            let slot = Slot::new(def.id, self.events.clone());
            crate::keep_console(&self.store, &slot);
            lock(&self.slots).insert(def.id, slot);
        }
        self.events.name(def.id, &def.name);
        self.events.push(
            Subject::InstanceState(def.id),
            InstanceState::Stopped.as_str(),
            Some("created".into()),
        );
        let key = def.id.to_string();
        let op = if spec.start {
            Some(self.action(&key, ActionRequest::new(Action::Start))?)
        } else {
            None
        };
        Ok((self.get(&key)?, op))
    }

    /// Checks a new instance against the catalog and the VM's limits: its definition, and
    /// plans for the disks to make for it.
    fn plan_instance(&self, spec: &NewInstance) -> Result<(InstanceDef, Vec<DiskPlan>)> {
        let cat = lock(&self.catalog);
        cat.check_new_name(Kind::Instance, &spec.name)?;
        let vcpus = self.vcpus(spec.vcpus)?;
        let kernel = cat
            .image_of_kind(&spec.kernel, ImageKind::Kernel, "boot.kernel")?
            .id;
        let initrd = spec
            .initrd
            .as_deref()
            .map(|i| {
                cat.image_of_kind(i, ImageKind::Initrd, "boot.initrd")
                    .map(|i| i.id)
            })
            .transpose()?;
        let mut plans: Vec<DiskPlan> = Vec::new();
        let mut attached: Vec<(Attachment, DiskDef)> = Vec::new();
        for (i, choice) in spec.disks.iter().enumerate() {
            let (disk, read_only) = match choice {
                DiskChoice::Existing { disk, read_only } => {
                    let d = cat.disk(disk).map_err(|_| {
                        invalid(
                            &format!("disks[{i}].disk"),
                            format!("no disk named {disk:?}"),
                        )
                    })?;
                    if let Some(other) = cat.attached_to(d.id) {
                        return Err(Error::InUse(format!(
                            "disk {} is already attached to instance {}",
                            d.name, other.name
                        )));
                    }
                    (d.clone(), *read_only)
                }
                DiskChoice::Create { disk, read_only } => {
                    let prefix = format!("disks[{i}].create.");
                    if plans.iter().any(|p| p.def.name == disk.name) {
                        return Err(Error::AlreadyExists {
                            kind: Kind::Disk,
                            name: disk.name.clone(),
                        });
                    }
                    let plan = self
                        .plan_disk(&cat, disk)
                        .map_err(|e| e.in_field(&prefix))?;
                    let def = plan.def.clone();
                    plans.push(plan);
                    (def, *read_only)
                }
            };
            if attached.iter().any(|(a, _)| a.disk == disk.id) {
                return Err(invalid(
                    &format!("disks[{i}]"),
                    format!("disk {} is listed twice", disk.name),
                ));
            }
            attached.push((
                Attachment {
                    disk: disk.id,
                    read_only,
                },
                disk,
            ));
        }
        let network_interfaces = spec
            .nics
            .iter()
            .enumerate()
            .map(|(i, n)| Nic {
                name: n.name.clone().unwrap_or_else(|| format!("eth{i}")),
                host_tap: n.host_tap.clone(),
                mac: n.mac.unwrap_or_else(vmm::MacAddr::random),
            })
            .collect();
        let t = now();
        let def = InstanceDef {
            id: Uuid::new_v4(),
            name: spec.name.clone(),
            description: spec.description.clone(),
            vcpus,
            memory: spec.memory,
            boot: Boot {
                kernel,
                initrd,
                cmdline: spec.cmdline.clone(),
            },
            disks: attached.iter().map(|(a, _)| *a).collect(),
            network_interfaces,
            auto_start: spec.auto_start,
            restore: None,
            created_at: t.clone(),
            updated_at: t,
            generation: 1,
        };
        let parts = Parts {
            kernel: cat.image_by_id(kernel).expect("looked up above"),
            initrd: initrd.and_then(|i| cat.image_by_id(i)),
            disks: attached.iter().map(|(_, d)| d).collect(),
        };
        self.check_limits(&def, &parts)?;
        Ok((def, plans))
    }

    /// Saves a changed definition (bumping its generation) and makes it current.
    fn save_instance(&self, cat: &mut Catalog, index: usize, mut def: InstanceDef) -> Result<()> {
        def.generation += 1;
        def.updated_at = now();
        self.store
            .save(&def)
            .map_err(|e| Error::internal("saving the definition", e))?;
        let state = self.slot(def.id)?.state();
        self.events.name(def.id, &def.name);
        self.events
            .push(Subject::InstanceUpdated(def.id), state.as_str(), None);
        cat.instances[index] = def;
        Ok(())
    }

    /// Refuses unless the instance is stopped or failed; `hint` says what to do.
    fn check_stopped(&self, def: &InstanceDef, hint: &'static str) -> Result<()> {
        let state = self.slot(def.id)?.state();
        if state.is_stopped() {
            Ok(())
        } else {
            Err(Error::InvalidState {
                name: def.name.clone(),
                state,
                hint,
            })
        }
    }

    /// Changes an instance's name, description or auto-start; vCPUs, memory and boot
    /// settings only while it is stopped. With `expected`, only when the definition is still at that revision.
    pub fn patch(
        &self,
        key: &str,
        changes: InstanceChanges,
        expected: Option<Revision>,
    ) -> Result<InstanceView> {
        let mut cat = lock(&self.catalog);
        let index = cat.instance_index(key)?;
        let cur = &cat.instances[index];
        check_revision(Kind::Instance, cur.revision(), expected)?;
        let mut def = cur.clone();
        if let Some(name) = changes.name.filter(|n| *n != def.name) {
            cat.check_new_name(Kind::Instance, &name)?;
            def.name = name;
        }
        if let Some(d) = changes.description {
            def.description = d;
        }
        if let Some(a) = changes.auto_start {
            def.auto_start = a;
        }
        let boot =
            changes.kernel.is_some() || changes.initrd.is_some() || changes.cmdline.is_some();
        if changes.vcpus.is_some() || changes.memory.is_some() || boot {
            self.check_stopped(
                &def,
                "vcpus, memory and boot settings change only while it is stopped",
            )?;
            if let Some(v) = changes.vcpus {
                def.vcpus = self.vcpus(v)?;
            }
            if let Some(m) = changes.memory {
                def.memory = m;
            }
            if let Some(k) = &changes.kernel {
                def.boot.kernel = cat.image_of_kind(k, ImageKind::Kernel, "boot.kernel")?.id;
            }
            match changes.initrd.as_deref() {
                Some("") => def.boot.initrd = None,
                Some(i) => {
                    def.boot.initrd =
                        Some(cat.image_of_kind(i, ImageKind::Initrd, "boot.initrd")?.id)
                }
                None => {}
            }
            if let Some(c) = changes.cmdline {
                def.boot.cmdline = c;
            }
            self.check_limits(&def, &cat.parts(&def)?)?;
        }
        self.save_instance(&mut cat, index, def)?;
        Ok(self.view(&cat, &cat.instances[index]))
    }

    /// Attaches a disk to a stopped instance.
    pub fn attach_disk(&self, instance: &str, disk: &str, read_only: bool) -> Result<InstanceView> {
        let mut cat = lock(&self.catalog);
        let index = cat.instance_index(instance)?;
        let mut def = cat.instances[index].clone();
        let d = cat
            .disk(disk)
            .map_err(|_| invalid("disk", format!("no disk named {disk:?}")))?;
        self.check_stopped(&def, "stop it to attach a disk")?;
        if let Some(other) = cat.attached_to(d.id) {
            return Err(Error::InUse(format!(
                "disk {} is already attached to instance {}",
                d.name, other.name
            )));
        }
        def.disks.push(Attachment {
            disk: d.id,
            read_only,
        });
        self.check_limits(&def, &cat.parts(&def)?)?;
        self.save_instance(&mut cat, index, def)?;
        Ok(self.view(&cat, &cat.instances[index]))
    }

    /// Detaches a disk from a stopped instance.
    pub fn detach_disk(&self, instance: &str, disk: &str) -> Result<InstanceView> {
        let mut cat = lock(&self.catalog);
        let index = cat.instance_index(instance)?;
        let mut def = cat.instances[index].clone();
        self.check_stopped(&def, "stop it to detach a disk")?;
        let id = cat.disk(disk).map(|d| d.id).ok();
        let before = def.disks.len();
        def.disks.retain(|a| Some(a.disk) != id);
        if def.disks.len() == before {
            return Err(Error::not_found(
                Kind::Disk,
                format!("{disk} (attached to instance {})", def.name),
            ));
        }
        self.save_instance(&mut cat, index, def)?;
        Ok(self.view(&cat, &cat.instances[index]))
    }

    /// Deletes a stopped or failed instance; `force` hard-stops a running one first (and
    /// waits for a start, stop or reboot under way to end). Blocks; call it off the async
    /// workers.
    pub fn delete(&self, key: &str, force: bool) -> Result<()> {
        loop {
            let (slot, running) = {
                let mut cat = lock(&self.catalog);
                let index = cat.instance_index(key)?;
                let def = &cat.instances[index];
                let slot = self.slot(def.id)?;
                let state = slot.state();
                if state.is_stopped() {
                    let id = def.id;
                    self.store
                        .remove::<InstanceDef>(id)
                        .map_err(|e| Error::internal("removing the definition", e))?;
                    cat.instances.remove(index);
                    lock(&self.slots).remove(&id);
                    drop(cat);
                    slot.join();
                    slot.console.close();
                    let _ = std::fs::remove_file(self.store.console_file(id));
                    self.events
                        .push(Subject::InstanceState(id), "deleted", None);
                    return Ok(());
                }
                if !force {
                    return Err(Error::InvalidState {
                        name: def.name.clone(),
                        state,
                        hint: "stop it first, or delete with force",
                    });
                }
                let running = matches!(state, InstanceState::Running | InstanceState::Paused);
                if running {
                    // No action fits `stopping`: nothing starts it again meanwhile.
                    slot.set(InstanceState::Stopping, Some("deleting".into()));
                }
                (slot, running)
            };
            if running {
                slot.hard_stop();
            } else {
                let settled = |s: InstanceState| {
                    !(s.is_stopped() || matches!(s, InstanceState::Running | InstanceState::Paused))
                };
                self.runtime
                    .block_on(slot.wait_while(SETTLE_TIMEOUT, settled));
            }
        }
    }

    /// Starts an action; the returned operation (pending until the pool has room) ends when
    /// the instance reached its target state.
    pub fn action(self: &Arc<Self>, key: &str, req: ActionRequest) -> Result<Operation> {
        // Checking the state and moving it happen under the catalog's lock, which every
        // other change (delete, attach, PATCH) takes too: two starts cannot both pass.
        let (slot, op) = {
            let cat = lock(&self.catalog);
            let def = cat.instance(key)?;
            let slot = self.slot(def.id)?;
            let state = slot.state();
            let step = lifecycle::begin(state, req.action).map_err(|r| Error::InvalidState {
                name: def.name.clone(),
                state,
                hint: r.hint,
            })?;
            if req.action == Action::Start {
                for d in cat.parts(def)?.disks {
                    cat.check_not_read(d, "start the instance")?;
                }
            }
            if step.now != state {
                slot.set(step.now, None);
            }
            let op = self.operations.begin(req.action, def.id);
            self.events.name(op.id, &def.name);
            (slot, op)
        };
        let (m, events, id) = (self.clone(), self.events.clone(), op.id);
        let ops = self.operations.clone();
        self.operations.run(
            &self.runtime,
            id,
            async move { m.perform(&slot, req, id).await },
            move |r| {
                let state = if r.is_ok() { "succeeded" } else { "failed" };
                let reason = r.err().or_else(|| ops.get(id).and_then(|o| o.detail));
                events.push(Subject::Operation(id), state, reason);
            },
        );
        Ok(op)
    }

    async fn perform(
        self: &Arc<Self>,
        slot: &Arc<Slot>,
        req: ActionRequest,
        op: Uuid,
    ) -> Result<(), String> {
        let handle = || slot.handle().ok_or_else(|| "not running".to_string());
        match req.action {
            Action::Start => self.start_vm(slot).await,
            Action::Stop => {
                let h = handle()?;
                if req.force {
                    h.stop();
                } else {
                    h.resume();
                    // Between two boots (a guest backed off after resetting in a loop) no
                    // guest can be asked: stop at once.
                    let asked = h.press_power_button().is_ok();
                    let status = match asked {
                        true => {
                            slot.wait_while(req.timeout, |s| s == InstanceState::Stopping)
                                .await
                        }
                        false => slot.status(),
                    };
                    if status.state == InstanceState::Stopping {
                        let why = forced_stop_reason(req.timeout);
                        tracing::info!(instance = %slot.id(), "{why}");
                        self.operations.note(op, why.clone());
                        slot.stop_reason(why);
                        h.stop();
                    }
                }
                join(slot).await
            }
            Action::Reboot if req.force => {
                let before = slot.boots();
                handle()?.reset().map_err(|e| e.to_string())?;
                slot.wait_booted_after(before, START_TIMEOUT).await
            }
            Action::Reboot => {
                // A graceful reboot: the guest shuts down on the power button, then boots again.
                let h = handle()?;
                let _ = h.press_power_button();
                slot.wait_while(req.timeout, |s| s == InstanceState::Rebooting)
                    .await;
                if !slot.vm_ended() {
                    h.stop();
                }
                join(slot).await?;
                slot.set(InstanceState::Starting, Some("reboot".into()));
                self.start_vm(slot).await
            }
            Action::Reset => {
                let before = slot.boots();
                handle()?.reset().map_err(|e| e.to_string())?;
                slot.wait_booted_after(before, START_TIMEOUT).await
            }
            Action::Pause => {
                let h = handle()?;
                tokio::task::spawn_blocking(move || h.pause(Duration::from_secs(10)))
                    .await
                    .map_err(|e| e.to_string())?
                    .map_err(|e| e.to_string())?;
                slot.set_if(InstanceState::Running, InstanceState::Paused);
                Ok(())
            }
            Action::Resume => {
                // The state moved to `running` when the action was accepted.
                handle()?.resume();
                Ok(())
            }
        }
    }

    /// Builds the VM (off the async workers) and waits until it runs.
    async fn start_vm(self: &Arc<Self>, slot: &Arc<Slot>) -> Result<(), String> {
        let (m, s) = (self.clone(), slot.clone());
        let launched = tokio::task::spawn_blocking(move || m.launch(&s))
            .await
            .map_err(|e| e.to_string())?;
        if let Err(reason) = launched {
            slot.set(InstanceState::Failed, Some(reason.clone()));
            return Err(reason);
        }
        slot.wait_running(START_TIMEOUT).await
    }

    /// The VM of the instance's definition, built and running on its thread. Blocks.
    fn launch(&self, slot: &Arc<Slot>) -> Result<(), String> {
        slot.join();
        let (config, name, restore) = {
            let cat = lock(&self.catalog);
            let def = cat
                .instances
                .iter()
                .find(|d| d.id == slot.id())
                .ok_or("the instance was deleted")?;
            let parts = cat.parts(def).map_err(|e| e.to_string())?;
            (
                self.vm_config(def, &parts).map_err(|e| e.to_string())?,
                def.name.clone(),
                def.restore,
            )
        };
        match restore {
            Some(snapshot) => self.launch_restored(slot, snapshot, config, &name),
            None => {
                let shell = self.shells.take(&self.host, &config);
                slot.launch(self.host.clone(), config, shell, &name)
            }
        }
    }

    /// The console history of an instance.
    pub fn console(&self, key: &str) -> Result<ConsoleRing> {
        let id = lock(&self.catalog).instance(key)?.id;
        Ok(self.slot(id)?.console.clone())
    }

    /// Sends bytes to a running instance's serial port.
    pub fn console_input(&self, key: &str, bytes: &[u8]) -> Result<()> {
        let (name, slot) = {
            let cat = lock(&self.catalog);
            let def = cat.instance(key)?;
            (def.name.clone(), self.slot(def.id)?)
        };
        slot.input(bytes).map_err(|e| match e {
            InputRefused::NoVm => Error::InvalidState {
                name,
                state: slot.state(),
                hint: "start it first",
            },
            InputRefused::Full => {
                Error::InUse("the guest is not reading its serial console; input not sent".into())
            }
            InputRefused::Io(e) => Error::internal("console input", e),
        })
    }

    /// The counters of a running instance's devices, by disk or NIC name. Empty when it is
    /// not running; they restart from zero at every boot.
    pub fn device_counters(&self, key: &str) -> Vec<DeviceCounters> {
        let (names, slot) = {
            let cat = lock(&self.catalog);
            let Ok(def) = cat.instance(key) else {
                return Vec::new();
            };
            let names: Vec<_> = def
                .disks
                .iter()
                .map(|a| ("block", cat.disk_name(a.disk)))
                .chain(
                    def.network_interfaces
                        .iter()
                        .map(|n| ("net", n.name.clone())),
                )
                .collect();
            (names, self.slot(def.id))
        };
        let Some(counters) = slot
            .ok()
            .and_then(|s| s.handle())
            .and_then(|h| h.device_counters().ok())
        else {
            return Vec::new();
        };
        names
            .into_iter()
            .zip(counters)
            .map(|((kind, device), counters)| DeviceCounters {
                kind,
                device,
                counters,
            })
            .collect()
    }
}

/// The CPUs this process may run on.
fn host_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Why an instance stopped whose guest did not power off in time (the operation's detail,
/// the instance's `state_reason` and the event's reason).
pub(crate) fn forced_stop_reason(timeout: Duration) -> String {
    format!(
        "forced stop: the guest did not power off within {} s of the power button",
        timeout.as_secs()
    )
}

/// Waits for the VM's thread to end, off the async workers.
async fn join(slot: &Arc<Slot>) -> Result<(), String> {
    let s = slot.clone();
    tokio::task::spawn_blocking(move || s.join())
        .await
        .map_err(|e| e.to_string())
}
