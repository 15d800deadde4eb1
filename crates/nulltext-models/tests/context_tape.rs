//! The context tape (null-text inversion's UNet forward and backward without a general
//! autograd graph) against the graph path: the same output bit for bit, and the same
//! context gradient as candle's autograd through the graph path.

mod common;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use nulltext_models::random::{write_random_model, Preset};
use nulltext_models::{AttentionCall, AttentionControl, StableDiffusion, UNet2DConditionModel};

fn noise(seed: u64, shape: &[usize]) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let v: Vec<f32> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// A controller that asks for no probabilities but does not say so up front: the UNet
/// then takes its graph path.
struct Hooked;

impl AttentionControl for Hooked {
    fn wants(&self, _: &AttentionCall) -> bool {
        false
    }
    fn edit(&mut self, _: &AttentionCall, p: Tensor) -> nulltext_models::Result<Tensor> {
        Ok(p)
    }
}

/// The UNet through candle's graph (the path taken under an attention controller).
fn graph_forward(unet: &UNet2DConditionModel, z: &Tensor, t: f64, ctx: &Tensor) -> Tensor {
    unet.forward_controlled(z, t, ctx, &mut Hooked, 0).unwrap()
}

fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    max_err(a, b) / max_abs(b).max(1e-30)
}

/// Checks the tape against the graph path for latents of `shape` at `t`, two contexts.
fn check(sd: &StableDiffusion, shape: &[usize], t: f64) {
    let unet = &sd.unet;
    let z = noise(1, shape);
    let (b, lat_h, lat_w) = (shape[0], shape[2], shape[3]);
    let d = unet.config().cross_attention_dim;
    let mut tape = unet.context_tape(&z, t).unwrap().expect("CPU f32 model");
    for (round, seed) in [10u64, 20].into_iter().enumerate() {
        let ctx = noise(seed, &[b, 77, d]);
        // forward: the same kernels in the same order
        let out = tape.forward(&ctx).unwrap();
        let want = graph_forward(unet, &z, t, &ctx);
        let e = max_err(&out, &want);
        eprintln!("{lat_h}×{lat_w} b{b} round {round}: forward max|difference| {e:e}");
        assert_eq!(e, 0.0, "tape forward differs from the graph path");
        // a plain forward pass (no controller, no gradient) runs as a tape, and a
        // differentiated one's forward values are the same
        assert_eq!(max_err(&unet.forward(&z, t, &ctx).unwrap(), &want), 0.0);
        assert_eq!(max_err(&tape.predict(&ctx).unwrap(), &want), 0.0);
        assert!(
            tape.backward(&want).is_err(),
            "predict keeps nothing to differentiate"
        );
        let out = tape.forward(&ctx).unwrap();
        // backward of Σ w·out with respect to the context
        let w = noise(seed + 1, out.dims());
        let var = Var::from_tensor(&ctx).unwrap();
        let graph_out = graph_forward(unet, &z, t, var.as_tensor());
        let loss = (graph_out * &w).unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap_or_else(|e| panic!("{e}"));
        let want = grads.get(var.as_tensor()).unwrap();
        let got = tape.backward(&w).unwrap();
        let e = rel_err(&got, want);
        eprintln!(
            "{lat_h}×{lat_w} b{b} round {round}: context gradient max rel. difference {e:e} \
             (max |grad| {:e})",
            max_abs(want)
        );
        assert!(e < 1e-5, "context gradient off by {e:e}");
    }
    // a backward pass needs its forward pass
    assert!(tape.backward(&noise(3, &[b, 4, lat_h, lat_w])).is_err());
}

#[test]
fn tape_matches_the_graph_on_the_fixture_model() {
    let sd = StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap();
    if !sd.device.is_cpu() {
        return;
    }
    check(&sd, &[1, 4, 32, 32], 501.0);
}

#[test]
fn tape_matches_the_graph_on_an_sd2_shaped_model_with_a_batch_and_odd_sizes() {
    // linear projections, v-prediction config, several heads: SD 2.x's layout
    let dir = std::env::temp_dir().join(format!("nulltext-tape-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_random_model(&dir, &Preset::TinyV.configs(), 5, false).unwrap();
    let sd = StableDiffusion::load(dir.to_str().unwrap(), &load_options()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    if !sd.device.is_cpu() {
        return;
    }
    assert!(sd.unet.config().use_linear_projection);
    check(&sd, &[2, 4, 16, 24], 981.0);
    odd_size(&sd, &[1, 4, 13, 11], 1.0);
}

/// Latents whose size does not halve evenly (upsampled by non-integer factors, which
/// candle's graph cannot differentiate): the forward pass against the graph path, the
/// gradient along random directions against central differences.
fn odd_size(sd: &StableDiffusion, shape: &[usize], t: f64) {
    let unet = &sd.unet;
    let z = noise(1, shape);
    let d = unet.config().cross_attention_dim;
    let ctx = noise(30, &[shape[0], 77, d]);
    let mut tape = unet.context_tape(&z, t).unwrap().unwrap();
    let out = tape.forward(&ctx).unwrap();
    assert_eq!(max_err(&out, &graph_forward(unet, &z, t, &ctx)), 0.0);
    let w = noise(31, out.dims());
    let grad = tape.backward(&w).unwrap();
    let loss = |c: &Tensor| -> f64 {
        let o = graph_forward(unet, &z, t, c);
        (o.to_dtype(DType::F64).unwrap() * w.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    for seed in [40u64, 41, 42] {
        let u = noise(seed, ctx.dims());
        let h = 1e-2;
        let plus = loss(&(&ctx + (&u * h).unwrap()).unwrap());
        let minus = loss(&(&ctx - (&u * h).unwrap()).unwrap());
        let numeric = (plus - minus) / (2.0 * h);
        let analytic = (grad.to_dtype(DType::F64).unwrap() * u.to_dtype(DType::F64).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap();
        let e = (numeric - analytic).abs() / analytic.abs().max(1e-12);
        eprintln!(
            "13×11: directional derivative {analytic:e} vs central difference {numeric:e} ({e:e})"
        );
        assert!(e < 1e-2, "directional derivative off by {e:e}");
    }
}

#[test]
fn tape_is_not_offered_for_half_precision() {
    let opts = nulltext_models::LoadOptions {
        dtype: DType::F16,
        ..load_options()
    };
    let sd = StableDiffusion::load(tiny_model().to_str().unwrap(), &opts).unwrap();
    let z = noise(1, &[1, 4, 32, 32]).to_dtype(DType::F16).unwrap();
    assert!(sd.unet.context_tape(&z, 1.0).unwrap().is_none());
}
