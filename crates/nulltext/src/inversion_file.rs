//! The inversion file (`*.nti.safetensors`, spec `inversion-file.md`): a plain safetensors
//! file with `latent_T`, `null_embeddings`, `image_latent`, for direct inversions
//! `latent_offsets`, for SDXL `null_pooled`, and string metadata.
//!
//! Version 2 added `latent_offsets`, version 3 `null_pooled`. A file is written with the
//! lowest version that describes it — 3 only for SDXL, 2 only when it holds offsets — so
//! that older readers keep reading every other inversion, and refuse (rather than silently
//! misuse) the ones they would get wrong.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use nulltext_models::SchedulerConfig;

use crate::atomic::write_bytes_atomic;
use crate::error::{Error, Result};
use crate::inversion::{Inversion, Method};

/// The format name of the `format` metadata key, before `/VERSION`.
pub const FORMAT_NAME: &str = "nulltext-inversion";
/// The newest major version this nulltext reads and writes.
pub const FORMAT_VERSION: u32 = 3;
const KNOWN_TENSORS: [&str; 5] = [
    "latent_T",
    "null_embeddings",
    "null_pooled",
    "image_latent",
    "latent_offsets",
];
const KNOWN_KEYS: [&str; 10] = [
    "format",
    "prompt",
    "method",
    "num_steps",
    "guidance_scale",
    "height",
    "width",
    "scheduler",
    "model",
    "model_fingerprint",
];

fn fmt_float(x: f64) -> String {
    // 7.5 → "7.5", 7.0 → "7.0" (as Python's str does)
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{x:.1}")
    } else {
        format!("{x}")
    }
}

/// The format version an inversion is written with: the lowest that describes it.
pub fn format_version(inv: &Inversion) -> u32 {
    if inv.null_pooled.is_some() {
        3
    } else if inv.latent_offsets.is_some() {
        2
    } else {
        1
    }
}

/// What an inversion file holds, for people (`nulltext info --inversion`) and scripts.
pub fn describe(inv: &Inversion) -> serde_json::Value {
    let mut tensors = serde_json::Map::new();
    let named = [
        ("latent_T", Some(&inv.latent_t)),
        ("null_embeddings", Some(&inv.null_embeddings)),
        ("null_pooled", inv.null_pooled.as_ref()),
        ("image_latent", inv.image_latent.as_ref()),
        ("latent_offsets", inv.latent_offsets.as_ref()),
    ];
    for (name, t) in named
        .into_iter()
        .filter_map(|(n, t)| t.map(|t| (n, t)))
        .chain(inv.extra_tensors.iter().map(|(n, t)| (n.as_str(), t)))
    {
        tensors.insert(name.into(), serde_json::json!(t.dims()));
    }
    serde_json::json!({
        "format": format!("{FORMAT_NAME}/{}", format_version(inv)),
        "method": inv.method.as_str(),
        "prompt": inv.prompt,
        "num_steps": inv.num_steps,
        "guidance_scale": inv.guidance,
        "size": format!("{}×{}", inv.width, inv.height),
        "model": inv.model,
        "model_fingerprint": inv.model_fingerprint,
        "tensors": tensors,
    })
}

/// Serializes an inversion to the bytes of an inversion file.
pub fn to_bytes(inv: &Inversion) -> Result<Vec<u8>> {
    let mut meta: HashMap<String, String> = inv
        .extra_metadata
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let scheduler =
        serde_json::to_string(&inv.scheduler).map_err(|e| Error::InvalidInput(e.to_string()))?;
    for (k, v) in [
        ("format", format!("{FORMAT_NAME}/{}", format_version(inv))),
        ("prompt", inv.prompt.clone()),
        ("method", inv.method.to_string()),
        ("num_steps", inv.num_steps.to_string()),
        ("guidance_scale", fmt_float(inv.guidance)),
        ("height", inv.height.to_string()),
        ("width", inv.width.to_string()),
        ("scheduler", scheduler),
        ("model", inv.model.clone()),
        ("model_fingerprint", inv.model_fingerprint.clone()),
    ] {
        meta.insert(k.to_string(), v);
    }
    let cpu = |t: &Tensor| -> Result<Tensor> {
        Ok(t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .contiguous()?)
    };
    let mut tensors: Vec<(String, Tensor)> = vec![
        ("latent_T".into(), cpu(&inv.latent_t)?),
        ("null_embeddings".into(), cpu(&inv.null_embeddings)?),
    ];
    if let Some(pooled) = &inv.null_pooled {
        tensors.push(("null_pooled".into(), cpu(pooled)?));
    }
    if let Some(z0) = &inv.image_latent {
        tensors.push(("image_latent".into(), cpu(z0)?));
    }
    if let Some(offsets) = &inv.latent_offsets {
        tensors.push(("latent_offsets".into(), cpu(offsets)?));
    }
    for (k, t) in &inv.extra_tensors {
        tensors.push((k.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    let bytes =
        safetensors::tensor::serialize(tensors.iter().map(|(k, t)| (k.as_str(), t)), Some(meta))
            .map_err(|e| Error::InvalidInput(format!("serializing the inversion: {e}")))?;
    canonical_header(bytes)
}

/// Rewrites a safetensors file's header with its keys sorted, so that the same inversion
/// always gives the same bytes (the metadata map has no order of its own). The trainer's
/// weight files use it too.
pub fn canonical_header(bytes: Vec<u8>) -> Result<Vec<u8>> {
    let bad = || Error::InvalidInput("serializing the inversion: malformed header".into());
    let n = u64::from_le_bytes(
        bytes
            .get(..8)
            .ok_or_else(bad)?
            .try_into()
            .map_err(|_| bad())?,
    ) as usize;
    let header = bytes.get(8..8 + n).ok_or_else(bad)?;
    let value: serde_json::Value = serde_json::from_slice(header).map_err(|_| bad())?;
    let sorted = sort_keys(value);
    let mut h = serde_json::to_vec(&sorted).map_err(|_| bad())?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut out = Vec::with_capacity(8 + h.len() + bytes.len() - 8 - n);
    out.extend_from_slice(&(h.len() as u64).to_le_bytes());
    out.extend_from_slice(&h);
    out.extend_from_slice(&bytes[8 + n..]);
    Ok(out)
}

fn sort_keys(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(o) => {
            let sorted: std::collections::BTreeMap<String, serde_json::Value> =
                o.into_iter().map(|(k, v)| (k, sort_keys(v))).collect();
            serde_json::Value::Object(sorted.into_iter().collect())
        }
        other => other,
    }
}

/// Largest image side an inversion file may describe.
const MAX_SIDE: usize = 1 << 16;

/// Every number of a file nulltext did not necessarily write, checked before it is used:
/// the metadata within the bounds nulltext itself would write (a NaN or 1e308 guidance
/// scale samples black images), and each tensor value finite, value by value (a sum of
/// large but finite values overflows).
fn check_numbers(
    num_steps: usize,
    guidance: f64,
    (height, width): (usize, usize),
    scheduler: &SchedulerConfig,
    tensors: &[(&str, Option<&Tensor>)],
) -> Result<()> {
    let bad = |m: String| Error::InvalidInput(m);
    scheduler
        .validate()
        .map_err(|e| bad(format!("metadata `scheduler`: {e}")))?;
    crate::limits::check_steps("metadata `num_steps`", num_steps, scheduler)?;
    crate::limits::check_guidance("metadata `guidance_scale`", guidance)?;
    for (k, v) in [("height", height), ("width", width)] {
        if v == 0 || v > MAX_SIDE {
            return Err(bad(format!(
                "metadata `{k}` = {v}; expected 1 to {MAX_SIDE}"
            )));
        }
    }
    for (name, t) in tensors {
        let Some(t) = t else { continue };
        if t.dims().contains(&0) {
            return Err(bad(format!(
                "`{name}` has shape {:?}: it is empty",
                t.dims()
            )));
        }
        let values: Vec<f32> = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?;
        if let Some(i) = values.iter().position(|v| !v.is_finite()) {
            return Err(bad(format!(
                "`{name}` holds a NaN or infinite value (element {i}: {})",
                values[i]
            )));
        }
    }
    Ok(())
}

/// Writes an inversion file atomically (a temporary file renamed into place).
pub fn save(inv: &Inversion, path: &Path) -> Result<()> {
    write_bytes_atomic(path, &to_bytes(inv)?)
}

/// Reads and checks an inversion file: format version, required tensors and keys, shapes
/// consistent with each other, and finite values.
pub fn load(path: &Path) -> Result<Inversion> {
    let bytes = std::fs::read(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    from_bytes(&bytes).map_err(|e| match e {
        Error::InvalidInput(msg) => Error::InversionFile {
            path: path.to_path_buf(),
            msg,
        },
        e => e,
    })
}

/// Parses the bytes of an inversion file (errors are `InvalidInput` with the reason).
pub fn from_bytes(bytes: &[u8]) -> Result<Inversion> {
    let bad = |m: String| Error::InvalidInput(m);
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| {
        bad(format!(
            "not a valid inversion file ({e}); truncated or not a safetensors file?"
        ))
    })?;
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("unreadable header: {e}")))?;
    let meta: BTreeMap<String, String> = header
        .metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .collect();
    let key = |k: &str| -> Result<&String> {
        meta.get(k)
            .ok_or_else(|| bad(format!("metadata key `{k}` is missing")))
    };
    let format = key("format")?;
    let (name, version) = format
        .split_once('/')
        .ok_or_else(|| bad(format!("unknown format `{format}`")))?;
    if name != FORMAT_NAME {
        return Err(bad(format!("unknown format `{format}`")));
    }
    let major = version.split('.').next().unwrap_or("");
    if !major
        .parse::<u32>()
        .is_ok_and(|v| (1..=FORMAT_VERSION).contains(&v))
    {
        return Err(bad(format!(
            "format version {version} is not supported by this nulltext (it reads versions 1 \
             to {FORMAT_VERSION}); a newer nulltext wrote it, update to use it"
        )));
    }
    let parse_usize = |k: &str| -> Result<usize> {
        key(k)?.parse::<usize>().map_err(|_| {
            bad(format!(
                "metadata `{k}` = `{}` is not a whole number",
                meta[k]
            ))
        })
    };
    let num_steps = parse_usize("num_steps")?;
    let height = parse_usize("height")?;
    let width = parse_usize("width")?;
    let guidance: f64 = key("guidance_scale")?
        .parse()
        .map_err(|_| bad("metadata `guidance_scale` is not a number".into()))?;
    let method: Method = key("method")?.parse().map_err(bad)?;
    let scheduler: SchedulerConfig = serde_json::from_str(key("scheduler")?)
        .map_err(|e| bad(format!("metadata `scheduler`: {e}")))?;
    let tensor = |name: &str| -> Result<Option<Tensor>> {
        match st.tensor(name) {
            Ok(view) => {
                let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)?;
                Ok(Some(t.to_dtype(DType::F32)?))
            }
            Err(_) => Ok(None),
        }
    };
    let need = |name: &str| -> Result<Tensor> {
        tensor(name)?.ok_or_else(|| bad(format!("tensor `{name}` is missing")))
    };
    let latent_t = need("latent_T")?;
    let null_embeddings = need("null_embeddings")?;
    let null_pooled = tensor("null_pooled")?;
    let image_latent = tensor("image_latent")?;
    let latent_offsets = tensor("latent_offsets")?;
    if latent_t.rank() != 4 || latent_t.dim(0)? != 1 {
        return Err(bad(format!(
            "`latent_T` has shape {:?}, expected [1, C, h, w]",
            latent_t.dims()
        )));
    }
    if null_embeddings.rank() != 3 || null_embeddings.dim(0)? != num_steps {
        return Err(bad(format!(
            "`null_embeddings` has shape {:?}, expected [{num_steps}, 77, D] for num_steps = {num_steps}",
            null_embeddings.dims()
        )));
    }
    if let Some(p) = &null_pooled {
        if p.rank() != 2 || p.dim(0)? != num_steps {
            return Err(bad(format!(
                "`null_pooled` has shape {:?}, expected [{num_steps}, P] for num_steps = {num_steps}",
                p.dims()
            )));
        }
    }
    if let Some(z0) = &image_latent {
        if z0.dims() != latent_t.dims() {
            return Err(bad(format!(
                "`image_latent` {:?} and `latent_T` {:?} differ in shape",
                z0.dims(),
                latent_t.dims()
            )));
        }
    }
    check_numbers(
        num_steps,
        guidance,
        (height, width),
        &scheduler,
        &[
            ("latent_T", Some(&latent_t)),
            ("null_embeddings", Some(&null_embeddings)),
            ("null_pooled", null_pooled.as_ref()),
            ("image_latent", image_latent.as_ref()),
            ("latent_offsets", latent_offsets.as_ref()),
        ],
    )?;
    let mut extra_tensors = BTreeMap::new();
    for (name, _) in st.tensors() {
        if !KNOWN_TENSORS.contains(&name.as_str()) {
            let view = st.tensor(&name).map_err(|e| bad(e.to_string()))?;
            extra_tensors.insert(
                name.clone(),
                candle_core::safetensors::Load::load(&view, &Device::Cpu)?,
            );
        }
    }
    let extra_metadata = meta
        .iter()
        .filter(|(k, _)| !KNOWN_KEYS.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    let inv = Inversion {
        latent_t,
        null_embeddings,
        null_pooled,
        image_latent,
        latent_offsets,
        prompt: key("prompt")?.clone(),
        method,
        num_steps,
        guidance,
        height,
        width,
        scheduler,
        model: meta.get("model").cloned().unwrap_or_default(),
        model_fingerprint: key("model_fingerprint")?.clone(),
        extra_metadata,
        extra_tensors,
    };
    inv.check_offsets()?;
    Ok(inv)
}
