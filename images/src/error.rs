//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong while opening, creating, reading or writing a disk image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system call on an image file failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done, naming the file.
        context: String,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The image's metadata is malformed or hostile; the image was refused.
    #[error("invalid qcow2 image {}: {reason}", path.display())]
    Invalid {
        /// The image file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// The image is well formed but uses a feature this crate does not implement.
    #[error("unsupported image {}: {reason}", path.display())]
    Unsupported {
        /// The image file.
        path: PathBuf,
        /// The feature that is not supported.
        reason: String,
    },
    /// The image's backing file was refused (outside the allowed directories, a loop in the
    /// chain, a chain too deep, or a file that cannot be opened).
    #[error("backing file of {} refused: {reason}", path.display())]
    Backing {
        /// The image whose backing file was refused.
        path: PathBuf,
        /// Why it was refused.
        reason: String,
    },
    /// Metadata found corrupt while the disk was in use.
    #[error("qcow2 image {} is corrupt: {reason}", path.display())]
    Corrupt {
        /// The image file.
        path: PathBuf,
        /// What was found.
        reason: String,
    },
    /// A request touched bytes outside the disk.
    #[error("access of {len} bytes at offset {offset} is outside the disk of {size} bytes")]
    OutOfRange {
        /// First byte of the request.
        offset: u64,
        /// Length of the request.
        len: u64,
        /// The disk's virtual size.
        size: u64,
    },
    /// A write, discard or resize was attempted on a disk opened read-only.
    #[error("the disk is read-only")]
    ReadOnly,
    /// A caller passed an argument that cannot be honoured.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

/// This crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// Wraps an I/O error with a description of what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            source,
        }
    }
}
