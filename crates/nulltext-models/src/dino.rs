//! DINO's vision transformer (facebookresearch/dino `vision_transformer.py`,
//! `VisionTransformer`: `dino_vitb8` and its siblings), run as far as the keys of one block's
//! attention: PIE-Bench's structure distance compares the self-similarity of those keys.
//!
//! Loaded from a safetensors file holding the DINO state dict under its own names
//! (`patch_embed.proj.weight`, `cls_token`, `pos_embed`, `blocks.N.norm1.weight`,
//! `blocks.N.attn.qkv.weight`, `blocks.N.mlp.fc1.weight`, …). Width, depth and patch size
//! come from the tensors; the head count is DINO's 64 channels per head unless given.

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};

use crate::error::{Error, Result};
use crate::nn::{softmax_last_dim, LayerNorm, Linear};
use crate::weights::{Vb, WeightStore};

/// DINO builds every ViT with `nn.LayerNorm(eps=1e-6)`.
const LAYER_NORM_EPS: f64 = 1e-6;
/// Channels per attention head of every released DINO ViT (ViT-S: 384 / 6, ViT-B: 768 / 12).
pub const HEAD_DIM: usize = 64;

/// ImageNet's normalisation, which DINO was trained with.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// `blocks.N.attn`: multi-head self-attention with one fused `qkv` projection.
struct Attention {
    qkv: Linear,
    proj: Linear,
    heads: usize,
}

impl Attention {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let hd = c / self.heads;
        let qkv = self
            .qkv
            .forward(x)?
            .reshape((b, n, 3, self.heads, hd))?
            .permute((2, 0, 3, 1, 4))?; // (3, B, heads, N, hd)
        let q = qkv.get(0)?.contiguous()?;
        let k = qkv.get(1)?.contiguous()?;
        let v = qkv.get(2)?.contiguous()?;
        let scores = (q.matmul(&k.t()?)? * (hd as f64).powf(-0.5))?; // (B, heads, N, N)
        let probs = softmax_last_dim(&scores)?;
        let out = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, n, c))?; // (B, N, C)
        self.proj.forward(&out)
    }
}

/// `blocks.N`: pre-norm attention and MLP (GELU), each added to the residual.
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

impl Block {
    fn load(vb: &Vb, dim: usize, hidden: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            norm1: LayerNorm::load(&vb.pp("norm1"), dim, LAYER_NORM_EPS)?,
            attn: Attention {
                qkv: Linear::load(&vb.pp("attn.qkv"), dim, 3 * dim, true)?,
                proj: Linear::load(&vb.pp("attn.proj"), dim, dim, true)?,
                heads,
            },
            norm2: LayerNorm::load(&vb.pp("norm2"), dim, LAYER_NORM_EPS)?,
            fc1: Linear::load(&vb.pp("mlp.fc1"), dim, hidden, true)?,
            fc2: Linear::load(&vb.pp("mlp.fc2"), hidden, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attn.forward(&self.norm1.forward(x)?)?)?;
        let h = self.fc1.forward(&self.norm2.forward(&x)?)?.gelu_erf()?;
        Ok((&x + self.fc2.forward(&h)?)?)
    }
}

/// A DINO ViT.
pub struct DinoVit {
    patch_weight: Tensor,
    patch_bias: Tensor,
    cls_token: Tensor,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    pub patch_size: usize,
    pub dim: usize,
    pub heads: usize,
    pub device: Device,
}

impl DinoVit {
    /// Loads a DINO state dict from a safetensors file (any float dtype, computed in f32);
    /// `heads`: `None` for DINO's [`HEAD_DIM`] channels per head.
    pub fn load(path: &Path, device: &Device, heads: Option<usize>) -> Result<Self> {
        let store = WeightStore::open(&[path.to_path_buf()], device, DType::F32)?;
        Self::from_store(&store, heads).map_err(|e| match e {
            Error::Msg(m) => Error::Msg(format!("{}: {m}", path.display())),
            e => e,
        })
    }

    /// The network from a weight store holding the state dict.
    pub fn from_store(store: &WeightStore, heads: Option<usize>) -> Result<Self> {
        let root = store.root();
        let shape = |name: &str| -> Result<Vec<usize>> {
            root.shape_of(name).map(<[usize]>::to_vec).ok_or_else(|| {
                Error::Msg(format!(
                    "no tensor `{name}`: not a DINO ViT state dict (patch_embed.proj.weight, blocks.N.attn.qkv.weight, …)"
                ))
            })
        };
        let pw = shape("patch_embed.proj.weight")?;
        let [dim, 3, patch_size, p2] = pw[..] else {
            return Err(Error::Msg(format!(
                "patch_embed.proj.weight is {pw:?}, expected [dim, 3, patch, patch]"
            )));
        };
        if patch_size != p2 || patch_size == 0 {
            return Err(Error::Msg(format!(
                "patch_embed.proj.weight is {pw:?}: not square"
            )));
        }
        let heads = heads.unwrap_or(dim / HEAD_DIM).max(1);
        if !dim.is_multiple_of(heads) {
            return Err(Error::Msg(format!(
                "width {dim} is not a multiple of {heads} heads"
            )));
        }
        let depth = (0..)
            .take_while(|i| root.contains(&format!("blocks.{i}.attn.qkv.weight")))
            .count();
        if depth == 0 {
            return Err(Error::Msg(
                "no blocks.N.attn.qkv.weight: not a DINO ViT".into(),
            ));
        }
        let hidden = shape("blocks.0.mlp.fc1.weight")?[0];
        let tokens = shape("pos_embed")?;
        Ok(Self {
            patch_weight: root.get(&[dim, 3, patch_size, patch_size], "patch_embed.proj.weight")?,
            patch_bias: root.get(&[dim], "patch_embed.proj.bias")?,
            cls_token: root.get(&[1, 1, dim], "cls_token")?,
            pos_embed: root.get(&[1, tokens.get(1).copied().unwrap_or(0), dim], "pos_embed")?,
            blocks: (0..depth)
                .map(|i| Block::load(&root.pp(format!("blocks.{i}")), dim, hidden, heads))
                .collect::<Result<_>>()?,
            patch_size,
            dim,
            heads,
            device: store.device().clone(),
        })
    }

    pub fn depth(&self) -> usize {
        self.blocks.len()
    }

    /// The input side the position embedding was trained for (224 for DINO's ViTs).
    pub fn image_size(&self) -> usize {
        let patches = self.pos_embed.dim(1).unwrap_or(1) - 1;
        (patches as f64).sqrt().round() as usize * self.patch_size
    }

    /// The keys of block `layer`'s attention, all heads side by side: `[N, dim]`, N = 1 +
    /// the patches (`VitExtractor.get_keys_from_input` followed by the heads'
    /// concatenation of `get_keys_self_sim_from_input`). `pixels`: `[1, 3, S, S]`,
    /// normalized, S = [`image_size`](Self::image_size).
    pub fn keys(&self, pixels: &Tensor, layer: usize) -> Result<Tensor> {
        let (b, _, h, w) = pixels.dims4()?;
        let s = self.image_size();
        if b != 1 || h != s || w != s {
            // DINO interpolates its position embedding for other sizes; PIE-Bench never needs it.
            return Err(Error::Unsupported(format!(
                "DINO ViT input {b}×{h}×{w}: one {s}×{s} image is supported"
            )));
        }
        if layer >= self.blocks.len() {
            return Err(Error::Msg(format!(
                "block {layer} asked for; the ViT has {}",
                self.blocks.len()
            )));
        }
        // 1. Patch embedding: (1, dim, S/p, S/p) → (1, patches, dim), class token first.
        let x = pixels
            .conv2d(&self.patch_weight, 0, self.patch_size, 1, 1)?
            .broadcast_add(&self.patch_bias.reshape((1, self.dim, 1, 1))?)?
            .flatten_from(2)?
            .transpose(1, 2)?; // (1, patches, dim)
        let x = Tensor::cat(&[&self.cls_token, &x], 1)?.broadcast_add(&self.pos_embed)?;
        // 2. The blocks before `layer`, whole.
        let mut x = x.contiguous()?;
        for block in &self.blocks[..layer] {
            x = block.forward(&x)?;
        }
        // 3. Block `layer`'s qkv projection; the keys are its middle third.
        let block = &self.blocks[layer];
        let qkv = block.attn.qkv.forward(&block.norm1.forward(&x)?)?; // (1, N, 3·dim)
        Ok(qkv.narrow(D::Minus1, self.dim, self.dim)?.squeeze(0)?)
    }
}

/// Cosine similarity of every pair of rows of `x` `[N, C]`: `[N, N]`, the norms' product
/// clamped at `eps` (VitExtractor's `attn_cosine_sim`, eps = 1e-8).
pub fn cosine_self_similarity(x: &Tensor, eps: f64) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?; // (N, 1)
    let factor = norm.matmul(&norm.t()?)?.clamp(eps, f64::INFINITY)?;
    Ok((x.matmul(&x.t()?)? / factor)?)
}

/// The tensors of a DINO ViT state dict (patch 8 or 16, MLP ratio 4, qkv bias, DINO's own
/// names) of `width` and `depth` for `image_size`-pixel inputs.
pub fn state_dict_shapes(
    width: usize,
    depth: usize,
    patch: usize,
    image_size: usize,
) -> Vec<(String, Vec<usize>)> {
    let tokens = (image_size / patch).pow(2) + 1;
    let mut v = vec![
        ("cls_token".to_string(), vec![1, 1, width]),
        ("pos_embed".to_string(), vec![1, tokens, width]),
        (
            "patch_embed.proj.weight".to_string(),
            vec![width, 3, patch, patch],
        ),
        ("patch_embed.proj.bias".to_string(), vec![width]),
    ];
    for i in 0..depth {
        for (name, shape) in [
            ("norm1.weight", vec![width]),
            ("norm1.bias", vec![width]),
            ("attn.qkv.weight", vec![3 * width, width]),
            ("attn.qkv.bias", vec![3 * width]),
            ("attn.proj.weight", vec![width, width]),
            ("attn.proj.bias", vec![width]),
            ("norm2.weight", vec![width]),
            ("norm2.bias", vec![width]),
            ("mlp.fc1.weight", vec![4 * width, width]),
            ("mlp.fc1.bias", vec![4 * width]),
            ("mlp.fc2.weight", vec![width, 4 * width]),
            ("mlp.fc2.bias", vec![width]),
        ] {
            v.push((format!("blocks.{i}.{name}"), shape));
        }
    }
    v.push(("norm.weight".to_string(), vec![width]));
    v.push(("norm.bias".to_string(), vec![width]));
    v
}

/// Deterministic stand-in weights for tests and benchmarks, reproduced bit for bit by
/// `tools/pie_bench_reference.py`'s `generated`: value k (1, 2, …) of tensor `name` is
/// splitmix64 at state seed·φ + FNV-1a-64(name) + k·φ, u = (out >> 40) / 2²⁴, and the entry
/// (2u − 1)·scale + offset: LayerNorm weights 0.1 around 1, biases, `cls_token` and
/// `pos_embed` ±0.02, other weights ±1/√fan-in.
pub fn generated_tensor(name: &str, shape: &[usize], seed: u64) -> Vec<f32> {
    const PHI: u64 = 0x9E37_79B9_7F4A_7C15;
    let fnv = name.bytes().fold(0xCBF2_9CE4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    });
    let state = seed.wrapping_mul(PHI).wrapping_add(fnv);
    let parent = name.rsplit('.').nth(1).unwrap_or("");
    let (scale, offset) = if name.ends_with(".weight") && parent.contains("norm") {
        (0.1, 1.0)
    } else if name.ends_with(".bias") || name == "cls_token" || name == "pos_embed" {
        (0.02, 0.0)
    } else {
        (
            1.0 / (shape[1..].iter().product::<usize>() as f64).sqrt(),
            0.0,
        )
    };
    let n: usize = shape.iter().product();
    (1..=n as u64)
        .map(|k| {
            let mut z = state.wrapping_add(k.wrapping_mul(PHI));
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            let u = (z >> 40) as f64 / (1u64 << 24) as f64;
            ((2.0 * u - 1.0) * scale + offset) as f32
        })
        .collect()
}

/// Writes a generated DINO ViT (patch 8, 224-pixel inputs) as safetensors.
pub fn write_generated(path: &Path, width: usize, depth: usize, seed: u64) -> Result<()> {
    let tensors = state_dict_shapes(width, depth, 8, 224)
        .into_iter()
        .map(|(name, shape)| {
            let v = generated_tensor(&name, &shape, seed);
            Ok((name, Tensor::from_vec(v, shape, &Device::Cpu)?))
        })
        .collect::<Result<std::collections::HashMap<_, _>>>()?;
    candle_core::safetensors::save(&tensors, path)?;
    Ok(())
}
