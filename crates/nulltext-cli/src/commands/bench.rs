//! Per-stage timings, peak memory and tensors created, for regressions and for comparing
//! with PyTorch (`tools/bench_pytorch.py` times diffusers the same way).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::Tensor;
use clap::Args;
use nulltext::edit::EditOptions;
use nulltext::inversion::{Adam, Iterations, StepObjective};
use nulltext::models::{Ddim, NoControl, PromptEmbeds};
use nulltext::sampling::{guided_eps, predict_eps, Controller};

use super::context::{Ctx, ModelArg};

/// Stages run unless `--only` says otherwise.
const STAGES: [&str; 9] = [
    "text_encoder",
    "unet_b1",
    "unet_b2",
    "nti_iter",
    "nti_iter_graph",
    "vae_encode",
    "vae_decode",
    "edit_step",
    "unet_b2_probs",
];

/// Whole-job stages, only with `--only`: a full 50 × 10 null-text inversion, a direct
/// inversion, and one edit.
const JOBS: [&str; 3] = ["invert", "invert_direct", "edit"];

#[derive(Args)]
pub struct BenchArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Image size in pixels (default: the model's).
    #[arg(long)]
    size: Option<usize>,
    /// Timed runs per stage (after the warm-up).
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Comma-separated stages (default: all but the whole jobs): text_encoder, unet_b1,
    /// unet_b2, nti_iter (one null-text iteration as inversions run it: the context tape),
    /// nti_iter_graph (the same through candle's autograd graph), vae_encode, vae_decode,
    /// edit_step, unet_b2_probs; whole jobs:
    /// invert (a 50-step, 10-iteration null-text inversion), invert_direct (a 50-step
    /// direct inversion), edit (one target, from the last inversion).
    #[arg(long)]
    only: Option<String>,
    /// Also write the results as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Resets the kernel's peak-RSS counter of this process (Linux).
fn reset_peak() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// Peak resident set size in GiB since the last reset (Linux), else NaN.
fn peak_gib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map(|kb| kb / (1024.0 * 1024.0))
        .unwrap_or(f64::NAN)
}

/// Tensors candle has created in this process so far, read off a new tensor's id (ids count
/// up from 1): every kernel's output and every view. On GPUs each costs host-side work that
/// can bound a pass more than the kernels themselves do.
fn tensors_created() -> Option<usize> {
    let probe = Tensor::zeros((), candle_core::DType::U8, &candle_core::Device::Cpu).ok()?;
    let id = format!("{:?}", probe.id());
    id.strip_prefix("TensorId(")?
        .strip_suffix(')')?
        .parse()
        .ok()
}

fn sync(t: &Tensor) -> Result<()> {
    t.device().synchronize()?;
    Ok(())
}

/// Lets every layer hand out its probabilities (the path an attention controller takes).
struct WantAll;
impl nulltext::models::AttentionControl for WantAll {
    fn wants(&self, _: &nulltext::models::AttentionCall) -> bool {
        true
    }
    fn edit(
        &mut self,
        _: &nulltext::models::AttentionCall,
        p: Tensor,
    ) -> nulltext::models::Result<Tensor> {
        Ok(p)
    }
}
impl Controller for WantAll {}

pub fn run(a: BenchArgs, ctx: &Ctx) -> Result<()> {
    let stages: Vec<String> = match &a.only {
        Some(s) => s.split(',').map(|x| x.trim().to_string()).collect(),
        None => STAGES.iter().map(|s| s.to_string()).collect(),
    };
    for s in &stages {
        if !STAGES.contains(&s.as_str()) && !JOBS.contains(&s.as_str()) {
            bail!(
                "unknown stage `{s}` ({}, {})",
                STAGES.join(", "),
                JOBS.join(", ")
            );
        }
    }
    let sd = ctx.load(&a.model)?;
    let dev = sd.device.clone();
    let size = a.size.unwrap_or(sd.default_image_size());
    let f = sd.vae_scale_factor();
    let (h, w) = (size / f, size / f);
    let c = sd.latent_channels();
    let ddim = Ddim::new(&sd.scheduler, 50)?;
    let t = ddim.timesteps()[10];
    let z = nulltext::text2img::seeded_noise(1, (1, c, h, w), &dev)?;
    let z2 = Tensor::cat(&[&z, &z], 0)?;
    let cond = sd.encode_prompt("a close up photo of a cat")?;
    let uncond = sd.encode_negative("")?;
    let emb = PromptEmbeds::cat(&[&cond, &uncond])?;
    let image = ((nulltext::text2img::seeded_noise(2, (1, 3, size, size), &dev)? * 0.5)?
        .clamp(-1f32, 1f32))?;
    let target = nulltext::text2img::seeded_noise(3, (1, c, h, w), &dev)?;
    let eps_c = predict_eps(&sd, &ddim, &z, t, &cond, &mut NoControl, 10)?;
    let photo = {
        let px = ((&image + 1.0)? * 127.5)?
            .clamp(0f32, 255f32)?
            .to_dtype(candle_core::DType::U8)?;
        let v: Vec<u8> = px
            .squeeze(0)?
            .permute((1, 2, 0))?
            .flatten_all()?
            .to_vec1()?;
        image::RgbImage::from_raw(size as u32, size as u32, v).expect("image size")
    };
    let mut inversion: Option<nulltext::Inversion> = None;
    let mut tape = sd.context_tape(&z, t as f64, &uncond)?;
    let mut rows = Vec::new();
    ctx.say(format!(
        "nulltext bench: {} at {size}×{size} ({h}×{w} latents), {:?}, {:?}, {} threads",
        sd.name,
        sd.device,
        sd.dtype,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_default()
    ));
    ctx.say(format!(
        "{:<16} {:>10} {:>22} {:>12} {:>9}",
        "stage", "median s", "min – max s", "peak GiB", "tensors"
    ));
    for stage in &stages {
        let mut nti = None;
        let mut run_once = || -> Result<()> {
            match stage.as_str() {
                "text_encoder" => sync(&sd.encode_prompt("a close up photo of a cat")?.context)?,
                "unet_b1" => sync(&sd.predict(&z, t as f64, &cond, &mut NoControl, 0)?)?,
                "unet_b2" => sync(&sd.predict(&z2, t as f64, &emb, &mut NoControl, 0)?)?,
                "unet_b2_probs" => sync(&sd.predict(&z2, t as f64, &emb, &mut WantAll, 0)?)?,
                "nti_iter" | "nti_iter_graph" => {
                    // as the inversion's inner loop runs it: one step's iterations, through
                    // the context tape (its context-free prefix computed by the warm-up;
                    // with NULLTEXT_CUDA_GRAPHS=on the third run on replays a CUDA graph);
                    // `nti_iter_graph` through candle's graph
                    let on_tape = stage == "nti_iter";
                    let (iterations, adam) = match &mut nti {
                        Some(state) => state,
                        None => {
                            let objective = StepObjective {
                                ddim: &ddim,
                                z: &z,
                                t,
                                eps_c: &eps_c,
                                target: &target,
                                guidance: 7.5,
                            };
                            let graphs = on_tape && nulltext::models::device::graphs_requested();
                            let iterations = Iterations::new(objective, &uncond, 10, graphs)?;
                            nti.insert((iterations, Adam::new(&uncond)?))
                        }
                    };
                    let tape = if on_tape { tape.as_mut() } else { None };
                    iterations.next(&sd, tape, adam, 1e-2)?;
                    sync(&iterations.embeds().context)?
                }
                "vae_encode" => sync(&sd.image_to_latent(&image)?)?,
                "vae_decode" => sync(&sd.latent_to_image(&z)?)?,
                "invert" | "invert_direct" => {
                    let opts = nulltext::InvertOptions {
                        early_stop: -1.0,
                        method: match stage.as_str() {
                            "invert" => nulltext::Method::NullText,
                            _ => nulltext::Method::Direct,
                        },
                        ..Default::default()
                    };
                    let (inv, _) = nulltext::invert_image(
                        &sd,
                        &photo,
                        "a close up photo of a cat",
                        &opts,
                        &mut nulltext::NoProgress,
                    )?;
                    inversion = Some(inv);
                }
                "edit" => {
                    let inv = match &inversion {
                        Some(i) => i.clone(),
                        None => {
                            let opts = nulltext::InvertOptions {
                                method: nulltext::Method::Ddim,
                                ..Default::default()
                            };
                            nulltext::invert_image(
                                &sd,
                                &photo,
                                "a close up photo of a cat",
                                &opts,
                                &mut nulltext::NoProgress,
                            )?
                            .0
                        }
                    };
                    let targets = vec!["a close up photo of a dog".to_string()];
                    let r = nulltext::edit::edit(
                        &sd,
                        &inv,
                        &targets,
                        &EditOptions::default(),
                        &mut nulltext::NoProgress,
                    )?;
                    sync(&sd.latent_to_image(&r.latents)?)?
                }
                "edit_step" => {
                    let targets = vec!["a close up photo of a dog".to_string()];
                    let mut ctl = nulltext::edit::build_controller(
                        &sd,
                        "a close up photo of a cat",
                        &targets,
                        &EditOptions::default(),
                        50,
                        (h, w),
                    )?;
                    let e = guided_eps(
                        &sd,
                        &ddim,
                        &z2,
                        t,
                        &uncond.expand_rows(2)?,
                        &emb,
                        7.5,
                        &mut ctl,
                        10,
                    )?;
                    let zn = ddim.step(&e, t, &z2)?;
                    sync(&ctl.after_step(10, zn)?)?
                }
                _ => unreachable!(),
            }
            Ok(())
        };
        let whole_job = JOBS.contains(&stage.as_str());
        for _ in 0..if whole_job { 0 } else { a.warmup } {
            run_once()?;
        }
        reset_peak();
        let runs = if whole_job { 1 } else { a.repeat.max(1) };
        let mut times = Vec::new();
        let before = tensors_created();
        for _ in 0..runs {
            let s = Instant::now();
            run_once()?;
            times.push(s.elapsed().as_secs_f64());
        }
        // less the probe that reads the count after the runs
        let tensors = tensors_created()
            .zip(before)
            .map(|(after, before)| (after - before - 1) / runs);
        let shown = tensors.map_or("?".to_string(), |n| n.to_string());
        let peak = peak_gib();
        times.sort_by(|a, b| a.partial_cmp(b).unwrap());
        let med = times[times.len() / 2];
        ctx.say(format!(
            "{stage:<16} {med:>10.3} {:>10.3} – {:<9.3} {peak:>12.2} {shown:>9}",
            times[0],
            times[times.len() - 1]
        ));
        rows.push(serde_json::json!({"stage": stage, "median_s": med, "min_s": times[0], "max_s": times[times.len()-1], "peak_rss_gib": peak, "tensors": tensors}));
    }
    if let Some(p) = &a.json {
        let v = serde_json::json!({"model": sd.name, "size": size, "device": format!("{:?}", sd.device), "dtype": format!("{:?}", sd.dtype), "results": rows});
        nulltext::atomic::write_bytes_atomic(p, serde_json::to_string_pretty(&v)?.as_bytes())?;
    }
    Ok(())
}
