//! Sinusoidal timestep embedding (diffusers `get_timestep_embedding`, `TimestepEmbedding`)
//! and SDXL's added text/time embedding (`unet_2d_condition.py`, `addition_embed_type`
//! `"text_time"`).

use candle_core::{DType, Device, Tensor};

use crate::config::{TextTimeDims, UNetConfig, TIME_IDS};
use crate::error::Result;
use crate::nn::Linear;
use crate::weights::Vb;

/// `[B, dim]` sinusoidal embedding of `timesteps`, computed in f32 as diffusers does:
/// frequencies `exp(−ln(10000)·i / (dim/2 − shift))`, then `[sin, cos]` (flipped to
/// `[cos, sin]` with `flip_sin_to_cos`).
pub fn timestep_embedding(
    timesteps: &[f64],
    dim: usize,
    flip_sin_to_cos: bool,
    shift: f64,
    device: &Device,
) -> Result<Tensor> {
    let half = dim / 2;
    let neg_log = -(10000f64.ln()) as f32;
    let denom = (half as f64 - shift) as f32;
    let freqs: Vec<f32> = (0..half)
        .map(|i| ((neg_log * i as f32) / denom).exp())
        .collect();
    let mut data = Vec::with_capacity(timesteps.len() * dim);
    for &t in timesteps {
        let args: Vec<f32> = freqs.iter().map(|f| t as f32 * f).collect();
        let sin = args.iter().map(|a| a.sin());
        let cos = args.iter().map(|a| a.cos());
        if flip_sin_to_cos {
            data.extend(cos.chain(sin));
        } else {
            data.extend(sin.chain(cos));
        }
        if dim % 2 == 1 {
            data.push(0.0);
        }
    }
    Ok(Tensor::from_vec(data, (timesteps.len(), dim), device)?)
}

/// Two linear layers with a SiLU between them.
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn load(vb: &Vb, in_dim: usize, dim: usize) -> Result<Self> {
        Ok(Self {
            linear_1: Linear::load(&vb.pp("linear_1"), in_dim, dim, true)?,
            linear_2: Linear::load(&vb.pp("linear_2"), dim, dim, true)?,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.linear_2.forward(&self.linear_1.forward(x)?.silu()?)
    }
}

/// SDXL's added conditioning (diffusers `addition_embed_type: "text_time"`): each time id
/// embedded sinusoidally (`add_time_proj`), concatenated after the pooled text embedding
/// and projected by `add_embedding` to the time embedding's width, to which it is added.
pub struct TextTimeEmbedding {
    add_embedding: TimestepEmbedding,
    dims: TextTimeDims,
    flip_sin_to_cos: bool,
    freq_shift: f64,
}

impl TextTimeEmbedding {
    /// Loads `add_embedding` from `vb` (the UNet's root) for a time embedding `dim` wide.
    pub fn load(vb: &Vb, config: &UNetConfig, dims: TextTimeDims, dim: usize) -> Result<Self> {
        let input = dims.text + TIME_IDS * dims.time;
        Ok(Self {
            add_embedding: TimestepEmbedding::load(&vb.pp("add_embedding"), input, dim)?,
            dims,
            flip_sin_to_cos: config.flip_sin_to_cos,
            freq_shift: config.freq_shift,
        })
    }

    /// The widths this embedding takes.
    pub fn dims(&self) -> TextTimeDims {
        self.dims
    }

    /// `[B, dim]` from `text_embeds` `[B, text]` and `time_ids` `[B, 6]`, in `dtype`.
    pub fn forward(&self, text_embeds: &Tensor, time_ids: &Tensor, dtype: DType) -> Result<Tensor> {
        let (b, n) = time_ids.dims2()?;
        let ids: Vec<f64> = time_ids
            .to_dtype(DType::F64)?
            .flatten_all()?
            .to_vec1::<f64>()?;
        // (B·6, time) -> (B, 6·time)
        let t = timestep_embedding(
            &ids,
            self.dims.time,
            self.flip_sin_to_cos,
            self.freq_shift,
            time_ids.device(),
        )?
        .reshape((b, n * self.dims.time))?;
        // each part cast on its own: the same values as casting the concatenation, and an
        // f64 model keeps an f64 embedding's digits (and their gradient)
        let x = Tensor::cat(&[&text_embeds.to_dtype(dtype)?, &t.to_dtype(dtype)?], 1)?;
        self.add_embedding.forward(&x)
    }
}
