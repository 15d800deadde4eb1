//! Sinusoidal timestep embedding (diffusers `get_timestep_embedding`, `TimestepEmbedding`).

use candle_core::{Device, Tensor};

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
