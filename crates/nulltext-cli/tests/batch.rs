//! `nulltext eval`, `nulltext batch` (resumable after a kill, shards that add up to one
//! run) and `nulltext plot`, end to end on the tiny fixture model.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;

/// Runs a command that must succeed; returns its stdout.
fn ok(args: &[&str]) -> String {
    String::from_utf8_lossy(&succeeds(args).stdout).into_owned()
}

#[test]
fn eval_reports_scikit_image_values() {
    let m = root().join("tests/fixtures/metrics");
    let reference = read_json(&m.join("reference.json"));
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
    let lp = read_json(&root().join("tests/fixtures/lpips/reference.json"));
    let clip_ref = read_json(&clip().join("reference.json"));
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
    let chelsea32 = clip().join("chelsea32.png");
    let out = ok(&[
        "eval",
        "--json",
        "-r",
        s(&chelsea32),
        "-c",
        s(&chelsea32),
        "--clip",
        s(&clip()),
        "--caption",
        case["text"].as_str().unwrap(),
    ]);
    let got: serde_json::Value = serde_json::from_str(&out).unwrap();
    let g = got["candidates"][0]["clip_score"].as_f64().unwrap();
    let want = case["score"].as_f64().unwrap();
    assert!((g - want).abs() < 1e-4, "{g} vs {want}");
    // Different sizes: a clear error.
    let out = nulltext(&[
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
        static_arg(&lpips_squeeze()),
        "--clip",
        static_arg(&clip()),
    ]
}

fn batch_args<'a>(manifest: &'a Path, out: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
    let mut v = vec![
        "-q",
        "batch",
        "-m",
        tiny_arg(),
        s(manifest),
        "--out-dir",
        s(out),
    ];
    v.extend(SETTINGS);
    v.extend(metric_nets());
    v.extend(extra);
    v
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
    let summary = read_json(&whole.join("summary.json"));
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
    wait_for(
        Duration::from_secs(600),
        "the batch made no progress",
        || {
            let done = finished(&killed).len() >= 4;
            assert!(
                done || child.try_wait().unwrap().is_none(),
                "the batch ended early"
            );
            done
        },
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let before = finished(&killed);
    assert!(before.len() < 10, "the kill came too late to test anything");
    let mtime = |id: &str| {
        std::fs::metadata(killed.join("items").join(id).join("result.json"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let mtimes: Vec<_> = before.iter().map(|id| mtime(id)).collect();
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
        assert_eq!(&mtime(id), t, "{id} was redone");
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
    let out = nulltext(&batch_args(&m, &out_dir, &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("2 items failed"), "{err}");
    assert!(err.contains("notes.png"), "{err}");
    assert!(err.contains("`horse`"), "{err}");
    assert_eq!(finished(&out_dir), vec!["good".to_string()]);
    let e = read_json(&out_dir.join("items/bad/error.json"));
    assert!(e["error"].as_str().unwrap().contains("notes.png"));
    // Nothing but the error is written for an item refused before its inversion.
    assert!(!out_dir
        .join("items/horse/inversion.nti.safetensors")
        .exists());
    let summary = read_json(&out_dir.join("summary.json"));
    assert_eq!(summary["finished"], 1);
    assert_eq!(summary["failed"].as_array().unwrap().len(), 2);

    // A manifest error names its line and nothing runs.
    std::fs::write(&m, "{\"image\": \"cat.png\"}\n").unwrap();
    let out = nulltext(&batch_args(&m, &d.join("none"), &[]));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("line 1"), "{err}");
    assert!(!d.join("none").exists());
    let _ = std::fs::remove_dir_all(&d);
}

/// A batch with an SDXL model: the same manifest, with its metrics, and inversion files that
/// keep the optimized pooled embeddings.
#[test]
fn batch_runs_an_sdxl_model() {
    let d = tmp("sdxl");
    std::fs::copy(photo(), d.join("cat.png")).unwrap();
    let m = d.join("m.jsonl");
    std::fs::write(
        &m,
        "{\"id\": \"cat\", \"image\": \"cat.png\", \"prompt\": \"a close up photo of a cat\", \"edits\": [\"a close up photo of a dog\", {\"target\": \"a close up photo of a tiger\", \"blend\": \"cat:tiger\"}]}\n",
    )
    .unwrap();
    let out_dir = d.join("runs");
    let mut args = batch_args(&m, &out_dir, &[]);
    args[3] = static_arg(&root().join("tests/fixtures/models/tiny-sdxl"));
    let out = ok(&args[1..]);
    assert!(out.contains("1 done, 0 skipped"), "{out}");
    let summary = read_json(&out_dir.join("summary.json"));
    assert_eq!(summary["finished"], 1);
    let item = &summary["items"][0];
    assert_eq!(item["edits"].as_array().unwrap().len(), 2, "{item}");
    for k in ["lpips", "clip_score"] {
        assert!(item["edits"][1][k].as_f64().is_some(), "{k}: {item}");
    }
    let inv = nulltext::inversion_file::load(&out_dir.join("items/cat/inversion.nti.safetensors"))
        .unwrap();
    let pooled = inv
        .null_pooled
        .as_ref()
        .expect("an SDXL inversion keeps its pooled embeddings");
    assert_eq!(pooled.dims()[0], 3, "one pooled embedding per step");
    let _ = std::fs::remove_dir_all(&d);
}

/// `invert` of the fixture photo at 64 px in 4 steps by `method`, with `inner_steps` and a
/// trace of budgets 1 and up to `dir/{method}.json`, then `extra`; the output and the trace.
fn invert_traced(dir: &Path, method: &str, inner_steps: &str, extra: &[&str]) -> (String, PathBuf) {
    let trace = dir.join(format!("{method}.json"));
    let out = dir.join(format!("{method}.nti.safetensors"));
    let mut args = vec!["--size", "64", "--steps", "4", "--inner-steps", inner_steps];
    args.extend([
        "--trace-budgets",
        "1",
        "--method",
        method,
        "--trace",
        s(&trace),
    ]);
    args.extend(extra);
    (ok(&invert_args(photo_arg(), CAT, &out, &args)), trace)
}

/// `plot` of `traces` into `out` with the options `args`.
fn plot(out: &Path, args: &[&str], traces: &[PathBuf]) {
    let mut all = vec!["plot", "--out", s(out)];
    all.extend(args);
    all.extend(traces.iter().map(|p| s(p)));
    ok(&all);
}

#[test]
fn trace_and_plot_draw_figure_4() {
    let d = tmp("trace");
    let mut traces = Vec::new();
    for method in ["null-text", "ddim"] {
        let (out, t) = invert_traced(&d, method, "3", &[]);
        assert!(out.contains("PSNR"), "{out}");
        let v = read_json(&t);
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
    plot(&png, &["--against", "vae"], &traces);
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
    plot(&svg, &["--against", "vae"], &traces);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.contains("ddim"));
    let bad = d.join("bad.json");
    std::fs::write(&bad, "{}").unwrap();
    let out = nulltext(&["plot", "--out", s(&d.join("x.png")), s(&bad)]);
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
        let edit = ["--trace-edit", DOG, "--trace-mask", s(&region)];
        let (_, t) = invert_traced(&d, method, "2", &edit);
        let v = read_json(&t);
        assert_eq!(v["edit_target"], DOG);
        let points = v["points"].as_array().unwrap();
        let passes: Vec<u64> = points
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
            let want: Vec<u64> = points
                .iter()
                .map(|p| 4 + 4 * 2 + 2 * p["iterations"].as_u64().unwrap())
                .collect();
            assert_eq!(passes, want);
        }
        traces.push(t);
    }
    for (y, file) in [
        ("reconstruction", "rec.png"),
        ("edit-background", "edit.svg"),
    ] {
        let out = d.join(file);
        plot(&out, &["--x", "unet-passes", "--y", y], &traces);
        assert!(out.is_file());
    }
    let svg = std::fs::read_to_string(d.join("edit.svg")).unwrap();
    assert!(svg.contains("direct") && svg.contains("UNet passes"));
    // an edit needs its region, and is refused before any inversion without one
    let (trace, inv) = (d.join("x.json"), d.join("x.nti.safetensors"));
    let edit = ["--trace", s(&trace), "--trace-edit", DOG];
    let out = nulltext(&invert_args(photo_arg(), CAT, &inv, &edit));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--trace-mask"));
    assert!(!inv.exists());
    let _ = std::fs::remove_dir_all(&d);
}

const CAT: &str = "a close up photo of a cat";
const DOG: &str = "a close up photo of a dog";

#[test]
fn serve_starts_answers_and_stops_on_ctrl_c() {
    let d = tmp("serve");
    let (mut child, addr) = serve(&["-m", tiny_arg(), "--data-dir", s(&d.join("data"))]);
    let (status, reply) = http(&addr, "GET", "/openapi.json", "text/plain", b"");
    assert_eq!(status, 200, "{reply}");
    assert!(reply.contains("\"openapi\""), "{reply}");
    // Ctrl-C: a clean exit.
    interrupt(child.id());
    let mut code = None;
    wait_for(
        Duration::from_secs(30),
        "serve did not stop on SIGINT",
        || {
            code = child.try_wait().unwrap();
            code.is_some()
        },
    );
    assert!(code.unwrap().success(), "{code:?}");
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
    wait_for(
        Duration::from_secs(600),
        "the batch made no progress",
        || !finished(&out_dir).is_empty(),
    );
    interrupt(child.id());
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
    let summary = read_json(&out_dir.join("summary.json"));
    assert_eq!(summary["finished"], n);
    let _ = std::fs::remove_dir_all(&d);
}
