//! Builds the probe guest (images/probe) with the host's gcc and binutils; the `kiln` binary
//! embeds it as its default guest.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    println!("cargo:rerun-if-changed=images/probe");
    let status = Command::new("sh")
        .arg("images/probe/build.sh")
        .arg(&out)
        .status()
        .expect("cannot run sh to build the probe guest");
    assert!(
        status.success(),
        "building the probe guest failed (images/probe/build.sh); it needs gcc and binutils"
    );
}
