//! CLIP score against transformers' CLIPModel (tests/fixtures/clip/, written by
//! tools/clip_reference.py): a tiny random CLIP with the real tokenizer.

mod common;

use candle_core::Device;
use common::fixtures;
use nulltext_eval::clip_score::{clip_pixels, clip_score};
use nulltext_models::clip_score::ClipScorer;

#[test]
fn clip_score_matches_transformers() {
    let dir = fixtures().join("clip");
    let scorer = ClipScorer::load(&dir, &Device::Cpu).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    let mut exact = 0;
    for case in reference["cases"].as_array().unwrap() {
        let image = dir.join(case["image"].as_str().unwrap());
        let img = image::open(&image).unwrap().to_rgb8();
        let text = case["text"].as_str().unwrap();
        let got = clip_score(&scorer, &img, text, None).unwrap();
        let want = case["score"].as_f64().unwrap();
        let pix_mean = clip_pixels(&scorer, &img, None)
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64;
        let want_mean = case["pixel_values_mean"].as_f64().unwrap();
        eprintln!(
            "{:>26} {text:>28}: ours {got:.6} transformers {want:.6}; pixel mean {pix_mean:.6} vs {want_mean:.6}",
            case["image"].as_str().unwrap()
        );
        if img.width() as usize == scorer.image_size() {
            // No resizing: the same network on the same pixels.
            assert!((got - want).abs() < 1e-4, "{text}: {got} vs {want}");
            assert!((pix_mean - want_mean).abs() < 1e-6);
            exact += 1;
        } else {
            // Resized by another bicubic implementation than PIL's: close, not equal.
            assert!((got - want).abs() < 0.1, "{text}: {got} vs {want}");
            assert!((pix_mean - want_mean).abs() < 1e-2);
        }
    }
    assert!(exact >= 3);
    // Different captions give different scores (a test that can fail).
    let img = image::open(dir.join("chelsea32.png")).unwrap().to_rgb8();
    let a = clip_score(&scorer, &img, "a close up photo of a cat", None).unwrap();
    let b = clip_score(&scorer, &img, "a red car on a bridge", None).unwrap();
    assert!((a - b).abs() > 1e-3);
}

#[test]
fn a_folder_without_clip_is_named() {
    let e = ClipScorer::load(&fixtures().join("models/tiny-sd15/unet"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("config.json") && e.contains("CLIP"), "{e}");
}
