//! Parity with the PyTorch/diffusers goldens of `tests/fixtures` (see its README): the
//! tokenizer's ids exactly, the text encoder, UNet and VAE to 1e-4 × (1 + max |golden|).

mod common;

use candle_core::{DType, Device, IndexOp, Tensor};
use common::*;
use nulltext_models::StableDiffusion;

const TOL: f64 = 1e-4;

fn model() -> StableDiffusion {
    StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap()
}

fn prompts() -> Vec<String> {
    serde_json::from_str(&golden_metadata("tokens.safetensors")["prompts"]).unwrap()
}

#[test]
fn tokenizer_ids_match_transformers() {
    let sd = model();
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("golden/tokens.json")).unwrap(),
    )
    .unwrap();
    let mut n = 0;
    for p in json["prompts"].as_array().unwrap() {
        let prompt = p["prompt"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(p["ids"].clone()).unwrap();
        let ids_77: Vec<u32> = serde_json::from_value(p["ids_77"].clone()).unwrap();
        assert_eq!(
            sd.tokenizer.encode(prompt),
            ids,
            "unpadded ids of {prompt:?}"
        );
        let enc = sd.tokenizer.encode_padded(prompt);
        assert_eq!(enc.ids, ids_77, "padded ids of {prompt:?}");
        assert_eq!(
            enc.truncated.is_some(),
            ids.len() > 77,
            "truncation of {prompt:?}"
        );
        n += 1;
    }
    assert_eq!(n, 12);
    // The same ids from the bundled vocabulary.
    let bundled = nulltext_models::ClipTokenizer::bundled();
    let g = golden("tokens.safetensors");
    let ids: Vec<Vec<i64>> = g["ids_77"].to_vec2().unwrap();
    for (prompt, want) in prompts().iter().zip(ids) {
        let got: Vec<i64> = bundled
            .encode_padded(prompt)
            .ids
            .iter()
            .map(|i| *i as i64)
            .collect();
        assert_eq!(got, want, "{prompt:?}");
    }
}

#[test]
fn truncation_reports_what_was_cut() {
    let sd = model();
    let long = prompts()
        .into_iter()
        .find(|p| p.starts_with("word0"))
        .unwrap();
    let enc = sd.tokenizer.encode_padded(&long);
    let cut = enc.truncated.expect("truncated");
    assert!(
        long.ends_with(
            &cut.replace(' ', "")
                .replace("word", " word")
                .trim()
                .to_string()
        ) || cut.contains("word59"),
        "{cut}"
    );
    assert_eq!(enc.ids.len(), 77);
    assert_eq!(enc.ids[76], 49407);
}

#[test]
fn text_embeddings_match() {
    let sd = model();
    let g = golden("text_embeddings.safetensors");
    let p = prompts();
    let refs: Vec<&str> = p.iter().map(|s| s.as_str()).collect();
    let (emb, _) = sd.encode_prompts(&refs).unwrap();
    assert!(emb.pooled.is_none());
    assert_close("text embeddings", &emb.context, &g["embeddings"], TOL);
}

#[test]
fn unet_eps_matches() {
    let sd = model();
    let g = golden("unet_eps.safetensors");
    let x = &on_device(&g["x"]);
    let ctx = &on_device(&g["context"]);
    let x0 = x.i(0..1).unwrap();
    let (uncond, cond) = (ctx.i(0..1).unwrap(), ctx.i(1..2).unwrap());
    let cases = [
        ("eps_b1_t1_cond", 1.0, &cond),
        ("eps_b1_t501_uncond", 501.0, &uncond),
        ("eps_b1_t981_cond", 981.0, &cond),
    ];
    for (name, t, c) in cases {
        let eps = sd.unet.forward(&x0, t, c).unwrap();
        assert_close(name, &eps, &g[name], TOL);
    }
    let eps = sd.unet.forward(x, 501.0, ctx).unwrap();
    assert_close("eps_b2_t501", &eps, &g["eps_b2_t501"], TOL);
}

#[test]
fn vae_matches() {
    let sd = model();
    let g = golden("chelsea_vae.safetensors");
    // The input: the fixture PNG's pixels / 127.5 − 1, NCHW.
    let x = ((g["image_u8"].to_dtype(DType::F32).unwrap() / 127.5).unwrap() - 1.0)
        .unwrap()
        .permute((2, 0, 1))
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let x = on_device(&x);
    let d = sd.vae.encode(&x).unwrap();
    assert_close("vae mean", &d.mean, &g["mean"], TOL);
    assert_close("vae logvar", &d.logvar, &g["logvar"], TOL);
    let z = sd.image_to_latent(&x).unwrap();
    assert_close("image latent", &z, &g["image_latent"], TOL);
    let x = sd
        .vae
        .decode(&(on_device(&g["image_latent"]) / 0.18215).unwrap())
        .unwrap();
    assert_close("vae decoded", &x, &g["decoded"], TOL);
    // u8 pixels: identical but for values within rounding distance of an integer.
    let img = sd
        .latent_to_image(&on_device(&g["image_latent"]))
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let u8s = (img * 255.0)
        .unwrap()
        .floor()
        .unwrap()
        .permute((0, 2, 3, 1))
        .unwrap();
    let want = g["decoded_u8"].to_dtype(DType::F32).unwrap();
    let diff = (u8s - want).unwrap().abs().unwrap();
    let off: f32 = diff
        .ge(1f32)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    let worst = max_abs(&diff);
    eprintln!(
        "decoded u8: {off} of {} values off by ≤ {worst}",
        diff.elem_count()
    );
    assert!(worst <= 1.0 && off < 0.001 * diff.elem_count() as f32);
}

#[test]
fn ddim_schedule_matches() {
    let sd = model();
    let g = golden("chelsea_ddim_inversion.safetensors");
    let ddim = nulltext_models::Ddim::new(&sd.scheduler, 50).unwrap();
    let want: Vec<i64> = g["timesteps"].to_vec1().unwrap();
    let got: Vec<i64> = ddim.timesteps().iter().map(|t| *t as i64).collect();
    assert_eq!(got, want);
    let a = Tensor::new(ddim.alphas_cumprod(), &Device::Cpu).unwrap();
    let err = max_err(&a, &g["alphas_cumprod"]);
    // PyTorch's float32 cumprod rounds differently in the last bit (≤ 1 ulp here).
    eprintln!("alphas_cumprod: max|err| = {err:e}");
    assert!(err <= 1.2e-7, "{err}");
}

#[test]
fn fingerprint_matches_the_spec() {
    assert_eq!(model().fingerprint, "f99da5222da910ce");
}
