//! SDXL's context tape with the pooled text embedding varying (null-text inversion of SDXL
//! optimizes the negative context and the negative pooled embedding), on the tiny SDXL
//! fixture: the output against the single pass, and both gradients against candle's
//! autograd through the single pass — with nulltext's CPU kernels (f32), candle's tensor
//! ops (f64, f16; the GPU's path) and odd sizes. Passes with the pooled embedding fixed keep
//! their numbers beside the varying ones.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use common::*;
use nulltext_models::config::{read_json, UNetConfig};
use nulltext_models::model::component_weight_files;
use nulltext_models::random::{write_random_model, Preset};
use nulltext_models::sdxl::time_ids;
use nulltext_models::weights::WeightStore;
use nulltext_models::{AddedCond, NoControl, StableDiffusion, UNet2DConditionModel};

/// The pooled text embedding's width in the fixture.
const POOLED: usize = 12;

/// The UNet of the model in `dir`.
fn unet_at(dir: &Path, device: &Device, dtype: DType) -> UNet2DConditionModel {
    let dir = dir.join("unet");
    let config: UNetConfig = read_json(&dir.join("config.json")).unwrap();
    let files = component_weight_files(&dir, "diffusion_pytorch_model").unwrap();
    let store = WeightStore::open(&files, device, dtype).unwrap();
    UNet2DConditionModel::load(&store.root(), &config).unwrap()
}

/// The fixture's UNet.
fn unet(device: &Device, dtype: DType) -> UNet2DConditionModel {
    unet_at(&fixtures().join("models/tiny-sdxl"), device, dtype)
}

/// A random UNet of the fixture's shapes with two channels per norm group: the fixture's
/// first block has one (16 channels, 16 groups), and a norm of single channels cancels the
/// per-channel biases before it, so their gradients are zero there.
fn grouped_unet(dtype: DType) -> UNet2DConditionModel {
    let mut configs = Preset::TinySdxl.configs();
    configs.unet["norm_num_groups"] = 8.into();
    let dir = std::env::temp_dir().join(format!(
        "nulltext-sdxl-tape-{}-{dtype:?}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    write_random_model(&dir, &configs, 7, false).unwrap();
    let unet = unet_at(&dir, &Device::Cpu, dtype);
    let _ = std::fs::remove_dir_all(&dir);
    unet
}

/// `pooled` `[B, P]` with the time ids of a 256×256 image, uncropped.
fn added(pooled: &Tensor) -> AddedCond {
    AddedCond::new(pooled.clone(), time_ids((256, 256), (0, 0), (256, 256))).unwrap()
}

/// The single pass for `ctx` and `pooled`.
fn single(
    unet: &UNet2DConditionModel,
    z: &Tensor,
    t: f64,
    ctx: &Tensor,
    pooled: &Tensor,
) -> Tensor {
    unet.forward_conditioned(z, t, ctx, Some(&added(pooled)), &mut NoControl, 0)
        .unwrap()
}

/// The single pass's output and, through candle's autograd, the gradients of Σ w·output
/// with respect to the context and (with `vary_pooled`) the pooled embedding.
fn autograd(
    unet: &UNet2DConditionModel,
    z: &Tensor,
    t: f64,
    (ctx, pooled): (&Tensor, &Tensor),
    w: &Tensor,
    vary_pooled: bool,
) -> (Tensor, Tensor, Option<Tensor>) {
    let c = Var::from_tensor(ctx).unwrap();
    let p = Var::from_tensor(pooled).unwrap();
    let p_in = match vary_pooled {
        true => p.as_tensor().clone(),
        false => pooled.clone(),
    };
    let out = single(unet, z, t, c.as_tensor(), &p_in);
    let loss = (out.to_dtype(w.dtype()).unwrap() * w)
        .unwrap()
        .sum_all()
        .unwrap();
    let mut grads = loss.backward().unwrap_or_else(|e| panic!("{e}"));
    let dctx = grads.remove(c.as_tensor()).unwrap();
    (out, dctx, grads.remove(p.as_tensor()))
}

/// Checks pooled passes against the single pass (bit for bit) and their gradients against
/// candle's autograd (to `tol` of the largest), then a pass with the pooled embedding fixed
/// against autograd and against a fresh tape's, for latents of `shape` at `t` in `dtype`.
fn check(unet: &UNet2DConditionModel, shape: &[usize], t: f64, dtype: DType, tol: f64) {
    let on = |x: Tensor| x.to_dtype(dtype).unwrap();
    let b = shape[0];
    let d = unet.config().cross_attention_dim;
    let z = on(noise(1, shape));
    let fixed = on(noise(2, &[b, POOLED]));
    let mut tape = unet
        .context_tape_conditioned(&z, t, Some(&added(&fixed)))
        .unwrap()
        .expect("tapes by default");
    let label = format!("{:?} {dtype:?}", &shape[2..]);
    for seed in [10u64, 20] {
        let ctx = on(noise(seed, &[b, 77, d]));
        let pooled = on(noise(seed + 1, &[b, POOLED]));
        let out = tape.forward_pooled(&ctx, &pooled).unwrap();
        let want = single(unet, &z, t, &ctx, &pooled);
        assert_eq!(max_err(&out, &want), 0.0, "{label}: pooled pass differs");
        assert_eq!(
            max_err(&tape.predict_pooled(&ctx, &pooled).unwrap(), &want),
            0.0
        );
        assert!(
            tape.backward_pooled(&want).is_err(),
            "predict_pooled keeps nothing to differentiate"
        );
        let out = tape.forward_pooled(&ctx, &pooled).unwrap();
        let w = on(noise(seed + 2, out.dims()));
        let (dctx, dpooled) = tape.backward_pooled(&w).unwrap();
        assert_eq!((dctx.dtype(), dpooled.dtype()), (dtype, dtype));
        let (_, want_ctx, want_pooled) = autograd(unet, &z, t, (&ctx, &pooled), &w, true);
        let want_pooled = want_pooled.expect("the pooled embedding reaches the output");
        let (ec, ep) = (rel_err(&dctx, &want_ctx), rel_err(&dpooled, &want_pooled));
        eprintln!(
            "{label} seed {seed}: pooled pass vs autograd: context gradient {ec:e}, pooled \
             gradient {ep:e} (max |grad| {:e}, {:e})",
            max_abs(&want_ctx),
            max_abs(&want_pooled)
        );
        assert!(ec < tol && ep < tol, "{label}: {ec:e} / {ep:e}");
    }
    // with the tape's own pooled embedding, the passes of null-text inversion for SD 1.x/2.x:
    // the constants the pooled passes left behind keep the numbers of a fresh tape
    let ctx = on(noise(30, &[b, 77, d]));
    let out = tape.forward(&ctx).unwrap();
    assert_eq!(max_err(&out, &single(unet, &z, t, &ctx, &fixed)), 0.0);
    let w = on(noise(31, out.dims()));
    let dctx = tape.backward(&w).unwrap();
    let mut fresh = unet
        .context_tape_conditioned(&z, t, Some(&added(&fixed)))
        .unwrap()
        .unwrap();
    let _ = fresh.forward(&ctx).unwrap();
    assert_eq!(max_err(&dctx, &fresh.backward(&w).unwrap()), 0.0);
    let (_, want, none) = autograd(unet, &z, t, (&ctx, &fixed), &w, false);
    assert!(none.is_none());
    let e = rel_err(&dctx, &want);
    // the pooled pass at the tape's own embedding: the same context gradient
    let _ = tape.forward_pooled(&ctx, &fixed).unwrap();
    let ep = rel_err(&tape.backward_pooled(&w).unwrap().0, &dctx);
    eprintln!(
        "{label}: fixed pooled embedding: context gradient vs autograd {e:e}; the pooled \
         pass's at the same embedding vs the fixed pass's {ep:e}"
    );
    assert!(e < tol && ep < tol, "{e:e} / {ep:e}");
}

#[test]
fn pooled_tape_matches_autograd_with_cpu_kernels() {
    let unet = unet(&Device::Cpu, DType::F32);
    check(&unet, &[1, 4, 32, 32], 501.0, DType::F32, 1e-4);
    check(&unet, &[1, 4, 36, 28], 981.0, DType::F32, 1e-4);
    check(&unet, &[2, 4, 16, 24], 1.0, DType::F32, 1e-4);
    check(
        &grouped_unet(DType::F32),
        &[1, 4, 36, 28],
        501.0,
        DType::F32,
        1e-4,
    );
}

#[test]
fn pooled_tape_matches_autograd_with_tensor_ops_in_f64() {
    let unet = unet(&Device::Cpu, DType::F64);
    check(&unet, &[1, 4, 32, 32], 501.0, DType::F64, 1e-6);
    check(&unet, &[1, 4, 36, 28], 981.0, DType::F64, 1e-6);
    check(
        &grouped_unet(DType::F64),
        &[1, 4, 32, 32],
        501.0,
        DType::F64,
        1e-6,
    );
    // latents that do not halve evenly (candle's graph cannot differentiate the
    // upsampling): both gradients along random directions against central differences
    let wide = |x: Tensor| x.to_dtype(DType::F64).unwrap();
    let (shape, t) = ([1, 4, 13, 11], 1.0);
    let z = wide(noise(1, &shape));
    let ctx = wide(noise(2, &[1, 77, unet.config().cross_attention_dim]));
    let pooled = wide(noise(3, &[1, POOLED]));
    let mut tape = unet
        .context_tape_conditioned(&z, t, Some(&added(&pooled)))
        .unwrap()
        .unwrap();
    let out = tape.forward_pooled(&ctx, &pooled).unwrap();
    assert_eq!(max_err(&out, &single(&unet, &z, t, &ctx, &pooled)), 0.0);
    let w = wide(noise(4, out.dims()));
    let (dctx, dpooled) = tape.backward_pooled(&w).unwrap();
    let dot = |a: &Tensor, b: &Tensor| -> f64 {
        (a * b)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let loss = |c: &Tensor, p: &Tensor| dot(&single(&unet, &z, t, c, p), &w);
    let h = 1e-4;
    for seed in [40u64, 41, 42] {
        let uc = wide(noise(seed, ctx.dims()));
        let up = wide(noise(seed + 10, pooled.dims()));
        let at = |s: f64| {
            loss(
                &(&ctx + (&uc * s).unwrap()).unwrap(),
                &(&pooled + (&up * s).unwrap()).unwrap(),
            )
        };
        let numeric = (at(h) - at(-h)) / (2.0 * h);
        let (ac, ap) = (dot(&dctx, &uc), dot(&dpooled, &up));
        let e = (numeric - ac - ap).abs() / (ac + ap).abs().max(1e-12);
        eprintln!(
            "13×11 f64: directional derivative (context {ac:e}, pooled {ap:e}) vs central \
             difference {e:e}"
        );
        assert!(e < 1e-6, "directional derivative off by {e:e}");
    }
}

/// In half precision a tape runs candle's tensor ops: its output against the f16 single
/// pass, both gradients against the f32 model's (the tolerances of the SD 1.x/2.x tapes).
#[test]
fn pooled_tape_in_half_precision() {
    let exact = unet(&device(), DType::F32);
    let half = unet(&device(), DType::F16);
    let (shape, t) = ([1, 4, 32, 32], 501.0);
    let z = on_device(&noise(1, &shape));
    let ctx = on_device(&noise(10, &[1, 77, half.config().cross_attention_dim]));
    let pooled = on_device(&noise(11, &[1, POOLED]));
    let mut tape = half
        .context_tape_conditioned(&z, t, Some(&added(&pooled)))
        .unwrap()
        .unwrap();
    assert!(!tape.is_host());
    let out = tape.forward_pooled(&ctx, &pooled).unwrap();
    assert_eq!(out.dtype(), DType::F16);
    let w = on_device(&noise(12, out.dims()));
    let (dctx, dpooled) = tape.backward_pooled(&w).unwrap();
    assert_eq!((dctx.dtype(), dpooled.dtype()), (DType::F32, DType::F32));
    let e16 = rel_err(&out, &single(&half, &z, t, &ctx, &pooled));
    let (want, want_ctx, want_pooled) = autograd(&exact, &z, t, (&ctx, &pooled), &w, true);
    let want_pooled = want_pooled.unwrap();
    let e32 = rel_err(&out, &want);
    eprintln!("f16 pooled tape: forward vs f16 single pass {e16:e}, vs f32 {e32:e}");
    assert!(
        e16 < 1e-2 && e32 < 1e-2,
        "f16 forward off: {e16:e} / {e32:e}"
    );
    for (what, got, want) in [
        ("context", &dctx, &want_ctx),
        ("pooled", &dpooled, &want_pooled),
    ] {
        let (c, e) = (cosine(got, want), rel_err(got, want));
        eprintln!("f16 pooled tape: {what} gradient vs f32: cosine {c:.6}, max rel. {e:e}");
        assert!(c > 0.999, "f16 {what} gradient direction off: cosine {c}");
        assert!(e < 5e-2, "f16 {what} gradient off by {e:e}");
    }
}

/// Pooled passes need SDXL's tape and a backward pass needs its own forward pass.
#[test]
fn pooled_passes_are_refused_where_they_do_not_apply() {
    let sd = StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap();
    let z = on_device(&noise(1, &[1, 4, 32, 32]));
    let ctx = on_device(&noise(2, &[1, 77, sd.unet.config().cross_attention_dim]));
    let pooled = on_device(&noise(3, &[1, POOLED]));
    let mut tape = sd.unet.context_tape(&z, 501.0).unwrap().unwrap();
    let err = tape.forward_pooled(&ctx, &pooled).unwrap_err().to_string();
    assert!(err.contains("pooled text embedding"), "{err}");
    let unet = unet(&device(), DType::F32);
    let ctx = on_device(&noise(2, &[1, 77, unet.config().cross_attention_dim]));
    let mut tape = unet
        .context_tape_conditioned(&z, 501.0, Some(&added(&pooled)))
        .unwrap()
        .unwrap();
    assert!(tape.backward_pooled(&z).is_err(), "no pass before it");
    let out = tape.forward(&ctx).unwrap();
    assert!(
        tape.backward_pooled(&out).is_err(),
        "a pass with the pooled embedding fixed"
    );
    let wrong = on_device(&noise(3, &[1, POOLED - 1]));
    let err = tape.forward_pooled(&ctx, &wrong).unwrap_err().to_string();
    assert!(err.contains("pooled text embedding"), "{err}");
}
