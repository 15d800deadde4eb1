//! A whole Stable Diffusion model: where its files are, and loading all four parts.
//!
//! `--model` may name a diffusers folder (`model_index.json`, `unet/`, `vae/`,
//! `text_encoder/`, `tokenizer/`, `scheduler/`), or a Hugging Face repo id (`ORG/NAME`)
//! resolved offline in the local Hugging Face cache.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use crate::clip::{ClipTextModelWithProjection, ClipTextTransformer};
use crate::config::{read_json, ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::fingerprint::unet_fingerprint;
use crate::prompt::PromptEmbeds;
use crate::sdxl::{Family, SecondTextEncoder};
use crate::tensors::tensor_lists;
use crate::tokenizer::{ClipTokenizer, Encoding, MAX_LEN};
use crate::unet::{AddedCond, Execution, UNet2DConditionModel};
use crate::vae::AutoencoderKL;
use crate::weights::WeightStore;

/// How to load a model.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    pub device: Device,
    /// Compute dtype of the weights (f32 by default; f16/bf16 on GPUs).
    pub dtype: DType,
    /// For single-file checkpoints: take the component configs (and tokenizer, scheduler)
    /// from this diffusers folder instead of inferring them from the tensor shapes.
    pub config_dir: Option<PathBuf>,
    /// For single-file checkpoints: `epsilon` or `v_prediction` (default: a sidecar
    /// `<name>.yaml` with `parameterization: "v"`, else `epsilon`).
    pub prediction_type: Option<String>,
    /// How the UNet runs (the context tapes where they apply, or candle's graph).
    pub execution: Execution,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            device: Device::Cpu,
            dtype: DType::F32,
            config_dir: None,
            prediction_type: None,
            execution: Execution::default(),
        }
    }
}

/// Fails with every missing or misshapen tensor listed, not just the first.
pub fn check_complete(
    store: &WeightStore,
    required: &[(String, Vec<usize>)],
    label: &str,
) -> Result<()> {
    let mut problems = Vec::new();
    for (name, shape) in required {
        match store.shape_of(name) {
            None => problems.push(format!("missing `{name}`")),
            // a linear layer may be stored as a 1×1 convolution
            Some(s)
                if s != shape.as_slice()
                    && !(s.len() == 4 && s[2..] == [1, 1] && s[..2] == shape[..]) =>
            {
                problems.push(format!("`{name}` has shape {s:?}, expected {shape:?}"))
            }
            _ => {}
        }
    }
    if problems.is_empty() {
        return Ok(());
    }
    let n = problems.len();
    let shown: Vec<String> = problems.into_iter().take(12).collect();
    Err(Error::Msg(format!(
        "{label}: {n} tensor{} do not fit the architecture: {}{}",
        if n == 1 { "" } else { "s" },
        shown.join("; "),
        if n > 12 {
            format!("; and {} more", n - 12)
        } else {
            String::new()
        }
    )))
}

/// The Hugging Face hub cache folder: `$HF_HUB_CACHE`, `$HF_HOME/hub` or
/// `~/.cache/huggingface/hub`.
pub fn hf_cache_dir() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("HF_HUB_CACHE") {
        return Some(PathBuf::from(p));
    }
    if let Some(p) = std::env::var_os("HF_HOME") {
        return Some(PathBuf::from(p).join("hub"));
    }
    let home = std::env::var_os("HOME")?;
    Some(PathBuf::from(home).join(".cache/huggingface/hub"))
}

fn looks_like_repo_id(s: &str) -> bool {
    let parts: Vec<&str> = s.split('/').collect();
    parts.len() == 2
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
                && *p != "."
                && *p != ".."
        })
}

/// Finds the snapshot folder of `repo_id` in the hub cache: the one `refs/main` names,
/// else the most recently modified.
pub fn resolve_hf_repo(repo_id: &str) -> Result<PathBuf> {
    let cache = hf_cache_dir()
        .ok_or_else(|| Error::Msg("no HOME or HF_HOME to find the Hugging Face cache".into()))?;
    let repo = cache.join(format!("models--{}", repo_id.replace('/', "--")));
    let snapshots = repo.join("snapshots");
    if !snapshots.is_dir() {
        return Err(Error::Msg(format!(
            "`{repo_id}` is neither a local path nor in the Hugging Face cache ({} not found); \
             nulltext never downloads: download it with `huggingface-cli download {repo_id}` \
             or pass a folder",
            snapshots.display()
        )));
    }
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs/main")) {
        let p = snapshots.join(rev.trim());
        if p.is_dir() {
            return Ok(p);
        }
    }
    let mut best: Option<(std::time::SystemTime, PathBuf)> = None;
    for e in std::fs::read_dir(&snapshots).map_err(|e| Error::io(&snapshots, e))? {
        let e = e.map_err(|e| Error::io(&snapshots, e))?;
        let t = e
            .metadata()
            .and_then(|m| m.modified())
            .unwrap_or(std::time::UNIX_EPOCH);
        if e.path().is_dir() && best.as_ref().is_none_or(|(bt, _)| t > *bt) {
            best = Some((t, e.path()));
        }
    }
    best.map(|(_, p)| p)
        .ok_or_else(|| Error::Msg(format!("{}: no snapshot in the cache", snapshots.display())))
}

/// Resolves what the user passed as `--model` to a local path.
pub fn resolve_model_path(spec: &str) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    if looks_like_repo_id(spec) {
        return resolve_hf_repo(spec);
    }
    Err(Error::MissingFile(p))
}

/// The weight files of one component folder (`unet/`, `vae/`, `text_encoder/`): the
/// full-precision file if present, else the `fp16` variant, either whole or sharded.
pub fn component_weight_files(dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        return Err(Error::MissingFile(dir.to_path_buf()));
    }
    for variant in ["", ".fp16"] {
        let single = dir.join(format!("{stem}{variant}.safetensors"));
        if single.is_file() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{stem}.safetensors{variant}.index.json"));
        let index_alt = dir.join(format!("{stem}{variant}.safetensors.index.json"));
        for idx in [index, index_alt] {
            if idx.is_file() {
                let v: serde_json::Value = read_json(&idx)?;
                let map = v
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| Error::Config {
                        path: idx.clone(),
                        msg: "no `weight_map`".into(),
                    })?;
                let mut files: Vec<PathBuf> = map
                    .values()
                    .filter_map(|f| f.as_str())
                    .map(|f| dir.join(f))
                    .collect();
                files.sort();
                files.dedup();
                return Ok(files);
            }
        }
    }
    let has_bin = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten().any(|e| {
                e.path()
                    .extension()
                    .is_some_and(|x| x == "bin" || x == "ckpt")
            })
        })
        .unwrap_or(false);
    if has_bin {
        return Err(Error::Unsupported(format!(
            "{} holds only PyTorch pickle weights (.bin/.ckpt), which nulltext does not load \
             (unpickling can run arbitrary code); convert them to safetensors, e.g. with \
             diffusers' `save_pretrained(..., safe_serialization=True)`",
            dir.display()
        )));
    }
    Err(Error::MissingFile(dir.join(format!("{stem}.safetensors"))))
}

/// Stable Diffusion (1.x, 2.x or XL): tokenizer, text encoder, UNet, VAE and the scheduler
/// settings.
pub struct StableDiffusion {
    /// The tokenizer whose word positions Prompt-to-Prompt uses (SDXL: the first).
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextTransformer,
    /// SDXL's second tokenizer and text encoder; `None` for SD 1.x/2.x.
    pub text_encoder_2: Option<SecondTextEncoder>,
    /// Whether an empty negative prompt is encoded as zeros (SDXL's
    /// `force_zeros_for_empty_prompt`, as diffusers' pipeline does).
    pub zeros_for_empty_prompt: bool,
    pub unet: UNet2DConditionModel,
    pub vae: AutoencoderKL,
    pub scheduler: SchedulerConfig,
    /// See [`crate::fingerprint`].
    pub fingerprint: String,
    /// What the user named the model (path or repo id).
    pub name: String,
    pub path: PathBuf,
    pub device: Device,
    pub dtype: DType,
}

impl StableDiffusion {
    /// Loads from a diffusers folder, a single-file `.safetensors` checkpoint or a cached
    /// Hugging Face repo id.
    pub fn load(spec: &str, opts: &LoadOptions) -> Result<Self> {
        let path = resolve_model_path(spec)?;
        if path.is_file() {
            let ext = path
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
                .unwrap_or_default();
            return match ext.as_str() {
                "safetensors" => Self::load_single_file(&path, spec, opts),
                "ckpt" | "pt" | "pth" | "bin" => Err(Error::Unsupported(format!(
                    "{}: pickle checkpoints are not loaded (unpickling can run arbitrary code); \
                     convert it to safetensors first, e.g. with \
                     `python -c \"import torch, safetensors.torch as s; \
                     s.save_file({{k: v.contiguous() for k, v in torch.load('{0}', weights_only=True)['state_dict'].items() \
                     if hasattr(v, 'contiguous')}}, '{0}.safetensors')\"`",
                    path.display()
                ))),
                _ => Err(Error::Unsupported(format!(
                    "{}: not a model (expected a diffusers folder or a .safetensors checkpoint)",
                    path.display()
                ))),
            };
        }
        Self::load_diffusers(&path, spec, opts)
    }

    /// A single-file checkpoint in the original key layout (SD 1.x/2.x/XL).
    fn load_single_file(path: &Path, name: &str, opts: &LoadOptions) -> Result<Self> {
        use crate::single_file as sf;
        let shapes = sf::read_shapes(path)?;
        if !shapes.keys().any(|k| k.starts_with(sf::UNET_PREFIX)) {
            return Err(Error::Unsupported(format!(
                "{}: not a Stable Diffusion checkpoint (no `{}*` tensors)",
                path.display(),
                sf::UNET_PREFIX
            )));
        }
        refuse_other_models(path, sf::other_model(&shapes))?;
        let mut d = sf::detect(&shapes).map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        let prediction = opts
            .prediction_type
            .clone()
            .or_else(|| sf::sidecar_prediction(path))
            .unwrap_or_else(|| "epsilon".into());
        let mut scheduler = sf::scheduler_for(&prediction);
        let (mut tokenizer, mut tokenizer_2) = (None, None);
        if let Some(dir) = &opts.config_dir {
            d.unet = read_json(&dir.join("unet/config.json"))?;
            d.vae = read_json(&dir.join("vae/config.json"))?;
            let mut text: ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
            text.use_penultimate_layer = false;
            d.text = text;
            if d.text_2.is_some() {
                d.text_2 = Some(read_json(&dir.join("text_encoder_2/config.json"))?);
            }
            let sp = dir.join("scheduler/scheduler_config.json");
            if sp.is_file() {
                scheduler = SchedulerConfig::from_file(&sp)?;
                if let Some(p) = &opts.prediction_type {
                    scheduler.prediction_type = p.clone();
                }
            }
            if dir.join("tokenizer/vocab.json").is_file() {
                tokenizer = Some(ClipTokenizer::from_dir(&dir.join("tokenizer"))?);
            }
            if dir.join("tokenizer_2/vocab.json").is_file() {
                tokenizer_2 = Some(ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?);
            }
        } else if d.openclip && prediction == "v_prediction" {
            // SD 2.x 768-v: 96×96 latents and upcast attention, as its config says.
            d.unet.sample_size = 96;
            d.unet.upcast_attention = true;
        }
        scheduler.validate()?;
        let tokenizer = match tokenizer {
            Some(t) => t,
            None if d.openclip => ClipTokenizer::bundled_with_pad("!"),
            None => ClipTokenizer::bundled(),
        };
        let family = Family::of(&d.unet);
        let (dev, dt) = (&opts.device, opts.dtype);
        let stores = sf::open_stores(path, &d, dev, dt, vae_dtype(family, dt, &d.vae))?;
        let label = path.display().to_string();
        let required = tensor_lists(&d.unet, &d.vae, &d.text)?;
        let in_order = [&stores.unet, &stores.vae, &stores.text];
        for ((component, tensors), store) in required.iter().zip(in_order) {
            check_complete(store, tensors, &format!("{label} ({component})"))?;
        }
        if let (Some(c), Some(store)) = (&d.text_2, &stores.text_2) {
            let tensors = crate::tensors::text_encoder_2_list(c)?;
            check_complete(store, &tensors, &format!("{label} (text_encoder_2)"))?;
        }
        let extra = sf::unclaimed_keys(&shapes, &d);
        if !extra.is_empty() {
            let shown: Vec<&str> = extra.iter().take(8).map(|s| s.as_str()).collect();
            tracing::warn!(
                "{label}: {} tensor{} not used: {}{}",
                extra.len(),
                if extra.len() == 1 { " is" } else { "s are" },
                shown.join(", "),
                if extra.len() > 8 { ", …" } else { "" }
            );
        }
        let fingerprint = unet_fingerprint(&stores.unet)?;
        let unet = UNet2DConditionModel::load(&stores.unet.root(), &d.unet)?
            .with_execution(opts.execution);
        let vae = AutoencoderKL::load(&stores.vae.root(), &d.vae)?;
        let text_encoder = ClipTextTransformer::load(&stores.text.root(), &d.text)?;
        let text_encoder_2 = match (&d.text_2, &stores.text_2) {
            (Some(c), Some(store)) => Some(SecondTextEncoder {
                // SDXL's second tokenizer: the same vocabulary, padding with `!`
                tokenizer: tokenizer_2.unwrap_or_else(|| ClipTokenizer::bundled_with_pad("!")),
                model: ClipTextModelWithProjection::load(&store.root(), c)?,
            }),
            _ => None,
        };
        let sd = Self {
            tokenizer,
            text_encoder,
            text_encoder_2,
            zeros_for_empty_prompt: family == Family::Sdxl,
            unet,
            vae,
            scheduler,
            fingerprint,
            name: name.to_string(),
            path: path.to_path_buf(),
            device: dev.clone(),
            dtype: dt,
        };
        sd.check_text_widths()?;
        Ok(sd)
    }

    fn load_diffusers(dir: &Path, name: &str, opts: &LoadOptions) -> Result<Self> {
        let index = dir.join("model_index.json");
        if !index.is_file() && !dir.join("unet").is_dir() {
            return Err(Error::Msg(format!(
                "{}: not a diffusers model folder (no model_index.json, no unet/)",
                dir.display()
            )));
        }
        let pipeline: serde_json::Value = match index.is_file() {
            true => read_json(&index)?,
            false => serde_json::Value::Null,
        };
        refuse_other_pipelines(dir, &pipeline)?;
        let (dev, dt) = (&opts.device, opts.dtype);
        let unet_cfg: UNetConfig = read_json(&dir.join("unet/config.json"))?;
        let family = Family::of(&unet_cfg);
        let vae_cfg: VaeConfig = read_json(&dir.join("vae/config.json"))?;
        let text_cfg: ClipTextConfig = read_json(&dir.join("text_encoder/config.json"))?;
        let sched_path = dir.join("scheduler/scheduler_config.json");
        let scheduler = if sched_path.is_file() {
            SchedulerConfig::from_file(&sched_path)?
        } else {
            tracing::warn!(
                "{}: missing; using Stable Diffusion's DDIM defaults",
                sched_path.display()
            );
            SchedulerConfig::default()
        };
        let tok_dir = dir.join("tokenizer");
        let tokenizer = if tok_dir.join("vocab.json").is_file() {
            ClipTokenizer::from_dir(&tok_dir)?
        } else {
            tracing::warn!(
                "{}: no vocab.json; using the bundled CLIP vocabulary",
                tok_dir.display()
            );
            ClipTokenizer::bundled()
        };

        let unet_store = WeightStore::open(
            &component_weight_files(&dir.join("unet"), "diffusion_pytorch_model")?,
            dev,
            dt,
        )?;
        let fingerprint = unet_fingerprint(&unet_store)?;
        let unet = UNet2DConditionModel::load(&unet_store.root(), &unet_cfg)
            .map_err(|e| with_component(e, "unet", &dir.join("unet/config.json")))?
            .with_execution(opts.execution);
        drop(unet_store);
        let vae_store = WeightStore::open(
            &component_weight_files(&dir.join("vae"), "diffusion_pytorch_model")?,
            dev,
            vae_dtype(family, dt, &vae_cfg),
        )?;
        let vae = AutoencoderKL::load(&vae_store.root(), &vae_cfg)
            .map_err(|e| with_component(e, "vae", &dir.join("vae/config.json")))?;
        drop(vae_store);
        let text_store = WeightStore::open(
            &component_weight_files(&dir.join("text_encoder"), "model")?,
            dev,
            dt,
        )?;
        let text_encoder =
            ClipTextTransformer::load(&text_store.root(), &text_cfg).map_err(|e| {
                with_component(e, "text_encoder", &dir.join("text_encoder/config.json"))
            })?;
        drop(text_store);
        let text_encoder_2 = match family {
            Family::Sdxl => Some(SecondTextEncoder::load_diffusers(dir, dev, dt)?),
            Family::Sd1 | Family::Sd2 => None,
        };
        let zeros_for_empty_prompt = pipeline
            .get("force_zeros_for_empty_prompt")
            .and_then(|v| v.as_bool())
            .unwrap_or(family == Family::Sdxl);
        let sd = Self {
            tokenizer,
            text_encoder,
            text_encoder_2,
            zeros_for_empty_prompt,
            unet,
            vae,
            scheduler,
            fingerprint,
            name: name.to_string(),
            path: dir.to_path_buf(),
            device: dev.clone(),
            dtype: dt,
        };
        sd.check_text_widths()?;
        Ok(sd)
    }

    /// The model family, by its UNet.
    pub fn family(&self) -> Family {
        Family::of(self.unet.config())
    }

    /// Checks that the text encoders give what the UNet takes.
    fn check_text_widths(&self) -> Result<()> {
        let unet = self.unet.config();
        let pooled = self
            .text_encoder_2
            .as_ref()
            .map(|e| e.model.projection_dim());
        let wanted = unet.text_time().map(|d| d.text);
        if self.context_dim() != unet.cross_attention_dim || pooled != wanted {
            return Err(Error::Config {
                path: self.path.clone(),
                msg: format!(
                    "the text encoders give a context {} wide{}, but the UNet takes {}{}",
                    self.context_dim(),
                    pooled.map_or(String::new(), |p| format!(
                        " and a pooled embedding {p} wide"
                    )),
                    unet.cross_attention_dim,
                    wanted.map_or(String::new(), |p| format!(" and {p}")),
                ),
            });
        }
        Ok(())
    }

    /// A [`crate::unet::ContextTape`] for latents `z` `[B, C, h, w]` at `timestep`, for
    /// passes with embeddings like `like` (B rows; SDXL's time ids follow the latents'
    /// size); `None` where the UNet runs candle's graph.
    pub fn context_tape(
        &self,
        z: &Tensor,
        timestep: f64,
        like: &PromptEmbeds,
    ) -> Result<Option<crate::unet::ContextTape<'_>>> {
        let added = self.added_cond(like, z)?;
        self.unet
            .context_tape_conditioned(z, timestep, added.as_ref())
    }

    /// Pixels per latent cell (8 for SD).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae.config().downsampling()
    }

    /// The image size the UNet was trained at (512 for SD 1.x, 256 for the tiny fixture),
    /// as its config says: callers bound it as they bound a size a user asks for.
    pub fn default_image_size(&self) -> usize {
        self.unet
            .config()
            .sample_size
            .saturating_mul(self.vae_scale_factor())
    }

    pub fn latent_channels(&self) -> usize {
        self.unet.config().in_channels
    }

    /// The context's width D (SDXL: both encoders' widths added).
    pub fn context_dim(&self) -> usize {
        self.text_encoder.hidden_size()
            + self
                .text_encoder_2
                .as_ref()
                .map_or(0, |e| e.model.text_model.hidden_size())
    }

    /// The pooled embedding's width P (SDXL), `None` for SD 1.x/2.x.
    pub fn pooled_dim(&self) -> Option<usize> {
        self.text_encoder_2
            .as_ref()
            .map(|e| e.model.projection_dim())
    }

    /// Tokenizes `prompts` (padded or truncated to 77) and encodes them, as diffusers'
    /// pipelines do: the context `[B, 77, D]` and, for SDXL, the pooled embedding `[B, P]`
    /// (f32). The encodings are the first tokenizer's: the word positions for
    /// Prompt-to-Prompt. SDXL's second tokenizer puts every word at the same position (it
    /// pads with `!` instead of the end token, and splits runs of `!` one character at a
    /// time where the first has tokens such as `!!`); the contexts are concatenated position
    /// by position all the same, as diffusers does.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<(PromptEmbeds, Vec<Encoding>)> {
        let (ids, encodings) = token_ids(&self.tokenizer, prompts, &self.device)?;
        let embeds = match &self.text_encoder_2 {
            None => PromptEmbeds::context(self.text_encoder.forward(&ids)?.to_dtype(DType::F32)?),
            Some(second) => {
                let (ids_2, _) = token_ids(&second.tokenizer, prompts, &self.device)?;
                let (h1, _) = self.text_encoder.hidden_states(&ids)?;
                let (h2, pooled) = second.model.forward(&ids_2)?;
                // [B, 77, D₁] ‖ [B, 77, D₂] -> [B, 77, D₁ + D₂]
                PromptEmbeds {
                    context: Tensor::cat(&[&h1, &h2], 2)?.to_dtype(DType::F32)?,
                    pooled: Some(pooled.to_dtype(DType::F32)?),
                }
            }
        };
        Ok((embeds, encodings))
    }

    /// The embeddings of one prompt (one row).
    pub fn encode_prompt(&self, prompt: &str) -> Result<PromptEmbeds> {
        Ok(self.encode_prompts(&[prompt])?.0)
    }

    /// The embeddings of a negative prompt (the unconditional input of classifier-free
    /// guidance): zeros for the empty prompt of a model that says so
    /// ([`Self::zeros_for_empty_prompt`], SDXL), else the prompt's encoding.
    pub fn encode_negative(&self, prompt: &str) -> Result<PromptEmbeds> {
        if !(prompt.is_empty() && self.zeros_for_empty_prompt) {
            return self.encode_prompt(prompt);
        }
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &self.device);
        Ok(PromptEmbeds {
            context: zeros(&[1, MAX_LEN, self.context_dim()])?,
            pooled: self.pooled_dim().map(|p| zeros(&[1, p])).transpose()?,
        })
    }

    /// SDXL's added conditioning of `embeds` for latents `z` `[B, C, h, w]`: their pooled
    /// embeddings, and the time ids of an uncropped image of the latents' size (original
    /// and target size both the image's, as the pipeline's defaults are). `None` for SD
    /// 1.x/2.x.
    pub fn added_cond(&self, embeds: &PromptEmbeds, z: &Tensor) -> Result<Option<AddedCond>> {
        let Some(pooled) = &embeds.pooled else {
            return Ok(None);
        };
        let (_, _, h, w) = z.dims4()?;
        let f = self.vae_scale_factor();
        let size = (h * f, w * f);
        let ids = crate::sdxl::time_ids(size, (0, 0), size);
        Ok(Some(AddedCond::new(pooled.clone(), ids)?))
    }

    /// The UNet's output for latents `z` `[B, C, h, w]` at `timestep` with prompt
    /// `embeds` (B rows), calling `control` at every attention layer with `step`.
    pub fn predict(
        &self,
        z: &Tensor,
        timestep: f64,
        embeds: &PromptEmbeds,
        control: &mut dyn crate::AttentionControl,
        step: usize,
    ) -> Result<Tensor> {
        let added = self.added_cond(embeds, z)?;
        self.unet
            .forward_conditioned(z, timestep, &embeds.context, added.as_ref(), control, step)
    }

    /// Image `[B, 3, H, W]` in [−1, 1] → z₀ = encoder mean × scaling factor (f32).
    pub fn image_to_latent(&self, image: &Tensor) -> Result<Tensor> {
        let d = self.vae.encode(image)?;
        let z = (d.mean.to_dtype(DType::F32)? * self.vae.config().scaling_factor)?;
        Ok(match self.vae.config().shift_factor {
            Some(s) => (z - s)?,
            None => z,
        })
    }

    /// Latents → images `[B, 3, H, W]` in [0, 1] (f32): D(z / scaling factor)/2 + ½, clamped.
    pub fn latent_to_image(&self, z: &Tensor) -> Result<Tensor> {
        let c = self.vae.config();
        let z = match c.shift_factor {
            Some(s) => (z + s)?,
            None => z.clone(),
        };
        let x = self
            .vae
            .decode(&(z / c.scaling_factor)?)?
            .to_dtype(DType::F32)?;
        Ok(((x / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }
}

/// Token ids `[B, 77]` of `prompts` by `tokenizer`, and their encodings.
fn token_ids(
    tokenizer: &ClipTokenizer,
    prompts: &[&str],
    device: &Device,
) -> Result<(Tensor, Vec<Encoding>)> {
    let encodings: Vec<Encoding> = prompts.iter().map(|p| tokenizer.encode_padded(p)).collect();
    let ids: Vec<u32> = encodings
        .iter()
        .flat_map(|e| e.ids.iter().copied())
        .collect();
    Ok((
        Tensor::from_vec(ids, (prompts.len(), MAX_LEN), device)?,
        encodings,
    ))
}

/// The VAE's dtype: SDXL's VAE overflows in f16, so as diffusers' XL pipelines, run it in
/// f32 there.
fn vae_dtype(family: Family, dtype: DType, vae: &VaeConfig) -> DType {
    match family == Family::Sdxl && dtype == DType::F16 && vae.force_upcast {
        true => DType::F32,
        false => dtype,
    }
}

/// Refuses the diffusers pipelines whose UNet takes other inputs than a text-to-image
/// model's: SDXL's refiner (aesthetic-score conditioning) and inpainting models (a mask
/// and a masked image beside the latent).
fn refuse_other_pipelines(dir: &Path, pipeline: &serde_json::Value) -> Result<()> {
    let class = pipeline
        .get("_class_name")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    let aesthetic = pipeline
        .get("requires_aesthetics_score")
        .and_then(|v| v.as_bool())
        .unwrap_or(false);
    let what = if aesthetic
        || (!dir.join("text_encoder").is_dir() && dir.join("text_encoder_2").is_dir())
    {
        Some(SDXL_REFINER)
    } else if class.contains("Inpaint") {
        Some(INPAINTING)
    } else {
        None
    };
    refuse_other_models(dir, what)
}

/// What a refused SDXL refiner is.
pub(crate) const SDXL_REFINER: &str =
    "an SDXL refiner (its UNet takes an aesthetic score and only the second text encoder's context)";
/// What a refused inpainting model is.
pub(crate) const INPAINTING: &str =
    "an inpainting model (its UNet takes a mask and the masked image beside the latent)";

/// Fails if `what` names a model nulltext refuses (see [`refuse_other_pipelines`] and
/// [`crate::single_file::other_model`]).
fn refuse_other_models(path: &Path, what: Option<&str>) -> Result<()> {
    match what {
        Some(what) => Err(Error::Unsupported(format!(
            "{} is {what}; nulltext inverts and edits photos with text-to-image models such as \
             SD 1.5, SD 2.1 or SDXL base",
            path.display()
        ))),
        None => Ok(()),
    }
}

fn with_component(e: Error, component: &str, config: &Path) -> Error {
    match e {
        Error::Unsupported(msg) => Error::Config {
            path: config.to_path_buf(),
            msg: format!("{component}: {msg}"),
        },
        e => e,
    }
}
