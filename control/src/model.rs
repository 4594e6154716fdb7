//! What the state directory keeps: the definitions of instances, disks and images. They refer
//! to each other by id; names are looked up when a view is made, so that a rename changes one
//! definition only. MACs and formats are typed values, parsed once when a client sends them.

use std::path::PathBuf;

use images::Format;
use serde::{Deserialize, Serialize};
use uuid::Uuid;
use vmm::MacAddr;

/// One version of a definition: its id and how many times it changed. A client that read a
/// definition names the revision it read to change it only if nobody changed it since.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Revision {
    /// The definition's id.
    pub id: Uuid,
    /// Bumped on every change.
    pub generation: u64,
}

/// An instance's definition.
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
    pub boot: Boot,
    /// Attached disks, in the order the guest finds them.
    #[serde(default)]
    pub disks: Vec<Attachment>,
    /// NICs, in the order the guest finds them (after the disks).
    pub network_interfaces: Vec<Nic>,
    /// Start again when the control plane opens.
    pub auto_start: bool,
    /// The instance snapshot its next start restores (instead of booting the kernel); cleared
    /// once it was restored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<Uuid>,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Bumped on every change.
    pub generation: u64,
}

impl InstanceDef {
    /// This version of the definition.
    pub fn revision(&self) -> Revision {
        Revision {
            id: self.id,
            generation: self.generation,
        }
    }
}

/// How an instance boots: images by id.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Boot {
    /// The kernel image.
    pub kernel: Uuid,
    /// The initrd image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<Uuid>,
    /// Kernel command line.
    #[serde(default)]
    pub cmdline: String,
}

/// A disk attached to an instance.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Attachment {
    /// The disk's id.
    pub disk: Uuid,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
}

/// A NIC of an instance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Nic {
    /// Name inside the instance's definition (`eth0`).
    pub name: String,
    /// Host TAP device.
    pub host_tap: String,
    /// MAC address.
    #[serde(with = "mac_text")]
    pub mac: MacAddr,
}

/// A disk's definition. Its file is `<state>/disks/<id>.<format>`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct DiskDef {
    /// UUID.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// How the file stores the disk.
    #[serde(with = "format_name")]
    pub format: Format,
    /// Virtual size in bytes.
    pub size: u64,
    /// Logical block size the guest sees: 512 or 4096.
    pub block_size: u32,
    /// Where the content came from.
    pub source: Origin,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Bumped on every change.
    pub generation: u64,
}

impl DiskDef {
    /// This version of the definition.
    pub fn revision(&self) -> Revision {
        Revision {
            id: self.id,
            generation: self.generation,
        }
    }
}

/// Where a disk's first content came from.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Origin {
    /// Zeros.
    Blank,
    /// A base disk image: a qcow2 overlay on it, or a copy.
    Image {
        /// The image's id.
        image: Uuid,
    },
    /// A copy of another disk.
    Disk {
        /// The disk's id.
        disk: Uuid,
    },
    /// A byte stream.
    Import,
    /// A qcow2 overlay on a disk copy inside an instance snapshot (a restored instance's or
    /// a clone's disk).
    Snapshot {
        /// The instance snapshot's id.
        snapshot: Uuid,
    },
}

/// What an image is for.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "snake_case")]
pub enum ImageKind {
    /// A guest kernel.
    Kernel,
    /// An initrd.
    Initrd,
    /// A base disk image that disks are made from.
    Disk,
}

impl ImageKind {
    /// Every kind.
    pub const ALL: [ImageKind; 3] = [Self::Kernel, Self::Initrd, Self::Disk];

    /// The kind's name (`kernel`, `initrd`, `disk`).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Initrd => "initrd",
            Self::Disk => "disk",
        }
    }
}

impl std::fmt::Display for ImageKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An image's definition (kept in `<state>/images/<id>.json`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Image {
    /// UUID.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// What it is for.
    pub kind: ImageKind,
    /// The file (absent for the built-in probe guest).
    pub path: Option<PathBuf>,
    /// For disk images, how the file stores the disk.
    #[serde(with = "format_name::optional")]
    pub format: Option<Format>,
    /// For disk images the virtual size, else the file's size.
    pub size: u64,
    /// Uploaded into the state directory (deleted with the image) or registered in place.
    pub uploaded: bool,
    /// Built into kiln; cannot be deleted.
    #[serde(default)]
    pub builtin: bool,
    /// RFC 3339.
    pub created_at: String,
}

/// The name of the image that is always there: the probe guest built into kiln.
pub const PROBE_IMAGE: &str = "kiln-probe";

/// The id of the built-in probe image (fixed, so that it is the same on every host).
pub const PROBE_IMAGE_ID: Uuid = Uuid::from_u128(0x6b696c6e_7072_6f62_6500_000000000001);

/// Now, as RFC 3339 with milliseconds (definitions load in this order).
pub fn now() -> String {
    humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string()
}

/// Checks a name: 1–63 of `[a-z0-9-]`, starting with a letter.
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

/// A MAC address stored as its text (`02:00:00:00:00:01`).
mod mac_text {
    use serde::{Deserialize, Deserializer, Serializer};
    use vmm::MacAddr;

    pub fn serialize<S: Serializer>(mac: &MacAddr, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(mac)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<MacAddr, D::Error> {
        String::deserialize(d)?
            .parse()
            .map_err(serde::de::Error::custom)
    }
}

/// A disk format stored as its name (`raw`, `qcow2`).
mod format_name {
    use images::Format;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(f: &Format, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(f.name())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Format, D::Error> {
        let name = String::deserialize(d)?;
        Format::from_name(&name)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown disk format {name:?}")))
    }

    /// The same for an optional format.
    pub mod optional {
        use images::Format;
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(f: &Option<Format>, s: S) -> Result<S::Ok, S::Error> {
            match f {
                Some(f) => super::serialize(f, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Format>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|name| {
                    Format::from_name(&name).ok_or_else(|| {
                        serde::de::Error::custom(format!("unknown disk format {name:?}"))
                    })
                })
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn definitions_round_trip_with_typed_values() {
        let nic = Nic {
            name: "eth0".into(),
            host_tap: "tap0".into(),
            mac: "02:00:00:00:00:2a".parse().unwrap(),
        };
        let v = serde_json::to_value(&nic).unwrap();
        assert_eq!(v["mac"], "02:00:00:00:00:2a");
        assert_eq!(serde_json::from_value::<Nic>(v).unwrap(), nic);
        let bad = serde_json::json!({"name": "eth0", "host_tap": "t", "mac": "01:00:00:00:00:00"});
        assert!(
            serde_json::from_value::<Nic>(bad).is_err(),
            "a bad stored MAC is refused"
        );

        let img = Image {
            id: Uuid::nil(),
            name: "base".into(),
            description: String::new(),
            kind: ImageKind::Disk,
            path: Some("/x".into()),
            format: Some(Format::Qcow2),
            size: 1,
            uploaded: false,
            builtin: false,
            created_at: now(),
        };
        let v = serde_json::to_value(&img).unwrap();
        assert_eq!(v["format"], "qcow2");
        assert_eq!(v["kind"], "disk");
        assert_eq!(serde_json::from_value::<Image>(v).unwrap(), img);
    }

    #[test]
    fn names() {
        assert!(check_name("web-1").is_ok());
        for bad in ["", "1web", "Web", "a/b", "a b", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
