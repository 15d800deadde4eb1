//! What every subcommand shares: the run's settings and the model and inversion arguments.

use anyhow::Result;
use clap::Args;
use nulltext::CancelFlag;

pub struct Ctx {
    pub device: String,
    pub dtype: String,
    /// How UNets run (`NULLTEXT_CONTEXT_TAPE`, read once at start).
    pub execution: nulltext::models::Execution,
    pub quiet: bool,
    pub cancel: CancelFlag,
    /// Files written so far, for the message of an interrupted run.
    pub written: std::cell::RefCell<Vec<std::path::PathBuf>>,
}

impl Ctx {
    pub fn load(&self, m: &ModelArg) -> Result<nulltext::StableDiffusion> {
        let device = nulltext::runtime::parse_device(&self.device)?;
        let dtype = nulltext::runtime::parse_dtype(&self.dtype, &device)?;
        let opts = nulltext::models::LoadOptions {
            device,
            dtype,
            config_dir: m.model_config.clone(),
            prediction_type: m.prediction_type.clone(),
            execution: self.execution,
        };
        crate::runtime::load_model(&m.model, &opts, self.quiet)
    }

    pub fn bars(&self) -> crate::progress::Bars {
        crate::progress::Bars::new(self.quiet, self.cancel.clone())
    }

    /// Notes that `path` has been written (whole).
    pub fn wrote(&self, path: &std::path::Path) {
        self.written.borrow_mut().push(path.to_path_buf());
    }

    /// Prints a line of results (to stdout), unless quiet.
    pub fn say(&self, line: impl AsRef<str>) {
        if !self.quiet {
            println!("{}", line.as_ref());
        }
    }
}

/// The model to use.
#[derive(Args, Debug, Clone)]
pub struct ModelArg {
    /// A diffusers folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/,
    /// scheduler/) or a Hugging Face repo id found in the local cache (e.g.
    /// runwayml/stable-diffusion-v1-5). Default: $NULLTEXT_MODEL.
    #[arg(long, short = 'm', env = "NULLTEXT_MODEL")]
    pub model: String,
    /// For a single-file checkpoint: a diffusers folder whose configs (and tokenizer and
    /// scheduler) describe it, instead of inferring them from the tensor shapes.
    #[arg(long)]
    pub model_config: Option<std::path::PathBuf>,
    /// For a single-file checkpoint: epsilon or v_prediction (SD 2.x 768 models). Default:
    /// `parameterization` of a sidecar `<name>.yaml`, else epsilon.
    #[arg(long)]
    pub prediction_type: Option<String>,
}

/// How an inversion runs (`invert`, `batch`).
#[derive(Args, Debug, Clone)]
pub struct InvertSettings {
    /// null-text (the paper), null-text-global (one embedding for all steps),
    /// negative-prompt (no optimization) or ddim (plain inversion, the lower bound).
    #[arg(long, default_value = "null-text")]
    pub method: nulltext::Method,
    /// DDIM steps.
    #[arg(long, default_value_t = 50)]
    pub steps: usize,
    /// Classifier-free guidance scale used while optimizing and editing.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Adam iterations per step (N).
    #[arg(long, default_value_t = 10)]
    pub inner_steps: usize,
    /// Early-stop threshold ε (a step stops once its loss < ε + i·2e-5).
    #[arg(long, default_value_t = 1e-5)]
    pub early_stop: f64,
    /// Square size the photo is resized to (default: the model's, 512 for SD 1.x).
    #[arg(long)]
    pub size: Option<u32>,
    /// Largest input photo, in pixels (width × height, read from its header before
    /// anything is decoded).
    #[arg(long, default_value_t = nulltext::limits::DEFAULT_MAX_PIXELS)]
    pub max_pixels: u64,
    /// Largest square size, given with --size or the model's own.
    #[arg(long, default_value_t = nulltext::limits::DEFAULT_MAX_SIZE)]
    pub max_size: u32,
}

impl InvertSettings {
    pub fn options(&self) -> nulltext::InvertOptions {
        nulltext::InvertOptions {
            method: self.method,
            num_steps: self.steps,
            guidance: self.guidance,
            inner_steps: self.inner_steps,
            early_stop: self.early_stop,
            ..Default::default()
        }
    }

    pub fn limits(&self) -> nulltext::Limits {
        nulltext::Limits {
            max_pixels: self.max_pixels,
            max_size: self.max_size,
            ..Default::default()
        }
    }
}
