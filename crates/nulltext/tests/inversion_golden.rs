//! Inversion parity with the PyTorch goldens (`tests/fixtures/golden/chelsea_*`).

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use candle_core::{DType, IndexOp, Tensor, Var};
use common::*;
use nulltext::models::{Ddim, NoControl};
use nulltext::sampling::predict_eps;
use nulltext::{InvertOptions, NoProgress};

/// The null-text loss of one guided DDIM step from `z`: the mean squared distance of
/// z_{t−1}(ε(∅) + w (ε(C) − ε(∅))) to `target`.
fn step_loss(
    ddim: &Ddim,
    t: usize,
    z: &Tensor,
    eps_u: &Tensor,
    eps_c: &Tensor,
    w: f64,
    target: &Tensor,
) -> Tensor {
    let noise = (eps_u + ((eps_c - eps_u).unwrap() * w).unwrap()).unwrap();
    let prev = ddim.step(&noise, t, z).unwrap();
    (prev - target).unwrap().sqr().unwrap().mean_all().unwrap()
}

/// The sum of `t`'s elements, in f64 (summed in `t`'s own type).
fn sum(t: &Tensor) -> f64 {
    let s = t.sum_all().unwrap().to_dtype(DType::F64).unwrap();
    s.to_scalar::<f64>().unwrap()
}

#[test]
fn image_latent_matches() {
    let sd = load_tiny();
    let z0 = chelsea_latent(&sd);
    let g = golden("chelsea_vae.safetensors");
    assert_close("z0 from the PNG", &z0, &g["image_latent"], 1e-4);
}

#[test]
fn ddim_inversion_trajectory_matches() {
    let sd = load_tiny();
    let g = golden("chelsea_ddim_inversion.safetensors");
    let z0 = on_device(&g["latents"].i(0..1).unwrap());
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let cond = sd.encode_prompt("a close up photo of a cat").unwrap();
    assert_close("cond", &cond.context, &g["cond"], 1e-4);
    let pivots =
        nulltext::inversion::ddim_inversion(&sd, &ddim, &z0, &cond, &mut NoProgress).unwrap();
    let got = Tensor::cat(&pivots, 0).unwrap();
    // relative: 1e-4 × (1 + max|golden|)
    assert_close("DDIM inversion z*_0..50", &got, &g["latents"], 1e-4);
}

#[test]
fn null_text_gradient_matches_golden() {
    let sd = load_tiny();
    let g = golden("chelsea_nti.safetensors");
    let d = golden("chelsea_ddim_inversion.safetensors");
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let t = ddim.timesteps()[0];
    let z = on_device(&g["latent_T"]);
    let target = on_device(&d["latents"].i(49..50).unwrap());
    let cond = &embeds(&on_device(&g["cond"]));
    let var = Var::from_tensor(&on_device(&g["uncond_init"])).unwrap();
    let eps_c = predict_eps(&sd, &ddim, &z, t, cond, &mut NoControl, 0).unwrap();
    let eps_u = predict_eps(
        &sd,
        &ddim,
        &z,
        t,
        &embeds(var.as_tensor()),
        &mut NoControl,
        0,
    )
    .unwrap();
    let loss = step_loss(&ddim, t, &z, &eps_u, &eps_c, 7.5, &target);
    let grads = loss.backward().unwrap();
    let grad = &grads
        .get(var.as_tensor())
        .unwrap()
        .to_device(&candle_core::Device::Cpu)
        .unwrap();
    let want = &g["grad0"];
    assert_close("∂loss/∂∅ at step 0", grad, want, 1e-4);
    // And the direction, as a scale-free check.
    let dot = sum(&(grad * want).unwrap());
    let n1 = sum(&grad.sqr().unwrap());
    let n2 = sum(&want.sqr().unwrap());
    let cos = dot / (n1.sqrt() * n2.sqrt());
    eprintln!("gradient cosine to golden: {cos:.8}");
    assert!(cos > 0.99999, "{cos}");
    // The context tape (the inner loop's path) with the CPU kernels (f32 on the CPU) and
    // with candle's tensor ops (the GPU's path; f64 on the CPU) gives the same gradient.
    let f64_sd = nulltext_models::StableDiffusion::load(
        tiny_model().to_str().unwrap(),
        &nulltext_models::LoadOptions {
            device: candle_core::Device::Cpu,
            dtype: DType::F64,
            ..load_options()
        },
    )
    .unwrap();
    let z64 = z
        .to_device(&candle_core::Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    let tapes = [
        (
            "context tape",
            sd.unet.context_tape(&z, t as f64).unwrap(),
            device(),
        ),
        (
            "tensor ops, f64",
            f64_sd.unet.context_tape(&z64, t as f64).unwrap(),
            candle_core::Device::Cpu,
        ),
    ];
    for (name, tape, dev) in tapes {
        let mut tape = tape.expect("a tape for the fixture model");
        let ctx = var.as_tensor().to_device(&dev).unwrap();
        let out = tape.forward(&ctx).unwrap().to_dtype(DType::F32).unwrap();
        let out = Var::from_tensor(&on_device(&out)).unwrap();
        let eps_u = ddim.epsilon(out.as_tensor(), t, &z).unwrap();
        let loss = step_loss(&ddim, t, &z, &eps_u, &eps_c, 7.5, &target);
        let grads = loss.backward().unwrap();
        let tgrad = tape.backward(grads.get(out.as_tensor()).unwrap()).unwrap();
        let tgrad = on_device(&tgrad);
        assert_close(&format!("∂loss/∂∅ at step 0, {name}"), &tgrad, want, 1e-4);
        let e = (&tgrad - grad).unwrap().abs().unwrap().max_all().unwrap();
        let e = e.to_scalar::<f32>().unwrap() as f64 / n1.sqrt().max(1e-30);
        eprintln!("{name} vs graph gradient: max|difference| / ‖grad‖ = {e:e}");
        assert!(e < 1e-5, "{e}");
    }
}

/// Steps started from the golden trajectory: every loss of the first steps' Adam runs and
/// the optimized embeddings agree tightly (the end-to-end run drifts slowly; see README).
#[test]
fn null_text_steps_match_from_golden_trajectory() {
    let sd = load_tiny();
    let g = golden("chelsea_nti.safetensors");
    let d = golden("chelsea_ddim_inversion.safetensors");
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let opts = InvertOptions::default();
    let losses: Vec<Vec<f64>> = g["losses"].to_vec2().unwrap();
    let mut worst_loss = 0f64;
    for i in [0usize, 1, 25, 49] {
        // Build a 1-step problem: start at z̄_i, target z*_{T-1-i}, init ∅_{i-1}.
        let z = on_device(&g["nti_latents"].i(i..i + 1).unwrap());
        let target = on_device(&d["latents"].i(49 - i..50 - i).unwrap());
        let init = on_device(&if i == 0 {
            g["uncond_init"].clone()
        } else {
            g["null_embeddings"].i(i - 1..i).unwrap()
        });
        let t = ddim.timesteps()[i];
        let cond = &embeds(&on_device(&g["cond"]));
        let eps_c = predict_eps(&sd, &ddim, &z, t, cond, &mut NoControl, i).unwrap();
        let var = Var::from_tensor(&init).unwrap();
        let lr = 1e-2 * (1.0 - i as f64 / 100.0);
        let mut adam = TestAdam::new(&init);
        for (j, want) in losses[i].iter().enumerate() {
            if want.is_nan() {
                break;
            }
            let u = embeds(var.as_tensor());
            let eps_u = predict_eps(&sd, &ddim, &z, t, &u, &mut NoControl, i).unwrap();
            let loss = step_loss(&ddim, t, &z, &eps_u, &eps_c, opts.guidance, &target);
            let grads = loss.backward().unwrap();
            let l = loss.to_scalar::<f32>().unwrap() as f64;
            let rel = (l - want).abs() / want.abs();
            worst_loss = worst_loss.max(rel);
            assert!(
                rel < 1e-3,
                "step {i} iteration {j}: loss {l} vs golden {want}"
            );
            adam.step(&var, grads.get(var.as_tensor()).unwrap(), lr);
        }
        let got = var.as_tensor();
        assert_close(
            &format!("∅_{i} after its Adam run"),
            got,
            &g["null_embeddings"].i(i..i + 1).unwrap(),
            1e-4,
        );
    }
    eprintln!("worst relative loss deviation: {worst_loss:.3e}");
}

/// Runs our whole pipeline (our z₀, prompt embeddings and pivots) for the first `k` steps
/// and compares with the golden run: losses, iteration counts, z̄ and ∅.
fn first_steps(golden_file: &str, early_stop: f64, k: usize) -> (f64, f64) {
    let sd = load_tiny();
    let g = golden(golden_file);
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let z0 = chelsea_latent(&sd);
    let cond = sd.encode_prompt("a close up photo of a cat").unwrap();
    let empty = sd.encode_negative("").unwrap();
    let pivots =
        nulltext::inversion::ddim_inversion(&sd, &ddim, &z0, &cond, &mut NoProgress).unwrap();
    let opts = InvertOptions {
        early_stop,
        ..Default::default()
    };
    let mut opt = nulltext::inversion::NullTextOptimizer::new(
        &sd, &ddim, &pivots, &cond, &empty, &opts, false,
    )
    .unwrap();
    for _ in 0..k {
        opt.step(&mut NoProgress).unwrap();
    }
    let worst = loss_deviation(&opt.report().losses, &g);
    eprintln!("{golden_file}: worst relative loss deviation over {k} steps: {worst:.3e}");
    assert!(worst < 1e-3, "{worst}");
    let z = opt.latent();
    let lat_err = assert_close(
        &format!("z̄ after {k} steps"),
        z,
        &g["nti_latents"].i(k..k + 1).unwrap(),
        1e-4,
    );
    let nulls: Vec<Tensor> = opt
        .null_embeddings()
        .iter()
        .map(|e| e.context.clone())
        .collect();
    let nulls = Tensor::cat(&nulls, 0).unwrap();
    let null_err = max_err(&nulls, &g["null_embeddings"].i(0..k).unwrap());
    eprintln!("∅_0..{k}: max|err| = {null_err:.3e}");
    assert!(null_err < 1e-3, "{null_err}");
    (worst, lat_err)
}

#[test]
fn null_text_first_steps_follow_golden() {
    first_steps("chelsea_nti.safetensors", 1e-5, 3);
}

/// With ε = 1e-3 the first six steps stop after one update, then all ten are needed.
#[test]
fn early_stopping_follows_golden() {
    first_steps("chelsea_nti_eps0.001.safetensors", 1e-3, 7);
}

/// The whole 50 × 10 optimization (about 5 minutes here): run with `--ignored`.
#[test]
#[ignore = "slow: the full null-text optimization"]
fn full_null_text_inversion_matches_golden() {
    let sd = load_tiny();
    let g = golden("chelsea_nti.safetensors");
    let z0 = chelsea_latent(&sd);
    let opts = InvertOptions::default();
    let (inv, report) = invert_chelsea(&sd, &z0, &opts);
    let want_losses: Vec<Vec<f64>> = g["losses"].to_vec2().unwrap();
    let mut worst = 0f64;
    for (i, got) in report.losses.iter().enumerate() {
        assert_eq!(
            got.len(),
            10,
            "step {i} never early-stops in the golden run"
        );
        for (j, l) in got.iter().enumerate() {
            worst = worst.max((l - want_losses[i][j]).abs() / want_losses[i][j]);
        }
    }
    eprintln!("largest relative loss deviation over 500 iterations: {worst:.3e}");
    let rec = report.final_latent.unwrap();
    let (rec, z0) = (
        rec.to_device(&candle_core::Device::Cpu).unwrap(),
        z0.to_device(&candle_core::Device::Cpu).unwrap(),
    );
    let golden_mse = mse(&g["nti_latents"].i(50..51).unwrap(), &g["image_latent"]) as f64;
    let mse = mse(&rec, &z0) as f64;
    eprintln!("reconstruction latent MSE {mse:.6} (golden {golden_mse:.6})");
    assert!(mse <= golden_mse * 1.05);
    assert_close(
        "final latent",
        &rec,
        &g["nti_latents"].i(50..51).unwrap(),
        1e-4,
    );
    let null_err = max_err(&inv.null_embeddings, &g["null_embeddings"]);
    eprintln!("null embeddings end to end: max|err| = {null_err:.3e}");
    assert!(null_err < 1e-3 * 5.0);
}

/// PyTorch's Adam, for the step test above (the library's is private).
struct TestAdam {
    m: Tensor,
    v: Tensor,
    t: i32,
}
impl TestAdam {
    fn new(x: &Tensor) -> Self {
        Self {
            m: x.zeros_like().unwrap(),
            v: x.zeros_like().unwrap(),
            t: 0,
        }
    }
    fn step(&mut self, p: &Var, g: &Tensor, lr: f64) {
        self.t += 1;
        self.m = (&self.m + ((g - &self.m).unwrap() * 0.1).unwrap()).unwrap();
        self.v = ((&self.v * 0.999).unwrap() + (g.sqr().unwrap() * 0.001).unwrap()).unwrap();
        let bc1 = 1.0 - 0.9f64.powi(self.t);
        let bc2 = 1.0 - 0.999f64.powi(self.t);
        let denom = ((self.v.sqrt().unwrap() / bc2.sqrt()).unwrap() + 1e-8).unwrap();
        let upd = ((&self.m / denom).unwrap() * (lr / bc1)).unwrap();
        p.set(&(p.as_tensor() - upd).unwrap()).unwrap();
    }
}

/// The analytic gradient w.r.t. the null embedding against central finite differences
/// along random directions, at a late step where the loss is well above rounding.
#[test]
fn null_text_gradient_agrees_with_finite_differences() {
    let sd = load_tiny();
    let g = golden("chelsea_nti.safetensors");
    let d = golden("chelsea_ddim_inversion.safetensors");
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let i = 40;
    let t = ddim.timesteps()[i];
    let z = on_device(&g["nti_latents"].i(i..i + 1).unwrap());
    let target = on_device(&d["latents"].i(49 - i..50 - i).unwrap());
    let cond = embeds(&on_device(&g["cond"]));
    let u0 = on_device(&g["null_embeddings"].i(i - 1..i).unwrap());
    let eps_c = predict_eps(&sd, &ddim, &z, t, &cond, &mut NoControl, i).unwrap();
    let loss_of = |u: &Tensor| -> (Tensor, f64) {
        let eps_u = predict_eps(&sd, &ddim, &z, t, &embeds(u), &mut NoControl, i).unwrap();
        let loss = step_loss(&ddim, t, &z, &eps_u, &eps_c, 7.5, &target);
        let v = sum(&loss);
        (loss, v)
    };
    let var = Var::from_tensor(&u0).unwrap();
    let (loss, _) = loss_of(var.as_tensor());
    let grads = loss.backward().unwrap();
    let grad = grads
        .get(var.as_tensor())
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap();
    // Along the gradient itself (the largest change) and two mixed directions; the loss is
    // O(1e-2) in f32, so the step must move it well above rounding.
    let gnorm = sum(&grad.sqr().unwrap()).sqrt();
    let unit_grad = (&grad / gnorm).unwrap().to_dtype(DType::F32).unwrap();
    for seed in 0..3u64 {
        let noise =
            nulltext::text2img::seeded_noise(seed, (1, 1, 77, 32), &candle_core::Device::Cpu)
                .unwrap()
                .reshape((1, 77, 32))
                .unwrap();
        let nn = sum(&noise.sqr().unwrap()).sqrt();
        let mix = if seed == 0 { 0.0 } else { 0.5 };
        let dir = ((&unit_grad * (1.0 - mix)).unwrap() + (on_device(&noise) * (mix / nn)).unwrap())
            .unwrap();
        let h = 0.5;
        let (_, lp) = loss_of(&(&u0 + (&dir * h).unwrap()).unwrap());
        let (_, lm) = loss_of(&(&u0 - (&dir * h).unwrap()).unwrap());
        let fd = (lp - lm) / (2.0 * h);
        let an = sum(&(&grad * dir.to_dtype(DType::F64).unwrap()).unwrap());
        let rel = (fd - an).abs() / an.abs().max(1e-12);
        eprintln!(
            "direction {seed}: analytic {an:.6e}, finite difference {fd:.6e}, relative {rel:.2e}"
        );
        assert!(
            rel < 2e-2,
            "gradient disagrees with finite differences: {an} vs {fd}"
        );
    }
}

/// A loss that overflows stops the optimization with a clear error instead of writing NaN
/// embeddings (guidance 1e36 sends ε(∅) + w(ε(C) − ε(∅)) past f32's range). Inversions
/// refuse such a scale up front; the optimizer itself must still catch the overflow.
#[test]
fn non_finite_optimization_is_an_error() {
    let sd = load_tiny();
    let z0 = chelsea_latent(&sd);
    let opts = InvertOptions {
        num_steps: 2,
        inner_steps: 2,
        guidance: 1e36,
        ..Default::default()
    };
    let Err(e) = nulltext::invert_latent(&sd, &z0, "a cat", 256, 256, &opts, &mut NoProgress)
    else {
        panic!("guidance 1e36 was accepted");
    };
    assert!(
        e.to_string()
            .contains("--guidance must be between 0 and 50"),
        "{e}"
    );
    let ddim = nulltext::models::Ddim::new(&sd.scheduler, opts.num_steps).unwrap();
    let cond = sd.encode_prompt("a cat").unwrap();
    let empty = sd.encode_negative("").unwrap();
    let pivots =
        nulltext::inversion::ddim_inversion(&sd, &ddim, &z0, &cond, &mut NoProgress).unwrap();
    let Err(e) = nulltext::inversion::null_text_optimization(
        &sd,
        &ddim,
        &pivots,
        &cond,
        &empty,
        &opts,
        false,
        &mut NoProgress,
    ) else {
        panic!("an overflowing optimization succeeded");
    };
    let msg = e.to_string();
    eprintln!("{msg}");
    assert!(matches!(e, nulltext::Error::NonFinite(_)), "{msg}");
    assert!(
        msg.contains("null-text optimization (step 0, iteration 0)"),
        "{msg}"
    );
}

#[test]
fn iterations_replayed_as_a_cuda_graph_match_iterations_run_as_they_are() {
    // A step's Adam iterations through the context tape, twice: as they are, and asking
    // for CUDA graphs. On a CUDA device (NULLTEXT_TEST_DEVICE=cuda) the second run
    // captures its second iteration and replays the graph from then on; elsewhere it runs
    // as the first. Either way both runs must agree.
    use nulltext::inversion::{Adam, Iterations, StepObjective};
    let sd = load_tiny();
    let g = golden("chelsea_nti.safetensors");
    let d = golden("chelsea_ddim_inversion.safetensors");
    let ddim = Ddim::new(&sd.scheduler, 50).unwrap();
    let (i, t) = (1, ddim.timesteps()[1]);
    let z = on_device(&g["nti_latents"].i(i..i + 1).unwrap());
    let target = on_device(&d["latents"].i(49 - i..50 - i).unwrap());
    let init = embeds(&on_device(&g["null_embeddings"].i(0..1).unwrap()));
    let cond = &embeds(&on_device(&g["cond"]));
    let eps_c = predict_eps(&sd, &ddim, &z, t, cond, &mut NoControl, i).unwrap();
    let graphs_here = nulltext::models::device::graphs_supported(&sd.device);
    let run = |graphs: bool| {
        let mut tape = sd.context_tape(&z, t as f64, cond).unwrap();
        assert!(tape.is_some(), "the fixture's latents take a tape");
        let objective = StepObjective {
            ddim: &ddim,
            z: &z,
            t,
            eps_c: &eps_c,
            target: &target,
            guidance: 7.5,
        };
        let mut adam = Adam::new(&init).unwrap();
        let mut iterations = Iterations::new(objective, &init, i, graphs).unwrap();
        let losses: Vec<f64> = (0..5)
            .map(|_| {
                let it = iterations
                    .next(&sd, tape.as_mut(), &mut adam, 1e-2)
                    .unwrap();
                assert!(it.finite_gradient);
                it.loss
            })
            .collect();
        assert_eq!(iterations.replays(), graphs && graphs_here);
        (losses, iterations.embeds().context)
    };
    let (plain, plain_null) = run(false);
    let (replayed, replayed_null) = run(true);
    eprintln!("losses {plain:?}, replayed {replayed:?} (graphs: {graphs_here})");
    for (a, b) in plain.iter().zip(&replayed) {
        assert!((a - b).abs() <= 1e-6 * a.abs(), "{a} vs {b}");
    }
    assert!(
        plain[4] < plain[0],
        "the iterations lower the loss: {plain:?}"
    );
    assert_close("∅ after 5 iterations", &replayed_null, &plain_null, 1e-6);
}
