//! Snapshots on the wire: instance snapshots, disk snapshots, and instances created from a
//! snapshot (one restored, or clones).

use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::instances::{Instance, InstanceCreate, Nic};
use super::values::Mac;

/// The body of `POST /v1/instances/{instance}/snapshots`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreate {
    /// Unique name among instance snapshots: 1-63 of `[a-z0-9-]`, starting with a letter.
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$", example = "warm")]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Leave the instance stopped afterwards; by default it resumes.
    #[serde(default)]
    pub stop: bool,
}

/// A disk of the instance a snapshot was taken of.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct SnapshotDisk {
    /// The disk's name then.
    pub name: String,
    /// Its virtual size in bytes.
    pub size: u64,
    /// Its logical block size.
    pub block_size: u32,
    /// The guest could not write it.
    pub read_only: bool,
}

/// An instance snapshot: guest memory, the machine's state, a copy of each disk and the
/// console history, at one instant.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Snapshot {
    /// UUID.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// The instance it was taken of (it may be gone since).
    pub instance: Uuid,
    /// That instance's name then.
    pub instance_name: String,
    /// vCPUs.
    pub vcpus: u8,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Its disks, in guest order.
    pub disks: Vec<SnapshotDisk>,
    /// Its NICs.
    pub network_interfaces: Vec<Nic>,
    /// Bytes of guest memory saved (the pages that held data).
    pub memory_saved: u64,
    /// How long the guest was paused for it, in microseconds.
    pub paused_us: u64,
    /// Bytes its files take on the host.
    pub actual_size: u64,
    /// RFC 3339.
    pub created_at: String,
}

impl From<control::SnapshotView> for Snapshot {
    fn from(v: control::SnapshotView) -> Self {
        let d = v.def;
        Self {
            id: d.id,
            name: d.name,
            description: d.description,
            instance: d.instance,
            instance_name: d.instance_name,
            vcpus: d.vcpus,
            memory: d.memory,
            disks: d
                .disks
                .into_iter()
                .map(|s| SnapshotDisk {
                    name: s.name,
                    size: s.size,
                    block_size: s.block_size,
                    read_only: s.read_only,
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
            memory_saved: d.memory_saved,
            paused_us: d.paused_us,
            actual_size: v.actual_size,
            created_at: d.created_at,
        }
    }
}

/// The body of `POST /v1/disks/{disk}/snapshots`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSnapshotCreate {
    /// Unique name among the disk's snapshots: 1-63 of `[a-z0-9-]`, starting with a letter.
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$", example = "before-upgrade")]
    pub name: String,
}

/// A snapshot of a disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct DiskSnapshot {
    /// The disk's name.
    pub disk: String,
    /// The snapshot's name.
    pub name: String,
    /// The disk's virtual size when it was taken, in bytes.
    pub size: u64,
    /// When it was taken (RFC 3339).
    pub created_at: String,
    /// For a raw disk, bytes its copy takes on the host (near zero for a reflink); absent
    /// for a qcow2 disk, whose snapshots share its file.
    pub actual_size: Option<u64>,
}

impl From<control::DiskSnapshotView> for DiskSnapshot {
    fn from(v: control::DiskSnapshotView) -> Self {
        Self {
            disk: v.disk,
            name: v.name,
            size: v.size,
            created_at: v.created_at,
            actual_size: v.actual_size,
        }
    }
}

/// Where a restored instance comes from.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreSource {
    /// The instance snapshot, by name or id.
    pub snapshot: String,
}

/// A NIC of a restored instance: what to change of the snapshot's.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RestoreNic {
    /// Another host TAP device (a clone gets `<tap><N>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host_tap: Option<String>,
    /// Another MAC (not with `count`: clones get fresh ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<Mac>,
}

/// The body of `POST /v1/instances` that restores a snapshot: one instance, or `count`
/// clones named `<name>-1` … `<name>-<count>`. Each gets its own disks (qcow2 overlays on the
/// snapshot's disk copies) and its own name; its first start continues the guest where the
/// snapshot paused it, its memory shared copy-on-write with the other clones.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct InstanceRestore {
    /// The name; with `count`, the prefix of the names.
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$", example = "web-restored")]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The snapshot.
    pub source: RestoreSource,
    /// Clones: this many instances (1 to 256), each with fresh MACs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(minimum = 1, maximum = 256)]
    pub count: Option<u32>,
    /// A fresh MAC for each NIC; by default a single restore keeps the snapshot's.
    #[serde(default)]
    pub fresh_mac: bool,
    /// Per NIC, in order: changes to the snapshot's.
    #[serde(default)]
    pub network_interfaces: Vec<RestoreNic>,
    /// Start it again whenever `kiln serve` starts (it boots afresh then).
    #[serde(default)]
    pub auto_start: bool,
    /// Restore it right away (start it).
    #[serde(default)]
    pub start: bool,
}

impl From<InstanceRestore> for control::NewRestore {
    fn from(r: InstanceRestore) -> Self {
        Self {
            name: r.name,
            description: r.description,
            snapshot: r.source.snapshot,
            count: r.count,
            fresh_mac: r.fresh_mac,
            nics: r
                .network_interfaces
                .into_iter()
                .map(|n| control::RestoreNic {
                    host_tap: n.host_tap,
                    mac: n.mac.map(|m| m.0),
                })
                .collect(),
            auto_start: r.auto_start,
            start: r.start,
        }
    }
}

/// The body of `POST /v1/instances`: a new instance that boots, or one restored from a
/// snapshot (a body with `source`).
#[derive(Clone, Debug, Serialize, ToSchema)]
#[serde(untagged)]
pub enum InstanceCreateRequest {
    /// A new instance that boots its kernel.
    Boot(InstanceCreate),
    /// Instances restored from a snapshot.
    Restore(InstanceRestore),
}

impl<'de> Deserialize<'de> for InstanceCreateRequest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = serde_json::Value::deserialize(d)?;
        if v.get("source").is_some() {
            serde_json::from_value(v)
                .map(Self::Restore)
                .map_err(D::Error::custom)
        } else {
            serde_json::from_value(v)
                .map(Self::Boot)
                .map_err(D::Error::custom)
        }
    }
}

/// The body of a `201` from `POST /v1/instances`: the instance, or with `count` the clones.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(untagged)]
pub enum CreatedInstances {
    /// The new instance.
    One(Box<Instance>),
    /// The clones, in order.
    Many(Vec<Instance>),
}
