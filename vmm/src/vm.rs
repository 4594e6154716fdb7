//! A VM and its lifecycle across guest reboots.

use std::fs::File;
use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::lock;
use devices::{GuestRequest, GuestRequests};
use vmm_sys_util::signal::{Killable, SIGRTMIN};

use crate::config::{ConfigError, VmConfig};
use crate::cpu_state::VcpuState;
use crate::host::Host;
use crate::machine::{Machine, Parts, Persistent};
use crate::shell::VmShell;
use crate::snapshot::{PreparedVm, Restore, Snapshot, SnapshotError};

/// How a VM ended without failing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The guest powered off (ACPI S5).
    PowerOff,
    /// The owner stopped it ([`VmHandle::stop`]).
    Stopped,
}

/// Why a VM could not be built or did not end cleanly.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// The configuration does not fit the host.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// Building the VM failed.
    #[error("cannot build the VM: {0}")]
    Build(String),
    /// The VM failed while running.
    #[error("the VM failed: {0}")]
    Failed(String),
    /// The snapshot cannot be restored.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
}

impl From<boot::Error> for VmError {
    fn from(e: boot::Error) -> Self {
        VmError::Build(e.to_string())
    }
}

/// The serial console of a VM.
pub struct Console {
    /// Where the guest's serial output goes.
    pub output: Box<dyn Write + Send>,
    /// Bytes for the guest's serial input, if any.
    pub input: Option<File>,
}

/// A clonable writer over the owner's console sink, shared by every boot of the VM.
#[derive(Clone)]
pub(crate) struct SharedWriter(Arc<Mutex<Box<dyn Write + Send>>>);

impl Write for SharedWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        lock(&self.0).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        lock(&self.0).flush()
    }
}

/// How one boot ended.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    PowerOff,
    Reset(&'static str),
    Stop,
    Failed(String),
}

/// Where vCPU threads park, between two `KVM_RUN`s, while the VM is paused.
#[derive(Default)]
pub(crate) struct PauseGate {
    state: Mutex<PauseState>,
    changed: Condvar,
    /// `state.paused`, readable without the lock: every vCPU looks at it before every
    /// `KVM_RUN`, and a shared lock there would make them contend on each exit.
    paused: AtomicBool,
}

#[derive(Default)]
struct PauseState {
    paused: bool,
    parked: usize,
    /// vCPUs asked to save their state while parked, by id.
    save_wanted: Vec<bool>,
    /// What each of them saved.
    saved: Vec<Option<Result<VcpuState, String>>>,
}

/// How a parked vCPU thread saves its own state when a snapshot asks (its fd is its own).
pub(crate) type SaveVcpu<'a> = &'a mut dyn FnMut() -> Result<VcpuState, String>;

impl PauseGate {
    /// Called by a vCPU thread before each `KVM_RUN`: blocks while the VM is paused and the
    /// boot is not ending.
    pub fn park_while_paused(&self, control: &BootControl, id: usize, save: SaveVcpu<'_>) {
        // A pause that lands just after this check is not missed: pause() kicks the vCPUs
        // out of KVM_RUN until all of them are parked.
        if !self.is_paused() {
            return;
        }
        let mut s = lock(&self.state);
        if !s.paused {
            return;
        }
        s.parked += 1;
        self.changed.notify_all();
        while s.paused && !control.is_ending() {
            if s.save_wanted.get(id).copied().unwrap_or(false) {
                s.save_wanted[id] = false;
                let r = save();
                if let Some(slot) = s.saved.get_mut(id) {
                    *slot = Some(r);
                }
                self.changed.notify_all();
                continue;
            }
            s = self
                .changed
                .wait_timeout(s, Duration::from_millis(50))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        s.parked -= 1;
    }

    /// Whether the VM is paused (a lock-free look, as [`PauseGate::park_while_paused`] takes).
    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::Acquire)
    }

    /// Asks each of `n` parked vCPUs for its state and waits for all of them, at most
    /// `timeout`.
    fn collect_states(&self, n: usize, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        let end = std::time::Instant::now() + timeout;
        let mut s = lock(&self.state);
        s.save_wanted = vec![true; n];
        s.saved = (0..n).map(|_| None).collect();
        self.changed.notify_all();
        while s.saved.iter().any(|r| r.is_none()) {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.save_wanted.clear();
                return Err(format!(
                    "the vCPUs did not save their state within {timeout:?}"
                ));
            }
            s = self
                .changed
                .wait_timeout(s, left.min(Duration::from_millis(50)))
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        std::mem::take(&mut s.saved)
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                r.unwrap_or_else(|| Err("no state".into()))
                    .map_err(|e| format!("vCPU {i}: {e}"))
            })
            .collect()
    }

    fn set_paused(&self, paused: bool) {
        lock(&self.state).paused = paused;
        self.paused.store(paused, Ordering::Release);
        self.changed.notify_all();
    }
}

/// Where the threads of one boot report how it ends; the first report wins.
pub(crate) struct BootControl {
    outcome: Mutex<Option<Outcome>>,
    changed: Condvar,
    ending: AtomicBool,
    /// The VM's pause gate (shared by all its boots).
    pub gate: Arc<PauseGate>,
    /// The vCPU threads of this boot, owned here until they are joined: kicks go through
    /// their handles, and a handle leaves this list (under its lock) before it is joined, so
    /// no kick ever reaches a thread that was joined.
    vcpus: Mutex<Vec<JoinHandle<()>>>,
    /// The boot's VM, memory and devices, once built: for the power button, device
    /// counters and snapshots.
    pub parts: Mutex<Option<Arc<Parts>>>,
}

impl BootControl {
    fn new(gate: Arc<PauseGate>) -> Self {
        Self {
            outcome: Mutex::new(None),
            changed: Condvar::new(),
            ending: AtomicBool::new(false),
            gate,
            vcpus: Mutex::new(Vec::new()),
            parts: Mutex::new(None),
        }
    }

    /// Keeps a vCPU thread of this boot.
    pub fn add_vcpu(&self, thread: JoinHandle<()>) {
        lock(&self.vcpus).push(thread);
    }

    /// Interrupts every vCPU's `KVM_RUN`: SIGRTMIN through each thread's own handle; its
    /// handler sets the vCPU's `immediate_exit`, so a kick that lands just before `KVM_RUN`
    /// is not lost (see [`crate::vcpu`]).
    pub fn kick(&self) {
        for t in lock(&self.vcpus).iter() {
            let _ = t.kill(SIGRTMIN());
        }
    }

    /// Takes the vCPU threads that have ended out of the boot (kicking the others once);
    /// true when none is left.
    pub fn reap_vcpus(&self) -> (Vec<JoinHandle<()>>, bool) {
        let mut vcpus = lock(&self.vcpus);
        for t in vcpus.iter() {
            let _ = t.kill(SIGRTMIN());
        }
        let (done, running): (Vec<_>, Vec<_>) = std::mem::take(&mut *vcpus)
            .into_iter()
            .partition(|t| t.is_finished());
        *vcpus = running;
        let all = vcpus.is_empty();
        (done, all)
    }

    /// Records how the boot ends (if nothing was recorded yet) and tells every thread.
    pub fn finish(&self, outcome: Outcome) {
        let mut o = lock(&self.outcome);
        if o.is_none() {
            *o = Some(outcome);
        }
        self.ending.store(true, Ordering::Release);
        self.changed.notify_all();
        self.gate.changed.notify_all();
    }

    /// Tells the vCPU threads to leave (used while tearing down), paused ones included.
    pub fn end(&self) {
        self.ending.store(true, Ordering::Release);
        self.gate.changed.notify_all();
    }

    /// True once the boot is ending: vCPU threads leave their loop.
    pub fn is_ending(&self) -> bool {
        self.ending.load(Ordering::Acquire)
    }

    /// Drops what the boot's devices left here once the boot is over. The ACPI registers
    /// hold this control as their request sink, so keeping them would keep both alive for
    /// good, and with them the boot's eventfds, disk images and TAP (which the next boot
    /// could then not open: a TAP takes one owner).
    fn release_devices(&self) {
        lock(&self.parts).take();
    }

    fn wait(&self) -> Outcome {
        let mut o = lock(&self.outcome);
        loop {
            if let Some(outcome) = o.clone() {
                return outcome;
            }
            o = self.changed.wait(o).unwrap_or_else(|e| e.into_inner());
        }
    }
}

impl GuestRequests for BootControl {
    fn request(&self, what: GuestRequest, how: &'static str) {
        self.finish(match what {
            GuestRequest::PowerOff => Outcome::PowerOff,
            GuestRequest::Reset => Outcome::Reset(how),
        });
    }
}

struct Shared {
    stop: AtomicBool,
    current: Mutex<Option<Arc<BootControl>>>,
    boots: AtomicU32,
    gate: Arc<PauseGate>,
    vcpus: usize,
    /// The configuration (what a snapshot records of the host side).
    config: VmConfig,
    /// The CMOS NVRAM, kept across boots.
    nvram: devices::cmos::Nvram,
}

/// What a [`VmHandle`] call could not do.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HandleError {
    /// The VM is between boots or has ended.
    #[error("the VM is not running")]
    NotRunning,
    /// The vCPUs did not all stop in time.
    #[error("the vCPUs did not pause within {0:?}")]
    PauseTimeout(Duration),
}

/// Controls a running [`Vm`] from other threads.
#[derive(Clone)]
pub struct VmHandle(Arc<Shared>);

impl VmHandle {
    /// Stops the VM (a hard stop): [`Vm::run`] returns [`Exit::Stopped`].
    pub fn stop(&self) {
        self.0.stop.store(true, Ordering::Release);
        if let Some(c) = lock(&self.0.current).as_ref() {
            c.finish(Outcome::Stop);
        }
    }

    /// Number of times the guest has been booted (1 after the first boot starts).
    pub fn boots(&self) -> u32 {
        self.0.boots.load(Ordering::Acquire)
    }

    fn current(&self) -> Result<Arc<BootControl>, HandleError> {
        lock(&self.0.current).clone().ok_or(HandleError::NotRunning)
    }

    /// The current boot's VM, memory and devices.
    pub(crate) fn parts(&self) -> Result<Arc<Parts>, HandleError> {
        lock(&self.current()?.parts)
            .clone()
            .ok_or(HandleError::NotRunning)
    }

    /// The VM's configuration.
    pub fn config(&self) -> &VmConfig {
        &self.0.config
    }

    pub(crate) fn nvram(&self) -> devices::cmos::Nvram {
        self.0.nvram.clone()
    }

    /// The state of every vCPU; the VM must be paused.
    pub(crate) fn vcpu_states(&self, timeout: Duration) -> Result<Vec<VcpuState>, String> {
        self.0.gate.collect_states(self.0.vcpus, timeout)
    }

    /// Presses the ACPI power button (a graceful stop: the guest decides).
    pub fn press_power_button(&self) -> Result<(), HandleError> {
        lock(&self.parts()?.pm).press_power_button();
        Ok(())
    }

    /// True when the running guest enabled the ACPI power button event: a press reaches
    /// it. A guest that did not (no ACPI, or not booted that far) never reacts to one.
    pub fn listens_to_power_button(&self) -> bool {
        self.parts()
            .is_ok_and(|p| lock(&p.pm).power_button_enabled())
    }

    /// The counters of each virtio device of the current boot (disks, then NICs, in
    /// configuration order); they start from zero at every boot.
    pub fn device_counters(&self) -> Result<Vec<Vec<(&'static str, u64)>>, HandleError> {
        let parts = self.parts()?;
        Ok(parts.devices.iter().map(|d| lock(d).counters()).collect())
    }

    /// A hard reset: the guest re-boots in place at once.
    pub fn reset(&self) -> Result<(), HandleError> {
        self.current()?.finish(Outcome::Reset("hard reset"));
        Ok(())
    }

    /// Stops every vCPU between two instructions (memory and devices are kept); waits until
    /// they have all stopped, at most `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), HandleError> {
        let gate = &self.0.gate;
        gate.set_paused(true);
        let end = std::time::Instant::now() + timeout;
        loop {
            let current = lock(&self.0.current).clone();
            let Some(c) = current else {
                return Ok(()); // Between boots: the next boot's vCPUs park at once.
            };
            c.kick();
            let s = lock(&gate.state);
            if s.parked >= self.0.vcpus || c.is_ending() {
                return Ok(());
            }
            let (s, _) = gate
                .changed
                .wait_timeout(s, Duration::from_millis(2))
                .unwrap_or_else(|e| e.into_inner());
            if s.parked >= self.0.vcpus {
                return Ok(());
            }
            if std::time::Instant::now() > end {
                return Err(HandleError::PauseTimeout(timeout));
            }
        }
    }

    /// Lets paused vCPUs run again.
    pub fn resume(&self) {
        self.0.gate.set_paused(false);
    }

    /// True while the VM is paused.
    pub fn is_paused(&self) -> bool {
        self.0.gate.is_paused()
    }
}

/// What a VM reports to its owner while it runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VmEvent {
    /// Boot number `boot` (1 for the first) is running.
    Booted {
        /// 1 for the first boot, 2 after the first reboot, …
        boot: u32,
    },
    /// The guest reset (or was reset): the VM re-boots in place.
    Rebooting {
        /// What reset it.
        reason: &'static str,
    },
    /// The guest keeps resetting soon after it boots: the next boot waits (see
    /// [`crate::backoff`]).
    BackingOff {
        /// How long the next boot waits.
        delay: Duration,
        /// Quick resets in a row so far.
        resets: u32,
    },
}

/// Receives a VM's [`VmEvent`]s, on the thread that runs the VM.
pub type VmObserver = Arc<dyn Fn(VmEvent) + Send + Sync>;

/// A VM: a configuration, a console and the CMOS NVRAM, booted again in place on guest reset.
pub struct Vm {
    host: Arc<Host>,
    config: VmConfig,
    persistent: Persistent,
    shared: Arc<Shared>,
    observer: Option<VmObserver>,
    /// The snapshot the first boot continues from, instead of booting the kernel.
    restore: Option<Restore>,
    /// Where the first boot runs, when built ahead.
    shell: Option<VmShell>,
}

/// What a restored VM changes from the snapshot's configuration: clones get their own disks,
/// TAPs and MACs.
#[derive(Clone, Debug, Default)]
pub struct RestoreOptions {
    /// Per disk, in order: the image to use instead of the path the VM had (for a clone, a
    /// qcow2 overlay on [`Snapshot::disk_copy`]). `None` or absent: the recorded path, as it
    /// is now.
    pub disks: Vec<Option<std::path::PathBuf>>,
    /// Per NIC, in order: the TAP device and MAC to use instead of the recorded ones.
    pub nets: Vec<Option<crate::config::NetConfig>>,
}

impl RestoreOptions {
    /// The snapshot's configuration with these changes.
    fn apply(&self, saved: &VmConfig) -> VmConfig {
        let mut config = saved.clone();
        for (d, path) in config.disks.iter_mut().zip(&self.disks) {
            if let Some(p) = path {
                d.path = p.clone();
            }
        }
        for (n, with) in config.nets.iter_mut().zip(&self.nets) {
            if let Some(w) = with {
                *n = w.clone();
            }
        }
        config
    }
}

impl Vm {
    /// Validates `config` against `host`; nothing runs until [`Vm::run`].
    pub fn new(host: Arc<Host>, config: VmConfig, console: Console) -> Result<Self, VmError> {
        config.validate(&host)?;
        let nvram: devices::cmos::Nvram = Arc::new(Mutex::new([0; 128]));
        Ok(Self {
            persistent: Persistent {
                output: SharedWriter(Arc::new(Mutex::new(console.output))),
                input: console.input,
                nvram: nvram.clone(),
            },
            shared: Arc::new(Shared {
                stop: AtomicBool::new(false),
                current: Mutex::new(None),
                boots: AtomicU32::new(0),
                gate: Arc::default(),
                vcpus: usize::from(config.vcpus),
                config: config.clone(),
                nvram,
            }),
            host,
            config,
            observer: None,
            restore: None,
            shell: None,
        })
    }

    /// Boots the first time in `shell` (built ahead: no wait for KVM to register memory).
    /// Gives it back when it does not fit this VM ([`VmShell::fits`]) or the VM restores a
    /// snapshot.
    pub fn use_shell(&mut self, shell: VmShell) -> Result<(), VmShell> {
        if !shell.fits(&self.config) || self.restore.is_some() {
            return Err(shell);
        }
        self.shell = Some(shell);
        Ok(())
    }

    /// A VM whose first run continues the guest of `snapshot` where it was paused (its
    /// memory shared copy-on-write with every other VM restored from it), with `options`
    /// applied to the snapshot's configuration. A guest reset later boots the kernel afresh.
    /// Nothing runs until [`Vm::run`], which fails if KVM refuses the saved state.
    pub fn restore(
        host: Arc<Host>,
        snapshot: Arc<Snapshot>,
        options: &RestoreOptions,
        console: Console,
    ) -> Result<Self, VmError> {
        let config = options.apply(snapshot.config());
        let mut vm = Self::new(host, config, console)?;
        *lock(&vm.persistent.nvram) = snapshot.state.nvram;
        vm.restore = Some(Restore::Snapshot(snapshot));
        Ok(vm)
    }

    /// [`Vm::restore`] from a shell prepared ahead ([`PreparedVm::new`]): the restore does
    /// not wait for KVM to register guest memory.
    pub fn restore_prepared(
        host: Arc<Host>,
        prepared: PreparedVm,
        options: &RestoreOptions,
        console: Console,
    ) -> Result<Self, VmError> {
        let config = options.apply(prepared.snapshot().config());
        let mut vm = Self::new(host, config, console)?;
        *lock(&vm.persistent.nvram) = prepared.snapshot().state.nvram;
        vm.restore = Some(Restore::Prepared(prepared));
        Ok(vm)
    }

    /// Reports boots and reboots to `observer`.
    pub fn set_observer(&mut self, observer: VmObserver) {
        self.observer = Some(observer);
    }

    fn notify(&self, event: VmEvent) {
        if let Some(o) = &self.observer {
            o(event);
        }
    }

    /// Sleeps for `delay`, or less when the VM is stopped meanwhile.
    fn wait_unless_stopped(&self, delay: Duration) {
        let end = std::time::Instant::now() + delay;
        while !self.shared.stop.load(Ordering::Acquire) {
            let left = end.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                break;
            }
            std::thread::sleep(left.min(Duration::from_millis(20)));
        }
    }

    /// A handle to stop the VM from another thread.
    pub fn handle(&self) -> VmHandle {
        VmHandle(self.shared.clone())
    }

    /// Boots the guest and runs it until it powers off, is stopped, or fails. A guest reset
    /// (i8042, the ACPI reset register, a triple fault) re-boots it in place: fresh memory,
    /// kernel reloaded, vCPUs reset; console and NVRAM kept.
    pub fn run(&mut self) -> Result<Exit, VmError> {
        let mut backoff = crate::backoff::ResetBackoff::default();
        loop {
            let control = Arc::new(BootControl::new(self.shared.gate.clone()));
            *lock(&self.shared.current) = Some(control.clone());
            if self.shared.stop.load(Ordering::Acquire) {
                return Ok(Exit::Stopped);
            }
            let boot = self.shared.boots.fetch_add(1, Ordering::AcqRel) + 1;
            let machine = Machine::start(
                &self.host,
                &self.config,
                &self.persistent,
                control.clone(),
                self.restore.take(),
                self.shell.take(),
            );
            let machine = match machine {
                Ok(m) => m,
                Err(e) => {
                    *lock(&self.shared.current) = None;
                    control.release_devices();
                    return Err(e);
                }
            };
            self.notify(VmEvent::Booted { boot });
            let booted_at = std::time::Instant::now();
            let outcome = control.wait();
            machine.stop();
            *lock(&self.shared.current) = None;
            control.release_devices();
            let _ = self.persistent.output.flush();
            match outcome {
                Outcome::PowerOff => return Ok(Exit::PowerOff),
                Outcome::Stop => return Ok(Exit::Stopped),
                Outcome::Failed(reason) => return Err(VmError::Failed(reason)),
                Outcome::Reset(how) => {
                    tracing::info!("guest reset ({how}): rebooting in place");
                    self.notify(VmEvent::Rebooting { reason: how });
                    if let (Some(delay), resets) = backoff.record(booted_at.elapsed()) {
                        tracing::warn!(
                            "the guest reset {resets} times in a row soon after booting: \
                             next boot in {delay:?}"
                        );
                        self.notify(VmEvent::BackingOff { delay, resets });
                        self.wait_unless_stopped(delay);
                    }
                }
            }
        }
    }
}
