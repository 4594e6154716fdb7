//! The state directory: one store for every definition, one JSON file per definition written
//! atomically, and the files disks and uploaded images keep their bytes in.
//!
//! ```text
//! <state>/instances/<id>.json
//! <state>/disks/<id>.json  <state>/disks/<id>.raw|qcow2
//! <state>/images/<id>.json <state>/images/<id>.img (uploaded images)
//! ```

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};
use uuid::Uuid;

use crate::model::{DiskDef, Image, InstanceDef};

/// A definition the store keeps: which directory it lives in and its id.
pub(crate) trait Record: Serialize + DeserializeOwned {
    /// The directory under the state directory.
    const DIR: &'static str;
    /// The file name's stem.
    fn id(&self) -> Uuid;
}

impl Record for InstanceDef {
    const DIR: &'static str = "instances";
    fn id(&self) -> Uuid {
        self.id
    }
}

impl Record for DiskDef {
    const DIR: &'static str = "disks";
    fn id(&self) -> Uuid {
        self.id
    }
}

impl Record for Image {
    const DIR: &'static str = "images";
    fn id(&self) -> Uuid {
        self.id
    }
}

/// The state directory.
pub(crate) struct Store {
    /// The state directory, resolved.
    root: PathBuf,
    /// `<state>/lock`, locked (`flock`, exclusive) while this store lives: one daemon per
    /// state directory.
    _lock: File,
}

/// The lock file in the state directory.
const LOCK: &str = "lock";

/// Takes the state directory's lock (kept until the file is closed), writing our pid in it
/// for the message another daemon gets.
fn lock_state_dir(root: &Path) -> std::io::Result<File> {
    use rustix::fs::{flock, FlockOperation};
    let path = root.join(LOCK);
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)?;
    if let Err(e) = flock(&f, FlockOperation::NonBlockingLockExclusive) {
        if e == rustix::io::Errno::WOULDBLOCK {
            let holder = fs::read_to_string(&path).unwrap_or_default();
            let holder = holder.trim();
            let by = match holder.is_empty() {
                true => String::new(),
                false => format!(" (pid {holder})"),
            };
            return Err(std::io::Error::new(
                std::io::ErrorKind::ResourceBusy,
                format!("in use by another kiln serve{by}: one state directory, one daemon"),
            ));
        }
        return Err(e.into());
    }
    f.set_len(0)?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

impl Store {
    /// Opens (creating) the state directory and its subdirectories, and removes what a killed
    /// `kiln serve` may have left half-made: import spools (`.NAME.RANDOM.import`) and
    /// definitions being written (`.ID.json.tmp`).
    pub fn open(state_dir: &Path) -> std::io::Result<Self> {
        for dir in [InstanceDef::DIR, DiskDef::DIR, Image::DIR] {
            fs::create_dir_all(state_dir.join(dir))?;
        }
        let root = state_dir.canonicalize()?;
        let store = Self {
            _lock: lock_state_dir(&root)?,
            root,
        };
        for dir in [InstanceDef::DIR, DiskDef::DIR, Image::DIR] {
            sweep_leftovers(&store.root.join(dir));
        }
        Ok(store)
    }

    /// `<state>/disks`: disk files and their definitions.
    pub fn disks_dir(&self) -> PathBuf {
        self.root.join(DiskDef::DIR)
    }

    /// `<state>/images`: uploaded images and every image definition.
    pub fn images_dir(&self) -> PathBuf {
        self.root.join(Image::DIR)
    }

    /// The file of a disk.
    pub fn disk_file(&self, def: &DiskDef) -> PathBuf {
        self.disks_dir().join(format!("{}.{}", def.id, def.format))
    }

    /// The console history of an instance: `<state>/instances/<id>.console`.
    pub fn console_file(&self, id: Uuid) -> PathBuf {
        self.root
            .join(InstanceDef::DIR)
            .join(format!("{id}.console"))
    }

    /// The file of an uploaded image.
    pub fn upload_file(&self, id: Uuid) -> PathBuf {
        self.images_dir().join(format!("{id}.img"))
    }

    fn file<T: Record>(&self, id: Uuid) -> PathBuf {
        self.root.join(T::DIR).join(format!("{id}.json"))
    }

    /// Writes `value` as `<id>.json`: temporary file, fsync, rename, fsync of the directory,
    /// so that a crash leaves the old or the new definition, never a torn one.
    pub fn save<T: Record>(&self, value: &T) -> std::io::Result<()> {
        let dir = self.root.join(T::DIR);
        let tmp = dir.join(format!(".{}.json.tmp", value.id()));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(value)?)?;
        f.sync_all()?;
        fs::rename(&tmp, self.file::<T>(value.id()))?;
        File::open(&dir)?.sync_all()
    }

    /// Removes `<id>.json`.
    pub fn remove<T: Record>(&self, id: Uuid) -> std::io::Result<()> {
        match fs::remove_file(self.file::<T>(id)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r?,
        }
        File::open(self.root.join(T::DIR))?.sync_all()
    }

    /// Every definition of a kind, oldest first (by `created_at`, which sorts as RFC 3339);
    /// files that do not parse are skipped with a warning.
    pub fn load_all<T: Record>(&self, created_at: impl Fn(&T) -> &str) -> std::io::Result<Vec<T>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(self.root.join(T::DIR))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match fs::read(&path).map(|b| serde_json::from_slice(&b)) {
                    Ok(Ok(v)) => out.push(v),
                    Ok(Err(e)) => tracing::warn!("skipping {}: {e}", path.display()),
                    Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
                }
            }
        }
        out.sort_by(|a, b| created_at(a).cmp(created_at(b)));
        Ok(out)
    }
}

impl Store {
    /// Removes every file of `<state>/disks` and `<state>/images` that no definition names:
    /// what a killed daemon left of a disk copy or an import, or of an upload, before its
    /// definition was saved. `keep` are the files the definitions name (their paths).
    /// Definitions themselves (`.json`) are never removed here.
    pub fn sweep_orphans(&self, keep: &[PathBuf]) {
        for dir in [self.disks_dir(), self.images_dir()] {
            let Ok(entries) = fs::read_dir(&dir) else {
                continue;
            };
            for e in entries.flatten() {
                let path = e.path();
                let is_file = e.file_type().is_ok_and(|t| t.is_file() || t.is_symlink());
                if !is_file || path.extension().is_some_and(|x| x == "json") {
                    continue;
                }
                if keep.contains(&path) {
                    continue;
                }
                tracing::warn!(
                    "removing {}: no definition names it (left by a daemon that was killed)",
                    path.display()
                );
                if let Err(err) = fs::remove_file(&path) {
                    tracing::warn!("cannot remove {}: {err}", path.display());
                }
            }
        }
    }
}

fn sweep_leftovers(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') && (name.ends_with(".import") || name.ends_with(".json.tmp")) {
            tracing::info!("removing the leftover {}", e.path().display());
            let _ = fs::remove_file(e.path());
        }
    }
}

/// Removes a file on drop unless kept: nothing half-made is left behind.
pub(crate) struct FileGuard(Option<PathBuf>);

impl FileGuard {
    /// Guards `path`.
    pub fn new(path: PathBuf) -> Self {
        Self(Some(path))
    }

    /// The file stays.
    pub fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for FileGuard {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = fs::remove_file(p);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::ImageKind;

    fn image(name: &str, created_at: &str) -> Image {
        Image {
            id: Uuid::new_v4(),
            name: name.into(),
            description: String::new(),
            kind: ImageKind::Kernel,
            path: None,
            format: None,
            size: 1,
            uploaded: false,
            builtin: false,
            created_at: created_at.into(),
        }
    }

    #[test]
    fn saves_loads_in_order_and_sweeps() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let (a, b) = (
            image("a", "2026-01-01T00:00:00.001Z"),
            image("b", "2026-01-01T00:00:00.002Z"),
        );
        store.save(&b).unwrap();
        store.save(&a).unwrap();
        std::fs::write(store.images_dir().join("junk.json"), b"{").unwrap();
        let loaded: Vec<Image> = store.load_all(|i: &Image| &i.created_at).unwrap();
        let names: Vec<_> = loaded.iter().map(|i| i.name.as_str()).collect();
        assert_eq!(names, ["a", "b"], "oldest first; the torn file skipped");
        store.remove::<Image>(a.id).unwrap();
        store.remove::<Image>(a.id).unwrap();
        assert_eq!(store.load_all(|i: &Image| &i.created_at).unwrap(), vec![b]);

        let leftover = store.disks_dir().join(".x.1234.import");
        std::fs::write(&leftover, b"half").unwrap();
        drop(store);
        Store::open(dir.path()).unwrap();
        assert!(!leftover.exists());
    }

    #[test]
    fn one_store_per_state_directory() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let err = Store::open(dir.path())
            .err()
            .expect("a second store is refused");
        let msg = err.to_string();
        assert!(
            msg.contains("in use by another kiln serve")
                && msg.contains(&std::process::id().to_string()),
            "{msg}"
        );
        drop(store);
        Store::open(dir.path()).expect("free again once the first is gone");
    }

    #[test]
    fn orphans_are_swept_and_named_files_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let named = store.disks_dir().join(format!("{}.raw", Uuid::new_v4()));
        let orphan = store.disks_dir().join(format!("{}.qcow2", Uuid::new_v4()));
        let upload = store.images_dir().join(format!("{}.img", Uuid::new_v4()));
        let def = store.images_dir().join(format!("{}.json", Uuid::new_v4()));
        for f in [&named, &orphan, &upload, &def] {
            std::fs::write(f, b"x").unwrap();
        }
        store.sweep_orphans(std::slice::from_ref(&named));
        assert!(named.exists() && def.exists());
        assert!(!orphan.exists() && !upload.exists());
    }
}
