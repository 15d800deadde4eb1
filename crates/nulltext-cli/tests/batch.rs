//! `nulltext eval`, `nulltext batch` (resumable after a kill, shards that add up to one
//! run) and `nulltext plot`, end to end on the tiny fixture model.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use common::*;
use std::time::{Duration, Instant};

fn run(args: &[&str]) -> Output {
    command(args, "2").output().expect("run nulltext")
}

fn ok(args: &[&str]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "nulltext {args:?} failed:\n{stderr}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn eval_reports_scikit_image_values() {
    let m = root().join("tests/fixtures/metrics");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(m.join("reference.json")).unwrap()).unwrap();
    let pair = &reference["pairs"][0];
    let out = ok(&[
        "eval",
        "--json",
        "--reference",
        s(&m.join(pair["reference"].as_str().unwrap())),
        "--candidate",
        s(&m.join(pair["candidate"].as_str().unwrap())),
        "--mask",
        s(&m.join(pair["mask"].as_str().unwrap())),
    ]);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &got["candidates"][0];
    for k in ["psnr", "ssim", "mse"] {
        let (g, w) = (c[k].as_f64().unwrap(), pair["masked"][k].as_f64().unwrap());
        assert!((g - w).abs() < 1e-9 * (1.0 + w.abs()), "{k}: {g} vs {w}");
    }
    assert!(c["lpips"].is_null());
    // The table names both metrics that need networks as unavailable.
    let table = ok(&[
        "eval",
        "-r",
        s(&m.join("chelsea.png")),
        "-c",
        s(&m.join("chelsea-blur.png")),
        "-c",
        s(&m.join("chelsea.png")),
    ]);
    assert!(
        table.contains("chelsea-blur.png") && table.contains("inf"),
        "{table}"
    );
    assert!(
        table.contains("unavailable without their networks' weights: LPIPS"),
        "{table}"
    );
    // With the networks' weights: the reference packages' values.
    let lp: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/lpips/reference.json")).unwrap(),
    )
    .unwrap();
    let clip_ref: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("tests/fixtures/clip/reference.json")).unwrap(),
    )
    .unwrap();
    let out = ok(&[
        "eval",
        "--json",
        "-r",
        s(&m.join("chelsea.png")),
        "-c",
        s(&m.join("chelsea-jpeg20.png")),
        "--lpips",
        s(&root().join("tests/fixtures/lpips/lpips-alex-random-backbone.safetensors")),
    ]);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    let want = lp["nets"]["alex"][0]["lpips"].as_f64().unwrap();
    let g = got["candidates"][0]["lpips"].as_f64().unwrap();
    assert!((g - want).abs() < 1e-5 * want, "{g} vs {want}");
    let case = &clip_ref["cases"][1];
    let out = ok(&[
        "eval",
        "--json",
        "-r",
        s(&root().join("tests/fixtures/clip/chelsea32.png")),
        "-c",
        s(&root().join("tests/fixtures/clip/chelsea32.png")),
        "--clip",
        s(&root().join("tests/fixtures/clip")),
        "--caption",
        case["text"].as_str().unwrap(),
    ]);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    let g = got["candidates"][0]["clip_score"].as_f64().unwrap();
    let want = case["score"].as_f64().unwrap();
    assert!((g - want).abs() < 1e-4, "{g} vs {want}");
    // Different sizes: a clear error.
    let out = run(&[
        "eval",
        "-r",
        s(&m.join("chelsea.png")),
        "-c",
        s(&m.join("coffee.png")),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("differ in size"),
        "{err}"
    );
}

/// Ten items: crops of the fixture photo, some with edits, one with a mask.
fn manifest(dir: &Path) -> PathBuf {
    std::fs::copy(photo(), dir.join("cat.png")).unwrap();
    let mask = image::GrayImage::from_fn(256, 256, |x, y| {
        image::Luma([if (64..192).contains(&x) && (48..176).contains(&y) {
            255
        } else {
            0
        }])
    });
    mask.save(dir.join("cat-mask.png")).unwrap();
    let mut lines = Vec::new();
    for k in 0..10 {
        let mut item = serde_json::json!({
            "id": format!("cat-{k}"),
            "image": "cat.png",
            "prompt": "a close up photo of a cat",
            "crop": format!("{},{},{},0", 4 * k, 2 * k, k),
        });
        if k % 3 == 0 {
            item["edits"] = serde_json::json!([
                "a close up photo of a dog",
                {"target": "a close up photo of a tiger", "cross_replace": "0.6", "blend": "cat:tiger"}
            ]);
        }
        if k == 3 {
            item["mask"] = serde_json::json!("cat-mask.png");
            item["crop"] = serde_json::Value::Null;
        }
        lines.push(item.to_string());
    }
    let p = dir.join("manifest.jsonl");
    std::fs::write(&p, lines.join("\n") + "\n").unwrap();
    p
}

const SETTINGS: [&str; 8] = [
    "--size",
    "64",
    "--steps",
    "3",
    "--inner-steps",
    "2",
    "--early-stop",
    "0",
];

fn metric_nets() -> [&'static str; 4] {
    [
        "--lpips",
        s_static(&root().join("tests/fixtures/lpips/lpips-squeeze-random-backbone.safetensors")),
        "--clip",
        s_static(&root().join("tests/fixtures/clip")),
    ]
}

fn batch_args<'a>(manifest: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "-q",
        "batch",
        "-m",
        s_static(&tiny()),
        s(manifest),
        "--out-dir",
        s(out),
    ];
    v.extend(SETTINGS);
    v.extend(metric_nets());
    v.extend(extra);
    v
}

fn s_static(p: &Path) -> &'static str {
    Box::leak(p.to_str().unwrap().to_string().into_boxed_str())
}

/// Every item's result (timings dropped) and the bytes of every picture.
fn outcome(out: &Path) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for e in std::fs::read_dir(out.join("items")).unwrap() {
        let dir = e.unwrap().path();
        for f in std::fs::read_dir(&dir).unwrap() {
            let f = f.unwrap().path();
            let name = format!(
                "{}/{}",
                dir.file_name().unwrap().to_string_lossy(),
                f.file_name().unwrap().to_string_lossy()
            );
            assert!(!name.contains(".tmp"), "a temporary file was left: {name}");
            let bytes = std::fs::read(&f).unwrap();
            let v = if name.ends_with("result.json") || name.ends_with("inversion.json") {
                let mut v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
                strip_seconds(&mut v);
                v.to_string()
            } else {
                format!("{} bytes, hash {:x}", bytes.len(), fnv(&bytes))
            };
            m.insert(name, v);
        }
    }
    m
}

fn same(got: &BTreeMap<String, String>, want: &BTreeMap<String, String>, what: &str) {
    let names = |m: &BTreeMap<String, String>| m.keys().cloned().collect::<Vec<_>>();
    assert_eq!(names(got), names(want), "{what}: other files than one run");
    for (k, v) in want {
        assert_eq!(&got[k], v, "{what}: {k} differs from one run");
    }
}

fn strip_seconds(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(o) => {
            o.retain(|k, _| !k.starts_with("seconds"));
            o.values_mut().for_each(strip_seconds);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_seconds),
        _ => {}
    }
}

fn fnv(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf29ce484222325u64, |h, x| {
        (h ^ *x as u64).wrapping_mul(0x100000001b3)
    })
}

fn finished(out: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(out.join("items"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("result.json").is_file())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn batch_resumes_after_a_kill_and_shards_add_up() {
    let d = tmp("resume");
    let m = manifest(&d);

    // One uninterrupted run.
    let whole = d.join("whole");
    let t = Instant::now();
    let out = ok(&batch_args(&m, &whole, &[])[1..]);
    eprintln!(
        "uninterrupted run of 10 items: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    assert!(out.contains("10 done, 0 skipped"), "{out}");
    assert!(out.contains("all shards: 10 of 10 items finished"), "{out}");
    let reference = outcome(&whole);
    let csv = std::fs::read_to_string(whole.join("summary.csv")).unwrap();
    assert_eq!(csv.lines().count(), 1 + 10 + 2 * 4, "{csv}");
    assert!(
        csv.starts_with("id,kind,caption,mode,psnr,ssim,mse,"),
        "{csv}"
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(whole.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["finished"], 10);
    let item3 = &summary["items"][3];
    assert!(item3["edits"][0]["background"]["psnr"].as_f64().unwrap() > 0.0);
    for k in [
        "lpips",
        "background_lpips",
        "clip_score",
        "clip_score_edited",
    ] {
        assert!(item3["edits"][1][k].as_f64().is_some(), "{k}: {item3}");
    }
    assert!(
        summary["items"][0]["reconstruction_lpips"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(summary["items"][0]["edits"][0]["background"].is_null());
    assert_eq!(item3["iterations"], 6);

    // Killed half-way (SIGKILL: no chance to clean up), then run again.
    let killed = d.join("killed");
    let mut child = command(&batch_args(&m, &killed, &[]), "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while finished(&killed).len() < 4 {
        assert!(Instant::now() < deadline, "the batch made no progress");
        assert!(child.try_wait().unwrap().is_none(), "the batch ended early");
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let before = finished(&killed);
    assert!(before.len() < 10, "the kill came too late to test anything");
    let mtimes: Vec<_> = before
        .iter()
        .map(|id| {
            std::fs::metadata(killed.join("items").join(id).join("result.json"))
                .unwrap()
                .modified()
                .unwrap()
        })
        .collect();
    let out = ok(&batch_args(&m, &killed, &[])[1..]);
    assert!(
        out.contains(&format!(
            "{} done, {} skipped",
            10 - before.len(),
            before.len()
        )),
        "{out}"
    );
    for (id, t) in before.iter().zip(&mtimes) {
        let now = std::fs::metadata(killed.join("items").join(id).join("result.json"))
            .unwrap()
            .modified()
            .unwrap();
        assert_eq!(&now, t, "{id} was redone");
    }
    same(&outcome(&killed), &reference, "resumed run");

    // Two shards side by side, in the same folder, with no coordination.
    let sharded = d.join("sharded");
    let spawn = |shard: &'static str| {
        command(&batch_args(&m, &sharded, &["--shard", shard]), "1")
            .output()
            .unwrap()
    };
    let (a, b) = std::thread::scope(|sc| {
        let a = sc.spawn(|| spawn("0/2"));
        let b = sc.spawn(|| spawn("1/2"));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(a.status.success() && b.status.success());
    same(&outcome(&sharded), &reference, "two shards");
    // Whichever finished last wrote the complete summary; a rerun rewrites it either way.
    let out = ok(&batch_args(&m, &sharded, &[])[1..]);
    assert!(out.contains("0 done, 10 skipped"), "{out}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn batch_records_a_failed_item_and_goes_on() {
    let d = tmp("failure");
    std::fs::copy(photo(), d.join("cat.png")).unwrap();
    std::fs::write(d.join("notes.png"), "not an image").unwrap();
    let m = d.join("m.jsonl");
    std::fs::write(
        &m,
        "{\"id\": \"bad\", \"image\": \"notes.png\", \"prompt\": \"a cat\"}\n\
         {\"id\": \"horse\", \"image\": \"cat.png\", \"prompt\": \"a close up photo of a cat\", \"edits\": [{\"target\": \"a close up photo of a dog\", \"blend\": \"horse:dog\"}]}\n\
         {\"id\": \"good\", \"image\": \"cat.png\", \"prompt\": \"a close up photo of a cat\"}\n",
    )
    .unwrap();
    let out_dir = d.join("runs");
    let out = run(&batch_args(&m, &out_dir, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("2 items failed"), "{err}");
    assert!(err.contains("notes.png"), "{err}");
    assert!(err.contains("`horse`"), "{err}");
    assert_eq!(finished(&out_dir), vec!["good".to_string()]);
    let e: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(out_dir.join("items/bad/error.json")).unwrap(),
    )
    .unwrap();
    assert!(e["error"].as_str().unwrap().contains("notes.png"));
    // Nothing but the error is written for an item refused before its inversion.
    assert!(!out_dir
        .join("items/horse/inversion.nti.safetensors")
        .exists());
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["finished"], 1);
    assert_eq!(summary["failed"].as_array().unwrap().len(), 2);

    // A manifest error names its line and nothing runs.
    std::fs::write(&m, "{\"image\": \"cat.png\"}\n").unwrap();
    let out = run(&batch_args(&m, &d.join("none"), &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 1"), "{err}");
    assert!(!d.join("none").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn trace_and_plot_draw_figure_4() {
    let d = tmp("trace");
    let mut traces = Vec::new();
    for method in ["null-text", "ddim"] {
        let t = d.join(format!("{method}.json"));
        let out = ok(&[
            "invert",
            "-m",
            s(&tiny()),
            "-i",
            s(&photo()),
            "-p",
            "a close up photo of a cat",
            "--size",
            "64",
            "--steps",
            "4",
            "--inner-steps",
            "3",
            "--trace-budgets",
            "1",
            "--method",
            method,
            "--trace",
            s(&t),
            "--out",
            s(&d.join(format!("{method}.nti.safetensors"))),
        ]);
        assert!(out.contains("PSNR"), "{out}");
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&t).unwrap()).unwrap();
        let points = v["points"].as_array().unwrap();
        if method == "ddim" {
            assert_eq!(points.len(), 1);
            assert_eq!(points[0]["iterations"], 0);
        } else {
            // Budgets 1 and 3 (the --inner-steps run, also the written file).
            assert_eq!(points.len(), 2);
            assert_eq!(points[0]["budget"], 1);
            assert_eq!(points[1]["budget"], 3);
            assert!(
                points[1]["iterations"].as_u64().unwrap()
                    > points[0]["iterations"].as_u64().unwrap()
            );
            assert_eq!(points[1]["final_losses"].as_array().unwrap().len(), 4);
        }
        traces.push(t);
    }
    let png = d.join("fig4.png");
    let mut args = vec!["plot", "--out", s(&png), "--against", "vae"];
    args.extend(traces.iter().map(|p| s(p)));
    ok(&args);
    let img = image::open(&png).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (900, 560));
    // The null-text line and the DDIM reference are drawn in their methods' colours.
    let count = |m: &str| {
        let c = nulltext_eval::figures::method_style(m).1;
        img.pixels().filter(|p| p.0 == c).count()
    };
    assert!(count("null-text") > 100 && count("ddim") > 100);
    // By its extension, the same chart as SVG, for papers.
    let svg = d.join("fig4.svg");
    let mut args = vec!["plot", "--out", s(&svg), "--against", "vae"];
    args.extend(traces.iter().map(|p| s(p)));
    ok(&args);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("ddim"));
    let bad = d.join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let out = run(&["plot", "--out", s(&d.join("x.png")), s(&bad)]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a trace"));
    assert!(!d.join("x.png").exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// `invert --trace-edit` records what each inversion cost and how well an edit made from it
/// keeps the rest of the image; `plot --x unet-passes` puts the methods on one scale.
#[test]
fn quality_per_compute_traces_and_chart() {
    let d = tmp("compute");
    // the edited region: the middle of the 64 px image
    let region = d.join("region.png");
    image::GrayImage::from_fn(64, 64, |x, y| {
        image::Luma([if (16..48).contains(&x) && (16..48).contains(&y) {
            255
        } else {
            0
        }])
    })
    .save(&region)
    .unwrap();
    let mut traces = Vec::new();
    for method in ["direct", "null-text"] {
        let t = d.join(format!("{method}.json"));
        ok(&[
            "invert",
            "-m",
            s(&tiny()),
            "-i",
            s(&photo()),
            "-p",
            "a close up photo of a cat",
            "--size",
            "64",
            "--steps",
            "4",
            "--inner-steps",
            "2",
            "--trace-budgets",
            "1",
            "--method",
            method,
            "--trace",
            s(&t),
            "--trace-edit",
            "a close up photo of a dog",
            "--trace-mask",
            s(&region),
            "--out",
            s(&d.join(format!("{method}.nti.safetensors"))),
        ]);
        let v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&t).unwrap()).unwrap();
        assert_eq!(v["edit_target"], "a close up photo of a dog");
        let passes: Vec<u64> = v["points"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                assert!(p["edit_background_psnr"].as_f64().unwrap() > 0.0, "{p}");
                p["unet_passes"].as_u64().unwrap()
            })
            .collect();
        if method == "direct" {
            // 4 DDIM inversion steps, then 4 guided steps of two passes
            assert_eq!(passes, [12]);
        } else {
            // 4 + per step: ε(C), 2 per iteration, and the step's unconditional pass
            let iterations: Vec<u64> = v["points"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["iterations"].as_u64().unwrap())
                .collect();
            let want: Vec<u64> = iterations.iter().map(|i| 4 + 4 * 2 + 2 * i).collect();
            assert_eq!(passes, want);
        }
        traces.push(t);
    }
    for (y, file) in [
        ("reconstruction", "rec.png"),
        ("edit-background", "edit.svg"),
    ] {
        let out = d.join(file);
        let mut args = vec!["plot", "--x", "unet-passes", "--y", y, "--out", s(&out)];
        args.extend(traces.iter().map(|p| s(p)));
        ok(&args);
        assert!(out.is_file());
    }
    let svg = std::fs::read_to_string(d.join("edit.svg")).unwrap();
    assert!(svg.contains("direct") && svg.contains("UNet passes"));
    // an edit needs its region, and is refused before any inversion without one
    let out = run(&[
        "invert",
        "-m",
        s(&tiny()),
        "-i",
        s(&photo()),
        "-p",
        "a close up photo of a cat",
        "--trace",
        s(&d.join("x.json")),
        "--trace-edit",
        "a close up photo of a dog",
        "--out",
        s(&d.join("x.nti.safetensors")),
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trace-mask"));
    assert!(!d.join("x.nti.safetensors").exists());
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn serve_starts_answers_and_stops_on_ctrl_c() {
    use std::io::{BufRead, Read, Write};
    let d = tmp("serve");
    let mut child = command(
        &[
            "serve",
            "-m",
            s(&tiny()),
            "--bind",
            "127.0.0.1:0",
            "--data-dir",
            s(&d.join("data")),
        ],
        "2",
    )
    .stdout(Stdio::piped())
    .stderr(Stdio::null())
    .spawn()
    .unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let url = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no URL in {line:?}"));
    let addr = url.trim_start_matches("http://").trim_end_matches('/');
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    write!(
        conn,
        "GET /openapi.json HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut reply = String::new();
    conn.read_to_string(&mut reply).unwrap();
    assert!(reply.starts_with("HTTP/1.1 200"), "{reply}");
    assert!(reply.contains("\"openapi\""), "{reply}");
    // Ctrl-C: a clean exit.
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGINT");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(code.success(), "{code:?}");
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn ctrl_c_stops_a_batch_and_keeps_finished_items() {
    let d = tmp("ctrlc");
    let m = manifest(&d);
    let out_dir = d.join("runs");
    let child = command(&batch_args(&m, &out_dir, &[]), "2")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(600);
    while finished(&out_dir).is_empty() {
        assert!(Instant::now() < deadline, "the batch made no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{err}");
    let n = finished(&out_dir).len();
    assert!(n < 10, "the interrupt came too late");
    assert!(
        err.contains(&format!(
            "interrupted: {n} of 10 items are finished and kept"
        )),
        "{err}"
    );
    // Only whole files: no temporaries, and the summary covers the finished items.
    outcome(&out_dir);
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out_dir.join("summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["finished"], n);
    let _ = std::fs::remove_dir_all(&d);
}
