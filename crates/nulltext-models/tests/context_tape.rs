//! The context tape (null-text inversion's UNet forward and backward without a general
//! autograd graph) against the graph path: the same output bit for bit, and the same
//! context gradient as candle's autograd through the graph path.

mod common;

use candle_core::{DType, Tensor, Var};
use common::*;
use nulltext_models::random::{write_random_model, Preset};
use nulltext_models::{AttentionCall, AttentionControl, StableDiffusion, UNet2DConditionModel};

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

/// The UNet's output for `ctx` and the gradient of Σ w·output with respect to `ctx`,
/// through candle's graph.
fn graph_grad(
    unet: &UNet2DConditionModel,
    z: &Tensor,
    t: f64,
    ctx: &Tensor,
    w: &Tensor,
) -> (Tensor, Tensor) {
    let var = Var::from_tensor(ctx).unwrap();
    let out = graph_forward(unet, z, t, var.as_tensor());
    let loss = (out.to_dtype(DType::F32).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap_or_else(|e| panic!("{e}"));
    let g = grads.get(var.as_tensor()).unwrap().clone();
    (out, g)
}

fn cosine(a: &Tensor, b: &Tensor) -> f64 {
    let a = a.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let b = b.to_dtype(DType::F64).unwrap().flatten_all().unwrap();
    let dot = |x: &Tensor, y: &Tensor| {
        (x * y)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    dot(&a, &b) / (dot(&a, &a) * dot(&b, &b)).sqrt()
}

fn random_tiny_v() -> StableDiffusion {
    let dir = std::env::temp_dir().join(format!("nulltext-tensor-tape-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_random_model(&dir, &Preset::TinyV.configs(), 5, false).unwrap();
    let f32_sd = StableDiffusion::load(dir.to_str().unwrap(), &load_options()).unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    f32_sd
}

/// The tensor tape (the GPU and half-precision path) against the graph path in f32 on the
/// test device: forward values and context gradients.
fn check_tensor_tape(sd: &StableDiffusion, shape: &[usize], t: f64) {
    let unet = &sd.unet;
    let z = on_device(&noise(1, shape));
    let d = unet.config().cross_attention_dim;
    let mut tape = unet.tensor_context_tape(&z, t).unwrap().expect("supported");
    assert!(!tape.is_host());
    for (round, seed) in [10u64, 20].into_iter().enumerate() {
        let ctx = on_device(&noise(seed, &[shape[0], 77, d]));
        let out = tape.forward(&ctx).unwrap();
        let w = on_device(&noise(seed + 1, out.dims()));
        let (want, want_grad) = graph_grad(unet, &z, t, &ctx, &w);
        let e = rel_err(&out, &want);
        let again = tape.predict(&ctx).unwrap();
        let got = tape.backward(&w);
        assert!(got.is_err(), "predict keeps nothing to differentiate");
        let _ = tape.forward(&ctx).unwrap();
        let got = tape.backward(&w).unwrap();
        let eg = rel_err(&got, &want_grad);
        eprintln!(
            "tensor tape {shape:?} round {round}: forward max rel. difference {e:e}, context gradient {eg:e} (max |grad| {:e})",
            max_abs(&want_grad)
        );
        assert!(e < 1e-5, "tensor tape forward off by {e:e}");
        assert_eq!(max_err(&again, &out), 0.0, "predict differs from forward");
        assert!(eg < 1e-4, "tensor tape context gradient off by {eg:e}");
        assert_eq!(got.dtype(), DType::F32);
    }
}

#[test]
fn tensor_tape_matches_the_graph() {
    let sd = StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap();
    check_tensor_tape(&sd, &[1, 4, 32, 32], 501.0);
    let sd = random_tiny_v();
    check_tensor_tape(&sd, &[2, 4, 16, 24], 981.0);
    // latents that do not halve evenly: no tensor tape (the graph path differentiates)
    let z = on_device(&noise(1, &[1, 4, 13, 11]));
    assert!(sd.unet.tensor_context_tape(&z, 1.0).unwrap().is_none());
}

/// In half precision (the GPU default) `context_tape` is the tensor tape: its output
/// against the f16 graph path's, its gradient against the f32 model's, for the fixture
/// model and an SD 2.x-shaped one (attention upcast to f32).
#[test]
fn tensor_tape_in_half_precision() {
    let opts = nulltext_models::LoadOptions {
        dtype: DType::F16,
        ..load_options()
    };
    let dir = std::env::temp_dir().join(format!("nulltext-tape-f16-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_random_model(&dir, &Preset::TinyV.configs(), 5, false).unwrap();
    let models = [
        (tiny_model(), [1usize, 4, 32, 32], 501.0),
        (dir.clone(), [2, 4, 16, 24], 981.0),
    ];
    for (path, shape, t) in models {
        let f32_sd = StableDiffusion::load(path.to_str().unwrap(), &load_options()).unwrap();
        let sd = StableDiffusion::load(path.to_str().unwrap(), &opts).unwrap();
        let d = sd.unet.config().cross_attention_dim;
        let z = on_device(&noise(1, &shape));
        let ctx = on_device(&noise(10, &[shape[0], 77, d]));
        let mut tape = sd.unet.context_tape(&z, t).unwrap().expect("a tensor tape");
        assert!(!tape.is_host());
        let out = tape.forward(&ctx).unwrap();
        assert_eq!(out.dtype(), DType::F16);
        let w = on_device(&noise(11, out.dims()));
        let got = tape.backward(&w).unwrap();
        assert_eq!(got.dtype(), DType::F32);
        let half = graph_forward(&sd.unet, &z, t, &ctx);
        let (exact, exact_grad) = graph_grad(&f32_sd.unet, &z, t, &ctx, &w);
        let e16 = rel_err(&out, &half);
        let e32 = rel_err(&out, &exact);
        let c = cosine(&got, &exact_grad);
        let eg = rel_err(&got, &exact_grad);
        eprintln!(
            "f16 tensor tape {shape:?}: forward vs f16 graph {e16:e}, vs f32 {e32:e}; \
             gradient vs f32: cosine {c:.6}, max rel. difference {eg:e}"
        );
        assert!(
            e16 < 1e-2 && e32 < 1e-2,
            "f16 forward off: {e16:e} / {e32:e}"
        );
        assert!(c > 0.999, "f16 gradient direction off: cosine {c}");
        assert!(eg < 5e-2, "f16 gradient off by {eg:e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Execution::Graph` (what `NULLTEXT_CONTEXT_TAPE=off` chooses) runs every pass on the
/// graph: no context tape, and the same output as the default execution's tape.
#[test]
fn graph_execution_is_chosen_at_load_and_keeps_the_numbers() {
    let opts = nulltext_models::LoadOptions {
        execution: nulltext_models::Execution::Graph,
        ..load_options()
    };
    let graph = StableDiffusion::load(tiny_model().to_str().unwrap(), &opts).unwrap();
    let tapes = StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap();
    assert_eq!(graph.unet.execution(), nulltext_models::Execution::Graph);
    assert_eq!(tapes.unet.execution(), nulltext_models::Execution::Tapes);
    let z = noise(1, &[1, 4, 32, 32]);
    let ctx = noise(2, &[1, 77, graph.unet.config().cross_attention_dim]);
    assert!(graph.unet.context_tape(&z, 501.0).unwrap().is_none());
    assert!(tapes.unet.context_tape(&z, 501.0).unwrap().is_some());
    let a = graph.unet.forward(&z, 501.0, &ctx).unwrap();
    let b = tapes.unet.forward(&z, 501.0, &ctx).unwrap();
    assert_eq!(max_err(&a, &b), 0.0);
    for (s, want) in [("off", "Graph"), ("graph", "Graph"), ("on", "Tapes")] {
        let e: nulltext_models::Execution = s.parse().unwrap();
        assert_eq!(format!("{e:?}"), want);
    }
    assert!("fast".parse::<nulltext_models::Execution>().is_err());
}
