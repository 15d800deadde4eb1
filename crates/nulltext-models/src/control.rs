//! The attention-control hook: where Prompt-to-Prompt reads and replaces attention maps.
//!
//! Every attention layer of the UNet knows its identity from construction (an
//! [`AttentionSite`]); at run time it tells the controller its query resolution and the
//! sampling step. A controller that does not want a layer's probabilities lets that layer
//! take its fastest path; [`NoControl`] costs nothing.

use candle_core::Tensor;

use crate::error::Result;

/// Which part of the UNet an attention layer sits in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Place {
    Down,
    Mid,
    Up,
}

impl Place {
    pub fn name(self) -> &'static str {
        match self {
            Place::Down => "down",
            Place::Mid => "mid",
            Place::Up => "up",
        }
    }
}

/// Self-attention (`attn1`) or cross-attention to the text (`attn2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AttentionKind {
    SelfAttention,
    CrossAttention,
}

/// The fixed identity of one attention layer of the UNet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AttentionSite {
    pub place: Place,
    /// Index of the down/up block (0 in the mid block).
    pub block: usize,
    /// Index of the `Transformer2DModel` within the block (`attentions.N`).
    pub transformer: usize,
    /// Index of the `BasicTransformerBlock` within it (`transformer_blocks.N`).
    pub layer: usize,
    pub kind: AttentionKind,
    /// Position of this layer in one UNet forward pass (0-based, self and cross counted).
    pub index: usize,
    /// Weight path, e.g. `down_blocks.1.attentions.0.transformer_blocks.0.attn2`.
    pub path: String,
}

impl AttentionSite {
    pub fn is_cross(&self) -> bool {
        self.kind == AttentionKind::CrossAttention
    }
}

/// Where an attention call happens: the site, its query grid and the sampling step.
#[derive(Debug, Clone, Copy)]
pub struct AttentionCall<'a> {
    pub site: &'a AttentionSite,
    /// Query grid (the latent's height and width at this layer).
    pub height: usize,
    pub width: usize,
    /// Sampling step as set by the caller of the UNet (0 for the first denoising step).
    pub step: usize,
}

impl AttentionCall<'_> {
    /// Number of query pixels.
    pub fn pixels(&self) -> usize {
        self.height * self.width
    }
}

/// Reads and may replace attention probabilities inside the UNet.
pub trait AttentionControl {
    /// Whether [`AttentionControl::edit`] must see this call's probabilities. When `false`
    /// the layer uses its fastest attention and never materializes them.
    fn wants(&self, call: &AttentionCall) -> bool;

    /// `probs`: `[B, heads, queries, keys]`, softmax over keys, for the whole batch as the
    /// UNet runs it. Returns the probabilities to multiply the values with.
    fn edit(&mut self, call: &AttentionCall, probs: Tensor) -> Result<Tensor>;

    /// `false` when [`AttentionControl::wants`] is `false` for every call: the UNet may
    /// then run without per-layer hooks (on the CPU, as a context tape's forward pass).
    fn wants_any(&self) -> bool {
        true
    }
}

/// The controller that changes nothing and asks for nothing.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoControl;

impl AttentionControl for NoControl {
    fn wants(&self, _: &AttentionCall) -> bool {
        false
    }

    fn edit(&mut self, _: &AttentionCall, probs: Tensor) -> Result<Tensor> {
        Ok(probs)
    }

    fn wants_any(&self) -> bool {
        false
    }
}
