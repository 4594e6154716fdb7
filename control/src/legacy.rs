//! Instance definitions as earlier versions of Kiln wrote them: images named by the name or id
//! a client gave, attached disks with their names, MACs as text. They are read once, when the
//! control plane opens, turned into current definitions (images by id) and saved again.

use serde::Deserialize;
use uuid::Uuid;

use crate::model::{Attachment, Boot, Image, InstanceDef, Nic};
use crate::store::Record;

/// An instance definition in the store: current, or as an earlier version wrote it.
#[derive(Deserialize)]
#[serde(untagged)]
pub(crate) enum StoredInstance {
    /// The current format.
    Current(InstanceDef),
    /// An earlier one.
    Legacy(LegacyInstance),
}

impl Record for StoredInstance {
    const DIR: &'static str = InstanceDef::DIR;
    fn id(&self) -> Uuid {
        match self {
            StoredInstance::Current(d) => d.id,
            StoredInstance::Legacy(d) => d.id,
        }
    }
}

impl StoredInstance {
    /// When it was created (RFC 3339), which orders definitions.
    pub fn created_at(&self) -> &str {
        match self {
            StoredInstance::Current(d) => &d.created_at,
            StoredInstance::Legacy(d) => &d.created_at,
        }
    }
}

impl serde::Serialize for StoredInstance {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            StoredInstance::Current(d) => d.serialize(s),
            StoredInstance::Legacy(_) => Err(serde::ser::Error::custom(
                "a legacy definition is converted before it is saved",
            )),
        }
    }
}

/// An instance definition of an earlier version.
#[derive(Deserialize)]
pub(crate) struct LegacyInstance {
    id: Uuid,
    name: String,
    description: String,
    vcpus: u8,
    memory: u64,
    boot: LegacyBoot,
    #[serde(default)]
    disks: Vec<LegacyAttachment>,
    network_interfaces: Vec<Nic>,
    auto_start: bool,
    created_at: String,
    updated_at: String,
    generation: u64,
}

#[derive(Deserialize)]
struct LegacyBoot {
    /// The kernel image's name or id.
    kernel: String,
    #[serde(default)]
    initrd: Option<String>,
    #[serde(default)]
    cmdline: String,
}

#[derive(Deserialize)]
struct LegacyAttachment {
    /// The disk's id (its name was kept beside it).
    id: Uuid,
    #[serde(default)]
    read_only: bool,
}

impl LegacyInstance {
    /// The current definition, its images found by name or id among `images`; `None` (with
    /// a warning) when one is gone.
    pub fn convert(self, images: &[Image]) -> Option<InstanceDef> {
        let find = |key: &str| {
            let found = images
                .iter()
                .find(|i| i.name == key || i.id.to_string() == key)
                .map(|i| i.id);
            if found.is_none() {
                tracing::warn!("skipping instance {}: its image {key:?} is gone", self.name);
            }
            found
        };
        let kernel = find(&self.boot.kernel)?;
        let initrd = match &self.boot.initrd {
            Some(i) => Some(find(i)?),
            None => None,
        };
        Some(InstanceDef {
            id: self.id,
            name: self.name,
            description: self.description,
            vcpus: self.vcpus,
            memory: self.memory,
            boot: Boot {
                kernel,
                initrd,
                cmdline: self.boot.cmdline,
            },
            disks: self
                .disks
                .into_iter()
                .map(|a| Attachment {
                    disk: a.id,
                    read_only: a.read_only,
                })
                .collect(),
            network_interfaces: self.network_interfaces,
            auto_start: self.auto_start,
            restore: None,
            created_at: self.created_at,
            updated_at: self.updated_at,
            generation: self.generation,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ImageKind, PROBE_IMAGE_ID};

    #[test]
    fn an_earlier_definition_becomes_a_current_one() {
        let old = serde_json::json!({
            "id": "7f0c6a4e-2b1d-4a51-9f37-3c1e8e2d9b10", "name": "web-1", "description": "",
            "vcpus": 1, "memory": 67108864,
            "boot": {"kernel": "kiln-probe", "cmdline": "console=ttyS0"},
            "disks": [{"id": "0b3f2a8e-6d4c-4e1f-8a2b-9c7d5e3f1a20", "disk": "root", "read_only": true}],
            "network_interfaces": [{"name": "eth0", "host_tap": "tap0", "mac": "02:00:00:00:00:01"}],
            "auto_start": false, "created_at": "2026-01-01T00:00:00.000Z",
            "updated_at": "2026-01-01T00:00:00.000Z", "generation": 3
        });
        let StoredInstance::Legacy(old) = serde_json::from_value(old).unwrap() else {
            panic!("read as current")
        };
        let probe = crate::images::probe_image(1);
        assert_eq!(probe.kind, ImageKind::Kernel);
        let def = old.convert(&[probe]).unwrap();
        assert_eq!(def.boot.kernel, PROBE_IMAGE_ID);
        assert_eq!(
            def.disks[0].disk.to_string(),
            "0b3f2a8e-6d4c-4e1f-8a2b-9c7d5e3f1a20"
        );
        assert!(def.disks[0].read_only);
        assert_eq!(def.generation, 3);
        // Current definitions read as current.
        let again: StoredInstance =
            serde_json::from_value(serde_json::to_value(&def).unwrap()).unwrap();
        assert!(matches!(again, StoredInstance::Current(d) if d == def));
    }
}
