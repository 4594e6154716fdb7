//! What callers ask for: new instances, disks and images, changes to them, actions. Values are
//! typed (bytes, formats, MACs); resources they refer to are named by name or id and resolved
//! against the catalog.

use std::path::PathBuf;
use std::time::Duration;

use images::Format;
use vmm::MacAddr;

use crate::lifecycle::Action;
use crate::model::ImageKind;

/// A new instance.
#[derive(Clone, Debug)]
pub struct NewInstance {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory in bytes.
    pub memory: u64,
    /// The kernel image (name or id).
    pub kernel: String,
    /// The initrd image (name or id).
    pub initrd: Option<String>,
    /// Kernel command line.
    pub cmdline: String,
    /// Disks to attach, or to create and attach, in guest order.
    pub disks: Vec<DiskChoice>,
    /// NICs, in guest order.
    pub nics: Vec<NewNic>,
    /// Start again when the control plane opens.
    pub auto_start: bool,
    /// Start it once created.
    pub start: bool,
}

/// A disk of a new instance.
#[derive(Clone, Debug)]
pub enum DiskChoice {
    /// An existing disk (name or id), not attached elsewhere.
    Existing {
        /// The disk.
        disk: String,
        /// The guest may not write.
        read_only: bool,
    },
    /// A disk made for the instance.
    Create {
        /// The disk.
        disk: NewDisk,
        /// The guest may not write.
        read_only: bool,
    },
}

/// A NIC of a new instance.
#[derive(Clone, Debug)]
pub struct NewNic {
    /// Name inside the definition; `eth<N>` when absent.
    pub name: Option<String>,
    /// Host TAP device, opened (and created if missing) at start.
    pub host_tap: String,
    /// MAC address; a random one when absent.
    pub mac: Option<MacAddr>,
}

/// A new disk.
#[derive(Clone, Debug)]
pub struct NewDisk {
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Virtual size in bytes; for an image or disk source, the source's size when absent.
    pub size: Option<u64>,
    /// 512 (when absent) or 4096.
    pub block_size: Option<u32>,
    /// The format of its file: qcow2 by default for an image source (an overlay), the source
    /// disk's for a copy, raw otherwise.
    pub format: Option<Format>,
    /// Where its content comes from.
    pub source: SourceRef,
}

/// Where a new disk's content comes from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SourceRef {
    /// Zeros.
    Blank,
    /// A base disk image (name or id).
    Image(String),
    /// A copy of a disk (name or id).
    Disk(String),
    /// A copy of a disk's snapshot.
    Snapshot {
        /// The disk (name or id).
        disk: String,
        /// The snapshot's name.
        snapshot: String,
    },
}

/// Changes to an instance; absent fields stay.
#[derive(Clone, Debug, Default)]
pub struct InstanceChanges {
    /// New name.
    pub name: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// vCPUs (only while stopped).
    pub vcpus: Option<u32>,
    /// Memory in bytes (only while stopped).
    pub memory: Option<u64>,
    /// Start again when the control plane opens.
    pub auto_start: Option<bool>,
    /// Kernel image, name or id (only while stopped).
    pub kernel: Option<String>,
    /// Initrd image, name or id; empty for none (only while stopped).
    pub initrd: Option<String>,
    /// Kernel command line (only while stopped).
    pub cmdline: Option<String>,
}

/// Changes to a disk; absent fields stay.
#[derive(Clone, Debug, Default)]
pub struct DiskChanges {
    /// New name.
    pub name: Option<String>,
    /// New description.
    pub description: Option<String>,
    /// New size in bytes: it may only grow, and only while the disk is detached.
    pub size: Option<u64>,
}

/// An image registered from a file in an image directory.
#[derive(Clone, Debug)]
pub struct NewImage {
    /// Unique name.
    pub name: String,
    /// What it is for.
    pub kind: ImageKind,
    /// The file.
    pub path: PathBuf,
    /// Free text.
    pub description: String,
}

/// An action on an instance.
#[derive(Clone, Copy, Debug)]
pub struct ActionRequest {
    /// What to do.
    pub action: Action,
    /// Stop or reboot with a hard stop or reset at once.
    pub force: bool,
    /// A graceful stop or reboot waits this long for the guest before it is made hard.
    pub timeout: Duration,
}

/// How long a graceful stop waits for the guest by default (API.md).
pub const DEFAULT_STOP_TIMEOUT: Duration = Duration::from_secs(30);

impl ActionRequest {
    /// `action`, not forced, with the default timeout.
    pub fn new(action: Action) -> Self {
        Self {
            action,
            force: false,
            timeout: DEFAULT_STOP_TIMEOUT,
        }
    }
}
