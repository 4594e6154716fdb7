//! Backing files: resolving the name stored in an image, the allowed-directories policy, and
//! the chain's loop and depth checks.

use std::path::{Path, PathBuf};

use super::Qcow2Disk;
use crate::error::{Error, Result};
use crate::{detect_format, DiskBackend, Format, OpenOptions, RawDisk};

/// Opens the backing file `name` of the image at `image` (a canonical path), read-only.
///
/// `chain` holds the canonical paths of the images above it, top first; the backing file is
/// pushed onto it. Returns the open backing file, its canonical path and its format.
pub(crate) fn open_backing(
    image: &Path,
    name: &str,
    format: Option<&str>,
    opts: &OpenOptions,
    chain: &mut Vec<PathBuf>,
) -> Result<(Box<dyn DiskBackend>, PathBuf, Format)> {
    let refuse = |reason: String| Error::Backing {
        path: image.to_path_buf(),
        reason,
    };
    if chain.len() > opts.max_chain {
        return Err(refuse(format!(
            "backing chain deeper than the limit of {} backing files",
            opts.max_chain
        )));
    }
    let dir = image.parent().unwrap_or(Path::new("/"));
    let joined = if Path::new(name).is_absolute() {
        PathBuf::from(name)
    } else {
        dir.join(name)
    };
    let resolved = std::fs::canonicalize(&joined).map_err(|e| {
        refuse(format!(
            "backing file {name:?} (resolved to {}) cannot be opened: {e}",
            joined.display()
        ))
    })?;
    if chain.contains(&resolved) {
        return Err(refuse(format!(
            "loop in the backing chain: {} is already in the chain",
            resolved.display()
        )));
    }
    let allowed = opts.allowed_dirs.iter().any(|d| {
        std::fs::canonicalize(d)
            .map(|d| resolved.starts_with(d))
            .unwrap_or(false)
    });
    if !allowed {
        return Err(refuse(format!(
            "backing file {name:?} resolves to {}, outside the allowed directories",
            resolved.display()
        )));
    }
    match std::fs::metadata(&resolved) {
        Ok(m) if m.is_file() => {}
        _ => {
            return Err(refuse(format!(
                "backing file {} is not a regular file",
                resolved.display()
            )))
        }
    }
    let format = match format {
        Some(f) => Format::from_name(f)
            .ok_or_else(|| refuse(format!("backing file format {f:?} is not supported")))?,
        None => detect_format(&resolved)?,
    };
    chain.push(resolved.clone());
    let disk: Box<dyn DiskBackend> = match format {
        Format::Raw => Box::new(RawDisk::open(&resolved, true)?),
        Format::Qcow2 => Box::new(Qcow2Disk::open_in_chain(&resolved, true, opts, chain)?),
    };
    Ok((disk, resolved, format))
}
