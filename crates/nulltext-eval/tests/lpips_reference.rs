//! LPIPS against the `lpips` package (tests/fixtures/lpips/reference.json, written by
//! tools/lpips_reference.py): AlexNet and SqueezeNet backbones, with and without a mask.

mod common;

use candle_core::Device;
use common::fixtures;
use nulltext_eval::lpips::{Lpips, Net};
use nulltext_eval::metrics::Mask;

fn rgb(name: &str) -> image::RgbImage {
    image::open(fixtures().join("metrics").join(name))
        .unwrap()
        .to_rgb8()
}

#[test]
fn lpips_matches_the_reference_package() {
    let dir = fixtures().join("lpips");
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("reference.json")).unwrap())
            .unwrap();
    for (name, net) in [("alex", Net::Alex), ("squeeze", Net::Squeeze)] {
        let model = Lpips::load(
            &dir.join(format!("lpips-{name}-random-backbone.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(model.net(), net);
        let rows = reference["nets"][name].as_array().unwrap();
        assert!(rows.len() >= 8);
        for r in rows {
            let a = rgb(r["reference"].as_str().unwrap());
            let b = rgb(r["candidate"].as_str().unwrap());
            let mask = r["mask"].as_str().map(|m| {
                let gray = image::open(fixtures().join("metrics").join(m))
                    .unwrap()
                    .to_luma8();
                Mask::from_gray(&gray, false)
            });
            let got = model.distance(&a, &b, mask.as_ref()).unwrap();
            let want = r["lpips"].as_f64().unwrap();
            let rel = (got - want).abs() / want.abs();
            eprintln!(
                "{name:>8} {:>26}: ours {got:.9} lpips {want:.9} rel {rel:.1e}",
                r["name"].as_str().unwrap()
            );
            // f32 convolutions summed in another order: agreement to ~1e-7 relative.
            assert!(rel < 1e-5, "{name} {}: {got} vs {want}", r["name"]);
        }
        // Identical images are at distance 0.
        let a = rgb("chelsea.png");
        assert_eq!(model.distance(&a, &a, None).unwrap(), 0.0);
    }
}

#[test]
fn bad_lpips_weights_are_named() {
    let d = std::env::temp_dir().join(format!("nulltext-lpips-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    let e = Lpips::load(&d.join("missing.safetensors"), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("missing.safetensors"), "{e}");
    let p = d.join("model.safetensors");
    let t = candle_core::Tensor::zeros((2, 2), candle_core::DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(&[("foo".to_string(), t)].into_iter().collect(), &p).unwrap();
    let e = Lpips::load(&p, &Device::Cpu).err().unwrap().to_string();
    assert!(e.contains("not LPIPS weights"), "{e}");
    let _ = std::fs::remove_dir_all(&d);
}
