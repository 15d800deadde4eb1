//! Typed model configurations, read from the model's own `config.json` files (diffusers and
//! transformers names), with diffusers' defaults for absent keys.

use std::path::Path;

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::{Error, Result};

/// A config value that is either one number for every block or one per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for each of `n` blocks.
    pub fn expand(&self, n: usize, what: &str) -> Result<Vec<usize>> {
        match self {
            PerBlock::One(v) => Ok(vec![*v; n]),
            PerBlock::Each(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Each(v) => Err(Error::Unsupported(format!(
                "`{what}` has {} entries for {n} blocks",
                v.len()
            ))),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BoolPerBlock {
    One(bool),
    Each(Vec<bool>),
}

fn d_4() -> usize {
    4
}
fn d_3() -> usize {
    3
}
fn d_1() -> usize {
    1
}
fn d_32() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_true() -> bool {
    true
}
fn d_one_f() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_head_dim() -> PerBlock {
    PerBlock::One(8)
}
fn d_tlpb() -> PerBlock {
    PerBlock::One(1)
}
fn d_default() -> String {
    "default".into()
}
fn d_positional() -> String {
    "positional".into()
}
fn d_mid_type() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_sample_64() -> usize {
    64
}

/// `unet/config.json` (diffusers `UNet2DConditionModel`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    #[serde(default = "d_mid_type")]
    pub mid_block_type: Option<String>,
    #[serde(default = "d_2_perblock")]
    pub layers_per_block: PerBlock,
    /// In SD 1.x/2.x configs this is, despite its name, the number of heads per block.
    #[serde(default = "d_head_dim")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    pub cross_attention_dim: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    /// SDXL's config writes `null` for false.
    #[serde(default, deserialize_with = "null_as_false")]
    pub upcast_attention: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_tlpb")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default)]
    pub only_cross_attention: Option<BoolPerBlock>,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default = "d_positional")]
    pub time_embedding_type: String,
    #[serde(default = "d_default")]
    pub resnet_time_scale_shift: String,
    #[serde(default = "d_3")]
    pub conv_in_kernel: usize,
    #[serde(default = "d_3")]
    pub conv_out_kernel: usize,
    #[serde(default = "d_sample_64")]
    pub sample_size: usize,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// `"text_time"` for SDXL: the pooled text embedding and six size/crop numbers,
    /// embedded and added to the time embedding.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL: the width of each `time_ids` number's sinusoidal embedding (256).
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: the input width of `add_embedding`, the pooled text embedding's plus six
    /// times `addition_time_embed_dim` (2816 = 1280 + 6 · 256).
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub num_class_embeds: Option<usize>,
}

/// How many numbers SDXL's `time_ids` hold per latent: original size, crop top-left and
/// target size, each as (height, width).
pub const TIME_IDS: usize = 6;

/// The widths of SDXL's added conditioning ([`UNetConfig::text_time`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TextTimeDims {
    /// The pooled text embedding's width (`text_embeds`).
    pub text: usize,
    /// The width of each time id's sinusoidal embedding.
    pub time: usize,
}

fn null_as_false<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<bool, D::Error> {
    Ok(Option::<bool>::deserialize(d)?.unwrap_or(false))
}

fn d_2_perblock() -> PerBlock {
    PerBlock::One(2)
}

impl UNetConfig {
    /// Refuses configurations whose architecture nulltext does not implement.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: &str| Err(Error::Unsupported(format!("UNet config: {what}")));
        if self.in_channels != self.out_channels {
            return Err(Error::Unsupported(format!(
                "UNet config: {} input channels for {} output channels: an inpainting (or \
                 otherwise image-conditioned) model, which takes a mask and a masked image \
                 beside the latent; nulltext inverts and edits with text-to-image models",
                self.in_channels, self.out_channels
            )));
        }
        match self.addition_embed_type.as_deref() {
            None => {}
            Some("text_time") => {
                let (Some(t), Some(p)) = (
                    self.addition_time_embed_dim,
                    self.projection_class_embeddings_input_dim,
                ) else {
                    return bad(
                        "`addition_embed_type: text_time` needs `addition_time_embed_dim` and \
                         `projection_class_embeddings_input_dim`",
                    );
                };
                if t == 0 || p <= TIME_IDS * t {
                    return bad(
                        "`projection_class_embeddings_input_dim` must exceed six times \
                         `addition_time_embed_dim`",
                    );
                }
            }
            Some(t) => {
                return Err(Error::Unsupported(format!(
                    "UNet config: `addition_embed_type: {t}` (only SDXL's `text_time` is supported)"
                )))
            }
        }
        if self.class_embed_type.is_some() || self.num_class_embeds.is_some() {
            return bad("class embeddings are not supported");
        }
        if self.encoder_hid_dim.is_some() || self.time_cond_proj_dim.is_some() {
            return bad("`encoder_hid_dim`/`time_cond_proj_dim` are not supported");
        }
        if self.dual_cross_attention {
            return bad("`dual_cross_attention` is not supported");
        }
        if self.time_embedding_type != "positional" {
            return bad("only `time_embedding_type: positional` is supported");
        }
        if self.resnet_time_scale_shift != "default" {
            return bad("only `resnet_time_scale_shift: default` is supported");
        }
        if self.act_fn != "silu" {
            return bad("only `act_fn: silu` is supported");
        }
        if let Some(BoolPerBlock::One(true)) = self.only_cross_attention {
            return bad("`only_cross_attention` is not supported");
        }
        if let Some(BoolPerBlock::Each(v)) = &self.only_cross_attention {
            if v.iter().any(|b| *b) {
                return bad("`only_cross_attention` is not supported");
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return bad("`block_out_channels`, `down_block_types` and `up_block_types` must have the same length");
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(Error::Unsupported(format!("UNet down block type `{t}`")));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(Error::Unsupported(format!("UNet up block type `{t}`")));
            }
        }
        match self.mid_block_type.as_deref() {
            Some("UNetMidBlock2DCrossAttn") | None => {}
            Some(t) => return Err(Error::Unsupported(format!("UNet mid block type `{t}`"))),
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return bad("even conv_in/conv_out kernels are not supported");
        }
        Ok(())
    }

    /// Heads per down block (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads_per_block(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }

    /// SDXL's added conditioning, when this UNet takes it: the widths of the pooled text
    /// embedding and of each time id's embedding.
    pub fn text_time(&self) -> Option<TextTimeDims> {
        match (
            self.addition_embed_type.as_deref(),
            self.addition_time_embed_dim,
            self.projection_class_embeddings_input_dim,
        ) {
            (Some("text_time"), Some(time), Some(input)) => Some(TextTimeDims {
                text: input.saturating_sub(TIME_IDS * time),
                time,
            }),
            _ => None,
        }
    }

    /// The latent's spatial downsampling factor of the UNet (2^(blocks-1)).
    pub fn total_downsampling(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn d_vae_down() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn d_vae_up() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn d_scaling() -> f64 {
    0.18215
}

/// `vae/config.json` (diffusers `AutoencoderKL`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_vae_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "d_vae_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default)]
    pub sample_size: Option<usize>,
    /// Whether the VAE overflows in f16 and must run in f32 there (SDXL's VAE; diffusers'
    /// XL pipelines read it).
    #[serde(default = "d_true")]
    pub force_upcast: bool,
}

impl VaeConfig {
    pub fn validate(&self) -> Result<()> {
        if self.act_fn != "silu" {
            return Err(Error::Unsupported("VAE config: only `act_fn: silu`".into()));
        }
        if self.block_out_channels.is_empty()
            || self.down_block_types.len() != self.block_out_channels.len()
            || self.up_block_types.len() != self.block_out_channels.len()
        {
            return Err(Error::Unsupported(
                "VAE config: block lists must have the same, non-zero length".into(),
            ));
        }
        Ok(())
    }

    /// Pixels per latent cell: 2^(levels-1).
    pub fn downsampling(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

fn d_vocab() -> usize {
    49408
}
fn d_12() -> usize {
    12
}
fn d_77() -> usize {
    77
}
fn d_quick_gelu() -> String {
    "quick_gelu".into()
}

/// `text_encoder/config.json` (transformers `CLIPTextModel`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClipTextConfig {
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    #[serde(default = "d_12")]
    pub num_hidden_layers: usize,
    #[serde(default = "d_12")]
    pub num_attention_heads: usize,
    #[serde(default = "d_77")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// nulltext extension, set for SD 2.x: use the penultimate layer (then the final norm).
    #[serde(default)]
    pub use_penultimate_layer: bool,
    /// The width of `text_projection` (`CLIPTextModelWithProjection`, SDXL's second text
    /// encoder).
    #[serde(default)]
    pub projection_dim: Option<usize>,
    /// The end token, whose position gives the pooled output; `2` (or absent) is
    /// transformers' legacy value, meaning "the position of the highest id".
    #[serde(default)]
    pub eos_token_id: Option<i64>,
}

impl ClipTextConfig {
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::Unsupported(format!(
                "text encoder activation `{}`",
                self.hidden_act
            )));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Unsupported(
                "text encoder: hidden_size must divide into the heads".into(),
            ));
        }
        Ok(())
    }
}

fn d_1000() -> usize {
    1000
}
fn d_beta_start() -> f64 {
    0.00085
}
fn d_beta_end() -> f64 {
    0.012
}
fn d_scaled_linear() -> String {
    "scaled_linear".into()
}
fn d_epsilon() -> String {
    "epsilon".into()
}
fn d_leading() -> String {
    "leading".into()
}

/// More training timesteps than any released scheduler uses; bounds the tables built from
/// a config.
pub const MAX_TRAIN_TIMESTEPS: usize = 100_000;

/// The DDIM settings, from `scheduler/config.json` (any diffusers scheduler's file carries
/// the same beta keys). Serialized into inversion files as the `scheduler` metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    #[serde(default = "d_1000")]
    pub num_train_timesteps: usize,
    #[serde(default = "d_beta_start")]
    pub beta_start: f64,
    #[serde(default = "d_beta_end")]
    pub beta_end: f64,
    #[serde(default = "d_scaled_linear")]
    pub beta_schedule: String,
    #[serde(default)]
    pub set_alpha_to_one: bool,
    #[serde(default = "d_1")]
    pub steps_offset: usize,
    #[serde(default = "d_epsilon")]
    pub prediction_type: String,
    #[serde(default = "d_leading")]
    pub timestep_spacing: String,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl SchedulerConfig {
    /// Reads a scheduler config as the Stable Diffusion pipeline uses it. Like diffusers'
    /// `StableDiffusionPipeline`, a `steps_offset` other than 1 is corrected to 1.
    pub fn from_file(path: &Path) -> Result<Self> {
        let mut c: SchedulerConfig = read_json(path)?;
        if c.steps_offset != 1 {
            tracing::warn!(
                "{}: steps_offset {} corrected to 1, as the Stable Diffusion pipeline does",
                path.display(),
                c.steps_offset
            );
            c.steps_offset = 1;
        }
        c.validate().map_err(|e| Error::Config {
            path: path.to_path_buf(),
            msg: e.to_string(),
        })?;
        Ok(c)
    }

    pub fn validate(&self) -> Result<()> {
        if !matches!(
            self.beta_schedule.as_str(),
            "scaled_linear" | "linear" | "squaredcos_cap_v2"
        ) {
            return Err(Error::Unsupported(format!(
                "beta_schedule `{}`",
                self.beta_schedule
            )));
        }
        if !matches!(self.prediction_type.as_str(), "epsilon" | "v_prediction") {
            return Err(Error::Unsupported(format!(
                "prediction_type `{}`",
                self.prediction_type
            )));
        }
        if !matches!(
            self.timestep_spacing.as_str(),
            "leading" | "trailing" | "linspace"
        ) {
            return Err(Error::Unsupported(format!(
                "timestep_spacing `{}`",
                self.timestep_spacing
            )));
        }
        // Numbers may come from a file nulltext did not write (an inversion's metadata):
        // each is bounded before tables are built from it.
        let n = self.num_train_timesteps;
        if n == 0 || n > MAX_TRAIN_TIMESTEPS {
            return Err(Error::Unsupported(format!(
                "num_train_timesteps = {n}; expected 1 to {MAX_TRAIN_TIMESTEPS}"
            )));
        }
        if self.steps_offset >= n {
            return Err(Error::Unsupported(format!(
                "steps_offset = {} is not below num_train_timesteps = {n}",
                self.steps_offset
            )));
        }
        for (k, v) in [("beta_start", self.beta_start), ("beta_end", self.beta_end)] {
            // Written so that NaN is refused too.
            if !(v > 0.0 && v < 1.0) {
                return Err(Error::Unsupported(format!(
                    "{k} = {v}; expected a number between 0 and 1"
                )));
            }
        }
        Ok(())
    }
}

/// Reads and parses a JSON config file, naming the file (and the key, where serde can)
/// in the error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::Config {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}
