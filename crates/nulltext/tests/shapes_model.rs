//! End-to-end checks of the bundled shapes model (`models/shapes`, trained by `nulltext
//! train`) that look at what the pictures show, with the pixel-statistics classifier of
//! `nulltext::shapes`: held-out captions draw the named colours and shapes; null-text
//! inversion reconstructs a held-out scene far better than DDIM inversion; a colour edit
//! recolours the shape and keeps the background. The checks the bundled model does not pass
//! yet (a shape swap, local blending) are here too, ignored with the reason: run them with
//! `--ignored` against a better-trained model.

use std::path::PathBuf;

use image::RgbImage;
use nulltext::edit::{edit, BlendOptions, EditOptions};
use nulltext::image_io::{psnr, tensor_to_images};
use nulltext::shapes::{classify, colour_error, held_out_combos, Colour, Scene, Shape};
use nulltext::text2img::{generate, GenerateOptions};
use nulltext::{invert_image, InvertOptions, Method, NoProgress, StableDiffusion};

fn model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/shapes")
}

fn load() -> StableDiffusion {
    StableDiffusion::load(model_dir().to_str().unwrap(), &Default::default()).unwrap()
}

fn image(sd: &StableDiffusion, z: &candle_core::Tensor) -> RgbImage {
    tensor_to_images(&sd.latent_to_image(z).unwrap())
        .unwrap()
        .remove(0)
}

/// A held-out scene (its colour combination never seen in training), centred and large
/// enough for its shape to be unambiguous.
fn held_out_scene(shape: Shape, colour: Colour, background: Colour) -> Scene {
    Scene::centred(shape, colour, background)
}

#[test]
fn held_out_captions_draw_the_named_colours() {
    let sd = load();
    let combos = held_out_combos();
    let (mut colour_ok, mut background_ok, mut shape_ok, mut n) = (0, 0, 0, 0);
    let mut report = Vec::new();
    for (i, (shape, colour, background)) in combos.iter().enumerate() {
        for seed in 0..2u64 {
            let prompt = held_out_scene(*shape, *colour, *background).caption();
            let opts = GenerateOptions {
                prompt: prompt.clone(),
                negative_prompt: String::new(),
                seed: 100 + 7 * i as u64 + seed,
                steps: 50,
                guidance: 7.5,
                height: 64,
                width: 64,
            };
            let z = generate(&sd, &opts, &mut NoProgress).unwrap();
            let img = image(&sd, &z);
            let c = classify(&img);
            n += 1;
            if let Some(c) = &c {
                colour_ok += (c.colour == *colour) as usize;
                background_ok += (c.background == *background) as usize;
                shape_ok += (c.shape == *shape) as usize;
            }
            report.push(format!(
                "{prompt}: {:?}",
                c.map(|c| (c.colour, c.shape, c.background))
            ));
        }
    }
    let rate = |k: usize| k as f64 / n as f64;
    eprintln!(
        "held-out captions ({n} images): colour {:.0} %, background {:.0} %, shape {:.0} %\n{}",
        100.0 * rate(colour_ok),
        100.0 * rate(background_ok),
        100.0 * rate(shape_ok),
        report.join("\n")
    );
    assert!(
        rate(colour_ok) >= 0.75,
        "shape colour right in {colour_ok}/{n}"
    );
    assert!(
        rate(background_ok) >= 0.7,
        "background right in {background_ok}/{n}"
    );
    // the named shape: reported above, asserted by `held_out_captions_draw_the_named_shape`
}

#[test]
fn held_out_captions_draw_the_named_shape() {
    let sd = load();
    let (mut ok, mut n) = (0, 0);
    for (i, (shape, colour, background)) in held_out_combos().iter().enumerate() {
        let opts = GenerateOptions {
            prompt: held_out_scene(*shape, *colour, *background).caption(),
            negative_prompt: String::new(),
            seed: 100 + 7 * i as u64,
            steps: 50,
            guidance: 7.5,
            height: 64,
            width: 64,
        };
        let img = image(&sd, &generate(&sd, &opts, &mut NoProgress).unwrap());
        ok += classify(&img).is_some_and(|c| c.shape == *shape) as usize;
        n += 1;
    }
    eprintln!("held-out captions: the named shape in {ok}/{n}");
    assert!(2 * ok >= n, "shape right in {ok}/{n}");
}

/// PSNR of the reconstruction of `scene` after inverting it with `method` at w = 7.5.
fn reconstruction_psnr(sd: &StableDiffusion, scene: &Scene, method: Method) -> f64 {
    let photo = scene.render(64);
    let opts = InvertOptions {
        method,
        ..Default::default()
    };
    let (inv, _) = invert_image(sd, &photo, &scene.caption(), &opts, &mut NoProgress).unwrap();
    let z = nulltext::reconstruct(sd, &inv, &mut NoProgress).unwrap();
    psnr(&image(sd, &z), &photo)
}

#[test]
fn null_text_inversion_reconstructs_far_better_than_ddim_inversion() {
    let sd = load();
    let (shape, colour, background) = held_out_combos()[0];
    let scene = held_out_scene(shape, colour, background);
    let photo = scene.render(64);
    // the VAE's round trip bounds what any inversion can reach
    let x = nulltext::image_io::image_to_tensor(&photo, &sd.device).unwrap();
    let vae = psnr(&image(&sd, &sd.image_to_latent(&x).unwrap()), &photo);
    let ddim = reconstruction_psnr(&sd, &scene, Method::Ddim);
    let null_text = reconstruction_psnr(&sd, &scene, Method::NullText);
    eprintln!(
        "{}: PSNR at w = 7.5: DDIM inversion {ddim:.2} dB, null-text {null_text:.2} dB \
         (VAE round trip {vae:.2} dB)",
        scene.caption()
    );
    assert!(
        null_text > ddim + 5.0,
        "null-text {null_text:.2} dB vs DDIM {ddim:.2} dB"
    );
    assert!(
        null_text > vae - 1.5,
        "null-text {null_text:.2} dB vs the VAE's {vae:.2} dB"
    );
}

/// Inverts `scene` and edits its caption to `target`; returns (reconstruction, edit).
fn invert_and_edit(
    sd: &StableDiffusion,
    scene: &Scene,
    target: &str,
    blend: Option<&str>,
    attention_downscale: usize,
) -> (RgbImage, RgbImage) {
    let photo = scene.render(64);
    let (inv, _) = invert_image(
        sd,
        &photo,
        &scene.caption(),
        &InvertOptions::default(),
        &mut NoProgress,
    )
    .unwrap();
    let opts = EditOptions {
        blend: blend.map(|b| BlendOptions::parse(b).unwrap()),
        attention_downscale,
        ..Default::default()
    };
    let r = edit(sd, &inv, &[target.to_string()], &opts, &mut NoProgress).unwrap();
    let z0 = r.latents.narrow(0, 0, 1).unwrap();
    let z1 = r.latents.narrow(0, 1, 1).unwrap();
    (image(sd, &z0), image(sd, &z1))
}

#[test]
fn colour_edit_recolours_the_shape() {
    let sd = load();
    let scene = held_out_scene(Shape::Circle, Colour::Red, Colour::Blue);
    let (_, edited) = invert_and_edit(&sd, &scene, "a green circle on a blue background", None, 4);
    let c = classify(&edited).expect("a shape in the edited image");
    let shape_err = colour_error(&edited, &scene.mask(64), Colour::Green).unwrap();
    let was_red = colour_error(&edited, &scene.mask(64), Colour::Red).unwrap();
    eprintln!("red → green circle: {c:?}; shape vs green {shape_err:.1}, vs red {was_red:.1}");
    assert_eq!(c.colour, Colour::Green);
    assert!(
        shape_err < 45.0 && shape_err < was_red / 2.0,
        "shape vs green {shape_err:.1}"
    );
}

#[test]
fn colour_edit_keeps_the_background() {
    let sd = load();
    let scene = held_out_scene(Shape::Circle, Colour::Red, Colour::Blue);
    let (rec, edited) =
        invert_and_edit(&sd, &scene, "a green circle on a blue background", None, 4);
    let background = scene.background_mask(64, 3.0);
    let bg_err = colour_error(&edited, &background, Colour::Blue).unwrap();
    let bg_rec = colour_error(&rec, &background, Colour::Blue).unwrap();
    eprintln!("background vs blue: edit {bg_err:.1}, reconstruction {bg_rec:.1} (0–255)");
    assert!(bg_err < 25.0, "background changed by {bg_err:.1}");
}

#[test]
#[ignore = "the bundled model turns the circle into a concave four-pointed shape (read as a star), not a square"]
fn shape_swap_changes_the_shape() {
    let sd = load();
    let scene = held_out_scene(Shape::Circle, Colour::Yellow, Colour::Black);
    let (_, edited) = invert_and_edit(
        &sd,
        &scene,
        "a yellow square on a black background",
        None,
        4,
    );
    let c = classify(&edited).expect("a shape in the edited image");
    eprintln!("circle → square: {c:?}");
    assert_eq!(c.shape, Shape::Square);
    assert_eq!(c.colour, Colour::Yellow);
    assert_eq!(c.background, Colour::Black);
}

#[test]
#[ignore = "the bundled model's word attention spreads over its whole 8×8 latent, so the blend mask covers everything"]
fn local_blend_leaves_the_background_untouched() {
    let sd = load();
    let scene = held_out_scene(Shape::Square, Colour::White, Colour::Red);
    let target = "a purple square on a red background";
    // maps from the full-resolution layers: at 8×8 latents the default latent/4 is 2×2
    let (rec, blended) = invert_and_edit(&sd, &scene, target, Some("square:square"), 1);
    let (_, plain) = invert_and_edit(&sd, &scene, target, None, 4);
    let background = scene.background_mask(64, 4.0);
    // mean absolute difference to the reconstruction over the background, 0–255
    let diff = |img: &RgbImage| -> f64 {
        let (mut s, mut n) = (0f64, 0usize);
        for (i, m) in background.iter().enumerate() {
            if *m {
                let (a, b) = (img.as_raw(), rec.as_raw());
                for ch in 0..3 {
                    s += (a[3 * i + ch] as f64 - b[3 * i + ch] as f64).abs();
                }
                n += 3;
            }
        }
        s / n.max(1) as f64
    };
    let (d_blend, d_plain) = (diff(&blended), diff(&plain));
    let c = classify(&blended).expect("a shape in the blended edit");
    eprintln!(
        "local blend: background differs from the reconstruction by {d_blend:.2} (without blend \
         {d_plain:.2}); {c:?}"
    );
    assert!(
        d_blend < 2.0,
        "background changed by {d_blend:.2} with local blend"
    );
    assert!(d_blend <= d_plain);
    assert_eq!(c.colour, Colour::Purple);
}

#[test]
fn attention_downscale_picks_the_layers_of_the_maps() {
    let sd = load();
    let scene = held_out_scene(Shape::Circle, Colour::Red, Colour::Blue);
    let opts = InvertOptions {
        method: Method::Ddim,
        num_steps: 10,
        ..Default::default()
    };
    let (inv, _) = invert_image(
        &sd,
        &scene.render(64),
        &scene.caption(),
        &opts,
        &mut NoProgress,
    )
    .unwrap();
    let target = ["a green circle on a blue background".to_string()];
    // 8×8 latents: cross-attention layers at 8×8, 4×4 and 2×2
    for (downscale, side) in [(1, 8), (2, 4), (4, 2)] {
        let opts = EditOptions {
            attention_downscale: downscale,
            record_attention: true,
            ..Default::default()
        };
        let r = edit(&sd, &inv, &target, &opts, &mut NoProgress).unwrap();
        let maps = r.attention_maps.expect("maps were asked for");
        assert_eq!(maps.dims(), &[2, side, side, 77], "downscale {downscale}");
    }
    let opts = EditOptions {
        attention_downscale: 3,
        ..Default::default()
    };
    let Err(e) = edit(&sd, &inv, &target, &opts, &mut NoProgress) else {
        panic!("downscale 3 was accepted");
    };
    assert!(e.to_string().contains("1, 2 or 4"), "{e}");
}
