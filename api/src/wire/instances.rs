//! Instances on the wire: what create, PATCH, actions and attach take, and the instance as
//! responses show it.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::disks::DiskCreate;
use super::values::{ActionKind, InstanceState, Mac, Size};

/// How an instance boots.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    /// Kernel image, by name or id (`kiln-probe` is built in). Responses give its name.
    #[schema(example = "kiln-probe")]
    pub kernel: String,
    /// Initrd image, by name or id. Responses give its name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    #[schema(example = "console=ttyS0")]
    pub cmdline: String,
}

/// A NIC as given at create time.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Name inside the instance's definition; `eth<N>` when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Host TAP device (1-15 characters, no `/` or spaces), opened (and created if missing)
    /// when the instance starts.
    pub host_tap: String,
    /// MAC address; generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
}

/// An existing disk to attach at create time.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExistingDisk {
    /// The disk, by name or id; it must not be attached to another instance.
    pub disk: String,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
}

/// A disk to create and attach at create time.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDisk {
    /// The body of `POST /v1/disks`.
    pub create: DiskCreate,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
}

/// A disk entry of a create request: an existing disk, or a new one made on the spot.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum DiskSpec {
    /// Attach an existing disk.
    Existing(ExistingDisk),
    /// Create a disk and attach it.
    Create(NewDisk),
}

/// The body of `POST /v1/instances`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceCreate {
    /// Unique name: 1-63 of `[a-z0-9-]`, starting with a letter.
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$", example = "web-1")]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// vCPUs (at least 1; at most what the host's KVM allows, else 413
    /// `insufficient_capacity`).
    #[schema(minimum = 1, example = 1)]
    pub vcpus: u32,
    /// Guest memory.
    pub memory: Size,
    /// How it boots.
    pub boot: BootSpec,
    /// Disks to attach (or create and attach), in the order the guest finds them.
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// NICs, in the order the guest finds them (after the disks).
    #[serde(default)]
    pub network_interfaces: Vec<NicSpec>,
    /// Start it again whenever `kiln serve` starts.
    #[serde(default)]
    pub auto_start: bool,
    /// Start it right after creating it.
    #[serde(default)]
    pub start: bool,
}

/// Changes to how an instance boots (only while it is stopped): absent fields stay.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BootPatch {
    /// Kernel image (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<String>,
    /// Initrd image (name or id); `""` for none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// The body of `PATCH /v1/instances/{instance}`: absent fields stay as they are.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstancePatch {
    /// New name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$")]
    pub name: Option<String>,
    /// New description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// vCPUs (only while stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1)]
    pub vcpus: Option<u32>,
    /// Memory (only while stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Size>,
    /// Start it again whenever `kiln serve` starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auto_start: Option<bool>,
    /// Boot settings (only while stopped).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootPatch>,
}

fn default_timeout() -> u64 {
    control::DEFAULT_STOP_TIMEOUT.as_secs()
}

/// The body of `POST /v1/instances/{instance}/actions`.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ActionRequest {
    /// What to do.
    pub action: ActionKind,
    /// `stop`: a hard stop at once; `reboot`: a hard reset at once.
    #[serde(default)]
    pub force: bool,
    /// A graceful stop or reboot waits this many seconds for the guest, then is made hard.
    #[serde(default = "default_timeout")]
    #[schema(default = 30)]
    pub timeout_s: u64,
}

/// The body of `POST /v1/instances/{instance}/disks`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AttachRequest {
    /// The disk, by name or id.
    pub disk: String,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
}

/// A disk attached to an instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct AttachedDisk {
    /// The disk's id.
    pub id: Uuid,
    /// The disk's name.
    pub disk: String,
    /// The guest may not write.
    pub read_only: bool,
}

/// A NIC of an instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Nic {
    /// Name inside the instance's definition.
    pub name: String,
    /// Host TAP device.
    pub host_tap: String,
    /// MAC address.
    pub mac: Mac,
}

/// An instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Instance {
    /// UUID.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// How it boots (images by name).
    pub boot: BootSpec,
    /// Attached disks, in the order the guest finds them.
    pub disks: Vec<AttachedDisk>,
    /// NICs.
    pub network_interfaces: Vec<Nic>,
    /// Starts again whenever `kiln serve` starts.
    pub auto_start: bool,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Bumped on every change of the definition (the `ETag` is made of it).
    pub generation: u64,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Why it is in this state (a failure, a guest power-off), when there is a reason.
    pub state_reason: Option<String>,
    /// When the current run started (RFC 3339).
    pub started_at: Option<String>,
}

impl From<control::InstanceView> for Instance {
    fn from(v: control::InstanceView) -> Self {
        let d = v.def;
        Self {
            id: d.id,
            name: d.name,
            description: d.description,
            vcpus: d.vcpus,
            memory: d.memory,
            boot: BootSpec {
                kernel: v.kernel,
                initrd: v.initrd,
                cmdline: d.boot.cmdline,
            },
            disks: v
                .disks
                .into_iter()
                .map(|a| AttachedDisk {
                    id: a.id,
                    disk: a.name,
                    read_only: a.read_only,
                })
                .collect(),
            network_interfaces: d
                .network_interfaces
                .into_iter()
                .map(|n| Nic {
                    name: n.name,
                    host_tap: n.host_tap,
                    mac: Mac(n.mac),
                })
                .collect(),
            auto_start: d.auto_start,
            created_at: d.created_at,
            updated_at: d.updated_at,
            generation: d.generation,
            state: v.status.state.into(),
            state_reason: v.status.reason,
            started_at: v.status.started_at,
        }
    }
}

impl From<InstanceCreate> for control::NewInstance {
    fn from(c: InstanceCreate) -> Self {
        Self {
            name: c.name,
            description: c.description,
            vcpus: c.vcpus,
            memory: c.memory.0,
            kernel: c.boot.kernel,
            initrd: c.boot.initrd,
            cmdline: c.boot.cmdline,
            disks: c
                .disks
                .into_iter()
                .map(|d| match d {
                    DiskSpec::Existing(e) => control::DiskChoice::Existing {
                        disk: e.disk,
                        read_only: e.read_only,
                    },
                    DiskSpec::Create(n) => control::DiskChoice::Create {
                        disk: n.create.into(),
                        read_only: n.read_only,
                    },
                })
                .collect(),
            nics: c
                .network_interfaces
                .into_iter()
                .map(|n| control::NewNic {
                    name: n.name,
                    host_tap: n.host_tap,
                    mac: n.mac.map(|m| m.0),
                })
                .collect(),
            auto_start: c.auto_start,
            start: c.start,
        }
    }
}

impl From<InstancePatch> for control::InstanceChanges {
    fn from(p: InstancePatch) -> Self {
        Self {
            name: p.name,
            description: p.description,
            vcpus: p.vcpus,
            memory: p.memory.map(|m| m.0),
            auto_start: p.auto_start,
            kernel: p.boot.as_ref().and_then(|b| b.kernel.clone()),
            initrd: p.boot.as_ref().and_then(|b| b.initrd.clone()),
            cmdline: p.boot.and_then(|b| b.cmdline),
        }
    }
}

impl From<ActionRequest> for control::ActionRequest {
    fn from(a: ActionRequest) -> Self {
        Self {
            action: a.action.into(),
            force: a.force,
            timeout: std::time::Duration::from_secs(a.timeout_s),
        }
    }
}
