//! `AutoencoderKL`: the encoder's mean (no sampling) and the decoder.

use candle_core::Tensor;

use crate::config::VaeConfig;
use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetShape, Upsample2D};
use crate::weights::Vb;

const VAE_EPS: f64 = 1e-6;

/// Single-head spatial self-attention with a group norm and a residual (the VAE mid block's).
struct VaeAttention {
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    channels: usize,
}

impl VaeAttention {
    fn load(vb: &Vb, channels: usize, groups: usize) -> Result<Self> {
        // Older diffusers files name these query/key/value/proj_attn.
        let (q, k, v, o) = if vb.contains("to_q.weight") {
            ("to_q", "to_k", "to_v", "to_out.0")
        } else {
            ("query", "key", "value", "proj_attn")
        };
        Ok(Self {
            group_norm: GroupNorm::load(&vb.pp("group_norm"), groups, channels, VAE_EPS)?,
            to_q: Linear::load_maybe_conv(&vb.pp(q), channels, channels)?,
            to_k: Linear::load_maybe_conv(&vb.pp(k), channels, channels)?,
            to_v: Linear::load_maybe_conv(&vb.pp(v), channels, channels)?,
            to_out: Linear::load_maybe_conv(&vb.pp(o), channels, channels)?,
            channels,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let residual = x;
        // (B, C, H, W) -> (B, H·W, C)
        let hs = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?;
        let q = self.to_q.forward(&hs)?.unsqueeze(1)?;
        let k = self.to_k.forward(&hs)?.unsqueeze(1)?;
        let v = self.to_v.forward(&hs)?.unsqueeze(1)?;
        let scale = (self.channels as f64).powf(-0.5);
        let out = crate::attention::attention(&q, &k, &v, scale)?.squeeze(1)?;
        let out = self.to_out.forward(&out)?;
        // (B, H·W, C) -> (B, C, H, W)
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        Ok((out + residual)?)
    }
}

struct VaeMidBlock {
    resnet_0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet_1: ResnetBlock2D,
}

impl VaeMidBlock {
    fn load(vb: &Vb, channels: usize, groups: usize, attention: bool) -> Result<Self> {
        let shape = ResnetShape {
            in_channels: channels,
            out_channels: channels,
            temb_channels: None,
            groups,
            eps: VAE_EPS,
        };
        Ok(Self {
            resnet_0: ResnetBlock2D::load(&vb.pp("resnets.0"), shape)?,
            attention: if attention {
                Some(VaeAttention::load(
                    &vb.pp("attentions.0"),
                    channels,
                    groups,
                )?)
            } else {
                None
            },
            resnet_1: ResnetBlock2D::load(&vb.pp("resnets.1"), shape)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.resnet_0.forward(x, None)?;
        if let Some(a) = &self.attention {
            x = a.forward(&x)?;
        }
        self.resnet_1.forward(&x, None)
    }
}

fn resnet_shape(i: usize, o: usize, groups: usize) -> ResnetShape {
    ResnetShape {
        in_channels: i,
        out_channels: o,
        temb_channels: None,
        groups,
        eps: VAE_EPS,
    }
}

struct Encoder {
    conv_in: Conv2d,
    down: Vec<(Vec<ResnetBlock2D>, Option<Downsample2D>)>,
    mid: VaeMidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let ch = &c.block_out_channels;
        let g = c.norm_num_groups;
        let n = ch.len();
        let mut down = Vec::new();
        for i in 0..n {
            let vbb = vb.pp(format!("down_blocks.{i}"));
            let in_c = if i == 0 { ch[0] } else { ch[i - 1] };
            let resnets = (0..c.layers_per_block)
                .map(|j| {
                    let ic = if j == 0 { in_c } else { ch[i] };
                    ResnetBlock2D::load(&vbb.pp(format!("resnets.{j}")), resnet_shape(ic, ch[i], g))
                })
                .collect::<Result<Vec<_>>>()?;
            let ds = if i + 1 < n {
                Some(Downsample2D::load(&vbb.pp("downsamplers.0"), ch[i], 0)?)
            } else {
                None
            };
            down.push((resnets, ds));
        }
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.in_channels, ch[0], 3, 1, 1)?,
            down,
            mid: VaeMidBlock::load(&vb.pp("mid_block"), ch[n - 1], g, c.mid_block_add_attention)?,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, ch[n - 1], VAE_EPS)?,
            conv_out: Conv2d::load(
                &vb.pp("conv_out"),
                ch[n - 1],
                2 * c.latent_channels,
                3,
                1,
                1,
            )?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = self.conv_in.forward(x)?;
        for (resnets, ds) in &self.down {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(d) = ds {
                x = d.forward(&x)?;
            }
        }
        let x = self.mid.forward(&x)?;
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

struct Decoder {
    conv_in: Conv2d,
    mid: VaeMidBlock,
    up: Vec<(Vec<ResnetBlock2D>, Option<Upsample2D>)>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn load(vb: &Vb, c: &VaeConfig) -> Result<Self> {
        let ch: Vec<usize> = c.block_out_channels.iter().rev().copied().collect();
        let g = c.norm_num_groups;
        let n = ch.len();
        let mut up = Vec::new();
        let mut out_c = ch[0];
        for (i, &c_i) in ch.iter().enumerate() {
            let prev = out_c;
            out_c = c_i;
            let vbb = vb.pp(format!("up_blocks.{i}"));
            let resnets = (0..c.layers_per_block + 1)
                .map(|j| {
                    let ic = if j == 0 { prev } else { out_c };
                    ResnetBlock2D::load(&vbb.pp(format!("resnets.{j}")), resnet_shape(ic, out_c, g))
                })
                .collect::<Result<Vec<_>>>()?;
            let us = if i + 1 < n {
                Some(Upsample2D::load(&vbb.pp("upsamplers.0"), out_c)?)
            } else {
                None
            };
            up.push((resnets, us));
        }
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.latent_channels, ch[0], 3, 1, 1)?,
            mid: VaeMidBlock::load(&vb.pp("mid_block"), ch[0], g, c.mid_block_add_attention)?,
            up,
            conv_norm_out: GroupNorm::load(&vb.pp("conv_norm_out"), g, ch[n - 1], VAE_EPS)?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), ch[n - 1], c.out_channels, 3, 1, 1)?,
        })
    }

    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let x = self.conv_in.forward(z)?;
        let mut x = self.mid.forward(&x)?;
        for (resnets, us) in &self.up {
            for r in resnets {
                x = r.forward(&x, None)?;
            }
            if let Some(u) = us {
                x = u.forward(&x, None)?;
            }
        }
        let x = self.conv_norm_out.forward_silu(&x)?;
        self.conv_out.forward(&x)
    }
}

/// The encoder's Gaussian parameters.
pub struct LatentDistribution {
    pub mean: Tensor,
    pub logvar: Tensor,
}

pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: VaeConfig,
}

impl AutoencoderKL {
    pub fn load(vb: &Vb, config: &VaeConfig) -> Result<Self> {
        config.validate()?;
        let lc = config.latent_channels;
        Ok(Self {
            encoder: Encoder::load(&vb.pp("encoder"), config)?,
            decoder: Decoder::load(&vb.pp("decoder"), config)?,
            quant_conv: if config.use_quant_conv {
                Some(Conv2d::load(&vb.pp("quant_conv"), 2 * lc, 2 * lc, 1, 1, 0)?)
            } else {
                None
            },
            post_quant_conv: if config.use_post_quant_conv {
                Some(Conv2d::load(&vb.pp("post_quant_conv"), lc, lc, 1, 1, 0)?)
            } else {
                None
            },
            config: config.clone(),
        })
    }

    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// `x`: images `[B, 3, H, W]` in [−1, 1].
    pub fn encode(&self, x: &Tensor) -> Result<LatentDistribution> {
        let dtype = self.encoder.conv_in.weight.dtype();
        let h = self.encoder.forward(&x.to_dtype(dtype)?)?;
        let h = match &self.quant_conv {
            Some(q) => q.forward(&h)?,
            None => h,
        };
        let lc = self.config.latent_channels;
        Ok(LatentDistribution {
            mean: h.narrow(1, 0, lc)?,
            logvar: h.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?,
        })
    }

    /// `z`: unscaled latents. Returns images in roughly [−1, 1].
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let dtype = self.decoder.conv_in.weight.dtype();
        let z = z.to_dtype(dtype)?;
        let z = match &self.post_quant_conv {
            Some(p) => p.forward(&z)?,
            None => z,
        };
        self.decoder.forward(&z)
    }
}
