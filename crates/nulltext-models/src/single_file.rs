//! Single-file checkpoints in the original CompVis / A1111 key layout
//! (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*` for
//! SD 1.x, `cond_stage_model.model.*` OpenCLIP for SD 2.x; for SDXL
//! `conditioner.embedders.0.transformer.*` CLIP ViT-L and `conditioner.embedders.1.model.*`
//! OpenCLIP ViT-bigG), renamed on load to the diffusers names the rest of nulltext uses, as
//! diffusers' `loaders/single_file_utils.py` does. The architecture is read off the tensor
//! shapes.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

use crate::config::{ClipTextConfig, PerBlock, SchedulerConfig, UNetConfig, VaeConfig};
use crate::error::{Error, Result};
use crate::weights::{read_header, WeightStore};

pub const UNET_PREFIX: &str = "model.diffusion_model.";
pub const VAE_PREFIX: &str = "first_stage_model.";
pub const CLIP_PREFIX: &str = "cond_stage_model.transformer.";
pub const OPENCLIP_PREFIX: &str = "cond_stage_model.model.";
/// SDXL's first text encoder, CLIP ViT-L in the transformers layout.
pub const SDXL_CLIP_PREFIX: &str = "conditioner.embedders.0.transformer.";
/// SDXL's second text encoder, OpenCLIP ViT-bigG with its projection.
pub const SDXL_OPENCLIP_PREFIX: &str = "conditioner.embedders.1.model.";
/// The SDXL refiner's only text encoder (OpenCLIP ViT-bigG).
const REFINER_OPENCLIP_PREFIX: &str = "conditioner.embedders.0.model.";

/// Original → diffusers prefixes of the UNet tensors outside the down and up blocks. Both
/// directions read this one table ([`unet_key`] on load, [`original_unet_key`] when writing).
const UNET_FIXED: [(&str, &str); 10] = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    // SDXL's added text/time conditioning
    ("label_emb.0.0.", "add_embedding.linear_1."),
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
    ("middle_block.0.", "mid_block.resnets.0."),
    ("middle_block.1.", "mid_block.attentions.0."),
    ("middle_block.2.", "mid_block.resnets.1."),
];

/// Original → diffusers names inside a ResNet block.
const RESNET_LEAVES: [(&str, &str); 6] = [
    ("in_layers.0.", "norm1."),
    ("in_layers.2.", "conv1."),
    ("emb_layers.1.", "time_emb_proj."),
    ("out_layers.0.", "norm2."),
    ("out_layers.3.", "conv2."),
    ("skip_connection.", "conv_shortcut."),
];

/// `name` with the prefix of the first `table` entry it starts with swapped for the other
/// side's (`to_diffusers`: original → diffusers).
fn swap_prefix(table: &[(&str, &str)], name: &str, to_diffusers: bool) -> Option<String> {
    table.iter().find_map(|&(orig, diff)| {
        let (from, to) = if to_diffusers {
            (orig, diff)
        } else {
            (diff, orig)
        };
        name.strip_prefix(from).map(|r| format!("{to}{r}"))
    })
}

/// A name renamed by [`UNET_FIXED`] (`to_diffusers`: original → diffusers), the leaves of
/// the middle block's ResNets renamed too.
fn unet_fixed(name: &str, to_diffusers: bool) -> Option<String> {
    UNET_FIXED.iter().find_map(|&(orig, diff)| {
        let (from, to) = if to_diffusers {
            (orig, diff)
        } else {
            (diff, orig)
        };
        let rest = name.strip_prefix(from)?;
        let rest = match diff.starts_with("mid_block.resnets.") {
            true => swap_prefix(&RESNET_LEAVES, rest, to_diffusers)?,
            false => rest.to_string(),
        };
        Some(format!("{to}{rest}"))
    })
}

/// `input_blocks.4.1.proj_in.weight` → `down_blocks.1.attentions.0.proj_in.weight`, etc.
/// (`layers`: ResNets per down block).
pub fn unet_key(key: &str, layers: usize) -> Option<String> {
    let k = key.strip_prefix(UNET_PREFIX)?;
    if let Some(s) = unet_fixed(k, true) {
        return Some(s);
    }
    let parts: Vec<&str> = k.splitn(4, '.').collect();
    if parts.len() < 4 {
        return None;
    }
    let (group, i, j, rest) = (
        parts[0],
        parts[1].parse::<usize>().ok()?,
        parts[2],
        parts[3],
    );
    let j: usize = j.parse().ok()?;
    let resnet = |r: &str| swap_prefix(&RESNET_LEAVES, r, true);
    match group {
        "input_blocks" => {
            let i = i.checked_sub(1)?;
            let (block, layer) = (i / (layers + 1), i % (layers + 1));
            if layer == layers {
                let r = rest.strip_prefix("op.")?;
                Some(format!("down_blocks.{block}.downsamplers.0.conv.{r}"))
            } else if j == 0 {
                Some(format!(
                    "down_blocks.{block}.resnets.{layer}.{}",
                    resnet(rest)?
                ))
            } else {
                Some(format!("down_blocks.{block}.attentions.{layer}.{rest}"))
            }
        }
        "output_blocks" => {
            let (block, layer) = (i / (layers + 1), i % (layers + 1));
            if j == 0 {
                Some(format!(
                    "up_blocks.{block}.resnets.{layer}.{}",
                    resnet(rest)?
                ))
            } else if let Some(r) = rest.strip_prefix("conv.") {
                Some(format!("up_blocks.{block}.upsamplers.0.conv.{r}"))
            } else {
                Some(format!("up_blocks.{block}.attentions.{layer}.{rest}"))
            }
        }
        _ => None,
    }
}

/// The inverse of [`unet_key`]: the original name of a diffusers UNet tensor (`up_attn`:
/// whether each up block has attentions, which moves its upsampler to index 2).
pub fn original_unet_key(name: &str, layers: usize, up_attn: &[bool]) -> Option<String> {
    if let Some(s) = unet_fixed(name, false) {
        return Some(format!("{UNET_PREFIX}{s}"));
    }
    let p: Vec<&str> = name.splitn(5, '.').collect();
    if p.len() < 5 {
        return None;
    }
    let (blocks, b, kind, l, rest) = (p[0], p[1].parse::<usize>().ok()?, p[2], p[3], p[4]);
    let l: usize = l.parse().ok()?;
    let resnet = |r: &str| swap_prefix(&RESNET_LEAVES, r, false);
    let k = match (blocks, kind) {
        ("down_blocks", "resnets") => {
            format!(
                "input_blocks.{}.0.{}",
                1 + b * (layers + 1) + l,
                resnet(rest)?
            )
        }
        ("down_blocks", "attentions") => {
            format!("input_blocks.{}.1.{rest}", 1 + b * (layers + 1) + l)
        }
        ("down_blocks", "downsamplers") => format!(
            "input_blocks.{}.0.op.{}",
            1 + b * (layers + 1) + layers,
            rest.strip_prefix("conv.")?
        ),
        ("up_blocks", "resnets") => {
            format!("output_blocks.{}.0.{}", b * (layers + 1) + l, resnet(rest)?)
        }
        ("up_blocks", "attentions") => format!("output_blocks.{}.1.{rest}", b * (layers + 1) + l),
        ("up_blocks", "upsamplers") => format!(
            "output_blocks.{}.{}.conv.{}",
            b * (layers + 1) + layers,
            if *up_attn.get(b)? { 2 } else { 1 },
            rest.strip_prefix("conv.")?
        ),
        _ => return None,
    };
    Some(format!("{UNET_PREFIX}{k}"))
}

/// `first_stage_model.decoder.up.3.block.0.conv1.weight` → `decoder.up_blocks.0.resnets.0.conv1.weight`.
pub fn vae_key(key: &str, levels: usize) -> Option<String> {
    let k = key.strip_prefix(VAE_PREFIX)?;
    let (side, rest) = k.split_once('.')?;
    if side == "quant_conv" || side == "post_quant_conv" {
        return Some(k.to_string());
    }
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let fix_block = |r: &str| r.replacen("nin_shortcut.", "conv_shortcut.", 1);
    let out = if let Some(r) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{r}")
    } else if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else if let Some(r) = rest.strip_prefix("mid.") {
        if let Some(r) = r.strip_prefix("block_1.") {
            format!("mid_block.resnets.0.{}", fix_block(r))
        } else if let Some(r) = r.strip_prefix("block_2.") {
            format!("mid_block.resnets.1.{}", fix_block(r))
        } else if let Some(r) = r.strip_prefix("attn_1.") {
            let (name, leaf) = r.split_once('.')?;
            let name = match name {
                "norm" => "group_norm",
                "q" => "to_q",
                "k" => "to_k",
                "v" => "to_v",
                "proj_out" => "to_out.0",
                _ => return None,
            };
            format!("mid_block.attentions.0.{name}.{leaf}")
        } else {
            return None;
        }
    } else {
        let (kind, r) = rest.split_once('.')?;
        let (idx, r) = r.split_once('.')?;
        let idx: usize = idx.parse().ok()?;
        let (blocks, n) = match kind {
            "down" => ("down_blocks", idx),
            "up" => ("up_blocks", levels.checked_sub(1 + idx)?),
            _ => return None,
        };
        if let Some(r) = r.strip_prefix("block.") {
            let (j, leaf) = r.split_once('.')?;
            format!("{blocks}.{n}.resnets.{j}.{}", fix_block(leaf))
        } else if let Some(r) = r.strip_prefix("downsample.conv.") {
            format!("{blocks}.{n}.downsamplers.0.conv.{r}")
        } else if let Some(r) = r.strip_prefix("upsample.conv.") {
            format!("{blocks}.{n}.upsamplers.0.conv.{r}")
        } else {
            return None;
        }
    };
    Some(format!("{side}.{out}"))
}

/// What a single-file checkpoint holds and how it is laid out.
#[derive(Debug, Clone)]
pub struct Detected {
    pub unet: UNetConfig,
    pub vae: VaeConfig,
    /// The (first) text encoder.
    pub text: ClipTextConfig,
    /// OpenCLIP text encoder (SD 2.x) rather than the transformers CLIP layout.
    pub openclip: bool,
    /// SDXL's second text encoder (OpenCLIP ViT-bigG with its projection); `None` for SD
    /// 1.x/2.x.
    pub text_2: Option<ClipTextConfig>,
    pub layers_per_block: usize,
    pub vae_levels: usize,
}

impl Detected {
    /// Where the first text encoder's tensors are (transformers layout, or OpenCLIP's).
    pub fn text_prefix(&self) -> &'static str {
        match (self.text_2.is_some(), self.openclip) {
            (true, _) => SDXL_CLIP_PREFIX,
            (false, true) => OPENCLIP_PREFIX,
            (false, false) => CLIP_PREFIX,
        }
    }
}

fn shape<'a>(shapes: &'a BTreeMap<String, Vec<usize>>, k: &str) -> Result<&'a [usize]> {
    shapes
        .get(k)
        .map(|v| v.as_slice())
        .ok_or_else(|| Error::Unsupported(format!("single-file checkpoint lacks `{k}`")))
}

/// The shape of `k`, which must have `N` dimensions, none of them zero. Every size read off
/// a file goes through here before it is used: a crafted header may say anything.
fn dims<const N: usize>(shapes: &BTreeMap<String, Vec<usize>>, k: &str) -> Result<[usize; N]> {
    let s = shape(shapes, k)?;
    <[usize; N]>::try_from(s)
        .ok()
        .filter(|d| d.iter().all(|&x| x > 0))
        .ok_or_else(|| {
            Error::Unsupported(format!(
                "single-file checkpoint: `{k}` has shape {s:?}; expected {N} non-zero dimensions"
            ))
        })
}

fn from_json<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| Error::Msg(e.to_string()))
}

/// What a checkpoint is if it is a model nulltext refuses (its UNet takes other inputs than
/// a text-to-image model's): an SDXL refiner or an inpainting model.
pub fn other_model(shapes: &BTreeMap<String, Vec<usize>>) -> Option<&'static str> {
    let has = |prefix: &str| shapes.keys().any(|k| k.starts_with(prefix));
    let label_in = shapes
        .get(&format!("{UNET_PREFIX}label_emb.0.0.weight"))
        .and_then(|s| s.get(1).copied());
    let in_channels = shapes
        .get(&format!("{UNET_PREFIX}input_blocks.0.0.weight"))
        .and_then(|s| s.get(1).copied());
    if (has(REFINER_OPENCLIP_PREFIX) && !has(SDXL_CLIP_PREFIX)) || label_in == Some(2560) {
        Some(crate::model::SDXL_REFINER)
    } else if in_channels == Some(9) {
        Some(crate::model::INPAINTING)
    } else {
        None
    }
}

/// Reads the architecture off the tensor shapes (SD 1.x/2.x/XL structure, any widths).
pub fn detect(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Detected> {
    let u = |s: &str| format!("{UNET_PREFIX}{s}");
    let [_, in_channels, _, _] = dims::<4>(shapes, &u("input_blocks.0.0.weight"))?;
    // layers per block: the first downsampler sits at input_blocks.(layers+1)
    let layers = (1..8)
        .find(|l| shapes.contains_key(&u(&format!("input_blocks.{}.0.op.weight", l + 1))))
        .ok_or_else(|| Error::Unsupported("cannot find the UNet's first downsampler".into()))?;
    let mut blocks = Vec::new();
    let mut attn = Vec::new();
    // transformer blocks per attention (SDXL: 2 and 10 in base); 1 where there is none
    let mut depth = Vec::new();
    for level in 0.. {
        let first = 1 + level * (layers + 1);
        let k = u(&format!("input_blocks.{first}.0.out_layers.3.weight"));
        if !shapes.contains_key(&k) {
            break;
        }
        blocks.push(dims::<4>(shapes, &k)?[0]);
        let a = |s: &str| u(&format!("input_blocks.{first}.1.{s}"));
        attn.push(shapes.contains_key(&a("proj_in.weight")));
        let n = (0..)
            .take_while(|n| {
                shapes.contains_key(&a(&format!("transformer_blocks.{n}.norm1.weight")))
            })
            .count();
        depth.push(n.max(1));
    }
    if blocks.is_empty() {
        return Err(Error::Unsupported("no UNet blocks found".into()));
    }
    let n = blocks.len();
    let first_attn = (0..n)
        .find(|l| attn[*l])
        .ok_or_else(|| Error::Unsupported("the UNet has no attention".into()))?;
    let a = 1 + first_attn * (layers + 1);
    let [_, context] = dims::<2>(
        shapes,
        &u(&format!(
            "input_blocks.{a}.1.transformer_blocks.0.attn2.to_k.weight"
        )),
    )?;
    let linear = shape(shapes, &u(&format!("input_blocks.{a}.1.proj_in.weight")))?.len() == 2;
    let heads: Vec<usize> = if context == 768 {
        vec![8; n]
    } else {
        blocks.iter().map(|c| (c / 64).max(1)).collect()
    };
    let [out_channels, _, _, _] = dims::<4>(shapes, &u("out.2.weight"))?;
    let kind = |a: bool, with: &str, without: &str| if a { with } else { without }.to_string();
    let down: Vec<String> = attn
        .iter()
        .map(|&a| kind(a, "CrossAttnDownBlock2D", "DownBlock2D"))
        .collect();
    let up: Vec<String> = attn
        .iter()
        .rev()
        .map(|&a| kind(a, "CrossAttnUpBlock2D", "UpBlock2D"))
        .collect();
    let text_2 = match shapes.keys().any(|k| k.starts_with(SDXL_OPENCLIP_PREFIX)) {
        true => Some(openclip_config(shapes, SDXL_OPENCLIP_PREFIX, true)?),
        false => None,
    };
    let mut unet = serde_json::json!({
        "in_channels": in_channels, "out_channels": out_channels,
        "block_out_channels": blocks, "down_block_types": down, "up_block_types": up,
        "layers_per_block": layers, "attention_head_dim": heads,
        "transformer_layers_per_block": depth,
        "cross_attention_dim": context, "use_linear_projection": linear,
        "sample_size": 64,
    });
    if let Some(t2) = &text_2 {
        // SDXL: label_emb takes the pooled text embedding and six embedded time ids
        let [_, added] = dims::<2>(shapes, &u("label_emb.0.0.weight"))?;
        let pooled = t2.projection_dim.unwrap_or(t2.hidden_size);
        let time = added.checked_sub(pooled).map(|r| r / 6).filter(|t| *t > 0);
        let time = time.ok_or_else(|| {
            Error::Unsupported(format!(
                "single-file checkpoint: `label_emb` takes {added} numbers, which is not the \
                 pooled text embedding's {pooled} and six time ids"
            ))
        })?;
        unet["addition_embed_type"] = "text_time".into();
        unet["addition_time_embed_dim"] = time.into();
        unet["projection_class_embeddings_input_dim"] = added.into();
        unet["sample_size"] = 128.into();
    }
    let unet: UNetConfig = from_json(unet)?;

    let v = |s: &str| format!("{VAE_PREFIX}{s}");
    let mut vblocks = Vec::new();
    loop {
        let k = v(&format!(
            "encoder.down.{}.block.0.conv1.weight",
            vblocks.len()
        ));
        if !shapes.contains_key(&k) {
            break;
        }
        vblocks.push(dims::<4>(shapes, &k)?[0]);
    }
    if vblocks.is_empty() {
        return Err(Error::Unsupported(
            "single-file checkpoint has no VAE (first_stage_model.*)".into(),
        ));
    }
    let vlayers = (0..)
        .take_while(|j| shapes.contains_key(&v(&format!("encoder.down.0.block.{j}.conv1.weight"))))
        .count();
    let [latent, _, _, _] = dims::<4>(shapes, &v("post_quant_conv.weight"))?;
    let mut vae = serde_json::json!({
        "block_out_channels": vblocks,
        "down_block_types": vec!["DownEncoderBlock2D"; vblocks.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; vblocks.len()],
        "layers_per_block": vlayers, "latent_channels": latent,
    });
    if text_2.is_some() {
        // SDXL's VAE: its own scaling factor, and run in f32 under f16 (it overflows)
        vae["scaling_factor"] = 0.13025.into();
        vae["force_upcast"] = true.into();
    }
    let vae: VaeConfig = from_json(vae)?;

    let openclip = text_2.is_none() && shapes.keys().any(|k| k.starts_with(OPENCLIP_PREFIX));
    let text = match (&text_2, openclip) {
        (Some(_), _) => clip_config(shapes, SDXL_CLIP_PREFIX)?,
        // SD 2.x uses the penultimate layer: the last one is dropped, as diffusers does.
        (None, true) => openclip_config(shapes, OPENCLIP_PREFIX, false)?,
        (None, false) => clip_config(shapes, CLIP_PREFIX)?,
    };
    Ok(Detected {
        unet,
        vae,
        text,
        openclip,
        text_2,
        layers_per_block: layers,
        vae_levels: vblocks.len(),
    })
}

/// The config of a transformers-layout CLIP text encoder under `prefix`.
fn clip_config(shapes: &BTreeMap<String, Vec<usize>>, prefix: &str) -> Result<ClipTextConfig> {
    let c = |s: &str| format!("{prefix}text_model.{s}");
    let [vocab, hidden] = dims::<2>(shapes, &c("embeddings.token_embedding.weight"))?;
    let layers = (0..)
        .take_while(|i| shapes.contains_key(&c(&format!("encoder.layers.{i}.layer_norm1.weight"))))
        .count();
    let [inter, _] = dims::<2>(shapes, &c("encoder.layers.0.mlp.fc1.weight"))?;
    let [positions, _] = dims::<2>(shapes, &c("embeddings.position_embedding.weight"))?;
    from_json(serde_json::json!({
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": (hidden / 64).max(1),
        "hidden_act": "quick_gelu", "max_position_embeddings": positions,
    }))
}

/// The config of an OpenCLIP text tower under `prefix`: every layer and the projection
/// (`with_projection`, SDXL's second encoder), or all but the last layer (SD 2.x, which takes
/// the penultimate one).
fn openclip_config(
    shapes: &BTreeMap<String, Vec<usize>>,
    prefix: &str,
    with_projection: bool,
) -> Result<ClipTextConfig> {
    let o = |s: &str| format!("{prefix}{s}");
    let [vocab, hidden] = dims::<2>(shapes, &o("token_embedding.weight"))?;
    let all = (0..)
        .take_while(|i| shapes.contains_key(&o(&format!("transformer.resblocks.{i}.ln_1.weight"))))
        .count();
    let [inter, _] = dims::<2>(shapes, &o("transformer.resblocks.0.mlp.c_fc.weight"))?;
    let no_layers = || {
        Error::Unsupported("single-file checkpoint: the OpenCLIP text encoder has no layers".into())
    };
    let layers = match with_projection {
        true => Some(all).filter(|n| *n > 0),
        false => all.checked_sub(1),
    }
    .ok_or_else(no_layers)?;
    let [positions, _] = dims::<2>(shapes, &o("positional_embedding"))?;
    let projection = match with_projection {
        // OpenCLIP's `text_projection` is [hidden, P] (x @ W)
        true => Some(dims::<2>(shapes, &o("text_projection"))?[1]),
        false => None,
    };
    from_json(serde_json::json!({
        "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
        "num_hidden_layers": layers, "num_attention_heads": (hidden / 64).max(1),
        "hidden_act": "gelu", "max_position_embeddings": positions,
        "projection_dim": projection,
    }))
}

/// Tensor names and shapes of a safetensors file (header only).
pub fn read_shapes(path: &Path) -> Result<BTreeMap<String, Vec<usize>>> {
    let (_, _, meta) = read_header(path)?;
    Ok(meta
        .tensors()
        .into_iter()
        .map(|(k, info)| (k, info.shape.clone()))
        .collect())
}

/// The weight stores of a single-file checkpoint, under diffusers names.
pub struct SingleFileStores {
    pub unet: WeightStore,
    pub vae: WeightStore,
    pub text: WeightStore,
    /// SDXL's second text encoder (`CLIPTextModelWithProjection` names).
    pub text_2: Option<WeightStore>,
}

/// Opens the components of the checkpoint at `path` laid out as `d` says, the VAE in
/// `vae_dtype` and the rest in `dtype`.
pub fn open_stores(
    path: &Path,
    d: &Detected,
    device: &Device,
    dtype: DType,
    vae_dtype: DType,
) -> Result<SingleFileStores> {
    let files = vec![path.to_path_buf()];
    let layers = d.layers_per_block;
    let unet = WeightStore::open_renamed(&files, device, dtype, |k| unet_key(k, layers))?;
    let levels = d.vae_levels;
    let vae = WeightStore::open_renamed(&files, device, vae_dtype, |k| vae_key(k, levels))?;
    let openclip = |prefix: &str, c: &ClipTextConfig, with_projection: bool| {
        let mut store = WeightStore::open_renamed(&files, device, dtype, |k| {
            k.strip_prefix(prefix).map(|r| format!("openclip.{r}"))
        })?;
        openclip_to_clip(&mut store, c, with_projection)?;
        Ok::<_, Error>(store)
    };
    let text = match d.openclip {
        true => openclip(OPENCLIP_PREFIX, &d.text, false)?,
        false => {
            let prefix = d.text_prefix();
            WeightStore::open_renamed(&files, device, dtype, |k| {
                k.strip_prefix(prefix).map(String::from)
            })?
        }
    };
    let text_2 = match &d.text_2 {
        Some(c) => Some(openclip(SDXL_OPENCLIP_PREFIX, c, true)?),
        None => None,
    };
    Ok(SingleFileStores {
        unet,
        vae,
        text,
        text_2,
    })
}

/// Materializes OpenCLIP's text tower under transformers' CLIP names (the fused
/// `in_proj` split into q/k/v, `with_projection`: `text_projection` transposed into a
/// linear layer's weight), as diffusers' `convert_open_clip_checkpoint` does.
fn openclip_to_clip(
    store: &mut WeightStore,
    c: &ClipTextConfig,
    with_projection: bool,
) -> Result<()> {
    let h = c.hidden_size;
    let get = |s: &WeightStore, k: &str| s.get_any_shape(&format!("openclip.{k}"));
    let mut out: Vec<(String, Tensor)> = vec![
        (
            "text_model.embeddings.token_embedding.weight".into(),
            get(store, "token_embedding.weight")?,
        ),
        (
            "text_model.embeddings.position_embedding.weight".into(),
            get(store, "positional_embedding")?,
        ),
        (
            "text_model.final_layer_norm.weight".into(),
            get(store, "ln_final.weight")?,
        ),
        (
            "text_model.final_layer_norm.bias".into(),
            get(store, "ln_final.bias")?,
        ),
    ];
    for i in 0..c.num_hidden_layers {
        let p = format!("transformer.resblocks.{i}");
        let t = format!("text_model.encoder.layers.{i}");
        let w = get(store, &format!("{p}.attn.in_proj_weight"))?;
        let b = get(store, &format!("{p}.attn.in_proj_bias"))?;
        for (j, name) in ["q_proj", "k_proj", "v_proj"].iter().enumerate() {
            out.push((
                format!("{t}.self_attn.{name}.weight"),
                w.narrow(0, j * h, h)?.contiguous()?,
            ));
            out.push((
                format!("{t}.self_attn.{name}.bias"),
                b.narrow(0, j * h, h)?.contiguous()?,
            ));
        }
        for (from, to) in [
            ("attn.out_proj", "self_attn.out_proj"),
            ("ln_1", "layer_norm1"),
            ("ln_2", "layer_norm2"),
            ("mlp.c_fc", "mlp.fc1"),
            ("mlp.c_proj", "mlp.fc2"),
        ] {
            for leaf in ["weight", "bias"] {
                out.push((
                    format!("{t}.{to}.{leaf}"),
                    get(store, &format!("{p}.{from}.{leaf}"))?,
                ));
            }
        }
    }
    if with_projection {
        // OpenCLIP computes x @ W with W [hidden, P]; a linear layer's weight is Wᵀ [P, hidden]
        let w = get(store, "text_projection")?.t()?.contiguous()?;
        out.push(("text_projection.weight".into(), w));
    }
    for (k, t) in out {
        store.insert(k, t);
    }
    Ok(())
}

/// Keys of the checkpoint that none of the renamings claim, and names a loaded model
/// asked for that the checkpoint lacked: what a fine-tune's author should see.
pub fn unclaimed_keys(shapes: &BTreeMap<String, Vec<usize>>, d: &Detected) -> Vec<String> {
    let mut out: BTreeSet<String> = BTreeSet::new();
    for k in shapes.keys() {
        let claimed = if k.starts_with(UNET_PREFIX) {
            unet_key(k, d.layers_per_block).is_some()
        } else if k.starts_with(VAE_PREFIX) {
            vae_key(k, d.vae_levels).is_some()
        } else if [
            CLIP_PREFIX,
            OPENCLIP_PREFIX,
            SDXL_CLIP_PREFIX,
            SDXL_OPENCLIP_PREFIX,
        ]
        .iter()
        .any(|p| k.starts_with(p))
        {
            true
        } else {
            // EMA copies, loss weights and the like are ignored on purpose.
            k.starts_with("model_ema.")
                || k == "alphas_cumprod"
                || k.starts_with("betas")
                || k.starts_with("alphas")
                || k.starts_with("sqrt_")
                || k.starts_with("log_one_minus")
                || k.starts_with("posterior_")
                || k == "logvar"
                || k.starts_with("model.diffusion_model")
                || k == "cond_stage_model.transformer.text_model.embeddings.position_ids"
        };
        if !claimed {
            out.insert(k.clone());
        }
    }
    out.into_iter().collect()
}

/// Scheduler settings of a single-file checkpoint: SD's DDIM defaults, with the
/// prediction type given (ε unless told otherwise).
pub fn scheduler_for(prediction: &str) -> SchedulerConfig {
    SchedulerConfig {
        prediction_type: prediction.to_string(),
        ..Default::default()
    }
}

/// Reads `parameterization: "v"` (or `eps`) from an A1111-style sidecar YAML next to the
/// checkpoint (`model.yaml` for `model.safetensors`).
pub fn sidecar_prediction(path: &Path) -> Option<String> {
    let yaml = path.with_extension("yaml");
    let text = std::fs::read_to_string(yaml).ok()?;
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("parameterization:") {
            let v = v.trim().trim_matches(|c| c == '"' || c == '\'');
            return Some(if v == "v" { "v_prediction" } else { "epsilon" }.to_string());
        }
    }
    None
}

pub fn per_block(v: &PerBlock) -> Vec<usize> {
    match v {
        PerBlock::One(x) => vec![*x],
        PerBlock::Each(x) => x.clone(),
    }
}
