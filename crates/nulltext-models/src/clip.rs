//! The CLIP text transformer (transformers `CLIPTextModel`): SD 1.x's text encoder.
//!
//! Output: the last hidden state after the final layer norm, `[B, 77, hidden]`; with
//! `use_penultimate_layer` (SD 2.x), the penultimate layer's output through the final norm.

use candle_core::{DType, Device, Tensor};

use crate::config::ClipTextConfig;
use crate::error::Result;
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
    /// Loads from `vb` positioned at the model root (keys `text_model.*`).
    pub fn load(vb: &Vb, config: &ClipTextConfig) -> Result<Self> {
        config.validate()?;
        let vb = vb.pp("text_model");
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

    pub fn hidden_size(&self) -> usize {
        self.config.hidden_size
    }

    fn causal_mask(l: usize, device: &Device, dtype: DType) -> Result<Tensor> {
        let mask: Vec<f32> = (0..l)
            .flat_map(|i| (0..l).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
            .collect();
        Ok(Tensor::from_vec(mask, (1, 1, l, l), device)?.to_dtype(dtype)?)
    }

    /// `ids`: `[B, L]` (u32). Returns `[B, L, hidden]`.
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2()?;
        let dtype = self.token_embedding.dtype();
        let tok = self
            .token_embedding
            .index_select(&ids.flatten_all()?, 0)?
            .reshape((b, l, self.config.hidden_size))?;
        let pos = self.position_embedding.narrow(0, 0, l)?;
        let mut x = tok.broadcast_add(&pos)?;
        let mask = Self::causal_mask(l, ids.device(), dtype)?;
        let n = if self.config.use_penultimate_layer {
            self.layers.len() - 1
        } else {
            self.layers.len()
        };
        for layer in &self.layers[..n] {
            x = layer.forward(&x, &mask)?;
        }
        self.final_layer_norm.forward(&x)
    }
}
