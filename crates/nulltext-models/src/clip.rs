//! The CLIP text transformer (transformers `CLIPTextModel`): SD 1.x's text encoder, and
//! `CLIPTextModelWithProjection`, SDXL's second one.
//!
//! Output: the last hidden state after the final layer norm, `[B, 77, hidden]`; with
//! `use_penultimate_layer` (SD 2.x), the penultimate layer's output through the final norm.
//! SDXL takes the penultimate layer's output *without* the final norm
//! ([`ClipTextTransformer::hidden_states`]) and, from its second encoder, the pooled output
//! (the final-normed state at the end token) through `text_projection`.

use candle_core::{DType, Device, Tensor};

use crate::config::ClipTextConfig;
use crate::error::{Error, Result};
use crate::nn::{LayerNorm, Linear};
use crate::weights::Vb;

struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
}

impl ClipAttention {
    fn load(vb: &Vb, c: &ClipTextConfig) -> Result<Self> {
        let h = c.hidden_size;
        Ok(Self {
            q_proj: Linear::load(&vb.pp("q_proj"), h, h, true)?,
            k_proj: Linear::load(&vb.pp("k_proj"), h, h, true)?,
            v_proj: Linear::load(&vb.pp("v_proj"), h, h, true)?,
            out_proj: Linear::load(&vb.pp("out_proj"), h, h, true)?,
            heads: c.num_attention_heads,
        })
    }

    fn forward(&self, x: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (b, l, h) = x.dims3()?;
        let hd = h / self.heads;
        let split = |t: Tensor| -> Result<Tensor> {
            // (B, L, H) -> (B, heads, L, hd)
            Ok(t.reshape((b, l, self.heads, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let q = split((self.q_proj.forward(x)? * (hd as f64).powf(-0.5))?)?;
        let k = split(self.k_proj.forward(x)?)?;
        let v = split(self.v_proj.forward(x)?)?;
        let scores = q.matmul(&k.t()?)?.broadcast_add(causal_mask)?;
        let probs = crate::nn::softmax_last_dim(&scores)?;
        // (B, heads, L, hd) -> (B, L, H)
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, h))?;
        self.out_proj.forward(&out)
    }
}

pub(crate) struct ClipLayer {
    self_attn: ClipAttention,
    layer_norm1: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    layer_norm2: LayerNorm,
    quick_gelu: bool,
}

impl ClipLayer {
    pub(crate) fn load(vb: &Vb, c: &ClipTextConfig) -> Result<Self> {
        let eps = c.layer_norm_eps;
        Ok(Self {
            self_attn: ClipAttention::load(&vb.pp("self_attn"), c)?,
            layer_norm1: LayerNorm::load(&vb.pp("layer_norm1"), c.hidden_size, eps)?,
            fc1: Linear::load(&vb.pp("mlp.fc1"), c.hidden_size, c.intermediate_size, true)?,
            fc2: Linear::load(&vb.pp("mlp.fc2"), c.intermediate_size, c.hidden_size, true)?,
            layer_norm2: LayerNorm::load(&vb.pp("layer_norm2"), c.hidden_size, eps)?,
            quick_gelu: c.hidden_act == "quick_gelu",
        })
    }

    pub(crate) fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let h = self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?;
        let x = (x + h)?;
        let h = self.fc1.forward(&self.layer_norm2.forward(&x)?)?;
        let h = if self.quick_gelu {
            (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?
        } else {
            h.gelu_erf()?
        };
        Ok((x + self.fc2.forward(&h)?)?)
    }
}

/// CLIP's text transformer.
pub struct ClipTextTransformer {
    token_embedding: Tensor,
    position_embedding: Tensor,
    layers: Vec<ClipLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextTransformer {
    /// Loads from `vb` positioned at the model root: keys `text_model.*`, or the same keys
    /// without that prefix (as transformers 5 saves a `CLIPTextModel`).
    pub fn load(vb: &Vb, config: &ClipTextConfig) -> Result<Self> {
        config.validate()?;
        let token = "embeddings.token_embedding.weight";
        let unprefixed = vb.contains(token) && !vb.pp("text_model").contains(token);
        let vb = if unprefixed {
            vb.clone()
        } else {
            vb.pp("text_model")
        };
        let emb = vb.pp("embeddings");
        let c = config;
        let layers = (0..c.num_hidden_layers)
            .map(|i| ClipLayer::load(&vb.pp(format!("encoder.layers.{i}")), c))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: emb.get(&[c.vocab_size, c.hidden_size], "token_embedding.weight")?,
            position_embedding: emb.get(
                &[c.max_position_embeddings, c.hidden_size],
                "position_embedding.weight",
            )?,
            layers,
            final_layer_norm: LayerNorm::load(
                &vb.pp("final_layer_norm"),
                c.hidden_size,
                c.layer_norm_eps,
            )?,
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// Where the weights live.
    pub fn device(&self) -> Device {
        self.token_embedding.device().clone()
    }

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn causal_mask(l: usize, device: &Device, dtype: DType) -> Result<Tensor> {
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Ok(Tensor::from_vec(mask, (1, 1, l, l), device)?.to_dtype(dtype)?)
    }

    /// The embeddings followed by the first `n` layers: `[B, L, hidden]`, and the output
    /// of the layer before the last of them.
    fn layers(&self, ids: &Tensor, n: usize) -> Result<(Tensor, Tensor)> {
        let (b, l) = ids.dims2()?;
        let dtype = self.token_embedding.dtype();
        // (B·L, hidden) -> (B, L, hidden)
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, self.config.hidden_size))?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mask = Self::causal_mask(l, ids.device(), dtype)?;
        let mut before = x.clone();
        for layer in &self.layers[..n] {
            before = x;
            x = layer.forward(&before, &mask)?;
        }
        Ok((x, before))
    }

    /// `ids`: `[B, L]` (u32). Returns `[B, L, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let n = if self.config.use_penultimate_layer {
            self.layers.len() - 1
        } else {
            self.layers.len()
        };
        self.final_layer_norm.forward(&self.layers(ids, n)?.0)
    }

    /// SDXL's use of the encoder: the penultimate layer's output (`hidden_states[-2]`, no
    /// final norm) `[B, L, hidden]`, and the pooled output `[B, hidden]`: the final-normed
    /// last state at each row's end token.
    pub fn hidden_states(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (last, penultimate) = self.layers(ids, self.layers.len())?;
        // (B, L, hidden) -> (B·L, hidden) -> (B, hidden): row b's state at its end token
        let (b, l, h) = last.dims3()?;
        let flat: Vec<u32> = (self.end_positions(ids)?.into_iter().enumerate())
            .map(|(row, p)| (row * l) as u32 + p)
            .collect();
        let flat = Tensor::from_vec(flat, b, ids.device())?;
        let at_end = last.reshape((b * l, h))?.index_select(&flat, 0)?;
        Ok((penultimate, self.final_layer_norm.forward(&at_end)?))
    }

    /// Each row's end-token position, as transformers finds it: the first position of
    /// `eos_token_id`, or of the highest id under the legacy `eos_token_id` 2.
    fn end_positions(&self, ids: &Tensor) -> Result<Vec<u32>> {
        let rows: Vec<Vec<u32>> = ids.to_dtype(DType::U32)?.to_vec2()?;
        let eos = self.config.eos_token_id.filter(|e| *e != 2);
        Ok(rows
            .iter()
            .map(|r| {
                let target = match eos {
                    Some(e) => e as u32,
                    None => r.iter().copied().max().unwrap_or(0),
                };
                r.iter().position(|&i| i == target).unwrap_or(r.len() - 1) as u32
            })
            .collect())
    }
}

/// transformers' `CLIPTextModelWithProjection`: the text transformer and its
/// `text_projection` (no bias), SDXL's second text encoder.
pub struct ClipTextModelWithProjection {
    pub text_model: ClipTextTransformer,
    text_projection: Linear,
}

impl ClipTextModelWithProjection {
    /// Loads from `vb` positioned at the model root (keys `text_model.*`,
    /// `text_projection.weight`); the config must name `projection_dim`.
    pub fn load(vb: &Vb, config: &ClipTextConfig) -> Result<Self> {
        let proj = config.projection_dim.ok_or_else(|| {
            Error::Unsupported("text encoder with projection: no `projection_dim`".into())
        })?;
        Ok(Self {
            text_model: ClipTextTransformer::load(vb, config)?,
            text_projection: Linear::load(
                &vb.pp("text_projection"),
                config.hidden_size,
                proj,
                false,
            )?,
        })
    }

    /// The projection's width (the pooled embedding's).
    pub fn projection_dim(&self) -> usize {
        self.text_projection.weight.dims()[0]
    }

    /// SDXL: the penultimate layer's output `[B, L, hidden]` and the projected pooled
    /// output `text_embeds` `[B, projection_dim]`.
    pub fn forward(&self, ids: &Tensor) -> Result<(Tensor, Tensor)> {
        let (hidden, pooled) = self.text_model.hidden_states(ids)?;
        Ok((hidden, self.text_projection.forward(&pooled)?))
    }
}
