//! Inversion and editing on the tiny SDXL fixture (`tests/fixtures/models/tiny-sdxl`):
//! parity with diffusers (`tools/sdxl_pipeline_reference.py`: the DDIM trajectory, the
//! null-text gradient and steps over both parts of the unconditional input, the
//! reconstruction and a Prompt-to-Prompt edit), the inversion file's pooled embeddings,
//! direct inversion's exact source row, and the refusals between families.

mod common;

use candle_core::{IndexOp, Tensor};
use common::*;
use nulltext::inversion::{NullTextOptimizer, NullVars, StepObjective};
use nulltext::models::{Ddim, LoadOptions, NoControl};
use nulltext::sampling::predict_eps;
use nulltext::{edit, inversion_file, EditOptions, InvertOptions, Method, NoProgress};
use nulltext::{Inversion, PromptEmbeds, StableDiffusion};

const PROMPT: &str = "a close up photo of a cat";
const NTI: &str = "sdxl_nti.safetensors";
const TOL: f64 = 1e-4;

fn tiny_sdxl() -> StableDiffusion {
    let dir = fixtures().join("models/tiny-sdxl");
    StableDiffusion::load(dir.to_str().unwrap(), &load_options()).unwrap()
}

fn invert(sd: &StableDiffusion, method: Method, steps: usize) -> Inversion {
    let opts = InvertOptions {
        method,
        num_steps: steps,
        inner_steps: 2,
        ..Default::default()
    };
    let z0 = chelsea_latent(sd);
    nulltext::invert_latent(sd, &z0, PROMPT, 256, 256, &opts, &mut NoProgress)
        .unwrap()
        .0
}

/// A direct inversion's source row lands on the photo's latent, through SDXL's added
/// conditioning; the unconditional input is zeros (`force_zeros_for_empty_prompt`).
#[test]
fn direct_inversion_reproduces_the_photo_latent() {
    let sd = tiny_sdxl();
    let inv = invert(&sd, Method::Direct, 10);
    assert_eq!(inv.null_embeddings.dims(), [10, 77, 24]);
    let pooled = inv
        .null_pooled
        .as_ref()
        .expect("SDXL inversions keep pooled nulls");
    assert_eq!(pooled.dims(), [10, 12]);
    assert_eq!(max_abs(&inv.null_embeddings), 0.0);
    assert_eq!(max_abs(pooled), 0.0);
    let z0 = nulltext::reconstruct(&sd, &inv, &mut NoProgress).unwrap();
    let err = max_err(&z0, inv.image_latent.as_ref().unwrap());
    eprintln!("direct inversion: |z0 − image latent| ≤ {err:.3e}");
    assert!(err < 1e-3, "{err}");
    let targets = ["a close up photo of a dog".to_string()];
    let res = edit(
        &sd,
        &inv,
        &targets,
        &EditOptions::default(),
        &mut NoProgress,
    )
    .unwrap();
    assert_eq!(res.latents.dims(), [2, 4, 32, 32]);
    let source = res.latents.narrow(0, 0, 1).unwrap();
    let err = max_err(&source, inv.image_latent.as_ref().unwrap());
    assert!(err < 1e-3, "the edit's source row: {err}");
    assert!(max_err(&res.latents.narrow(0, 1, 1).unwrap(), &source) > 1e-3);
}

/// Null-text inversion optimizes the pooled embedding too, and the file keeps it (format
/// version 3); an SD 1.x model refuses the SDXL inversion, and the reverse.
#[test]
fn null_text_inversion_file_keeps_the_pooled_embeddings() {
    let sd = tiny_sdxl();
    let inv = invert(&sd, Method::NullText, 3);
    let pooled = inv.null_pooled.as_ref().unwrap();
    assert!(
        max_abs(pooled) > 0.0,
        "the pooled null embeddings moved from zero"
    );
    assert!(max_abs(&inv.null_embeddings) > 0.0);
    let path = std::env::temp_dir().join(format!("sdxl-{}.nti.safetensors", std::process::id()));
    inversion_file::save(&inv, &path).unwrap();
    let back = inversion_file::load(&path).unwrap();
    std::fs::remove_file(&path).ok();
    assert_eq!(inversion_file::format_version(&back), 3);
    assert_eq!(max_err(back.null_pooled.as_ref().unwrap(), pooled), 0.0);
    back.check_model(&sd, false).unwrap();

    let sd15 = load_tiny();
    let e = back.check_model(&sd15, true).unwrap_err().to_string();
    assert!(e.contains("SDXL"), "{e}");
    let (sd15_inv, _) = invert_chelsea(
        &sd15,
        &chelsea_latent(&sd15),
        &InvertOptions {
            method: Method::Ddim,
            num_steps: 2,
            ..Default::default()
        },
    );
    let e = sd15_inv.check_model(&sd, false).unwrap_err().to_string();
    assert!(e.contains("fingerprint"), "{e}");
}

/// An SDXL refiner and an inpainting model are refused by name when loaded.
#[test]
fn refiner_and_inpainting_models_are_refused() {
    let src = fixtures().join("models/tiny-sdxl");
    let dir = std::env::temp_dir().join(format!("nulltext-refiner-{}", std::process::id()));
    copy_dir(&src, &dir);
    let index = dir.join("model_index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&index).unwrap()).unwrap();
    v["requires_aesthetics_score"] = serde_json::json!(true);
    std::fs::write(&index, v.to_string()).unwrap();
    let load = |d: &std::path::Path| {
        StableDiffusion::load(d.to_str().unwrap(), &LoadOptions::default())
            .err()
            .expect("refused")
            .to_string()
    };
    let e = load(&dir);
    assert!(e.contains("SDXL refiner"), "{e}");

    v["requires_aesthetics_score"] = serde_json::json!(false);
    std::fs::write(&index, v.to_string()).unwrap();
    let config = dir.join("unet/config.json");
    let mut c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&config).unwrap()).unwrap();
    c["in_channels"] = serde_json::json!(9);
    std::fs::write(&config, c.to_string()).unwrap();
    let e = load(&dir);
    assert!(e.contains("inpainting"), "{e}");
    std::fs::remove_dir_all(&dir).ok();
}

fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dest = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &dest);
        } else {
            std::fs::copy(e.path(), dest).unwrap();
        }
    }
}

/// SDXL's VAE overflows in f16, so an f16 SDXL model runs its VAE in f32 (`force_upcast`),
/// as diffusers' XL pipelines do: the latent equals the f32 model's exactly.
#[test]
fn f16_sdxl_runs_its_vae_in_f32() {
    let dir = fixtures().join("models/tiny-sdxl");
    let f16 = LoadOptions {
        dtype: candle_core::DType::F16,
        ..load_options()
    };
    let half = StableDiffusion::load(dir.to_str().unwrap(), &f16).unwrap();
    let full = tiny_sdxl();
    assert_eq!(max_err(&chelsea_latent(&half), &chelsea_latent(&full)), 0.0);
}

/// The golden prompt's embeddings (both parts).
fn golden_cond(g: &std::collections::HashMap<String, Tensor>) -> PromptEmbeds {
    PromptEmbeds {
        context: on_device(&g["cond_context"]),
        pooled: Some(on_device(&g["cond_pooled"])),
    }
}

/// The golden null-text inversion as an [`Inversion`] of `sd`.
fn golden_inversion(sd: &StableDiffusion) -> Inversion {
    let g = golden(NTI);
    Inversion {
        latent_t: g["pivots"].i(50..51).unwrap(),
        null_embeddings: g["null_context"].clone(),
        null_pooled: Some(g["null_pooled"].clone()),
        image_latent: Some(g["image_latent"].clone()),
        latent_offsets: None,
        prompt: PROMPT.into(),
        method: Method::NullText,
        num_steps: 50,
        guidance: 7.5,
        height: 256,
        width: 256,
        scheduler: sd.scheduler.clone(),
        model: sd.name.clone(),
        model_fingerprint: sd.fingerprint.clone(),
        extra_metadata: Default::default(),
        extra_tensors: Default::default(),
    }
}

#[test]
fn image_latent_prompt_and_time_ids_match_diffusers() {
    let sd = tiny_sdxl();
    let g = golden(NTI);
    assert_close(
        "image latent",
        &chelsea_latent(&sd),
        &g["image_latent"],
        TOL,
    );
    let cond = sd.encode_prompt(PROMPT).unwrap();
    assert_close("context", &cond.context, &g["cond_context"], TOL);
    assert_close(
        "pooled",
        cond.pooled.as_ref().unwrap(),
        &g["cond_pooled"],
        TOL,
    );
    let z = on_device(&g["pivots"].i(0..1).unwrap());
    let added = sd.added_cond(&cond, &z).unwrap().unwrap();
    assert_eq!(max_err(&added.time_ids, &g["time_ids"]), 0.0);
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let want: Vec<i64> = g["timesteps"].to_vec1().unwrap();
    let got: Vec<i64> = ddim.timesteps().iter().map(|&t| t as i64).collect();
    assert_eq!(got, want);
}

#[test]
fn ddim_inversion_trajectory_matches_diffusers() {
    let sd = tiny_sdxl();
    let g = golden(NTI);
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let z0 = on_device(&g["image_latent"]);
    let pivots =
        nulltext::inversion::ddim_inversion(&sd, &ddim, &z0, &golden_cond(&g), &mut NoProgress)
            .unwrap();
    let got = Tensor::cat(&pivots, 0).unwrap();
    let e = assert_close("DDIM inversion z*_0..50", &got, &g["pivots"], TOL);
    eprintln!("SDXL DDIM inversion: max error {e:.3e}");
}

/// The gradient of step 0's first iteration with respect to both parts of the
/// unconditional input, through the context tape and through candle's graph.
#[test]
fn null_text_gradient_matches_diffusers_for_context_and_pooled() {
    let sd = tiny_sdxl();
    let g = golden(NTI);
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let t = ddim.timesteps()[0];
    let z = on_device(&g["pivots"].i(50..51).unwrap());
    let target = on_device(&g["pivots"].i(49..50).unwrap());
    let cond = golden_cond(&g);
    let eps_c = predict_eps(&sd, &ddim, &z, t, &cond, &mut NoControl, 0).unwrap();
    let objective = StepObjective {
        ddim: &ddim,
        z: &z,
        t,
        eps_c: &eps_c,
        target: &target,
        guidance: 7.5,
    };
    let zeros = cond.zeros_like().unwrap();
    let mut tape = sd.context_tape(&z, t as f64, &zeros).unwrap();
    assert!(tape.is_some(), "CPU f32: the context tape");
    for (path, tape) in [("tape", tape.as_mut()), ("graph", None)] {
        let var = NullVars::new(&zeros).unwrap();
        let (loss, grad) = objective.loss_and_grad(&sd, tape, &var, 0).unwrap();
        let want: Vec<f64> = g["losses"].i(0).unwrap().to_vec1().unwrap();
        let l = loss.to_scalar::<f32>().unwrap() as f64;
        assert!(
            (l - want[0]).abs() < 1e-3 * want[0].abs(),
            "{path}: loss {l} vs {}",
            want[0]
        );
        // the gradients are small (norms ~1e-6): relative to their own size
        let rel = |got: &Tensor, want: &Tensor| max_err(got, want) / max_abs(want);
        let c = rel(&grad.context, &g["grad0_context"]);
        let p = rel(grad.pooled.as_ref().unwrap(), &g["grad0_pooled"]);
        eprintln!("{path}: gradient errors / max|gradient|: context {c:.3e}, pooled {p:.3e}");
        assert!(c < 1e-3 && p < 1e-3, "{path}: {c} {p}");
    }
}

/// Runs our whole pipeline (our z₀, embeddings and pivots) for the first `k` null-text
/// steps at `early_stop` and compares with `file`: losses, iteration counts, z̄ and both
/// parts of ∅.
fn first_steps(file: &str, early_stop: f64, k: usize) {
    let sd = tiny_sdxl();
    let g = golden(file);
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let z0 = chelsea_latent(&sd);
    let cond = sd.encode_prompt(PROMPT).unwrap();
    let empty = sd.encode_negative("").unwrap();
    let pivots =
        nulltext::inversion::ddim_inversion(&sd, &ddim, &z0, &cond, &mut NoProgress).unwrap();
    let opts = InvertOptions {
        early_stop,
        ..Default::default()
    };
    let mut opt = NullTextOptimizer::new(&sd, &ddim, &pivots, &cond, &empty, &opts, false).unwrap();
    for _ in 0..k {
        opt.step(&mut NoProgress).unwrap();
    }
    let worst = loss_deviation(&opt.report().losses, &g);
    eprintln!("{file}: worst relative loss deviation over {k} steps: {worst:.3e}");
    assert!(worst < 1e-3, "{worst}");
    assert_close(
        &format!("z̄ after {k} steps"),
        opt.latent(),
        &g["nti_latents"].i(k..k + 1).unwrap(),
        TOL,
    );
    let nulls: Vec<&PromptEmbeds> = opt.null_embeddings().iter().collect();
    let nulls = PromptEmbeds::cat(&nulls).unwrap();
    let c = max_err(&nulls.context, &g["null_context"].i(0..k).unwrap());
    let p = max_err(
        nulls.pooled.as_ref().unwrap(),
        &g["null_pooled"].i(0..k).unwrap(),
    );
    eprintln!("∅_0..{k}: context {c:.3e}, pooled {p:.3e}");
    assert!(c < 1e-3 && p < 1e-3, "{c} {p}");
}

#[test]
fn null_text_first_steps_follow_diffusers() {
    first_steps(NTI, 1e-5, 3);
}

/// With ε = 1e-3 the first five steps stop after one update, then all ten are needed.
#[test]
fn null_text_early_stopping_follows_diffusers() {
    first_steps("sdxl_nti_eps0.001.safetensors", 1e-3, 7);
}

/// Sampling back from the golden inversion, and a word swap from it.
#[test]
fn reconstruction_and_edit_match_diffusers() {
    let sd = tiny_sdxl();
    let inv = golden_inversion(&sd);
    inv.check_model(&sd, false).unwrap();
    let g = golden(NTI);
    let z = nulltext::reconstruct(&sd, &inv, &mut NoProgress).unwrap();
    let e = assert_close("reconstruction", &z, &g["recon_latent"], 1e-3);
    eprintln!("SDXL reconstruction: {e:.3e}");

    let file = "sdxl_p2p_replace.safetensors";
    let meta = golden_metadata(file);
    let case: serde_json::Value = serde_json::from_str(&meta["case"]).unwrap();
    let (prompts, opts) = case_options(&case);
    assert_eq!(prompts[0], inv.prompt);
    let p = golden(file);
    let res = edit(&sd, &inv, &prompts[1..], &opts, &mut NoProgress).unwrap();
    let c = res.controller.as_ref().unwrap();
    let range: Vec<usize> = serde_json::from_str(&meta["self_replace_step_range"]).unwrap();
    assert_eq!(c.self_window, (range[0], range[1]), "self-attention window");
    assert_eq!(
        c.self_max_pixels.to_string(),
        meta["self_replace_max_queries"]
    );
    let alpha = Tensor::stack(&c.cross_alpha, 0).unwrap();
    assert_eq!(
        max_err(&alpha, &p["cross_replace_alpha"]),
        0.0,
        "cross-replace alpha"
    );
    let e = assert_close("SDXL edit latents", &res.latents, &p["edit_latents"], 1e-3);
    eprintln!("SDXL edit: {e:.3e}");
    let e = max_err(&res.latents.i(0..1).unwrap(), &z);
    assert!(e < 1e-4, "row 0 is the reconstruction: {e}");
}

/// The whole 50 × 10 SDXL optimization (about two minutes here): run with `--ignored`.
#[test]
#[ignore = "slow: the full null-text optimization"]
fn full_null_text_inversion_matches_diffusers() {
    let sd = tiny_sdxl();
    let g = golden(NTI);
    let z0 = chelsea_latent(&sd);
    let opts = InvertOptions::default();
    let (inv, report) =
        nulltext::invert_latent(&sd, &z0, PROMPT, 256, 256, &opts, &mut NoProgress).unwrap();
    let worst = loss_deviation(&report.losses, &g);
    eprintln!("SDXL null-text, 500 iterations: worst relative loss deviation {worst:.3e}");
    assert!(worst < 1e-3, "{worst}");
    let end = report.final_latent.unwrap();
    assert_close("z̄ after 50 steps", &end, &g["recon_latent"], 1e-3);
    let p = max_err(inv.null_pooled.as_ref().unwrap(), &g["null_pooled"]);
    eprintln!("pooled null embeddings: max|err| {p:.3e}");
    assert!(p < 1e-2, "{p}");
}
