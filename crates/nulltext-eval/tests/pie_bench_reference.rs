//! PIE-Bench against its own evaluation (tests/fixtures/pie-bench/reference.json, written by
//! tools/pie_bench_reference.py with cure-lab/PnPInversion's `mask_decode`,
//! `calculate_metric` and `MetricsCalculator`): the masks, every metric of `evaluate.py`'s
//! default list on a small benchmark in its format, and the import as batch items.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Device;
use common::fixtures;
use nulltext_eval::metrics::{Mask, SsimWindow};
use nulltext_eval::pie_bench::{self, Networks};
use nulltext_eval::structure::StructureDistance;

fn bench() -> PathBuf {
    fixtures().join("pie-bench")
}

fn reference() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(bench().join("reference.json")).unwrap()).unwrap()
}

fn rgb(p: &Path) -> image::RgbImage {
    image::open(p).unwrap().to_rgb8()
}

fn region(mask: &[u8]) -> Mask {
    let side = (mask.len() as f64).sqrt() as u32;
    let gray = image::GrayImage::from_fn(side, side, |x, y| {
        image::Luma([mask[(y * side + x) as usize] * 255])
    });
    Mask::from_gray(&gray, false)
}

/// The generated DINO ViT of the reference (`dino_test_vit`), written once per process.
fn test_vit(spec: &serde_json::Value) -> PathBuf {
    let p = std::env::temp_dir().join(format!(
        "nulltext-dino-{}-{}.safetensors",
        spec["width"],
        std::process::id()
    ));
    if !p.exists() {
        nulltext_models::dino::write_generated(
            &p,
            spec["width"].as_u64().unwrap() as usize,
            spec["depth"].as_u64().unwrap() as usize,
            spec["seed"].as_u64().unwrap(),
        )
        .unwrap();
    }
    p
}

#[test]
fn masks_decode_as_mask_decode() {
    let r = reference();
    let mapping = pie_bench::read_mapping(&bench()).unwrap();
    assert_eq!(mapping.len(), r["entries"].as_object().unwrap().len());
    for (key, entry) in mapping {
        let entry = entry.unwrap();
        let mask = pie_bench::decode_mask(&entry.mask, pie_bench::MASK_SIDE).unwrap();
        let want = &r["entries"][&key];
        let ones = mask.iter().filter(|&&v| v == 1).count();
        assert_eq!(ones as u64, want["mask_ones"].as_u64().unwrap(), "{key}");
        let png = image::open(bench().join(format!("masks/{key}.png")))
            .unwrap()
            .to_luma8();
        let theirs: Vec<u8> = png.pixels().map(|p| p.0[0] / 255).collect();
        assert_eq!(
            mask, theirs,
            "{key}: the decoded mask differs from mask_decode's"
        );
    }
}

/// Every metric against PnPInversion's code. Tolerances: PSNR, MSE and SSIM are computed
/// in f64 here and in f32 there (1e-5 relative); LPIPS and the structure distance are f32
/// networks on both sides (1e-4 relative); CLIP scores differ by the resize to the tiny
/// CLIP's 32 pixels (Catmull-Rom here, PIL's bicubic there: up to 0.07 points; 0.1 allowed).
#[test]
fn metrics_match_evaluate_py() {
    let r = reference();
    let device = Device::Cpu;
    let lpips = nulltext_eval::lpips::Lpips::load(
        &fixtures().join("lpips/lpips-squeeze-random-backbone.safetensors"),
        &device,
    )
    .unwrap();
    let clip =
        nulltext_models::clip_score::ClipScorer::load(&fixtures().join("clip"), &device).unwrap();
    let structure = StructureDistance::load(&test_vit(&r["dino_test_vit"]), &device).unwrap();
    let nets = Networks {
        lpips: Some(&lpips),
        clip: Some(&clip),
        structure: Some(&structure),
    };
    let mapping = pie_bench::read_mapping(&bench()).unwrap();
    let mut nan_rows = 0;
    for (key, entry) in mapping {
        let entry = entry.unwrap();
        let src = rgb(&bench().join("annotation_images").join(&entry.image_path));
        let tgt = rgb(&bench().join("edited").join(&entry.image_path));
        let mask = region(&pie_bench::decode_mask(&entry.mask, 512).unwrap());
        let captions = (
            pie_bench::strip_markers(&entry.original_prompt),
            pie_bench::strip_markers(&entry.editing_prompt),
        );
        let want = &r["entries"][&key]["metrics"];
        assert_eq!(captions.0, r["entries"][&key]["original_prompt"]);
        assert_eq!(captions.1, r["entries"][&key]["editing_prompt"]);
        let score =
            |w| pie_bench::score(&nets, &src, &tgt, &mask, (&captions.0, &captions.1), w).unwrap();
        let published = score(SsimWindow::Gaussian);
        let padded = score(SsimWindow::GaussianPadded);
        let rows = [
            (
                "structure_distance",
                published.structure_distance,
                1e-4,
                0.0,
            ),
            ("psnr_unedit_part", published.psnr_unedit_part, 1e-5, 0.0),
            ("mse_unedit_part", published.mse_unedit_part, 1e-5, 0.0),
            ("lpips_unedit_part", published.lpips_unedit_part, 1e-4, 0.0),
            (
                "ssim_unedit_part_torchmetrics_1_2",
                published.ssim_unedit_part,
                1e-5,
                0.0,
            ),
            ("ssim_unedit_part", padded.ssim_unedit_part, 1e-5, 0.0),
            (
                "clip_similarity_source_image",
                published.clip_similarity_source_image,
                0.0,
                0.1,
            ),
            (
                "clip_similarity_target_image",
                published.clip_similarity_target_image,
                0.0,
                0.1,
            ),
            (
                "clip_similarity_target_image_edit_part",
                published.clip_similarity_target_image_edit_part,
                0.0,
                0.1,
            ),
        ];
        for (name, got, rel, abs) in rows {
            match (got, want[name].as_f64()) {
                (Some(g), Some(w)) => {
                    let err = (g - w).abs();
                    eprintln!("{key} {name:>40}: ours {g:.8} evaluate.py {w:.8} |Δ| {err:.2e}");
                    assert!(
                        err <= rel * w.abs() + abs + 1e-12,
                        "{key} {name}: {g} vs {w}"
                    );
                }
                (None, None) => nan_rows += 1,
                (g, w) => panic!("{key} {name}: ours {g:?}, evaluate.py {w:?}"),
            }
        }
        // The antialiased resize of today's torchvision is another number.
        let aa = want["structure_distance_antialiased"].as_f64().unwrap();
        let d = published.structure_distance.unwrap();
        if key == "111000000000" {
            assert!((d - aa).abs() > 1e-2 * aa, "{key}: {d} vs antialiased {aa}");
        }
    }
    // The entry whose mask covers the whole image has no unedited part: "nan".
    assert_eq!(nan_rows, 5);
}

/// The real ViT-B/8 architecture (768 wide, 12 heads) with generated weights, against the
/// authors' extractor unchanged (`tools/pie_bench_reference.py --vitb8`). Slow: ~1 minute.
#[test]
#[ignore]
fn structure_distance_of_vit_b8() {
    let r = reference();
    let Some(spec) = r.get("vitb8").filter(|v| !v.is_null()) else {
        panic!("reference.json has no ViT-B/8 value: run tools/pie_bench_reference.py --vitb8");
    };
    let structure = StructureDistance::load(&test_vit(spec), &Device::Cpu).unwrap();
    let (key, entry) = pie_bench::read_mapping(&bench())
        .unwrap()
        .into_iter()
        .next()
        .unwrap();
    let entry = entry.unwrap();
    let src = rgb(&bench().join("annotation_images").join(&entry.image_path));
    let tgt = rgb(&bench().join("edited").join(&entry.image_path));
    let got = structure.distance(&src, &tgt, None).unwrap();
    let want = r["entries"][&key]["metrics"]["structure_distance_vitb8"]
        .as_f64()
        .unwrap();
    eprintln!("ViT-B/8: ours {got:.8} evaluate.py {want:.8}");
    assert!((got - want).abs() <= 1e-4 * want.abs(), "{got} vs {want}");
}

#[test]
fn import_turns_entries_into_items_and_bad_ones_into_problems() {
    let dir = std::env::temp_dir().join(format!("nulltext-pie-import-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let data = dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    // The fixture's entries plus three bad ones.
    let mut mapping: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(bench().join("mapping_file.json")).unwrap())
            .unwrap();
    let good = mapping["000000000000"].clone();
    let mut missing = good.clone();
    missing["image_path"] = "0_random_140/nowhere.png".into();
    let mut malformed = good.clone();
    malformed["mask"] = serde_json::json!([10, 20, 30]);
    let mut unknown = good.clone();
    unknown["editing_type_id"] = "12".into();
    mapping.insert("000000000001".into(), missing);
    mapping.insert("000000000002".into(), malformed);
    mapping.insert("000000000003".into(), unknown);
    std::fs::write(
        data.join("mapping_file.json"),
        serde_json::to_string(&mapping).unwrap(),
    )
    .unwrap();
    std::os::unix::fs::symlink(
        bench().join("annotation_images"),
        data.join("annotation_images"),
    )
    .unwrap();
    let out = dir.join("out");
    let m = pie_bench::import(&data, &out, None).unwrap();
    let ids: Vec<&str> = m.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids.len(), 7);
    let problem = |id: &str| m.items.iter().find(|i| i.id == id).unwrap().problem.clone();
    assert!(problem("000000000001").unwrap().contains("no such image"));
    assert!(problem("000000000002")
        .unwrap()
        .contains("(start, length) pairs"));
    assert!(problem("000000000003")
        .unwrap()
        .contains("editing_type_id `12`"));
    let first = m.items.iter().find(|i| i.id == "000000000000").unwrap();
    assert!(first.problem.is_none());
    assert_eq!(first.spec.category.as_deref(), Some("0"));
    assert_eq!(first.spec.prompt, "a close up photo of a cat");
    // The mask file is mask_decode's mask.
    let png = image::open(first.mask.as_ref().unwrap())
        .unwrap()
        .to_luma8();
    let theirs = image::open(bench().join("masks/000000000000.png"))
        .unwrap()
        .to_luma8();
    assert_eq!(png, theirs);
    // The manifest written beside the masks holds the runnable items and reads back.
    let again = nulltext_eval::batch::read_manifest(&m.path).unwrap();
    assert_eq!(again.items.len(), 4);
    assert_eq!(again.items[0].spec, first.spec);
    // A selection of edit types keeps those (and the unclassifiable).
    let only = pie_bench::import(&data, &out, Some(&["1".to_string()])).unwrap();
    let ids: Vec<&str> = only.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, ["000000000003", "111000000000"]);
    let _ = std::fs::remove_dir_all(&dir);
}
