//! The tensors a Stable Diffusion model is made of: each component's names and shapes for
//! its config.
//!
//! The lists come from loading each component against a recording weight store
//! ([`WeightStore::recording`]), so they are exactly what loading reads. Loading checks a
//! checkpoint against them before it builds anything; the random-model generator
//! (`crate::random`) writes them.

use crate::clip::{ClipTextModelWithProjection, ClipTextTransformer};
use crate::config::{ClipTextConfig, UNetConfig, VaeConfig};
use crate::error::Result;
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights::WeightStore;

/// Names and shapes of a component's tensors.
pub type TensorList = Vec<(String, Vec<usize>)>;

/// The tensors (names and shapes) each component needs: `unet`, `vae` and `text_encoder`,
/// in that order.
pub fn tensor_lists(
    unet: &UNetConfig,
    vae: &VaeConfig,
    text_encoder: &ClipTextConfig,
) -> Result<[(&'static str, TensorList); 3]> {
    let s = WeightStore::recording();
    UNet2DConditionModel::load(&s.root(), unet)?;
    let unet = s.recorded();
    let s = WeightStore::recording();
    AutoencoderKL::load(&s.root(), vae)?;
    let vae = s.recorded();
    let s = WeightStore::recording();
    ClipTextTransformer::load(&s.root(), text_encoder)?;
    let text = s.recorded();
    Ok([("unet", unet), ("vae", vae), ("text_encoder", text)])
}

/// Parameter count of each component, in the order of [`tensor_lists`].
pub fn parameter_counts(
    unet: &UNetConfig,
    vae: &VaeConfig,
    text_encoder: &ClipTextConfig,
) -> Result<Vec<(&'static str, usize)>> {
    Ok(tensor_lists(unet, vae, text_encoder)?
        .iter()
        .map(|(c, l)| (*c, l.iter().map(|(_, s)| s.iter().product::<usize>()).sum()))
        .collect())
}

/// The tensors of a `CLIPTextModelWithProjection` (SDXL's second text encoder).
pub fn text_encoder_2_list(config: &ClipTextConfig) -> Result<TensorList> {
    let s = WeightStore::recording();
    ClipTextModelWithProjection::load(&s.root(), config)?;
    Ok(s.recorded())
}
