//! Random-weight Stable Diffusion models in the diffusers layout, for benchmarks and tests
//! at real size without downloading anything.
//!
//! The tensor list comes from loading each component against a recording weight store, so
//! it is exactly what nulltext (and diffusers) read. Initialization follows PyTorch's
//! defaults (uniform ±1/√fan_in for weights, norms at 1/0, embeddings N(0, 0.02²)), plus the
//! two rescalings of the fixture model that make a random network behave like a denoiser:
//! the VAE's `quant_conv` mean half ×16 with `post_quant_conv` /16, and the UNet's
//! `conv_out` ×0.1.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use crate::clip::ClipTextTransformer;
use crate::config::{ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::unet::UNet2DConditionModel;
use crate::vae::AutoencoderKL;
use crate::weights::WeightStore;

/// Model shapes nulltext can generate by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    /// Stable Diffusion 1.5 (860M UNet, 512 px).
    Sd15,
    /// Stable Diffusion 2.1 base (512 px, ε-prediction, OpenCLIP ViT-H text encoder).
    Sd21Base,
    /// Stable Diffusion 2.1 (768 px, v-prediction).
    Sd21V,
    /// The tiny SD 1.5-shaped model of the test fixtures (256 px).
    Tiny,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sd15" | "sd1.5" => Ok(Preset::Sd15),
            "sd21-base" | "sd2.1-base" => Ok(Preset::Sd21Base),
            "sd21-v" | "sd2.1-v" | "sd21" => Ok(Preset::Sd21V),
            "tiny" => Ok(Preset::Tiny),
            _ => Err(format!("unknown preset `{s}` (sd15, sd21-base, sd21-v, tiny)")),
        }
    }
}

/// The four config files of a model.
#[derive(Debug, Clone)]
pub struct ModelConfigs {
    pub unet: Value,
    pub vae: Value,
    pub text_encoder: Value,
    pub scheduler: Value,
    /// `pad_token` of the tokenizer (`<|endoftext|>` for SD 1.x, `!` for SD 2.x).
    pub pad_token: String,
}

fn scheduler(prediction: &str) -> Value {
    json!({
        "_class_name": "DDIMScheduler",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": false, "num_train_timesteps": 1000, "prediction_type": prediction,
        "set_alpha_to_one": false, "steps_offset": 1, "timestep_spacing": "leading",
        "trained_betas": null
    })
}

fn vae(blocks: &[usize], sample_size: usize) -> Value {
    json!({
        "_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": blocks,
        "down_block_types": vec!["DownEncoderBlock2D"; blocks.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; blocks.len()],
        "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2,
        "norm_num_groups": 32, "sample_size": sample_size, "scaling_factor": 0.18215
    })
}

fn unet(blocks: &[usize], heads: Value, cross: usize, sample: usize, linear: bool, upcast: bool) -> Value {
    json!({
        "_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": heads,
        "block_out_channels": blocks, "center_input_sample": false,
        "cross_attention_dim": cross,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "out_channels": 4, "sample_size": sample,
        "use_linear_projection": linear, "upcast_attention": upcast
    })
}

fn clip(hidden: usize, inter: usize, layers: usize, heads: usize, act: &str, proj: usize) -> Value {
    json!({
        "architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "hidden_act": act, "projection_dim": proj,
        "max_position_embeddings": 77, "vocab_size": 49408, "layer_norm_eps": 1e-05,
        "attention_dropout": 0.0, "dropout": 0.0, "bos_token_id": 0, "eos_token_id": 2,
        "pad_token_id": 1, "initializer_factor": 1.0, "initializer_range": 0.02
    })
}

impl Preset {
    pub fn configs(self) -> ModelConfigs {
        let eot = "<|endoftext|>".to_string();
        match self {
            Preset::Sd15 => ModelConfigs {
                unet: unet(&[320, 640, 1280, 1280], json!(8), 768, 64, false, false),
                vae: vae(&[128, 256, 512, 512], 512),
                text_encoder: clip(768, 3072, 12, 12, "quick_gelu", 768),
                scheduler: scheduler("epsilon"),
                pad_token: eot,
            },
            Preset::Sd21Base | Preset::Sd21V => {
                let v = self == Preset::Sd21V;
                ModelConfigs {
                    unet: unet(&[320, 640, 1280, 1280], json!([5, 10, 20, 20]), 1024, if v { 96 } else { 64 }, true, v),
                    vae: vae(&[128, 256, 512, 512], if v { 768 } else { 512 }),
                    text_encoder: clip(1024, 4096, 23, 16, "gelu", 512),
                    scheduler: scheduler(if v { "v_prediction" } else { "epsilon" }),
                    pad_token: "!".into(),
                }
            }
            Preset::Tiny => ModelConfigs {
                unet: unet(&[32, 64, 64, 64], json!(8), 32, 32, false, false),
                vae: vae(&[32, 32, 64, 64], 256),
                text_encoder: {
                    let mut c = clip(32, 64, 4, 4, "quick_gelu", 32);
                    c["max_position_embeddings"] = json!(77);
                    c
                },
                scheduler: scheduler("epsilon"),
                pad_token: eot,
            },
        }
    }
}

/// A small, fast, seedable generator (SplitMix64).
struct Rng(u64);

impl Rng {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }
    fn normal(&mut self) -> f32 {
        let u1 = self.uniform().max(1e-7);
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (std::f32::consts::TAU * u2).cos()
    }
}

fn seed_of(seed: u64, name: &str) -> u64 {
    name.bytes()
        .fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Values of one tensor, by its name and shape.
fn init(name: &str, shape: &[usize], seed: u64, component: &str) -> Vec<f32> {
    let n: usize = shape.iter().product();
    let mut rng = Rng(seed_of(seed, name));
    let leaf = name.rsplit('.').next().unwrap_or("");
    let is_norm = shape.len() == 1 && name.split('.').any(|p| p.contains("norm"));
    let mut v: Vec<f32> = if is_norm {
        vec![if leaf == "weight" { 1.0 } else { 0.0 }; n]
    } else if name.contains("embedding") {
        (0..n).map(|_| 0.02 * rng.normal()).collect()
    } else if shape.len() >= 2 {
        let fan_in: usize = shape[1..].iter().product();
        let bound = 1.0 / (fan_in as f32).sqrt();
        (0..n).map(|_| bound * (2.0 * rng.uniform() - 1.0)).collect()
    } else {
        vec![0.0; n]
    };
    // Denoiser-like behaviour of a random network (as the fixture model).
    match (component, name) {
        ("vae", "quant_conv.weight") | ("vae", "quant_conv.bias") => {
            let half = n / 2;
            v[..half].iter_mut().for_each(|x| *x *= 16.0);
        }
        ("vae", "post_quant_conv.weight") => v.iter_mut().for_each(|x| *x /= 16.0),
        ("unet", "conv_out.weight") | ("unet", "conv_out.bias") => v.iter_mut().for_each(|x| *x *= 0.1),
        _ => {}
    }
    v
}

/// Writes a safetensors file tensor by tensor (bounded memory), atomically.
fn write_safetensors(path: &Path, tensors: &[(String, Vec<usize>)], seed: u64, component: &str, f16: bool) -> Result<()> {
    let mut sorted: Vec<&(String, Vec<usize>)> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);
    let elem = if f16 { 2 } else { 4 };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in &sorted {
        let bytes = shape.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            json!({"dtype": if f16 { "F16" } else { "F32" }, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h = serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Msg(e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let io = |e: std::io::Error| Error::io(path, e);
    let tmp = path.with_extension("safetensors.tmp");
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp).map_err(io)?);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&h).map_err(io)?;
        for (name, shape) in &sorted {
            let v = init(name, shape, seed, component);
            if f16 {
                for x in v {
                    w.write_all(&half::f16::from_f32(x).to_le_bytes()).map_err(io)?;
                }
            } else {
                for x in v {
                    w.write_all(&x.to_le_bytes()).map_err(io)?;
                }
            }
        }
        w.flush().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// The tensors (names and shapes) each component of `configs` needs.
pub fn tensor_lists(configs: &ModelConfigs) -> Result<[(&'static str, Vec<(String, Vec<usize>)>); 3]> {
    let parse = |v: &Value, what: &str| -> Result<String> {
        serde_json::to_string(v).map_err(|e| Error::Msg(format!("{what}: {e}")))
    };
    let uc: UNetConfig = serde_json::from_str(&parse(&configs.unet, "unet")?).map_err(|e| Error::Msg(e.to_string()))?;
    let vc: VaeConfig = serde_json::from_str(&parse(&configs.vae, "vae")?).map_err(|e| Error::Msg(e.to_string()))?;
    let cc: ClipTextConfig = serde_json::from_str(&parse(&configs.text_encoder, "text_encoder")?).map_err(|e| Error::Msg(e.to_string()))?;
    let s = WeightStore::recording();
    UNet2DConditionModel::load(&s.root(), &uc)?;
    let unet = s.recorded();
    let s = WeightStore::recording();
    AutoencoderKL::load(&s.root(), &vc)?;
    let vae = s.recorded();
    let s = WeightStore::recording();
    ClipTextTransformer::load(&s.root(), &cc)?;
    let text = s.recorded();
    Ok([("unet", unet), ("vae", vae), ("text_encoder", text)])
}

fn write_json(path: &Path, v: &Value) -> Result<()> {
    let s = serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))?;
    std::fs::write(path, s + "\n").map_err(|e| Error::io(path, e))
}

/// Writes a complete diffusers folder with random weights (`f16`: half-precision files).
pub fn write_random_model(dir: &Path, configs: &ModelConfigs, seed: u64, f16: bool) -> Result<()> {
    let lists = tensor_lists(configs)?;
    for sub in ["unet", "vae", "text_encoder", "tokenizer", "scheduler"] {
        let d = dir.join(sub);
        std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
    }
    write_json(&dir.join("unet/config.json"), &configs.unet)?;
    write_json(&dir.join("vae/config.json"), &configs.vae)?;
    write_json(&dir.join("text_encoder/config.json"), &configs.text_encoder)?;
    write_json(&dir.join("scheduler/scheduler_config.json"), &configs.scheduler)?;
    let tok = dir.join("tokenizer");
    std::fs::write(tok.join("vocab.json"), crate::tokenizer::BUNDLED_VOCAB).map_err(|e| Error::io(&tok, e))?;
    std::fs::write(tok.join("merges.txt"), crate::tokenizer::BUNDLED_MERGES).map_err(|e| Error::io(&tok, e))?;
    write_json(
        &tok.join("special_tokens_map.json"),
        &json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": configs.pad_token}),
    )?;
    write_json(
        &tok.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true, "pad_token": configs.pad_token}),
    )?;
    for (component, list) in &lists {
        let file = if *component == "text_encoder" { "model" } else { "diffusion_pytorch_model" };
        let variant = if f16 { ".fp16" } else { "" };
        let path = dir.join(component).join(format!("{file}{variant}.safetensors"));
        write_safetensors(&path, list, seed, component, f16)?;
    }
    write_json(
        &dir.join("model_index.json"),
        &json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [null, null], "safety_checker": [null, null],
            "requires_safety_checker": false,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        }),
    )?;
    let _ = SchedulerConfig::default();
    Ok(())
}

/// Parameter count of each component.
pub fn parameter_counts(configs: &ModelConfigs) -> Result<Vec<(&'static str, usize)>> {
    Ok(tensor_lists(configs)?
        .iter()
        .map(|(c, l)| (*c, l.iter().map(|(_, s)| s.iter().product::<usize>()).sum()))
        .collect())
}
