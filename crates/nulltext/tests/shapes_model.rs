//! End-to-end checks of the bundled shapes model (`models/shapes`, trained by `nulltext
//! train`) that look at what the pictures show, with the pixel-statistics classifier of
//! `nulltext_train::shapes`: held-out captions draw the named colours and shapes; null-text
//! inversion reconstructs a held-out scene far better than DDIM inversion; a colour edit
//! recolours the shape and keeps the background; shape swaps change the shape; local
//! blending leaves the background alone; the words' attention maps fall on what they name.
//! `NULLTEXT_SHAPES_MODEL=DIR` runs the same checks on another model folder (one being
//! trained, say).

use std::path::PathBuf;

use image::RgbImage;
use nulltext::edit::{edit, BlendOptions, EditOptions, Window};
use nulltext::image_io::{psnr, tensor_to_images};
use nulltext::text2img::{generate, GenerateOptions};
use nulltext::{invert_image, Inversion, InvertOptions, Method, NoProgress, StableDiffusion};
use nulltext_eval::metrics::{compare, Mask, SsimWindow};
use nulltext_train::shapes::{classify, colour_error, held_out_combos, Colour, Scene, Shape};

/// Of the 12 shape swaps, at least this many must come out right.
const SWAPS_RIGHT: usize = 8;
/// Shares of a word's map that must lie on its part of the scene.
const WORD_ON_SHAPE: f32 = 0.9;
const WORD_OFF_SHAPE: f32 = 0.75;

/// `models/shapes`, or the model folder in `NULLTEXT_SHAPES_MODEL` (to check a model being
/// trained against the same bar).
fn model_dir() -> PathBuf {
    match std::env::var_os("NULLTEXT_SHAPES_MODEL") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../models/shapes"),
    }
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

/// The null-text inversion of `scene` (rendered at 64 px) under its own caption.
fn invert(sd: &StableDiffusion, scene: &Scene) -> Inversion {
    let photo = scene.render(64);
    let opts = InvertOptions::default();
    invert_image(sd, &photo, &scene.caption(), &opts, &mut NoProgress)
        .unwrap()
        .0
}

/// Edits an inversion's caption to `target`; returns (reconstruction, edit).
fn edit_to(
    sd: &StableDiffusion,
    inv: &Inversion,
    target: &str,
    opts: &EditOptions,
) -> (RgbImage, RgbImage) {
    let r = edit(sd, inv, &[target.to_string()], opts, &mut NoProgress).unwrap();
    let z0 = r.latents.narrow(0, 0, 1).unwrap();
    let z1 = r.latents.narrow(0, 1, 1).unwrap();
    (image(sd, &z0), image(sd, &z1))
}

#[test]
fn colour_edit_recolours_the_shape_and_keeps_the_background() {
    let sd = load();
    let scene = held_out_scene(Shape::Circle, Colour::Red, Colour::Blue);
    let inv = invert(&sd, &scene);
    let target = "a green circle on a blue background";
    let (rec, edited) = edit_to(&sd, &inv, target, &EditOptions::default());
    let c = classify(&edited).expect("a shape in the edited image");
    let shape_err = colour_error(&edited, &scene.mask(64), Colour::Green).unwrap();
    let was_red = colour_error(&edited, &scene.mask(64), Colour::Red).unwrap();
    let background = scene.background_mask(64, 3.0);
    let bg_err = colour_error(&edited, &background, Colour::Blue).unwrap();
    let bg_rec = colour_error(&rec, &background, Colour::Blue).unwrap();
    eprintln!(
        "red → green circle: {c:?}; shape vs green {shape_err:.1}, vs red {was_red:.1}; \
         background vs blue: edit {bg_err:.1}, reconstruction {bg_rec:.1} (0–255)"
    );
    assert_eq!(c.colour, Colour::Green);
    assert!(
        shape_err < 45.0 && shape_err < was_red / 2.0,
        "shape vs green {shape_err:.1}"
    );
    assert!(bg_err < 25.0, "background changed by {bg_err:.1}");
}

/// PSNR of `img` against `photo` over the scene's background (away from the shape).
fn background_psnr(img: &RgbImage, photo: &RgbImage, scene: &Scene) -> f64 {
    let region = image::DynamicImage::ImageRgb8(scene.region_image(64, 3.0)).to_luma8();
    let background = Mask::from_gray(&region, true);
    compare(photo, img, Some(&background), SsimWindow::Uniform7)
        .unwrap()
        .psnr
}

/// Direct inversion (no optimization) edits as well as null-text inversion: the same colour
/// edit recolours the shape, and keeps the background at least as well.
#[test]
fn direct_inversion_colour_edit_keeps_the_background_as_well_as_null_text() {
    let sd = load();
    let scene = held_out_scene(Shape::Circle, Colour::Red, Colour::Blue);
    let photo = scene.render(64);
    let target = "a green circle on a blue background";
    let mut psnrs = Vec::new();
    for method in [Method::Direct, Method::NullText] {
        let opts = InvertOptions {
            method,
            ..Default::default()
        };
        let (inv, _) = invert_image(&sd, &photo, &scene.caption(), &opts, &mut NoProgress).unwrap();
        let (rec, edited) = edit_to(&sd, &inv, target, &EditOptions::default());
        let c = classify(&edited).expect("a shape in the edited image");
        let shape_err = colour_error(&edited, &scene.mask(64), Colour::Green).unwrap();
        let was_red = colour_error(&edited, &scene.mask(64), Colour::Red).unwrap();
        let bg = background_psnr(&edited, &photo, &scene);
        eprintln!(
            "{method}: edit {c:?}, shape vs green {shape_err:.1} (vs red {was_red:.1}); \
             background PSNR {bg:.2} dB (reconstruction {:.2} dB, whole {:.2} dB)",
            background_psnr(&rec, &photo, &scene),
            psnr(&rec, &photo)
        );
        assert_eq!(c.colour, Colour::Green, "{method}");
        assert!(shape_err < 45.0 && shape_err < was_red / 2.0, "{method}");
        psnrs.push(bg);
    }
    assert!(
        psnrs[0] >= psnrs[1],
        "background PSNR: direct {:.2} dB < null-text {:.2} dB",
        psnrs[0],
        psnrs[1]
    );
}

/// Every swap among the four shapes (yellow on black, centred), with less self-attention
/// injection than the default (0.2 of the steps instead of 0.5: a swap must be free to leave
/// the source's outline): every swap changes the shape, and most come out as the target shape
/// with both colours kept.
#[test]
fn shape_swaps_change_the_shape() {
    let sd = load();
    let opts = EditOptions {
        self_replace: Window::until(0.2),
        ..Default::default()
    };
    let (mut ok, mut changed, mut report) = (0, 0, Vec::new());
    for from in Shape::ALL {
        let scene = held_out_scene(from, Colour::Yellow, Colour::Black);
        let inv = invert(&sd, &scene);
        for to in Shape::ALL.into_iter().filter(|&s| s != from) {
            let target = Scene { shape: to, ..scene }.caption();
            let (_, edited) = edit_to(&sd, &inv, &target, &opts);
            let c = classify(&edited);
            let right = c.is_some_and(|c| {
                c.shape == to && c.colour == Colour::Yellow && c.background == Colour::Black
            });
            ok += right as usize;
            changed += c.is_some_and(|c| c.shape != from) as usize;
            report.push(format!(
                "{} → {}: {:?}{}",
                from.name(),
                to.name(),
                c.map(|c| (c.shape, c.colour, c.background)),
                if right { "" } else { "  ✗" }
            ));
        }
    }
    eprintln!(
        "shape swaps: {ok}/12 right, {changed}/12 changed\n{}",
        report.join("\n")
    );
    assert_eq!(changed, 12, "some swaps kept the source shape");
    assert!(ok >= SWAPS_RIGHT, "{ok}/12 shape swaps right");
}

/// Local blending with the words' maps from the 8×8 layers: outside the blend mask the
/// edit's latent is the reconstruction's, and the mask is local — it leaves the latent cells
/// away from the shape (the background) as they were. In pixels the background then differs
/// only by what the VAE decoder spreads (its group norms and mid-block attention see the
/// whole latent).
#[test]
fn local_blend_leaves_the_background_untouched() {
    let sd = load();
    // a small square near a corner, so that background lies beyond the mask's reach: the
    // latent cells the word attends to, dilated by one cell (the reference's 3×3 max-pool)
    let scene = Scene {
        cx: 0.27,
        cy: 0.27,
        size: 0.36,
        ..Scene::centred(Shape::Square, Colour::White, Colour::Red)
    };
    let inv = invert(&sd, &scene);
    let target = ["a purple square on a red background".to_string()];
    let opts = EditOptions {
        blend: Some(BlendOptions::parse("square:square").unwrap()),
        attention_downscale: 1,
        ..Default::default()
    };
    let r = edit(&sd, &inv, &target, &opts, &mut NoProgress).unwrap();
    let plain = edit(&sd, &inv, &target, &EditOptions::default(), &mut NoProgress).unwrap();
    // per latent cell, the largest change over the channels: [8, 8]
    let change = |z: &candle_core::Tensor| -> Vec<f32> {
        let d = (z.get(1).unwrap() - z.get(0).unwrap()).unwrap();
        d.abs()
            .unwrap()
            .max(0)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    };
    let (kept, plain_kept) = (change(&r.latents), change(&plain.latents));
    let kept: Vec<bool> = kept.iter().map(|d| *d < 1e-5).collect();
    // latent cells whose 8×8 pixels all lie more than 16 px (two cells) from the square
    let far = scene.background_mask(64, 16.0);
    let far_cells: Vec<bool> = (0..64)
        .map(|c| (0..64).all(|p| far[(c / 8 * 8 + p / 8) * 64 + c % 8 * 8 + p % 8]))
        .collect();
    let n_kept = kept.iter().filter(|k| **k).count();
    let n_far = far_cells.iter().filter(|f| **f).count();
    let far_kept = (0..64).filter(|&c| far_cells[c] && kept[c]).count();
    let plain_far_kept = (0..64)
        .filter(|&c| far_cells[c] && plain_kept[c] < 1e-5)
        .count();

    let (rec, blended) = (
        image(&sd, &r.latents.narrow(0, 0, 1).unwrap()),
        image(&sd, &r.latents.narrow(0, 1, 1).unwrap()),
    );
    let plain_img = image(&sd, &plain.latents.narrow(0, 1, 1).unwrap());
    // mean absolute difference to the reconstruction over the far background, 0–255
    let diff = |img: &RgbImage| -> f64 {
        let (mut s, mut n) = (0f64, 0usize);
        for (i, m) in far.iter().enumerate() {
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
    let (d_blend, d_plain) = (diff(&blended), diff(&plain_img));
    let c = classify(&blended).expect("a shape in the blended edit");
    eprintln!(
        "local blend: {n_kept}/64 latent cells kept, {far_kept} of the {n_far} far from the \
         square (without blend {plain_far_kept}); far background differs from the \
         reconstruction by {d_blend:.2} (without blend {d_plain:.2}, 0–255); {c:?}"
    );
    assert_eq!(far_kept, n_far, "the blend changed the background's latent");
    assert!(
        2 * n_kept >= 64,
        "the blend mask covers {} of 64 cells",
        64 - n_kept
    );
    assert!(d_blend < 4.0, "far background changed by {d_blend:.2}");
    assert_eq!(c.colour, Colour::Purple);
}

/// The words' cross-attention maps fall where the words are: the shape's words on the shape,
/// the background's off it (what training's grounding term asks, on a held-out scene).
#[test]
fn word_attention_falls_on_what_the_word_names() {
    let sd = load();
    let scene = held_out_scene(Shape::Square, Colour::Red, Colour::Blue);
    let inv = invert(&sd, &scene);
    let opts = EditOptions {
        attention_downscale: 1,
        record_attention: true,
        ..Default::default()
    };
    let caption = scene.caption();
    let r = edit(
        &sd,
        &inv,
        std::slice::from_ref(&caption),
        &opts,
        &mut NoProgress,
    )
    .unwrap();
    // [2, 8, 8, 77]: the source's maps, mean over steps, layers and heads
    let maps = r.attention_maps.unwrap().get(0).unwrap();
    let maps = maps.flatten_to(1).unwrap().to_vec2::<f32>().unwrap();
    // the square's coverage of each latent cell
    let cover = scene.coverage(64, 8);
    // a(1) red(2) square(3) on(4) a(5) blue(6) background(7)
    let share = |token: usize, on_shape: bool| -> f32 {
        let (mut inside, mut all) = (0f32, 0f32);
        for (cell, row) in maps.iter().enumerate() {
            let region = if on_shape {
                cover[cell]
            } else {
                1.0 - cover[cell]
            };
            inside += row[token] * region;
            all += row[token];
        }
        inside / all
    };
    let area = cover.iter().sum::<f32>() / 64.0;
    let shares = [
        ("red", share(2, true)),
        ("square", share(3, true)),
        ("blue", share(6, false)),
        ("background", share(7, false)),
    ];
    eprintln!(
        "shape covers {:.0} % of the latent; share of each word's map on its part: {shares:?}",
        100.0 * area
    );
    for (word, s) in &shares[..2] {
        assert!(*s > WORD_ON_SHAPE, "{word}: {s:.2} of its map on the shape");
    }
    for (word, s) in &shares[2..] {
        assert!(
            *s > WORD_OFF_SHAPE,
            "{word}: {s:.2} of its map off the shape"
        );
    }
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
