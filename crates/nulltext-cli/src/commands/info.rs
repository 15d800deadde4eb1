use anyhow::Result;
use clap::Args;

use super::{Ctx, ModelArg};

#[derive(Args)]
pub struct InfoArgs {
    #[command(flatten)]
    model: ModelArg,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

pub fn run(a: InfoArgs, ctx: &Ctx) -> Result<()> {
    let sd = ctx.load(&a.model)?;
    let u = sd.unet.config();
    let family = if sd.context_dim() == 1024 {
        "Stable Diffusion 2.x"
    } else if sd.context_dim() == 768 {
        "Stable Diffusion 1.x"
    } else {
        "Stable Diffusion-shaped (custom size)"
    };
    let configs = nulltext::models::random::ModelConfigs {
        unet: serde_json::to_value(sd.unet.config())?,
        vae: serde_json::to_value(sd.vae.config())?,
        text_encoder: serde_json::to_value(sd.text_encoder.config())?,
        scheduler: serde_json::Value::Null,
        pad_token: String::new(),
    };
    let mut params = serde_json::Map::new();
    for (component, n) in nulltext::models::random::parameter_counts(&configs)? {
        params.insert(component.into(), serde_json::json!(n));
    }
    let layout = if sd.path.is_file() {
        "single file (original layout)"
    } else {
        "diffusers folder"
    };
    let v = serde_json::json!({
        "model": sd.name,
        "path": sd.path,
        "family": family,
        "layout": layout,
        "prediction_type": sd.scheduler.prediction_type,
        "timestep_spacing": sd.scheduler.timestep_spacing,
        "image_size": sd.default_image_size(),
        "latent_channels": sd.latent_channels(),
        "vae_scale_factor": sd.vae_scale_factor(),
        "text_hidden_size": sd.context_dim(),
        "unet_block_out_channels": u.block_out_channels,
        "cross_attention_dim": u.cross_attention_dim,
        "attention_layers": sd.unet.attention_sites().len(),
        "dtype": format!("{:?}", sd.dtype).to_lowercase(),
        "device": format!("{:?}", sd.device),
        "parameters": params,
        "fingerprint": sd.fingerprint,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for (k, val) in v.as_object().unwrap() {
        let s = match val {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{k:>24}: {s}");
    }
    Ok(())
}
