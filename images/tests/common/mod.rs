//! Helpers shared by the integration tests: `qemu-img` as the referee, deterministic data.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use images::OpenOptions;

/// Runs `qemu-img` (from qemu-utils, installed by tests/install-deps.sh).
pub fn qemu_img(args: &[&str]) -> Output {
    Command::new("qemu-img")
        .args(args)
        .output()
        .expect("qemu-img is needed by these tests: apt-get install qemu-utils")
}

/// Runs `qemu-io` on an image (to make images with qemu's own writes).
pub fn qemu_io(fmt: &str, path: &Path, cmd: &str) {
    let out = Command::new("qemu-io")
        .args(["-f", fmt, "-c", cmd])
        .arg(path)
        .output()
        .expect("qemu-io is needed by these tests: apt-get install qemu-utils");
    assert!(out.status.success(), "qemu-io {cmd} failed: {}", text(&out));
}

pub fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Asserts `qemu-img check` finds no errors and no leaks.
pub fn assert_check(path: &Path) {
    let out = qemu_img(&["check", "-f", "qcow2", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img check {} failed ({:?}):\n{}",
        path.display(),
        out.status.code(),
        text(&out)
    );
}

/// Asserts `qemu-img compare` finds the two images' contents identical.
pub fn assert_compare(a: &Path, b: &Path) {
    let out = qemu_img(&["compare", a.to_str().unwrap(), b.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "qemu-img compare {} {} failed:\n{}",
        a.display(),
        b.display(),
        text(&out)
    );
}

/// Deterministic pseudo-random bytes.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Options allowing backing files in `dir` only.
pub fn opts(dir: &Path) -> OpenOptions {
    OpenOptions {
        allowed_dirs: vec![dir.to_path_buf()],
        max_chain: 8,
    }
}

pub fn p(dir: &Path, name: &str) -> PathBuf {
    dir.join(name)
}

pub fn s(path: &Path) -> &str {
    path.to_str().unwrap()
}

/// Writes a sparse raw file of `size` bytes holding `pieces` (offset, length, seed) of
/// pseudo-random data, and returns its content.
pub fn sparse_raw(path: &Path, size: u64, pieces: &[(u64, usize, u64)]) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut model = vec![0u8; size as usize];
    for &(off, len, seed) in pieces {
        let data = pattern(seed, len);
        f.write_all_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
    model
}

/// The space a file takes on disk (st_blocks × 512).
pub fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// The names in a directory, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// `qemu-img info` as JSON text.
pub fn qemu_info(path: &Path) -> String {
    let out = qemu_img(&["info", "--output=json", s(path)]);
    assert!(out.status.success(), "qemu-img info: {}", text(&out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Makes a qcow2 copy of a raw file with `qemu-img convert` and the extra options given.
pub fn qemu_convert(src: &Path, dst: &Path, extra: &[&str]) {
    let mut args = vec!["convert", "-f", "raw", "-O", "qcow2"];
    args.extend_from_slice(extra);
    args.push(s(src));
    args.push(s(dst));
    let out = qemu_img(&args);
    assert!(out.status.success(), "convert failed: {}", text(&out));
}
