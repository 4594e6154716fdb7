//! The catalog: every definition of the host (instances, disks, images) in memory, under the
//! one lock the manager keeps it in, with lookups by name or id, the names derived from ids,
//! and which disks are being read (copied or exported) so that nothing writes them meanwhile.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use devices::bus::lock;
use uuid::Uuid;

use crate::error::{invalid, Error, Kind, Result};
use crate::model::{check_name, DiskDef, Image, ImageKind, InstanceDef, Origin};
use crate::vm_config::Parts;

/// Every definition of the host.
pub(crate) struct Catalog {
    /// Instances, oldest first.
    pub instances: Vec<InstanceDef>,
    /// Disks, oldest first.
    pub disks: Vec<DiskDef>,
    /// Images, the built-in one first.
    pub images: Vec<Image>,
    /// Disks being read.
    reading: Readers,
}

/// Position of the item named `key` (its name or its id) in `items`.
fn position<T>(items: &[T], key: &str, name: impl Fn(&T) -> (&str, Uuid)) -> Option<usize> {
    items.iter().position(|x| {
        let (n, id) = name(x);
        n == key || id.to_string() == key
    })
}

impl Catalog {
    /// A catalog of these definitions.
    pub fn new(instances: Vec<InstanceDef>, disks: Vec<DiskDef>, images: Vec<Image>) -> Self {
        Self {
            instances,
            disks,
            images,
            reading: Readers::default(),
        }
    }

    /// Where the instance named `key` (name or id) is.
    pub fn instance_index(&self, key: &str) -> Result<usize> {
        position(&self.instances, key, |d| (&d.name, d.id))
            .ok_or_else(|| Error::not_found(Kind::Instance, key))
    }

    /// The instance named `key` (name or id).
    pub fn instance(&self, key: &str) -> Result<&InstanceDef> {
        Ok(&self.instances[self.instance_index(key)?])
    }

    /// The disk named `key` (name or id).
    pub fn disk(&self, key: &str) -> Result<&DiskDef> {
        position(&self.disks, key, |d| (&d.name, d.id))
            .map(|i| &self.disks[i])
            .ok_or_else(|| Error::not_found(Kind::Disk, key))
    }

    /// The image named `key` (name or id).
    pub fn image(&self, key: &str) -> Result<&Image> {
        position(&self.images, key, |i| (&i.name, i.id))
            .map(|i| &self.images[i])
            .ok_or_else(|| Error::not_found(Kind::Image, key))
    }

    /// The image named `key` for the field `field`, which must be of `kind`.
    pub fn image_of_kind(&self, key: &str, kind: ImageKind, field: &str) -> Result<&Image> {
        let img = self
            .image(key)
            .map_err(|_| invalid(field, format!("no image named {key:?}")))?;
        if img.kind != kind {
            return Err(invalid(
                field,
                format!("image {} is a {}, not a {kind}", img.name, img.kind),
            ));
        }
        Ok(img)
    }

    /// The disk with this id.
    pub fn disk_by_id(&self, id: Uuid) -> Option<&DiskDef> {
        self.disks.iter().find(|d| d.id == id)
    }

    /// The image with this id.
    pub fn image_by_id(&self, id: Uuid) -> Option<&Image> {
        self.images.iter().find(|i| i.id == id)
    }

    /// The name of the disk with this id (its id when it is gone).
    pub fn disk_name(&self, id: Uuid) -> String {
        self.disk_by_id(id)
            .map_or_else(|| id.to_string(), |d| d.name.clone())
    }

    /// The name of the image with this id (its id when it is gone).
    pub fn image_name(&self, id: Uuid) -> String {
        self.image_by_id(id)
            .map_or_else(|| id.to_string(), |i| i.name.clone())
    }

    /// The instance a disk is attached to.
    pub fn attached_to(&self, disk: Uuid) -> Option<&InstanceDef> {
        self.instances
            .iter()
            .find(|i| i.disks.iter().any(|a| a.disk == disk))
    }

    /// Refuses a name that is not valid or already taken by a resource of `kind`.
    pub fn check_new_name(&self, kind: Kind, name: &str) -> Result<()> {
        check_name(name).map_err(|m| invalid("name", m))?;
        let taken = match kind {
            Kind::Instance => self.instances.iter().any(|i| i.name == name),
            Kind::Disk => self.disks.iter().any(|d| d.name == name),
            Kind::Image => self.images.iter().any(|i| i.name == name),
            Kind::Operation | Kind::Snapshot => false,
        };
        if taken {
            return Err(Error::AlreadyExists {
                kind,
                name: name.into(),
            });
        }
        Ok(())
    }

    /// What uses an image: an instance that boots from it, or a disk that is an overlay on it
    /// (copies have no backing file). `None` when nothing does.
    pub fn image_user(&self, image: Uuid) -> Option<String> {
        let instance = self
            .instances
            .iter()
            .find(|i| i.boot.kernel == image || i.boot.initrd == Some(image));
        if let Some(i) = instance {
            return Some(format!("is used by instance {}", i.name));
        }
        self.disks
            .iter()
            .find(|d| d.source == Origin::Image { image } && d.format == images::Format::Qcow2)
            .map(|d| format!("is the base of disk {}", d.name))
    }

    /// What an instance's definition refers to, resolved.
    pub fn parts(&self, def: &InstanceDef) -> Result<Parts<'_>> {
        let gone = |what: &str, id: Uuid| {
            Error::Internal(format!("instance {}: its {what} {id} is gone", def.name))
        };
        let kernel = self
            .image_by_id(def.boot.kernel)
            .ok_or_else(|| gone("kernel image", def.boot.kernel))?;
        let initrd = def
            .boot
            .initrd
            .map(|id| self.image_by_id(id).ok_or_else(|| gone("initrd image", id)))
            .transpose()?;
        let disks = def
            .disks
            .iter()
            .map(|a| self.disk_by_id(a.disk).ok_or_else(|| gone("disk", a.disk)))
            .collect::<Result<_>>()?;
        Ok(Parts {
            kernel,
            initrd,
            disks,
        })
    }

    /// Refuses while a disk is being copied or exported.
    pub fn check_not_read(&self, disk: &DiskDef, what: &str) -> Result<()> {
        if lock(&self.reading).get(&disk.id).is_some_and(|n| *n > 0) {
            return Err(Error::InUse(format!(
                "cannot {what}: disk {} is being copied or exported; try again when that is done",
                disk.name
            )));
        }
        Ok(())
    }
}

/// Disks being read, and by how many readers: a lock of its own, so that a [`Reading`] can
/// end whether or not its owner holds the catalog's.
type Readers = Arc<Mutex<HashMap<Uuid, usize>>>;

/// A disk being read (copied or exported): while it lasts the disk is not deleted, grown or
/// written by a guest (its instance does not start).
pub(crate) struct Reading {
    readers: Readers,
    disk: Uuid,
}

impl Reading {
    /// Marks `disk` as being read.
    pub fn begin(catalog: &Catalog, disk: Uuid) -> Self {
        *lock(&catalog.reading).entry(disk).or_default() += 1;
        Self {
            readers: catalog.reading.clone(),
            disk,
        }
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        let mut r = lock(&self.readers);
        if let Some(n) = r.get_mut(&self.disk) {
            *n -= 1;
            if *n == 0 {
                r.remove(&self.disk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{now, Attachment, Boot, Nic};

    fn image(name: &str, kind: ImageKind) -> Image {
        Image {
            id: Uuid::new_v4(),
            name: name.into(),
            description: String::new(),
            kind,
            path: Some("/img".into()),
            format: Some(images::Format::Qcow2),
            size: 1 << 20,
            uploaded: false,
            builtin: false,
            created_at: now(),
        }
    }

    fn disk(name: &str, source: Origin) -> DiskDef {
        DiskDef {
            id: Uuid::new_v4(),
            name: name.into(),
            description: String::new(),
            format: images::Format::Qcow2,
            size: 1 << 20,
            block_size: 512,
            source,
            created_at: now(),
            updated_at: now(),
            generation: 1,
        }
    }

    fn instance(name: &str, kernel: Uuid, disks: &[Uuid]) -> InstanceDef {
        InstanceDef {
            id: Uuid::new_v4(),
            name: name.into(),
            description: String::new(),
            vcpus: 1,
            memory: 64 << 20,
            boot: Boot {
                kernel,
                initrd: None,
                cmdline: String::new(),
            },
            disks: disks
                .iter()
                .map(|d| Attachment {
                    disk: *d,
                    read_only: false,
                })
                .collect(),
            network_interfaces: vec![Nic {
                name: "eth0".into(),
                host_tap: "tap0".into(),
                mac: vmm::MacAddr::random(),
            }],
            auto_start: false,
            restore: None,
            created_at: now(),
            updated_at: now(),
            generation: 1,
        }
    }

    /// A kernel, a base image, a disk made from it attached to an instance, a free disk.
    fn catalog() -> Catalog {
        let (k, base) = (
            image("k", ImageKind::Kernel),
            image("base", ImageKind::Disk),
        );
        let root = disk("root", Origin::Image { image: base.id });
        let free = disk("free", Origin::Blank);
        let web = instance("web", k.id, &[root.id]);
        Catalog::new(vec![web], vec![root, free], vec![k, base])
    }

    #[test]
    fn lookups_by_name_or_id_and_names_derived_from_ids() {
        let mut c = catalog();
        let root = c.disk("root").unwrap().clone();
        assert_eq!(c.disk(&root.id.to_string()).unwrap().name, "root");
        assert!(matches!(
            c.instance("nope"),
            Err(Error::NotFound {
                kind: Kind::Instance,
                ..
            })
        ));
        assert_eq!(c.attached_to(root.id).unwrap().name, "web");
        assert!(c.attached_to(c.disk("free").unwrap().id).is_none());
        // A rename changes the disk's definition only; the instance refers to it by id.
        let before = c.instances[0].clone();
        c.disks[0].name = "system".into();
        assert_eq!(c.instances[0], before);
        assert_eq!(c.disk_name(root.id), "system");
        let parts = c.parts(&before).unwrap();
        assert_eq!(parts.disks[0].name, "system");
        assert_eq!(parts.kernel.name, "k");
    }

    #[test]
    fn names_are_checked_per_kind() {
        let c = catalog();
        assert!(matches!(
            c.check_new_name(Kind::Disk, "root"),
            Err(Error::AlreadyExists {
                kind: Kind::Disk,
                ..
            })
        ));
        c.check_new_name(Kind::Instance, "root").unwrap();
        assert!(matches!(
            c.check_new_name(Kind::Image, "Bad"),
            Err(Error::InvalidValue { .. })
        ));
    }

    #[test]
    fn images_in_use_and_of_the_wrong_kind() {
        let c = catalog();
        let (k, base) = (c.image("k").unwrap().id, c.image("base").unwrap().id);
        assert_eq!(c.image_user(k).unwrap(), "is used by instance web");
        assert_eq!(c.image_user(base).unwrap(), "is the base of disk root");
        let e = c
            .image_of_kind("base", ImageKind::Kernel, "boot.kernel")
            .unwrap_err();
        assert!(
            matches!(e, Error::InvalidValue { ref field, .. } if field == "boot.kernel"),
            "{e}"
        );
        c.image_of_kind("k", ImageKind::Kernel, "boot.kernel")
            .unwrap();
    }

    #[test]
    fn a_disk_being_read_is_refused_until_the_reading_ends() {
        let c = catalog();
        let free = c.disk("free").unwrap().clone();
        c.check_not_read(&free, "delete it").unwrap();
        let (a, b) = (Reading::begin(&c, free.id), Reading::begin(&c, free.id));
        assert!(matches!(
            c.check_not_read(&free, "delete it"),
            Err(Error::InUse(_))
        ));
        drop(a);
        assert!(
            c.check_not_read(&free, "delete it").is_err(),
            "one reader left"
        );
        drop(b);
        c.check_not_read(&free, "delete it").unwrap();
    }
}
