//! Training a small Stable-Diffusion-shaped model from scratch on the procedural shape
//! scenes of [`crate::shapes`], with nulltext's own layers (`nulltext train`).
//!
//! Two stages, as latent diffusion is trained: first the VAE (L1 + L2 reconstruction and a
//! small KL term) on fresh scenes every step, then — with the VAE frozen and its latents
//! rescaled to unit variance — the UNet and the CLIP-shaped text encoder together, on
//! ε-prediction with SD's noise schedule over the latents of a fixed pool of scenes, 10 % of
//! the captions dropped for classifier-free guidance. The model folder
//! is in the diffusers layout from the first step (random weights, PyTorch's initialization)
//! and every checkpoint rewrites it, so it loads like any Stable Diffusion at any time;
//! `train/` beside it holds what resuming needs (step, optimizer moments, losses).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use nulltext::atomic::{write_atomic, write_bytes_atomic};
use nulltext::error::{invalid, Error, Result};
use nulltext_models::clip::ClipTextTransformer;
use nulltext_models::config::{ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use nulltext_models::control::{AttentionCall, AttentionControl};
use nulltext_models::random::{write_random_model, Preset};
use nulltext_models::scheduler::alphas_cumprod;
use nulltext_models::tokenizer::ClipTokenizer;
use nulltext_models::unet::UNet2DConditionModel;
use nulltext_models::vae::AutoencoderKL;
use nulltext_models::weights::WeightStore;
use nulltext_plot::{Chart, Format, Series};
use serde::{Deserialize, Serialize};

use crate::shapes::{self, Split};

/// What to train, and how long.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    /// The model folder (diffusers layout); `train/` inside it holds the training state.
    pub out: PathBuf,
    pub vae_steps: usize,
    /// Whether a `vae_steps` above what a run past its VAE stage did reopens that stage
    /// (the UNet stage then runs again, from its current weights, on the new latents).
    pub extend_vae: bool,
    pub unet_steps: usize,
    pub vae_batch: usize,
    pub unet_batch: usize,
    pub vae_lr: f64,
    pub unet_lr: f64,
    /// Weight of the VAE's KL term against its reconstruction loss, both means over
    /// elements. Too strong a pull towards N(0, 1) leaves noisy latents (posterior σ ≈ 10 %
    /// of the latents' spread at 10⁻⁴), which the decoder learns to blur.
    pub vae_kl_weight: f64,
    /// Seeds the initial weights, the scenes and the noise.
    pub seed: u64,
    /// Steps between checkpoints (each also rewrites the loss curves).
    pub checkpoint_every: usize,
    /// Fraction of captions replaced by the empty prompt.
    pub caption_dropout: f64,
    /// Weight of the UNet stage's attention-grounding term (0: none). The term asks each
    /// caption word's cross-attention map to fall on its part of the scene — the colour and
    /// shape words on the shape, the background's words off it — so that Prompt-to-Prompt's
    /// maps (local blending, word swaps) mean what they name. See `grounding_loss`.
    pub attention_loss: f64,
    /// Scenes whose latents the UNet stage draws its batches from (the VAE is frozen then,
    /// so they are encoded once: encoding fresh scenes every step cost as much as the
    /// UNet's step itself).
    pub latent_pool: usize,
}

impl Default for TrainOptions {
    fn default() -> Self {
        Self {
            out: PathBuf::from("shapes-model"),
            vae_steps: 1500,
            extend_vae: false,
            unet_steps: 6000,
            vae_batch: 16,
            unet_batch: 64,
            vae_lr: 1e-3,
            unet_lr: 5e-4,
            vae_kl_weight: 1e-6,
            seed: 0,
            checkpoint_every: 250,
            caption_dropout: 0.1,
            latent_pool: 16384,
            attention_loss: ATTENTION_LOSS,
        }
    }
}

/// Image side of the training scenes (8×8 latents).
pub const IMAGE_SIZE: usize = 64;
/// Default weight of the attention-grounding term ([`TrainOptions::attention_loss`]).
pub const ATTENTION_LOSS: f64 = 0.05;
/// Steps of linear learning-rate warm-up at the start of each stage.
const WARMUP: usize = 100;
/// Gradients are clipped to this global norm.
const CLIP_NORM: f64 = 1.0;
const WEIGHT_DECAY: f64 = 1e-2;

/// The two training stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Phase {
    Vae,
    Unet,
    Done,
}

impl Phase {
    pub fn name(self) -> &'static str {
        match self {
            Phase::Vae => "vae",
            Phase::Unet => "unet",
            Phase::Done => "done",
        }
    }
}

/// Progress of a training run.
#[derive(Debug, Clone, PartialEq)]
pub enum TrainEvent {
    /// A stage starts (or resumes) at `step` of `total`.
    Stage {
        phase: Phase,
        step: usize,
        total: usize,
    },
    /// A step finished with this loss (the UNet's: ε-prediction MSE) and, in a UNet step
    /// with one, this attention-grounding term (unweighted).
    Step {
        phase: Phase,
        step: usize,
        loss: f64,
        grounding: Option<f64>,
    },
    /// The model folder and training state were written after `step`.
    Checkpoint { phase: Phase, step: usize },
}

/// Receives training events; may ask the run to stop (it checkpoints first).
pub trait TrainProgress {
    fn event(&mut self, event: &TrainEvent);
    fn cancelled(&self) -> bool {
        false
    }
}

impl TrainProgress for nulltext::NoProgress {
    fn event(&mut self, _: &TrainEvent) {}
}

/// What `train/state.json` records.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub phase: Phase,
    /// Steps done in `phase`.
    pub step: usize,
    pub seed: u64,
    pub vae_steps: usize,
    pub unet_steps: usize,
    pub vae_batch: usize,
    pub unet_batch: usize,
    /// Wall-clock seconds spent training, over every run.
    pub seconds: f64,
    /// `(step, loss)` of every step, per stage.
    pub vae_losses: Vec<(usize, f64)>,
    pub unet_losses: Vec<(usize, f64)>,
    /// The VAE's latent scaling factor, once measured.
    pub scaling_factor: Option<f64>,
    /// See [`TrainOptions::latent_pool`].
    #[serde(default = "default_pool")]
    pub latent_pool: usize,
    /// The VAE's KL weight from each step on where it changed: `(first step, weight)`.
    #[serde(default)]
    pub vae_kl_weights: Vec<(usize, f64)>,
    /// The UNet stage's attention-grounding weight from each step on where it changed.
    #[serde(default)]
    pub attention_loss_weights: Vec<(usize, f64)>,
    /// `(step, grounding term)` of every UNet step that had one (unweighted).
    #[serde(default)]
    pub attention_losses: Vec<(usize, f64)>,
}

fn default_pool() -> usize {
    TrainOptions::default().latent_pool
}

impl TrainState {
    fn path(out: &Path) -> PathBuf {
        out.join("train").join("state.json")
    }

    fn load(out: &Path) -> Result<Option<Self>> {
        let p = Self::path(out);
        if !p.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&p).map_err(|e| Error::Io {
            path: p.clone(),
            source: e,
        })?;
        serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| invalid(format!("{}: not a training state ({e})", p.display())))
    }

    fn save(&self, out: &Path) -> Result<()> {
        let json = serde_json::to_vec_pretty(self).map_err(|e| invalid(e.to_string()))?;
        write_bytes_atomic(&Self::path(out), &json)
    }

    /// The mean loss of the last `n` steps of a stage.
    pub fn recent_loss(&self, phase: Phase, n: usize) -> Option<f64> {
        mean_of_last(
            match phase {
                Phase::Vae => &self.vae_losses,
                _ => &self.unet_losses,
            },
            n,
        )
    }
}

/// The mean of the last `n` values of `(step, value)` pairs (`None` if there are none).
fn mean_of_last(values: &[(usize, f64)], n: usize) -> Option<f64> {
    let tail = &values[values.len().saturating_sub(n)..];
    (!tail.is_empty()).then(|| tail.iter().map(|(_, v)| v).sum::<f64>() / tail.len() as f64)
}

/// Records that `weight` applies from the step after `step` on, unless it already does.
fn record_weight(weights: &mut Vec<(usize, f64)>, step: usize, weight: f64) {
    if weights.last().map(|w| w.1) != Some(weight) {
        weights.push((step + 1, weight));
    }
}

/// The deterministic generator of noise, timesteps and caption dropout: the dataset's
/// SplitMix64, seeded per run, stream and step, so a run is reproducible from its seed and a
/// resumed run draws what it would have drawn.
struct Rng(shapes::SplitMix64);

impl Rng {
    fn new(seed: u64, stream: u64, step: usize) -> Self {
        Self(shapes::SplitMix64::new(
            seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)
                ^ (step as u64).wrapping_mul(0xBF58_476D_1CE4_E5B9),
        ))
    }

    fn next(&mut self) -> u64 {
        self.0.next_u64()
    }

    fn uniform(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    fn normal(&mut self) -> f32 {
        // Box–Muller
        let u1 = self.uniform().max(1e-300);
        let u2 = self.uniform();
        ((-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()) as f32
    }

    fn normal_tensor(&mut self, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n).map(|_| self.normal()).collect();
        Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
    }
}

/// The variables of one component, by name, and a weight store that hands them out.
struct Trainable {
    vars: Vec<(String, Var)>,
    store: WeightStore,
}

impl Trainable {
    /// Every tensor of `file` as a variable.
    fn load(file: &Path) -> Result<Self> {
        let src = WeightStore::open(&[file.to_path_buf()], &Device::Cpu, DType::F32)?;
        let mut names: Vec<String> = src.names().map(str::to_string).collect();
        names.sort();
        let mut store = WeightStore::open(&[], &Device::Cpu, DType::F32)?;
        let mut vars = Vec::with_capacity(names.len());
        for name in names {
            let v = Var::from_tensor(&src.get_any_shape(&name)?)?;
            store.insert(name.clone(), v.as_tensor().clone());
            vars.push((name, v));
        }
        Ok(Self { vars, store })
    }

    fn save(&self, file: &Path) -> Result<()> {
        save_tensors(
            file,
            self.vars
                .iter()
                .map(|(n, v)| (n.clone(), v.as_tensor().clone())),
        )
    }
}

/// Writes tensors as a safetensors file (keys sorted, so equal weights give equal bytes).
fn save_tensors(file: &Path, tensors: impl Iterator<Item = (String, Tensor)>) -> Result<()> {
    let map: BTreeMap<String, Tensor> = tensors.collect();
    let bytes = safetensors::tensor::serialize(map.iter().map(|(k, t)| (k.as_str(), t)), None)
        .map_err(|e| invalid(format!("serializing {}: {e}", file.display())))?;
    write_bytes_atomic(file, &nulltext::inversion_file::canonical_header(bytes)?)
}

/// AdamW (decoupled weight decay on matrices and kernels, none on biases, norms and
/// embeddings) with global gradient-norm clipping; its moments are saved with checkpoints.
struct AdamW {
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    t: usize,
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    fn new(vars: &[(String, Var)]) -> Result<Self> {
        let zeros = |v: &Var| v.as_tensor().zeros_like();
        Ok(Self {
            m: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            v: vars
                .iter()
                .map(|(_, v)| zeros(v))
                .collect::<candle_core::Result<_>>()?,
            t: 0,
        })
    }

    fn decays(name: &str, v: &Var) -> bool {
        v.as_tensor().rank() >= 2 && !name.contains("embedding")
    }

    /// One update; returns the gradient norm before clipping.
    fn step(&mut self, vars: &[(String, Var)], grads: &GradStore, lr: f64) -> Result<f64> {
        let mut sq = 0f64;
        for (_, v) in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
            }
        }
        let norm = sq.sqrt();
        if !norm.is_finite() {
            return Err(Error::NonFinite("the training gradients".into()));
        }
        let clip = if norm > CLIP_NORM {
            CLIP_NORM / norm
        } else {
            1.0
        };
        self.t += 1;
        let bc1 = 1.0 - Self::B1.powi(self.t as i32);
        let bc2 = 1.0 - Self::B2.powi(self.t as i32);
        for (i, (name, v)) in vars.iter().enumerate() {
            let Some(g) = grads.get(v.as_tensor()) else {
                continue;
            };
            let g = (g * clip)?;
            self.m[i] = ((&self.m[i] * Self::B1)? + (&g * (1.0 - Self::B1))?)?;
            self.v[i] = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
            let denom = ((&self.v[i] / bc2)?.sqrt()? + Self::EPS)?;
            let update = ((&self.m[i] / denom)? * (lr / bc1))?;
            let mut p = v.as_tensor().clone();
            if Self::decays(name, v) {
                p = (p * (1.0 - lr * WEIGHT_DECAY))?;
            }
            v.set(&(p - update)?)?;
        }
        Ok(norm)
    }

    fn save(&self, file: &Path, vars: &[(String, Var)]) -> Result<()> {
        let mut t: Vec<(String, Tensor)> = Vec::new();
        for (i, (name, _)) in vars.iter().enumerate() {
            t.push((format!("m.{name}"), self.m[i].clone()));
            t.push((format!("v.{name}"), self.v[i].clone()));
        }
        t.push(("t".into(), Tensor::new(&[self.t as u32], &Device::Cpu)?));
        save_tensors(file, t.into_iter())
    }

    fn load(file: &Path, vars: &[(String, Var)]) -> Result<Self> {
        let st = WeightStore::open(&[file.to_path_buf()], &Device::Cpu, DType::F32)?;
        let mut a = Self::new(vars)?;
        for (i, (name, v)) in vars.iter().enumerate() {
            a.m[i] = st.get(&format!("m.{name}"), v.as_tensor().dims())?;
            a.v[i] = st.get(&format!("v.{name}"), v.as_tensor().dims())?;
        }
        a.t = st.get_cpu("t", DType::U32)?.to_vec1::<u32>()?[0] as usize;
        Ok(a)
    }
}

/// Learning rate at `step` of `total`: linear warm-up, then cosine decay to a tenth.
fn learning_rate(base: f64, step: usize, total: usize) -> f64 {
    if step < WARMUP {
        return base * (step + 1) as f64 / WARMUP as f64;
    }
    let p = (step - WARMUP) as f64 / (total.saturating_sub(WARMUP)).max(1) as f64;
    base * (0.1 + 0.9 * 0.5 * (1.0 + (std::f64::consts::PI * p.min(1.0)).cos()))
}

fn read_config<T: serde::de::DeserializeOwned>(out: &Path, file: &str) -> Result<T> {
    Ok(nulltext_models::config::read_json(&out.join(file))?)
}

const VAE_FILE: &str = "vae/diffusion_pytorch_model.safetensors";
const UNET_FILE: &str = "unet/diffusion_pytorch_model.safetensors";
const TEXT_FILE: &str = "text_encoder/model.safetensors";

/// A batch of training scenes as `[B, 3, 64, 64]` in [−1, 1] and their captions.
fn scenes(seed: u64, start: u64, n: usize) -> Result<(Tensor, Vec<String>)> {
    let (pixels, captions) = shapes::batch(seed, start, n, IMAGE_SIZE, Split::Train);
    let x = Tensor::from_vec(pixels, (n, 3, IMAGE_SIZE, IMAGE_SIZE), &Device::Cpu)?;
    Ok((x, captions))
}

/// Runs (or resumes) training in `opts.out` until both stages are done or `progress`
/// cancels (after a checkpoint). Returns the final state.
pub fn train(opts: &TrainOptions, progress: &mut dyn TrainProgress) -> Result<TrainState> {
    let out = &opts.out;
    let mut state = match TrainState::load(out)? {
        Some(s) => {
            if s.seed != opts.seed {
                return Err(invalid(format!(
                    "{} holds a run with seed {}, not {}; use another folder or the same seed",
                    out.display(),
                    s.seed,
                    opts.seed
                )));
            }
            // More VAE steps than a run past its VAE stage has done reopen that stage where it
            // ended; the latents then change, so the UNet stage starts again afterwards, from
            // the UNet's current weights (its losses so far are dropped, being of other latents).
            let reopen_vae =
                opts.extend_vae && s.phase != Phase::Vae && opts.vae_steps > s.vae_steps;
            // otherwise a finished stage stays finished; the UNet stage can be extended
            let (phase, step) = match s.phase {
                _ if reopen_vae => (Phase::Vae, s.vae_steps),
                Phase::Done if opts.unet_steps > s.step => (Phase::Unet, s.step),
                p => (p, s.step),
            };
            let (unet_losses, attention_losses, attention_loss_weights) = if reopen_vae {
                (Vec::new(), Vec::new(), Vec::new())
            } else {
                (
                    s.unet_losses.clone(),
                    s.attention_losses.clone(),
                    s.attention_loss_weights.clone(),
                )
            };
            // batch sizes and the latent pool can change until their stage has run a step
            let (vae_started, unet_started) = (!s.vae_losses.is_empty(), !unet_losses.is_empty());
            TrainState {
                phase,
                step,
                vae_steps: if phase == Phase::Vae {
                    opts.vae_steps.max(step)
                } else {
                    s.vae_steps
                },
                unet_steps: opts.unet_steps,
                vae_batch: if vae_started {
                    s.vae_batch
                } else {
                    opts.vae_batch
                },
                unet_batch: if unet_started {
                    s.unet_batch
                } else {
                    opts.unet_batch
                },
                latent_pool: if unet_started {
                    s.latent_pool
                } else {
                    opts.latent_pool
                },
                scaling_factor: if reopen_vae { None } else { s.scaling_factor },
                unet_losses,
                attention_losses,
                attention_loss_weights,
                ..s
            }
        }
        None => {
            if out.join("model_index.json").exists() {
                return Err(invalid(format!(
                    "{} already holds a model without a training state; nothing was changed",
                    out.display()
                )));
            }
            write_random_model(out, &Preset::Shapes.configs(), opts.seed, false)?;
            zero_unused_token_rows(out)?;
            let s = TrainState {
                phase: Phase::Vae,
                step: 0,
                seed: opts.seed,
                vae_steps: opts.vae_steps,
                unet_steps: opts.unet_steps,
                vae_batch: opts.vae_batch,
                unet_batch: opts.unet_batch,
                seconds: 0.0,
                vae_losses: Vec::new(),
                unet_losses: Vec::new(),
                scaling_factor: None,
                latent_pool: opts.latent_pool,
                vae_kl_weights: Vec::new(),
                attention_loss_weights: Vec::new(),
                attention_losses: Vec::new(),
            };
            s.save(out)?;
            s
        }
    };
    if state.phase == Phase::Vae {
        if !train_vae(opts, &mut state, progress)? {
            return Ok(state);
        }
        measure_scaling(out, &mut state)?;
        state.phase = Phase::Unet;
        state.step = 0;
        state.save(out)?;
    }
    if state.phase == Phase::Unet {
        if !train_unet(opts, &mut state, progress)? {
            return Ok(state);
        }
        state.phase = Phase::Done;
        state.save(out)?;
        write_loss_charts(out, &state)?;
        write_examples(out)?;
        write_model_card(out, &state)?;
    } else if state.phase == Phase::Done {
        // nothing left to train: the curves are drawn again (cheap, and current with the
        // plotting code)
        write_loss_charts(out, &state)?;
    }
    Ok(state)
}

/// Example scenes to invert and edit, in `examples/`: the demo's red circle, and one scene
/// of every held-out colour combination's first shape; each with `<name>.region.png`, the
/// region a colour edit may change (the shape and 3 pixels around it), for background
/// metrics (`eval --mask`, `invert --trace-mask`).
pub fn write_examples(out: &Path) -> Result<()> {
    let dir = out.join("examples");
    let centred = shapes::Scene::centred;
    use shapes::{Colour, Shape};
    let mut scenes = vec![
        centred(Shape::Circle, Colour::Red, Colour::Blue),
        centred(Shape::Square, Colour::Yellow, Colour::Black),
        centred(Shape::Triangle, Colour::White, Colour::Purple),
        centred(Shape::Star, Colour::Purple, Colour::Yellow),
    ];
    scenes.extend(
        shapes::held_out_combos()
            .into_iter()
            .take(4)
            .map(|(s, c, b)| centred(s, c, b)),
    );
    for scene in scenes {
        let name = format!(
            "{}-{}-on-{}",
            scene.colour.name(),
            scene.shape.name(),
            scene.background.name()
        );
        nulltext::image_io::save_png(&scene.render(IMAGE_SIZE), &dir.join(format!("{name}.png")))?;
        let region = scene.region_image(IMAGE_SIZE, 3.0);
        nulltext::image_io::save_png(&region, &dir.join(format!("{name}.region.png")))?;
    }
    Ok(())
}

/// `README.md` of the model folder: how it was trained, on what, and what it cannot do.
fn write_model_card(out: &Path, state: &TrainState) -> Result<()> {
    let loss = |p| {
        state
            .recent_loss(p, 100)
            .map_or("-".to_string(), |l| format!("{l:.4}"))
    };
    let held: Vec<String> = shapes::held_out_combos()
        .iter()
        .map(|(s, c, b)| format!("{} {} on {}", c.name(), s.name(), b.name()))
        .collect();
    let card = format!(
        "# shapes: a small Stable Diffusion trained by nulltext\n\n\
A text-to-image latent diffusion model in the Stable Diffusion 1.x architecture and diffusers \
layout (CLIP-shaped text encoder over the real CLIP tokenizer, UNet2DConditionModel, \
AutoencoderKL with 8× downsampling and 4 latent channels, DDIM scheduler config), trained from \
scratch by `nulltext train` so that the demo and the end-to-end tests edit pictures whose \
content can be checked.\n\n\
## Data\n\n\
64×64 scenes generated on the fly (`nulltext_train::shapes`): one circle, square, triangle or \
5-pointed star in one of seven flat colours (red, green, blue, yellow, white, black, purple) \
on a background of another of them, 35–65 % of the image wide, rotated up to ±15°, placed \
anywhere; captioned `a <colour> <shape> on a <background> background`. Sixteen of the 168 \
colour combinations never appear in training (held out): {held}.\n\n\
## Training\n\n\
Command: `nulltext train --out models/shapes --seed {seed} --vae-steps {vs} --unet-steps {us} \
--vae-batch {vb} --unet-batch {ub}` on a 2-core CPU, {minutes:.0} minutes in all.\n\n\
1. VAE ({vs} steps of {vb} scenes, AdamW, learning rate 1e-3 with warm-up and cosine decay): \
L1 + L2 reconstruction + KL × {kl}. Final loss (mean of the last 100 steps): {vl}. The latent \
scaling factor, 1/σ of the latents of 512 scenes, is {scale:.5}.\n\
2. UNet and text encoder together ({us} steps of {ub} scenes drawn from the latents of a pool \
of {pool} scenes, AdamW 5e-4, warm-up and cosine decay, gradients clipped to norm 1), VAE \
frozen: ε-prediction MSE with SD's scaled-linear \
noise schedule (β 0.00085–0.012, 1000 steps); 10 % of the captions replaced by the empty \
prompt for classifier-free guidance. Final loss: {ul}.{grounding}\n\n\
Loss curves: `train/loss-vae.png`, `train/loss-unet.png`{grounding_chart} in the training \
folder (not shipped); every step's loss is in `train/loss.csv` there.\n\n\
## Limits\n\n\
It knows seven colours, four shapes and the caption template above, at 64×64 only; any other \
word has a zero embedding. Edges are soft and shapes not always crisp; it is a test and demo \
model, not an image generator. Random seeds give the scene's layout, the caption its content.\n",
        held = held.join(", "),
        kl = steps_and_weights(&state.vae_kl_weights),
        seed = state.seed,
        vs = state.vae_steps,
        us = state.unet_steps,
        vb = state.vae_batch,
        ub = state.unet_batch,
        minutes = state.seconds / 60.0,
        vl = loss(Phase::Vae),
        ul = loss(Phase::Unet),
        scale = state.scaling_factor.unwrap_or(f64::NAN),
        pool = state.latent_pool,
        grounding = grounding_sentence(state),
        grounding_chart = if state.attention_losses.is_empty() {
            ""
        } else {
            ", `train/loss-grounding.png`"
        },
    );
    write_bytes_atomic(&out.join("README.md"), card.as_bytes())
}

/// The model card's words on the attention-grounding term, if the UNet stage had one.
fn grounding_sentence(state: &TrainState) -> String {
    let w = &state.attention_loss_weights;
    if w.iter().all(|(_, weight)| *weight == 0.0) {
        return String::new();
    }
    let weights = steps_and_weights(w);
    let mean = mean_of_last(&state.attention_losses, 100).unwrap_or(0.0);
    format!(
        " Plus an attention-grounding term (TokenCompose's token loss) × {weights}: in the \
cross-attention layers at 8×8 and 4×4, the share of each caption word's map (mean over heads) \
that lies on its part of the scene — the shape for the colour and shape words, the rest for \
the background's colour and \"background\" — enters as (1 − share)², averaged; it makes the \
words' maps, which Prompt-to-Prompt blends and swaps with, fall where the words are. Its \
final value: {mean:.3}."
    )
}

/// `(first step, weight)` pairs in words: `1e-6`, or `1e-4 (steps 1–1100), then 1e-6 (from
/// step 1101)`.
fn steps_and_weights(w: &[(usize, f64)]) -> String {
    let weight = |x: f64| {
        if x == 0.0 {
            "0".to_string()
        } else {
            format!("{x:e}")
        }
    };
    match w.len() {
        0 => "-".into(),
        1 => weight(w[0].1),
        _ => w
            .iter()
            .enumerate()
            .map(|(i, (from, x))| match w.get(i + 1) {
                Some((next, _)) => format!("{} (steps {from}–{})", weight(*x), next - 1),
                None => format!("{} (from step {from})", weight(*x)),
            })
            .collect::<Vec<_>>()
            .join(", then "),
    }
}

/// Only the tokens of the scene captions are ever trained; the other rows of the token
/// embedding start (and stay) at zero, so the 49,408-row table compresses to almost nothing.
fn zero_unused_token_rows(out: &Path) -> Result<()> {
    let file = out.join(TEXT_FILE);
    let tok = ClipTokenizer::from_dir(&out.join("tokenizer"))?;
    let mut used = std::collections::BTreeSet::from([tok.bos(), tok.eos(), tok.pad()]);
    for shape in shapes::Shape::ALL {
        for colour in shapes::Colour::ALL {
            for background in shapes::Colour::ALL {
                let caption = shapes::Scene::centred(shape, colour, background).caption();
                used.extend(tok.encode_content(&caption));
            }
        }
    }
    let st = WeightStore::open(std::slice::from_ref(&file), &Device::Cpu, DType::F32)?;
    let key = "text_model.embeddings.token_embedding.weight";
    let mut tensors: Vec<(String, Tensor)> = Vec::new();
    for name in st.names() {
        let t = st.get_any_shape(name)?;
        let t = if name == key {
            let (rows, dim) = t.dims2()?;
            let mask: Vec<f32> = (0..rows as u32)
                .map(|r| if used.contains(&r) { 1.0 } else { 0.0 })
                .collect();
            t.broadcast_mul(&Tensor::from_vec(mask, (rows, 1), &Device::Cpu)?)?
                .reshape((rows, dim))?
        } else {
            t
        };
        tensors.push((name.to_string(), t));
    }
    drop(st);
    save_tensors(&file, tensors.into_iter())
}

/// Ends a step of `phase` with loss `value`: records and reports it, and checkpoints —
/// `save` (the weights and the optimizer), the state and the loss curves — every
/// `checkpoint_every` steps, at the last step, and when `progress` cancels. `false` when
/// cancelled (after the checkpoint).
#[allow(clippy::too_many_arguments)]
fn end_step(
    phase: Phase,
    value: f64,
    grounding: Option<f64>,
    total: usize,
    opts: &TrainOptions,
    state: &mut TrainState,
    clock: &mut Instant,
    progress: &mut dyn TrainProgress,
    save: impl FnOnce() -> Result<()>,
) -> Result<bool> {
    state.step += 1;
    let losses = match phase {
        Phase::Vae => &mut state.vae_losses,
        _ => &mut state.unet_losses,
    };
    losses.push((state.step, value));
    if let Some(g) = grounding {
        state.attention_losses.push((state.step, g));
    }
    progress.event(&TrainEvent::Step {
        phase,
        step: state.step,
        loss: value,
        grounding,
    });
    let cancel = progress.cancelled();
    let every = opts.checkpoint_every;
    let due = state.step == total || (every > 0 && state.step.is_multiple_of(every));
    if cancel || due {
        state.seconds += clock.elapsed().as_secs_f64();
        *clock = Instant::now();
        save()?;
        state.save(&opts.out)?;
        write_loss_charts(&opts.out, state)?;
        progress.event(&TrainEvent::Checkpoint {
            phase,
            step: state.step,
        });
    }
    Ok(!cancel)
}

/// The VAE stage; `false` when cancelled (after checkpointing).
fn train_vae(
    opts: &TrainOptions,
    state: &mut TrainState,
    progress: &mut dyn TrainProgress,
) -> Result<bool> {
    let out = &opts.out;
    let config: VaeConfig = read_config(out, "vae/config.json")?;
    let weights = Trainable::load(&out.join(VAE_FILE))?;
    let vae = AutoencoderKL::load(&weights.store.root(), &config)?;
    let adam_file = out.join("train/adam-vae.safetensors");
    let mut adam = if state.step > 0 && adam_file.exists() {
        AdamW::load(&adam_file, &weights.vars)?
    } else {
        AdamW::new(&weights.vars)?
    };
    let total = state.vae_steps;
    let batch = state.vae_batch;
    record_weight(&mut state.vae_kl_weights, state.step, opts.vae_kl_weight);
    progress.event(&TrainEvent::Stage {
        phase: Phase::Vae,
        step: state.step,
        total,
    });
    let mut clock = Instant::now();
    while state.step < total {
        let step = state.step;
        let (x, _) = scenes(opts.seed, (step * batch) as u64, batch)?;
        let mut rng = Rng::new(opts.seed, 1, step);
        let d = vae.encode(&x)?;
        let std = (&d.logvar * 0.5)?.exp()?;
        let z = (&d.mean + (std * rng.normal_tensor(d.mean.dims())?)?)?;
        let recon = vae.decode(&z)?;
        let diff = (recon - &x)?;
        let rec = (diff.abs()?.mean_all()? + diff.sqr()?.mean_all()?)?;
        let kl = (((d.mean.sqr()? + d.logvar.exp()?)? - 1.0)? - &d.logvar)?.mean_all()?;
        let loss = (rec + (kl * (0.5 * opts.vae_kl_weight))?)?;
        let value = loss.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(Error::NonFinite(format!("the VAE loss at step {step}")));
        }
        let grads = loss.backward()?;
        adam.step(
            &weights.vars,
            &grads,
            learning_rate(opts.vae_lr, step, total),
        )?;
        let save = || -> Result<()> {
            weights.save(&out.join(VAE_FILE))?;
            adam.save(&adam_file, &weights.vars)
        };
        if !end_step(
            Phase::Vae,
            value,
            None,
            total,
            opts,
            state,
            &mut clock,
            progress,
            save,
        )? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Sets the VAE's `scaling_factor` to 1/σ of the latents of 512 training scenes, as SD's
/// 0.18215 was measured, so the diffusion model sees unit-variance latents.
fn measure_scaling(out: &Path, state: &mut TrainState) -> Result<()> {
    let config: VaeConfig = read_config(out, "vae/config.json")?;
    let store = WeightStore::open(&[out.join(VAE_FILE)], &Device::Cpu, DType::F32)?;
    let vae = AutoencoderKL::load(&store.root(), &config)?;
    let mut values = Vec::new();
    for i in 0..8u64 {
        let (x, _) = scenes(state.seed ^ 0x5CA1E, i * 64, 64)?;
        values.extend(vae.encode(&x)?.mean.flatten_all()?.to_vec1::<f32>()?);
    }
    let n = values.len() as f64;
    let mean = values.iter().map(|v| *v as f64).sum::<f64>() / n;
    let var = values
        .iter()
        .map(|v| (*v as f64 - mean).powi(2))
        .sum::<f64>()
        / n;
    let scale = 1.0 / var.sqrt().max(1e-6);
    let path = out.join("vae/config.json");
    let mut json: serde_json::Value = read_config(out, "vae/config.json")?;
    json["scaling_factor"] = serde_json::json!(scale);
    write_atomic(&path, |w| {
        serde_json::to_writer_pretty(&mut *w, &json).map_err(|e| invalid(e.to_string()))?;
        w.write_all(b"\n").map_err(|e| Error::Io {
            path: path.clone(),
            source: e,
        })
    })?;
    state.scaling_factor = Some(scale);
    Ok(())
}

/// The UNet + text encoder stage; `false` when cancelled (after checkpointing).
fn train_unet(
    opts: &TrainOptions,
    state: &mut TrainState,
    progress: &mut dyn TrainProgress,
) -> Result<bool> {
    let out = &opts.out;
    let vae_config: VaeConfig = read_config(out, "vae/config.json")?;
    let vae_store = WeightStore::open(&[out.join(VAE_FILE)], &Device::Cpu, DType::F32)?;
    let vae = AutoencoderKL::load(&vae_store.root(), &vae_config)?;
    let scaling = vae_config.scaling_factor;
    let unet_config: UNetConfig = read_config(out, "unet/config.json")?;
    let text_config: ClipTextConfig = read_config(out, "text_encoder/config.json")?;
    let scheduler = SchedulerConfig::from_file(&out.join("scheduler/scheduler_config.json"))?;
    let tokenizer = ClipTokenizer::from_dir(&out.join("tokenizer"))?;
    let unet_w = Trainable::load(&out.join(UNET_FILE))?;
    let text_w = Trainable::load(&out.join(TEXT_FILE))?;
    let unet = UNet2DConditionModel::load(&unet_w.store.root(), &unet_config)?;
    let text = ClipTextTransformer::load(&text_w.store.root(), &text_config)?;
    let vars: Vec<(String, Var)> = unet_w
        .vars
        .iter()
        .map(|(n, v)| (format!("unet.{n}"), v.clone()))
        .chain(
            text_w
                .vars
                .iter()
                .map(|(n, v)| (format!("text_encoder.{n}"), v.clone())),
        )
        .collect();
    let adam_file = out.join("train/adam-unet.safetensors");
    let mut adam = if state.step > 0 && adam_file.exists() {
        AdamW::load(&adam_file, &vars)?
    } else {
        AdamW::new(&vars)?
    };
    let alphas = alphas_cumprod(&scheduler)?;
    let total = state.unet_steps;
    let batch = state.unet_batch;
    let pool_size = state.latent_pool.max(1);
    let mut pool = Vec::new();
    let mut captions = Vec::with_capacity(pool_size);
    for start in (0..pool_size).step_by(64) {
        if progress.cancelled() {
            return Ok(false);
        }
        let n = 64.min(pool_size - start);
        let (x, c) = scenes(opts.seed ^ 0xD1FF, start as u64, n)?;
        pool.push((vae.encode(&x)?.mean * scaling)?);
        captions.extend(c);
    }
    let pool = Tensor::cat(&pool, 0)?;
    let grounded = opts.attention_loss > 0.0;
    let side = IMAGE_SIZE / 8;
    let masks = if grounded {
        Some(latent_masks(opts.seed ^ 0xD1FF, pool_size, side)?)
    } else {
        None
    };
    if state.attention_loss_weights.is_empty() && state.step > 0 {
        // a run from before the term existed trained without it
        state.attention_loss_weights.push((1, 0.0));
    }
    record_weight(
        &mut state.attention_loss_weights,
        state.step,
        opts.attention_loss,
    );
    progress.event(&TrainEvent::Stage {
        phase: Phase::Unet,
        step: state.step,
        total,
    });
    let mut clock = Instant::now();
    while state.step < total {
        let step = state.step;
        let mut rng = Rng::new(opts.seed, 2, step);
        let picks: Vec<u32> = (0..batch)
            .map(|_| (rng.next() % pool_size as u64) as u32)
            .collect();
        let picked = Tensor::new(picks.as_slice(), &Device::Cpu)?;
        let z0 = pool.index_select(&picked, 0)?;
        let prompts: Vec<&str> = picks
            .iter()
            .map(|&i| &captions[i as usize])
            .map(|c| {
                if rng.uniform() < opts.caption_dropout {
                    ""
                } else {
                    c.as_str()
                }
            })
            .collect();
        let ids: Vec<u32> = prompts
            .iter()
            .flat_map(|p| tokenizer.encode_padded(p).ids)
            .collect();
        let ids = Tensor::from_vec(
            ids,
            (batch, nulltext_models::tokenizer::MAX_LEN),
            &Device::Cpu,
        )?;
        let context = text.forward(&ids)?;
        let t: Vec<usize> = (0..batch)
            .map(|_| (rng.next() % alphas.len() as u64) as usize)
            .collect();
        let a: Vec<f32> = t.iter().map(|&t| alphas[t].sqrt()).collect();
        let s: Vec<f32> = t.iter().map(|&t| (1.0 - alphas[t]).sqrt()).collect();
        let a = Tensor::from_vec(a, (batch, 1, 1, 1), &Device::Cpu)?;
        let s = Tensor::from_vec(s, (batch, 1, 1, 1), &Device::Cpu)?;
        let noise = rng.normal_tensor(z0.dims())?;
        let zt = (z0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?;
        let ts: Vec<f64> = t.iter().map(|&t| t as f64).collect();
        // the layers at the latent's grid and half of it (8×8 and 4×4 at 64 px)
        let mut probe = CrossAttentionProbe {
            pixels: if grounded {
                vec![side * side, (side / 2) * (side / 2)]
            } else {
                Vec::new()
            },
            maps: Vec::new(),
        };
        let eps = unet.forward_timesteps_controlled(&zt, &ts, &context, &mut probe)?;
        let mse = (eps - &noise)?.sqr()?.mean_all()?;
        let value = mse.to_scalar::<f32>()? as f64;
        if !value.is_finite() {
            return Err(Error::NonFinite(format!("the UNet loss at step {step}")));
        }
        let roles = match &masks {
            Some(masks) => grounding_roles(&tokenizer, &prompts)?.map(|r| (masks, r)),
            None => None,
        };
        let (loss, grounding) = match roles {
            Some((masks, (object, background))) => {
                let mask = masks.index_select(&picked, 0)?;
                let g = grounding_loss(&probe.maps, &mask, &object, &background)?;
                let gv = g.to_scalar::<f32>()? as f64;
                if !gv.is_finite() {
                    return Err(Error::NonFinite(format!(
                        "the attention-grounding term at step {step}"
                    )));
                }
                ((mse + (g * opts.attention_loss)?)?, Some(gv))
            }
            _ => (mse, None),
        };
        let grads = loss.backward()?;
        adam.step(&vars, &grads, learning_rate(opts.unet_lr, step, total))?;
        let save = || -> Result<()> {
            unet_w.save(&out.join(UNET_FILE))?;
            text_w.save(&out.join(TEXT_FILE))?;
            adam.save(&adam_file, &vars)
        };
        if !end_step(
            Phase::Unet,
            value,
            grounding,
            total,
            opts,
            state,
            &mut clock,
            progress,
            save,
        )? {
            return Ok(false);
        }
    }
    Ok(true)
}

/// Row-major `[n, 1, side, side]` fractions of each latent cell covered by the shape, for
/// the first `n` scenes of the training split under `seed`.
fn latent_masks(seed: u64, n: usize, side: usize) -> Result<Tensor> {
    let out: Vec<f32> = (0..n as u64)
        .flat_map(|i| shapes::sample(seed, i, Split::Train).coverage(IMAGE_SIZE, side))
        .collect();
    Ok(Tensor::from_vec(out, (n, 1, side, side), &Device::Cpu)?)
}

/// Keeps the cross-attention probabilities of the layers with these query pixel counts,
/// with their graph, for [`grounding_loss`].
struct CrossAttentionProbe {
    pixels: Vec<usize>,
    maps: Vec<Tensor>,
}

impl AttentionControl for CrossAttentionProbe {
    fn wants(&self, call: &AttentionCall) -> bool {
        call.site.is_cross() && self.pixels.contains(&call.pixels())
    }

    fn edit(&mut self, _: &AttentionCall, probs: Tensor) -> nulltext_models::error::Result<Tensor> {
        self.maps.push(probs.clone());
        Ok(probs)
    }
}

/// Which tokens of each caption the grounding term pulls onto the shape (`object`: the
/// colour and shape words) and off it (`background`: the background's colour and the word
/// "background"), as `[B, 77]` indicators; `None` when no caption has any (all dropped).
fn grounding_roles(
    tokenizer: &ClipTokenizer,
    prompts: &[&str],
) -> Result<Option<(Tensor, Tensor)>> {
    let len = nulltext_models::tokenizer::MAX_LEN;
    let mut object = vec![0f32; prompts.len() * len];
    let mut background = vec![0f32; prompts.len() * len];
    let mut any = false;
    for (b, prompt) in prompts.iter().enumerate() {
        if prompt.is_empty() {
            continue;
        }
        // `a <colour> <shape> on a <background> background`
        let words = tokenizer.word_token_positions(prompt);
        if words.len() != 7 {
            return Err(invalid(format!("not a scene caption: {prompt:?}")));
        }
        for (w, positions) in words.iter().enumerate() {
            let role = match w {
                1 | 2 => &mut object,
                5 | 6 => &mut background,
                _ => continue,
            };
            for &p in positions.iter().filter(|&&p| p < len) {
                role[b * len + p] = 1.0;
                any = true;
            }
        }
    }
    if !any {
        return Ok(None);
    }
    let shape = (prompts.len(), len);
    Ok(Some((
        Tensor::from_vec(object, shape, &Device::Cpu)?,
        Tensor::from_vec(background, shape, &Device::Cpu)?,
    )))
}

/// The attention-grounding term (the token loss of TokenCompose, Wang et al., CVPR 2024):
/// for every grounded token and probed cross-attention layer, the share of the token's map
/// — its probabilities averaged over heads, over the layer's query pixels — that falls in
/// its region (the shape for `object` tokens, the rest for `background` ones); the mean of
/// (1 − share)² over those tokens and layers. `maps`: `[B, heads, P, 77]` each; `mask`:
/// `[B, 1, s, s]` shape coverage at the latent's grid.
fn grounding_loss(
    maps: &[Tensor],
    mask: &Tensor,
    object: &Tensor,
    background: &Tensor,
) -> Result<Tensor> {
    let (b, _, side, _) = mask.dims4()?;
    let tokens = (object + background)?;
    let count = tokens.sum_all()?.to_scalar::<f32>()? as f64;
    let mut total = Tensor::zeros((), DType::F32, &Device::Cpu)?;
    for map in maps {
        let (_, _, pixels, _) = map.dims4()?;
        let grid = (pixels as f64).sqrt().round() as usize;
        let m = if grid < side {
            mask.avg_pool2d(side / grid)?
        } else {
            mask.clone()
        };
        let m = m.reshape((b, 1, pixels))?;
        let region = (object.unsqueeze(2)?.broadcast_mul(&m)?
            + background.unsqueeze(2)?.broadcast_mul(&(1.0 - &m)?)?)?;
        // [B, 77, P]: each token's map over the pixels
        let a = map.mean(1)?.transpose(1, 2)?;
        let inside = ((&a * &region)?.sum(2)? / (a.sum(2)? + 1e-12)?)?;
        let miss = (1.0 - inside)?.sqr()?;
        total = (total + ((miss * &tokens)?.sum_all()? / count)?)?;
    }
    Ok((total / maps.len().max(1) as f64)?)
}

/// `train/loss.csv` (every step) and `train/loss-{vae,unet,grounding}.png` (running means of
/// 50 steps; the grounding chart once the UNet stage has that term).
fn write_loss_charts(out: &Path, state: &TrainState) -> Result<()> {
    let csv_path = out.join("train/loss.csv");
    let mut csv = String::from("stage,step,loss\n");
    for (phase, losses) in [
        ("vae", &state.vae_losses),
        ("unet", &state.unet_losses),
        ("grounding", &state.attention_losses),
    ] {
        for (s, l) in losses {
            csv.push_str(&format!("{phase},{s},{l:.6}\n"));
        }
    }
    write_bytes_atomic(&csv_path, csv.as_bytes())?;
    for (phase, losses, title) in [
        ("vae", &state.vae_losses, "VAE: L1 + L2 reconstruction + KL"),
        (
            "unet",
            &state.unet_losses,
            "UNet + text encoder: eps-prediction MSE",
        ),
        (
            "grounding",
            &state.attention_losses,
            "UNet + text encoder: attention-grounding term (unweighted)",
        ),
    ] {
        let file = out.join(format!("train/loss-{phase}.png"));
        if losses.is_empty() {
            // (a reopened VAE stage drops the UNet stage's curves)
            if file.exists() {
                std::fs::remove_file(&file).map_err(|source| Error::Io {
                    path: file.clone(),
                    source,
                })?;
            }
            continue;
        }
        let chart = loss_curve(title, phase, losses, 50);
        write_bytes_atomic(&file, &chart.render(Format::from_path(&file)?)?)?;
    }
    Ok(())
}

/// A training loss curve: the running mean of the last `window` losses at each step.
pub fn loss_curve(title: &str, label: &str, losses: &[(usize, f64)], window: usize) -> Chart {
    let window = window.max(1);
    let mut sum = 0.0;
    let points = losses
        .iter()
        .enumerate()
        .map(|(i, &(step, loss))| {
            sum += loss;
            if i >= window {
                sum -= losses[i - window].1;
            }
            (step as f64, sum / (i + 1).min(window) as f64)
        })
        .collect();
    Chart::new(title, "step", format!("loss (running mean of {window})"))
        .size(640, 400)
        .series(Series::line(label, points))
}

/// Copies the trained model in `out` to `dest` with half-precision weights
/// (`*.fp16.safetensors`, which every loader of the diffusers layout reads): configs,
/// tokenizer, scheduler, model card and examples, without the training state. Half the size,
/// for shipping; nulltext computes in f32 either way.
pub fn export_fp16(out: &Path, dest: &Path) -> Result<()> {
    let io = |p: &Path| {
        let p = p.to_path_buf();
        move |e| Error::Io { path: p, source: e }
    };
    for file in [
        "model_index.json",
        "README.md",
        "scheduler/scheduler_config.json",
        "unet/config.json",
        "vae/config.json",
        "text_encoder/config.json",
        "tokenizer/vocab.json",
        "tokenizer/merges.txt",
        "tokenizer/special_tokens_map.json",
        "tokenizer/tokenizer_config.json",
    ] {
        let bytes = std::fs::read(out.join(file)).map_err(io(&out.join(file)))?;
        write_bytes_atomic(&dest.join(file), &bytes)?;
    }
    let examples = out.join("examples");
    if examples.is_dir() {
        for entry in std::fs::read_dir(&examples).map_err(io(&examples))? {
            let path = entry.map_err(io(&examples))?.path();
            let bytes = std::fs::read(&path).map_err(io(&path))?;
            let name = path.file_name().unwrap_or_default();
            write_bytes_atomic(&dest.join("examples").join(name), &bytes)?;
        }
    }
    for file in [VAE_FILE, UNET_FILE, TEXT_FILE] {
        let st = WeightStore::open(&[out.join(file)], &Device::Cpu, DType::F32)?;
        let mut tensors = Vec::new();
        for name in st.names() {
            tensors.push((
                name.to_string(),
                st.get_any_shape(name)?.to_dtype(DType::F16)?,
            ));
        }
        let target = dest.join(file.replace(".safetensors", ".fp16.safetensors"));
        save_tensors(&target, tensors.into_iter())?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEN: usize = nulltext_models::tokenizer::MAX_LEN;

    /// `[1, heads, pixels, 77]` probabilities: token `t` of every pixel gets `at(t, pixel)`,
    /// the rest of each row spread over the other tokens.
    fn map(heads: usize, pixels: usize, at: impl Fn(usize, usize) -> f32) -> Tensor {
        let mut v = Vec::new();
        for _ in 0..heads {
            for p in 0..pixels {
                let row: Vec<f32> = (0..LEN).map(|t| at(t, p)).collect();
                let rest = (1.0 - row.iter().sum::<f32>()) / LEN as f32;
                v.extend(row.iter().map(|x| x + rest));
            }
        }
        Tensor::from_vec(v, (1, heads, pixels, LEN), &Device::Cpu).unwrap()
    }

    fn indicator(positions: &[usize]) -> Tensor {
        let v: Vec<f32> = (0..LEN)
            .map(|t| f32::from(u8::from(positions.contains(&t))))
            .collect();
        Tensor::from_vec(v, (1, LEN), &Device::Cpu).unwrap()
    }

    #[test]
    fn grounding_loss_is_the_squared_share_outside_the_region() {
        // 2×2 latent, the shape covering the top-left cell fully and the top-right by half
        let mask = Tensor::new(&[[[[1f32, 0.5], [0.0, 0.0]]]], &Device::Cpu).unwrap();
        let (object, background) = (indicator(&[3]), indicator(&[7]));
        let loss = |m: &Tensor| -> f32 {
            grounding_loss(std::slice::from_ref(m), &mask, &object, &background)
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        // token 3 only on the shape's cell, token 7 only on the two bottom cells: no miss
        let exact = map(2, 4, |t, p| match (t, p) {
            (3, 0) | (7, 2) | (7, 3) => 0.5,
            _ => 0.0,
        });
        assert!(loss(&exact) < 1e-3, "{}", loss(&exact));
        // both maps uniform: the object's share inside is the shape's area (1.5 of 4 cells),
        // the background's the rest; loss = mean of (1 − share)²
        let uniform = map(2, 4, |_, _| 0.0);
        let want = ((1.0f32 - 1.5 / 4.0).powi(2) + (1.0f32 - 2.5 / 4.0).powi(2)) / 2.0;
        assert!(
            (loss(&uniform) - want).abs() < 1e-5,
            "{} vs {want}",
            loss(&uniform)
        );
        // swapped regions: the worst case
        let swapped = map(2, 4, |t, p| match (t, p) {
            (7, 0) | (3, 2) | (3, 3) => 0.5,
            _ => 0.0,
        });
        assert!(loss(&swapped) > 0.9, "{}", loss(&swapped));
        // a coarser layer (1×1) sees the mask averaged: the share is the mean coverage
        let coarse = map(1, 1, |_, _| 0.0);
        assert!((loss(&coarse) - want).abs() < 1e-5);
    }

    #[test]
    fn grounding_roles_name_the_scene_words() {
        let tok = ClipTokenizer::bundled();
        let (object, background) =
            grounding_roles(&tok, &["a red circle on a blue background", ""])
                .unwrap()
                .unwrap();
        let ones = |t: &Tensor, row: usize| -> Vec<usize> {
            let v = t.get(row).unwrap().to_vec1::<f32>().unwrap();
            (0..LEN).filter(|&i| v[i] == 1.0).collect()
        };
        // 0 is the start token: a(1) red(2) circle(3) on(4) a(5) blue(6) background(7)
        assert_eq!(ones(&object, 0), vec![2, 3]);
        assert_eq!(ones(&background, 0), vec![6, 7]);
        // a dropped caption grounds nothing; all dropped: no term at all
        assert!(ones(&object, 1).is_empty() && ones(&background, 1).is_empty());
        assert!(grounding_roles(&tok, &["", ""]).unwrap().is_none());
        assert!(grounding_roles(&tok, &["a cat"]).is_err());
    }

    #[test]
    fn latent_masks_cover_the_shape() {
        let seed = 7;
        let m = latent_masks(seed, 3, 8).unwrap();
        assert_eq!(m.dims(), &[3, 1, 8, 8]);
        for i in 0..3 {
            let scene = shapes::sample(seed, i as u64, Split::Train);
            let area = scene.mask(IMAGE_SIZE).iter().filter(|&&b| b).count() as f32;
            let cells: Vec<f32> = m.get(i).unwrap().flatten_all().unwrap().to_vec1().unwrap();
            assert!(cells.iter().all(|c| (0.0..=1.0).contains(c)));
            let covered = cells.iter().sum::<f32>() * 64.0;
            assert!((covered - area).abs() < 0.5, "{covered} vs {area}");
        }
    }

    #[test]
    fn weights_in_words() {
        assert_eq!(steps_and_weights(&[]), "-");
        assert_eq!(steps_and_weights(&[(1, 0.05)]), "5e-2");
        assert_eq!(
            steps_and_weights(&[(1, 0.0), (4501, 0.05)]),
            "0 (steps 1–4500), then 5e-2 (from step 4501)"
        );
    }

    #[test]
    fn loss_curves_are_running_means() {
        let losses: Vec<(usize, f64)> = (1..=5).map(|s| (s, s as f64)).collect();
        let c = loss_curve("t", "vae", &losses, 2);
        let ys: Vec<f64> = c.series[0].points.iter().map(|p| p.1).collect();
        assert_eq!(ys, [1.0, 1.5, 2.5, 3.5, 4.5]);
        assert!(!c.series[0].markers);
    }
}
