//! Crafted files and arguments, as an attacker or an unlucky user would give them: each must
//! end in a one-line error and exit status 1, before any long work, with nothing written.
//! Every crafted file is built here.

mod common;
#[path = "../../../tests/support/crafted_png.rs"]
mod crafted_png;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Runs a command that must fail with status 1 and one line of error; returns the line.
fn fails(args: &[&str]) -> String {
    let out = nulltext(args);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(out.status.code(), Some(1), "nulltext {args:?}:\n{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// The folder holds nothing (no output, no temporary file).
fn assert_empty(dir: &Path) {
    let left: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "{}: {left:?}", dir.display());
}

/// Writes a safetensors file: `header` (padded to 8 bytes) and then `data`.
fn write_safetensors(path: &Path, header: &serde_json::Value, data: &[u8]) {
    let mut h = header.to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut bytes = (h.len() as u64).to_le_bytes().to_vec();
    bytes.extend(h);
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

/// A safetensors file with the given header entries and zeroed data.
fn safetensors_file(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let mut header = serde_json::Map::new();
    let mut offset = 0;
    for (name, shape) in tensors {
        let n = shape.iter().product::<usize>() * 4;
        header.insert(
            name.to_string(),
            serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + n]}),
        );
        offset += n;
    }
    write_safetensors(path, &header.into(), &vec![0; offset]);
}

/// Rewrites metadata key `key` of a safetensors file.
fn set_metadata(path: &Path, key: &str, value: &str) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).unwrap();
    header["__metadata__"][key] = value.into();
    write_safetensors(path, &header, &bytes[8 + n..]);
}

/// A small valid PNG whose header then claims `w`×`h` pixels (a decompression bomb's
/// header: a few hundred bytes that would allocate gigabytes).
fn png_claiming(path: &Path, w: u32, h: u32) {
    let mut bytes = Vec::new();
    image::RgbImage::new(4, 4)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    std::fs::write(path, crafted_png::claiming(bytes, w, h)).unwrap();
}

/// A copy of the tiny model (weights as symlinks) with `edit` applied to its UNet config.
fn model_with_unet_config(name: &str, edit: impl Fn(&mut serde_json::Value)) -> PathBuf {
    let d = model_copy(name, false);
    let cfg = d.join("unet/config.json");
    let mut v = read_json(&cfg);
    edit(&mut v);
    std::fs::write(&cfg, v.to_string()).unwrap();
    d
}

#[test]
fn a_single_file_checkpoint_with_a_rank_0_shape_is_refused() {
    let d = tmp("rank0");
    let ckpt = d.join("bad.safetensors");
    safetensors_file(
        &ckpt,
        &[("model.diffusion_model.input_blocks.0.0.weight", vec![])],
    );
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let png = out.join("x.png");
    let e = fails(&generate_args(&ckpt, &png));
    assert!(
        e.contains("model.diffusion_model.input_blocks.0.0.weight") && e.contains("shape []"),
        "{e}"
    );
    assert_empty(&out);
    // Every shape read off the header is checked: a conv kernel of rank 2 further in.
    safetensors_file(
        &ckpt,
        &[
            (
                "model.diffusion_model.input_blocks.0.0.weight",
                vec![4, 4, 3, 3],
            ),
            (
                "model.diffusion_model.input_blocks.3.0.op.weight",
                vec![4, 4, 3, 3],
            ),
            (
                "model.diffusion_model.input_blocks.1.0.out_layers.3.weight",
                vec![4, 4],
            ),
        ],
    );
    let e = fails(&["info", "--model", s(&ckpt)]);
    assert!(
        e.contains("out_layers.3.weight") && e.contains("[4, 4]"),
        "{e}"
    );
}

#[test]
fn an_image_claiming_60000_squared_pixels_is_refused_from_its_header() {
    let d = tmp("bomb");
    let bomb = d.join("bomb.png");
    png_claiming(&bomb, 60_000, 60_000);
    assert!(std::fs::metadata(&bomb).unwrap().len() < 1000);
    let out = d.join("out");
    std::fs::create_dir_all(&out).unwrap();
    let inv = out.join("x.nti.safetensors");
    let e = fails(&invert_args(s(&bomb), "a cat", &inv, &[]));
    assert!(
        e.contains("bomb.png") && e.contains("60000×60000") && e.contains("--max-pixels"),
        "{e}"
    );
    // The limit is the user's to set.
    let e = fails(&invert_args(
        photo_arg(),
        "a cat",
        &inv,
        &["--max-pixels", "10000"],
    ));
    assert!(e.contains("256×256") && e.contains("10000"), "{e}");
    assert_empty(&out);
}

#[test]
fn the_batch_refuses_an_image_bomb_per_item() {
    let d = tmp("batchbomb");
    png_claiming(&d.join("bomb.png"), 60_000, 60_000);
    let manifest = d.join("m.jsonl");
    std::fs::write(
        &manifest,
        "{\"id\": \"bomb\", \"image\": \"bomb.png\", \"prompt\": \"a cat\", \"edits\": [\"a dog\"]}\n",
    )
    .unwrap();
    let runs = d.join("runs");
    let out = nulltext(&[
        "batch",
        "--model",
        tiny_arg(),
        s(&manifest),
        "--out-dir",
        s(&runs),
        "--steps",
        "2",
        "--inner-steps",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    let err = std::fs::read_to_string(runs.join("items/bomb/error.json")).unwrap();
    assert!(err.contains("60000×60000"), "{err}");
    assert!(!runs.join("items/bomb/input.png").exists());
}

#[test]
fn a_model_sample_size_beyond_the_limit_is_refused_up_front() {
    let m = model_with_unet_config("samplesize", |v| v["sample_size"] = 100_000.into());
    let d = tmp("samplesize-out");
    let inv = d.join("x.nti.safetensors");
    let start = Instant::now();
    let mut args = invert_args(photo_arg(), "a cat", &inv, &[]);
    args[2] = s(&m);
    let e = fails(&args);
    assert!(
        e.contains("the model's sample size is 800000 pixels") && e.contains("2048"),
        "{e}"
    );
    let png = d.join("x.png");
    let e = fails(&generate_args(&m, &png));
    assert!(e.contains("800000"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(20));
    assert_empty(&d);
}

#[test]
fn steps_beyond_the_scheduler_are_refused_before_any_work() {
    let d = tmp("steps");
    let inv = d.join("x.nti.safetensors");
    let e = fails(&invert_args(
        photo_arg(),
        "a cat",
        &inv,
        &["--steps", "1000"],
    ));
    assert!(
        e.contains("--steps") && e.contains("between 1 and 999"),
        "{e}"
    );
    let e = fails(&invert_args(
        photo_arg(),
        "a cat",
        &inv,
        &["--guidance", "NaN"],
    ));
    assert!(e.contains("--guidance"), "{e}");
    assert_empty(&d);
}

#[test]
fn empty_prompts_are_refused_as_the_server_refuses_them() {
    let d = tmp("emptyprompt");
    let inv = d.join("x.nti.safetensors");
    let mut args = invert_args(photo_arg(), "a cat", &inv, &[]);
    args[6] = " ";
    let e = fails(&args);
    assert!(e.contains("`--prompt` is empty"), "{e}");
    args[6] = "a\u{7}cat";
    let e = fails(&args);
    assert!(e.contains("control characters"), "{e}");
    assert_empty(&d);
}

#[test]
fn outputs_that_are_not_regular_files_are_never_replaced() {
    let d = tmp("targets");
    let real = d.join("real.nti.safetensors");
    std::fs::write(&real, b"keep me").unwrap();
    let link = d.join("link.nti.safetensors");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let e = fails(&invert_args(photo_arg(), "a cat", &link, &[]));
    assert!(
        e.contains("link.nti.safetensors") && e.contains("symbolic link"),
        "{e}"
    );
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(std::fs::read(&real).unwrap(), b"keep me");

    let fifo = d.join("fifo.nti.safetensors");
    assert!(Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap()
        .success());
    let e = fails(&invert_args(photo_arg(), "a cat", &fifo, &[]));
    assert!(
        e.contains("fifo.nti.safetensors") && e.contains("FIFO"),
        "{e}"
    );
    let e = fails(&invert_args(
        photo_arg(),
        "a cat",
        Path::new("/dev/null"),
        &[],
    ));
    assert!(e.contains("/dev/null"), "{e}");

    // A folder that cannot take the file is found before the work, not after it.
    let file = d.join("plain");
    std::fs::write(&file, b"").unwrap();
    let under = file.join("x.nti.safetensors");
    let start = Instant::now();
    let e = fails(&invert_args(
        photo_arg(),
        "a cat",
        &under,
        &["--steps", "50"],
    ));
    assert!(e.contains("plain"), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10));
    let mut left: Vec<String> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    left.sort();
    assert_eq!(
        left,
        [
            "fifo.nti.safetensors",
            "link.nti.safetensors",
            "plain",
            "real.nti.safetensors"
        ]
    );
}

#[test]
fn inversion_files_with_absurd_numbers_are_refused() {
    let d = tmp("absurd");
    let good = d.join("good.nti.safetensors");
    let ddim = ["--method", "ddim", "--steps", "2"];
    succeeds(&invert_args(photo_arg(), "a cat", &good, &ddim));
    let edits = d.join("edits");
    let edit_fails = |inv: &Path, extra: &[&str]| {
        let mut args = vec!["edit", "--model", tiny_arg(), "--inversion", s(inv)];
        args.extend(["--target", "a dog", "--out-dir", s(&edits)]);
        args.extend(extra);
        fails(&args)
    };
    for (key, value, says) in [
        ("guidance_scale", "NaN", "guidance_scale"),
        ("guidance_scale", "1e308", "guidance_scale"),
        ("num_steps", "1000", "num_steps"),
        ("height", "0", "height"),
        (
            "scheduler",
            r#"{"num_train_timesteps": 1000000000000, "beta_start": 0.00085}"#,
            "num_train_timesteps",
        ),
        ("scheduler", r#"{"beta_end": NaN}"#, "scheduler"),
    ] {
        let bad = d.join("bad.nti.safetensors");
        std::fs::copy(&good, &bad).unwrap();
        set_metadata(&bad, key, value);
        let e = edit_fails(&bad, &[]);
        assert!(
            e.contains("bad.nti.safetensors") && e.contains(says),
            "{key}={value}: {e}"
        );
        let rec = d.join("rec.png");
        let e = fails(&reconstruct_args(&bad, &rec, &[]));
        assert!(e.contains(says), "{key}={value}: {e}");
        assert!(!edits.exists() && !rec.exists());
    }
    // SDEdit that would start after the last step is refused before any sampling.
    let e = edit_fails(&good, &["--sdedit", "0.01"]);
    assert!(e.contains("--sdedit 0.01"), "{e}");
    assert!(!edits.exists());
}

#[test]
fn ctrl_c_after_the_file_is_written_says_so() {
    let d = tmp("ctrlc-after");
    let out = d.join("cat.nti.safetensors");
    let extra = ["--method", "ddim", "--steps", "100", "--compare"];
    let args = invert_args(photo_arg(), "a cat", &out, &extra);
    let child = command(&args, "2")
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    wait_for(Duration::from_secs(120), "no file written", || out.exists());
    interrupt(child.id());
    let res = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&res.stderr);
    assert_eq!(res.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted after writing") && stderr.contains("cat.nti.safetensors"),
        "{stderr}"
    );
    assert!(!stderr.contains("nothing was written"), "{stderr}");
    assert!(out.is_file());
}

/// Resident memory of process `pid` in KiB.
fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The server process hands the memory of a job back: a 36 MP upload decoded, resized
/// and inverted leaves resident memory where it was (the batch commands keep theirs).
#[test]
fn the_server_returns_memory_after_a_job() {
    let d = tmp("serve-memory");
    let (mut child, addr) = serve(&[
        "--model",
        tiny_arg(),
        "--data-dir",
        s(&d),
        "--max-megapixels",
        "40",
    ]);
    let pid = child.id();
    let mut png = Vec::new();
    image::GrayImage::new(6000, 6000)
        .write_to(&mut std::io::Cursor::new(&mut png), image::ImageFormat::Png)
        .unwrap();
    let boundary = "nulltext-test-boundary";
    let mut body = Vec::new();
    for (name, value) in [
        ("prompt", "a cat"),
        ("size", "64"),
        ("steps", "2"),
        ("inner_steps", "1"),
    ] {
        body.extend(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"b.png\"\r\n\
             Content-Type: image/png\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend(&png);
    body.extend(format!("\r\n--{boundary}--\r\n").as_bytes());
    let ctype = format!("multipart/form-data; boundary={boundary}");
    let before = rss_of(pid);
    let (status, job) = http(&addr, "POST", "/v1/inversions?wait=true", &ctype, &body);
    assert_eq!(status, 200, "{job}");
    assert!(job.contains("\"succeeded\""), "{job}");
    std::thread::sleep(Duration::from_millis(500));
    let after = rss_of(pid);
    eprintln!("serve: a 36 MP upload inverted; RSS {before} KiB → {after} KiB");
    interrupt(pid);
    let _ = child.wait();
    // The decoded upload alone is 108 MB.
    assert!(after < before + 64 * 1024, "RSS {before} KiB → {after} KiB");
}
