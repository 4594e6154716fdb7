//! The qcow2 header: parsing with validation, and encoding for new images.

use std::fs::File;
use std::path::Path;

use crate::error::{Error, Result};
use crate::fileio;

/// The four bytes every qcow2 image starts with.
pub const MAGIC: [u8; 4] = *b"QFI\xfb";

/// Length of the version 2 header (and of the fields common to both versions).
pub(crate) const V2_HEADER_LEN: u32 = 72;
/// Length of the version 3 header without the optional compression type field.
pub(crate) const V3_HEADER_LEN: u32 = 104;

/// Smallest and largest cluster sizes accepted (512 bytes .. 2 MiB).
pub(crate) const MIN_CLUSTER_BITS: u32 = 9;
pub(crate) const MAX_CLUSTER_BITS: u32 = 21;
/// Refcounts are at most 64 bits wide.
pub(crate) const MAX_REFCOUNT_ORDER: u32 = 6;
/// Caps on metadata held in memory, so a hostile header cannot make us allocate much.
pub(crate) const MAX_L1_BYTES: u64 = 32 << 20;
pub(crate) const MAX_REFTABLE_BYTES: u64 = 32 << 20;
/// The longest backing file name the spec allows.
pub(crate) const MAX_BACKING_NAME: u32 = 1023;
/// The largest virtual size accepted (also bounds offsets in L2 entries).
pub(crate) const MAX_VIRTUAL_SIZE: u64 = 1 << 56;

/// Offsets of header fields updated in place.
pub(crate) const OFF_SIZE: u64 = 24;
pub(crate) const OFF_REFTABLE: u64 = 48;
pub(crate) const OFF_AUTOCLEAR: u64 = 88;

/// Incompatible feature bits.
pub(crate) const INCOMPAT_DIRTY: u64 = 1 << 0;
pub(crate) const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub(crate) const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub(crate) const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub(crate) const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 = 0x1f;

/// Header extension types.
const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;

/// A parsed, validated qcow2 header.
#[derive(Debug, Clone)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
}

fn be32(b: &[u8], off: usize) -> u32 {
    u32::from_be_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

fn be64(b: &[u8], off: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[off..off + 8]);
    u64::from_be_bytes(a)
}

/// Number of L1 entries a disk of `size` bytes needs with clusters of `1 << cluster_bits`.
pub(crate) fn l1_entries_for(size: u64, cluster_bits: u32) -> u64 {
    let clusters = size.div_ceil(1u64 << cluster_bits);
    let l2_entries = 1u64 << (cluster_bits - 3);
    clusters.div_ceil(l2_entries)
}

impl Header {
    /// Reads and validates the header of the image `file` (of `file_len` bytes).
    pub fn read(file: &File, file_len: u64, path: &Path) -> Result<Header> {
        let invalid = |reason: String| Error::Invalid {
            path: path.to_path_buf(),
            reason,
        };
        let unsupported = |reason: String| Error::Unsupported {
            path: path.to_path_buf(),
            reason,
        };
        let io = |e| Error::io(format!("reading the header of {}", path.display()), e);

        if file_len < V2_HEADER_LEN as u64 {
            return Err(invalid(format!(
                "truncated header: the file has {file_len} bytes, a qcow2 header needs at least {V2_HEADER_LEN}"
            )));
        }
        let mut fixed = [0u8; V3_HEADER_LEN as usize + 8];
        fileio::read_zero_fill(file, &mut fixed, 0).map_err(io)?;
        if fixed[0..4] != MAGIC {
            return Err(invalid("bad magic: not a qcow2 image".into()));
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(unsupported(format!(
                "qcow2 version {version} (only versions 2 and 3 are supported)"
            )));
        }
        let backing_file_offset = be64(&fixed, 8);
        let backing_file_size = be32(&fixed, 16);
        let cluster_bits = be32(&fixed, 20);
        let size = be64(&fixed, 24);
        let crypt_method = be32(&fixed, 32);
        let l1_size = be32(&fixed, 36);
        let l1_table_offset = be64(&fixed, 40);
        let refcount_table_offset = be64(&fixed, 48);
        let refcount_table_clusters = be32(&fixed, 56);
        let nb_snapshots = be32(&fixed, 60);
        let snapshots_offset = be64(&fixed, 64);

        let (incompatible_features, autoclear_features, refcount_order, header_length) = if version
            == 3
        {
            if file_len < V3_HEADER_LEN as u64 {
                return Err(invalid(format!(
                        "truncated header: the file has {file_len} bytes, a version 3 header needs at least {V3_HEADER_LEN}"
                    )));
            }
            (
                be64(&fixed, 72),
                be64(&fixed, 88),
                be32(&fixed, 96),
                be32(&fixed, 100),
            )
        } else {
            (0, 0, 4, V2_HEADER_LEN)
        };

        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(format!(
                "cluster_bits {cluster_bits} out of range {MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS}"
            )));
        }
        let cs = 1u64 << cluster_bits;
        if version == 3 {
            if header_length < V3_HEADER_LEN || !header_length.is_multiple_of(8) {
                return Err(invalid(format!(
                    "header length {header_length} is invalid (at least {V3_HEADER_LEN}, a multiple of 8)"
                )));
            }
            if header_length as u64 > cs || header_length as u64 > file_len {
                return Err(invalid(format!(
                    "truncated header: header length {header_length} exceeds the cluster size or the file"
                )));
            }
        }
        if refcount_order > MAX_REFCOUNT_ORDER {
            return Err(unsupported(format!(
                "refcount_order {refcount_order} (at most {MAX_REFCOUNT_ORDER}: 64-bit refcounts)"
            )));
        }
        if crypt_method != 0 {
            return Err(unsupported(format!(
                "encryption (crypt_method {crypt_method})"
            )));
        }
        let unknown = incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return Err(unsupported(format!(
                "unknown incompatible features {unknown:#x}"
            )));
        }
        if incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return Err(unsupported("external data file".into()));
        }
        if incompatible_features & INCOMPAT_EXTL2 != 0 {
            return Err(unsupported("extended L2 entries".into()));
        }
        if version == 3 && header_length > V3_HEADER_LEN {
            let compression_type = fixed[V3_HEADER_LEN as usize];
            if compression_type != 0 {
                return Err(unsupported(format!(
                    "compression type {compression_type} (only zlib is supported)"
                )));
            }
        } else if incompatible_features & INCOMPAT_COMPRESSION != 0 {
            return Err(invalid(
                "compression type feature bit set without a compression type field".into(),
            ));
        }

        // Virtual size and L1 table.
        if size > MAX_VIRTUAL_SIZE {
            return Err(invalid(format!(
                "virtual size {size} exceeds the maximum {MAX_VIRTUAL_SIZE}"
            )));
        }
        let l1_needed = l1_entries_for(size, cluster_bits);
        let l1_bytes = l1_size as u64 * 8;
        if l1_bytes > MAX_L1_BYTES {
            return Err(invalid(format!(
                "L1 table size overflow: {l1_size} entries exceed the limit of {}",
                MAX_L1_BYTES / 8
            )));
        }
        if (l1_size as u64) < l1_needed {
            return Err(invalid(format!(
                "L1 table too small: {l1_size} entries for a virtual size of {size} bytes, which needs {l1_needed}"
            )));
        }
        if l1_size > 0 {
            check_table(
                "L1 table",
                l1_table_offset,
                l1_bytes,
                cs,
                file_len,
                &invalid,
            )?;
        }

        // Refcount table.
        if refcount_table_clusters == 0 {
            return Err(invalid("refcount table has no clusters".into()));
        }
        let rt_bytes = refcount_table_clusters as u64 * cs;
        if rt_bytes > MAX_REFTABLE_BYTES {
            return Err(invalid(format!(
                "refcount table of {refcount_table_clusters} clusters exceeds the limit of {MAX_REFTABLE_BYTES} bytes"
            )));
        }
        check_table(
            "refcount table",
            refcount_table_offset,
            rt_bytes,
            cs,
            file_len,
            &invalid,
        )?;

        // Snapshot table: its place here, its entries when it is read (snapshot.rs).
        if nb_snapshots > super::snapshot::MAX_SNAPSHOTS {
            return Err(invalid(format!(
                "{nb_snapshots} internal snapshots; at most {} are allowed",
                super::snapshot::MAX_SNAPSHOTS
            )));
        }
        if nb_snapshots > 0
            && (!snapshots_offset.is_multiple_of(cs) || snapshots_offset >= file_len)
        {
            return Err(invalid(format!(
                "snapshot table offset {snapshots_offset:#x} is unaligned or past the end of the file"
            )));
        }

        // The rest of the header cluster: extensions and the backing file name.
        let header_area = cs.min(file_len) as usize;
        let mut cluster0 = vec![0u8; header_area];
        fileio::read_zero_fill(file, &mut cluster0, 0).map_err(io)?;

        let mut backing_file = None;
        if backing_file_offset != 0 {
            if backing_file_size == 0 || backing_file_size > MAX_BACKING_NAME {
                return Err(invalid(format!(
                    "backing file name length {backing_file_size} out of range 1..={MAX_BACKING_NAME}"
                )));
            }
            let end = backing_file_offset.checked_add(backing_file_size as u64);
            match end {
                Some(end) if end <= header_area as u64 => {}
                _ => {
                    return Err(invalid(format!(
                        "backing file name at offset {backing_file_offset:#x} lies outside the header cluster"
                    )))
                }
            }
            let raw = &cluster0[backing_file_offset as usize
                ..backing_file_offset as usize + backing_file_size as usize];
            let name = std::str::from_utf8(raw)
                .map_err(|_| invalid("backing file name is not UTF-8".into()))?;
            if name.contains('\0') {
                return Err(invalid("backing file name contains a NUL byte".into()));
            }
            backing_file = Some(name.to_string());
        }

        let mut backing_format = None;
        let mut pos = if version == 3 {
            header_length as usize
        } else {
            V2_HEADER_LEN as usize
        };
        while pos + 8 <= cluster0.len() {
            let ty = be32(&cluster0, pos);
            let len = be32(&cluster0, pos + 4) as usize;
            if ty == EXT_END {
                break;
            }
            let data_start = pos + 8;
            if len > cluster0.len() - data_start {
                return Err(invalid(format!(
                    "header extension {ty:#x} of {len} bytes overruns the header cluster"
                )));
            }
            let data = &cluster0[data_start..data_start + len];
            if ty == EXT_BACKING_FORMAT {
                let fmt = std::str::from_utf8(data)
                    .map_err(|_| invalid("backing format name is not UTF-8".into()))?;
                backing_format = Some(fmt.trim_end_matches('\0').to_string());
            }
            pos = data_start + len.div_ceil(8) * 8;
        }

        Ok(Header {
            version,
            cluster_bits,
            size,
            l1_size,
            l1_table_offset,
            refcount_table_offset,
            refcount_table_clusters,
            nb_snapshots,
            snapshots_offset,
            incompatible_features,
            autoclear_features,
            refcount_order,
            backing_file,
            backing_format,
        })
    }

    /// Encodes a new version 3 header cluster (header, extensions, backing file name).
    pub fn encode_new(&self) -> Result<Vec<u8>> {
        let cs = 1usize << self.cluster_bits;
        let mut b = vec![0u8; cs];
        let put32 =
            |b: &mut Vec<u8>, off: usize, v: u32| b[off..off + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |b: &mut Vec<u8>, off: usize, v: u64| b[off..off + 8].copy_from_slice(&v.to_be_bytes());
        b[0..4].copy_from_slice(&MAGIC);
        put32(&mut b, 4, 3);
        put32(&mut b, 20, self.cluster_bits);
        put64(&mut b, 24, self.size);
        put32(&mut b, 36, self.l1_size);
        put64(&mut b, 40, self.l1_table_offset);
        put64(&mut b, 48, self.refcount_table_offset);
        put32(&mut b, 56, self.refcount_table_clusters);
        put32(&mut b, 96, self.refcount_order);
        put32(&mut b, 100, V3_HEADER_LEN);
        let mut pos = V3_HEADER_LEN as usize;
        if let Some(fmt) = &self.backing_format {
            let len = fmt.len();
            put32(&mut b, pos, EXT_BACKING_FORMAT);
            put32(&mut b, pos + 4, len as u32);
            b[pos + 8..pos + 8 + len].copy_from_slice(fmt.as_bytes());
            pos += 8 + len.div_ceil(8) * 8;
        }
        // End-of-extensions marker: eight zero bytes, already there.
        pos += 8;
        if let Some(name) = &self.backing_file {
            if name.is_empty() || name.len() > MAX_BACKING_NAME as usize || pos + name.len() > cs {
                return Err(Error::InvalidArgument(format!(
                    "backing file name of {} bytes does not fit the header (1..={MAX_BACKING_NAME})",
                    name.len()
                )));
            }
            put64(&mut b, 8, pos as u64);
            put32(&mut b, 16, name.len() as u32);
            b[pos..pos + name.len()].copy_from_slice(name.as_bytes());
        }
        Ok(b)
    }
}

/// Checks that a table of `bytes` bytes at `offset` is cluster-aligned and inside the file.
fn check_table(
    what: &str,
    offset: u64,
    bytes: u64,
    cs: u64,
    file_len: u64,
    invalid: &dyn Fn(String) -> Error,
) -> Result<()> {
    if offset == 0 || !offset.is_multiple_of(cs) {
        return Err(invalid(format!(
            "{what} offset {offset:#x} is not aligned to the cluster size {cs}"
        )));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(invalid(format!(
            "{what} at offset {offset:#x} ({bytes} bytes) lies past the end of the file ({file_len} bytes)"
        ))),
    }
}
