//! LPIPS (Zhang et al., 2018), the learned perceptual distance, computed as the `lpips`
//! package (v0.1) computes it, from a safetensors file of that package's state dict (the
//! backbone and the linear heads; `tools/lpips_reference.py export` writes one).
//! AlexNet (the package's default) and SqueezeNet 1.1 (PIE-Bench's choice) backbones are
//! recognised from the tensor names.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use nulltext::error::{Error, Result};

use crate::metrics::Mask;

/// A backbone's layers up to each tapped activation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Net {
    Alex,
    Squeeze,
}

impl Net {
    pub fn name(self) -> &'static str {
        match self {
            Net::Alex => "alex",
            Net::Squeeze => "squeeze",
        }
    }
}

/// One operation of a backbone: torchvision's `features[index]` within LPIPS' `slice{s}`.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// Convolution (+ bias) and ReLU, kernel from the weights.
    Conv {
        slice: usize,
        index: usize,
        stride: usize,
        padding: usize,
    },
    /// Max pooling; `ceil` rounds the output size up (SqueezeNet).
    Pool {
        kernel: usize,
        stride: usize,
        ceil: bool,
    },
    /// SqueezeNet's Fire module.
    Fire { slice: usize, index: usize },
    /// The end of a slice: its activation is compared.
    Tap,
}

fn ops(net: Net) -> Vec<Op> {
    use Op::*;
    let conv = |slice, index, stride, padding| Conv {
        slice,
        index,
        stride,
        padding,
    };
    match net {
        Net::Alex => vec![
            conv(1, 0, 4, 2),
            Tap,
            Pool {
                kernel: 3,
                stride: 2,
                ceil: false,
            },
            conv(2, 3, 1, 2),
            Tap,
            Pool {
                kernel: 3,
                stride: 2,
                ceil: false,
            },
            conv(3, 6, 1, 1),
            Tap,
            conv(4, 8, 1, 1),
            Tap,
            conv(5, 10, 1, 1),
            Tap,
        ],
        Net::Squeeze => vec![
            conv(1, 0, 2, 0),
            Tap,
            Pool {
                kernel: 3,
                stride: 2,
                ceil: true,
            },
            Fire { slice: 2, index: 3 },
            Fire { slice: 2, index: 4 },
            Tap,
            Pool {
                kernel: 3,
                stride: 2,
                ceil: true,
            },
            Fire { slice: 3, index: 6 },
            Fire { slice: 3, index: 7 },
            Tap,
            Pool {
                kernel: 3,
                stride: 2,
                ceil: true,
            },
            Fire { slice: 4, index: 9 },
            Tap,
            Fire {
                slice: 5,
                index: 10,
            },
            Tap,
            Fire {
                slice: 6,
                index: 11,
            },
            Tap,
            Fire {
                slice: 7,
                index: 12,
            },
            Tap,
        ],
    }
}

/// The LPIPS network.
pub struct Lpips {
    net: Net,
    weights: HashMap<String, Tensor>,
    device: Device,
}

impl Lpips {
    /// Loads the `lpips` package's state dict from safetensors (any float dtype).
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let io = |msg: String| Error::InvalidInput(format!("{}: {msg}", path.display()));
        if !path.is_file() {
            return Err(io("no such LPIPS weights file".into()));
        }
        let raw = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| io(format!("not a safetensors file: {e}")))?;
        let net = if raw.contains_key("net.slice2.3.squeeze.weight") {
            Net::Squeeze
        } else if raw.contains_key("net.slice1.2.weight") {
            return Err(io(
                "LPIPS-VGG weights: nulltext computes LPIPS with the alex or squeeze backbone"
                    .into(),
            ));
        } else if raw.contains_key("net.slice1.0.weight") {
            Net::Alex
        } else {
            return Err(io(
                "not LPIPS weights: expected the lpips package's keys (net.slice1.0.weight, lin0.model.1.weight, …)"
                    .into(),
            ));
        };
        let mut weights = HashMap::new();
        for (k, v) in raw {
            weights.insert(k, v.to_dtype(DType::F32)?.to_device(device)?);
        }
        let me = Self {
            net,
            weights,
            device: device.clone(),
        };
        // Every tensor the network uses must be there.
        let mut missing = Vec::new();
        for name in me.tensor_names() {
            if !me.weights.contains_key(&name) {
                missing.push(name);
            }
        }
        if !missing.is_empty() {
            return Err(io(format!(
                "LPIPS-{} weights lack {}",
                net.name(),
                missing.join(", ")
            )));
        }
        Ok(me)
    }

    pub fn net(&self) -> Net {
        self.net
    }

    fn tensor_names(&self) -> Vec<String> {
        let mut v = vec![
            "scaling_layer.shift".to_string(),
            "scaling_layer.scale".into(),
        ];
        let mut taps = 0;
        for op in ops(self.net) {
            match op {
                Op::Conv { slice, index, .. } => {
                    v.push(format!("net.slice{slice}.{index}.weight"));
                    v.push(format!("net.slice{slice}.{index}.bias"));
                }
                Op::Fire { slice, index } => {
                    for part in ["squeeze", "expand1x1", "expand3x3"] {
                        v.push(format!("net.slice{slice}.{index}.{part}.weight"));
                        v.push(format!("net.slice{slice}.{index}.{part}.bias"));
                    }
                }
                Op::Tap => {
                    v.push(format!("lin{taps}.model.1.weight"));
                    taps += 1;
                }
                Op::Pool { .. } => {}
            }
        }
        v
    }

    fn w(&self, name: &str) -> &Tensor {
        &self.weights[name]
    }

    fn conv_relu(&self, x: &Tensor, prefix: &str, stride: usize, padding: usize) -> Result<Tensor> {
        let w = self.w(&format!("{prefix}.weight"));
        let b = self.w(&format!("{prefix}.bias"));
        let y = x.conv2d(w, padding, stride, 1, 1)?;
        Ok(y.broadcast_add(&b.reshape((1, (), 1, 1))?)?.relu()?)
    }

    /// The distance between two images of the same size; with a mask, both are multiplied
    /// by it first (PIE-Bench's convention).
    pub fn distance(&self, a: &RgbImage, b: &RgbImage, mask: Option<&Mask>) -> Result<f64> {
        crate::metrics::check_sizes(a, b, mask)?;
        let x = Tensor::cat(&[self.input(a, mask)?, self.input(b, mask)?], 0)?;
        let shift = self.w("scaling_layer.shift").reshape((1, 3, 1, 1))?;
        let scale = self.w("scaling_layer.scale").reshape((1, 3, 1, 1))?;
        let mut h = x.broadcast_sub(&shift)?.broadcast_div(&scale)?;
        let mut total = 0f64;
        let mut taps = 0;
        for op in ops(self.net) {
            h = match op {
                Op::Conv {
                    slice,
                    index,
                    stride,
                    padding,
                } => self.conv_relu(&h, &format!("net.slice{slice}.{index}"), stride, padding)?,
                Op::Pool {
                    kernel,
                    stride,
                    ceil,
                } => max_pool(&h, kernel, stride, ceil)?,
                Op::Fire { slice, index } => {
                    let p = format!("net.slice{slice}.{index}");
                    let s = self.conv_relu(&h, &format!("{p}.squeeze"), 1, 0)?;
                    let e1 = self.conv_relu(&s, &format!("{p}.expand1x1"), 1, 0)?;
                    let e3 = self.conv_relu(&s, &format!("{p}.expand3x3"), 1, 1)?;
                    Tensor::cat(&[e1, e3], 1)?
                }
                Op::Tap => {
                    let n = normalize(&h)?;
                    let d = (n.narrow(0, 0, 1)? - n.narrow(0, 1, 1)?)?.sqr()?;
                    let lin = self.w(&format!("lin{taps}.model.1.weight"));
                    let v = d.conv2d(lin, 0, 1, 1, 1)?.mean_all()?.to_scalar::<f32>()?;
                    total += v as f64;
                    taps += 1;
                    h
                }
            };
        }
        Ok(total)
    }

    /// `[1, 3, H, W]` in [−1, 1] (times the mask).
    fn input(&self, img: &RgbImage, mask: Option<&Mask>) -> Result<Tensor> {
        let (w, h) = img.dimensions();
        let mut v: Vec<f32> = Vec::with_capacity((w * h * 3) as usize);
        let weights = mask.map(|m| m.weights());
        for c in 0..3 {
            for (i, p) in img.pixels().enumerate() {
                let mut x = p.0[c] as f64 / 255.0;
                if let Some(m) = weights {
                    x *= m[i];
                }
                v.push((x * 2.0 - 1.0) as f32);
            }
        }
        Ok(Tensor::from_vec(
            v,
            (1, 3, h as usize, w as usize),
            &self.device,
        )?)
    }
}

/// x / (‖x‖ over channels + 1e-10).
fn normalize(x: &Tensor) -> Result<Tensor> {
    let norm = x.sqr()?.sum_keepdim(1)?.sqrt()?;
    Ok(x.broadcast_div(&(norm + 1e-10)?)?)
}

/// Max pooling without padding; `ceil` lets the last window hang over the edge (inputs
/// are ReLU outputs, ≥ 0, so padding with zeros changes no maximum).
fn max_pool(x: &Tensor, kernel: usize, stride: usize, ceil: bool) -> Result<Tensor> {
    let x = if ceil {
        let (_, _, h, w) = x.dims4()?;
        let extra = |n: usize| {
            let out = (n.saturating_sub(kernel)).div_ceil(stride) + 1;
            ((out - 1) * stride + kernel).saturating_sub(n)
        };
        x.pad_with_zeros(2, 0, extra(h))?
            .pad_with_zeros(3, 0, extra(w))?
    } else {
        x.clone()
    };
    Ok(x.max_pool2d_with_stride(kernel, stride)?)
}
