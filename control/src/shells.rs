//! A pool of VM shells ([`vmm::VmShell`]) kept ready so that an instance's start does not wait
//! for KVM to register its memory. Empty unless `kiln serve --vm-pool N` asks for shells: a
//! shell costs a KVM VM and an address-space reservation, no guest RAM until a guest touches
//! it. The pool follows the memory size of the last instance started (256 MiB at first).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use vmm::{Host, VmConfig, VmShell};

use devices::bus::lock;

/// Memory of the shells built before any instance started.
const FIRST_MEMORY: u64 = 256 << 20;

/// The shells, and what they are refilled to.
pub(crate) struct ShellPool {
    /// How many shells to keep.
    size: AtomicUsize,
    /// The memory size shells are built for.
    memory: AtomicU64,
    shells: Mutex<Vec<VmShell>>,
    /// A refill thread is running.
    filling: AtomicBool,
}

impl Default for ShellPool {
    fn default() -> Self {
        Self {
            size: AtomicUsize::new(0),
            memory: AtomicU64::new(FIRST_MEMORY),
            shells: Mutex::default(),
            filling: AtomicBool::new(false),
        }
    }
}

impl ShellPool {
    /// Keeps `size` shells from now on (building them in the background).
    pub fn resize(self: &Arc<Self>, host: &Arc<Host>, size: usize) {
        self.size.store(size, Ordering::Release);
        lock(&self.shells).truncate(size);
        self.refill(host);
    }

    /// Shells ready now.
    pub fn ready(&self) -> usize {
        lock(&self.shells).len()
    }

    /// A shell for a VM of `config`, if one is ready; the pool then follows that memory size
    /// and is refilled in the background.
    pub fn take(self: &Arc<Self>, host: &Arc<Host>, config: &VmConfig) -> Option<VmShell> {
        if self.size.load(Ordering::Acquire) == 0 || config.pit {
            return None;
        }
        self.memory.store(config.memory, Ordering::Release);
        let shell = {
            let mut shells = lock(&self.shells);
            let i = shells.iter().position(|s| s.fits(config));
            i.map(|i| shells.swap_remove(i))
        };
        self.refill(host);
        shell
    }

    /// Builds shells on a thread of its own until there are enough of the wanted size; one
    /// such thread at a time.
    fn refill(self: &Arc<Self>, host: &Arc<Host>) {
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, host) = (self.clone(), host.clone());
        let spawned = std::thread::Builder::new()
            .name("kiln-pool".into())
            .spawn(move || {
                loop {
                    let memory = pool.memory.load(Ordering::Acquire);
                    let short = {
                        let mut shells = lock(&pool.shells);
                        // Shells of another size wait for no one: make room for the wanted one.
                        shells.retain(|s| s.memory() == memory);
                        shells.len() < pool.size.load(Ordering::Acquire)
                    };
                    if !short {
                        break;
                    }
                    match VmShell::new(&host, memory) {
                        Ok(s) => lock(&pool.shells).push(s),
                        Err(e) => {
                            tracing::warn!("VM pool: cannot build a shell: {e}");
                            break;
                        }
                    }
                }
                pool.filling.store(false, Ordering::Release);
            });
        if let Err(e) = spawned {
            tracing::warn!("VM pool: no thread to build shells on: {e}");
            self.filling.store(false, Ordering::Release);
        }
    }
}
