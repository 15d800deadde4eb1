//! Helpers of the pipeline's golden tests, on top of the model crate's.
#![allow(dead_code)]

#[path = "../../../nulltext-models/tests/common/mod.rs"]
mod shared;

use candle_core::Tensor;
pub use shared::*;

pub fn load_tiny() -> nulltext::StableDiffusion {
    nulltext::StableDiffusion::load(tiny_model().to_str().unwrap(), &load_options()).unwrap()
}

pub fn chelsea_latent(sd: &nulltext::StableDiffusion) -> Tensor {
    let img = nulltext::image_io::load_image(
        &fixtures().join("inputs/chelsea256.png"),
        Default::default(),
        256,
    )
    .unwrap();
    let x = nulltext::image_io::image_to_tensor(&img, &sd.device).unwrap();
    sd.image_to_latent(&x).unwrap()
}
