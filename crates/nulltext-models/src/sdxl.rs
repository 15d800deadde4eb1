//! What SDXL adds to Stable Diffusion's inputs (diffusers `pipeline_stable_diffusion_xl.py`):
//! two text encoders whose penultimate hidden states are concatenated into the context, the
//! second one's pooled projection, and the `time_ids` of original size, crop and target
//! size. The UNet takes the last two as an [`AddedCond`].

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::clip::ClipTextModelWithProjection;
use crate::config::{read_json, ClipTextConfig, UNetConfig, TIME_IDS};
use crate::error::Result;
use crate::model::component_weight_files;
use crate::tokenizer::ClipTokenizer;
use crate::unet::AddedCond;
use crate::weights::WeightStore;

/// The model families nulltext tells apart, by their UNet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// Stable Diffusion 1.x: CLIP ViT-L context (768 wide, or any width without the marks
    /// of the others).
    Sd1,
    /// Stable Diffusion 2.x: OpenCLIP ViT-H context (1024 wide).
    Sd2,
    /// Stable Diffusion XL: two text encoders and the added text/time conditioning.
    Sdxl,
}

impl Family {
    /// The family of a UNet config.
    pub fn of(unet: &UNetConfig) -> Self {
        if unet.text_time().is_some() {
            Family::Sdxl
        } else if unet.cross_attention_dim == 1024 {
            Family::Sd2
        } else {
            Family::Sd1
        }
    }

    /// How `info` names it.
    pub fn name(self) -> &'static str {
        match self {
            Family::Sd1 => "SD 1.x",
            Family::Sd2 => "SD 2.x",
            Family::Sdxl => "SDXL",
        }
    }
}

/// The `time_ids` of one image, in the pipeline's order: original size, crop top-left and
/// target size, each (height, width) in pixels.
pub fn time_ids(
    original: (usize, usize),
    crop_top_left: (usize, usize),
    target: (usize, usize),
) -> [f32; TIME_IDS] {
    let [(a, b), (c, d), (e, f)] = [original, crop_top_left, target];
    [a, b, c, d, e, f].map(|v| v as f32)
}

impl AddedCond {
    /// The conditioning of `text_embeds` `[B, P]`, each row with the same `ids` (from
    /// [`time_ids`]).
    pub fn new(text_embeds: Tensor, ids: [f32; TIME_IDS]) -> Result<Self> {
        let b = text_embeds.dim(0)?;
        let time_ids = Tensor::from_vec(ids.repeat(b), (b, TIME_IDS), text_embeds.device())?;
        Ok(Self {
            text_embeds,
            time_ids,
        })
    }
}

/// SDXL's second tokenizer and text encoder: OpenCLIP ViT-bigG with its projection
/// (`tokenizer_2/`, `text_encoder_2/`), whose penultimate hidden states follow the first
/// encoder's in the context and whose projected pooled output is the UNet's `text_embeds`.
pub struct SecondTextEncoder {
    /// Pads with `!` where the first tokenizer pads with the end token.
    pub tokenizer: ClipTokenizer,
    pub model: ClipTextModelWithProjection,
}

impl SecondTextEncoder {
    /// Loads `tokenizer_2/` and `text_encoder_2/` of a diffusers folder.
    pub fn load_diffusers(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let sub = dir.join("text_encoder_2");
        let store = WeightStore::open(&component_weight_files(&sub, "model")?, device, dtype)?;
        let config: ClipTextConfig = read_json(&sub.join("config.json"))?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
            model: ClipTextModelWithProjection::load(&store.root(), &config)?,
        })
    }
}
