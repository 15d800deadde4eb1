//! Helpers of the pipeline's golden tests, on top of the model crate's.
#![allow(dead_code)]

#[path = "../../../nulltext-models/tests/common/mod.rs"]
mod shared;

use candle_core::Tensor;
use nulltext::edit::{BlendOptions, CrossReplace, EditMode, EditOptions, Window};
pub use shared::*;

/// Checks each step's null-text iteration count against a golden's `iterations` and
/// returns the largest relative deviation of `losses` (one list per step) from its `losses`
/// (`[steps, N]`).
pub fn loss_deviation(
    losses: &[Vec<f64>],
    golden: &std::collections::HashMap<String, Tensor>,
) -> f64 {
    let want_losses: Vec<Vec<f64>> = golden["losses"].to_vec2().unwrap();
    let want_iters: Vec<i64> = golden["iterations"].to_vec1().unwrap();
    let mut worst = 0f64;
    for (i, got) in losses.iter().enumerate() {
        assert_eq!(got.len() as i64, want_iters[i], "iterations of step {i}");
        for (l, w) in got.iter().zip(&want_losses[i]) {
            worst = worst.max((l - w).abs() / w.abs());
        }
    }
    worst
}

/// A text context as prompt embeddings (SD 1.x: no pooled part).
pub fn embeds(context: &Tensor) -> nulltext::PromptEmbeds {
    nulltext::PromptEmbeds::context(context.clone())
}

pub fn load_tiny() -> nulltext::StableDiffusion {
    nulltext::StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap()
}

pub fn chelsea_latent(sd: &nulltext::StableDiffusion) -> Tensor {
    let img = nulltext::image_io::load_image(
        &fixtures().join("inputs/chelsea256.png"),
        Default::default(),
        256,
    )
    .unwrap();
    let x = nulltext::image_io::image_to_tensor(&img, &sd.device).unwrap();
    sd.image_to_latent(&x).unwrap()
}

/// The fixture photo's latent `z0` (from `chelsea_latent`) inverted with its caption.
pub fn invert_chelsea(
    sd: &nulltext::StableDiffusion,
    z0: &Tensor,
    opts: &nulltext::InvertOptions,
) -> (nulltext::Inversion, nulltext::InvertReport) {
    let prompt = "a close up photo of a cat";
    nulltext::invert_latent(sd, z0, prompt, 256, 256, opts, &mut nulltext::NoProgress).unwrap()
}

/// The prompts and edit options of a golden Prompt-to-Prompt case (its JSON metadata:
/// kind, prompts, cross- and self-replace windows, blend words and thresholds, reweights).
pub fn case_options(case: &serde_json::Value) -> (Vec<String>, EditOptions) {
    let prompts: Vec<String> = serde_json::from_value(case["prompts"].clone()).unwrap();
    let mut o = EditOptions {
        mode: match case["kind"].as_str().unwrap() {
            "refine" => EditMode::Refine,
            _ => EditMode::Replace,
        },
        ..Default::default()
    };
    let crs = case["cross_replace_steps"].as_object().unwrap();
    let mut cr = CrossReplace {
        default: Window::until(1.0),
        words: vec![],
    };
    for (k, v) in crs {
        let w = match v {
            serde_json::Value::Number(n) => Window::until(n.as_f64().unwrap()),
            serde_json::Value::Array(a) => Window {
                start: a[0].as_f64().unwrap(),
                end: a[1].as_f64().unwrap(),
            },
            v => panic!("{v}"),
        };
        if k == "default_" {
            cr.default = w
        } else {
            cr.words.push((k.clone(), w))
        }
    }
    o.cross_replace = cr;
    o.self_replace = Window::until(case["self_replace_steps"].as_f64().unwrap());
    if let Some(bw) = case.get("blend_words") {
        let words: Vec<Vec<String>> = serde_json::from_value(bw.clone()).unwrap();
        let mut b =
            BlendOptions::parse(&format!("{}:{}", words[0].join("+"), words[1].join("+"))).unwrap();
        if let Some(th) = case.get("blend_th") {
            b.threshold = th[0].as_f64().unwrap();
            b.subtract_threshold = th[1].as_f64().unwrap();
        }
        o.blend = Some(b);
    }
    if let Some(eq) = case.get("eq_params") {
        let words: Vec<String> = serde_json::from_value(eq["words"].clone()).unwrap();
        let values: Vec<f64> = serde_json::from_value(eq["values"].clone()).unwrap();
        o.reweight = words.into_iter().zip(values).collect();
    }
    (prompts, o)
}
