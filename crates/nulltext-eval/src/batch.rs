//! Batch runs over a dataset: a JSON-lines manifest of images, captions and edits; each item
//! is inverted, edited and evaluated into its own folder.
//!
//! Every file appears whole (written to a temporary sibling and renamed), and an item's
//! `result.json` is written last: an item with a `result.json` made with the same settings
//! is finished and skipped by a rerun, anything else is (re)done. `--shard I/N` takes every
//! N-th item starting at I, so N processes share a dataset with no coordination.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use image::RgbImage;
use nulltext::atomic::write_bytes_atomic;
use nulltext::edit::{self, EditOptions, EditSpec};
use nulltext::error::{invalid, Error, Result};
use nulltext::events::Progress;
use nulltext::image_io::{self, Crop};
use nulltext::inversion::{invert_image, reconstruct, Inversion, InvertOptions};
use nulltext::limits::Limits;
use nulltext_models::StableDiffusion;
use serde::{Deserialize, Serialize};

use crate::metrics::{compare, ImageMetrics, Mask, SsimWindow};

/// One edit of an item, as written in the manifest: a target caption alone
/// (`"a tiger sitting on a table"`) or with settings (the `nulltext edit` options).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum EditEntry {
    Target(String),
    Spec(EditSpec),
}

impl EditEntry {
    pub fn spec(&self) -> EditSpec {
        match self {
            EditEntry::Target(t) => EditSpec {
                target: t.clone(),
                ..Default::default()
            },
            EditEntry::Spec(s) => s.clone(),
        }
    }
}

/// One line of a manifest.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemSpec {
    /// A name for the item's folder (letters, digits, `.`, `_`, `-`); default: the line
    /// number.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The photo, relative to the manifest's folder unless absolute.
    pub image: PathBuf,
    /// Its caption.
    pub prompt: String,
    #[serde(default)]
    pub edits: Vec<EditEntry>,
    /// A mask of the region the edits may change (white), as PIE-Bench's: edits are also
    /// evaluated on the rest (background preservation). Relative like `image`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mask: Option<PathBuf>,
    /// `LEFT,RIGHT,TOP,BOTTOM` pixels cut before the centre square.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crop: Option<String>,
    /// A label reports group results by (PIE-Bench: the edit type, "0"–"9").
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
}

/// A manifest item, checked, with its paths resolved.
#[derive(Debug, Clone)]
pub struct Item {
    /// Position in the manifest (0-based), which decides the shard.
    pub index: usize,
    pub id: String,
    pub spec: ItemSpec,
    pub image: PathBuf,
    pub mask: Option<PathBuf>,
    pub crop: Crop,
    /// Why the item cannot be run, found before running it (an imported benchmark's
    /// missing image or malformed mask): a run records it as failed and goes on.
    pub problem: Option<String>,
}

/// A whole manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub path: PathBuf,
    pub items: Vec<Item>,
}

fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && !id.starts_with('.')
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Reads and checks a manifest: one JSON object per line (blank lines and lines starting
/// with `#` are skipped). Every error names the line.
pub fn read_manifest(path: &Path) -> Result<Manifest> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::Io {
        path: path.to_path_buf(),
        source: e,
    })?;
    let base = path.parent().unwrap_or(Path::new("")).to_path_buf();
    let mut items = Vec::new();
    let mut seen = BTreeSet::new();
    for (k, line) in text.lines().enumerate() {
        let line_no = k + 1;
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with('#') {
            continue;
        }
        let at = |msg: String| invalid(format!("{} line {line_no}: {msg}", path.display()));
        let spec: ItemSpec = serde_json::from_str(trimmed).map_err(|e| at(e.to_string()))?;
        let id = spec.id.clone().unwrap_or_else(|| format!("{line_no:06}"));
        if !valid_id(&id) {
            return Err(at(format!(
                "id `{id}` must be 1–128 letters, digits, `.`, `_` or `-`, not starting with `.`"
            )));
        }
        if !seen.insert(id.clone()) {
            return Err(at(format!("id `{id}` is used twice")));
        }
        if spec.prompt.trim().is_empty() {
            return Err(at("empty prompt".into()));
        }
        for e in &spec.edits {
            let s = e.spec();
            s.options()
                .map_err(|err| at(format!("edit \"{}\": {err}", s.target)))?;
        }
        let crop = match &spec.crop {
            Some(c) => c.parse::<Crop>().map_err(at)?,
            None => Crop::default(),
        };
        let resolve = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        items.push(Item {
            index: items.len(),
            image: resolve(&spec.image),
            mask: spec.mask.as_deref().map(resolve),
            id,
            crop,
            spec,
            problem: None,
        });
    }
    if items.is_empty() {
        return Err(invalid(format!("{}: no items", path.display())));
    }
    Ok(Manifest {
        path: path.to_path_buf(),
        items,
    })
}

/// Which part of the items this process takes: every `count`-th from `index`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Default for Shard {
    fn default() -> Self {
        Self { index: 0, count: 1 }
    }
}

impl Shard {
    pub fn contains(&self, item: &Item) -> bool {
        item.index % self.count == self.index
    }
}

impl std::str::FromStr for Shard {
    type Err = String;
    /// `I/N` with 0 ≤ I < N.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let err = || format!("shard `{s}`: expected I/N with 0 ≤ I < N, e.g. 0/4");
        let (i, n) = s.split_once('/').ok_or_else(err)?;
        let index: usize = i.trim().parse().map_err(|_| err())?;
        let count: usize = n.trim().parse().map_err(|_| err())?;
        if count == 0 || index >= count {
            return Err(err());
        }
        Ok(Self { index, count })
    }
}

/// Settings of a batch run.
#[derive(Debug, Clone)]
pub struct BatchOptions {
    pub invert: InvertOptions,
    /// Square size images are resized to; `None`: the model's.
    pub size: Option<u32>,
    pub shard: Shard,
    /// LPIPS weights (the `lpips` package's state dict as safetensors), if wanted.
    pub lpips: Option<PathBuf>,
    /// A transformers CLIP folder for CLIP scores of the edits, if wanted.
    pub clip: Option<PathBuf>,
    /// DINO ViT weights for the structure distance of the edits, if wanted.
    pub dino: Option<PathBuf>,
    /// The SSIM of every comparison.
    pub ssim: SsimWindow,
    /// Bounds on images, sizes and prompts.
    pub limits: Limits,
}

/// An evaluated edit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EditOutcome {
    pub target: String,
    pub mode: String,
    /// The image file, in the item's folder.
    pub image: String,
    /// Against the input image, whole.
    pub whole: ImageMetrics,
    /// Against the input image outside the item's mask (background preservation).
    pub background: Option<ImageMetrics>,
    /// LPIPS against the input, whole and outside the mask (with `--lpips`).
    #[serde(default)]
    pub lpips: Option<f64>,
    #[serde(default)]
    pub background_lpips: Option<f64>,
    /// CLIP score with the target caption, whole and inside the mask (with `--clip`).
    #[serde(default)]
    pub clip_score: Option<f64>,
    #[serde(default)]
    pub clip_score_edited: Option<f64>,
    /// PIE-Bench's structure distance to the input (with `--dino`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub structure_distance: Option<f64>,
    pub seconds: f64,
}

/// Everything measured for one item; `result.json` in its folder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ItemResult {
    pub id: String,
    pub prompt: String,
    /// The item's category (PIE-Bench: its edit type).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub category: Option<String>,
    /// The settings that produced this result (item and run settings, model fingerprint).
    pub settings: serde_json::Value,
    pub method: String,
    /// Adam iterations run over all steps.
    pub iterations: usize,
    pub seconds_inversion: f64,
    /// The VAE round trip against the input: the best any inversion can do.
    pub vae: ImageMetrics,
    /// The reconstruction against the input.
    pub reconstruction: ImageMetrics,
    /// The reconstruction against the VAE round trip.
    pub reconstruction_vs_vae: ImageMetrics,
    /// LPIPS of the reconstruction against the input (with `--lpips`).
    #[serde(default)]
    pub reconstruction_lpips: Option<f64>,
    /// CLIP score of the input with its caption (with `--clip`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clip_score_source: Option<f64>,
    pub edits: Vec<EditOutcome>,
}

/// What happened to an item in a run.
#[derive(Debug)]
pub enum ItemEvent<'a> {
    /// Work on an item begins; `position` of `total` in this shard.
    Start {
        id: &'a str,
        position: usize,
        total: usize,
    },
    /// Finished earlier with the same settings.
    Skipped {
        id: &'a str,
    },
    Done {
        id: &'a str,
        result: &'a ItemResult,
    },
    Failed {
        id: &'a str,
        error: &'a Error,
    },
}

/// The outcome of [`run`].
#[derive(Debug, Default)]
pub struct BatchReport {
    pub done: Vec<String>,
    pub skipped: Vec<String>,
    pub failed: Vec<(String, String)>,
}

pub const RESULT_FILE: &str = "result.json";
pub const ERROR_FILE: &str = "error.json";
pub const INVERSION_FILE: &str = "inversion.nti.safetensors";
const INVERSION_DONE: &str = "inversion.json";

/// The folder of an item.
pub fn item_dir(out_dir: &Path, id: &str) -> PathBuf {
    out_dir.join("items").join(id)
}

/// The settings an item's result depends on: its inversion's (`v`) plus the metrics asked
/// for.
fn with_metrics(mut v: serde_json::Value, opts: &BatchOptions) -> serde_json::Value {
    v["metrics"] = serde_json::json!({
        "lpips": opts.lpips.as_ref().map(|p| p.display().to_string()),
        "clip": opts.clip.as_ref().map(|p| p.display().to_string()),
    });
    // Recorded only when set, so that results made before these settings existed stay valid.
    if let Some(d) = &opts.dino {
        v["metrics"]["dino"] = d.display().to_string().into();
    }
    if opts.ssim != SsimWindow::default() {
        v["metrics"]["ssim"] = format!("{:?}", opts.ssim).into();
    }
    v
}

/// The settings an item's inversion depends on.
fn inversion_settings(
    sd: &StableDiffusion,
    item: &Item,
    opts: &BatchOptions,
    size: u32,
) -> serde_json::Value {
    let o = &opts.invert;
    serde_json::json!({
        "model_fingerprint": sd.fingerprint,
        "method": o.method.as_str(),
        "steps": o.num_steps,
        "inner_steps": o.inner_steps,
        "guidance": o.guidance,
        "early_stop": o.early_stop,
        "size": size,
        "item": item.spec,
    })
}

fn write_json(path: &Path, v: &impl Serialize) -> Result<()> {
    let mut bytes = serde_json::to_vec_pretty(v).map_err(|e| invalid(e.to_string()))?;
    bytes.push(b'\n');
    write_bytes_atomic(path, &bytes)
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Option<T> {
    let text = std::fs::read_to_string(path).ok()?;
    serde_json::from_str(&text).ok()
}

/// Removes temporary files a killed process left behind.
fn remove_stale_temporaries(dir: &Path) {
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.starts_with('.') && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(e.path());
            }
        }
    }
}

/// Runs this shard's items of `manifest` into `out_dir`: skips finished ones, records
/// failures in the item's `error.json` and goes on; stops at once when cancelled.
pub fn run(
    sd: &StableDiffusion,
    manifest: &Manifest,
    out_dir: &Path,
    opts: &BatchOptions,
    progress: &mut dyn Progress,
    mut on_item: impl FnMut(ItemEvent),
) -> Result<BatchReport> {
    let f = sd.vae_scale_factor() as u32;
    let size = opts
        .limits
        .image_size("--size", opts.size, sd.default_image_size(), f)?;
    opts.invert.validate(&sd.scheduler)?;
    let mine: Vec<&Item> = manifest
        .items
        .iter()
        .filter(|i| opts.shard.contains(i))
        .collect();
    let nets = Nets {
        lpips: match &opts.lpips {
            Some(p) => Some(crate::lpips::Lpips::load(p, &sd.device)?),
            None => None,
        },
        clip: match &opts.clip {
            Some(p) => Some(nulltext_models::clip_score::ClipScorer::load(
                p, &sd.device,
            )?),
            None => None,
        },
        structure: match &opts.dino {
            Some(p) => Some(crate::structure::StructureDistance::load(p, &sd.device)?),
            None => None,
        },
    };
    let mut report = BatchReport::default();
    for (position, item) in mine.iter().enumerate() {
        let dir = item_dir(out_dir, &item.id);
        if let Some(problem) = &item.problem {
            let _ = std::fs::remove_file(dir.join(RESULT_FILE));
            record_failure(
                item,
                &dir,
                &invalid(problem.clone()),
                &mut report,
                &mut on_item,
            )?;
            continue;
        }
        let inv_settings = inversion_settings(sd, item, opts, size);
        let want = with_metrics(inv_settings.clone(), opts);
        if let Some(r) = read_json::<ItemResult>(&dir.join(RESULT_FILE)) {
            if r.settings == want {
                on_item(ItemEvent::Skipped { id: &item.id });
                report.skipped.push(item.id.clone());
                continue;
            }
            tracing::warn!(
                "{}: made with other settings; running it again",
                dir.display()
            );
            let _ = std::fs::remove_file(dir.join(RESULT_FILE));
        }
        on_item(ItemEvent::Start {
            id: &item.id,
            position,
            total: mine.len(),
        });
        remove_stale_temporaries(&dir);
        match run_item(
            sd,
            item,
            &dir,
            opts,
            size,
            &want,
            &inv_settings,
            &nets,
            progress,
        ) {
            Ok(result) => {
                write_json(&dir.join(RESULT_FILE), &result)?;
                let _ = std::fs::remove_file(dir.join(ERROR_FILE));
                on_item(ItemEvent::Done {
                    id: &item.id,
                    result: &result,
                });
                report.done.push(item.id.clone());
            }
            Err(Error::Cancelled) => return Err(Error::Cancelled),
            Err(e) => record_failure(item, &dir, &e, &mut report, &mut on_item)?,
        }
    }
    Ok(report)
}

/// Records `item` as failed with `error`: its error file, the event, the report's line.
fn record_failure(
    item: &Item,
    dir: &Path,
    error: &Error,
    report: &mut BatchReport,
    on_item: &mut impl FnMut(ItemEvent),
) -> Result<()> {
    let msg = error.to_string();
    write_json(
        &dir.join(ERROR_FILE),
        &serde_json::json!({ "id": item.id, "category": item.spec.category, "error": msg }),
    )?;
    on_item(ItemEvent::Failed {
        id: &item.id,
        error,
    });
    report.failed.push((item.id.clone(), msg));
    Ok(())
}

fn load_mask(item: &Item, size: u32, opts: &BatchOptions) -> Result<Option<Mask>> {
    let Some(path) = &item.mask else {
        return Ok(None);
    };
    // The complement: the manifest marks what may change, the metrics look at the rest.
    let region = crate::metrics::load_mask(path, item.crop, size, opts.limits.max_pixels)?;
    Ok(Some(region.complement()))
}

/// The optional networks of the metrics.
struct Nets {
    lpips: Option<crate::lpips::Lpips>,
    clip: Option<nulltext_models::clip_score::ClipScorer>,
    structure: Option<crate::structure::StructureDistance>,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct InversionDone {
    settings: serde_json::Value,
    iterations: usize,
    seconds: f64,
}

#[allow(clippy::too_many_arguments)]
fn run_item(
    sd: &StableDiffusion,
    item: &Item,
    dir: &Path,
    opts: &BatchOptions,
    size: u32,
    settings: &serde_json::Value,
    inv_settings: &serde_json::Value,
    nets: &Nets,
    progress: &mut dyn Progress,
) -> Result<ItemResult> {
    opts.limits.check_prompt("prompt", &item.spec.prompt)?;
    let input = image_io::load_image_limited(&item.image, item.crop, size, opts.limits.max_pixels)?;
    let mask = load_mask(item, size, opts)?;
    let enc = sd.tokenizer.encode_padded(&item.spec.prompt);
    if let Some(cut) = &enc.truncated {
        tracing::warn!(
            "{}: the prompt is longer than 77 tokens; cut off: \"{cut}\"",
            item.id
        );
    }
    // Check every edit against the prompt before the long inversion.
    let edits: Vec<(EditSpec, EditOptions)> = item
        .spec
        .edits
        .iter()
        .map(|e| {
            let s = e.spec();
            opts.limits.check_prompt("target", &s.target)?;
            let o = s.options()?;
            Ok((s, o))
        })
        .collect::<Result<_>>()?;
    let latent = (size / sd.vae_scale_factor() as u32) as usize;
    for (s, o) in &edits {
        edit::check_edit(
            sd,
            &item.spec.prompt,
            std::slice::from_ref(&s.target),
            o,
            opts.invert.num_steps,
            (latent, latent),
        )
        .map_err(|e| invalid(format!("edit \"{}\": {e}", s.target)))?;
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::Io {
        path: dir.to_path_buf(),
        source: e,
    })?;
    image_io::save_png(&input, &dir.join("input.png"))?;

    // The inversion, unless an earlier run of this item got that far.
    let inv_path = dir.join(INVERSION_FILE);
    let done_path = dir.join(INVERSION_DONE);
    let earlier = read_json::<InversionDone>(&done_path)
        .filter(|d| &d.settings == inv_settings)
        .and_then(|d| Some((nulltext::inversion_file::load(&inv_path).ok()?, d)));
    let (inv, iterations, seconds_inversion, rec_latent): (Inversion, usize, f64, _) = match earlier
    {
        Some((inv, d)) => {
            let z = reconstruct(sd, &inv, progress)?;
            (inv, d.iterations, d.seconds, z)
        }
        None => {
            let start = Instant::now();
            let (inv, report) =
                invert_image(sd, &input, &item.spec.prompt, &opts.invert, progress)?;
            let seconds = start.elapsed().as_secs_f64();
            let iterations = report.iterations.iter().sum();
            nulltext::inversion_file::save(&inv, &inv_path)?;
            write_json(
                &done_path,
                &InversionDone {
                    settings: settings.clone(),
                    iterations,
                    seconds,
                },
            )?;
            let z = match report.final_latent {
                Some(z) => z,
                None => reconstruct(sd, &inv, progress)?,
            };
            (inv, iterations, seconds, z)
        }
    };
    let z0 = inv
        .image_latent
        .as_ref()
        .ok_or_else(|| invalid("the inversion lacks its image latent"))?
        .to_device(&sd.device)?;
    let vae_img = image_io::decode_latents(sd, &z0)?.remove(0);
    let rec = image_io::decode_latents(sd, &rec_latent)?.remove(0);
    image_io::save_png(&rec, &dir.join("reconstruction.png"))?;
    let m = |a: &RgbImage, b: &RgbImage, mask: Option<&Mask>| compare(a, b, mask, opts.ssim);
    let lpips = |b: &RgbImage, mask: Option<&Mask>| -> Result<Option<f64>> {
        match &nets.lpips {
            Some(net) => Ok(Some(net.distance(&input, b, mask)?)),
            None => Ok(None),
        }
    };
    let clip = |b: &RgbImage, caption: &str, mask: Option<&Mask>| -> Result<Option<f64>> {
        match &nets.clip {
            Some(net) => Ok(Some(crate::clip_score::clip_score(net, b, caption, mask)?)),
            None => Ok(None),
        }
    };
    // The region the edits may change, for the edited part's CLIP score. An empty region
    // or background has no metrics (PIE-Bench's "nan").
    let edited = mask.as_ref().map(|m| m.complement());
    let nonempty = |m: &Option<Mask>| m.clone().filter(|m| m.weights().iter().any(|&w| w != 0.0));
    let (mask, edited) = (nonempty(&mask), nonempty(&edited));

    let mut outcomes = Vec::new();
    for (k, (s, o)) in edits.iter().enumerate() {
        let start = Instant::now();
        let res = edit::edit(sd, &inv, std::slice::from_ref(&s.target), o, progress)?;
        let img = image_io::decode_latents(sd, &res.latents.narrow(0, 1, 1)?)?.remove(0);
        let name = format!("edit-{:02}.png", k + 1);
        image_io::save_png(&img, &dir.join(&name))?;
        outcomes.push(EditOutcome {
            target: s.target.clone(),
            mode: if o.sdedit.is_some() {
                "sdedit".into()
            } else {
                res.mode.to_string()
            },
            image: name,
            whole: m(&input, &img, None)?,
            background: match &mask {
                Some(mask) => Some(m(&input, &img, Some(mask))?),
                None => None,
            },
            lpips: lpips(&img, None)?,
            background_lpips: match &mask {
                Some(mask) => lpips(&img, Some(mask))?,
                None => None,
            },
            clip_score: clip(&img, &s.target, None)?,
            clip_score_edited: match &edited {
                Some(e) => clip(&img, &s.target, Some(e))?,
                None => None,
            },
            structure_distance: match &nets.structure {
                Some(net) => Some(net.distance(&input, &img, None)?),
                None => None,
            },
            seconds: start.elapsed().as_secs_f64(),
        });
    }
    Ok(ItemResult {
        id: item.id.clone(),
        prompt: item.spec.prompt.clone(),
        category: item.spec.category.clone(),
        settings: settings.clone(),
        method: opts.invert.method.to_string(),
        iterations,
        seconds_inversion,
        vae: m(&input, &vae_img, None)?,
        reconstruction: m(&input, &rec, None)?,
        reconstruction_vs_vae: m(&vae_img, &rec, None)?,
        reconstruction_lpips: lpips(&rec, None)?,
        clip_score_source: clip(&input, &item.spec.prompt, None)?,
        edits: outcomes,
    })
}

/// The summary of all items of a manifest finished so far (by any shard).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub manifest: String,
    pub finished: usize,
    pub failed: Vec<serde_json::Value>,
    pub pending: Vec<String>,
    /// Means over the finished items (edits: over all edits).
    pub means: serde_json::Value,
    pub items: Vec<ItemResult>,
}

fn mean(v: impl Iterator<Item = f64>) -> Option<f64> {
    let v: Vec<f64> = v.filter(|x| x.is_finite()).collect();
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Collects every item's result and writes `summary.json` and `summary.csv` (one row per
/// reconstruction and per edit) to `out_dir`.
pub fn write_summary(manifest: &Manifest, out_dir: &Path) -> Result<Summary> {
    let mut items = Vec::new();
    let mut failed = Vec::new();
    let mut pending = Vec::new();
    for item in &manifest.items {
        let dir = item_dir(out_dir, &item.id);
        if let Some(r) = read_json::<ItemResult>(&dir.join(RESULT_FILE)) {
            items.push(r);
        } else if let Some(e) = read_json::<serde_json::Value>(&dir.join(ERROR_FILE)) {
            failed.push(e);
        } else {
            pending.push(item.id.clone());
        }
    }
    let rec = |f: fn(&ItemResult) -> f64| mean(items.iter().map(f));
    let edits: Vec<&EditOutcome> = items.iter().flat_map(|r| &r.edits).collect();
    let bg: Vec<&ImageMetrics> = edits.iter().filter_map(|e| e.background.as_ref()).collect();
    let means = serde_json::json!({
        "reconstruction_psnr": rec(|r| r.reconstruction.psnr),
        "reconstruction_ssim": rec(|r| r.reconstruction.ssim),
        "reconstruction_mse": rec(|r| r.reconstruction.mse),
        "reconstruction_psnr_vs_vae": rec(|r| r.reconstruction_vs_vae.psnr),
        "vae_psnr": rec(|r| r.vae.psnr),
        "iterations": rec(|r| r.iterations as f64),
        "seconds_inversion": rec(|r| r.seconds_inversion),
        "edit_psnr": mean(edits.iter().map(|e| e.whole.psnr)),
        "edit_ssim": mean(edits.iter().map(|e| e.whole.ssim)),
        "background_psnr": mean(bg.iter().map(|m| m.psnr)),
        "background_ssim": mean(bg.iter().map(|m| m.ssim)),
        "background_mse": mean(bg.iter().map(|m| m.mse)),
        "seconds_edit": mean(edits.iter().map(|e| e.seconds)),
        "reconstruction_lpips": mean(items.iter().filter_map(|r| r.reconstruction_lpips)),
        "edit_lpips": mean(edits.iter().filter_map(|e| e.lpips)),
        "background_lpips": mean(edits.iter().filter_map(|e| e.background_lpips)),
        "clip_score": mean(edits.iter().filter_map(|e| e.clip_score)),
        "clip_score_edited": mean(edits.iter().filter_map(|e| e.clip_score_edited)),
    });
    let summary = Summary {
        manifest: manifest.path.display().to_string(),
        finished: items.len(),
        failed,
        pending,
        means,
        items,
    };
    write_json(&out_dir.join("summary.json"), &summary)?;
    write_bytes_atomic(
        &out_dir.join("summary.csv"),
        summary_csv(&summary).as_bytes(),
    )?;
    Ok(summary)
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

fn summary_csv(s: &Summary) -> String {
    let mut out = String::from(
        "id,kind,caption,mode,psnr,ssim,mse,background_psnr,background_ssim,background_mse,lpips,background_lpips,clip_score,clip_score_edited,iterations,seconds\n",
    );
    let num = |v: f64| format!("{v:.6}");
    let opt = |v: Option<f64>| v.map(num).unwrap_or_default();
    for r in &s.items {
        out += &format!(
            "{},reconstruction,{},{},{},{},{},,,,{},,,,{},{:.3}\n",
            csv_field(&r.id),
            csv_field(&r.prompt),
            r.method,
            num(r.reconstruction.psnr),
            num(r.reconstruction.ssim),
            num(r.reconstruction.mse),
            opt(r.reconstruction_lpips),
            r.iterations,
            r.seconds_inversion
        );
        for e in &r.edits {
            let (bp, bs, bm) = match &e.background {
                Some(b) => (num(b.psnr), num(b.ssim), num(b.mse)),
                None => (String::new(), String::new(), String::new()),
            };
            out += &format!(
                "{},edit,{},{},{},{},{},{bp},{bs},{bm},{},{},{},{},,{:.3}\n",
                csv_field(&r.id),
                csv_field(&e.target),
                e.mode,
                num(e.whole.psnr),
                num(e.whole.ssim),
                num(e.whole.mse),
                opt(e.lpips),
                opt(e.background_lpips),
                opt(e.clip_score),
                opt(e.clip_score_edited),
                e.seconds
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        std::fs::create_dir_all(dir).unwrap();
        let p = dir.join("m.jsonl");
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn manifests_are_checked_line_by_line() {
        let d = std::env::temp_dir().join(format!("nulltext-manifest-{}", std::process::id()));
        let p = write(
            &d,
            "# a comment\n\n{\"image\": \"a.png\", \"prompt\": \"a cat\", \"edits\": [\"a dog\", {\"target\": \"a tiger\", \"cross_replace\": \"0.5\"}]}\n{\"id\": \"x-1\", \"image\": \"/abs/b.png\", \"prompt\": \"a b\", \"crop\": \"1,2,3,4\", \"mask\": \"m.png\"}\n",
        );
        let m = read_manifest(&p).unwrap();
        assert_eq!(m.items.len(), 2);
        assert_eq!(m.items[0].id, "000003");
        assert_eq!(m.items[0].image, d.join("a.png"));
        assert_eq!(m.items[0].spec.edits.len(), 2);
        assert_eq!(m.items[1].image, PathBuf::from("/abs/b.png"));
        assert_eq!(m.items[1].mask, Some(d.join("m.png")));
        assert_eq!(m.items[1].crop.bottom, 4);

        for (text, needle) in [
            ("{\"image\": \"a.png\"}\n", "line 1"),
            ("{\"image\": \"a.png\", \"prompt\": \"x\", \"colour\": 1}\n", "colour"),
            ("{\"id\": \"../x\", \"image\": \"a.png\", \"prompt\": \"x\"}\n", "id `../x`"),
            (
                "{\"id\": \"a\", \"image\": \"a.png\", \"prompt\": \"x\"}\n{\"id\": \"a\", \"image\": \"b.png\", \"prompt\": \"y\"}\n",
                "line 2: id `a` is used twice",
            ),
            (
                "{\"image\": \"a.png\", \"prompt\": \"x\", \"edits\": [{\"target\": \"y\", \"cross_replace\": \"2\"}]}\n",
                "edit \"y\"",
            ),
            ("\n# nothing\n", "no items"),
        ] {
            let e = read_manifest(&write(&d, text)).unwrap_err().to_string();
            assert!(e.contains(needle), "{text}: {e}");
        }
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn shards_partition_the_items() {
        let s: Shard = "1/3".parse().unwrap();
        assert_eq!(s, Shard { index: 1, count: 3 });
        for bad in ["3/3", "1", "a/2", "0/0"] {
            assert!(bad.parse::<Shard>().is_err(), "{bad}");
        }
        let item = |index| Item {
            index,
            id: String::new(),
            spec: ItemSpec {
                id: None,
                image: PathBuf::new(),
                prompt: String::new(),
                edits: vec![],
                mask: None,
                crop: None,
                category: None,
            },
            image: PathBuf::new(),
            mask: None,
            crop: Crop::default(),
            problem: None,
        };
        for i in 0..10 {
            let owners = (0..3)
                .filter(|k| {
                    Shard {
                        index: *k,
                        count: 3,
                    }
                    .contains(&item(i))
                })
                .count();
            assert_eq!(owners, 1);
        }
    }

    #[test]
    fn csv_fields_are_quoted() {
        assert_eq!(csv_field("a cat"), "a cat");
        assert_eq!(csv_field("a cat, sitting"), "\"a cat, sitting\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }
}
