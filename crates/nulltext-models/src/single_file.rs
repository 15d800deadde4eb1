//! Single-file checkpoints in the original CompVis / A1111 key layout
//! (`model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*` for
//! SD 1.x, `cond_stage_model.model.*` OpenCLIP for SD 2.x), renamed on load to the diffusers
//! names the rest of nulltext uses. The architecture is read off the tensor shapes.

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

fn resnet_leaf(rest: &str) -> Option<String> {
    let map = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("emb_layers.1.", "time_emb_proj."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("skip_connection.", "conv_shortcut."),
    ];
    map.iter()
        .find_map(|(a, b)| rest.strip_prefix(a).map(|r| format!("{b}{r}")))
}

/// `input_blocks.4.1.proj_in.weight` → `down_blocks.1.attentions.0.proj_in.weight`, etc.
pub fn unet_key(key: &str, layers: usize) -> Option<String> {
    if key.starts_with(&format!("{UNET_PREFIX}middle_block.")) {
        return unet_middle_key(key);
    }
    let k = key.strip_prefix(UNET_PREFIX)?;
    let simple = [
        ("time_embed.0.", "time_embedding.linear_1."),
        ("time_embed.2.", "time_embedding.linear_2."),
        ("input_blocks.0.0.", "conv_in."),
        ("out.0.", "conv_norm_out."),
        ("out.2.", "conv_out."),
    ];
    if let Some(s) = simple
        .iter()
        .find_map(|(a, b)| k.strip_prefix(a).map(|r| format!("{b}{r}")))
    {
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
                    resnet_leaf(rest)?
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
                    resnet_leaf(rest)?
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

/// `middle_block.N.…` has the index in the middle: handle it separately.
fn unet_middle_key(key: &str) -> Option<String> {
    let k = key
        .strip_prefix(UNET_PREFIX)?
        .strip_prefix("middle_block.")?;
    let (i, rest) = k.split_once('.')?;
    match i {
        "0" => Some(format!("mid_block.resnets.0.{}", resnet_leaf(rest)?)),
        "1" => Some(format!("mid_block.attentions.0.{rest}")),
        "2" => Some(format!("mid_block.resnets.1.{}", resnet_leaf(rest)?)),
        _ => None,
    }
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
    pub text: ClipTextConfig,
    /// OpenCLIP text encoder (SD 2.x) rather than the transformers CLIP layout.
    pub openclip: bool,
    pub layers_per_block: usize,
    pub vae_levels: usize,
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

/// Reads the architecture off the tensor shapes (SD 1.x/2.x structure, any widths).
pub fn detect(shapes: &BTreeMap<String, Vec<usize>>) -> Result<Detected> {
    let u = |s: &str| format!("{UNET_PREFIX}{s}");
    let [_, in_channels, _, _] = dims::<4>(shapes, &u("input_blocks.0.0.weight"))?;
    // layers per block: the first downsampler sits at input_blocks.(layers+1)
    let layers = (1..8)
        .find(|l| shapes.contains_key(&u(&format!("input_blocks.{}.0.op.weight", l + 1))))
        .ok_or_else(|| Error::Unsupported("cannot find the UNet's first downsampler".into()))?;
    let mut blocks = Vec::new();
    let mut attn = Vec::new();
    for level in 0.. {
        let first = 1 + level * (layers + 1);
        let k = u(&format!("input_blocks.{first}.0.out_layers.3.weight"));
        if !shapes.contains_key(&k) {
            break;
        }
        blocks.push(dims::<4>(shapes, &k)?[0]);
        attn.push(shapes.contains_key(&u(&format!("input_blocks.{first}.1.proj_in.weight"))));
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
    let down: Vec<String> = attn
        .iter()
        .map(|a| {
            if *a {
                "CrossAttnDownBlock2D"
            } else {
                "DownBlock2D"
            }
            .to_string()
        })
        .collect();
    let up: Vec<String> = attn
        .iter()
        .rev()
        .map(|a| {
            if *a {
                "CrossAttnUpBlock2D"
            } else {
                "UpBlock2D"
            }
            .to_string()
        })
        .collect();
    let unet: UNetConfig = serde_json::from_value(serde_json::json!({
        "in_channels": in_channels, "out_channels": out_channels,
        "block_out_channels": blocks, "down_block_types": down, "up_block_types": up,
        "layers_per_block": layers, "attention_head_dim": heads,
        "cross_attention_dim": context, "use_linear_projection": linear,
        "sample_size": 64,
    }))
    .map_err(|e| Error::Msg(e.to_string()))?;

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
    let vae: VaeConfig = serde_json::from_value(serde_json::json!({
        "block_out_channels": vblocks,
        "down_block_types": vec!["DownEncoderBlock2D"; vblocks.len()],
        "up_block_types": vec!["UpDecoderBlock2D"; vblocks.len()],
        "layers_per_block": vlayers, "latent_channels": latent,
    }))
    .map_err(|e| Error::Msg(e.to_string()))?;

    let openclip = shapes.keys().any(|k| k.starts_with(OPENCLIP_PREFIX));
    let text: ClipTextConfig = if openclip {
        let o = |s: &str| format!("{OPENCLIP_PREFIX}{s}");
        let [vocab, hidden] = dims::<2>(shapes, &o("token_embedding.weight"))?;
        let all = (0..)
            .take_while(|i| {
                shapes.contains_key(&o(&format!("transformer.resblocks.{i}.ln_1.weight")))
            })
            .count();
        let [inter, _] = dims::<2>(shapes, &o("transformer.resblocks.0.mlp.c_fc.weight"))?;
        let layers = all.checked_sub(1).ok_or_else(|| {
            Error::Unsupported(
                "single-file checkpoint: the OpenCLIP text encoder has no layers".into(),
            )
        })?;
        let [positions, _] = dims::<2>(shapes, &o("positional_embedding"))?;
        serde_json::from_value(serde_json::json!({
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            // SD 2.x uses the penultimate layer: the last one is dropped, as diffusers does.
            "num_hidden_layers": layers, "num_attention_heads": (hidden / 64).max(1),
            "hidden_act": "gelu", "max_position_embeddings": positions,
        }))
        .map_err(|e| Error::Msg(e.to_string()))?
    } else {
        let c = |s: &str| format!("{CLIP_PREFIX}text_model.{s}");
        let [vocab, hidden] = dims::<2>(shapes, &c("embeddings.token_embedding.weight"))?;
        let layers = (0..)
            .take_while(|i| {
                shapes.contains_key(&c(&format!("encoder.layers.{i}.layer_norm1.weight")))
            })
            .count();
        let [inter, _] = dims::<2>(shapes, &c("encoder.layers.0.mlp.fc1.weight"))?;
        let [positions, _] = dims::<2>(shapes, &c("embeddings.position_embedding.weight"))?;
        serde_json::from_value(serde_json::json!({
            "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": inter,
            "num_hidden_layers": layers, "num_attention_heads": (hidden / 64).max(1),
            "hidden_act": "quick_gelu", "max_position_embeddings": positions,
        }))
        .map_err(|e| Error::Msg(e.to_string()))?
    };
    Ok(Detected {
        unet,
        vae,
        text,
        openclip,
        layers_per_block: layers,
        vae_levels: vblocks.len(),
    })
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

/// The three weight stores of a single-file checkpoint, under diffusers names.
pub struct SingleFileStores {
    pub unet: WeightStore,
    pub vae: WeightStore,
    pub text: WeightStore,
}

pub fn open_stores(
    path: &Path,
    d: &Detected,
    device: &Device,
    dtype: DType,
) -> Result<SingleFileStores> {
    let files = vec![path.to_path_buf()];
    let layers = d.layers_per_block;
    let unet = WeightStore::open_renamed(&files, device, dtype, |k| unet_key(k, layers))?;
    let levels = d.vae_levels;
    let vae = WeightStore::open_renamed(&files, device, dtype, |k| vae_key(k, levels))?;
    let text = if d.openclip {
        let mut store = WeightStore::open_renamed(&files, device, dtype, |k| {
            k.strip_prefix(OPENCLIP_PREFIX)
                .map(|r| format!("openclip.{r}"))
        })?;
        openclip_to_clip(&mut store, &d.text)?;
        store
    } else {
        WeightStore::open_renamed(&files, device, dtype, |k| {
            k.strip_prefix(CLIP_PREFIX).map(String::from)
        })?
    };
    Ok(SingleFileStores { unet, vae, text })
}

/// Materializes OpenCLIP's text tower under transformers' CLIP names (the fused
/// `in_proj` split into q/k/v), as diffusers' conversion does.
fn openclip_to_clip(store: &mut WeightStore, c: &ClipTextConfig) -> Result<()> {
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
        } else if k.starts_with(CLIP_PREFIX) || k.starts_with(OPENCLIP_PREFIX) {
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
