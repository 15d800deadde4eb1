//! CLIP (transformers `CLIPModel`: text and vision towers with their projections) for the
//! CLIP score of an image and a caption: 100 · max(cos(image embedding, text embedding), 0),
//! as torchmetrics' `CLIPScore` computes it. Loaded from a transformers folder
//! (`config.json` + `model.safetensors`), e.g. `openai/clip-vit-large-patch14`.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use serde::Deserialize;

use crate::clip::{ClipLayer, ClipTextTransformer};
use crate::config::ClipTextConfig;
use crate::error::{Error, Result};
use crate::nn::{LayerNorm, Linear};
use crate::tokenizer::ClipTokenizer;
use crate::weights::{Vb, WeightStore};

#[derive(Debug, Clone, Deserialize)]
pub struct ClipVisionConfig {
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub image_size: usize,
    pub patch_size: usize,
    #[serde(default = "quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
}

fn quick_gelu() -> String {
    "quick_gelu".into()
}
fn eps() -> f64 {
    1e-5
}

#[derive(Debug, Clone, Deserialize)]
struct ClipModelConfig {
    text_config: ClipTextConfig,
    vision_config: ClipVisionConfig,
    #[serde(default = "d_512")]
    projection_dim: usize,
}

fn d_512() -> usize {
    512
}

/// CLIP's vision transformer (pooled output: the class token after `post_layernorm`).
struct ClipVisionTransformer {
    class_embedding: Tensor,
    patch_embedding: Tensor,
    position_embedding: Tensor,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    post_layernorm: LayerNorm,
    config: ClipVisionConfig,
}

impl ClipVisionTransformer {
    fn load(vb: &Vb, c: &ClipVisionConfig) -> Result<Self> {
        if c.patch_size == 0 || !c.image_size.is_multiple_of(c.patch_size) {
            return Err(Error::Unsupported(format!(
                "CLIP vision: image size {} is not a multiple of the patch size {}",
                c.image_size, c.patch_size
            )));
        }
        // The layers are the text tower's, with the vision sizes.
        let as_text = ClipTextConfig {
            vocab_size: 0,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            max_position_embeddings: 0,
            hidden_act: c.hidden_act.clone(),
            layer_norm_eps: c.layer_norm_eps,
            use_penultimate_layer: false,
            projection_dim: None,
            eos_token_id: None,
        };
        as_text.validate()?;
        let h = c.hidden_size;
        let n = (c.image_size / c.patch_size).pow(2) + 1;
        let emb = vb.pp("embeddings");
        Ok(Self {
            class_embedding: emb.get(&[h], "class_embedding")?,
            patch_embedding: emb.get(
                &[h, 3, c.patch_size, c.patch_size],
                "patch_embedding.weight",
            )?,
            position_embedding: emb.get(&[n, h], "position_embedding.weight")?,
            pre_layrnorm: LayerNorm::load(&vb.pp("pre_layrnorm"), h, c.layer_norm_eps)?,
            layers: (0..c.num_hidden_layers)
                .map(|i| ClipLayer::load(&vb.pp(format!("encoder.layers.{i}")), &as_text))
                .collect::<Result<_>>()?,
            post_layernorm: LayerNorm::load(&vb.pp("post_layernorm"), h, c.layer_norm_eps)?,
            config: c.clone(),
        })
    }

    /// `pixels`: `[B, 3, S, S]`, normalized. Returns the pooled `[B, hidden]`.
    fn forward(&self, pixels: &Tensor) -> Result<Tensor> {
        let b = pixels.dim(0)?;
        let h = self.config.hidden_size;
        let patches = pixels
            .conv2d(&self.patch_embedding, 0, self.config.patch_size, 1, 1)?
            .flatten_from(2)?
            .transpose(1, 2)?; // [B, N, H]
        let cls = self
            .class_embedding
            .reshape((1, 1, h))?
            .broadcast_as((b, 1, h))?;
        let x = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.position_embedding)?;
        let mut x = self.pre_layrnorm.forward(&x.contiguous()?)?;
        let no_mask = Tensor::zeros((1, 1, 1, 1), x.dtype(), x.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &no_mask)?;
        }
        self.post_layernorm.forward(&x.narrow(1, 0, 1)?.squeeze(1)?)
    }
}

/// A CLIP model for scoring.
pub struct ClipScorer {
    text: ClipTextTransformer,
    vision: ClipVisionTransformer,
    text_projection: Linear,
    visual_projection: Linear,
    tokenizer: ClipTokenizer,
    pub device: Device,
}

/// CLIP's image normalization.
pub const CLIP_MEAN: [f32; 3] = [0.481_454_66, 0.457_827_5, 0.408_210_73];
pub const CLIP_STD: [f32; 3] = [0.268_629_54, 0.261_302_6, 0.275_777_1];

impl ClipScorer {
    /// Loads a transformers CLIP folder: `config.json`, `model.safetensors` (any float
    /// dtype) and, if present, the tokenizer's `vocab.json` + `merges.txt` (else the bundled
    /// CLIP vocabulary).
    pub fn load(dir: &Path, device: &Device) -> Result<Self> {
        let config_path = dir.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: ClipModelConfig = serde_json::from_str(&text).map_err(|e| {
            Error::Msg(format!(
                "{}: not a CLIP model config (text_config, vision_config): {e}",
                config_path.display()
            ))
        })?;
        let weights = dir.join("model.safetensors");
        if !weights.is_file() {
            return Err(Error::Msg(format!(
                "{}: missing (CLIP weights in safetensors)",
                weights.display()
            )));
        }
        let store = WeightStore::open(&[weights], device, DType::F32)?;
        let root = store.root();
        let c = &config;
        let text_model = ClipTextTransformer::load(&root, &c.text_config)?;
        let vision = ClipVisionTransformer::load(&root.pp("vision_model"), &c.vision_config)?;
        let text_projection = Linear::load(
            &root.pp("text_projection"),
            c.text_config.hidden_size,
            c.projection_dim,
            false,
        )?;
        let visual_projection = Linear::load(
            &root.pp("visual_projection"),
            c.vision_config.hidden_size,
            c.projection_dim,
            false,
        )?;
        let tokenizer = if dir.join("vocab.json").is_file() && dir.join("merges.txt").is_file() {
            ClipTokenizer::from_dir(dir)?
        } else {
            ClipTokenizer::bundled()
        };
        Ok(Self {
            text: text_model,
            vision,
            text_projection,
            visual_projection,
            tokenizer,
            device: device.clone(),
        })
    }

    /// The square size images are scored at.
    pub fn image_size(&self) -> usize {
        self.vision.config.image_size
    }

    /// Unit-norm text embedding `[1, P]` of a caption (cut at 77 tokens).
    pub fn text_embedding(&self, caption: &str) -> Result<Tensor> {
        let enc = self.tokenizer.encode_padded(caption);
        let ids = Tensor::new(enc.ids.as_slice(), &self.device)?.unsqueeze(0)?;
        let hidden = self.text.forward(&ids)?;
        // The pooled output is the hidden state of the end token.
        let pooled = hidden.narrow(1, enc.len - 1, 1)?.squeeze(1)?;
        unit(&self.text_projection.forward(&pooled)?)
    }

    /// Unit-norm image embedding `[1, P]` of normalized pixels `[1, 3, S, S]`.
    pub fn image_embedding(&self, pixels: &Tensor) -> Result<Tensor> {
        let pooled = self.vision.forward(pixels)?;
        unit(&self.visual_projection.forward(&pooled)?)
    }

    /// 100 · max(cos, 0) of normalized pixels and a caption.
    pub fn score(&self, pixels: &Tensor, caption: &str) -> Result<f64> {
        let cos = (self.image_embedding(pixels)? * self.text_embedding(caption)?)?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
        Ok((100.0 * cos).max(0.0))
    }
}

fn unit(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(x.broadcast_div(&n)?)
}
