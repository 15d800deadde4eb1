//! `nulltext._native`: the Python module's compiled half. It adapts the `nulltext` library's
//! calls to Python — arguments in the command line's syntax, pixels and tensors as bytes,
//! errors as Python exceptions — and releases the GIL while the library computes. The
//! Python half (`python/nulltext/__init__.py`) turns bytes into numpy arrays and PIL images.

use std::cell::RefCell;
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;
use nulltext::edit::EditOptions;
use nulltext::image_io::{self, Crop};
use nulltext::models::LoadOptions;
use nulltext::{Event, InvertOptions, Limits, Method, Progress, StableDiffusion};
use pyo3::create_exception;
use pyo3::exceptions::{
    PyException, PyFileNotFoundError, PyFloatingPointError, PyKeyboardInterrupt, PyOSError,
    PyPermissionError, PyRuntimeError, PyValueError,
};
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

create_exception!(
    _native,
    ModelError,
    PyException,
    "Model weights or configuration nulltext cannot use: missing or malformed tensors, \
     unsupported architectures, corrupt files."
);

/// The Python exception for a library error: the message is the command line's.
fn py_err(e: nulltext::Error) -> PyErr {
    use nulltext::models::Error as M;
    use nulltext::Error as E;
    let msg = e.to_string();
    let io = |source: &std::io::Error| match source.kind() {
        std::io::ErrorKind::NotFound => PyFileNotFoundError::new_err(msg.clone()),
        std::io::ErrorKind::PermissionDenied => PyPermissionError::new_err(msg.clone()),
        _ => PyOSError::new_err(msg.clone()),
    };
    match &e {
        E::Io { source, .. } | E::Model(M::Io { source, .. }) => io(source),
        E::Model(M::MissingFile(_)) => PyFileNotFoundError::new_err(msg),
        E::Model(_) => ModelError::new_err(msg),
        E::Image { .. }
        | E::TooManyPixels { .. }
        | E::InversionFile { .. }
        | E::InvalidInput(_) => PyValueError::new_err(msg),
        E::NonFinite(_) => PyFloatingPointError::new_err(msg),
        E::Cancelled => PyKeyboardInterrupt::new_err(msg),
        E::Plot(_) => PyRuntimeError::new_err(msg),
    }
}

/// Parses an argument given in the command line's syntax (`--cross-replace 0.8,tiger=0.4`).
fn parse<T: std::str::FromStr<Err = String>>(name: &str, s: &str) -> PyResult<T> {
    s.parse()
        .map_err(|e: String| PyValueError::new_err(format!("{name}: {e}")))
}

/// Progress events to a Python callable, and Ctrl-C (or an exception the callable raised)
/// to a cancellation of the work.
struct PyProgress {
    callback: Option<Py<PyAny>>,
    /// The exception that stopped the work, raised once the library has returned.
    error: RefCell<Option<PyErr>>,
}

impl PyProgress {
    fn new(callback: Option<Py<PyAny>>) -> Self {
        Self {
            callback,
            error: RefCell::new(None),
        }
    }

    /// The library's result, with the exception that cancelled it in place of `Cancelled`.
    fn finish<T>(self, result: nulltext::Result<T>) -> PyResult<T> {
        match (result, self.error.into_inner()) {
            (Err(nulltext::Error::Cancelled), Some(e)) => Err(e),
            (r, _) => r.map_err(py_err),
        }
    }
}

fn event_dict<'py>(py: Python<'py>, e: &Event) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    match e {
        Event::Start { stage, total } => {
            d.set_item("event", "start")?;
            d.set_item("stage", stage.name())?;
            d.set_item("total", total)?;
        }
        Event::Advance { stage, done } => {
            d.set_item("event", "advance")?;
            d.set_item("stage", stage.name())?;
            d.set_item("done", done)?;
        }
        Event::Iteration {
            step,
            iteration,
            loss,
        } => {
            d.set_item("event", "iteration")?;
            d.set_item("step", step)?;
            d.set_item("iteration", iteration)?;
            d.set_item("loss", loss)?;
        }
        Event::StepDone {
            step,
            iterations,
            loss,
        } => {
            d.set_item("event", "step_done")?;
            d.set_item("step", step)?;
            d.set_item("iterations", iterations)?;
            d.set_item("loss", loss)?;
        }
        Event::Finish { stage } => {
            d.set_item("event", "finish")?;
            d.set_item("stage", stage.name())?;
        }
    }
    Ok(d)
}

impl Progress for PyProgress {
    fn event(&mut self, event: &Event) {
        let Some(callback) = &self.callback else {
            return;
        };
        if self.error.get_mut().is_some() {
            return;
        }
        let outcome = Python::attach(|py| {
            callback.call1(py, (event_dict(py, event)?,))?;
            Ok::<_, PyErr>(())
        });
        if let Err(e) = outcome {
            *self.error.get_mut() = Some(e);
        }
    }

    fn cancelled(&self) -> bool {
        if self.error.borrow().is_some() {
            return true;
        }
        // Runs Python's signal handlers: Ctrl-C raises KeyboardInterrupt here.
        match Python::attach(|py| py.check_signals()) {
            Ok(()) => false,
            Err(e) => {
                *self.error.borrow_mut() = Some(e);
                true
            }
        }
    }
}

/// Pixels as (bytes, width, height), H×W×3 RGB.
type Pixels<'py> = (Bound<'py, PyBytes>, u32, u32);

fn pixels<'py>(py: Python<'py>, img: &RgbImage) -> Pixels<'py> {
    (PyBytes::new(py, img.as_raw()), img.width(), img.height())
}

fn rgb_image(bytes: &[u8], width: u32, height: u32, what: &str) -> PyResult<RgbImage> {
    RgbImage::from_raw(width, height, bytes.to_vec()).ok_or_else(|| {
        PyValueError::new_err(format!(
            "{what}: {} bytes are not a {width}×{height} RGB image",
            bytes.len()
        ))
    })
}

/// A tensor as (little-endian f32 bytes, shape).
type Array<'py> = (Bound<'py, PyBytes>, Vec<usize>);

fn array<'py>(py: Python<'py>, t: &Tensor) -> PyResult<Array<'py>> {
    let values: Vec<f32> = t
        .to_device(&Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1())
        .map_err(|e| py_err(e.into()))?;
    let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    Ok((PyBytes::new(py, &bytes), t.dims().to_vec()))
}

/// A loaded Stable Diffusion model.
#[pyclass(frozen, module = "nulltext._native")]
struct Model {
    sd: StableDiffusion,
}

/// An inversion: z_T, the per-step unconditional embeddings, and what made them.
#[pyclass(frozen, module = "nulltext._native")]
struct Inversion {
    inv: nulltext::Inversion,
    report: Option<nulltext::InvertReport>,
}

/// The outcome of an edit or a reconstruction.
#[pyclass(frozen, module = "nulltext._native")]
struct Output {
    #[pyo3(get)]
    prompts: Vec<String>,
    #[pyo3(get)]
    mode: String,
    images: Vec<RgbImage>,
    latents: Tensor,
    attention_maps: Option<Tensor>,
}

#[pymethods]
impl Output {
    /// The decoded images as (bytes, width, height), row 0 the source.
    fn images<'py>(&self, py: Python<'py>) -> Vec<Pixels<'py>> {
        self.images.iter().map(|i| pixels(py, i)).collect()
    }

    /// The final latents, `[B, C, h, w]`.
    fn latents<'py>(&self, py: Python<'py>) -> PyResult<Array<'py>> {
        array(py, &self.latents)
    }

    /// Mean cross-attention maps `[B, r_h, r_w, 77]`, when asked for.
    fn attention_maps<'py>(&self, py: Python<'py>) -> PyResult<Option<Array<'py>>> {
        self.attention_maps
            .as_ref()
            .map(|m| array(py, m))
            .transpose()
    }
}

#[pymethods]
impl Inversion {
    #[staticmethod]
    fn load(py: Python<'_>, path: PathBuf) -> PyResult<Self> {
        let inv = py
            .detach(|| nulltext::inversion_file::load(&path))
            .map_err(py_err)?;
        Ok(Self { inv, report: None })
    }

    /// Writes the inversion file (atomically).
    fn save(&self, py: Python<'_>, path: PathBuf) -> PyResult<()> {
        py.detach(|| nulltext::inversion_file::save(&self.inv, &path))
            .map_err(py_err)
    }

    /// What `nulltext info --inversion` shows, as JSON.
    fn describe(&self) -> String {
        nulltext::inversion_file::describe(&self.inv).to_string()
    }

    /// One of the file's tensors: `latent`, `null_embeddings`, `null_pooled` (SDXL),
    /// `image_latent`, `latent_offsets`; `None` where this inversion has none.
    fn tensor<'py>(&self, py: Python<'py>, name: &str) -> PyResult<Option<Array<'py>>> {
        let t = match name {
            "latent" => Some(&self.inv.latent_t),
            "null_embeddings" => Some(&self.inv.null_embeddings),
            "null_pooled" => self.inv.null_pooled.as_ref(),
            "image_latent" => self.inv.image_latent.as_ref(),
            "latent_offsets" => self.inv.latent_offsets.as_ref(),
            other => {
                return Err(PyValueError::new_err(format!(
                    "no tensor `{other}` (latent, null_embeddings, null_pooled, image_latent, \
                     latent_offsets)"
                )))
            }
        };
        t.map(|t| array(py, t)).transpose()
    }

    /// How the inversion went, for inversions made in this process: JSON with `losses`,
    /// `iterations`, `unet_passes`, `seconds_ddim`, `seconds_optimization`.
    fn report(&self) -> Option<String> {
        self.report.as_ref().map(|r| {
            serde_json::json!({
                "losses": r.losses,
                "iterations": r.iterations,
                "unet_passes": r.unet_passes,
                "seconds_ddim": r.seconds_ddim,
                "seconds_optimization": r.seconds_optimization,
            })
            .to_string()
        })
    }

    #[getter]
    fn prompt(&self) -> &str {
        &self.inv.prompt
    }
    #[getter]
    fn method(&self) -> String {
        self.inv.method.to_string()
    }
    #[getter]
    fn num_steps(&self) -> usize {
        self.inv.num_steps
    }
    #[getter]
    fn guidance(&self) -> f64 {
        self.inv.guidance
    }
    /// (height, width) of the image in pixels.
    #[getter]
    fn size(&self) -> (usize, usize) {
        (self.inv.height, self.inv.width)
    }
    #[getter]
    fn model(&self) -> &str {
        &self.inv.model
    }
    #[getter]
    fn model_fingerprint(&self) -> &str {
        &self.inv.model_fingerprint
    }
    #[getter]
    fn format_version(&self) -> u32 {
        nulltext::inversion_file::format_version(&self.inv)
    }
}

/// The image to invert: a file (read with the command line's limits) or pixels.
#[derive(FromPyObject)]
enum ImageArg<'py> {
    Path(PathBuf),
    Pixels(Pixels<'py>),
}

impl ImageArg<'_> {
    /// The pixels, and the name errors about them use.
    fn read(self, py: Python<'_>, max_pixels: u64, what: &str) -> PyResult<(RgbImage, PathBuf)> {
        match self {
            ImageArg::Path(p) => {
                let raw = py
                    .detach(|| image_io::read_rgb_limited(&p, max_pixels))
                    .map_err(py_err)?;
                Ok((raw, p))
            }
            ImageArg::Pixels((bytes, w, h)) => Ok((
                rgb_image(bytes.as_bytes(), w, h, what)?,
                PathBuf::from(format!("<{what}>")),
            )),
        }
    }
}

#[pymethods]
impl Model {
    #[getter]
    fn name(&self) -> &str {
        &self.sd.name
    }
    #[getter]
    fn fingerprint(&self) -> &str {
        &self.sd.fingerprint
    }
    /// `cpu`, `cuda:N` or `metal:N`, as `device=` accepts it.
    #[getter]
    fn device(&self) -> String {
        match self.sd.device.location() {
            candle_core::DeviceLocation::Cpu => "cpu".to_string(),
            candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
            candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
        }
    }
    #[getter]
    fn dtype(&self) -> &'static str {
        self.sd.dtype.as_str()
    }
    /// The square size images are resized to by default.
    #[getter]
    fn default_size(&self) -> usize {
        self.sd.default_image_size()
    }

    #[pyo3(signature = (image, prompt, *, method, steps, guidance, inner_steps, early_stop, size, crop, max_pixels, progress))]
    #[allow(clippy::too_many_arguments)]
    fn invert(
        &self,
        py: Python<'_>,
        image: ImageArg<'_>,
        prompt: String,
        method: &str,
        steps: usize,
        guidance: f64,
        inner_steps: usize,
        early_stop: f64,
        size: Option<u32>,
        crop: Option<String>,
        max_pixels: Option<u64>,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Inversion> {
        let mut limits = Limits::default();
        if let Some(max) = max_pixels {
            limits.max_pixels = max;
        }
        limits.check_prompt("prompt", &prompt).map_err(py_err)?;
        let crop: Crop = match &crop {
            Some(c) => parse("crop", c)?,
            None => Crop::default(),
        };
        let opts = InvertOptions {
            method: parse::<Method>("method", method)?,
            num_steps: steps,
            guidance,
            inner_steps,
            early_stop,
            ..Default::default()
        };
        let (raw, name) = image.read(py, limits.max_pixels, "image")?;
        let sd = &self.sd;
        let f = sd.vae_scale_factor() as u32;
        let size = limits
            .image_size("size", size, sd.default_image_size(), f)
            .map_err(py_err)?;
        opts.validate(&sd.scheduler).map_err(py_err)?;
        let img = image_io::prepare(&raw, crop, size, &name).map_err(py_err)?;
        if let Some(cut) = sd.tokenizer.encode_padded(&prompt).truncated {
            warn(
                py,
                &format!("the prompt is longer than 77 tokens; cut off: \"{cut}\""),
            )?;
        }
        let mut progress = PyProgress::new(progress);
        let result = py.detach(|| nulltext::invert_image(sd, &img, &prompt, &opts, &mut progress));
        let (inv, report) = progress.finish(result)?;
        Ok(Inversion {
            inv,
            report: Some(report),
        })
    }

    #[pyo3(signature = (inversion, targets, *, mode, cross_replace, self_replace, blend, blend_threshold, blend_subtract, attention_downscale, reweight, guidance, sdedit, attention_maps, force, progress))]
    #[allow(clippy::too_many_arguments)]
    fn edit(
        &self,
        py: Python<'_>,
        inversion: &Inversion,
        targets: Vec<String>,
        mode: &str,
        cross_replace: &str,
        self_replace: &str,
        blend: Option<String>,
        blend_threshold: f64,
        blend_subtract: Option<String>,
        attention_downscale: usize,
        reweight: Option<String>,
        guidance: Option<f64>,
        sdedit: Option<f64>,
        attention_maps: bool,
        force: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Output> {
        if targets.is_empty() {
            return Err(PyValueError::new_err(
                "edit needs at least one target caption",
            ));
        }
        let limits = Limits::default();
        for t in &targets {
            limits.check_prompt("targets", t).map_err(py_err)?;
        }
        let inv = &inversion.inv;
        // The settings as a manifest's edit writes them: one parser for every front end.
        let spec = nulltext::edit::EditSpec {
            target: String::new(),
            mode: Some(mode.to_string()),
            cross_replace: Some(cross_replace.to_string()),
            self_replace: Some(self_replace.to_string()),
            blend_threshold: blend.is_some().then_some(blend_threshold),
            blend,
            blend_subtract,
            attention_downscale: Some(attention_downscale),
            reweight,
            sdedit,
        };
        let opts = EditOptions {
            record_attention: attention_maps,
            guidance,
            ..spec.options().map_err(py_err)?
        };
        nulltext::edit::edit_guidance(inv, opts.guidance).map_err(py_err)?;
        let sd = &self.sd;
        inv.check_model(sd, force).map_err(py_err)?;
        let (_, _, h, w) = inv.latent_t.dims4().map_err(|e| py_err(e.into()))?;
        nulltext::edit::check_edit(sd, &inv.prompt, &targets, &opts, inv.num_steps, (h, w))
            .map_err(py_err)?;
        for t in &targets {
            if let Some(cut) = sd.tokenizer.encode_padded(t).truncated {
                warn(
                    py,
                    &format!("target \"{t}\" is longer than 77 tokens; cut off: \"{cut}\""),
                )?;
            }
        }
        let mut progress = PyProgress::new(progress);
        let result = py.detach(|| {
            let res = nulltext::edit::edit(sd, inv, &targets, &opts, &mut progress)?;
            let images = image_io::decode_latents(sd, &res.latents)?;
            Ok((res, images))
        });
        let (res, images) = progress.finish(result)?;
        Ok(Output {
            prompts: res.prompts,
            mode: if opts.sdedit.is_some() {
                "sdedit".to_string()
            } else {
                res.mode.to_string()
            },
            images,
            latents: res.latents,
            attention_maps: res.attention_maps,
        })
    }

    #[pyo3(signature = (inversion, *, force, progress))]
    fn reconstruct(
        &self,
        py: Python<'_>,
        inversion: &Inversion,
        force: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Output> {
        let sd = &self.sd;
        let inv = &inversion.inv;
        inv.check_model(sd, force).map_err(py_err)?;
        let mut progress = PyProgress::new(progress);
        let result = py.detach(|| {
            let z = nulltext::reconstruct(sd, inv, &mut progress)?;
            let images = image_io::decode_latents(sd, &z)?;
            Ok((z, images))
        });
        let (latents, images) = progress.finish(result)?;
        Ok(Output {
            prompts: vec![inv.prompt.clone()],
            mode: "reconstruction".to_string(),
            images,
            latents,
            attention_maps: None,
        })
    }

    /// The prompt's tokens with this model's tokenizer.
    fn tokens(&self, prompt: &str) -> TokenList {
        tokens_of(&self.sd.tokenizer, prompt)
    }
}

/// (position, id, token, word) per used position, and the text truncation cut off.
type TokenList = (Vec<(usize, u32, String, Option<String>)>, Option<String>);

fn tokens_of(tok: &nulltext::models::ClipTokenizer, prompt: &str) -> TokenList {
    let rows = tok
        .describe(prompt)
        .into_iter()
        .map(|r| (r.position, r.id, r.token, r.word.map(|w| w.1)))
        .collect();
    (rows, tok.encode_padded(prompt).truncated)
}

fn warn(py: Python<'_>, msg: &str) -> PyResult<()> {
    PyErr::warn(
        py,
        &py.get_type::<pyo3::exceptions::PyUserWarning>(),
        &std::ffi::CString::new(msg).unwrap_or_default(),
        1,
    )
}

#[pyfunction]
#[pyo3(signature = (model, *, device, dtype, model_config, prediction_type))]
fn load(
    py: Python<'_>,
    model: String,
    device: &str,
    dtype: &str,
    model_config: Option<PathBuf>,
    prediction_type: Option<String>,
) -> PyResult<Model> {
    let device = nulltext::runtime::parse_device(device).map_err(py_err)?;
    let dtype = nulltext::runtime::parse_dtype(dtype, &device).map_err(py_err)?;
    let opts = LoadOptions {
        device,
        dtype,
        config_dir: model_config,
        prediction_type,
        execution: nulltext::runtime::execution_from_env().map_err(py_err)?,
    };
    let sd = py
        .detach(|| nulltext::runtime::load_weights(|| StableDiffusion::load(&model, &opts)))
        .map_err(|e| py_err(e.into()))?;
    Ok(Model { sd })
}

/// The prompt's tokens with the bundled CLIP tokenizer.
#[pyfunction]
fn tokens(prompt: &str) -> TokenList {
    tokens_of(&nulltext::models::ClipTokenizer::bundled(), prompt)
}

/// PSNR, SSIM, MSE (and LPIPS, structure distance, CLIP score when their weights are
/// given) of `candidate`
/// against `reference`, under `mask` (white = counted) if given: JSON.
#[pyfunction]
#[pyo3(signature = (reference, candidate, *, mask, invert_mask, ssim_window, lpips, dino, clip, caption))]
#[allow(clippy::too_many_arguments)]
fn eval(
    py: Python<'_>,
    reference: ImageArg<'_>,
    candidate: ImageArg<'_>,
    mask: Option<ImageArg<'_>>,
    invert_mask: bool,
    ssim_window: &str,
    lpips: Option<PathBuf>,
    dino: Option<PathBuf>,
    clip: Option<PathBuf>,
    caption: Option<String>,
) -> PyResult<String> {
    use nulltext_eval::metrics::{compare, Mask, SsimWindow};
    let reference = reference.read(py, u64::MAX, "reference")?.0;
    let candidate = candidate.read(py, u64::MAX, "candidate")?.0;
    let mask = match mask {
        Some(m) => {
            let rgb = m.read(py, u64::MAX, "mask")?.0;
            let gray = image::DynamicImage::ImageRgb8(rgb).to_luma8();
            Some(Mask::from_gray(&gray, invert_mask))
        }
        None => None,
    };
    let window: SsimWindow = parse("ssim_window", ssim_window)?;
    if clip.is_some() != caption.is_some() {
        return Err(PyValueError::new_err(
            "the CLIP score needs both clip and caption",
        ));
    }
    let json = py.detach(|| {
        let m = compare(&reference, &candidate, mask.as_ref(), window)?;
        let mut v = serde_json::to_value(m).unwrap_or_default();
        if let Some(p) = &lpips {
            let net = nulltext_eval::lpips::Lpips::load(p, &Device::Cpu)?;
            v["lpips"] = net.distance(&reference, &candidate, mask.as_ref())?.into();
        }
        if let Some(p) = &dino {
            let net = nulltext_eval::structure::StructureDistance::load(p, &Device::Cpu)?;
            v["structure_distance"] = net.distance(&reference, &candidate, mask.as_ref())?.into();
        }
        if let (Some(p), Some(caption)) = (&clip, &caption) {
            let net = nulltext::models::clip_score::ClipScorer::load(p, &Device::Cpu)?;
            v["clip_score"] =
                nulltext_eval::clip_score::clip_score(&net, &candidate, caption, mask.as_ref())?
                    .into();
        }
        if let Some(m) = &mask {
            v["mask_coverage"] = m.coverage().into();
        }
        Ok::<_, nulltext::Error>(v.to_string())
    });
    json.map_err(py_err)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    nulltext::runtime::configure_threads();
    nulltext::runtime::configure_allocator();
    m.add("ModelError", m.py().get_type::<ModelError>())?;
    m.add(
        "METHODS",
        Method::ALL
            .iter()
            .map(|m| m.to_string())
            .collect::<Vec<_>>(),
    )?;
    m.add_class::<Model>()?;
    m.add_class::<Inversion>()?;
    m.add_class::<Output>()?;
    m.add_function(wrap_pyfunction!(load, m)?)?;
    m.add_function(wrap_pyfunction!(tokens, m)?)?;
    m.add_function(wrap_pyfunction!(eval, m)?)?;
    Ok(())
}
