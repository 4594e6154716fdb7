//! A pool of VM shells ([`vmm::VmShell`]) kept ready so that an instance's start does not wait
//! for KVM to register its memory. Empty unless `kiln serve --vm-pool N` asks for shells: a
//! shell costs a KVM VM and an address-space reservation, no guest RAM until a guest touches
//! it. The pool follows the memory size of the last instance started (256 MiB at first).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use vmm::{Host, VmConfig, VmShell};

/// Memory of the shells built before any instance started.
const FIRST_MEMORY: u64 = 256 << 20;

/// Shells built at once, each on a thread of its own (building one is mostly system calls, so
/// a few overlap well).
const BUILDERS: usize = 4;

/// The shells, and what they are refilled to.
pub(crate) struct ShellPool {
    /// How many shells to keep.
    size: AtomicUsize,
    /// The memory size shells are built for.
    memory: AtomicU64,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    shells: Vec<VmShell>,
    /// Shells being built now.
    building: usize,
    /// Builder threads running.
    builders: usize,
}

impl Default for ShellPool {
    fn default() -> Self {
        Self {
            size: AtomicUsize::new(0),
            memory: AtomicU64::new(FIRST_MEMORY),
            state: Mutex::default(),
        }
    }
}

impl ShellPool {
    /// Keeps `size` shells from now on (building them in the background).
    pub fn resize(self: &Arc<Self>, host: &Arc<Host>, size: usize) {
        self.size.store(size, Ordering::Release);
        lock(&self.state).shells.truncate(size);
        self.refill(host);
    }

    /// Shells ready now, by memory size (bytes), smallest size first.
    pub fn ready(&self) -> Vec<(u64, usize)> {
        let mut by_size = std::collections::BTreeMap::new();
        for s in &lock(&self.state).shells {
            *by_size.entry(s.memory()).or_insert(0) += 1;
        }
        by_size.into_iter().collect()
    }

    /// A shell for a VM of `config`, if one is ready; the pool then follows that memory size
    /// and is refilled in the background.
    pub fn take(self: &Arc<Self>, host: &Arc<Host>, config: &VmConfig) -> Option<VmShell> {
        if self.size.load(Ordering::Acquire) == 0 || config.pit {
            return None;
        }
        self.memory.store(config.memory, Ordering::Release);
        let shell = {
            let mut state = lock(&self.state);
            let i = state.shells.iter().position(|s| s.fits(config));
            i.map(|i| state.shells.swap_remove(i))
        };
        self.refill(host);
        shell
    }

    /// Starts builder threads (at most [`BUILDERS`]) while shells are missing.
    fn refill(self: &Arc<Self>, host: &Arc<Host>) {
        let size = self.size.load(Ordering::Acquire);
        let memory = self.memory.load(Ordering::Acquire);
        loop {
            {
                let mut state = lock(&self.state);
                // Shells of another size do not count: the builders replace them.
                let fitting = state.shells.iter().filter(|s| s.memory() == memory).count();
                let missing = size.saturating_sub(fitting + state.building);
                if state.builders >= BUILDERS.min(missing) {
                    return;
                }
                state.builders += 1;
            }
            let (pool, host) = (self.clone(), host.clone());
            let spawned = std::thread::Builder::new()
                .name("kiln-pool".into())
                .spawn(move || pool.build(&host));
            if let Err(e) = spawned {
                tracing::warn!("VM pool: no thread to build shells on: {e}");
                lock(&self.state).builders -= 1;
                return;
            }
        }
    }

    /// A builder thread: builds shells of the wanted size until none is missing.
    fn build(&self, host: &Host) {
        loop {
            let memory = self.memory.load(Ordering::Acquire);
            {
                let mut state = lock(&self.state);
                // Shells of another size wait for no one: make room for the wanted one.
                state.shells.retain(|s| s.memory() == memory);
                if state.shells.len() + state.building >= self.size.load(Ordering::Acquire) {
                    state.builders -= 1;
                    return;
                }
                state.building += 1;
            }
            let built = VmShell::new(host, memory);
            let mut state = lock(&self.state);
            state.building -= 1;
            match built {
                Ok(s) => state.shells.push(s),
                Err(e) => {
                    tracing::warn!("VM pool: cannot build a shell: {e}");
                    state.builders -= 1;
                    return;
                }
            }
        }
    }
}
