//! Helpers shared by the command's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn tiny() -> PathBuf {
    root().join("tests/fixtures/models/tiny-sd15")
}

pub fn photo() -> PathBuf {
    root().join("tests/fixtures/inputs/chelsea256.png")
}

/// The `nulltext` binary with `args`, on `threads` rayon threads, ignoring $NULLTEXT_MODEL.
pub fn command(args: &[&str], threads: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nulltext"));
    c.args(args)
        .env("RAYON_NUM_THREADS", threads)
        .env_remove("NULLTEXT_MODEL");
    c
}

/// A fresh, empty temporary folder for test `name`.
pub fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("nulltext-cli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}
