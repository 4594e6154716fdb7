//! Values the wire types share: sizes (bytes, or a string with a binary unit), MAC addresses,
//! and the enumerations of the control plane as the API spells them.

use std::borrow::Cow;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use utoipa::openapi::schema::{ObjectBuilder, OneOfBuilder, Schema, SchemaType, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

/// A size in bytes. Clients send an integer number of bytes or a string with a binary unit
/// (`"512MiB"`, `"10GiB"`); responses give bytes as integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Size(pub u64);

impl Serialize for Size {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Bytes(u64),
            Text(String),
        }
        match Raw::deserialize(d).map_err(|_| {
            serde::de::Error::custom("expected a number of bytes or a size such as \"512MiB\"")
        })? {
            Raw::Bytes(b) => Ok(Size(b)),
            Raw::Text(t) => vmm::parse_size(&t, 1)
                .map(Size)
                .map_err(serde::de::Error::custom),
        }
    }
}

impl PartialSchema for Size {
    fn schema() -> RefOr<Schema> {
        OneOfBuilder::new()
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::Integer)
                    .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                        utoipa::openapi::KnownFormat::Int64,
                    )))
                    .minimum(Some(0))
                    .description(Some("bytes")),
            )
            .item(
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .pattern(Some(r"^\s*[0-9]+\s*(B|K|k|KiB|M|MiB|G|GiB|T|TiB)?\s*$"))
                    .description(Some("a number with a binary unit: 512MiB, 10GiB"))
                    .examples(["64MiB"]),
            )
            .description(Some(
                "A size: an integer number of bytes, or a string with a binary unit",
            ))
            .into()
    }
}

impl ToSchema for Size {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Size")
    }
}

/// A MAC address, `aa:bb:cc:dd:ee:ff`, never multicast.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub vmm::MacAddr);

impl Serialize for Mac {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Mac {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?
            .parse()
            .map(Mac)
            .map_err(serde::de::Error::custom)
    }
}

impl PartialSchema for Mac {
    fn schema() -> RefOr<Schema> {
        ObjectBuilder::new()
            .schema_type(SchemaType::new(Type::String))
            .pattern(Some("^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$"))
            .description(Some(
                "A MAC address (`aa:bb:cc:dd:ee:ff`); the first byte's lowest bit (multicast) is clear",
            ))
            .examples(["02:00:00:00:00:01"])
            .into()
    }
}

impl ToSchema for Mac {
    fn name() -> Cow<'static, str> {
        Cow::Borrowed("Mac")
    }
}

/// Mirrors a control-plane enumeration as a wire enumeration with its own schema, and converts
/// both ways with exhaustive matches (a variant added on one side does not compile until the
/// other has it).
macro_rules! mirror_enum {
    ($(#[$meta:meta])* $wire:ident = $control:path { $($(#[$vmeta:meta])* $variant:ident),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
        #[serde(rename_all = "snake_case")]
        pub enum $wire {
            $($(#[$vmeta])* $variant,)+
        }

        impl From<$control> for $wire {
            fn from(v: $control) -> Self {
                use $control as C;
                match v {
                    $(C::$variant => Self::$variant,)+
                }
            }
        }

        impl From<$wire> for $control {
            fn from(v: $wire) -> Self {
                use $control as C;
                match v {
                    $($wire::$variant => C::$variant,)+
                }
            }
        }
    };
}

mirror_enum! {
    /// Lifecycle state of an instance: `stopped`, `starting`, `running`, `paused`, `stopping`,
    /// `rebooting`, `failed`.
    InstanceState = control::InstanceState {
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
}

mirror_enum! {
    /// What an action does: `start`, `stop`, `reboot`, `reset`, `pause`, `resume`.
    ActionKind = control::Action {
        /// stopped|failed → starting → running.
        Start,
        /// running|paused → stopping → stopped.
        Stop,
        /// running → rebooting → running.
        Reboot,
        /// A hard reset; the instance stays running.
        Reset,
        /// running → paused.
        Pause,
        /// paused → running.
        Resume,
    }
}

mirror_enum! {
    /// State of an operation.
    OperationState = control::OperationState {
        /// Waiting for room in the server's pool of operations.
        Pending,
        /// Under way.
        Running,
        /// Done.
        Succeeded,
        /// Ended with `error`.
        Failed,
        /// Cancelled.
        Cancelled,
    }
}

mirror_enum! {
    /// What an image is for.
    ImageKind = control::ImageKind {
        /// A guest kernel (`boot.kernel`).
        Kernel,
        /// An initrd (`boot.initrd`).
        Initrd,
        /// A base disk image that disks are made from.
        Disk,
    }
}

mirror_enum! {
    /// How a disk file stores the disk.
    DiskFormat = images::Format {
        /// The disk's bytes as they are.
        Raw,
        /// QEMU copy-on-write version 2 or 3.
        Qcow2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_macs() {
        let s: Size = serde_json::from_str("\"512MiB\"").unwrap();
        assert_eq!(s, Size(512 << 20));
        assert_eq!(serde_json::from_str::<Size>("4096").unwrap(), Size(4096));
        let e = serde_json::from_str::<Size>("\"12XB\"").unwrap_err();
        assert!(e.to_string().contains("unknown unit"), "{e}");
        assert!(serde_json::from_str::<Size>("-1").is_err());
        assert_eq!(
            serde_json::to_string(&s).unwrap(),
            (512u64 << 20).to_string()
        );
        let m: Mac = serde_json::from_str("\"02:00:00:00:00:01\"").unwrap();
        assert_eq!(serde_json::to_string(&m).unwrap(), "\"02:00:00:00:00:01\"");
        assert!(serde_json::from_str::<Mac>("\"01:00:00:00:00:01\"").is_err());
    }

    #[test]
    fn mirrored_names_are_the_control_planes() {
        for s in control::InstanceState::ALL {
            assert_eq!(
                serde_json::to_value(InstanceState::from(s)).unwrap(),
                s.as_str()
            );
        }
        for a in control::Action::ALL {
            assert_eq!(
                serde_json::to_value(ActionKind::from(a)).unwrap(),
                a.as_str()
            );
        }
        for s in control::OperationState::ALL {
            assert_eq!(
                serde_json::to_value(OperationState::from(s)).unwrap(),
                s.as_str()
            );
        }
        for k in control::ImageKind::ALL {
            assert_eq!(
                serde_json::to_value(ImageKind::from(k)).unwrap(),
                k.as_str()
            );
        }
        for f in [images::Format::Raw, images::Format::Qcow2] {
            assert_eq!(serde_json::to_value(DiskFormat::from(f)).unwrap(), f.name());
        }
    }
}
