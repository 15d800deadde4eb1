//! PSNR, SSIM and MSE against scikit-image's values for real image pairs
//! (tests/fixtures/metrics/reference.json, written by tools/metrics_reference.py).

mod common;

use common::fixtures;
use nulltext_eval::metrics::{compare, ImageMetrics, Mask, SsimWindow};

fn rgb(name: &str) -> image::RgbImage {
    image::open(fixtures().join("metrics").join(name))
        .unwrap()
        .to_rgb8()
}

fn check(name: &str, got: ImageMetrics, ssim_gaussian: f64, want: &serde_json::Value) {
    let w = |k: &str| want[k].as_f64().unwrap();
    let rows = [
        ("psnr", got.psnr, w("psnr")),
        ("mse", got.mse, w("mse")),
        ("ssim", got.ssim, w("ssim")),
        ("ssim_gaussian", ssim_gaussian, w("ssim_gaussian")),
    ];
    for (what, g, r) in rows {
        let err = (g - r).abs();
        eprintln!("{name:>20} {what:>14}: ours {g:.10} scikit-image {r:.10} |Δ| {err:.2e}");
        // The bar is 1e-3; both compute in f64, so the agreement is much closer.
        assert!(err <= 1e-9 * (1.0 + r.abs()), "{name} {what}: {g} vs {r}");
    }
}

#[test]
fn psnr_ssim_mse_match_scikit_image() {
    let text = std::fs::read_to_string(fixtures().join("metrics/reference.json")).unwrap();
    let reference: serde_json::Value = serde_json::from_str(&text).unwrap();
    let pairs = reference["pairs"].as_array().unwrap();
    assert!(pairs.len() >= 5);
    let mut masked = 0;
    for p in pairs {
        let name = p["name"].as_str().unwrap();
        let a = rgb(p["reference"].as_str().unwrap());
        let b = rgb(p["candidate"].as_str().unwrap());
        let m = compare(&a, &b, None, SsimWindow::Uniform7).unwrap();
        let g = compare(&a, &b, None, SsimWindow::Gaussian).unwrap();
        assert_eq!((m.psnr, m.mse), (g.psnr, g.mse));
        check(name, m, g.ssim, &p["metrics"]);
        if let Some(mask) = p["mask"].as_str() {
            let gray = image::open(fixtures().join("metrics").join(mask))
                .unwrap()
                .to_luma8();
            let mask = Mask::from_gray(&gray, false);
            let m = compare(&a, &b, Some(&mask), SsimWindow::Uniform7).unwrap();
            let g = compare(&a, &b, Some(&mask), SsimWindow::Gaussian).unwrap();
            check(&format!("{name} (masked)"), m, g.ssim, &p["masked"]);
            masked += 1;
        }
    }
    assert!(masked >= 3);
}
