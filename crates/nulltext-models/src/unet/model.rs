//! The UNet's structure: its blocks, read from the config and loaded from the weights.

use candle_core::Tensor;

use crate::config::UNetConfig;
use crate::control::AttentionSite;
use crate::embeddings::{TextTimeEmbedding, TimestepEmbedding};
use crate::error::Result;
use crate::nn::{Conv2d, GroupNorm};
use crate::weights::Vb;

use super::blocks::{BlockAttention, BlockCommon, DownBlock, MidBlock, UpBlock, UpChannels};

/// How the context gradient of null-text inversion is taken: chosen when a UNet is loaded
/// ([`crate::LoadOptions`]). Every pass runs the same traversal either way.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Execution {
    /// Through a [`super::ContextTape`]: the traversal records what each layer needs, its
    /// backward pass visits only what lies between the context and the output, and what
    /// does not depend on the context is computed once per latent and timestep.
    #[default]
    Tapes,
    /// Through candle's autograd graph ([`UNet2DConditionModel::context_tape`] gives
    /// `None`): for comparison, or as a fallback.
    Graph,
}

impl std::str::FromStr for Execution {
    type Err = String;
    /// `tapes` (or `on`, `1`) and `graph` (or `off`, `0`), the values of
    /// `NULLTEXT_CONTEXT_TAPE`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.trim().to_ascii_lowercase().as_str() {
            "tapes" | "tape" | "on" | "1" => Ok(Execution::Tapes),
            "graph" | "off" | "0" => Ok(Execution::Graph),
            other => Err(format!(
                "unknown UNet execution `{other}` (tapes or graph; on or off)"
            )),
        }
    }
}

/// SDXL's added conditioning of each latent (diffusers' `added_cond_kwargs`), which
/// [`UNet2DConditionModel`]s with `addition_embed_type: "text_time"` take beside the
/// text context.
#[derive(Debug, Clone)]
pub struct AddedCond {
    /// The pooled text embedding `[B, P]` (the second text encoder's projected output).
    pub text_embeds: Tensor,
    /// `[B, 6]`: original size, crop top-left and target size, each (height, width), in
    /// pixels.
    pub time_ids: Tensor,
}

/// The denoising UNet of Stable Diffusion 1.x/2.x and SDXL (diffusers'
/// `UNet2DConditionModel`): predicts the noise (or v) of latents at a timestep, given a
/// text context (and, for SDXL, an [`AddedCond`]).
pub struct UNet2DConditionModel {
    pub(super) conv_in: Conv2d,
    pub(super) time_embedding: TimestepEmbedding,
    /// SDXL's `add_embedding`, `None` for SD 1.x/2.x.
    pub(super) add_embedding: Option<TextTimeEmbedding>,
    pub(super) down_blocks: Vec<DownBlock>,
    pub(super) mid_block: Option<MidBlock>,
    pub(super) up_blocks: Vec<UpBlock>,
    pub(super) conv_norm_out: GroupNorm,
    pub(super) conv_out: Conv2d,
    pub(super) config: UNetConfig,
    pub(super) execution: Execution,
}

impl UNet2DConditionModel {
    pub fn load(vb: &Vb, config: &UNetConfig) -> Result<Self> {
        config.validate()?;
        let c = config;
        let n = c.block_out_channels.len();
        let ch = &c.block_out_channels;
        let heads = c.heads_per_block()?;
        let layers = c.layers_per_block.expand(n, "layers_per_block")?;
        let tlayers = c
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let temb = ch[0] * 4;
        let common = BlockCommon {
            temb_channels: temb,
            groups: c.norm_num_groups,
            eps: c.norm_eps,
            context_dim: c.cross_attention_dim,
            linear_projection: c.use_linear_projection,
            upcast: c.upcast_attention,
        };
        let mut next_site = 0;
        let mut down_blocks = Vec::new();
        for i in 0..n {
            let in_c = if i == 0 { ch[0] } else { ch[i - 1] };
            let attn =
                (c.down_block_types[i] == "CrossAttnDownBlock2D").then_some(BlockAttention {
                    heads: heads[i],
                    transformer_layers: tlayers[i],
                });
            let downsample = (i + 1 < n).then_some(c.downsample_padding);
            down_blocks.push(DownBlock::load(
                &vb.pp(format!("down_blocks.{i}")),
                i,
                &common,
                in_c,
                ch[i],
                layers[i],
                attn,
                downsample,
                &mut next_site,
            )?);
        }
        let mid_block = match c.mid_block_type {
            Some(_) => Some(MidBlock::load(
                &vb.pp("mid_block"),
                &common,
                ch[n - 1],
                BlockAttention {
                    heads: heads[n - 1],
                    transformer_layers: tlayers[n - 1],
                },
                &mut next_site,
            )?),
            None => None,
        };
        let rev_ch: Vec<usize> = ch.iter().rev().copied().collect();
        let rev_heads: Vec<usize> = heads.iter().rev().copied().collect();
        let rev_layers: Vec<usize> = layers.iter().rev().copied().collect();
        let rev_tlayers: Vec<usize> = tlayers.iter().rev().copied().collect();
        let mut up_blocks = Vec::new();
        let mut out_c = rev_ch[0];
        for i in 0..n {
            let prev_out = out_c;
            out_c = rev_ch[i];
            let in_c = rev_ch[(i + 1).min(n - 1)];
            let attn = (c.up_block_types[i] == "CrossAttnUpBlock2D").then_some(BlockAttention {
                heads: rev_heads[i],
                transformer_layers: rev_tlayers[i],
            });
            up_blocks.push(UpBlock::load(
                &vb.pp(format!("up_blocks.{i}")),
                i,
                &common,
                UpChannels {
                    in_channels: in_c,
                    out_channels: out_c,
                    prev_out_channels: prev_out,
                },
                rev_layers[i] + 1,
                attn,
                i + 1 < n,
                &mut next_site,
            )?);
        }
        let kin = c.conv_in_kernel;
        let kout = c.conv_out_kernel;
        Ok(Self {
            conv_in: Conv2d::load(&vb.pp("conv_in"), c.in_channels, ch[0], kin, 1, kin / 2)?,
            time_embedding: TimestepEmbedding::load(&vb.pp("time_embedding"), ch[0], temb)?,
            add_embedding: match c.text_time() {
                Some(dims) => Some(TextTimeEmbedding::load(vb, c, dims, temb)?),
                None => None,
            },
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out: GroupNorm::load(
                &vb.pp("conv_norm_out"),
                c.norm_num_groups,
                ch[0],
                c.norm_eps,
            )?,
            conv_out: Conv2d::load(&vb.pp("conv_out"), ch[0], c.out_channels, kout, 1, kout / 2)?,
            execution: Execution::default(),
            config: config.clone(),
        })
    }

    /// Whether this UNet takes SDXL's [`AddedCond`].
    pub fn takes_added_cond(&self) -> bool {
        self.add_embedding.is_some()
    }

    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    pub fn execution(&self) -> Execution {
        self.execution
    }

    /// Runs later passes as `execution` says.
    pub fn with_execution(mut self, execution: Execution) -> Self {
        self.execution = execution;
        self
    }

    /// Every attention layer, in the order one forward pass calls them.
    pub fn attention_sites(&self) -> Vec<&AttentionSite> {
        let mut v: Vec<&AttentionSite> = self
            .down_blocks
            .iter()
            .flat_map(|b| b.sites())
            .chain(self.mid_block.iter().flat_map(|m| m.sites()))
            .chain(self.up_blocks.iter().flat_map(|b| b.sites()))
            .collect();
        v.sort_by_key(|s| s.index);
        v
    }
}
