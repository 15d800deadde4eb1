//! Helpers shared by the command's end-to-end tests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub fn tiny() -> PathBuf {
    root().join("tests/fixtures/models/tiny-sd15")
}

/// `tiny()` as an argument.
pub fn tiny_arg() -> &'static str {
    static ARG: OnceLock<&str> = OnceLock::new();
    ARG.get_or_init(|| static_arg(&tiny()))
}

pub fn photo() -> PathBuf {
    root().join("tests/fixtures/inputs/chelsea256.png")
}

/// `photo()` as an argument.
pub fn photo_arg() -> &'static str {
    static ARG: OnceLock<&str> = OnceLock::new();
    ARG.get_or_init(|| static_arg(&photo()))
}

/// The LPIPS weights with a random SqueezeNet backbone (tests/fixtures/lpips).
pub fn lpips_squeeze() -> PathBuf {
    root().join("tests/fixtures/lpips/lpips-squeeze-random-backbone.safetensors")
}

/// The generated CLIP of tests/fixtures/clip.
pub fn clip() -> PathBuf {
    root().join("tests/fixtures/clip")
}

/// The `nulltext` binary with `args`, on `threads` rayon threads, ignoring $NULLTEXT_MODEL.
pub fn command(args: &[&str], threads: &str) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_nulltext"));
    c.args(args)
        .env("RAYON_NUM_THREADS", threads)
        .env_remove("NULLTEXT_MODEL");
    c
}

/// Runs `nulltext` with `args` on two threads.
pub fn nulltext(args: &[&str]) -> Output {
    command(args, "2").output().expect("run nulltext")
}

/// A run's stdout, then its stderr.
pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Runs a command that must succeed.
pub fn succeeds(args: &[&str]) -> Output {
    let out = nulltext(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nulltext {args:?} failed:\n{stderr}");
    out
}

/// Sends SIGINT (Ctrl-C) to process `pid`.
pub fn interrupt(pid: u32) {
    let status = Command::new("kill")
        .args(["-INT", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Waits until `done` holds, failing with `what` after `limit`.
pub fn wait_for(limit: Duration, what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
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

/// A fixed path as a `&'static str` argument (leaked: the test process is short-lived).
pub fn static_arg(p: &Path) -> &'static str {
    Box::leak(s(p).to_string().into_boxed_str())
}

pub fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A copy of the tiny model for test `name` (weights as symlinks unless `copy_weights`).
pub fn model_copy(name: &str, copy_weights: bool) -> PathBuf {
    let d = tmp(name).join("model");
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
        for e in std::fs::read_dir(tiny().join(sub)).unwrap() {
            let e = e.unwrap();
            let to = d.join(sub).join(e.file_name());
            if e.path().extension().is_some_and(|x| x == "safetensors") && !copy_weights {
                std::os::unix::fs::symlink(e.path().canonicalize().unwrap(), &to).unwrap();
            } else {
                std::fs::copy(e.path(), &to).unwrap();
            }
        }
    }
    std::fs::copy(tiny().join("model_index.json"), d.join("model_index.json")).unwrap();
    d
}

/// `invert` of `image` with `prompt` on the tiny model into `out`, then `extra`.
pub fn invert_args<'a>(
    image: &'a str,
    prompt: &'a str,
    out: &'a Path,
    extra: &[&'a str],
) -> Vec<&'a str> {
    let mut v = vec!["invert", "--model", tiny_arg(), "--image", image];
    v.extend(["--prompt", prompt, "--out", s(out)]);
    v.extend(extra);
    v
}

/// `generate` with `model` and the prompt "x" into `out`.
pub fn generate_args<'a>(model: &'a Path, out: &'a Path) -> [&'a str; 7] {
    [
        "generate",
        "--model",
        s(model),
        "--prompt",
        "x",
        "--out",
        s(out),
    ]
}

/// `reconstruct` of the inversion file `inv` on the tiny model into `out`, then `extra`.
pub fn reconstruct_args<'a>(inv: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec!["reconstruct", "--model", tiny_arg(), "--inversion", s(inv)];
    v.extend(["--out", s(out)]);
    v.extend(extra);
    v
}

/// `nulltext serve` with `args` after `--bind 127.0.0.1:0`; the process and the address it
/// says it listens on.
pub fn serve(args: &[&str]) -> (Child, String) {
    use std::io::BufRead;
    let mut all = vec!["serve", "--bind", "127.0.0.1:0"];
    all.extend(args);
    let mut child = command(&all, "2")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "nulltext serve: open http://127.0.0.1:PORT/ (…)"
    let addr = line
        .split("http://")
        .nth(1)
        .and_then(|r| r.split('/').next())
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_string();
    (child, addr)
}

/// One HTTP/1.1 request with `Connection: close`; the status and the body.
pub fn http(addr: &str, method: &str, path: &str, ctype: &str, body: &[u8]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\
         Content-Type: {ctype}\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    let text = String::from_utf8_lossy(&out).into_owned();
    assert!(text.starts_with("HTTP/1.1 "), "{text}");
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
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
