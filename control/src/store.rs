//! The state directory: one JSON file per definition, written atomically.

use std::fs::{self, File};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{de::DeserializeOwned, Serialize};
use uuid::Uuid;

/// A directory of `<id>.json` files.
pub struct Store {
    dir: PathBuf,
}

impl Store {
    /// Opens (creating) `dir`.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        fs::create_dir_all(dir)?;
        Ok(Self {
            dir: dir.to_path_buf(),
        })
    }

    fn path(&self, id: Uuid) -> PathBuf {
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `value` as `<id>.json`: temporary file, fsync, rename, fsync of the directory,
    /// so that a crash leaves the old or the new definition, never a torn one.
    pub fn save<T: Serialize>(&self, id: Uuid, value: &T) -> std::io::Result<()> {
        let tmp = self.dir.join(format!(".{id}.json.tmp"));
        let mut f = File::create(&tmp)?;
        f.write_all(&serde_json::to_vec_pretty(value)?)?;
        f.sync_all()?;
        fs::rename(&tmp, self.path(id))?;
        File::open(&self.dir)?.sync_all()
    }

    /// Removes `<id>.json`.
    pub fn remove(&self, id: Uuid) -> std::io::Result<()> {
        match fs::remove_file(self.path(id)) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            r => r?,
        }
        File::open(&self.dir)?.sync_all()
    }

    /// Every definition; files that do not parse are skipped with a warning.
    pub fn load_all<T: DeserializeOwned>(&self) -> std::io::Result<Vec<T>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                match fs::read(&path).map(|b| serde_json::from_slice(&b)) {
                    Ok(Ok(v)) => out.push(v),
                    Ok(Err(e)) => tracing::warn!("skipping {}: {e}", path.display()),
                    Err(e) => tracing::warn!("skipping {}: {e}", path.display()),
                }
            }
        }
        Ok(out)
    }
}
