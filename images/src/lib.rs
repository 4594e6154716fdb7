//! Disk images as files (raw, then qcow2), to come. This crate's directory also holds the
//! probe guest (`probe/`) and the distro-guest recipe (`guest/`).
