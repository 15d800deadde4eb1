//! Model loading with a spinner; the process-wide setup lives in `nulltext::runtime`.

use anyhow::{Context, Result};
use nulltext::models::{LoadOptions, StableDiffusion};

pub fn load_model(spec: &str, opts: &LoadOptions, quiet: bool) -> Result<StableDiffusion> {
    let sp = crate::progress::spinner(quiet, &format!("loading {spec}"));
    let sd = nulltext::runtime::load_weights(|| StableDiffusion::load(spec, opts))
        .with_context(|| format!("cannot load model `{spec}`"))?;
    if let Some(s) = sp {
        s.finish_and_clear();
    }
    Ok(sd)
}
