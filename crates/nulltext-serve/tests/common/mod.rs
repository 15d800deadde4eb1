//! Helpers of the server's tests: the tiny model, a server on a loopback port in a fresh
//! data directory, and a small HTTP/1.1 client over `TcpStream` (so that tests control
//! every byte: oversized bodies, `Expect: 100-continue`, raw paths, event streams).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nulltext_serve::{ServeArgs, Server, ServerHandle};
use serde_json::Value;

pub fn fixtures() -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures");
    // A test binary run from the repository root elsewhere finds them there.
    if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    }
}

pub fn chelsea_png() -> Vec<u8> {
    std::fs::read(fixtures().join("inputs/chelsea256.png")).unwrap()
}

/// The tiny model in f32, on the CPU or, with `NULLTEXT_TEST_DEVICE=cuda` (in a build with
/// the `cuda` feature), on the GPU.
pub fn load_tiny() -> nulltext::StableDiffusion {
    load(&fixtures().join("models/tiny-sd15"))
}

/// The tiny SDXL fixture model, like [`load_tiny`].
pub fn load_tiny_sdxl() -> nulltext::StableDiffusion {
    load(&fixtures().join("models/tiny-sdxl"))
}

/// The bundled shapes model (`models/shapes`), whose pictures mean something, like
/// [`load_tiny`].
pub fn load_shapes() -> nulltext::StableDiffusion {
    load(&fixtures().join("../../models/shapes"))
}

fn load(model: &Path) -> nulltext::StableDiffusion {
    let device = match std::env::var("NULLTEXT_TEST_DEVICE").as_deref() {
        Ok("cuda") => candle_core::Device::new_cuda(0).expect("NULLTEXT_TEST_DEVICE=cuda"),
        _ => candle_core::Device::Cpu,
    };
    let opts = nulltext::models::LoadOptions {
        device,
        dtype: candle_core::DType::F32,
        ..Default::default()
    };
    nulltext::StableDiffusion::load(model.to_str().unwrap(), &opts).unwrap()
}

/// A fresh, empty folder under the target directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let d = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!(
        "serve-{name}-{}-{:08x}",
        std::process::id(),
        rand_u32()
    ));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn rand_u32() -> u32 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos()
}

pub fn args(dir: &Path) -> ServeArgs {
    ServeArgs {
        bind: "127.0.0.1:0".into(),
        data_dir: dir.to_path_buf(),
        ..ServeArgs::default()
    }
}

pub fn start(args: ServeArgs) -> ServerHandle {
    Server::start(load_tiny(), args).unwrap()
}

/// Every file under `dir` with its size, for "nothing was written" checks.
pub fn tree(dir: &Path) -> BTreeMap<PathBuf, u64> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                out.insert(p.clone(), 0);
                stack.push(p);
            } else {
                out.insert(p.clone(), e.metadata().unwrap().len());
            }
        }
    }
    out
}

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "status {}: not JSON ({e}): {}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// The body as text, for messages.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The `message` of a JSON error body.
    pub fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap()
            .to_string()
    }

    /// The `code` of a JSON error body.
    pub fn error_code(&self) -> String {
        let v = self.json();
        assert!(
            v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty()),
            "error without a message: {v}"
        );
        v["error"]["code"].as_str().unwrap_or("").to_string()
    }
}

fn read_head(r: &mut impl BufRead) -> std::io::Result<(u16, Vec<(String, String)>)> {
    let mut line = String::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        if line.is_empty() {
            return Err(std::io::Error::other("connection closed before a response"));
        }
        let status: u16 = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
        let mut headers = Vec::new();
        loop {
            let mut h = String::new();
            r.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':') {
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
        }
        if status != 100 {
            return Ok((status, headers));
        }
    }
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers.iter().any(|(k, v)| {
        k.eq_ignore_ascii_case("transfer-encoding") && v.eq_ignore_ascii_case("chunked")
    })
}

/// One chunk of a chunked body (`None` at its end).
fn read_chunk(r: &mut impl BufRead) -> std::io::Result<Option<Vec<u8>>> {
    let mut size = String::new();
    r.read_line(&mut size)?;
    let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
        .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
    let mut buf = vec![0; n + 2];
    r.read_exact(&mut buf)?;
    buf.truncate(n);
    Ok((n > 0).then_some(buf))
}

pub fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s
}

/// Sends one request (`Connection: close`) and reads the whole response.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    try_request(addr, method, path, headers, body).unwrap()
}

pub fn try_request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Resp> {
    let mut s = connect(addr);
    let mut head = format!("{method} {path} HTTP/1.1\r\nConnection: close\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head += &format!("Host: {addr}\r\n");
    }
    for (k, v) in headers {
        head += &format!("{k}: {v}\r\n");
    }
    if !body.is_empty() || method == "POST" {
        head += &format!("Content-Length: {}\r\n", body.len());
    }
    head += "\r\n";
    s.write_all(head.as_bytes())?;
    // A server may answer before reading all of a refused body.
    let _ = s.write_all(body);
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r)?;
    let mut body = Vec::new();
    let length = headers
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
        .and_then(|(_, v)| v.parse::<usize>().ok());
    if is_chunked(&headers) {
        while let Some(c) = read_chunk(&mut r)? {
            body.extend(c);
        }
    } else if let Some(n) = length {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Resp {
        status,
        headers,
        body,
    })
}

pub fn get(addr: SocketAddr, path: &str) -> Resp {
    request(addr, "GET", path, &[], b"")
}

pub fn post_json(addr: SocketAddr, path: &str, v: &Value) -> Resp {
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", "application/json")],
        v.to_string().as_bytes(),
    )
}

pub const BOUNDARY: &str = "----nulltext-test-boundary-7d2b";

#[derive(Clone, Copy)]
pub enum Part<'a> {
    Text(&'a str, &'a str),
    File(&'a str, &'a str, &'a str, &'a [u8]),
}

pub fn multipart(parts: &[Part]) -> Vec<u8> {
    let mut b = Vec::new();
    for p in parts {
        b.extend(format!("--{BOUNDARY}\r\n").as_bytes());
        match p {
            Part::Text(name, value) => {
                b.extend(
                    format!("Content-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n")
                        .as_bytes(),
                );
            }
            Part::File(name, filename, ctype, data) => {
                b.extend(
                    format!(
                        "Content-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\nContent-Type: {ctype}\r\n\r\n"
                    )
                    .as_bytes(),
                );
                b.extend_from_slice(data);
                b.extend(b"\r\n");
            }
        }
    }
    b.extend(format!("--{BOUNDARY}--\r\n").as_bytes());
    b
}

pub fn post_multipart(addr: SocketAddr, path: &str, parts: &[Part]) -> Resp {
    let ctype = format!("multipart/form-data; boundary={BOUNDARY}");
    request(
        addr,
        "POST",
        path,
        &[("Content-Type", &ctype)],
        &multipart(parts),
    )
}

/// An inversion form: `image` as cat.png, the prompt "a cat", then `extra`.
pub fn cat_form<'a>(image: &'a [u8], extra: &[Part<'a>]) -> Vec<Part<'a>> {
    let mut parts = vec![
        Part::File("image", "cat.png", "image/png", image),
        Part::Text("prompt", "a cat"),
    ];
    parts.extend_from_slice(extra);
    parts
}

/// The id of a job just queued (202).
pub fn job_id(r: &Resp) -> String {
    assert_eq!(r.status, 202, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

/// Cancels job `id`.
pub fn cancel(addr: SocketAddr, id: &str) -> Resp {
    request(addr, "POST", &format!("/v1/jobs/{id}/cancel"), &[], b"")
}

/// Queues a small inversion of the fixture photo (64 px, `steps` × `inner` iterations).
pub fn submit_inversion(addr: SocketAddr, steps: &str, inner: &str) -> Resp {
    let png = chelsea_png();
    post_multipart(
        addr,
        "/v1/inversions",
        &[
            Part::File("image", "chelsea.png", "image/png", &png),
            Part::Text("prompt", "a close up photo of a cat"),
            Part::Text("size", "64"),
            Part::Text("steps", steps),
            Part::Text("inner_steps", inner),
        ],
    )
}

/// Polls a job until `pred` holds for it (panics after `secs`).
pub fn wait_job(addr: SocketAddr, id: &str, secs: u64, pred: impl Fn(&Value) -> bool) -> Value {
    let start = Instant::now();
    loop {
        let r = get(addr, &format!("/v1/jobs/{id}"));
        assert_eq!(r.status, 200);
        let v = r.json();
        if pred(&v) {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "job {id} still {} after {secs} s",
            v["state"]
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn is_terminal(v: &Value) -> bool {
    matches!(
        v["state"].as_str(),
        Some("succeeded" | "failed" | "cancelled")
    )
}

/// Reads a job's event stream to its end: (event name, JSON data) in order.
pub fn read_events(addr: SocketAddr, id: &str) -> Vec<(String, Value)> {
    let mut s = connect(addr);
    write!(
        s,
        "GET /v1/jobs/{id}/events HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut r = BufReader::new(s);
    let (status, headers) = read_head(&mut r).unwrap();
    assert_eq!(status, 200);
    assert!(
        headers
            .iter()
            .any(|(k, v)| k.eq_ignore_ascii_case("content-type")
                && v.starts_with("text/event-stream"))
    );
    let mut text = String::new();
    if is_chunked(&headers) {
        while let Some(c) = read_chunk(&mut r).unwrap() {
            text.push_str(&String::from_utf8_lossy(&c));
        }
    } else {
        r.read_to_string(&mut text).unwrap();
    }
    let mut events = Vec::new();
    for block in text.split("\n\n") {
        let mut name = None;
        let mut data = String::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                name = Some(v.trim().to_string());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push_str(v.trim_start());
            }
        }
        if let Some(name) = name {
            events.push((name, serde_json::from_str(&data).unwrap()));
        }
    }
    events
}

/// Resident memory of this process in KiB.
pub fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

pub fn png_size(bytes: &[u8]) -> (u32, u32) {
    let img = image::load_from_memory_with_format(bytes, image::ImageFormat::Png).unwrap();
    (img.width(), img.height())
}
