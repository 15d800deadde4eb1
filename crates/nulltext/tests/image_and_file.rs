//! Real image files in (PNG, JPEG, WebP, EXIF orientation, alpha, crops) and the
//! inversion file format (round trip, extra keys kept, every check).

mod common;

use std::collections::BTreeMap;

use candle_core::{DType, Device, Tensor};
use common::*;
use image::{Rgb, RgbImage, Rgba, RgbaImage};
use nulltext::image_io::{self, Crop};
use nulltext::inversion_file;

fn tmp(name: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("nulltext-io-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn chelsea() -> RgbImage {
    image::open(fixtures().join("inputs/chelsea256.png"))
        .unwrap()
        .to_rgb8()
}

#[test]
fn jpeg_and_webp_inputs() {
    let d = tmp("formats");
    let img = chelsea();
    let jpg = d.join("cat.jpg");
    let mut f = std::fs::File::create(&jpg).unwrap();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut f, 95)
        .encode_image(&img)
        .unwrap();
    let webp = d.join("cat.webp");
    img.save_with_format(&webp, image::ImageFormat::WebP)
        .unwrap();
    let j = image_io::load_image(&jpg, Crop::default(), 256).unwrap();
    let w = image_io::load_image(&webp, Crop::default(), 256).unwrap();
    let pj = image_io::psnr(&j, &img);
    eprintln!("JPEG q95 PSNR {pj:.1} dB");
    assert!(pj > 30.0);
    assert_eq!(w, img, "lossless WebP is exact");
    // The format comes from the content, not the name.
    let misnamed = d.join("cat.png");
    std::fs::copy(&jpg, &misnamed).unwrap();
    assert_eq!(
        image_io::load_image(&misnamed, Crop::default(), 256).unwrap(),
        j
    );
}

/// A JPEG with an EXIF APP1 segment carrying `orientation`.
fn jpeg_with_orientation(img: &RgbImage, orientation: u16) -> Vec<u8> {
    let mut jpg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpg, 95)
        .encode_image(img)
        .unwrap();
    // TIFF, little endian: header, one IFD entry (0x0112 SHORT 1 = orientation), no next IFD
    let mut tiff = b"II*\x00\x08\x00\x00\x00".to_vec();
    tiff.extend(1u16.to_le_bytes());
    tiff.extend(0x0112u16.to_le_bytes());
    tiff.extend(3u16.to_le_bytes());
    tiff.extend(1u32.to_le_bytes());
    tiff.extend((orientation as u32).to_le_bytes());
    tiff.extend(0u32.to_le_bytes());
    let mut app1 = b"Exif\x00\x00".to_vec();
    app1.extend(tiff);
    let mut seg = vec![0xFF, 0xE1];
    seg.extend(((app1.len() + 2) as u16).to_be_bytes());
    seg.extend(app1);
    let mut out = jpg[..2].to_vec(); // SOI
    out.extend(seg);
    out.extend(&jpg[2..]);
    out
}

#[test]
fn exif_orientation_is_honoured() {
    let d = tmp("exif");
    // 64 wide, 32 high: left half red, right half blue
    let img = RgbImage::from_fn(64, 32, |x, _| {
        if x < 32 {
            Rgb([255, 0, 0])
        } else {
            Rgb([0, 0, 255])
        }
    });
    let p = d.join("rotated.jpg");
    std::fs::write(&p, jpeg_with_orientation(&img, 6)).unwrap();
    let r = image_io::read_rgb(&p).unwrap();
    assert_eq!(
        r.dimensions(),
        (32, 64),
        "orientation 6 turns the picture by 90°"
    );
    // rotated clockwise: the red (left) half is now on top
    assert!(r.get_pixel(16, 5)[0] > 200 && r.get_pixel(16, 58)[2] > 200);
}

#[test]
fn alpha_is_dropped_and_crops_follow_the_reference() {
    let d = tmp("alpha");
    let rgba = RgbaImage::from_fn(300, 200, |x, y| {
        Rgba([
            (x % 256) as u8,
            (y % 256) as u8,
            7,
            if x < 150 { 0 } else { 255 },
        ])
    });
    let p = d.join("a.png");
    rgba.save(&p).unwrap();
    let rgb = image_io::read_rgb(&p).unwrap();
    assert_eq!(
        rgb.get_pixel(10, 20),
        &Rgb([10, 20, 7]),
        "alpha dropped, colour kept"
    );
    // centre square of 300×200 is x ∈ [50, 250)
    let sq = image_io::prepare(&rgb, Crop::default(), 200, &p).unwrap();
    assert_eq!(sq.get_pixel(0, 0), &Rgb([50, 0, 7]));
    // offsets first: cut 100 on the left → 200×200 from x = 100
    let c = image_io::prepare(&rgb, "100,0,0,0".parse().unwrap(), 200, &p).unwrap();
    assert_eq!(c.get_pixel(0, 0), &Rgb([100, 0, 7]));
    // resizing to the model size
    assert_eq!(
        image_io::prepare(&rgb, Crop::default(), 64, &p)
            .unwrap()
            .dimensions(),
        (64, 64)
    );
    assert!("1,2,3".parse::<Crop>().is_err());
    let e = image_io::prepare(&rgb, "295,0,0,0".parse().unwrap(), 64, &p)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a.png") && e.contains("5×200"), "{e}");
}

#[test]
fn pixels_round_trip_through_tensors() {
    let img = chelsea();
    let t = image_io::image_to_tensor(&img, &Device::Cpu).unwrap();
    assert_eq!(t.dims(), &[1, 3, 256, 256]);
    let back = image_io::tensor_to_images(&((t + 1.0).unwrap() / 2.0).unwrap()).unwrap();
    // x = p/127.5 − 1 → (x+1)/2·255 = p (up to float rounding, then truncation)
    let diff = back[0]
        .as_raw()
        .iter()
        .zip(img.as_raw())
        .filter(|(a, b)| a != b)
        .count();
    assert!(diff < img.as_raw().len() / 2);
    assert!(back[0]
        .as_raw()
        .iter()
        .zip(img.as_raw())
        .all(|(a, b)| (*a as i32 - *b as i32).abs() <= 1));
}

fn golden_inversion() -> nulltext::Inversion {
    inversion_file::load(&fixtures().join("golden/chelsea.nti.safetensors")).unwrap()
}

#[test]
fn inversion_files_round_trip_and_keep_unknown_keys() {
    let mut inv = golden_inversion();
    assert_eq!(inv.prompt, "a close up photo of a cat");
    assert_eq!(
        (inv.num_steps, inv.height, inv.width, inv.guidance),
        (50, 256, 256, 7.5)
    );
    assert_eq!(inv.model_fingerprint, "f99da5222da910ce");
    assert_eq!(inv.null_embeddings.dims(), &[50, 77, 32]);
    inv.extra_metadata
        .insert("my_tool_note".into(), "kept".into());
    inv.extra_tensors.insert(
        "my_mask".into(),
        Tensor::ones((2, 3), DType::F32, &Device::Cpu).unwrap(),
    );
    let d = tmp("roundtrip");
    let p = d.join("x.nti.safetensors");
    inversion_file::save(&inv, &p).unwrap();
    let back = inversion_file::load(&p).unwrap();
    assert_eq!(
        back.extra_metadata.get("my_tool_note").map(|s| s.as_str()),
        Some("kept")
    );
    assert_eq!(back.extra_tensors["my_mask"].dims(), &[2, 3]);
    assert_eq!(max_err(&back.null_embeddings, &inv.null_embeddings), 0.0);
    assert_eq!(back.scheduler, inv.scheduler);
    // readable by any safetensors reader, with the documented names
    let bytes = std::fs::read(&p).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
    names.sort();
    assert_eq!(
        names,
        ["image_latent", "latent_T", "my_mask", "null_embeddings"]
    );
    // The same inversion always gives the same bytes (reproducible batch runs).
    for _ in 0..4 {
        assert_eq!(inversion_file::to_bytes(&inv).unwrap(), bytes);
    }
}

/// A direct inversion's file: version 2, its offsets kept exactly; version 1 for every
/// other inversion, so that older readers keep reading those.
#[test]
fn direct_inversion_files_are_version_2() {
    let mut inv = golden_inversion();
    let format = |inv: &nulltext::Inversion| {
        let bytes = inversion_file::to_bytes(inv).unwrap();
        let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        h.metadata().as_ref().unwrap()["format"].clone()
    };
    assert_eq!(format(&inv), "nulltext-inversion/1");
    let offsets = common::noise(7, &[50, 4, 32, 32]);
    inv.latent_offsets = Some(offsets.clone());
    inv.method = nulltext::Method::Direct;
    assert_eq!(format(&inv), "nulltext-inversion/2");
    let d = tmp("direct");
    let p = d.join("x.nti.safetensors");
    inversion_file::save(&inv, &p).unwrap();
    let back = inversion_file::load(&p).unwrap();
    assert_eq!(back.method, nulltext::Method::Direct);
    assert_eq!(
        max_err(back.latent_offsets.as_ref().unwrap(), &offsets),
        0.0
    );
    let described = inversion_file::describe(&back);
    assert_eq!(described["method"], "direct");
    assert_eq!(
        described["tensors"]["latent_offsets"],
        serde_json::json!([50, 4, 32, 32])
    );

    let err = |b: &[u8]| {
        inversion_file::from_bytes(b)
            .expect_err("must fail")
            .to_string()
    };
    // offsets and method must agree, and there is one offset per step
    let e = err(&with(&[("method", "direct")], vec![]));
    assert!(e.contains("needs its `latent_offsets`"), "{e}");
    let e = err(&with(&[], vec![("latent_offsets", offsets.clone())]));
    assert!(e.contains("belong to direct inversions"), "{e}");
    let short = offsets.narrow(0, 0, 40).unwrap();
    let e = err(&with(
        &[("method", "direct")],
        vec![("latent_offsets", short)],
    ));
    assert!(
        e.contains("[50, 4, 32, 32]") && e.contains("50 steps"),
        "{e}"
    );
}

fn with(meta: &[(&str, &str)], tensors: Vec<(&str, Tensor)>) -> Vec<u8> {
    let inv = golden_inversion();
    let mut m: BTreeMap<String, String> = BTreeMap::new();
    let bytes = inversion_file::to_bytes(&inv).unwrap();
    let (_, h) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    for (k, v) in h.metadata().clone().unwrap() {
        m.insert(k, v);
    }
    for (k, v) in meta {
        m.insert(k.to_string(), v.to_string());
    }
    let mut ts: BTreeMap<String, Tensor> = BTreeMap::new();
    ts.insert("latent_T".into(), inv.latent_t.clone());
    ts.insert("null_embeddings".into(), inv.null_embeddings.clone());
    for (k, t) in tensors {
        ts.insert(k.into(), t);
    }
    safetensors::tensor::serialize(
        ts.iter().map(|(k, t)| (k.as_str(), t)),
        Some(m.into_iter().collect()),
    )
    .unwrap()
}

#[test]
fn bad_inversion_files_are_refused_with_the_reason() {
    let err = |b: &[u8]| {
        inversion_file::from_bytes(b)
            .expect_err("must fail")
            .to_string()
    };
    let e = err(&with(&[("format", "nulltext-inversion/4")], vec![]));
    assert!(
        e.contains("version 4") && e.contains("newer nulltext"),
        "{e}"
    );
    let pooled = Tensor::zeros((49, 12), candle_core::DType::F32, &candle_core::Device::Cpu);
    let e = err(&with(
        &[("format", "nulltext-inversion/3")],
        vec![("null_pooled", pooled.unwrap())],
    ));
    assert!(e.contains("`null_pooled` has shape [49, 12]"), "{e}");
    let e = err(&with(&[("format", "something-else/1")], vec![]));
    assert!(e.contains("unknown format"), "{e}");
    let e = err(&with(&[("num_steps", "40")], vec![]));
    assert!(e.contains("num_steps = 40"), "{e}");
    let inv = golden_inversion();
    let nan = inv
        .null_embeddings
        .broadcast_mul(&Tensor::new(f32::NAN, &Device::Cpu).unwrap())
        .unwrap();
    let e = err(&with(&[], vec![("null_embeddings", nan)]));
    assert!(e.contains("NaN"), "{e}");
    let e = err(&with(&[("method", "magic")], vec![]));
    assert!(e.contains("magic"), "{e}");
    let good = with(&[], vec![]);
    let e = err(&good[..good.len() - 100]);
    assert!(e.contains("truncated"), "{e}");
    assert!(inversion_file::from_bytes(&good).is_ok());
}

#[test]
fn inversions_from_another_model_are_refused_unless_forced() {
    let sd = load_tiny();
    let mut inv = golden_inversion();
    inv.check_model(&sd, false).unwrap();
    inv.model_fingerprint = "0000000000000000".into();
    let e = inv.check_model(&sd, false).unwrap_err().to_string();
    assert!(e.contains("fingerprint") && e.contains("--force"), "{e}");
    inv.check_model(&sd, true).unwrap();
    inv.height = 512;
    inv.width = 512;
    let e = inv.check_model(&sd, true).unwrap_err().to_string();
    assert!(e.contains("512×512"), "{e}");
}
