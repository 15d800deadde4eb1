//! What SDXL adds to Stable Diffusion's inputs (diffusers `pipeline_stable_diffusion_xl.py`):
//! two text encoders whose penultimate hidden states are concatenated into the context, the
//! second one's pooled projection, and the `time_ids` of original size, crop and target
//! size. The UNet takes the last two as an [`AddedCond`].

use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::clip::{ClipTextModelWithProjection, ClipTextTransformer};
use crate::config::{read_json, ClipTextConfig, UNetConfig, TIME_IDS};
use crate::error::Result;
use crate::model::component_weight_files;
use crate::tokenizer::{ClipTokenizer, Encoding, MAX_LEN};
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

/// Prompts encoded as SDXL's UNet takes them.
pub struct PromptEmbeds {
    /// `[B, 77, D₁ + D₂]`: both encoders' penultimate hidden states, concatenated (f32).
    pub context: Tensor,
    /// `[B, P]`: the second encoder's projected pooled output (f32).
    pub pooled: Tensor,
    /// The first tokenizer's encodings: the word positions for Prompt-to-Prompt. The
    /// second tokenizer puts every token at the same position, except in runs of `!` (its
    /// padding token, which it splits off one character at a time where the first
    /// tokenizer has tokens such as `!!`); the contexts are concatenated position by
    /// position all the same, as diffusers does.
    pub encodings: Vec<Encoding>,
}

/// SDXL's two tokenizers and text encoders: CLIP ViT-L (`text_encoder`) and OpenCLIP
/// ViT-bigG with its projection (`text_encoder_2`), as `encode_prompt` runs them.
pub struct TextEncoders {
    pub tokenizer: ClipTokenizer,
    pub text_encoder: ClipTextTransformer,
    /// Pads with `!` where the first pads with the end token.
    pub tokenizer_2: ClipTokenizer,
    pub text_encoder_2: ClipTextModelWithProjection,
}

impl TextEncoders {
    /// Loads `tokenizer/`, `text_encoder/`, `tokenizer_2/` and `text_encoder_2/` of a
    /// diffusers folder.
    pub fn load_diffusers(dir: &Path, device: &Device, dtype: DType) -> Result<Self> {
        let store = |sub: &str| -> Result<WeightStore> {
            WeightStore::open(
                &component_weight_files(&dir.join(sub), "model")?,
                device,
                dtype,
            )
        };
        let config =
            |sub: &str| -> Result<ClipTextConfig> { read_json(&dir.join(sub).join("config.json")) };
        let text_encoder =
            ClipTextTransformer::load(&store("text_encoder")?.root(), &config("text_encoder")?)?;
        let text_encoder_2 = ClipTextModelWithProjection::load(
            &store("text_encoder_2")?.root(),
            &config("text_encoder_2")?,
        )?;
        Ok(Self {
            tokenizer: ClipTokenizer::from_dir(&dir.join("tokenizer"))?,
            text_encoder,
            tokenizer_2: ClipTokenizer::from_dir(&dir.join("tokenizer_2"))?,
            text_encoder_2,
        })
    }

    /// The context's width, D₁ + D₂ (the UNet's `cross_attention_dim`).
    pub fn context_dim(&self) -> usize {
        self.text_encoder.hidden_size() + self.text_encoder_2.text_model.hidden_size()
    }

    /// The pooled embedding's width.
    pub fn pooled_dim(&self) -> usize {
        self.text_encoder_2.projection_dim()
    }

    /// Tokenizes `prompts` with both tokenizers (padded or truncated to 77) and encodes them.
    pub fn encode_prompts(&self, prompts: &[&str]) -> Result<PromptEmbeds> {
        let device = self.text_encoder.device();
        let ids = |t: &ClipTokenizer| -> Result<(Tensor, Vec<Encoding>)> {
            let encs: Vec<Encoding> = prompts.iter().map(|p| t.encode_padded(p)).collect();
            let ids: Vec<u32> = encs.iter().flat_map(|e| e.ids.iter().copied()).collect();
            Ok((
                Tensor::from_vec(ids, (prompts.len(), MAX_LEN), &device)?,
                encs,
            ))
        };
        let (ids_1, encodings) = ids(&self.tokenizer)?;
        let (ids_2, _) = ids(&self.tokenizer_2)?;
        let (h1, _) = self.text_encoder.hidden_states(&ids_1)?;
        let (h2, pooled) = self.text_encoder_2.forward(&ids_2)?;
        // [B, 77, D₁] ‖ [B, 77, D₂] -> [B, 77, D₁ + D₂]
        let context = Tensor::cat(&[&h1, &h2], 2)?.to_dtype(DType::F32)?;
        Ok(PromptEmbeds {
            context,
            pooled: pooled.to_dtype(DType::F32)?,
            encodings,
        })
    }
}
