//! Instances as clients see them and as the state directory stores them (API.md).

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// Lifecycle states of an instance (API.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Defined, not running.
    Stopped,
    /// Being built and booted.
    Starting,
    /// The guest runs.
    Running,
    /// vCPUs stopped, memory kept.
    Paused,
    /// Stopping (gracefully, then hard after a timeout).
    Stopping,
    /// Re-booting in place.
    Rebooting,
    /// The VM died; `state_reason` says why.
    Failed,
}

impl InstanceState {
    /// The state's name in the API (as serialised).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stopped => "stopped",
            Self::Starting => "starting",
            Self::Running => "running",
            Self::Paused => "paused",
            Self::Stopping => "stopping",
            Self::Rebooting => "rebooting",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for InstanceState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A size: bytes as an integer, or a string with a binary unit ("512MiB").
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Size {
    /// Bytes.
    Bytes(u64),
    /// With a unit.
    Text(String),
}

impl Size {
    /// The size in bytes.
    pub fn bytes(&self) -> Result<u64, String> {
        match self {
            Size::Bytes(b) => Ok(*b),
            Size::Text(s) => vmm::config::parse_size(s, 1),
        }
    }
}

/// How an instance boots.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSpec {
    /// Kernel image (name or id; `kiln-probe` is built in).
    pub kernel: String,
    /// Initrd image (name or id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<String>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// A NIC as given at create time.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NicSpec {
    /// Name inside the instance's definition (`eth0`).
    #[serde(default)]
    pub name: Option<String>,
    /// Host TAP device, opened (and created if missing) at start.
    pub host_tap: String,
    /// MAC address; generated when absent.
    #[serde(default)]
    pub mac: Option<String>,
}

/// A NIC of an instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Nic {
    /// Name inside the instance's definition.
    pub name: String,
    /// Host TAP device.
    pub host_tap: String,
    /// MAC address.
    pub mac: String,
}

/// A disk attached to an instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct AttachedDisk {
    /// The disk's id.
    pub id: Uuid,
    /// The disk's name.
    pub disk: String,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
}

/// A disk entry of a create request: an existing disk, or a new one made on the spot.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum DiskSpec {
    /// Attach an existing disk.
    Existing(ExistingDisk),
    /// Create a disk and attach it.
    Create(NewDisk),
}

/// `{"disk": "name or id", "read_only": false}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExistingDisk {
    /// The disk.
    pub disk: String,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
}

/// `{"create": {disk create body}, "read_only": false}`.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewDisk {
    /// The body of `POST /v1/disks`.
    pub create: super::disks::DiskCreate,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
}

/// The body of `PATCH /v1/instances/{instance}`.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancePatch {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New description.
    #[serde(default)]
    pub description: Option<String>,
    /// vCPUs (only while stopped).
    #[serde(default)]
    pub vcpus: Option<u32>,
    /// Memory (only while stopped).
    #[serde(default)]
    pub memory: Option<Size>,
    /// Start again when `kiln serve` starts.
    #[serde(default)]
    pub auto_start: Option<bool>,
}

/// The body of a create request.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceCreate {
    /// Unique name.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest memory.
    pub memory: Size,
    /// How it boots.
    pub boot: BootSpec,
    /// Disks to attach (or create and attach).
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// NICs.
    #[serde(default)]
    pub network_interfaces: Vec<NicSpec>,
    /// Start again when `kiln serve` starts.
    #[serde(default)]
    pub auto_start: bool,
    /// Start it right after creating it.
    #[serde(default)]
    pub start: bool,
}

/// What the state directory keeps of an instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceDef {
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
    /// How it boots.
    pub boot: BootSpec,
    /// Attached disks, in the order the guest finds them.
    #[serde(default)]
    pub disks: Vec<AttachedDisk>,
    /// NICs.
    pub network_interfaces: Vec<Nic>,
    /// Start again when `kiln serve` starts.
    pub auto_start: bool,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Bumped on every change; the ETag.
    pub generation: u64,
}

/// An instance as clients see it.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct Instance {
    /// The definition.
    #[serde(flatten)]
    pub def: InstanceDef,
    /// Lifecycle state.
    pub state: InstanceState,
    /// Why it failed (or the last state change's reason).
    pub state_reason: Option<String>,
    /// When the current run started (RFC 3339).
    pub started_at: Option<String>,
}

impl Instance {
    /// The entity tag of the definition (`If-Match`).
    pub fn etag(&self) -> String {
        etag(self.def.id, self.def.generation)
    }
}

/// The entity tag of a definition with `id` at `generation`.
pub(crate) fn etag(id: Uuid, generation: u64) -> String {
    format!("\"{}-{}\"", id.simple(), generation)
}

/// Checks an `If-Match` header against the current entity tag (`*` matches anything).
pub(crate) fn check_if_match(
    if_match: Option<&str>,
    current: &str,
) -> Result<(), super::ManagerError> {
    match if_match {
        Some(tag) if tag != "*" && tag != current => {
            Err(super::ManagerError::PreconditionFailed(current.to_string()))
        }
        _ => Ok(()),
    }
}

/// What an action asks for (API.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ActionKind {
    /// stopped|failed → running.
    Start,
    /// running|paused → stopped.
    Stop,
    /// running → running, via a reboot.
    Reboot,
    /// Hard reset, stays running.
    Reset,
    /// running → paused.
    Pause,
    /// paused → running.
    Resume,
}

/// An action request.
#[derive(Clone, Copy, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Action {
    /// What to do.
    pub action: ActionKind,
    /// Hard stop or hard reset at once.
    #[serde(default)]
    pub force: bool,
    /// Graceful stop: seconds before a hard stop.
    #[serde(default = "default_timeout")]
    pub timeout_s: u64,
}

fn default_timeout() -> u64 {
    30
}

/// Checks an instance name: 1–63 of `[a-z0-9-]`, starting with a letter.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = (1..=63).contains(&name.len())
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1-63 characters of a-z, 0-9 and '-', starting with a letter"
        ))
    }
}

/// Now, as RFC 3339 with milliseconds (definitions load in this order).
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

#[cfg(test)]
mod tests {
    use super::InstanceState::*;

    #[test]
    fn state_names_are_the_serialised_ones() {
        for s in [
            Stopped, Starting, Running, Paused, Stopping, Rebooting, Failed,
        ] {
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
    }
}
