//! Residual blocks and resampling (diffusers `ResnetBlock2D`, `Downsample2D`, `Upsample2D`).

use candle_core::Tensor;

use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm, Linear};
use crate::weights::Vb;

/// GroupNorm → SiLU → conv, twice, with an optional time-embedding bias and a 1×1 shortcut
/// when the channel count changes.
pub struct ResnetBlock2D {
    pub(crate) norm1: GroupNorm,
    pub(crate) conv1: Conv2d,
    pub(crate) time_emb_proj: Option<Linear>,
    pub(crate) norm2: GroupNorm,
    pub(crate) conv2: Conv2d,
    pub(crate) conv_shortcut: Option<Conv2d>,
}

/// Shape parameters of a [`ResnetBlock2D`].
#[derive(Debug, Clone, Copy)]
pub struct ResnetShape {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding, `None` in the VAE.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
}

impl ResnetBlock2D {
    pub fn load(vb: &Vb, s: ResnetShape) -> Result<Self> {
        let (i, o) = (s.in_channels, s.out_channels);
        let time_emb_proj = match s.temb_channels {
            Some(t) => Some(Linear::load(&vb.pp("time_emb_proj"), t, o, true)?),
            None => None,
        };
        let conv_shortcut = if i != o {
            Some(Conv2d::load(&vb.pp("conv_shortcut"), i, o, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::load(&vb.pp("norm1"), s.groups, i, s.eps)?,
            conv1: Conv2d::load(&vb.pp("conv1"), i, o, 3, 1, 1)?,
            time_emb_proj,
            norm2: GroupNorm::load(&vb.pp("norm2"), s.groups, o, s.eps)?,
            conv2: Conv2d::load(&vb.pp("conv2"), o, o, 3, 1, 1)?,
            conv_shortcut,
        })
    }

    /// `temb`: the UNet's time embedding `[B, T]` (already passed through SiLU by the caller
    /// is *not* expected: this block applies it).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&t.silu()?)?;
                h.broadcast_add(&t.unsqueeze(2)?.unsqueeze(3)?)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        Ok((x + h)?)
    }
}

/// Stride-2 3×3 convolution. With `padding == 0` (the VAE encoder) the input is first
/// padded by one row and column at the bottom and right, as diffusers does.
pub struct Downsample2D {
    pub(crate) conv: Conv2d,
    pub(crate) pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn load(vb: &Vb, channels: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 2, padding)?,
            pad_bottom_right: padding == 0,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// Nearest-neighbour 2× upsampling (or to an explicit size) followed by a 3×3 convolution.
pub struct Upsample2D {
    pub(crate) conv: Conv2d,
}

impl Upsample2D {
    pub fn load(vb: &Vb, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: Conv2d::load(&vb.pp("conv"), channels, channels, 3, 1, 1)?,
        })
    }

    pub fn forward(&self, x: &Tensor, size: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = size.unwrap_or((2 * h, 2 * w));
        let x = x.upsample_nearest2d(th, tw)?;
        self.conv.forward(&x)
    }
}
