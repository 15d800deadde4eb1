//! DDIM inversion, null-text inversion (spec §2–3; Mokady et al., Algorithm 1, as the
//! reference notebook runs it), direct inversion (Ju et al., ICLR 2024, "PnP Inversion"),
//! and reconstruction from an inversion.

use std::collections::BTreeMap;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};
use image::RgbImage;
use nulltext_models::unet::ContextTape;
use nulltext_models::{Ddim, NoControl, PromptEmbeds, SchedulerConfig, StableDiffusion};

use crate::error::{invalid, Error, Result};
use crate::events::{check, Event, Progress, Stage};
use crate::limits::{check_guidance, check_steps};
use crate::sampling::{guided_eps, predict_eps, sample, SampleSpec};

/// How the unconditional embeddings of an inversion are obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// Per-step optimized null-text embeddings (the paper's method).
    NullText,
    /// One optimized embedding shared by every step (the paper's "global" ablation).
    NullTextGlobal,
    /// No optimization: the source prompt's embedding as the unconditional input
    /// (Miyake et al. 2023).
    NegativePrompt,
    /// Plain DDIM inversion with the empty prompt's embedding: the lower bound.
    Ddim,
    /// DDIM inversion plus, per step, the latent offset that brings a guided DDIM step back
    /// onto the inversion's trajectory (Ju et al., ICLR 2024): no optimization, and the
    /// source branch of an edit reproduces the photo exactly.
    Direct,
}

impl Method {
    /// Every method, in the order of the enum.
    pub const ALL: [Method; 5] = [
        Method::NullText,
        Method::NullTextGlobal,
        Method::NegativePrompt,
        Method::Ddim,
        Method::Direct,
    ];

    /// The method's name on the command line and in inversion files (`null-text`,
    /// `null-text-global`, `negative-prompt`, `ddim`, `direct`); `FromStr` parses it back.
    pub fn as_str(self) -> &'static str {
        match self {
            Method::NullText => "null-text",
            Method::NullTextGlobal => "null-text-global",
            Method::NegativePrompt => "negative-prompt",
            Method::Ddim => "ddim",
            Method::Direct => "direct",
        }
    }

    /// Whether the method optimizes the unconditional embedding (and so uses
    /// [`InvertOptions::inner_steps`], `early_stop` and `learning_rate`).
    pub fn optimizes(self) -> bool {
        matches!(self, Method::NullText | Method::NullTextGlobal)
    }
}

impl std::fmt::Display for Method {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Method {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        Method::ALL
            .into_iter()
            .find(|m| m.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown method `{s}` (null-text, null-text-global, negative-prompt, ddim, \
                     direct)"
                )
            })
    }
}

/// Settings of an inversion. The default is the paper's null-text inversion: 50 steps,
/// guidance 7.5, up to 10 Adam iterations per step, ε = 1e-5, learning rate 1e-2.
#[derive(Debug, Clone)]
pub struct InvertOptions {
    /// How the unconditional embeddings are obtained.
    pub method: Method,
    /// DDIM steps T.
    pub num_steps: usize,
    /// Guidance scale w used during optimization and later sampling.
    pub guidance: f64,
    /// Adam iterations per step, N.
    pub inner_steps: usize,
    /// Early-stop threshold ε: a step stops once its loss < ε + i·2e-5.
    pub early_stop: f64,
    /// Base learning rate; step i uses `lr · (1 − i/100)`.
    pub learning_rate: f64,
}

impl Default for InvertOptions {
    fn default() -> Self {
        Self {
            method: Method::NullText,
            num_steps: 50,
            guidance: 7.5,
            inner_steps: 10,
            early_stop: 1e-5,
            learning_rate: 1e-2,
        }
    }
}

impl InvertOptions {
    /// Checks every setting against `scheduler` before any work starts.
    pub fn validate(&self, scheduler: &SchedulerConfig) -> Result<()> {
        check_steps("--steps", self.num_steps, scheduler)?;
        check_guidance("--guidance", self.guidance)?;
        if self.method.optimizes() && self.inner_steps == 0 {
            return Err(invalid("--inner-steps must be at least 1"));
        }
        if !self.early_stop.is_finite() {
            return Err(invalid(format!(
                "--early-stop must be finite, got {}",
                self.early_stop
            )));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return Err(invalid(format!(
                "the learning rate must be positive and finite, got {}",
                self.learning_rate
            )));
        }
        Ok(())
    }
}

/// The result of an inversion: everything needed to reconstruct and edit the image.
/// Saved and loaded as an inversion file (`crate::inversion_file`).
#[derive(Debug, Clone)]
pub struct Inversion {
    /// z_T, `[1, C, h, w]`.
    pub latent_t: Tensor,
    /// Unconditional embedding per sampling step, `[T, 77, D]`, in sampling order.
    pub null_embeddings: Tensor,
    /// SDXL: the unconditional pooled embedding per sampling step, `[T, P]`; `None` for SD
    /// 1.x/2.x.
    pub null_pooled: Option<Tensor>,
    /// z₀ of the input image, `[1, C, h, w]`.
    pub image_latent: Option<Tensor>,
    /// Direct inversion: the offset added to the source row after each sampling step,
    /// `[T, C, h, w]` in sampling order. Valid only for this guidance scale and step count.
    pub latent_offsets: Option<Tensor>,
    /// The source caption the image was inverted with.
    pub prompt: String,
    /// The method that made it.
    pub method: Method,
    /// DDIM steps T.
    pub num_steps: usize,
    /// The guidance scale w of the inversion, which reconstruction and edits use by default.
    pub guidance: f64,
    /// Image height in pixels.
    pub height: usize,
    /// Image width in pixels.
    pub width: usize,
    /// The model's scheduler settings; sampling from the inversion uses these.
    pub scheduler: SchedulerConfig,
    /// The model's name as it was loaded (a path or repository id), for people.
    pub model: String,
    /// The model's weight fingerprint ([`StableDiffusion::fingerprint`]), checked by
    /// [`Inversion::check_model`].
    pub model_fingerprint: String,
    /// Metadata keys nulltext does not know, kept when the file is rewritten.
    pub extra_metadata: BTreeMap<String, String>,
    /// Tensors nulltext does not know, kept when the file is rewritten.
    pub extra_tensors: BTreeMap<String, Tensor>,
}

impl Inversion {
    /// Every step's unconditional embeddings as one value of `num_steps` rows.
    pub fn nulls(&self) -> PromptEmbeds {
        PromptEmbeds {
            context: self.null_embeddings.clone(),
            pooled: self.null_pooled.clone(),
        }
    }

    /// The unconditional embeddings of each step, one row each.
    pub fn null_embedding_list(&self, device: &candle_core::Device) -> Result<Vec<PromptEmbeds>> {
        let all = self.nulls().to_device(device)?;
        (0..self.num_steps).map(|i| Ok(all.narrow(i, 1)?)).collect()
    }

    /// Direct inversion's offsets on `device`, `[T, C, h, w]`, if this inversion has them.
    pub fn offsets_on(&self, device: &candle_core::Device) -> Result<Option<Tensor>> {
        Ok(self
            .latent_offsets
            .as_ref()
            .map(|o| o.to_device(device))
            .transpose()?)
    }

    /// Checks that the method and the latent offsets agree: a direct inversion has one
    /// offset per step, of the latent's shape; other methods have none.
    pub fn check_offsets(&self) -> Result<()> {
        match (&self.latent_offsets, self.method) {
            (None, Method::Direct) => Err(invalid(
                "a direct inversion needs its `latent_offsets`, and this one has none",
            )),
            (Some(_), m) if m != Method::Direct => Err(invalid(format!(
                "latent offsets belong to direct inversions, but this one was made with {m}"
            ))),
            (Some(o), _) => {
                let (_, c, h, w) = self.latent_t.dims4()?;
                if o.dims() != [self.num_steps, c, h, w] {
                    return Err(invalid(format!(
                        "`latent_offsets` has shape {:?}, expected [{}, {c}, {h}, {w}]: one \
                         offset per step, valid only for the {} steps the inversion was made \
                         with",
                        o.dims(),
                        self.num_steps,
                        self.num_steps
                    )));
                }
                Ok(())
            }
            (None, _) => Ok(()),
        }
    }

    /// Checks that this inversion can be used with `sd`: same weights (by fingerprint; with
    /// `force`, a mismatch is only logged as a warning), embeddings of the text encoder's
    /// shape `[T, 77, D]` (for SDXL with pooled embeddings `[T, P]`, for the others
    /// without), and a latent of the shape the model gives for the inversion's
    /// image size. Sampling from it uses the inversion's own [`Inversion::scheduler`].
    pub fn check_model(&self, sd: &StableDiffusion, force: bool) -> Result<()> {
        if self.model_fingerprint != sd.fingerprint {
            let msg = format!(
                "inversion was made with model `{}` (fingerprint {}), but `{}` has fingerprint {}",
                self.model, self.model_fingerprint, sd.name, sd.fingerprint
            );
            if force {
                tracing::warn!("{msg}; continuing because of --force");
            } else {
                return Err(invalid(format!("{msg}; pass --force to use it anyway")));
            }
        }
        let pooled = self.null_pooled.as_ref().map(|p| p.dims().to_vec());
        let want = sd.pooled_dim().map(|p| vec![self.num_steps, p]);
        if pooled != want {
            return Err(invalid(match (pooled, want) {
                (Some(p), None) => format!(
                    "inversion has pooled embeddings {p:?} (an SDXL inversion), which `{}` \
                     does not take",
                    sd.name
                ),
                (None, Some(_)) => format!(
                    "`{}` is an SDXL model and needs the inversion's pooled embeddings, which \
                     this inversion (of an SD 1.x/2.x model) lacks",
                    sd.name
                ),
                (p, w) => format!("inversion pooled embeddings are {p:?}, the model needs {w:?}"),
            }));
        }
        let (_, l, d) = self.null_embeddings.dims3()?;
        if d != sd.context_dim() || l != nulltext_models::tokenizer::MAX_LEN {
            return Err(invalid(format!(
                "inversion embeddings are {l}×{d}, the model's text encoder gives 77×{}",
                sd.context_dim()
            )));
        }
        let f = sd.vae_scale_factor();
        let want = [1, sd.latent_channels(), self.height / f, self.width / f];
        if self.latent_t.dims() != want {
            return Err(invalid(format!(
                "inversion latent has shape {:?}, the model needs {want:?} for {}×{} images",
                self.latent_t.dims(),
                self.width,
                self.height
            )));
        }
        Ok(())
    }
}

/// What happened during an inversion.
#[derive(Debug, Clone, Default)]
pub struct InvertReport {
    /// Loss of every null-text iteration (before its update), per step.
    pub losses: Vec<Vec<f64>>,
    /// Updates applied per step.
    pub iterations: Vec<usize>,
    /// z*₀ … z*_T of the DDIM inversion.
    pub pivots: Vec<Tensor>,
    /// The latent the optimized trajectory ends in (= the reconstruction), if computed.
    pub final_latent: Option<Tensor>,
    /// The compute spent: UNet evaluations of one latent, a forward or a backward pass
    /// each (a classifier-free guided step counts two forwards).
    pub unet_passes: usize,
    /// Wall-clock seconds of the DDIM inversion.
    pub seconds_ddim: f64,
    /// Wall-clock seconds after it: the optimization, or direct inversion's offset pass.
    pub seconds_optimization: f64,
}

/// DDIM inversion with guidance 1 (spec §2): z*₀ = `z0`, …, z*_T.
pub fn ddim_inversion(
    sd: &StableDiffusion,
    ddim: &Ddim,
    z0: &Tensor,
    cond: &PromptEmbeds,
    progress: &mut dyn Progress,
) -> Result<Vec<Tensor>> {
    ddim_inversion_steps(sd, ddim, z0, cond, ddim.num_steps(), progress)
}

/// The first `k` steps of DDIM inversion: z*₀ … z*_k.
pub fn ddim_inversion_steps(
    sd: &StableDiffusion,
    ddim: &Ddim,
    z0: &Tensor,
    cond: &PromptEmbeds,
    k: usize,
    progress: &mut dyn Progress,
) -> Result<Vec<Tensor>> {
    let steps = ddim.timesteps();
    let n = steps.len();
    let k = k.min(n);
    progress.event(&Event::Start {
        stage: Stage::DdimInversion,
        total: k,
    });
    let mut latents = vec![z0.clone()];
    let mut z = z0.clone();
    for i in 0..k {
        check(progress)?;
        let t = steps[n - 1 - i];
        let eps = predict_eps(sd, ddim, &z, t, cond, &mut NoControl, n - 1 - i)?;
        z = ddim.inverse_step(&eps, t, &z)?;
        latents.push(z.clone());
        progress.event(&Event::Advance {
            stage: Stage::DdimInversion,
            done: i + 1,
        });
    }
    progress.event(&Event::Finish {
        stage: Stage::DdimInversion,
    });
    Ok(latents)
}

/// Adam (β = (0.9, 0.999), ε = 1e-8, no weight decay) over the parts of prompt embeddings,
/// exactly as PyTorch's single-tensor implementation computes it for a list of parameters.
/// Its state stays in the same buffers from update to update (the moments, and the step's
/// scale factors, set from the host before each update), so that the device work of an
/// update is the same every time ([`Iterations`] replays it as a CUDA graph).
pub struct Adam {
    /// The first and second moments of each part.
    moments: Vec<(Var, Var)>,
    t: i32,
    /// `lr / (1 − β₁ᵗ)` and `1 / √(1 − β₂ᵗ)` of the next update, `[1]` in the parameters'
    /// dtype.
    scales: (Var, Var),
}

impl Adam {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    /// A fresh state (zero moments) for parameters of `like`'s shapes, dtype and device.
    pub fn new(like: &PromptEmbeds) -> Result<Self> {
        let moments = like
            .parts()
            .map(|p| {
                let zeros = || Var::zeros(p.shape(), p.dtype(), p.device());
                Ok((zeros()?, zeros()?))
            })
            .collect::<Result<_>>()?;
        let (dtype, dev) = (like.context.dtype(), like.context.device());
        let scale = || Var::zeros(1, dtype, dev);
        Ok(Self {
            moments,
            t: 0,
            scales: (scale()?, scale()?),
        })
    }

    /// One update of `param` by its gradient `grad` at learning rate `lr`.
    pub fn step(&mut self, param: &NullVars, grad: &PromptEmbeds, lr: f64) -> Result<()> {
        self.prepare(lr)?;
        self.apply(param, grad)
    }

    /// Counts the next update and sets its scale factors for learning rate `lr` (a copy
    /// from the host).
    pub fn prepare(&mut self, lr: f64) -> Result<()> {
        self.t += 1;
        let bc1 = 1.0 - Self::B1.powi(self.t);
        let bc2 = 1.0 - Self::B2.powi(self.t);
        for (var, value) in [
            (&self.scales.0, lr / bc1),
            (&self.scales.1, 1.0 / bc2.sqrt()),
        ] {
            let v = Tensor::new(&[value], var.device())?.to_dtype(var.dtype())?;
            var.set(&v)?;
        }
        Ok(())
    }

    /// The update [`Self::prepare`]d, in place: device work only.
    pub fn apply(&self, param: &NullVars, grad: &PromptEmbeds) -> Result<()> {
        debug_assert_eq!(
            grad.parts().count(),
            self.moments.len(),
            "one moment pair per part"
        );
        let (step_size, inv_bc2_sqrt) = (self.scales.0.as_tensor(), self.scales.1.as_tensor());
        let parts = param.vars().zip(grad.parts()).zip(&self.moments);
        for ((param, grad), (m, v)) in parts {
            // m.lerp_(g, 1 − β₁); v = β₂ v + (1 − β₂) g²
            let (m_prev, v_prev) = (m.as_tensor(), v.as_tensor());
            m.set(&(m_prev + ((grad - m_prev)? * (1.0 - Self::B1))?)?)?;
            v.set(&((v_prev * Self::B2)? + (grad.sqr()? * (1.0 - Self::B2))?)?)?;
            let denom = (v.as_tensor().sqrt()?.broadcast_mul(inv_bc2_sqrt)? + Self::EPS)?;
            let update = (m.as_tensor() / denom)?.broadcast_mul(step_size)?;
            param.set(&(param.as_tensor() - update)?)?;
        }
        Ok(())
    }
}

/// The optimized unconditional input: one variable per part of the embeddings.
pub struct NullVars {
    context: Var,
    pooled: Option<Var>,
}

impl NullVars {
    /// Variables holding copies of `init`.
    pub fn new(init: &PromptEmbeds) -> Result<Self> {
        Ok(Self {
            context: Var::from_tensor(&init.context.copy()?)?,
            pooled: init
                .pooled
                .as_ref()
                .map(|p| Var::from_tensor(&p.copy()?))
                .transpose()?,
        })
    }

    /// The variables' values (tracked by candle's autograd).
    pub fn embeds(&self) -> PromptEmbeds {
        PromptEmbeds {
            context: self.context.as_tensor().clone(),
            pooled: self.pooled.as_ref().map(|p| p.as_tensor().clone()),
        }
    }

    /// The variables, context first.
    pub fn vars(&self) -> impl Iterator<Item = &Var> {
        std::iter::once(&self.context).chain(self.pooled.as_ref())
    }
}

/// The null-text objective at one step, ‖z̄ₜ₋₁ − DDIM(z̄ₜ, ε(∅) + w (ε(C) − ε(∅)))‖², as a
/// function of the unconditional embedding ∅.
pub struct StepObjective<'a> {
    /// The sampler whose step the objective follows.
    pub ddim: &'a Ddim,
    /// z̄ₜ and its timestep.
    pub z: &'a Tensor,
    /// The timestep t of z̄ₜ (a training timestep, not a step index).
    pub t: usize,
    /// ε(z̄ₜ, t, C), computed once per step.
    pub eps_c: &'a Tensor,
    /// The pivot z*ₜ₋₁ of the DDIM inversion.
    pub target: &'a Tensor,
    /// The guidance scale w.
    pub guidance: f64,
}

impl StepObjective<'_> {
    /// The loss from the unconditional prediction ε(z̄ₜ, t, ∅).
    pub fn loss(&self, eps_u: &Tensor) -> Result<Tensor> {
        let noise = (eps_u + ((self.eps_c - eps_u)? * self.guidance)?)?;
        let prev = self.ddim.step(&noise, self.t, self.z)?;
        Ok((prev - self.target)?.sqr()?.mean_all()?)
    }

    /// The loss at `var` and its gradient with respect to every part of `var`: through
    /// `tape` (made for z̄ₜ and t) where there is one, else through candle's graph. `step`
    /// is the sampling step's index, for the graph path's attention hook.
    pub fn loss_and_grad(
        &self,
        sd: &StableDiffusion,
        tape: Option<&mut ContextTape>,
        var: &NullVars,
        step: usize,
    ) -> Result<(Tensor, PromptEmbeds)> {
        let no_grad = || Error::InvalidInput("no gradient reached the null embedding".into());
        let (ddim, z, t) = (self.ddim, self.z, self.t);
        match tape {
            Some(tape) => {
                // the graph covers only the UNet's output → loss; the tape does the rest
                let out = Var::from_tensor(&tape.forward_embeds(&var.embeds())?)?;
                let eps_u = ddim.epsilon(&out.as_tensor().to_dtype(z.dtype())?, t, z)?;
                let loss = self.loss(&eps_u)?;
                let grads = loss.backward()?;
                let g = grads.get(out.as_tensor()).ok_or_else(no_grad)?;
                Ok((loss, tape.backward_embeds(g)?))
            }
            None => {
                let embeds = var.embeds();
                let eps_u = predict_eps(sd, ddim, z, t, &embeds, &mut NoControl, step)?;
                let loss = self.loss(&eps_u)?;
                let grads = loss.backward()?;
                let grad_of = |p: &Tensor| grads.get(p).cloned().ok_or_else(no_grad);
                let grad = PromptEmbeds {
                    context: grad_of(&embeds.context)?,
                    pooled: embeds.pooled.as_ref().map(grad_of).transpose()?,
                };
                Ok((loss, grad))
            }
        }
    }
}

/// The Adam iterations of one step: each computes the loss and its gradient at ∅, reports
/// `[loss, finiteness of the gradient]`, and updates ∅ in place. Every iteration runs the
/// same device work on buffers that stay put (∅'s variables, Adam's state, the report), so
/// that with CUDA graphs (on a CUDA device, through a context tape) the first iteration
/// runs as it is (candle keeps the small uploads it makes), the second is captured as a
/// graph, and every later one replays that graph: one launch where an iteration otherwise
/// launches thousands of kernels. Should a capture fail, the iterations carry on without
/// graphs, and so does the rest of the process (with one warning). Null-text optimization asks for graphs with
/// `NULLTEXT_CUDA_GRAPHS=on` ([`nulltext_models::device::graphs_requested`]).
pub struct Iterations<'a> {
    objective: StepObjective<'a>,
    var: NullVars,
    /// The sampling step, for the graph path's attention hook.
    step: usize,
    /// `[loss, 0 or NaN]` of the last iteration, f32.
    report: Var,
    replay: Replay,
}

/// Where [`Iterations`] stand with a CUDA graph.
enum Replay {
    Off,
    /// The next iteration runs as it is, for a capture to follow.
    WarmUp,
    /// The next iteration is captured, then launched.
    Capture,
    Launch(nulltext_models::device::Graph),
}

/// What one of the [`Iterations`] reports.
#[derive(Debug, Clone, Copy)]
pub struct IterationReport {
    /// The loss before the update.
    pub loss: f64,
    /// Whether every value of the gradient was finite.
    pub finite_gradient: bool,
}

impl<'a> Iterations<'a> {
    /// Iterations on `objective` from ∅ = `init`, at sampling step `step`; with `graphs`,
    /// replayed as a CUDA graph where the device supports it
    /// ([`nulltext_models::device::graphs_supported`]).
    pub fn new(
        objective: StepObjective<'a>,
        init: &PromptEmbeds,
        step: usize,
        graphs: bool,
    ) -> Result<Self> {
        let dev = init.context.device();
        let graphs = graphs && nulltext_models::device::graphs_supported(dev);
        Ok(Self {
            objective,
            var: NullVars::new(init)?,
            step,
            report: Var::zeros(2, DType::F32, dev)?,
            replay: if graphs { Replay::WarmUp } else { Replay::Off },
        })
    }

    /// ∅ now.
    pub fn embeds(&self) -> PromptEmbeds {
        self.var.embeds().detach()
    }

    /// Whether the iterations now replay a CUDA graph.
    pub fn replays(&self) -> bool {
        matches!(self.replay, Replay::Launch(_))
    }

    /// One iteration at learning rate `lr`, through `tape` where there is one (a graph is
    /// captured only then).
    pub fn next(
        &mut self,
        sd: &StableDiffusion,
        mut tape: Option<&mut ContextTape>,
        adam: &mut Adam,
        lr: f64,
    ) -> Result<IterationReport> {
        use nulltext_models::device;
        adam.prepare(lr)?;
        let dev = self.report.device().clone();
        let replay = std::mem::replace(&mut self.replay, Replay::Off);
        self.replay = match replay {
            Replay::WarmUp if tape.is_some() => {
                device::warm_up(&dev, || self.iterate(sd, tape.as_deref_mut(), adam))?;
                Replay::Capture
            }
            Replay::Capture => {
                let graph = device::capture(&dev, || self.iterate(sd, tape.as_deref_mut(), adam))
                    .and_then(|graph| Ok(graph.launch().map(|()| graph)?));
                match graph {
                    Ok(graph) => Replay::Launch(graph),
                    Err(e) => {
                        tracing::warn!("null-text iterations continue without CUDA graphs: {e}");
                        self.iterate(sd, tape, adam)?;
                        Replay::Off
                    }
                }
            }
            Replay::Launch(graph) => {
                graph.launch()?;
                Replay::Launch(graph)
            }
            Replay::Off | Replay::WarmUp => {
                self.iterate(sd, tape, adam)?;
                Replay::Off
            }
        };
        let v = self
            .report
            .as_tensor()
            .to_dtype(DType::F64)?
            .to_vec1::<f64>()?;
        Ok(IterationReport {
            loss: v[0],
            finite_gradient: v[1].is_finite(),
        })
    }

    /// The device work of one iteration.
    fn iterate(
        &self,
        sd: &StableDiffusion,
        tape: Option<&mut ContextTape>,
        adam: &Adam,
    ) -> Result<()> {
        let (loss, grad) = self
            .objective
            .loss_and_grad(sd, tape, &self.var, self.step)?;
        let mut grad_ok = finiteness(&grad.context)?;
        if let Some(pooled) = &grad.pooled {
            grad_ok = (grad_ok + finiteness(pooled)?)?;
        }
        let report = Tensor::stack(&[loss.to_dtype(DType::F32)?, grad_ok], 0)?;
        self.report.set(&report)?;
        // the update follows whatever the loss: a non-finite report ends the optimization
        adam.apply(&self.var, &grad)
    }
}

/// A scalar that is 0 when every value of `t` is finite and NaN otherwise: `x − x` is 0
/// for any finite `x`, however large (a sum of magnitudes could overflow), and NaN for
/// NaN and ±∞.
#[allow(clippy::eq_op)] // x − x is the point
fn finiteness(t: &Tensor) -> Result<Tensor> {
    let t = t.to_dtype(DType::F32)?;
    Ok((&t - &t)?.sum_all()?)
}

fn is_finite(t: &Tensor) -> Result<bool> {
    Ok(finiteness(t)?.to_scalar::<f32>()?.is_finite())
}

/// Null-text optimization (spec §3), one sampling step at a time, so that callers can
/// observe or interleave it. [`null_text_optimization`] runs it to the end.
pub struct NullTextOptimizer<'a> {
    sd: &'a StableDiffusion,
    ddim: &'a Ddim,
    pivots: &'a [Tensor],
    cond: &'a PromptEmbeds,
    opts: InvertOptions,
    global: bool,
    step: usize,
    /// z̄ at the current step.
    latent: Tensor,
    /// ∅ of the previous step (the initial value of the next).
    current: PromptEmbeds,
    global_adam: Option<Adam>,
    nulls: Vec<PromptEmbeds>,
    report: InvertReport,
}

impl<'a> NullTextOptimizer<'a> {
    /// `pivots`: z*₀ … z*_T of the DDIM inversion; `uncond`: the starting ∅
    /// ([`StableDiffusion::encode_negative`] of ""). With `global`, one embedding (and one
    /// Adam state) serves every step.
    pub fn new(
        sd: &'a StableDiffusion,
        ddim: &'a Ddim,
        pivots: &'a [Tensor],
        cond: &'a PromptEmbeds,
        uncond: &PromptEmbeds,
        opts: &InvertOptions,
        global: bool,
    ) -> Result<Self> {
        let n = ddim.num_steps();
        if pivots.len() != n + 1 {
            return Err(invalid(format!("{} pivots for {n} steps", pivots.len())));
        }
        Ok(Self {
            sd,
            ddim,
            pivots,
            cond,
            opts: opts.clone(),
            global,
            step: 0,
            latent: pivots[n].clone(),
            current: uncond.detach(),
            global_adam: None,
            nulls: Vec::with_capacity(n),
            report: InvertReport::default(),
        })
    }

    /// Steps done so far.
    pub fn steps_done(&self) -> usize {
        self.step
    }

    /// Whether every step is done (then [`NullTextOptimizer::finish`]).
    pub fn is_done(&self) -> bool {
        self.step >= self.ddim.num_steps()
    }

    /// z̄ after the steps done so far (z*_T before the first).
    pub fn latent(&self) -> &Tensor {
        &self.latent
    }

    /// The optimized embeddings so far, one row each.
    pub fn null_embeddings(&self) -> &[PromptEmbeds] {
        &self.nulls
    }

    /// The report so far: losses and iterations of the steps done, UNet passes.
    pub fn report(&self) -> &InvertReport {
        &self.report
    }

    /// Optimizes ∅ᵢ for the next step i and advances z̄.
    pub fn step(&mut self, progress: &mut dyn Progress) -> Result<()> {
        let (sd, ddim, opts) = (self.sd, self.ddim, &self.opts);
        let n = ddim.num_steps();
        let i = self.step;
        if i >= n {
            return Err(invalid("null-text optimization is already complete"));
        }
        check(progress)?;
        let t = ddim.timesteps()[i];
        let z = &self.latent;
        let target = &self.pivots[n - 1 - i];
        // the reference's schedule, never negative past step 100
        let lr = opts.learning_rate * (1.0 - i as f64 / 100.0).max(0.0);
        // The UNet runs as a context tape (host kernels on the CPU in f32, tensor ops on
        // GPUs and in half precision): the graph path's forward values, its own backward
        // pass, and the context-free prefix computed once per step for every pass below;
        // where no tape applies (odd sizes off the CPU), through candle's graph.
        let mut tape = sd.context_tape(z, t as f64, self.cond)?;
        // 1. ε(z̄, t, C) once, without gradient.
        let eps_c = match tape.as_mut() {
            Some(tape) => {
                let out = tape.predict_embeds(self.cond)?.to_dtype(z.dtype())?;
                ddim.epsilon(&out, t, z)?
            }
            None => predict_eps(sd, ddim, z, t, self.cond, &mut NoControl, i)?.detach(),
        };
        self.report.unet_passes += 1;
        // 2. Adam on ∅ᵢ (every part: SDXL's pooled embedding too), initialized from ∅ᵢ₋₁;
        // a fresh state per step unless global.
        let mut local_adam;
        let adam = if self.global {
            if self.global_adam.is_none() {
                self.global_adam = Some(Adam::new(&self.current)?);
            }
            self.global_adam.as_mut().unwrap()
        } else {
            local_adam = Adam::new(&self.current)?;
            &mut local_adam
        };
        let threshold = opts.early_stop + i as f64 * 2e-5;
        let mut losses = Vec::new();
        let objective = StepObjective {
            ddim,
            z,
            t,
            eps_c: &eps_c,
            target,
            guidance: opts.guidance,
        };
        // a graph pays off over several replays: not where the last step stopped early
        let graphs = nulltext_models::device::graphs_requested()
            && opts.inner_steps >= 3
            && self.report.iterations.last().is_none_or(|n| *n >= 3);
        let mut iterations = Iterations::new(objective, &self.current, i, graphs)?;
        for j in 0..opts.inner_steps {
            let it = iterations.next(sd, tape.as_mut(), adam, lr)?;
            self.report.unet_passes += 2;
            if !it.loss.is_finite() || !it.finite_gradient {
                return Err(Error::NonFinite(format!(
                    "the null-text optimization (step {i}, iteration {j})"
                )));
            }
            // The iteration has applied its update before the early-stop test: every step
            // updates once.
            losses.push(it.loss);
            progress.event(&Event::Iteration {
                step: i,
                iteration: j,
                loss: it.loss,
            });
            progress.event(&Event::Advance {
                stage: Stage::NullTextOptimization,
                done: i * opts.inner_steps + j + 1,
            });
            check(progress)?;
            if it.loss < threshold {
                break;
            }
        }
        self.current = iterations.embeds();
        self.report.iterations.push(losses.len());
        progress.event(&Event::StepDone {
            step: i,
            iterations: losses.len(),
            loss: losses.last().copied().unwrap_or(f64::NAN),
        });
        self.report.losses.push(losses);
        self.nulls.push(self.current.clone());
        // 3. z̄ ← guided DDIM step with (∅ᵢ, C), no gradient; the tape reuses ε(z̄, t, C)
        // where the reference runs the UNet on the pair again.
        self.report.unet_passes += if tape.is_some() { 1 } else { 2 };
        let eps = match tape.as_mut() {
            Some(tape) => {
                let out = tape.predict_embeds(&self.current)?.to_dtype(z.dtype())?;
                let eps_u = ddim.epsilon(&out, t, z)?;
                (&eps_u + ((&eps_c - &eps_u)? * opts.guidance)?)?
            }
            None => guided_eps(
                sd,
                ddim,
                z,
                t,
                &self.current,
                self.cond,
                opts.guidance,
                &mut NoControl,
                i,
            )?,
        };
        self.latent = ddim.step(&eps, t, z)?;
        self.step += 1;
        Ok(())
    }

    /// The embedding of every step and the report. For the global variant, the embedding
    /// after the last step serves every step.
    pub fn finish(self) -> (Vec<PromptEmbeds>, InvertReport) {
        let mut report = self.report;
        if self.global {
            report.final_latent = None;
            (vec![self.current; self.nulls.len()], report)
        } else {
            report.final_latent = Some(self.latent);
            (self.nulls, report)
        }
    }
}

/// Runs [`NullTextOptimizer`] over every step.
#[allow(clippy::too_many_arguments)]
pub fn null_text_optimization(
    sd: &StableDiffusion,
    ddim: &Ddim,
    pivots: &[Tensor],
    cond: &PromptEmbeds,
    uncond: &PromptEmbeds,
    opts: &InvertOptions,
    global: bool,
    progress: &mut dyn Progress,
) -> Result<(Vec<PromptEmbeds>, InvertReport)> {
    let mut opt = NullTextOptimizer::new(sd, ddim, pivots, cond, uncond, opts, global)?;
    progress.event(&Event::Start {
        stage: Stage::NullTextOptimization,
        total: ddim.num_steps() * opts.inner_steps,
    });
    while !opt.is_done() {
        opt.step(progress)?;
    }
    progress.event(&Event::Finish {
        stage: Stage::NullTextOptimization,
    });
    Ok(opt.finish())
}

/// Inverts an image latent z₀ (`[1, C, h, w]`, as [`StableDiffusion::image_to_latent`]
/// gives it) with its caption; `height` and `width` are the image's size in pixels, recorded
/// in the inversion. Fails with [`Error::InvalidInput`] on settings the model's scheduler
/// cannot take, [`Error::NonFinite`] when the result holds NaN or infinite values, and
/// [`Error::Cancelled`] when `progress` asks to stop.
///
/// ```
/// use nulltext::{image_io, invert_latent, InvertOptions, NoProgress, StableDiffusion};
///
/// // The bundled shapes model: 64×64 images, 8×8 latents.
/// let sd = StableDiffusion::load("../../models/shapes", &Default::default())?;
/// let photo = "../../models/shapes/examples/red-circle-on-blue.png".as_ref();
/// let img = image_io::load_image(photo, Default::default(), 64)?;
/// let z0 = sd.image_to_latent(&image_io::image_to_tensor(&img, &sd.device)?)?;
/// assert_eq!(z0.dims(), [1, 4, 8, 8]);
///
/// // Null-text inversion, shortened: 5 steps of at most 2 Adam iterations.
/// let opts = InvertOptions { num_steps: 5, inner_steps: 2, ..Default::default() };
/// let prompt = "a red circle on a blue background";
/// let (inv, report) = invert_latent(&sd, &z0, prompt, 64, 64, &opts, &mut NoProgress)?;
/// assert_eq!(inv.null_embeddings.dims(), [5, 77, sd.context_dim()]);
/// assert!(inv.null_pooled.is_none()); // SDXL inversions have them
/// assert!(report.iterations.iter().all(|&n| (1..=2).contains(&n)));
/// # Ok::<(), nulltext::Error>(())
/// ```
pub fn invert_latent(
    sd: &StableDiffusion,
    z0: &Tensor,
    prompt: &str,
    height: usize,
    width: usize,
    opts: &InvertOptions,
    progress: &mut dyn Progress,
) -> Result<(Inversion, InvertReport)> {
    opts.validate(&sd.scheduler)?;
    let ddim = Ddim::new(&sd.scheduler, opts.num_steps)?;
    let cond = sd.encode_prompt(prompt)?;
    let empty = sd.encode_negative("")?;
    let start = Instant::now();
    let pivots = ddim_inversion(sd, &ddim, z0, &cond, progress)?;
    let seconds_ddim = start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut latent_offsets = None;
    let (nulls, mut report) = match opts.method {
        Method::NullText | Method::NullTextGlobal => null_text_optimization(
            sd,
            &ddim,
            &pivots,
            &cond,
            &empty,
            opts,
            opts.method == Method::NullTextGlobal,
            progress,
        )?,
        Method::NegativePrompt => (vec![cond.clone(); opts.num_steps], InvertReport::default()),
        Method::Ddim => (vec![empty.clone(); opts.num_steps], InvertReport::default()),
        Method::Direct => {
            let (offsets, end) =
                direct_offsets(sd, &ddim, &pivots, &cond, &empty, opts.guidance, progress)?;
            latent_offsets = Some(Tensor::cat(&offsets, 0)?.to_dtype(DType::F32)?);
            let report = InvertReport {
                final_latent: Some(end),
                unet_passes: 2 * opts.num_steps,
                ..Default::default()
            };
            (vec![empty.clone(); opts.num_steps], report)
        }
    };
    report.seconds_ddim = seconds_ddim;
    report.seconds_optimization = start.elapsed().as_secs_f64();
    report.unet_passes += opts.num_steps;
    let nulls = PromptEmbeds::cat(&nulls.iter().collect::<Vec<_>>())?.to_dtype(DType::F32)?;
    let latent_t = pivots[opts.num_steps].to_dtype(DType::F32)?;
    for (what, t) in [
        ("the null embeddings", Some(&nulls.context)),
        ("the pooled null embeddings", nulls.pooled.as_ref()),
        ("z_T", Some(&latent_t)),
        ("the latent offsets", latent_offsets.as_ref()),
    ] {
        if !t.map(is_finite).transpose()?.unwrap_or(true) {
            return Err(Error::NonFinite(what.into()));
        }
    }
    report.pivots = pivots;
    let inversion = Inversion {
        latent_t,
        null_embeddings: nulls.context,
        null_pooled: nulls.pooled,
        image_latent: Some(z0.to_dtype(DType::F32)?),
        latent_offsets,
        prompt: prompt.to_string(),
        method: opts.method,
        num_steps: opts.num_steps,
        guidance: opts.guidance,
        height,
        width,
        scheduler: sd.scheduler.clone(),
        model: sd.name.clone(),
        model_fingerprint: sd.fingerprint.clone(),
        extra_metadata: BTreeMap::new(),
        extra_tensors: BTreeMap::new(),
    };
    Ok((inversion, report))
}

/// Direct inversion's offsets (Ju et al., ICLR 2024; the authors' `offset_calculate`):
/// from z*_T, the guided DDIM step of sampling step i (unconditional input `uncond`,
/// guidance `guidance`) lands near the pivot z*_{T−1−i}; its offset is the pivot minus the
/// landing point, and the walk continues from the landing point plus the offset. Returns
/// the offsets in sampling order, `[1, C, h, w]` each, and where the walk ends (z*₀ up to
/// rounding).
#[allow(clippy::too_many_arguments)]
pub fn direct_offsets(
    sd: &StableDiffusion,
    ddim: &Ddim,
    pivots: &[Tensor],
    cond: &PromptEmbeds,
    uncond: &PromptEmbeds,
    guidance: f64,
    progress: &mut dyn Progress,
) -> Result<(Vec<Tensor>, Tensor)> {
    let n = ddim.num_steps();
    if pivots.len() != n + 1 {
        return Err(invalid(format!("{} pivots for {n} steps", pivots.len())));
    }
    progress.event(&Event::Start {
        stage: Stage::DirectOffsets,
        total: n,
    });
    let mut z = pivots[n].clone();
    let mut offsets = Vec::with_capacity(n);
    for (i, &t) in ddim.timesteps().iter().enumerate() {
        check(progress)?;
        let eps = guided_eps(sd, ddim, &z, t, uncond, cond, guidance, &mut NoControl, i)?;
        let landing = ddim.step(&eps, t, &z)?;
        let offset = (&pivots[n - 1 - i] - &landing)?;
        z = (&landing + &offset)?;
        offsets.push(offset);
        progress.event(&Event::Advance {
            stage: Stage::DirectOffsets,
            done: i + 1,
        });
    }
    progress.event(&Event::Finish {
        stage: Stage::DirectOffsets,
    });
    Ok((offsets, z))
}

/// Inverts a prepared RGB image (already at the model's size, see
/// [`crate::image_io::load_image`]) with its caption: the VAE encodes it, then
/// [`invert_latent`] runs. Fails with [`Error::InvalidInput`] when a side is not a multiple
/// of the VAE's scale factor (8 for Stable Diffusion), and as [`invert_latent`] does.
///
/// ```
/// use nulltext::{image_io, invert_image, InvertOptions, Method, NoProgress, StableDiffusion};
///
/// let sd = StableDiffusion::load("../../tests/fixtures/models/tiny-sd15", &Default::default())?;
/// let photo = "../../tests/fixtures/inputs/chelsea256.png".as_ref();
/// let img = image_io::load_image(photo, Default::default(), sd.default_image_size() as u32)?;
/// // `InvertOptions::default()` is the paper's null-text inversion (50 steps × 10 iterations).
/// let opts = InvertOptions { method: Method::Direct, num_steps: 5, ..Default::default() };
/// let (inv, report) = invert_image(&sd, &img, "a close up photo of a cat", &opts, &mut NoProgress)?;
/// assert_eq!(inv.num_steps, 5);
/// assert_eq!(report.unet_passes, 15); // 5 of DDIM inversion, 5 guided steps of two
/// let path = std::env::temp_dir().join("doc-cat.nti.safetensors");
/// nulltext::inversion_file::save(&inv, &path)?;
/// assert_eq!(nulltext::inversion_file::load(&path)?.prompt, "a close up photo of a cat");
/// # Ok::<(), nulltext::Error>(())
/// ```
pub fn invert_image(
    sd: &StableDiffusion,
    image: &RgbImage,
    prompt: &str,
    opts: &InvertOptions,
    progress: &mut dyn Progress,
) -> Result<(Inversion, InvertReport)> {
    let (w, h) = image.dimensions();
    let f = sd.vae_scale_factor() as u32;
    if w % f != 0 || h % f != 0 {
        return Err(invalid(format!(
            "image size {w}×{h} is not a multiple of {f}"
        )));
    }
    progress.event(&Event::Start {
        stage: Stage::EncodeImage,
        total: 1,
    });
    let x = crate::image_io::image_to_tensor(image, &sd.device)?;
    let z0 = sd.image_to_latent(&x)?;
    progress.event(&Event::Finish {
        stage: Stage::EncodeImage,
    });
    invert_latent(sd, &z0, prompt, h as usize, w as usize, opts, progress)
}

/// Samples the inversion back with its own prompt, embeddings, guidance scale and (for a
/// direct inversion) latent offsets: the reconstruction z₀, `[1, C, h, w]` on `sd`'s
/// device. Decode it with [`crate::image_io::decode_latents`].
///
/// ```
/// use nulltext::{image_io, invert_image, reconstruct, InvertOptions, Method, NoProgress};
/// use nulltext::StableDiffusion;
///
/// let sd = StableDiffusion::load("../../models/shapes", &Default::default())?;
/// let photo = "../../models/shapes/examples/red-circle-on-blue.png".as_ref();
/// let img = image_io::load_image(photo, Default::default(), 64)?;
/// let opts = InvertOptions { method: Method::Direct, num_steps: 10, ..Default::default() };
/// let prompt = "a red circle on a blue background";
/// let (inv, _) = invert_image(&sd, &img, prompt, &opts, &mut NoProgress)?;
///
/// let z0 = reconstruct(&sd, &inv, &mut NoProgress)?;
/// // Direct inversion's offsets bring the sampler back onto z₀ up to rounding.
/// let error: f32 = (&z0 - inv.image_latent.as_ref().unwrap())?.abs()?.max_all()?.to_scalar()?;
/// assert!(error < 1e-3, "{error}");
/// let picture = image_io::decode_latents(&sd, &z0)?.remove(0);
/// assert!(image_io::psnr(&picture, &img) > 20.0); // the VAE's round trip
/// # Ok::<(), nulltext::Error>(())
/// ```
pub fn reconstruct(
    sd: &StableDiffusion,
    inv: &Inversion,
    progress: &mut dyn Progress,
) -> Result<Tensor> {
    inv.check_offsets()?;
    let ddim = Ddim::new(&inv.scheduler, inv.num_steps)?;
    let cond = sd.encode_prompt(&inv.prompt)?;
    let nulls = inv.null_embedding_list(&sd.device)?;
    let offsets = inv.offsets_on(&sd.device)?;
    let spec = SampleSpec {
        start: &inv.latent_t.to_device(&sd.device)?,
        cond: &cond,
        uncond: &nulls,
        guidance: inv.guidance,
        first_step: 0,
        source_offsets: offsets.as_ref(),
    };
    sample(sd, &ddim, &spec, &mut NoControl, progress, |_, _| Ok(()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finiteness_holds_for_huge_values_and_fails_for_nan_and_infinities() {
        let dev = candle_core::Device::Cpu;
        let big = Tensor::full(3e38f32, 1000, &dev).unwrap();
        assert!(
            is_finite(&big).unwrap(),
            "a sum of magnitudes would overflow here"
        );
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let mut v = vec![1e30f32; 100];
            v[57] = bad;
            let t = Tensor::from_vec(v, 100, &dev).unwrap();
            assert!(!is_finite(&t).unwrap(), "{bad}");
        }
    }
}
