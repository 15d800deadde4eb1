//! Crafted input to the readers of files nulltext did not write — inversion files, images,
//! single-file checkpoint headers: each refusal names the problem, and a bounded,
//! deterministic mutation run over each reader (a few thousand cases, seconds) finds no
//! panic. The crafted files are built here.

mod common;
#[path = "../../../tests/support/crafted_png.rs"]
mod crafted_png;

use std::collections::BTreeMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use candle_core::{Device, Tensor};
use common::fixtures;
use nulltext::image_io;
use nulltext::inversion_file::{from_bytes, to_bytes};

/// xorshift64*: the same cases on every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, v: &'a [T]) -> &'a T {
        &v[self.below(v.len())]
    }
}

/// The golden inversion cut to its first two steps: small enough to parse thousands of
/// times.
fn small_inversion() -> nulltext::Inversion {
    let mut inv =
        nulltext::inversion_file::load(&fixtures().join("golden/chelsea.nti.safetensors")).unwrap();
    inv.null_embeddings = inv.null_embeddings.narrow(0, 0, 2).unwrap();
    inv.num_steps = 2;
    inv
}

fn with_value_at(t: &Tensor, i: usize, v: f32) -> Tensor {
    let mut values: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
    values[i] = v;
    Tensor::from_vec(values, t.dims(), &Device::Cpu).unwrap()
}

#[test]
fn large_finite_values_are_kept_and_each_non_finite_one_is_named() {
    let inv = small_inversion();
    let mut big = inv.clone();
    big.null_embeddings = (inv.null_embeddings.ones_like().unwrap() * 3e38).unwrap();
    let back = from_bytes(&to_bytes(&big).unwrap()).expect("3e38 is a finite f32");
    let v: Vec<f32> = back
        .null_embeddings
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap();
    assert!(v.iter().all(|x| *x == 3e38));
    for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
        let mut b = inv.clone();
        b.latent_t = with_value_at(&inv.latent_t, 17, bad);
        let e = from_bytes(&to_bytes(&b).unwrap()).unwrap_err().to_string();
        assert!(e.contains("`latent_T`") && e.contains("element 17"), "{e}");
    }
}

#[test]
fn every_metadata_number_is_checked() {
    let inv = small_inversion();
    for g in [f64::NAN, 1e308, -1.0, f64::INFINITY] {
        let mut b = inv.clone();
        b.guidance = g;
        let e = from_bytes(&to_bytes(&b).unwrap()).unwrap_err().to_string();
        assert!(e.contains("guidance_scale"), "{g}: {e}");
    }
    let mut b = inv.clone();
    b.height = 0;
    let e = from_bytes(&to_bytes(&b).unwrap()).unwrap_err().to_string();
    assert!(e.contains("`height` = 0"), "{e}");
    type Set = fn(&mut nulltext::models::SchedulerConfig);
    let cases: [(&str, Set); 4] = [
        ("num_train_timesteps", |s| s.num_train_timesteps = 1 << 40),
        // NaN is written as JSON null, which is no number either.
        ("scheduler", |s| s.beta_end = f64::NAN),
        ("beta_start", |s| s.beta_start = 1e308),
        ("steps_offset", |s| s.steps_offset = 5000),
    ];
    for (says, set) in cases {
        let mut b = inv.clone();
        set(&mut b.scheduler);
        let e = from_bytes(&to_bytes(&b).unwrap()).unwrap_err().to_string();
        assert!(e.contains("scheduler") && e.contains(says), "{says}: {e}");
    }
}

/// Byte flips, truncations, header lengths and absurd metadata values: the reader answers
/// every case with a value or an error, never a panic.
#[test]
fn inversion_reader_survives_mutations() {
    let base = to_bytes(&small_inversion()).unwrap();
    let n = u64::from_le_bytes(base[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&base[8..8 + n]).unwrap();
    let keys: Vec<String> = header["__metadata__"]
        .as_object()
        .unwrap()
        .keys()
        .cloned()
        .collect();
    let absurd = [
        "NaN",
        "inf",
        "-inf",
        "1e308",
        "-1",
        "0",
        "",
        "18446744073709551616",
        "3e38",
        "{}",
        "null",
        r#"{"num_train_timesteps": 99999999999}"#,
        "nulltext-inversion/1.9",
    ];
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut refused = 0;
    for case in 0..3000 {
        let bytes = match case % 4 {
            0 => {
                let mut b = base.clone();
                for _ in 0..1 + rng.below(4) {
                    let i = rng.below(8 + n);
                    b[i] ^= 1 << rng.below(8);
                }
                b
            }
            1 => base[..rng.below(base.len())].to_vec(),
            2 => {
                let mut b = base.clone();
                b[..8].copy_from_slice(&rng.next().to_le_bytes());
                b
            }
            _ => {
                let mut h = header.clone();
                let key = rng.pick(&keys).clone();
                h["__metadata__"][&key] = (*rng.pick(&absurd)).into();
                let mut hb = h.to_string().into_bytes();
                while !hb.len().is_multiple_of(8) {
                    hb.push(b' ');
                }
                let mut b = (hb.len() as u64).to_le_bytes().to_vec();
                b.extend(hb);
                b.extend_from_slice(&base[8 + n..]);
                b
            }
        };
        let r = catch_unwind(AssertUnwindSafe(|| from_bytes(&bytes)));
        match r {
            Ok(Err(_)) => refused += 1,
            Ok(Ok(inv)) => {
                assert!(inv.guidance.is_finite() && inv.num_steps >= 1 && inv.height >= 1);
            }
            Err(_) => panic!("case {case}: the inversion reader panicked"),
        }
    }
    assert!(refused > 1000, "{refused}");
}

fn encoded(format: image::ImageFormat) -> Vec<u8> {
    let img = image::RgbImage::from_fn(24, 16, |x, y| image::Rgb([x as u8 * 9, y as u8 * 13, 7]));
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), format)
        .unwrap();
    bytes
}

/// A PNG whose (checksummed) header claims `w`×`h` pixels.
fn png_claiming(w: u32, h: u32) -> Vec<u8> {
    crafted_png::claiming(encoded(image::ImageFormat::Png), w, h)
}

#[test]
fn image_size_is_checked_from_the_header() {
    let name = Path::new("bomb.png");
    let e = image_io::decode_rgb(&png_claiming(60_000, 60_000), name, 64_000_000).unwrap_err();
    assert!(
        matches!(
            e,
            nulltext::Error::TooManyPixels {
                width: 60_000,
                height: 60_000,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("bomb.png"), "{e}");
    // Under the limit, the header's size must still be backed by data.
    let e = image_io::decode_rgb(&png_claiming(4000, 4000), name, 64_000_000).unwrap_err();
    assert!(matches!(e, nulltext::Error::Image { .. }), "{e}");
    let ok = image_io::decode_rgb(&encoded(image::ImageFormat::Png), name, 384).unwrap();
    assert_eq!(ok.dimensions(), (24, 16));
    assert!(image_io::decode_rgb(&encoded(image::ImageFormat::Png), name, 383).is_err());
}

#[test]
fn image_reader_survives_mutations() {
    let bases = [
        encoded(image::ImageFormat::Png),
        encoded(image::ImageFormat::Jpeg),
        encoded(image::ImageFormat::WebP),
        png_claiming(100_000, 3),
    ];
    let mut rng = Rng(0xD1B5_4A32_D192_ED03);
    for case in 0..3000 {
        let base = rng.pick(&bases);
        let mut b = base.clone();
        match case % 3 {
            0 => {
                for _ in 0..1 + rng.below(3) {
                    let i = rng.below(b.len());
                    b[i] = rng.next() as u8;
                }
            }
            1 => b.truncate(rng.below(b.len())),
            _ => {
                // Size fields near the start of every format.
                let i = rng.below(40.min(b.len()));
                b[i] = 0xFF;
            }
        }
        let r = catch_unwind(AssertUnwindSafe(|| {
            image_io::decode_rgb(&b, Path::new("x"), 1_000_000)
        }));
        match r {
            Ok(Ok(img)) => assert!(img.width() as u64 * img.height() as u64 <= 1_000_000),
            Ok(Err(_)) => {}
            Err(_) => panic!("case {case}: the image reader panicked"),
        }
    }
}

/// Shapes of the tiny model's single-file checkpoint with ranks, sizes and keys changed:
/// architecture detection answers every case without a panic.
#[test]
fn single_file_detection_survives_mutated_shapes() {
    use nulltext::models::single_file::{detect, read_shapes};
    let base = read_shapes(&fixtures().join("models/tiny-sd15.safetensors")).unwrap();
    assert!(detect(&base).is_ok());
    // The keys detection reads, and any others.
    let keys: Vec<String> = base.keys().cloned().collect();
    let read: Vec<String> = keys
        .iter()
        .filter(|k| {
            k.contains("input_blocks.0.0.weight")
                || k.contains("out_layers.3.weight")
                || k.contains("attn2.to_k.weight")
                || k.contains("proj_in.weight")
                || k.contains("out.2.weight")
                || k.contains("block.0.conv1.weight")
                || k.contains("post_quant_conv.weight")
                || k.contains("token_embedding.weight")
                || k.contains("position_embedding.weight")
                || k.contains("mlp.fc1.weight")
        })
        .cloned()
        .collect();
    assert!(read.len() > 8);
    let sizes = [0usize, 1, 2, 3, 4, 8, 64, 768, 1 << 20, usize::MAX];
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    for case in 0..3000 {
        let mut shapes: BTreeMap<String, Vec<usize>> = base.clone();
        for _ in 0..1 + rng.below(3) {
            let k = if rng.below(4) == 0 {
                rng.pick(&keys).clone()
            } else {
                rng.pick(&read).clone()
            };
            if rng.below(5) == 0 {
                shapes.remove(&k);
            } else {
                let rank = rng.below(6);
                let s = (0..rank).map(|_| *rng.pick(&sizes)).collect();
                shapes.insert(k, s);
            }
        }
        if catch_unwind(AssertUnwindSafe(|| detect(&shapes))).is_err() {
            panic!("case {case}: detection panicked");
        }
    }
}
