//! A pool of VM shells ([`vmm::VmShell`]) kept ready so that an instance's start skips creating
//! its KVM VM and mapping and registering its memory. Empty unless `kiln serve --vm-pool N`
//! asks for shells: a shell costs a KVM VM and an address-space reservation, no guest RAM
//! until a guest touches it. The pool follows the memory size of the last instance started
//! (256 MiB at first).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use vmm::{Host, VmConfig, VmShell};

/// Memory of the shells built before any instance started.
const FIRST_MEMORY: u64 = 256 << 20;

/// The shells, and what they are refilled to.
pub(crate) struct ShellPool {
    /// How many shells to keep.
    size: AtomicUsize,
    /// The memory size shells are built for.
    memory: AtomicU64,
    shells: Mutex<Vec<VmShell>>,
    /// The builder thread is running (there is at most one: a shell takes well under a
    /// millisecond to build).
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

    /// Shells ready now, by memory size (bytes), smallest size first.
    pub fn ready(&self) -> Vec<(u64, usize)> {
        let mut by_size = std::collections::BTreeMap::new();
        for s in lock(&self.shells).iter() {
            *by_size.entry(s.memory()).or_insert(0) += 1;
        }
        by_size.into_iter().collect()
    }

    /// A shell for a VM of `config`, if one is ready; the pool then follows that memory size
    /// and is refilled in the background.
    pub fn take(self: &Arc<Self>, host: &Arc<Host>, config: &VmConfig) -> Option<VmShell> {
        if self.size.load(Ordering::Acquire) == 0 {
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

    /// Starts the builder thread unless it runs: it builds shells of the wanted size until
    /// there are enough, then ends.
    fn refill(self: &Arc<Self>, host: &Arc<Host>) {
        if self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let (pool, host) = (self.clone(), host.clone());
        let spawned = std::thread::Builder::new()
            .name("kiln-pool".into())
            .spawn(move || pool.build(&host));
        if let Err(e) = spawned {
            tracing::warn!("VM pool: no thread to build shells on: {e}");
            self.filling.store(false, Ordering::Release);
        }
    }

    /// The builder thread.
    fn build(&self, host: &Host) {
        loop {
            while self.short() {
                let memory = self.memory.load(Ordering::Acquire);
                match VmShell::new(host, memory) {
                    Ok(s) => lock(&self.shells).push(s),
                    Err(e) => {
                        tracing::warn!("VM pool: cannot build a shell: {e}");
                        self.filling.store(false, Ordering::Release);
                        return;
                    }
                }
            }
            self.filling.store(false, Ordering::Release);
            // A start between the last look and here saw this thread running and left the
            // refill to it: look once more.
            if !self.short() || self.filling.swap(true, Ordering::AcqRel) {
                return;
            }
        }
    }

    /// Whether shells of the wanted size are missing; drops those of another size (they
    /// wait for no one: room for the wanted ones).
    fn short(&self) -> bool {
        let memory = self.memory.load(Ordering::Acquire);
        let mut shells = lock(&self.shells);
        shells.retain(|s| s.memory() == memory);
        shells.len() < self.size.load(Ordering::Acquire)
    }
}
