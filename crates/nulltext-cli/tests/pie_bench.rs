//! PIE-Bench end to end: `batch --pie-bench` on the fixture benchmark with bad entries and
//! every metric, `report`, `eval --pie-bench` against evaluate.py's numbers, and the
//! consistency of the shipped job files.

mod common;

use std::path::{Path, PathBuf};
use std::process::Output;

use common::*;

fn bench() -> PathBuf {
    root().join("tests/fixtures/pie-bench")
}

/// evaluate.py's numbers and the settings it ran with.
fn reference() -> serde_json::Value {
    read_json(&bench().join("reference.json"))
}

/// The generated DINO ViT the reference used (tests/fixtures/pie-bench/reference.json).
fn small_dino(dir: &Path) -> PathBuf {
    let r = reference();
    let spec = &r["dino_test_vit"];
    let p = dir.join("dino-test.safetensors");
    nulltext::models::dino::write_generated(
        &p,
        spec["width"].as_u64().unwrap() as usize,
        spec["depth"].as_u64().unwrap() as usize,
        spec["seed"].as_u64().unwrap(),
    )
    .unwrap();
    p
}

/// evaluate.py's name of our metric `name` (its SSIM is torchmetrics 1.2's).
fn evaluate_py_name(name: &str) -> &str {
    match name {
        "ssim_unedit_part" => "ssim_unedit_part_torchmetrics_1_2",
        m => m,
    }
}

/// Runs `nulltext` with `args`, then the metric networks: the fixture LPIPS and CLIP, and
/// the reference's DINO made in `dir`.
fn with_metric_nets(dir: &Path, args: &[&str]) -> Output {
    let dino = small_dino(dir);
    let (lpips, clip) = (lpips_squeeze(), clip());
    let mut all = args.to_vec();
    all.extend(["--lpips", s(&lpips), "--clip", s(&clip), "--dino", s(&dino)]);
    nulltext(&all)
}

#[test]
fn batch_runs_pie_bench_and_records_bad_entries() {
    let dir = tmp("pie-bench-batch");
    let data = pie_bench_with_bad_entries(&dir);
    let out = dir.join("ddim");
    let o = with_metric_nets(
        &dir,
        &[
            "batch",
            "--pie-bench",
            s(&data),
            "--edit-types",
            "0,1,9",
            "--out-dir",
            s(&out),
            "-m",
            tiny_arg(),
            "--method",
            "ddim",
            "--steps",
            "3",
            "--size",
            "128",
        ],
    );
    let log = text(&o);
    // The bad entries fail, the run goes on and says so in its exit status.
    assert_eq!(o.status.code(), Some(1), "{log}");
    assert!(
        log.contains("3 done, 0 skipped (finished before), 3 failed"),
        "{log}"
    );
    let summary = read_json(&out.join("summary.json"));
    let failed: Vec<&str> = summary["failed"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["id"].as_str().unwrap())
        .collect();
    assert_eq!(failed, ["000000000099", "100000000000", "a00000000000"]);
    assert!(summary["failed"][1]["error"]
        .as_str()
        .unwrap()
        .contains("`\"a lot\"` is not a non-negative integer"));
    // Every metric of the table was measured; the style edit's mask covers the whole image,
    // so its unedited part has none (evaluate.py's "nan"), as the per-type table shows.
    let table = std::fs::read_to_string(out.join("report.md")).unwrap();
    let row = table.lines().nth(2).unwrap();
    assert!(row.starts_with("| ddim | ddim | 3 | 3 |"), "{table}");
    assert!(!row.contains('–'), "{table}");
    let csv = std::fs::read_to_string(out.join("report.csv")).unwrap();
    assert!(csv.contains(",psnr,psnr_n,"), "{csv}");
    let line = csv.lines().nth(1).unwrap();
    assert!(
        line.contains(",2,"),
        "the PSNR mean is over two edits: {csv}"
    );

    // `report` over two runs (the same one twice, as two methods would be), per edit type.
    let copy = dir.join("again");
    std::fs::create_dir_all(&copy).unwrap();
    std::os::unix::fs::symlink(out.join("items"), copy.join("items")).unwrap();
    let prefix = dir.join("table");
    let o = command(
        &[
            "report",
            s(&out),
            s(&copy),
            "--by-edit-type",
            "--out",
            s(&prefix),
        ],
        "1",
    )
    .output()
    .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let md = std::fs::read_to_string(prefix.with_extension("md")).unwrap();
    for needle in [
        "| ddim | ddim | 0 random | 1 | 2 |",
        "| ddim | ddim | 9 change style | 1 | 0 | ",
        "| again | ddim | 1 change object | 1 | 0 |",
        "| ddim | ddim | 10 | 0 | 1 |",
    ] {
        assert!(md.contains(needle), "{needle}:\n{md}");
    }
    let style = md.lines().find(|l| l.contains("9 change style")).unwrap();
    assert_eq!(style.matches('–').count(), 4, "{style}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn eval_pie_bench_gives_evaluate_py_numbers() {
    let dir = tmp("pie-bench-eval");
    let r = reference();
    let key = "111000000000";
    let path = "1_change_object_80/1_artificial/1_animal/111000000000.png";
    let src = bench().join("annotation_images").join(path);
    // PnPInversion writes its outputs side by side; evaluate.py measures the last square.
    let edited = image::open(bench().join("edited").join(path))
        .unwrap()
        .to_rgb8();
    let mut wide = image::RgbImage::new(1024, 512);
    image::imageops::replace(&mut wide, &image::open(&src).unwrap().to_rgb8(), 0, 0);
    image::imageops::replace(&mut wide, &edited, 512, 0);
    let wide_path = dir.join("side-by-side.png");
    wide.save(&wide_path).unwrap();
    let mask = bench().join(format!("masks/{key}.png"));
    let want = &r["entries"][key];
    let o = with_metric_nets(
        &dir,
        &[
            "eval",
            "--pie-bench",
            "--json",
            "-r",
            s(&src),
            "-c",
            s(&wide_path),
            "--mask",
            s(&mask),
            "--source-caption",
            want["original_prompt"].as_str().unwrap(),
            "--caption",
            want["editing_prompt"].as_str().unwrap(),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let got: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let c = &got["candidates"][0];
    for (name, rel, abs) in [
        ("structure_distance", 1e-4, 0.0),
        ("psnr_unedit_part", 1e-5, 0.0),
        ("mse_unedit_part", 1e-5, 0.0),
        ("lpips_unedit_part", 1e-4, 0.0),
        ("ssim_unedit_part", 1e-5, 0.0),
        ("clip_similarity_source_image", 0.0, 0.1),
        ("clip_similarity_target_image", 0.0, 0.1),
        ("clip_similarity_target_image_edit_part", 0.0, 0.1),
    ] {
        let theirs = evaluate_py_name(name);
        let (g, w) = (
            c[name].as_f64().unwrap(),
            want["metrics"][theirs].as_f64().unwrap(),
        );
        assert!((g - w).abs() <= rel * w.abs() + abs, "{name}: {g} vs {w}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn job_files_are_consistent() {
    let sbatch = root().join("deploy/slurm/pie-bench.sbatch");
    let o = std::process::Command::new("bash")
        .arg("-n")
        .arg(&sbatch)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let job = std::fs::read_to_string(&sbatch).unwrap();
    assert!(job.contains("--shard auto") && job.contains("#SBATCH --gres=gpu:1"));
    // The Kubernetes Job: indexed, and as many shards as completions.
    let k8s = std::fs::read_to_string(root().join("deploy/k8s/pie-bench-job.yaml")).unwrap();
    let value = |key: &str| {
        let line = k8s.lines().find(|l| l.trim().starts_with(key)).unwrap();
        line.split(':').nth(1).unwrap().trim().to_string()
    };
    assert_eq!(value("completionMode"), "Indexed");
    let completions = value("completions");
    let count_line = k8s
        .lines()
        .skip_while(|l| !l.contains("- name: NULLTEXT_SHARD_COUNT"))
        .nth(1)
        .unwrap();
    assert_eq!(count_line.trim(), format!("value: \"{completions}\""));
    assert!(k8s.contains("- --shard\n            - auto"), "{k8s}");
}

#[test]
fn eval_measures_another_tools_outputs_as_evaluate_py() {
    let dir = tmp("pie-bench-outputs");
    let r = reference();
    // PnPInversion's layout: output/METHOD/annotation_images/….
    let method = dir.join("output/made-up+edit");
    std::fs::create_dir_all(&method).unwrap();
    std::os::unix::fs::symlink(bench().join("edited"), method.join("annotation_images")).unwrap();
    let prefix = dir.join("evaluation_result");
    let o = with_metric_nets(
        &dir,
        &[
            "eval",
            "--pie-bench-dir",
            s(&bench()),
            "--outputs",
            s(&method.join("annotation_images")),
            "--out",
            s(&prefix),
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let csv = std::fs::read_to_string(prefix.with_extension("csv")).unwrap();
    let mut lines = csv.lines();
    let head: Vec<&str> = lines.next().unwrap().split(',').collect();
    assert_eq!(head[0], "file_id");
    assert_eq!(head[2], "made-up+edit|psnr_unedit_part");
    let mut rows = 0;
    for line in lines {
        let cells: Vec<&str> = line.split(',').collect();
        let want = &r["entries"][cells[0]]["metrics"];
        for (k, name) in head.iter().enumerate().skip(1) {
            let metric = name.split_once('|').unwrap().1;
            match want[evaluate_py_name(metric)].as_f64() {
                None => assert_eq!(cells[k], "nan", "{line}"),
                Some(w) => {
                    let g: f64 = cells[k].parse().unwrap();
                    let tol = if metric.starts_with("clip") {
                        0.1
                    } else {
                        1e-4 * w.abs()
                    };
                    assert!((g - w).abs() <= tol, "{metric}: {g} vs {w}");
                }
            }
        }
        rows += 1;
    }
    assert_eq!(rows, 4);
    let table = std::fs::read_to_string(dir.join("evaluation_result-table.md")).unwrap();
    assert!(table.contains("| made-up+edit |  | 4 | 0 |"), "{table}");
    let _ = std::fs::remove_dir_all(&dir);
}
