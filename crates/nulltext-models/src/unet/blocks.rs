//! UNet blocks: `CrossAttnDownBlock2D`/`DownBlock2D`, `UNetMidBlock2DCrossAttn`,
//! `CrossAttnUpBlock2D`/`UpBlock2D`. A block without attentions is the plain variant.

use crate::attention::{Transformer2DModel, TransformerPlace, TransformerShape};
use crate::control::{AttentionSite, Place};
use crate::error::Result;
use crate::resnet::{Downsample2D, ResnetBlock2D, ResnetShape, Upsample2D};
use crate::weights::Vb;

/// What the blocks of one UNet share.
#[derive(Debug, Clone, Copy)]
pub struct BlockCommon {
    pub temb_channels: usize,
    pub groups: usize,
    pub eps: f64,
    pub context_dim: usize,
    pub linear_projection: bool,
    pub upcast: bool,
}

impl BlockCommon {
    fn resnet(&self, in_channels: usize, out_channels: usize) -> ResnetShape {
        ResnetShape {
            in_channels,
            out_channels,
            temb_channels: Some(self.temb_channels),
            groups: self.groups,
            eps: self.eps,
        }
    }

    fn transformer(&self, channels: usize, heads: usize, layers: usize) -> TransformerShape {
        TransformerShape {
            channels,
            heads,
            layers,
            context_dim: self.context_dim,
            groups: self.groups,
            linear_projection: self.linear_projection,
            upcast: self.upcast,
        }
    }
}

/// Attention configuration of a block, `None` for the plain (attention-free) variants.
#[derive(Debug, Clone, Copy)]
pub struct BlockAttention {
    pub heads: usize,
    pub transformer_layers: usize,
}

pub struct DownBlock {
    pub(crate) resnets: Vec<ResnetBlock2D>,
    pub(crate) attentions: Vec<Transformer2DModel>,
    pub(crate) downsampler: Option<Downsample2D>,
}

impl DownBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: &Vb,
        index: usize,
        c: &BlockCommon,
        in_channels: usize,
        out_channels: usize,
        layers: usize,
        attn: Option<BlockAttention>,
        downsample_padding: Option<usize>,
        next_site: &mut usize,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let in_c = if i == 0 { in_channels } else { out_channels };
            resnets.push(ResnetBlock2D::load(
                &vb.pp(format!("resnets.{i}")),
                c.resnet(in_c, out_channels),
            )?);
            if let Some(a) = attn {
                let at = TransformerPlace {
                    place: Place::Down,
                    block: index,
                    transformer: i,
                };
                attentions.push(Transformer2DModel::load(
                    &vb.pp(format!("attentions.{i}")),
                    c.transformer(out_channels, a.heads, a.transformer_layers),
                    at,
                    next_site,
                )?);
            }
        }
        let downsampler = match downsample_padding {
            Some(p) => Some(Downsample2D::load(
                &vb.pp("downsamplers.0"),
                out_channels,
                p,
            )?),
            None => None,
        };
        Ok(Self {
            resnets,
            attentions,
            downsampler,
        })
    }

    pub fn sites(&self) -> impl Iterator<Item = &AttentionSite> {
        self.attentions.iter().flat_map(|a| a.sites())
    }
}

pub struct MidBlock {
    pub(crate) resnets: Vec<ResnetBlock2D>,
    pub(crate) attentions: Vec<Transformer2DModel>,
}

impl MidBlock {
    pub fn load(
        vb: &Vb,
        c: &BlockCommon,
        channels: usize,
        attn: BlockAttention,
        next_site: &mut usize,
    ) -> Result<Self> {
        let at = TransformerPlace {
            place: Place::Mid,
            block: 0,
            transformer: 0,
        };
        Ok(Self {
            resnets: vec![
                ResnetBlock2D::load(&vb.pp("resnets.0"), c.resnet(channels, channels))?,
                ResnetBlock2D::load(&vb.pp("resnets.1"), c.resnet(channels, channels))?,
            ],
            attentions: vec![Transformer2DModel::load(
                &vb.pp("attentions.0"),
                c.transformer(channels, attn.heads, attn.transformer_layers),
                at,
                next_site,
            )?],
        })
    }

    pub fn sites(&self) -> impl Iterator<Item = &AttentionSite> {
        self.attentions.iter().flat_map(|a| a.sites())
    }
}

pub struct UpBlock {
    pub(crate) resnets: Vec<ResnetBlock2D>,
    pub(crate) attentions: Vec<Transformer2DModel>,
    pub(crate) upsampler: Option<Upsample2D>,
}

/// Channel bookkeeping of one up block.
#[derive(Debug, Clone, Copy)]
pub struct UpChannels {
    /// Channels of the matching down block's input (the last skip's width).
    pub in_channels: usize,
    pub out_channels: usize,
    /// Channels coming from the previous up block.
    pub prev_out_channels: usize,
}

impl UpBlock {
    #[allow(clippy::too_many_arguments)]
    pub fn load(
        vb: &Vb,
        index: usize,
        c: &BlockCommon,
        ch: UpChannels,
        layers: usize,
        attn: Option<BlockAttention>,
        add_upsample: bool,
        next_site: &mut usize,
    ) -> Result<Self> {
        let mut resnets = Vec::new();
        let mut attentions = Vec::new();
        for i in 0..layers {
            let skip = if i == layers - 1 {
                ch.in_channels
            } else {
                ch.out_channels
            };
            let in_c = if i == 0 {
                ch.prev_out_channels
            } else {
                ch.out_channels
            };
            resnets.push(ResnetBlock2D::load(
                &vb.pp(format!("resnets.{i}")),
                c.resnet(in_c + skip, ch.out_channels),
            )?);
            if let Some(a) = attn {
                let at = TransformerPlace {
                    place: Place::Up,
                    block: index,
                    transformer: i,
                };
                attentions.push(Transformer2DModel::load(
                    &vb.pp(format!("attentions.{i}")),
                    c.transformer(ch.out_channels, a.heads, a.transformer_layers),
                    at,
                    next_site,
                )?);
            }
        }
        let upsampler = if add_upsample {
            Some(Upsample2D::load(&vb.pp("upsamplers.0"), ch.out_channels)?)
        } else {
            None
        };
        Ok(Self {
            resnets,
            attentions,
            upsampler,
        })
    }

    pub fn sites(&self) -> impl Iterator<Item = &AttentionSite> {
        self.attentions.iter().flat_map(|a| a.sites())
    }
}
