//! The UNet's one traversal, recorded and differentiated with respect to its context (the
//! context tape of null-text inversion), against candle's autograd through the same
//! traversal: the same output bit for bit, and the same context gradient — with nulltext's
//! CPU kernels (f32), candle's tensor ops (f64, f16; the GPU's path), odd sizes, and an
//! attention controller editing probabilities while the gradient is taken.

mod common;

use candle_core::{DType, Tensor, Var};
use common::*;
use nulltext_models::random::{write_random_model, Preset};
use nulltext_models::{AttentionCall, AttentionControl, StableDiffusion, UNet2DConditionModel};

/// A controller that asks for no probabilities but does not say so up front: a tape then
/// reuses nothing between passes.
struct Hooked;

impl AttentionControl for Hooked {
    fn wants(&self, _: &AttentionCall) -> bool {
        false
    }
    fn edit(&mut self, _: &AttentionCall, p: Tensor) -> nulltext_models::Result<Tensor> {
        Ok(p)
    }
}

/// The UNet as a single pass (with a tracked context, candle's autograd graph).
fn graph_forward(unet: &UNet2DConditionModel, z: &Tensor, t: f64, ctx: &Tensor) -> Tensor {
    unet.forward_controlled(z, t, ctx, &mut Hooked, 0).unwrap()
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
/// candle's graph cannot differentiate): the forward pass against the single pass, the
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
    for seed in [40u64, 41, 42] {
        let e = directional(unet, &z, t, &ctx, &w, &grad, seed);
        eprintln!("13×11: directional derivative vs central difference {e:e}");
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
    let loss = (out.to_dtype(w.dtype()).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap_or_else(|e| panic!("{e}"));
    let g = grads.get(var.as_tensor()).unwrap().clone();
    (out, g)
}

/// The tape with candle's tensor ops (the path of GPUs and half precision), in f64 on the
/// CPU: its output against the single pass, its gradient against candle's autograd (where
/// candle can differentiate the upsampling) and against central differences (f64 makes
/// both checks tight).
fn check_tensor_ops(sd: &StableDiffusion, shape: &[usize], t: f64, autograd: bool) {
    let unet = &sd.unet;
    let z = noise(1, shape).to_dtype(DType::F64).unwrap();
    let d = unet.config().cross_attention_dim;
    let mut tape = unet.context_tape(&z, t).unwrap().expect("a tape");
    assert!(!tape.is_host());
    for (round, seed) in [10u64, 20].into_iter().enumerate() {
        let ctx = noise(seed, &[shape[0], 77, d])
            .to_dtype(DType::F64)
            .unwrap();
        let out = tape.forward(&ctx).unwrap();
        let w = noise(seed + 1, out.dims()).to_dtype(DType::F64).unwrap();
        let again = tape.predict(&ctx).unwrap();
        assert!(
            tape.backward(&w).is_err(),
            "predict keeps nothing to differentiate"
        );
        let _ = tape.forward(&ctx).unwrap();
        let got = tape.backward(&w).unwrap();
        assert_eq!(got.dtype(), DType::F64);
        assert_eq!(max_err(&again, &out), 0.0, "predict differs from forward");
        assert_eq!(max_err(&graph_forward(unet, &z, t, &ctx), &out), 0.0);
        let eg = match autograd {
            true => rel_err(&got, &graph_grad(unet, &z, t, &ctx, &w).1),
            false => 0.0,
        };
        let dd = directional(unet, &z, t, &ctx, &w, &got, seed + 2);
        eprintln!(
            "f64 tensor ops {shape:?} round {round}: context gradient vs autograd {eg:e}, \
             directional derivative vs central difference {dd:e}"
        );
        assert!(eg < 1e-6, "tensor-op context gradient off by {eg:e}");
        assert!(dd < 1e-6, "directional derivative off by {dd:e}");
    }
}

/// The relative difference of ⟨grad, u⟩ and the central difference of Σ w·output along a
/// random direction u.
fn directional(
    unet: &UNet2DConditionModel,
    z: &Tensor,
    t: f64,
    ctx: &Tensor,
    w: &Tensor,
    grad: &Tensor,
    seed: u64,
) -> f64 {
    let wide = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
    let loss = |c: &Tensor| -> f64 {
        let o = graph_forward(unet, z, t, c);
        (wide(&o) * wide(w))
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let u = noise(seed, ctx.dims()).to_dtype(ctx.dtype()).unwrap();
    let h = match ctx.dtype() {
        DType::F64 => 1e-4,
        _ => 1e-2,
    };
    let plus = loss(&(ctx + (&u * h).unwrap()).unwrap());
    let minus = loss(&(ctx - (&u * h).unwrap()).unwrap());
    let numeric = (plus - minus) / (2.0 * h);
    let analytic = (wide(grad) * wide(&u))
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (numeric - analytic).abs() / analytic.abs().max(1e-12)
}

fn load_f64(path: &std::path::Path) -> StableDiffusion {
    let opts = nulltext_models::LoadOptions {
        device: candle_core::Device::Cpu,
        dtype: DType::F64,
        ..load_options()
    };
    StableDiffusion::load(path.to_str().unwrap(), &opts).unwrap()
}

#[test]
fn tensor_ops_tape_matches_autograd_in_f64() {
    check_tensor_ops(&load_f64(&tiny_model()), &[1, 4, 32, 32], 501.0, true);
    let dir = std::env::temp_dir().join(format!("nulltext-tape-f64-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    write_random_model(&dir, &Preset::TinyV.configs(), 5, false).unwrap();
    let sd = load_f64(&dir);
    let _ = std::fs::remove_dir_all(&dir);
    check_tensor_ops(&sd, &[2, 4, 16, 24], 981.0, true);
    // latents that do not halve evenly
    check_tensor_ops(&sd, &[1, 4, 13, 11], 1.0, false);
}

/// The two kernel sets agree: the CPU kernels' gradient (f32) against the tensor ops' (f64)
/// on the fixture model.
#[test]
fn cpu_kernels_and_tensor_ops_give_the_same_gradient() {
    let f32_sd = StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap();
    if !f32_sd.device.is_cpu() {
        return;
    }
    let f64_sd = load_f64(&tiny_model());
    let z = noise(1, &[1, 4, 32, 32]);
    let ctx = noise(2, &[1, 77, f32_sd.unet.config().cross_attention_dim]);
    let mut host = f32_sd.unet.context_tape(&z, 501.0).unwrap().unwrap();
    assert!(host.is_host());
    let out = host.forward(&ctx).unwrap();
    let w = noise(3, out.dims());
    let g32 = host.backward(&w).unwrap();
    let wide = |x: &Tensor| x.to_dtype(DType::F64).unwrap();
    let mut ops = f64_sd.unet.context_tape(&wide(&z), 501.0).unwrap().unwrap();
    let out64 = ops.forward(&wide(&ctx)).unwrap();
    let g64 = ops.backward(&wide(&w)).unwrap();
    let (eo, eg) = (rel_err(&out, &out64), rel_err(&g32, &g64));
    eprintln!("f32 CPU kernels vs f64 tensor ops: output {eo:e}, context gradient {eg:e}");
    assert!(eo < 1e-5 && eg < 1e-4, "{eo:e} / {eg:e}");
}

/// Scales the probabilities of every cross-attention of the up path: a controller that
/// edits what it sees.
struct Emphasis;

impl AttentionControl for Emphasis {
    fn wants(&self, call: &AttentionCall) -> bool {
        call.site.is_cross() && call.site.place == nulltext_models::Place::Up
    }
    fn edit(&mut self, _: &AttentionCall, p: Tensor) -> nulltext_models::Result<Tensor> {
        Ok((p * 1.5)?)
    }
}

/// With a controller editing probabilities, a tape's pass equals the single pass under the
/// same controller, and its context gradient runs through the edit as candle's autograd
/// does; passes without the controller reuse the context-free prefix as before.
#[test]
fn a_controller_can_watch_while_the_gradient_is_taken() {
    let sd = StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap();
    let unet = &sd.unet;
    let z = on_device(&noise(1, &[1, 4, 32, 32]));
    let ctx = on_device(&noise(2, &[1, 77, unet.config().cross_attention_dim]));
    let mut tape = unet.context_tape(&z, 501.0).unwrap().unwrap();
    let plain = tape.forward(&ctx).unwrap();
    let out = tape.forward_controlled(&ctx, &mut Emphasis, 0).unwrap();
    let want = unet
        .forward_controlled(&z, 501.0, &ctx, &mut Emphasis, 0)
        .unwrap();
    assert_eq!(max_err(&out, &want), 0.0);
    assert!(
        max_err(&out, &plain) > 1e-3,
        "the controller changed nothing"
    );
    let w = on_device(&noise(3, out.dims()));
    let got = tape.backward(&w).unwrap();
    let var = Var::from_tensor(&ctx).unwrap();
    let graph = unet
        .forward_controlled(&z, 501.0, var.as_tensor(), &mut Emphasis, 0)
        .unwrap();
    let grads = (graph * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let e = rel_err(&got, grads.get(var.as_tensor()).unwrap());
    eprintln!("controlled tape: context gradient vs autograd {e:e}");
    assert!(e < 1e-5, "{e:e}");
    assert_eq!(max_err(&tape.forward(&ctx).unwrap(), &plain), 0.0);
}

/// One timestep per latent (training): each row as if it ran alone.
#[test]
fn one_timestep_per_row() {
    let sd = StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap();
    let unet = &sd.unet;
    let z = on_device(&noise(1, &[2, 4, 32, 32]));
    let ctx = on_device(&noise(2, &[2, 77, unet.config().cross_attention_dim]));
    let both = unet.forward_timesteps(&z, &[101.0, 801.0], &ctx).unwrap();
    for (i, t) in [101.0, 801.0].into_iter().enumerate() {
        let row = |x: &Tensor| x.narrow(0, i, 1).unwrap();
        let alone = unet.forward(&row(&z), t, &row(&ctx)).unwrap();
        let e = rel_err(&row(&both), &alone);
        assert!(e < 1e-5, "row {i}: {e:e}");
    }
}

/// In half precision (the GPU default) a tape runs candle's tensor ops: its output against
/// the f16 single pass, its gradient against the f32 model's, for the fixture model and an
/// SD 2.x-shaped one (attention upcast to f32).
#[test]
fn tape_in_half_precision() {
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
        let mut tape = sd.unet.context_tape(&z, t).unwrap().expect("a tape");
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
        // a tape's pass runs the same kernels as a plain pass
        assert_eq!(e16, 0.0, "f16 tape forward differs from the plain pass");
        assert!(e32 < 1e-2, "f16 forward off: {e32:e}");
        assert!(c > 0.999, "f16 gradient direction off: cosine {c}");
        assert!(eg < 5e-2, "f16 gradient off by {eg:e}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// `Execution::Graph` (what `NULLTEXT_CONTEXT_TAPE=off` chooses) gives no context tape
/// (callers differentiate through candle's graph), and the same output.
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
