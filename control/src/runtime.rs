//! The runtime of one instance: its state (kept here only), the VM and the thread that runs
//! it, its console history and the pipe into its serial port. Waiters are woken by a watch
//! channel of the status; building a VM and joining its thread block, so callers run them off
//! the async workers.

use std::fs::File;
use std::io::{PipeWriter, Write};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use devices::bus::lock;
use tokio::sync::watch;
use uuid::Uuid;
use vmm::{Console, Exit, Host, Vm, VmConfig, VmEvent, VmHandle};

use crate::console::ConsoleRing;
use crate::events::{EventLog, Subject};
use crate::lifecycle::{self, InstanceState, VmReport};

/// An instance's state as clients see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Status {
    /// Lifecycle state.
    pub state: InstanceState,
    /// Why it is in this state (a failure, a guest power-off), when there is a reason.
    pub reason: Option<String>,
    /// When the current run's first boot started (RFC 3339).
    pub started_at: Option<String>,
}

/// The VM of a running instance.
#[derive(Default)]
struct Vmm {
    handle: Option<VmHandle>,
    thread: Option<JoinHandle<()>>,
    /// The write end of the serial input pipe (non-blocking), shared so that writers never
    /// hold the lock while they write.
    input: Option<Arc<PipeWriter>>,
    /// Why the VM is being stopped, when it is not a plain stop (a forced stop after the
    /// timeout): the reason its end reports instead of `stopped`.
    stop_reason: Option<String>,
}

/// Why console input was not sent.
#[derive(Debug)]
pub(crate) enum InputRefused {
    /// There is no VM.
    NoVm,
    /// The guest does not read its serial port: the pipe is full.
    Full,
    /// Writing failed.
    Io(std::io::Error),
}

/// The runtime of one instance.
pub(crate) struct Slot {
    id: Uuid,
    status: watch::Sender<Status>,
    vm: Mutex<Vmm>,
    /// Serial output, kept across runs.
    pub console: ConsoleRing,
    events: Arc<EventLog>,
    /// Boots of the guest so far (first boots and reboots in place), for waiting on a reset.
    boots: std::sync::atomic::AtomicU64,
}

impl Slot {
    /// A stopped instance with an empty console.
    pub fn new(id: Uuid, events: Arc<EventLog>) -> Arc<Self> {
        let status = Status {
            state: InstanceState::Stopped,
            reason: None,
            started_at: None,
        };
        Arc::new(Self {
            id,
            status: watch::channel(status).0,
            vm: Mutex::default(),
            console: ConsoleRing::default(),
            events,
            boots: Default::default(),
        })
    }

    /// The instance's id.
    pub fn id(&self) -> Uuid {
        self.id
    }

    /// The status now.
    pub fn status(&self) -> Status {
        self.status.borrow().clone()
    }

    /// The state now.
    pub fn state(&self) -> InstanceState {
        self.status.borrow().state
    }

    /// Moves to `state` for `reason` and reports it as an event.
    pub fn set(&self, state: InstanceState, reason: Option<String>) {
        self.status.send_modify(|s| {
            s.state = state;
            s.reason = reason.clone();
        });
        self.events
            .push(Subject::InstanceState(self.id), state.as_str(), reason);
    }

    /// Moves from `from` to `to` (reporting it), unless the state is no longer `from`: an
    /// action that ends does not undo what another one started meanwhile.
    pub fn set_if(&self, from: InstanceState, to: InstanceState) {
        let mut moved = false;
        self.status.send_if_modified(|s| {
            moved = s.state == from;
            if moved {
                s.state = to;
                s.reason = None;
            }
            moved
        });
        if moved {
            self.events
                .push(Subject::InstanceState(self.id), to.as_str(), None);
        }
    }

    /// Applies what the VM reported (the lifecycle's [`lifecycle::after`]).
    fn report(&self, report: VmReport, reason: Option<String>) {
        let now = self.state();
        let next = lifecycle::after(now, report);
        if next != now {
            self.set(next, reason);
        }
    }

    /// Waits while `busy(state)`, at most `timeout`; returns the status then.
    pub async fn wait_while(
        &self,
        timeout: Duration,
        busy: impl Fn(InstanceState) -> bool,
    ) -> Status {
        let mut rx = self.status.subscribe();
        let _ = tokio::time::timeout(timeout, rx.wait_for(|s| !busy(s.state))).await;
        let status = rx.borrow().clone();
        status
    }

    /// Waits until a start or reboot has ended, at most `timeout`: `Ok` when it runs.
    pub async fn wait_running(&self, timeout: Duration) -> Result<(), String> {
        let status = self
            .wait_while(timeout, |s| {
                matches!(s, InstanceState::Starting | InstanceState::Rebooting)
            })
            .await;
        match status.state {
            InstanceState::Running => Ok(()),
            s => Err(status.reason.unwrap_or_else(|| format!("instance is {s}"))),
        }
    }

    /// Boots of the guest so far.
    pub fn boots(&self) -> u64 {
        self.boots.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until the guest has booted again after boot number `before` and runs, at most
    /// `timeout` (a reset returns before the VM has acted on it).
    pub async fn wait_booted_after(&self, before: u64, timeout: Duration) -> Result<(), String> {
        let mut rx = self.status.subscribe();
        let done = |s: &Status| {
            let settled = !matches!(
                s.state,
                InstanceState::Running | InstanceState::Rebooting | InstanceState::Starting
            );
            settled || (self.boots() > before && s.state == InstanceState::Running)
        };
        let _ = tokio::time::timeout(timeout, rx.wait_for(done)).await;
        let status = rx.borrow().clone();
        match status.state {
            InstanceState::Running if self.boots() > before => Ok(()),
            InstanceState::Running | InstanceState::Rebooting => Err(format!(
                "the guest did not boot again within {} s",
                timeout.as_secs()
            )),
            s => Err(status.reason.unwrap_or_else(|| format!("instance is {s}"))),
        }
    }

    /// A handle on the VM, while there is one.
    pub fn handle(&self) -> Option<VmHandle> {
        lock(&self.vm).handle.clone()
    }

    /// True when no VM thread runs (none was started, or it ended).
    pub fn vm_ended(&self) -> bool {
        lock(&self.vm)
            .thread
            .as_ref()
            .is_none_or(|t| t.is_finished())
    }

    /// Builds the VM of `config` (first booting in `shell` when it fits) and runs it on a thread
    /// of its own, named after the instance; returns once the thread runs. Blocks while the VM is built.
    pub fn launch(
        self: &Arc<Self>,
        host: Arc<Host>,
        config: VmConfig,
        shell: Option<vmm::VmShell>,
        name: &str,
    ) -> Result<(), String> {
        self.launch_with(name, |console| {
            let mut vm = Vm::new(host, config, console).map_err(|e| e.to_string())?;
            if let Some(s) = shell {
                // A shell that does not fit is dropped: the VM builds its own.
                let _ = vm.use_shell(s);
            }
            Ok(vm)
        })
    }

    /// As [`Slot::launch`], with the VM built by `build` from its console (a restore from a
    /// snapshot builds it so).
    pub fn launch_with(
        self: &Arc<Self>,
        name: &str,
        build: impl FnOnce(Console) -> Result<Vm, String>,
    ) -> Result<(), String> {
        let (input_r, input_w) = std::io::pipe().map_err(|e| format!("console pipe: {e}"))?;
        // A guest that does not read its serial port (or is paused) fills the pipe: writers
        // get an error instead of hanging.
        rustix::io::ioctl_fionbio(&input_w, true).map_err(|e| format!("console pipe: {e}"))?;
        let console = Console {
            output: Box::new(self.console.clone()),
            input: Some(File::from(OwnedFd::from(input_r))),
        };
        let mut vm = build(console)?;
        let slot = Arc::downgrade(self);
        vm.set_observer(Arc::new(move |ev| {
            let Some(slot) = slot.upgrade() else { return };
            match ev {
                VmEvent::Booted { .. } => {
                    slot.boots.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    slot.status.send_modify(|s| {
                        s.started_at.get_or_insert_with(crate::model::now);
                    });
                    slot.report(VmReport::Booted, None);
                }
                VmEvent::Rebooting { reason } => {
                    slot.report(VmReport::Resetting, Some(reason.into()))
                }
                VmEvent::BackingOff { delay, resets } => {
                    let state = slot.state();
                    slot.set(
                        state,
                        Some(format!(
                            "back-off: the guest reset {resets} times in a row soon after \
                             booting; next boot in {} ms",
                            delay.as_millis()
                        )),
                    );
                }
            }
        }));
        {
            let mut v = lock(&self.vm);
            v.handle = Some(vm.handle());
            v.input = Some(Arc::new(input_w));
            v.stop_reason = None;
        }
        self.status.send_modify(|s| s.started_at = None);
        let slot = self.clone();
        let thread = std::thread::Builder::new()
            .name(format!("kiln-vm-{name}"))
            .spawn(move || {
                // A panic in the VM's own thread fails this instance only.
                let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    vmm::sandbox::apply(vmm::sandbox::ThreadKind::Vm)
                        .map_err(vmm::VmError::Build)?;
                    vm.run()
                }));
                drop(vm);
                let (report, reason) = match r {
                    Ok(Ok(Exit::PowerOff)) => (VmReport::Ended, "the guest powered off".into()),
                    Ok(Ok(Exit::Stopped)) => (
                        VmReport::Ended,
                        lock(&slot.vm)
                            .stop_reason
                            .take()
                            .unwrap_or_else(|| "stopped".into()),
                    ),
                    Ok(Err(err)) => (VmReport::Failed, err.to_string()),
                    Err(_) => (
                        VmReport::Failed,
                        "internal error: the VM thread panicked".into(),
                    ),
                };
                {
                    let mut v = lock(&slot.vm);
                    v.handle = None;
                    v.input = None;
                }
                slot.report(report, Some(reason));
            });
        match thread {
            Ok(t) => {
                lock(&self.vm).thread = Some(t);
                Ok(())
            }
            Err(err) => {
                *lock(&self.vm) = Vmm::default();
                Err(format!("cannot start the VM thread: {err}"))
            }
        }
    }

    /// Gives the reason the VM's end reports when it stops (instead of `stopped`).
    pub fn stop_reason(&self, reason: String) {
        lock(&self.vm).stop_reason = Some(reason);
    }

    /// Waits for the VM's thread to end. Blocks.
    pub fn join(&self) {
        let t = lock(&self.vm).thread.take();
        if let Some(t) = t {
            let _ = t.join();
        }
    }

    /// Stops the VM at once and waits for its thread. Blocks.
    pub fn hard_stop(&self) {
        if let Some(h) = self.handle() {
            h.stop();
        }
        self.join();
    }

    /// Sends bytes to the guest's serial port.
    pub fn input(&self, bytes: &[u8]) -> Result<(), InputRefused> {
        let input = lock(&self.vm).input.clone();
        let pipe = input.ok_or(InputRefused::NoVm)?;
        (&*pipe).write_all(bytes).map_err(|e| match e.kind() {
            std::io::ErrorKind::WouldBlock => InputRefused::Full,
            _ => InputRefused::Io(e),
        })
    }
}
