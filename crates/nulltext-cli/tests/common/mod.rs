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

/// The fixture PIE-Bench (tests/fixtures/pie-bench) plus three entries that cannot run — a
/// missing image, a malformed mask, an unknown edit type — in `dir` (images linked).
pub fn pie_bench_with_bad_entries(dir: &Path) -> PathBuf {
    let bench = root().join("tests/fixtures/pie-bench");
    let data = dir.join("PIE-Bench");
    std::fs::create_dir_all(&data).unwrap();
    let mut mapping: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(bench.join("mapping_file.json")).unwrap())
            .unwrap();
    let good = mapping["000000000000"].clone();
    let mut missing = good.clone();
    missing["image_path"] = "0_random_140/000000000099.png".into();
    let mut malformed = good.clone();
    malformed["mask"] = serde_json::json!([100, "a lot"]);
    let mut unknown = good;
    unknown["editing_type_id"] = "10".into();
    mapping.insert("000000000099".into(), missing);
    mapping.insert("100000000000".into(), malformed);
    mapping.insert("a00000000000".into(), unknown);
    std::fs::write(
        data.join("mapping_file.json"),
        serde_json::to_string_pretty(&mapping).unwrap(),
    )
    .unwrap();
    let _ = std::os::unix::fs::symlink(
        bench.join("annotation_images"),
        data.join("annotation_images"),
    );
    data
}
