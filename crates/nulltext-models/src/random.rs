//! Random-weight Stable Diffusion models in the diffusers layout, for benchmarks and tests
//! at real size without downloading anything.
//!
//! The tensor list is loading's ([`crate::tensors`]: each component loaded against a
//! recording weight store), so it is exactly what nulltext (and diffusers) read. Initialization follows PyTorch's
//! defaults (uniform ±1/√fan_in for weights, norms at 1/0, embeddings N(0, 0.02²)), plus the
//! two rescalings of the fixture model that make a random network behave like a denoiser:
//! the VAE's `quant_conv` mean half ×16 with `post_quant_conv` /16, and the UNet's
//! `conv_out` ×0.1.

use std::io::Write;
use std::path::Path;

use serde_json::{json, Value};

use crate::config::{ClipTextConfig, SchedulerConfig, UNetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::tensors::TensorList;

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
    /// A tiny SD 2.x-shaped model: linear projections, an OpenCLIP-style (GELU) text
    /// encoder padding with `!`, v-prediction.
    TinyV,
    /// The small SD 1.x-shaped model `nulltext train` trains on 64 px shape scenes
    /// (8×8 latents).
    Shapes,
    /// Stable Diffusion XL base 1.0 (2.6G UNet, 1024 px, two text encoders).
    Sdxl,
    /// The tiny SDXL-shaped model of the test fixtures (`tests/fixtures/models/tiny-sdxl`,
    /// 256 px).
    TinySdxl,
}

impl std::str::FromStr for Preset {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sd15" | "sd1.5" => Ok(Preset::Sd15),
            "sd21-base" | "sd2.1-base" => Ok(Preset::Sd21Base),
            "sd21-v" | "sd2.1-v" | "sd21" => Ok(Preset::Sd21V),
            "tiny" => Ok(Preset::Tiny),
            "tiny-v" => Ok(Preset::TinyV),
            "shapes" => Ok(Preset::Shapes),
            "sdxl" | "sdxl-base" => Ok(Preset::Sdxl),
            "tiny-sdxl" => Ok(Preset::TinySdxl),
            _ => Err(format!(
                "unknown preset `{s}` \
                 (sd15, sd21-base, sd21-v, tiny, tiny-v, shapes, sdxl, tiny-sdxl)"
            )),
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
    /// SDXL's second text encoder (`CLIPTextModelWithProjection`; its tokenizer pads
    /// with `!`), `None` for SD 1.x/2.x.
    pub text_encoder_2: Option<Value>,
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

/// SDXL base 1.0's scheduler config (the beta keys are DDIM's).
fn sdxl_scheduler() -> Value {
    json!({
        "_class_name": "EulerDiscreteScheduler",
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
        "clip_sample": false, "interpolation_type": "linear", "num_train_timesteps": 1000,
        "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": false,
        "skip_prk_steps": true, "steps_offset": 1, "timestep_spacing": "leading",
        "trained_betas": null, "use_karras_sigmas": false
    })
}

/// An SDXL UNet: DownBlock2D then cross-attention blocks, linear projections, the
/// text/time added conditioning.
fn sdxl_unet(
    blocks: &[usize],
    heads: &[usize],
    depth: &[usize],
    text: (usize, usize),
    time: usize,
    sample: usize,
) -> Value {
    let n = blocks.len();
    let mut down = vec!["DownBlock2D"];
    down.extend(vec!["CrossAttnDownBlock2D"; n - 1]);
    let up: Vec<&str> = down
        .iter()
        .rev()
        .map(|d| {
            if *d == "DownBlock2D" {
                "UpBlock2D"
            } else {
                "CrossAttnUpBlock2D"
            }
        })
        .collect();
    let (context, pooled) = text;
    json!({
        "_class_name": "UNet2DConditionModel", "act_fn": "silu",
        "addition_embed_type": "text_time", "addition_time_embed_dim": time,
        "projection_class_embeddings_input_dim": pooled + 6 * time,
        "attention_head_dim": heads, "block_out_channels": blocks,
        "center_input_sample": false, "cross_attention_dim": context,
        "down_block_types": down, "up_block_types": up,
        "downsample_padding": 1, "flip_sin_to_cos": true, "freq_shift": 0, "in_channels": 4,
        "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
        "norm_num_groups": 32, "out_channels": 4, "sample_size": sample,
        "transformer_layers_per_block": depth,
        "use_linear_projection": true, "upcast_attention": null
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

fn unet(
    blocks: &[usize],
    heads: Value,
    cross: usize,
    sample: usize,
    linear: bool,
    upcast: bool,
) -> Value {
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

/// SDXL's VAE config: the SD one with its scaling factor, upcast in half precision.
fn sdxl_vae(mut c: Value) -> Value {
    c["scaling_factor"] = json!(0.13025);
    c["force_upcast"] = json!(true);
    c
}

/// A `CLIPTextModelWithProjection` config (its pooled output is the one SDXL takes).
fn with_projection(mut c: Value) -> Value {
    c["architectures"] = json!(["CLIPTextModelWithProjection"]);
    c
}

impl Preset {
    /// The configs of this preset's components.
    pub fn configs(self) -> ModelConfigs {
        let eot = "<|endoftext|>".to_string();
        match self {
            Preset::Sdxl => ModelConfigs {
                unet: sdxl_unet(
                    &[320, 640, 1280],
                    &[5, 10, 20],
                    &[1, 2, 10],
                    (2048, 1280),
                    256,
                    128,
                ),
                vae: sdxl_vae(vae(&[128, 256, 512, 512], 1024)),
                text_encoder: clip(768, 3072, 12, 12, "quick_gelu", 768),
                text_encoder_2: Some(with_projection(clip(1280, 5120, 32, 20, "gelu", 1280))),
                scheduler: sdxl_scheduler(),
                pad_token: eot,
            },
            Preset::TinySdxl => ModelConfigs {
                unet: {
                    let mut c = sdxl_unet(&[16, 32, 48], &[2, 4, 6], &[1, 1, 2], (24, 12), 8, 32);
                    c["norm_num_groups"] = json!(16);
                    c
                },
                vae: {
                    let mut c = sdxl_vae(vae(&[16, 16, 32, 32], 256));
                    c["layers_per_block"] = json!(1);
                    c["norm_num_groups"] = json!(16);
                    c
                },
                text_encoder: clip(8, 32, 3, 2, "quick_gelu", 8),
                text_encoder_2: Some(with_projection(clip(16, 64, 3, 4, "gelu", 12))),
                scheduler: sdxl_scheduler(),
                pad_token: eot,
            },
            Preset::Sd15 => ModelConfigs {
                unet: unet(&[320, 640, 1280, 1280], json!(8), 768, 64, false, false),
                vae: vae(&[128, 256, 512, 512], 512),
                text_encoder: clip(768, 3072, 12, 12, "quick_gelu", 768),
                scheduler: scheduler("epsilon"),
                pad_token: eot,
                text_encoder_2: None,
            },
            Preset::Sd21Base | Preset::Sd21V => {
                let v = self == Preset::Sd21V;
                ModelConfigs {
                    unet: unet(
                        &[320, 640, 1280, 1280],
                        json!([5, 10, 20, 20]),
                        1024,
                        if v { 96 } else { 64 },
                        true,
                        v,
                    ),
                    vae: vae(&[128, 256, 512, 512], if v { 768 } else { 512 }),
                    text_encoder: clip(1024, 4096, 23, 16, "gelu", 512),
                    scheduler: scheduler(if v { "v_prediction" } else { "epsilon" }),
                    pad_token: "!".into(),
                    text_encoder_2: None,
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
                text_encoder_2: None,
            },
            Preset::Shapes => ModelConfigs {
                unet: {
                    let mut c = unet(&[32, 64, 64, 64], json!(4), 64, 8, false, false);
                    c["layers_per_block"] = json!(1);
                    c
                },
                vae: {
                    let mut c = vae(&[16, 32, 64, 64], 64);
                    c["layers_per_block"] = json!(1);
                    c["norm_num_groups"] = json!(16);
                    c
                },
                text_encoder: clip(64, 128, 2, 4, "quick_gelu", 64),
                scheduler: scheduler("epsilon"),
                pad_token: eot,
                text_encoder_2: None,
            },
            Preset::TinyV => ModelConfigs {
                // one head per 64 channels, as SD 2.x (here: one head everywhere)
                unet: unet(&[32, 64, 64, 64], json!([1, 1, 1, 1]), 64, 32, true, true),
                vae: vae(&[32, 32, 64, 64], 256),
                text_encoder: clip(64, 128, 3, 1, "gelu", 32),
                scheduler: scheduler("v_prediction"),
                pad_token: "!".into(),
                text_encoder_2: None,
            },
        }
    }

    /// Whether the text encoder is OpenCLIP (SD 2.x) in the original single-file layout.
    pub fn openclip(self) -> bool {
        matches!(self, Preset::Sd21Base | Preset::Sd21V | Preset::TinyV)
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
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
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
        (0..n)
            .map(|_| bound * (2.0 * rng.uniform() - 1.0))
            .collect()
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
        ("unet", "conv_out.weight") | ("unet", "conv_out.bias") => {
            v.iter_mut().for_each(|x| *x *= 0.1)
        }
        _ => {}
    }
    v
}

/// Writes a safetensors file tensor by tensor (bounded memory), atomically: `tensors`
/// sorted by name, each one's values made by `values(index)` when its turn comes.
fn write_streaming(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    f16: bool,
    mut values: impl FnMut(usize) -> Vec<f32>,
) -> Result<()> {
    let elem = if f16 { 2 } else { 4 };
    let mut header = serde_json::Map::new();
    header.insert("__metadata__".into(), json!({"format": "pt"}));
    let mut offset = 0usize;
    for (name, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * elem;
        header.insert(
            name.clone(),
            json!({"dtype": if f16 { "F16" } else { "F32" }, "shape": shape, "data_offsets": [offset, offset + bytes]}),
        );
        offset += bytes;
    }
    let mut h =
        serde_json::to_vec(&Value::Object(header)).map_err(|e| Error::Msg(e.to_string()))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let io = |e: std::io::Error| Error::io(path, e);
    let tmp = path.with_extension("safetensors.tmp");
    {
        let mut w =
            std::io::BufWriter::with_capacity(1 << 22, std::fs::File::create(&tmp).map_err(io)?);
        w.write_all(&(h.len() as u64).to_le_bytes()).map_err(io)?;
        w.write_all(&h).map_err(io)?;
        for i in 0..tensors.len() {
            for x in values(i) {
                if f16 {
                    w.write_all(&half::f16::from_f32(x).to_le_bytes())
                        .map_err(io)?;
                } else {
                    w.write_all(&x.to_le_bytes()).map_err(io)?;
                }
            }
        }
        w.flush().map_err(io)?;
    }
    std::fs::rename(&tmp, path).map_err(io)?;
    Ok(())
}

/// Writes one component's random tensors.
fn write_safetensors(
    path: &Path,
    tensors: &[(String, Vec<usize>)],
    seed: u64,
    component: &str,
    f16: bool,
) -> Result<()> {
    let mut sorted: Vec<(String, Vec<usize>)> = tensors.to_vec();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    sorted.dedup_by(|a, b| a.0 == b.0);
    write_streaming(path, &sorted, f16, |i| {
        init(&sorted[i].0, &sorted[i].1, seed, component)
    })
}

/// The typed configs of a model's three components, read from their JSON.
fn typed_configs(configs: &ModelConfigs) -> Result<(UNetConfig, VaeConfig, ClipTextConfig)> {
    let parse = |v: &Value, what: &str| -> Result<String> {
        serde_json::to_string(v).map_err(|e| Error::Msg(format!("{what}: {e}")))
    };
    let uc: UNetConfig = serde_json::from_str(&parse(&configs.unet, "unet")?)
        .map_err(|e| Error::Msg(e.to_string()))?;
    let vc: VaeConfig = serde_json::from_str(&parse(&configs.vae, "vae")?)
        .map_err(|e| Error::Msg(e.to_string()))?;
    let cc: ClipTextConfig = serde_json::from_str(&parse(&configs.text_encoder, "text_encoder")?)
        .map_err(|e| Error::Msg(e.to_string()))?;
    Ok((uc, vc, cc))
}

/// The tensors (names and shapes) each component of `configs` needs: loading's list
/// ([`crate::tensors::tensor_lists`]), which the generator fills with random values.
pub fn tensor_lists(configs: &ModelConfigs) -> Result<[(&'static str, TensorList); 3]> {
    let (uc, vc, cc) = typed_configs(configs)?;
    crate::tensors::tensor_lists(&uc, &vc, &cc)
}

/// The tensors of SDXL's second text encoder, `None` for SD 1.x/2.x.
pub fn text_encoder_2_list(configs: &ModelConfigs) -> Result<Option<TensorList>> {
    let Some(v) = &configs.text_encoder_2 else {
        return Ok(None);
    };
    let c: ClipTextConfig = serde_json::from_value(v.clone())
        .map_err(|e| Error::Msg(format!("text_encoder_2: {e}")))?;
    crate::tensors::text_encoder_2_list(&c).map(Some)
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
    write_json(
        &dir.join("scheduler/scheduler_config.json"),
        &configs.scheduler,
    )?;
    write_tokenizer(&dir.join("tokenizer"), &configs.pad_token)?;
    let variant = if f16 { ".fp16" } else { "" };
    let sdxl = match (&configs.text_encoder_2, text_encoder_2_list(configs)?) {
        (Some(config), Some(list)) => {
            let d = dir.join("text_encoder_2");
            std::fs::create_dir_all(&d).map_err(|e| Error::io(&d, e))?;
            write_json(&d.join("config.json"), config)?;
            let path = d.join(format!("model{variant}.safetensors"));
            write_safetensors(
                &path,
                &list,
                component_seed(seed, "text_encoder_2"),
                "text_encoder_2",
                f16,
            )?;
            // SDXL's second tokenizer: the same vocabulary, padding with `!`
            let t = dir.join("tokenizer_2");
            std::fs::create_dir_all(&t).map_err(|e| Error::io(&t, e))?;
            write_tokenizer(&t, "!")?;
            true
        }
        _ => false,
    };
    for (component, list) in &lists {
        let file = if *component == "text_encoder" {
            "model"
        } else {
            "diffusion_pytorch_model"
        };
        let path = dir
            .join(component)
            .join(format!("{file}{variant}.safetensors"));
        write_safetensors(&path, list, seed, component, f16)?;
    }
    let index = if sdxl {
        json!({
            "_class_name": "StableDiffusionXLPipeline",
            "force_zeros_for_empty_prompt": true,
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        })
    } else {
        json!({
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [null, null], "safety_checker": [null, null],
            "requires_safety_checker": false,
            "scheduler": ["diffusers", "DDIMScheduler"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "tokenizer": ["transformers", "CLIPTokenizer"],
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"]
        })
    };
    write_json(&dir.join("model_index.json"), &index)?;
    let _ = SchedulerConfig::default();
    Ok(())
}

/// The bundled CLIP vocabulary as a tokenizer folder padding with `pad_token`.
fn write_tokenizer(tok: &Path, pad_token: &str) -> Result<()> {
    std::fs::write(tok.join("vocab.json"), crate::tokenizer::BUNDLED_VOCAB)
        .map_err(|e| Error::io(tok, e))?;
    std::fs::write(tok.join("merges.txt"), crate::tokenizer::BUNDLED_MERGES)
        .map_err(|e| Error::io(tok, e))?;
    write_json(
        &tok.join("special_tokens_map.json"),
        &json!({"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": pad_token}),
    )?;
    write_json(
        &tok.join("tokenizer_config.json"),
        &json!({"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "do_lower_case": true, "pad_token": pad_token}),
    )
}

/// The original name of a diffusers VAE tensor, and whether it is stored as a 1×1 conv.
fn original_vae(name: &str, levels: usize) -> Option<(String, bool)> {
    let pre = crate::single_file::VAE_PREFIX;
    if name.starts_with("quant_conv.") || name.starts_with("post_quant_conv.") {
        return Some((format!("{pre}{name}"), false));
    }
    let (side, rest) = name.split_once('.')?;
    let fix = |r: &str| r.replacen("conv_shortcut.", "nin_shortcut.", 1);
    let (out, conv) = if let Some(r) = rest.strip_prefix("conv_norm_out.") {
        (format!("norm_out.{r}"), false)
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        (rest.to_string(), false)
    } else if let Some(r) = rest.strip_prefix("mid_block.resnets.0.") {
        (format!("mid.block_1.{}", fix(r)), false)
    } else if let Some(r) = rest.strip_prefix("mid_block.resnets.1.") {
        (format!("mid.block_2.{}", fix(r)), false)
    } else if let Some(r) = rest.strip_prefix("mid_block.attentions.0.") {
        let (n, leaf) = r.rsplit_once('.')?;
        let n = match n {
            "group_norm" => "norm",
            "to_q" => "q",
            "to_k" => "k",
            "to_v" => "v",
            "to_out.0" => "proj_out",
            _ => return None,
        };
        (
            format!("mid.attn_1.{n}.{leaf}"),
            n != "norm" && leaf == "weight",
        )
    } else {
        let p: Vec<&str> = rest.splitn(3, '.').collect();
        let (kind, i, r) = (p[0], p.get(1)?.parse::<usize>().ok()?, *p.get(2)?);
        let (orig, idx) = match kind {
            "down_blocks" => ("down", i),
            "up_blocks" => ("up", levels - 1 - i),
            _ => return None,
        };
        let r = if let Some(r) = r.strip_prefix("resnets.") {
            format!("block.{}", fix(r))
        } else if let Some(r) = r.strip_prefix("downsamplers.0.") {
            format!("downsample.{r}")
        } else if let Some(r) = r.strip_prefix("upsamplers.0.") {
            format!("upsample.{r}")
        } else {
            return None;
        };
        (format!("{orig}.{idx}.{r}"), false)
    };
    Some((format!("{pre}{side}.{out}"), conv))
}

/// How one tensor of a single-file checkpoint is made from the random diffusers tensors.
enum Recipe {
    /// The tensor of that (component, diffusers name), reshaped.
    Same(&'static str, String),
    /// Those tensors concatenated along dimension 0 (OpenCLIP's fused `in_proj`).
    Concat(&'static str, Vec<String>),
    /// That 2-D tensor transposed (OpenCLIP's `text_projection`, stored as x @ W).
    Transposed(&'static str, String),
    /// Fresh random values (tensors nulltext ignores, e.g. OpenCLIP's last layer in SD 2.x).
    Fresh,
}

/// A tensor of a single-file checkpoint: its name, shape, and how to make it.
type Planned = (String, Vec<usize>, Recipe);

/// The seed of a component's random values: SDXL's second text encoder has its own, so
/// that its values differ from the first's.
fn component_seed(seed: u64, component: &str) -> u64 {
    match component {
        "text_encoder_2" => seed.wrapping_add(2),
        _ => seed,
    }
}

/// The OpenCLIP text tower of `component` (transformers names, config `c`) under `prefix`,
/// the inverse of [`crate::single_file`]'s `openclip_to_clip`: q/k/v fused into `in_proj`;
/// `extra_layer`, one layer more than the model uses (SD 2.x, which takes the penultimate
/// layer); `text_projection` transposed where the component has one, else fresh values.
fn openclip_plan(
    prefix: &str,
    component: &'static str,
    c: &ClipTextConfig,
    has_projection: bool,
    extra_layer: bool,
) -> Vec<Planned> {
    let h = c.hidden_size;
    let t = |s: &str| format!("text_model.{s}");
    let same = |s: String| Recipe::Same(component, s);
    let mut out: Vec<Planned> = vec![
        (
            format!("{prefix}token_embedding.weight"),
            vec![c.vocab_size, h],
            same(t("embeddings.token_embedding.weight")),
        ),
        (
            format!("{prefix}positional_embedding"),
            vec![c.max_position_embeddings, h],
            same(t("embeddings.position_embedding.weight")),
        ),
        (
            format!("{prefix}ln_final.weight"),
            vec![h],
            same(t("final_layer_norm.weight")),
        ),
        (
            format!("{prefix}ln_final.bias"),
            vec![h],
            same(t("final_layer_norm.bias")),
        ),
    ];
    let layers = c.num_hidden_layers + usize::from(extra_layer);
    for i in 0..layers {
        let p = format!("{prefix}transformer.resblocks.{i}");
        let l = t(&format!("encoder.layers.{i}"));
        let real = i < c.num_hidden_layers;
        let mut add = |k: String, shape: Vec<usize>, r: Recipe| {
            out.push((k, shape, if real { r } else { Recipe::Fresh }))
        };
        for (leaf, shape) in [("weight", vec![3 * h, h]), ("bias", vec![3 * h])] {
            let qkv = ["q", "k", "v"].map(|x| format!("{l}.self_attn.{x}_proj.{leaf}"));
            let r = Recipe::Concat(component, qkv.to_vec());
            add(format!("{p}.attn.in_proj_{leaf}"), shape, r);
        }
        for (from, to, shape) in [
            ("attn.out_proj", "self_attn.out_proj", vec![h, h]),
            ("ln_1", "layer_norm1", vec![h]),
            ("ln_2", "layer_norm2", vec![h]),
            ("mlp.c_fc", "mlp.fc1", vec![c.intermediate_size, h]),
            ("mlp.c_proj", "mlp.fc2", vec![h, c.intermediate_size]),
        ] {
            // a norm's bias has its weight's shape; a linear layer's, its output width
            let bias = vec![shape[0]];
            add(
                format!("{p}.{from}.weight"),
                shape,
                same(format!("{l}.{to}.weight")),
            );
            add(
                format!("{p}.{from}.bias"),
                bias,
                same(format!("{l}.{to}.bias")),
            );
        }
    }
    let projection = format!("{prefix}text_projection");
    match (has_projection, c.projection_dim) {
        (true, Some(p)) => out.push((
            projection,
            vec![h, p],
            Recipe::Transposed(component, "text_projection.weight".into()),
        )),
        _ => out.push((projection, vec![h, h], Recipe::Fresh)),
    }
    out
}

/// Each component's diffusers tensors, by component name.
type ComponentLists = Vec<(&'static str, TensorList)>;

/// The tensors of the single file [`write_random_single_file`] writes, sorted by name, and
/// every component's diffusers tensors they are made from.
fn single_file_plan(
    configs: &ModelConfigs,
    openclip: bool,
) -> Result<(Vec<Planned>, ComponentLists)> {
    use crate::single_file as sf;
    let lists = tensor_lists(configs)?;
    let (uc, vc, cc) = typed_configs(configs)?;
    let text_2: Option<(ClipTextConfig, TensorList)> =
        match (&configs.text_encoder_2, text_encoder_2_list(configs)?) {
            (Some(v), Some(list)) => Some((
                serde_json::from_value(v.clone())
                    .map_err(|e| Error::Msg(format!("text_encoder_2: {e}")))?,
                list,
            )),
            _ => None,
        };
    let sdxl = text_2.is_some();
    let layers = match &uc.layers_per_block {
        crate::config::PerBlock::One(l) => *l,
        crate::config::PerBlock::Each(v) => v[0],
    };
    let up_attn: Vec<bool> = uc
        .up_block_types
        .iter()
        .map(|t| t.starts_with("CrossAttn"))
        .collect();
    let levels = vc.block_out_channels.len();
    let mut out: Vec<Planned> = Vec::new();
    for (component, list) in &lists {
        let comp: &'static str = component;
        for (name, shape) in list {
            match comp {
                "unet" => {
                    let k = sf::original_unet_key(name, layers, &up_attn)
                        .ok_or_else(|| Error::Msg(format!("no original name for unet `{name}`")))?;
                    out.push((k, shape.clone(), Recipe::Same(comp, name.clone())));
                }
                "vae" => {
                    let (k, conv) = original_vae(name, levels)
                        .ok_or_else(|| Error::Msg(format!("no original name for vae `{name}`")))?;
                    let mut sh = shape.clone();
                    if conv && sh.len() == 2 {
                        sh.extend([1, 1]);
                    }
                    out.push((k, sh, Recipe::Same(comp, name.clone())));
                }
                _ if sdxl || !openclip => {
                    let prefix = if sdxl {
                        sf::SDXL_CLIP_PREFIX
                    } else {
                        sf::CLIP_PREFIX
                    };
                    out.push((
                        format!("{prefix}{name}"),
                        shape.clone(),
                        Recipe::Same(comp, name.clone()),
                    ))
                }
                _ => {}
            }
        }
    }
    if openclip && !sdxl {
        out.extend(openclip_plan(
            sf::OPENCLIP_PREFIX,
            "text_encoder",
            &cc,
            false,
            true,
        ));
    }
    if let Some((c2, _)) = &text_2 {
        out.extend(openclip_plan(
            sf::SDXL_OPENCLIP_PREFIX,
            "text_encoder_2",
            c2,
            true,
            false,
        ));
    }
    out.sort_by(|a, b| a.0.cmp(&b.0));
    let mut all: ComponentLists = lists.into_iter().collect();
    all.extend(text_2.map(|(_, l)| ("text_encoder_2", l)));
    Ok((out, all))
}

/// The names and shapes of the tensors [`write_random_single_file`] writes for `configs`
/// (its header), without making any values.
pub fn single_file_shapes(
    configs: &ModelConfigs,
    openclip: bool,
) -> Result<std::collections::BTreeMap<String, Vec<usize>>> {
    let (plan, _) = single_file_plan(configs, openclip)?;
    Ok(plan.into_iter().map(|(n, s, _)| (n, s)).collect())
}

/// Writes the same random weights as [`write_random_model`] as one single-file checkpoint
/// in the original CompVis/A1111 layout: for SD 1.x/2.x presets the text encoder in the
/// transformers layout or (`openclip`, SD 2.x) OpenCLIP's; for SDXL presets always CLIP
/// ViT-L then OpenCLIP (`conditioner.embedders.{0,1}`), `openclip` unused.
pub fn write_random_single_file(
    path: &Path,
    configs: &ModelConfigs,
    openclip: bool,
    seed: u64,
) -> Result<()> {
    let (out, all) = single_file_plan(configs, openclip)?;
    let shapes_of: std::collections::HashMap<(&str, &str), Vec<usize>> = all
        .iter()
        .flat_map(|(c, l)| l.iter().map(move |(n, s)| ((*c, n.as_str()), s.clone())))
        .collect();
    let of = |c: &str, n: &str| init(n, &shapes_of[&(c, n)], component_seed(seed, c), c);
    let values = |r: &Recipe, name: &str, shape: &[usize]| -> Vec<f32> {
        match r {
            Recipe::Same(c, n) => of(c, n),
            Recipe::Concat(c, ns) => ns.iter().flat_map(|n| of(c, n)).collect(),
            Recipe::Transposed(c, n) => {
                // out [h, p] from w [p, h]: out[i][j] = w[j][i]
                let (w, h, p) = (of(c, n), shape[0], shape[1]);
                (0..h * p).map(|k| w[(k % p) * h + k / p]).collect()
            }
            Recipe::Fresh => init(name, shape, seed ^ 0xfeed, "extra"),
        }
    };
    let list: Vec<(String, Vec<usize>)> =
        out.iter().map(|(n, s, _)| (n.clone(), s.clone())).collect();
    write_streaming(path, &list, false, |i| {
        values(&out[i].2, &out[i].0, &out[i].1)
    })
}

/// Parameter count of each component (SDXL's second text encoder last).
pub fn parameter_counts(configs: &ModelConfigs) -> Result<Vec<(&'static str, usize)>> {
    let (uc, vc, cc) = typed_configs(configs)?;
    let mut counts = crate::tensors::parameter_counts(&uc, &vc, &cc)?;
    if let Some(list) = text_encoder_2_list(configs)? {
        let n = list.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        counts.push(("text_encoder_2", n));
    }
    Ok(counts)
}
