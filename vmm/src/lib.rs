//! The Kiln VM: KVM, guest memory, vCPU threads, the per-VM event loop and the lifecycle
//! (power-off ends the VM, a guest reset re-boots it in place, an internal error fails it),
//! and snapshots: of a whole VM ([`VmHandle::snapshot`], [`Vm::restore`], see [`snapshot`])
//! and of one disk while it runs ([`VmHandle::snapshot_disk`]).

#![warn(missing_docs)]

pub mod backoff;
pub mod config;
mod cpu_state;
mod event_loop;
pub mod host;
mod machine;
pub mod sandbox;
mod shell;
pub mod snapshot;
mod vcpu;
pub mod vm;

pub use config::{parse_size, ConfigError, DiskConfig, KernelImage, MacAddr, NetConfig, VmConfig};
pub use host::Host;
pub use shell::VmShell;
pub use snapshot::{
    DiskSnapshot, DiskSnapshotReport, PreparedVm, Snapshot, SnapshotError, SnapshotReport,
};
pub use vcpu::{exit_counts, ExitReason};
pub use vm::{
    Console, Exit, HandleError, RestoreOptions, Vm, VmError, VmEvent, VmHandle, VmObserver,
};
