//! Parity with the tiny SDXL goldens of `tests/fixtures` (made by `tools/sdxl_reference.py`):
//! both tokenizers' ids exactly; the two text encoders' concatenated context, the pooled
//! embedding, the UNet with `text_embeds` and `time_ids` (batch 1 and 2) and the VAE to
//! 1e-4 × (1 + max |golden|).

mod common;

use std::path::PathBuf;

use candle_core::{DType, IndexOp};
use common::*;
use nulltext_models::config::{read_json, UNetConfig, VaeConfig};
use nulltext_models::model::component_weight_files;
use nulltext_models::random::{self, Preset};
use nulltext_models::sdxl::{time_ids, Family};
use nulltext_models::weights::WeightStore;
use nulltext_models::{AddedCond, AutoencoderKL, NoControl, StableDiffusion, UNet2DConditionModel};
use nulltext_models::{ClipTokenizer, LoadOptions};

const TOL: f64 = 1e-4;

fn tiny_sdxl() -> PathBuf {
    fixtures().join("models/tiny-sdxl")
}

fn store(sub: &str, stem: &str) -> WeightStore {
    let dir = tiny_sdxl().join(sub);
    WeightStore::open(
        &component_weight_files(&dir, stem).unwrap(),
        &device(),
        DType::F32,
    )
    .unwrap()
}

fn unet() -> UNet2DConditionModel {
    let config: UNetConfig = read_json(&tiny_sdxl().join("unet/config.json")).unwrap();
    assert_eq!(Family::of(&config), Family::Sdxl);
    UNet2DConditionModel::load(&store("unet", "diffusion_pytorch_model").root(), &config).unwrap()
}

fn load(dir: &std::path::Path) -> StableDiffusion {
    let opts = LoadOptions {
        device: device(),
        ..Default::default()
    };
    StableDiffusion::load(dir.to_str().unwrap(), &opts).unwrap()
}

fn tokenizer_2(sd: &StableDiffusion) -> &ClipTokenizer {
    &sd.text_encoder_2.as_ref().expect("an SDXL model").tokenizer
}

fn prompts() -> Vec<String> {
    serde_json::from_str(&golden_metadata("sdxl_text.safetensors")["prompts"]).unwrap()
}

#[test]
fn unet_eps_matches_diffusers_with_text_time_conditioning() {
    let unet = unet();
    assert!(unet.takes_added_cond());
    let g = golden("sdxl_unet_eps.safetensors");
    let x = on_device(&g["x"]);
    let context = on_device(&g["context"]);
    let added = AddedCond {
        text_embeds: on_device(&g["text_embeds"]),
        time_ids: on_device(&g["time_ids"]),
    };
    let row1 = AddedCond {
        text_embeds: added.text_embeds.i(1..2).unwrap(),
        time_ids: added.time_ids.i(1..2).unwrap(),
    };
    let mut worst: f64 = 0.0;
    for t in [1usize, 501, 981] {
        let eps = unet
            .forward_conditioned(
                &x,
                t as f64,
                &context,
                Some(&added),
                &mut nulltext_models::NoControl,
                0,
            )
            .unwrap();
        worst = worst.max(assert_close(
            &format!("eps batch 2, t = {t}"),
            &eps,
            &g[&format!("eps_b2_t{t}")],
            TOL,
        ));
        let eps = unet
            .forward_conditioned(
                &x.i(1..2).unwrap(),
                t as f64,
                &context.i(1..2).unwrap(),
                Some(&row1),
                &mut nulltext_models::NoControl,
                0,
            )
            .unwrap();
        worst = worst.max(assert_close(
            &format!("eps batch 1, t = {t}"),
            &eps,
            &g[&format!("eps_b1_t{t}")],
            TOL,
        ));
    }
    eprintln!("UNet: worst max|err| {worst:.3e}");
}

#[test]
fn context_tape_predicts_as_the_forward_pass() {
    let unet = unet();
    let g = golden("sdxl_unet_eps.safetensors");
    let added = AddedCond {
        text_embeds: on_device(&g["text_embeds"]),
        time_ids: on_device(&g["time_ids"]),
    };
    let mut tape = unet
        .context_tape_conditioned(&on_device(&g["x"]), 501.0, Some(&added))
        .unwrap()
        .expect("tapes by default");
    let context = on_device(&g["context"]);
    let eps = tape.forward(&context).unwrap();
    assert_close("tape, first pass", &eps, &g["eps_b2_t501"], TOL);
    // the second pass reuses what does not depend on the context
    let eps = tape.predict(&context).unwrap();
    assert_close("tape, reused constants", &eps, &g["eps_b2_t501"], TOL);
}

#[test]
fn unet_refuses_missing_or_misshapen_added_conditioning() {
    let unet = unet();
    let g = golden("sdxl_unet_eps.safetensors");
    let x = on_device(&g["x"]);
    let context = on_device(&g["context"]);
    let err = unet.forward(&x, 1.0, &context).unwrap_err().to_string();
    assert!(err.contains("pooled text embedding"), "{err}");
    let wrong = AddedCond {
        text_embeds: on_device(&g["text_embeds"]).i(..1).unwrap(),
        time_ids: on_device(&g["time_ids"]),
    };
    let err = unet
        .forward_conditioned(
            &x,
            1.0,
            &context,
            Some(&wrong),
            &mut nulltext_models::NoControl,
            0,
        )
        .unwrap_err()
        .to_string();
    assert!(err.contains("time ids"), "{err}");
}

#[test]
fn time_ids_follow_the_pipeline() {
    let g = golden("sdxl_unet_eps.safetensors");
    let want: Vec<Vec<f32>> = g["time_ids"].to_vec2().unwrap();
    assert_eq!(time_ids((256, 256), (0, 0), (256, 256)).to_vec(), want[0]);
    assert_eq!(time_ids((512, 384), (16, 8), (256, 256)).to_vec(), want[1]);
}

#[test]
fn text_encoders_match_encode_prompt() {
    let sd = load(&tiny_sdxl());
    assert_eq!(sd.family(), Family::Sdxl);
    assert_eq!(sd.context_dim(), 24);
    assert_eq!(sd.pooled_dim(), Some(12));
    assert!(sd.zeros_for_empty_prompt);
    let g = golden("sdxl_text.safetensors");
    let prompts = prompts();
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let (out, _) = sd.encode_prompts(&refs).unwrap();
    let e = assert_close("prompt_embeds", &out.context, &g["prompt_embeds"], TOL);
    let p = assert_close(
        "pooled_prompt_embeds",
        out.pooled.as_ref().unwrap(),
        &g["pooled_prompt_embeds"],
        TOL,
    );
    // the pipeline's unconditional input of an empty negative prompt: zeros
    let empty = sd.encode_negative("").unwrap();
    assert_eq!(max_abs(&empty.context), 0.0);
    assert_eq!(empty.pooled.map(|p| p.dims().to_vec()), Some(vec![1, 12]));
    eprintln!("text: context {e:.3e}, pooled {p:.3e}");
}

#[test]
fn both_tokenizers_match_transformers_and_agree_on_word_positions() {
    let sd = load(&tiny_sdxl());
    let (tok_1, tok_2) = (&sd.tokenizer, tokenizer_2(&sd));
    let g = golden("sdxl_text.safetensors");
    let ids_1: Vec<Vec<i64>> = g["ids_1"].to_vec2().unwrap();
    let ids_2: Vec<Vec<i64>> = g["ids_2"].to_vec2().unwrap();
    assert_eq!(tok_1.pad(), tok_1.eos());
    assert_eq!(tok_2.pad(), 0, "tokenizer_2 pads with `!`");
    let as_i64 = |v: &[u32]| v.iter().map(|&i| i as i64).collect::<Vec<_>>();
    for (i, prompt) in prompts().iter().enumerate() {
        let a = tok_1.encode_padded(prompt);
        let b = tok_2.encode_padded(prompt);
        assert_eq!(as_i64(&a.ids), ids_1[i], "tokenizer of {prompt:?}");
        assert_eq!(as_i64(&b.ids), ids_2[i], "tokenizer_2 of {prompt:?}");
        let words = |t: &nulltext_models::ClipTokenizer| -> Vec<(usize, Option<usize>)> {
            t.describe(prompt)
                .iter()
                .map(|d| (d.position, d.word.as_ref().map(|w| w.0)))
                .collect()
        };
        if prompt.contains("!!") {
            // `!` is tokenizer_2's padding token, split off one character at a time
            assert_ne!(a.len, b.len, "{prompt:?}");
            continue;
        }
        // every word at the same positions; only `!` and the padding differ
        assert_eq!(a.len, b.len, "{prompt:?}");
        assert_eq!(words(tok_1), words(tok_2), "{prompt:?}");
        for (x, y) in a.ids[..a.len].iter().zip(&b.ids[..b.len]) {
            assert!(x == y || (*x == 256 && *y == 0), "{prompt:?}: {x} vs {y}");
        }
    }
}

#[test]
fn vae_matches_diffusers_with_sdxl_scaling() {
    let config: VaeConfig = read_json(&tiny_sdxl().join("vae/config.json")).unwrap();
    assert_eq!(config.scaling_factor, 0.13025);
    let vae =
        AutoencoderKL::load(&store("vae", "diffusion_pytorch_model").root(), &config).unwrap();
    let g = golden("sdxl_vae.safetensors");
    let d = vae.encode(&on_device(&g["x"])).unwrap();
    let m = assert_close("encoder mean", &d.mean, &g["mean"], TOL);
    assert_close("encoder logvar", &d.logvar, &g["logvar"], TOL);
    let z = (d.mean * config.scaling_factor).unwrap();
    assert_close("image latent", &z, &g["image_latent"], TOL);
    let decoded = vae.decode(&on_device(&g["mean"])).unwrap();
    let x = assert_close("decoded", &decoded, &g["decoded"], TOL);
    eprintln!("VAE: mean {m:.3e}, decoded {x:.3e}");
}

#[test]
fn tiny_sdxl_preset_has_the_fixture_shapes_and_runs() {
    let configs = Preset::TinySdxl.configs();
    // the preset's tensor lists are exactly the fixture's tensors
    let lists = random::tensor_lists(&configs).unwrap();
    let subs = [
        ("unet", "diffusion_pytorch_model"),
        ("vae", "diffusion_pytorch_model"),
        ("text_encoder", "model"),
    ];
    for ((component, list), (sub, stem)) in lists.iter().zip(subs) {
        let s = store(sub, stem);
        for (name, shape) in list {
            // transformers 5 writes the text encoder without the `text_model.` prefix
            let stored = s
                .shape_of(name)
                .or_else(|| s.shape_of(name.strip_prefix("text_model.").unwrap_or(name)));
            assert_eq!(stored, Some(shape.as_slice()), "{component}: {name}");
        }
        assert_eq!(s.names().count(), list.len(), "{component}");
    }
    let list = random::text_encoder_2_list(&configs).unwrap().unwrap();
    let s = store("text_encoder_2", "model");
    for (name, shape) in &list {
        assert_eq!(
            s.shape_of(name),
            Some(shape.as_slice()),
            "text_encoder_2: {name}"
        );
    }
    assert_eq!(s.names().count(), list.len());

    // a random model of the preset loads and runs
    let dir = std::env::temp_dir().join(format!("nulltext-tiny-sdxl-{}", std::process::id()));
    random::write_random_model(&dir, &configs, 3, false).unwrap();
    let sd = load(&dir);
    let (p, _) = sd.encode_prompts(&["a cat!", ""]).unwrap();
    let x = on_device(&noise(1, &[2, 4, 32, 32]));
    let eps = sd.predict(&x, 501.0, &p, &mut NoControl, 0).unwrap();
    assert_eq!(eps.dims(), [2, 4, 32, 32]);
    assert!(max_abs(&eps).is_finite());
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn sdxl_preset_has_sdxl_base_parameter_counts() {
    let counts = random::parameter_counts(&Preset::Sdxl.configs()).unwrap();
    let get = |c: &str| counts.iter().find(|(n, _)| *n == c).unwrap().1;
    // stabilityai/stable-diffusion-xl-base-1.0's components
    assert_eq!(get("unet"), 2_567_463_684);
    assert_eq!(get("vae"), 83_653_863);
    assert_eq!(get("text_encoder"), 123_060_480);
    assert_eq!(get("text_encoder_2"), 694_659_840);
}
