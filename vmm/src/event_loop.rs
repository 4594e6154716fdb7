//! The VM's event-loop thread (`event-manager`): device work that must not run on vCPU threads.
//! It runs the virtio devices' queues and TAP I/O, and feeds the owner's console input to the
//! serial port only as fast as the guest drains the UART's FIFO.

use std::fs::File;
use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use devices::bus::lock;
use devices::serial::Serial;
use devices::virtio::VirtioEvents;
use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;

type Subscriber = Box<dyn MutEventSubscriber + Send>;

/// A running event loop; dropping it does not stop it, [`EventLoop::stop`] does.
pub(crate) struct EventLoop {
    thread: JoinHandle<()>,
    stop: EventFd,
}

impl EventLoop {
    /// Starts the loop with `console` as its console input, if any. A system call the
    /// sandbox refuses to the loop fails the boot through `control`.
    pub fn start(
        console: Option<ConsoleInput>,
        virtio: Vec<VirtioEvents>,
        control: Arc<crate::vm::BootControl>,
    ) -> std::io::Result<Self> {
        let stop = EventFd::new(libc::EFD_NONBLOCK)?;
        let stopper = Stopper {
            evt: stop.try_clone()?,
            done: Arc::new(AtomicBool::new(false)),
        };
        let done = stopper.done.clone();
        let mut em: EventManager<Subscriber> =
            EventManager::new().map_err(|e| std::io::Error::other(format!("{e:?}")))?;
        em.add_subscriber(Box::new(stopper));
        if let Some(c) = console {
            em.add_subscriber(Box::new(c));
        }
        for v in virtio {
            em.add_subscriber(Box::new(v));
        }
        let thread = std::thread::Builder::new()
            .name("kiln-events".into())
            .spawn(move || {
                let fail = |reason: String| {
                    tracing::error!("event loop: {reason}");
                    control.finish(crate::vm::Outcome::Failed(format!("event loop: {reason}")));
                };
                if let Err(e) = crate::sandbox::apply(crate::sandbox::ThreadKind::EventLoop) {
                    fail(e);
                    return;
                }
                while !done.load(Ordering::Acquire) {
                    let r = em.run();
                    if let Some(nr) = crate::sandbox::take_refused() {
                        fail(crate::sandbox::refusal(nr));
                        break;
                    }
                    if let Err(e) = r {
                        tracing::error!("event loop: {e:?}");
                        break;
                    }
                }
            })?;
        Ok(Self { thread, stop })
    }

    /// Stops the loop and waits for its thread.
    pub fn stop(self) {
        let _ = self.stop.write(1);
        let _ = self.thread.join();
    }
}

struct Stopper {
    evt: EventFd,
    done: Arc<AtomicBool>,
}

impl MutEventSubscriber for Stopper {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            tracing::error!("event loop stop fd: {e:?}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.done.store(true, Ordering::Release);
    }
}

/// Console input: bytes from the owner's file descriptor to the serial port.
pub(crate) struct ConsoleInput {
    /// Where the owner's bytes come from (a terminal, a pipe).
    pub input: File,
    /// Signalled by the UART when the guest has drained its receive FIFO.
    pub room: EventFd,
    /// The UART.
    pub serial: Arc<Mutex<Serial>>,
    /// Whether `input` is in the interest list (it leaves it while the FIFO is full).
    pub watching: bool,
    /// The input ended or failed: never watch it again.
    pub closed: bool,
}

impl ConsoleInput {
    fn pump(&mut self, ops: &mut EventOps) {
        let room = lock(&self.serial).input_room();
        if room == 0 {
            self.set_watching(ops, false);
            return;
        }
        let mut buf = [0u8; 64];
        let want = room.min(buf.len());
        match self.input.read(&mut buf[..want]) {
            Ok(0) => {
                self.set_watching(ops, false);
                self.closed = true;
            }
            Ok(n) => {
                let taken = lock(&self.serial).enqueue_input(&buf[..n]);
                debug_assert_eq!(taken, n);
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("console input: {e}");
                self.set_watching(ops, false);
                self.closed = true;
            }
        }
    }

    fn set_watching(&mut self, ops: &mut EventOps, on: bool) {
        if on == self.watching || (on && self.closed) {
            return;
        }
        let ev = Events::new(&self.input, EventSet::IN);
        let r = if on { ops.add(ev) } else { ops.remove(ev) };
        if let Err(e) = r {
            tracing::warn!("console input interest: {e:?}");
        }
        self.watching = on;
    }
}

impl MutEventSubscriber for ConsoleInput {
    fn init(&mut self, ops: &mut EventOps) {
        self.watching = false;
        self.set_watching(ops, true);
        if let Err(e) = ops.add(Events::new(&self.room, EventSet::IN)) {
            tracing::warn!("console room fd: {e:?}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        use std::os::fd::AsRawFd;
        if events.fd() == self.room.as_raw_fd() {
            let _ = self.room.read();
            self.set_watching(ops, true);
        } else if events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR)
            && !events.event_set().contains(EventSet::IN)
        {
            self.set_watching(ops, false);
            self.closed = true;
        } else {
            self.pump(ops);
        }
    }
}
