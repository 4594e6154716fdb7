//! The API's wire types: request and response bodies with their OpenAPI schemas, and their
//! conversions to and from the control plane's types. The typed client uses the same types.

mod disks;
mod instances;
mod operations;
mod snapshots;
mod values;

pub use disks::{
    Disk, DiskCreate, DiskPatch, DiskSource, DiskSourceSpec, Image, ImageCreate, ImageSourceSpec,
};
pub use instances::{
    ActionRequest, AttachRequest, AttachedDisk, BootPatch, BootSpec, DiskSpec, ExistingDisk,
    Instance, InstanceCreate, InstancePatch, NewDisk, Nic, NicSpec,
};
pub use operations::{Event, Operation};
pub use snapshots::{
    CreatedInstances, DiskSnapshot, DiskSnapshotCreate, InstanceCreateRequest, InstanceRestore,
    RestoreNic, RestoreSource, Snapshot, SnapshotCreate, SnapshotDisk,
};
pub use values::{ActionKind, DiskFormat, ImageKind, InstanceState, Mac, OperationState, Size};
