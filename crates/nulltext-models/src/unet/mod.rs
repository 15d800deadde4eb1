//! `UNet2DConditionModel` of Stable Diffusion 1.x/2.x and SDXL: its structure read from the
//! config (`model`, `blocks`), the one traversal every pass runs (`pass`), and the ways to
//! run it (`tape`: single passes and the context tape of null-text inversion).

mod blocks;
mod model;
mod pass;
mod tape;

pub use blocks::{BlockAttention, BlockCommon, DownBlock, MidBlock, UpBlock, UpChannels};
pub use model::{AddedCond, Execution, UNet2DConditionModel};
pub use tape::ContextTape;
