//! Disks and images on the wire.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use super::values::{DiskFormat, ImageKind, Size};

/// Where a new disk's content comes from.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum DiskSourceSpec {
    /// Zeros (a sparse file).
    #[default]
    Blank,
    /// A base disk image: a qcow2 overlay on it (the image is never written), or a full copy
    /// when the disk's format is raw.
    Image {
        /// The image, by name or id.
        image: String,
    },
    /// A copy of another disk (detached, or attached to a stopped instance).
    Disk {
        /// The disk, by name or id.
        disk: String,
    },
    /// A copy of a snapshot of a disk (detached, or attached to a stopped instance).
    Snapshot {
        /// The disk, by name or id.
        disk: String,
        /// The snapshot's name.
        snapshot: String,
    },
}

/// The body of `POST /v1/disks`.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskCreate {
    /// Unique name: 1-63 of `[a-z0-9-]`, starting with a letter.
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$", example = "data")]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Virtual size (whole 512-byte sectors, at most 64 TiB); required for a blank disk, the
    /// source's size by default otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
    /// Logical block size the guest sees: 512 (default) or 4096.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(example = 512)]
    pub block_size: Option<u32>,
    /// How the file stores the disk: qcow2 by default for an image source, the source's for
    /// a disk copy, raw otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<DiskFormat>,
    /// Where the content comes from; blank by default.
    #[serde(default)]
    pub source: DiskSourceSpec,
}

impl From<DiskCreate> for control::NewDisk {
    fn from(c: DiskCreate) -> Self {
        Self {
            name: c.name,
            description: c.description,
            size: c.size.map(|s| s.0),
            block_size: c.block_size,
            format: c.format.map(Into::into),
            source: match c.source {
                DiskSourceSpec::Blank => control::SourceRef::Blank,
                DiskSourceSpec::Image { image } => control::SourceRef::Image(image),
                DiskSourceSpec::Disk { disk } => control::SourceRef::Disk(disk),
                DiskSourceSpec::Snapshot { disk, snapshot } => {
                    control::SourceRef::Snapshot { disk, snapshot }
                }
            },
        }
    }
}

/// The body of `PATCH /v1/disks/{disk}`: absent fields stay as they are.
#[derive(Clone, Debug, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskPatch {
    /// New name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$")]
    pub name: Option<String>,
    /// New description.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// New size: it may only grow, and only while the disk is detached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<Size>,
}

impl From<DiskPatch> for control::DiskChanges {
    fn from(p: DiskPatch) -> Self {
        Self {
            name: p.name,
            description: p.description,
            size: p.size.map(|s| s.0),
        }
    }
}

/// Where a disk's first content came from.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum DiskSource {
    /// Zeros.
    Blank,
    /// A base disk image.
    Image {
        /// The image's id.
        image: Uuid,
    },
    /// A copy of another disk.
    Disk {
        /// The disk's id.
        disk: Uuid,
    },
    /// A byte stream sent to `POST /v1/disks/import`.
    Import,
    /// A qcow2 overlay on a disk copy inside an instance snapshot.
    Snapshot {
        /// The instance snapshot's id.
        snapshot: Uuid,
    },
}

/// A disk.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Disk {
    /// UUID.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// How its file stores the disk.
    pub format: DiskFormat,
    /// Virtual size in bytes.
    pub size: u64,
    /// Logical block size the guest sees.
    pub block_size: u32,
    /// Where the content came from.
    pub source: DiskSource,
    /// RFC 3339.
    pub created_at: String,
    /// RFC 3339.
    pub updated_at: String,
    /// Bumped on every change of the definition (the `ETag` is made of it).
    pub generation: u64,
    /// Bytes the file takes on the host.
    pub actual_size: u64,
    /// The instance it is attached to (its name).
    pub attached_to: Option<String>,
}

impl From<control::DiskView> for Disk {
    fn from(v: control::DiskView) -> Self {
        let d = v.def;
        Self {
            id: d.id,
            name: d.name,
            description: d.description,
            format: d.format.into(),
            size: d.size,
            block_size: d.block_size,
            source: match d.source {
                control::Origin::Blank => DiskSource::Blank,
                control::Origin::Image { image } => DiskSource::Image { image },
                control::Origin::Disk { disk } => DiskSource::Disk { disk },
                control::Origin::Import => DiskSource::Import,
                control::Origin::Snapshot { snapshot } => DiskSource::Snapshot { snapshot },
            },
            created_at: d.created_at,
            updated_at: d.updated_at,
            generation: d.generation,
            actual_size: v.actual_size,
            attached_to: v.attached_to,
        }
    }
}

/// Where a new image's content comes from, when it is not a file in an image directory.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ImageSourceSpec {
    /// A copy of a snapshot of a disk (detached, or attached to a stopped instance), stored in
    /// the server's state directory: a disk image, in the disk's format.
    Snapshot {
        /// The disk, by name or id.
        disk: String,
        /// The snapshot's name.
        snapshot: String,
    },
}

/// The body of `POST /v1/images`: a file in an image directory (`path`) or a copy of a disk
/// snapshot (`source`), exactly one of them.
#[derive(Clone, Debug, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageCreate {
    /// Unique name: 1-63 of `[a-z0-9-]`, starting with a letter.
    #[schema(pattern = "^[a-z][a-z0-9-]{0,62}$", example = "data")]
    pub name: String,
    /// What it is for (`disk` for an image made from a snapshot).
    pub kind: ImageKind,
    /// A file on the server's host, inside one of its image directories
    /// (`kiln serve --image-dir`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// A disk snapshot to copy instead of a file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<ImageSourceSpec>,
    /// Free text.
    #[serde(default)]
    pub description: String,
}

/// An image: a kernel, an initrd or a base disk image.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq, ToSchema)]
pub struct Image {
    /// UUID.
    pub id: Uuid,
    /// Unique name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// What it is for.
    pub kind: ImageKind,
    /// The file on the server's host (absent for the built-in probe guest).
    pub path: Option<String>,
    /// For disk images, how the file stores the disk.
    pub format: Option<DiskFormat>,
    /// For disk images the virtual size, else the file's size, in bytes.
    pub size: u64,
    /// Uploaded into the state directory (deleted with the image) or registered in place.
    pub uploaded: bool,
    /// Built into kiln; cannot be deleted.
    pub builtin: bool,
    /// RFC 3339.
    pub created_at: String,
}

impl From<control::Image> for Image {
    fn from(i: control::Image) -> Self {
        Self {
            id: i.id,
            name: i.name,
            description: i.description,
            kind: i.kind.into(),
            path: i.path.map(|p| p.display().to_string()),
            format: i.format.map(Into::into),
            size: i.size,
            uploaded: i.uploaded,
            builtin: i.builtin,
            created_at: i.created_at,
        }
    }
}
