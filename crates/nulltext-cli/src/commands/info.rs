use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::Args;

use nulltext::models::sdxl::Family;

use super::context::{Ctx, ModelArg};

#[derive(Args)]
pub struct InfoArgs {
    /// The model to describe (a diffusers folder, a cached Hugging Face repo id or a
    /// single-file checkpoint); with --inversion, optional: the model to check the file
    /// against. Default: $NULLTEXT_MODEL.
    #[arg(
        long,
        short = 'm',
        env = "NULLTEXT_MODEL",
        required_unless_present = "inversion"
    )]
    model: Option<String>,
    /// For a single-file checkpoint: a diffusers folder with its configs (as for the other
    /// commands).
    #[arg(long)]
    model_config: Option<PathBuf>,
    /// For a single-file checkpoint: epsilon or v_prediction (as for the other commands).
    #[arg(long)]
    prediction_type: Option<String>,
    /// Describe an inversion file instead: its method, prompt, settings and tensors (with
    /// --model also whether it belongs to that model).
    #[arg(long)]
    inversion: Option<PathBuf>,
    /// Machine-readable output.
    #[arg(long)]
    json: bool,
}

fn print(v: &serde_json::Value, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(v)?);
        return Ok(());
    }
    for (k, val) in v.as_object().expect("an object") {
        let s = match val {
            serde_json::Value::String(s) => s.clone(),
            other => other.to_string(),
        };
        println!("{k:>24}: {s}");
    }
    Ok(())
}

pub fn run(a: InfoArgs, ctx: &Ctx) -> Result<()> {
    let model = a.model.clone().map(|model| ModelArg {
        model,
        model_config: a.model_config.clone(),
        prediction_type: a.prediction_type.clone(),
    });
    if let Some(path) = &a.inversion {
        let inv = nulltext::inversion_file::load(path)?;
        let mut v = nulltext::inversion_file::describe(&inv);
        if let Some(m) = &model {
            let sd = ctx.load(m)?;
            v["fits_model"] = match inv.check_model(&sd, false) {
                Ok(()) => serde_json::json!(true),
                Err(e) => serde_json::json!(e.to_string()),
            };
        }
        return print(&v, a.json);
    }
    let Some(model) = &model else {
        bail!("give --model (or set NULLTEXT_MODEL), or --inversion FILE");
    };
    let sd = ctx.load(model)?;
    let u = sd.unet.config();
    let family = Family::of(u);
    let standard = matches!(
        (family, u.cross_attention_dim),
        (Family::Sd1, 768) | (Family::Sd2, 1024) | (Family::Sdxl, 2048)
    );
    let family = match standard {
        true => family.name().to_string(),
        false => format!("{}-shaped (custom size)", family.name()),
    };
    let mut params = serde_json::Map::new();
    for (component, n) in nulltext::models::tensors::parameter_counts(
        sd.unet.config(),
        sd.vae.config(),
        sd.text_encoder.config(),
    )? {
        params.insert(component.into(), serde_json::json!(n));
    }
    // SDXL's second text encoder
    if let Some(second) = &sd.text_encoder_2 {
        let config = second.model.text_model.config();
        let list = nulltext::models::tensors::text_encoder_2_list(config)?;
        let n: usize = list.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        params.insert("text_encoder_2".into(), serde_json::json!(n));
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
    print(&v, a.json)
}
