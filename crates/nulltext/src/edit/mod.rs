//! Prompt-to-Prompt editing of an inversion (spec §4): word swap, refinement, reweighting,
//! local blending, and SDEdit from the inverted trajectory.

pub mod align;
pub mod controller;

use candle_core::{DType, Tensor};
use nulltext_models::tokenizer::{ClipTokenizer, MAX_LEN};
use nulltext_models::{Ddim, NoControl, StableDiffusion};

pub use align::Word;
pub use controller::{AttentionStore, CrossMap, LocalBlend, P2PController};

use crate::error::{invalid, Result};
use crate::events::Progress;
use crate::inversion::Inversion;
use crate::sampling::{sample, SampleSpec};

/// Which Prompt-to-Prompt edit maps the source's cross-attention onto a target.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EditMode {
    /// Replace when every target has as many words as the source, refine otherwise.
    Auto,
    /// Word swap (same number of words).
    Replace,
    /// Words added or removed (global token alignment).
    Refine,
}

impl std::str::FromStr for EditMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(EditMode::Auto),
            "replace" => Ok(EditMode::Replace),
            "refine" => Ok(EditMode::Refine),
            _ => Err(format!("unknown edit mode `{s}` (auto, replace, refine)")),
        }
    }
}

impl std::fmt::Display for EditMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            EditMode::Auto => "auto",
            EditMode::Replace => "replace",
            EditMode::Refine => "refine",
        })
    }
}

/// A window of the sampling process as fractions `[start, end)` of it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Window {
    /// Fraction where the window opens, in [0, 1].
    pub start: f64,
    /// Fraction where it closes (excluded), in [0, 1] and not below `start`.
    pub end: f64,
}

impl Window {
    /// `[0, end)`: from the first step.
    pub fn until(end: f64) -> Self {
        Self { start: 0.0, end }
    }

    /// Checks that both ends lie in [0, 1] and `start ≤ end`; `what` names the setting in
    /// the error.
    pub fn validate(&self, what: &str) -> Result<()> {
        let ok = |x: f64| (0.0..=1.0).contains(&x);
        if !ok(self.start) || !ok(self.end) || self.start > self.end {
            return Err(invalid(format!(
                "{what} must be a fraction in [0, 1] or a range START:END within it, got {}:{}",
                self.start, self.end
            )));
        }
        Ok(())
    }

    /// Rows `[⌊start·n⌋, ⌊end·n⌋)` of `n`.
    pub fn rows(&self, n: usize) -> (usize, usize) {
        (
            (self.start * n as f64) as usize,
            (self.end * n as f64) as usize,
        )
    }
}

impl std::str::FromStr for Window {
    type Err = String;
    /// `END` (from 0) or `START:END`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let num = |x: &str| {
            x.trim()
                .parse::<f64>()
                .map_err(|_| format!("`{x}` is not a number"))
        };
        match s.split_once(':') {
            Some((a, b)) => Ok(Window {
                start: num(a)?,
                end: num(b)?,
            }),
            None => Ok(Window::until(num(s)?)),
        }
    }
}

/// Cross-attention replacement schedule: a default window and per-word windows. The
/// default is `[0, 0.8)` for every token; when parsed from a string that names only words,
/// the other tokens are replaced over every step (`[0, 1)`), as in the reference.
#[derive(Debug, Clone, PartialEq)]
pub struct CrossReplace {
    /// The steps, as fractions of the sampling process, in which targets take the source's
    /// cross-attention.
    pub default: Window,
    /// Windows of their own for the tokens of these target words.
    pub words: Vec<(String, Window)>,
}

impl Default for CrossReplace {
    fn default() -> Self {
        Self {
            default: Window::until(0.8),
            words: Vec::new(),
        }
    }
}

impl std::str::FromStr for CrossReplace {
    type Err = String;
    /// `0.8`, `0.8,tiger=0.4`, `0:0.8,tiger=0.1:0.4`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let mut out = CrossReplace {
            default: Window::until(1.0),
            words: Vec::new(),
        };
        let mut have_default = false;
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part.split_once('=') {
                Some((w, v)) => out.words.push((w.trim().to_string(), v.parse()?)),
                None => {
                    out.default = part.parse()?;
                    have_default = true;
                }
            }
        }
        if !have_default && out.words.is_empty() {
            return Err(format!("cross-replace `{s}`: nothing given"));
        }
        Ok(out)
    }
}

/// Local blend: which words' attention delimits the edited region.
#[derive(Debug, Clone, PartialEq)]
pub struct BlendOptions {
    /// Words of the source prompt.
    pub source_words: Vec<String>,
    /// Words of the target prompts (each target uses those it contains).
    pub target_words: Vec<String>,
    /// Words whose attention is taken out of the mask (in any prompt).
    pub subtract: Vec<String>,
    /// Threshold of the blend mask, in [0, 1], on attention normalized to its maximum
    /// (0.3 in the reference).
    pub threshold: f64,
    /// Threshold of the subtracted words' mask, in [0, 1] (0.3).
    pub subtract_threshold: f64,
    /// Fraction of the steps before blending starts (0.2 in the reference).
    pub start: f64,
}

impl BlendOptions {
    /// `"cat:tiger"` (source words : target words; several words separated by spaces or
    /// `+`).
    pub fn parse(s: &str) -> Result<Self> {
        let words = |x: &str| -> Vec<String> {
            x.split(|c: char| c == '+' || c.is_whitespace())
                .filter(|w| !w.is_empty())
                .map(String::from)
                .collect()
        };
        let (a, b) = s.split_once(':').unwrap_or((s, s));
        let (source_words, target_words) = (words(a), words(b));
        if source_words.is_empty() && target_words.is_empty() {
            return Err(invalid(format!(
                "blend `{s}`: expected SOURCE_WORDS:TARGET_WORDS"
            )));
        }
        Ok(Self {
            source_words,
            target_words,
            subtract: Vec::new(),
            threshold: 0.3,
            subtract_threshold: 0.3,
            start: 0.2,
        })
    }
}

/// Attention reweighting of target words: `"tiger=2"` or `"fluffy=2,cat=0.5"`.
pub fn parse_reweight(s: &str) -> Result<Vec<(String, f64)>> {
    s.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (w, v) = p
                .split_once('=')
                .ok_or_else(|| invalid(format!("reweight `{p}`: expected WORD=SCALE")))?;
            let v: f64 = v
                .trim()
                .parse()
                .map_err(|_| invalid(format!("reweight `{p}`: `{v}` is not a number")))?;
            if !v.is_finite() {
                return Err(invalid(format!("reweight `{p}`: not a finite number")));
            }
            Ok((w.trim().to_string(), v))
        })
        .collect()
}

/// Words separated by spaces, `+` or commas (e.g. a blend's words to subtract).
pub fn parse_words(s: &str) -> Vec<String> {
    s.split(|c: char| c == '+' || c == ',' || c.is_whitespace())
        .filter(|w| !w.is_empty())
        .map(String::from)
        .collect()
}

/// The fractions of the latent size with down- and up-block cross-attention layers in SD's
/// UNet (the values `EditOptions::attention_downscale` may take).
pub const ATTENTION_DOWNSCALES: [usize; 3] = [1, 2, 4];

/// The grid of the cross-attention maps at 1/`downscale` of a `latent` (h, w) grid.
pub fn attention_map_grid(latent: (usize, usize), downscale: usize) -> (usize, usize) {
    (latent.0.div_ceil(downscale), latent.1.div_ceil(downscale))
}

/// The coarsest of [`ATTENTION_DOWNSCALES`] that leaves maps of at least 8 cells a side (4,
/// the reference's 16×16, at 512 px; 1 for the 8×8 latents of 64 px models): coarser maps
/// are smoother but cannot say where a word is in a small latent.
///
/// ```
/// use nulltext::edit::attention_downscale_for;
/// assert_eq!(attention_downscale_for((64, 64)), 4); // 16×16 maps
/// assert_eq!(attention_downscale_for((32, 40)), 4); // 8×10
/// assert_eq!(attention_downscale_for((16, 16)), 2); // 8×8
/// assert_eq!(attention_downscale_for((8, 8)), 1); // 8×8
/// ```
pub fn attention_downscale_for(latent: (usize, usize)) -> usize {
    let fits = |d: &usize| {
        let (h, w) = attention_map_grid(latent, *d);
        h.min(w) >= 8
    };
    ATTENTION_DOWNSCALES
        .into_iter()
        .rev()
        .find(fits)
        .unwrap_or(1)
}

/// Everything an edit can be asked to do.
#[derive(Debug, Clone)]
pub struct EditOptions {
    /// How target cross-attention is mapped from the source's (default [`EditMode::Auto`]).
    pub mode: EditMode,
    /// When targets take the source's cross-attention (default `[0, 0.8)` of the steps).
    pub cross_replace: CrossReplace,
    /// When targets take the source's self-attention (default `[0, 0.5)` of the steps).
    pub self_replace: Window,
    /// Local blend: edit only where the named words attend; `None` (default): everywhere.
    pub blend: Option<BlendOptions>,
    /// Words of the targets and their attention scales.
    pub reweight: Vec<(String, f64)>,
    /// Self-attention is injected only in layers with at most this many query pixels;
    /// `None`: (latent/2)², i.e. every layer but the full-resolution ones.
    pub self_max_pixels: Option<usize>,
    /// SDEdit from the inverted trajectory at this fraction of the noise (no attention
    /// control); `None`: Prompt-to-Prompt.
    pub sdedit: Option<f64>,
    /// Cross-attention maps (for local blend and pictures) come from the layers at 1/this
    /// of the latent size: 1, 2 or 4 (the reference's 16×16 maps at 512 px are 4). Models
    /// with very small latents blend more precisely at 1 or 2.
    pub attention_downscale: usize,
    /// Keep the averaged cross-attention maps (for pictures).
    pub record_attention: bool,
    /// Keep every step's latents.
    pub keep_step_latents: bool,
    /// Classifier-free guidance scale; `None`: the inversion's. A direct inversion's
    /// offsets hold only for the scale it was made with, so it refuses any other.
    pub guidance: Option<f64>,
}

impl Default for EditOptions {
    fn default() -> Self {
        Self {
            mode: EditMode::Auto,
            cross_replace: CrossReplace::default(),
            self_replace: Window::until(0.5),
            blend: None,
            reweight: Vec::new(),
            self_max_pixels: None,
            attention_downscale: 4,
            sdedit: None,
            record_attention: false,
            keep_step_latents: false,
            guidance: None,
        }
    }
}

/// An edit's target and settings in words, as a batch manifest's edit and the Python module
/// give them; absent settings take `nulltext edit`'s defaults.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EditSpec {
    /// The target caption.
    pub target: String,
    /// `auto`, `replace` or `refine` ([`EditMode`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// [`CrossReplace`]: `0.8`, `0.8,tiger=0.4`, `0:0.8,tiger=0.1:0.4`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cross_replace: Option<String>,
    /// [`Window`]: `END` or `START:END`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub self_replace: Option<String>,
    /// [`BlendOptions::parse`]: `SOURCE_WORDS:TARGET_WORDS`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend: Option<String>,
    /// [`BlendOptions::threshold`]; needs `blend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend_threshold: Option<f64>,
    /// Words for [`BlendOptions::subtract`] ([`parse_words`]); needs `blend`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blend_subtract: Option<String>,
    /// [`EditOptions::attention_downscale`]: 1, 2 or 4.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_downscale: Option<usize>,
    /// [`parse_reweight`]: `WORD=SCALE,…`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reweight: Option<String>,
    /// [`EditOptions::sdedit`]: a fraction in (0, 1].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdedit: Option<f64>,
}

impl EditSpec {
    /// The library's edit options for these settings.
    pub fn options(&self) -> Result<EditOptions> {
        let bad = |what: &str, e: String| invalid(format!("{what}: {e}"));
        let mut o = EditOptions::default();
        if let Some(m) = &self.mode {
            o.mode = m.parse::<EditMode>().map_err(|e| bad("mode", e))?;
        }
        if let Some(c) = &self.cross_replace {
            o.cross_replace = c
                .parse::<CrossReplace>()
                .map_err(|e| bad("cross_replace", e))?;
        }
        if let Some(w) = &self.self_replace {
            o.self_replace = w.parse::<Window>().map_err(|e| bad("self_replace", e))?;
        }
        if let Some(b) = &self.blend {
            let mut bo = BlendOptions::parse(b)?;
            if let Some(t) = self.blend_threshold {
                // written so that NaN is refused too
                if !(0.0..=1.0).contains(&t) {
                    return Err(invalid(format!(
                        "`blend_threshold` must be in [0, 1], got {t}"
                    )));
                }
                bo.threshold = t;
            }
            if let Some(s) = &self.blend_subtract {
                bo.subtract = parse_words(s);
            }
            o.blend = Some(bo);
        } else if self.blend_subtract.is_some() {
            return Err(invalid("`blend_subtract` needs `blend`"));
        } else if self.blend_threshold.is_some() {
            return Err(invalid("`blend_threshold` needs `blend`"));
        }
        if let Some(r) = &self.reweight {
            o.reweight = parse_reweight(r)?;
        }
        if let Some(d) = self.attention_downscale {
            if !ATTENTION_DOWNSCALES.contains(&d) {
                return Err(invalid(format!(
                    "`attention_downscale` must be 1, 2 or 4, got {d}"
                )));
            }
            o.attention_downscale = d;
        }
        o.sdedit = self.sdedit;
        o.cross_replace.default.validate("cross_replace")?;
        for (w, win) in &o.cross_replace.words {
            win.validate(&format!("cross_replace {w}"))?;
        }
        o.self_replace.validate("self_replace")?;
        if let Some(s) = o.sdedit {
            if !(s > 0.0 && s <= 1.0) {
                return Err(invalid(format!("`sdedit` must be in (0, 1], got {s}")));
            }
        }
        Ok(o)
    }
}

/// The outcome of an edit: row 0 is the source reconstruction, rows 1.. the targets.
pub struct EditResult {
    /// `[B, C, h, w]`.
    pub latents: Tensor,
    /// The prompt of each row: the inversion's, then the targets.
    pub prompts: Vec<String>,
    /// The mode that ran (`Auto` resolved); with SDEdit, which controls no attention, the
    /// mode asked for.
    pub mode: EditMode,
    /// Mean cross-attention over steps, layers and heads at 1/`attention_downscale` of the
    /// latent: `[B, r_h, r_w, 77]`.
    pub attention_maps: Option<Tensor>,
    /// `[T, B, C, h, w]` on the CPU when asked for ([`EditOptions::keep_step_latents`]);
    /// SDEdit keeps only the steps it runs.
    pub step_latents: Option<Tensor>,
    /// The Prompt-to-Prompt controller after sampling (its attention store and blend
    /// trace); `None` for SDEdit.
    pub controller: Option<P2PController>,
}

impl EditResult {
    /// One picture per row of [`EditResult::attention_maps`], each token's map labelled with
    /// its text (what `nulltext edit --attention-maps` and the web app show); empty without
    /// maps.
    pub fn attention_strips(&self, tokenizer: &ClipTokenizer) -> Result<Vec<image::RgbImage>> {
        let Some(maps) = &self.attention_maps else {
            return Ok(Vec::new());
        };
        let (_, rh, rw, _) = maps.dims4()?;
        let mut strips = Vec::with_capacity(self.prompts.len());
        for (b, prompt) in self.prompts.iter().enumerate() {
            let flat: Vec<f32> = maps.get(b)?.flatten_all()?.to_vec1()?;
            let labels = tokenizer.labels(prompt);
            strips.push(crate::plot::render::attention_strip(
                &flat, rh, rw, &labels, 128,
            ));
        }
        Ok(strips)
    }
}

/// Resolves `Auto` and checks that the mode fits the prompts.
pub fn resolve_mode(mode: EditMode, source: &str, targets: &[String]) -> Result<EditMode> {
    let n = source.split(' ').count();
    let same = targets.iter().all(|t| t.split(' ').count() == n);
    match mode {
        EditMode::Auto => Ok(if same {
            EditMode::Replace
        } else {
            EditMode::Refine
        }),
        EditMode::Replace if !same => {
            let bad = targets.iter().find(|t| t.split(' ').count() != n).unwrap();
            Err(invalid(format!(
                "--mode replace needs targets with as many words as the source: \"{source}\" has {n}, \"{bad}\" has {}",
                bad.split(' ').count()
            )))
        }
        m => Ok(m),
    }
}

/// Builds the Prompt-to-Prompt controller for `source` → `targets` (the reference's
/// `make_controller`).
pub fn build_controller(
    sd: &StableDiffusion,
    source: &str,
    targets: &[String],
    opts: &EditOptions,
    num_steps: usize,
    latent_grid: (usize, usize),
) -> Result<P2PController> {
    let tok = &sd.tokenizer;
    let dev = &sd.device;
    if targets.is_empty() {
        return Err(invalid("at least one target prompt is needed"));
    }
    opts.cross_replace.default.validate("--cross-replace")?;
    if !ATTENTION_DOWNSCALES.contains(&opts.attention_downscale) {
        return Err(invalid(format!(
            "--attention-downscale must be 1, 2 or 4 (the latent scales with cross-attention \
             layers), got {}",
            opts.attention_downscale
        )));
    }
    for (w, win) in &opts.cross_replace.words {
        win.validate(&format!("--cross-replace for `{w}`"))?;
    }
    opts.self_replace.validate("--self-replace")?;
    let mode = resolve_mode(opts.mode, source, targets)?;
    let b = targets.len() + 1;

    // Cross-attention α: T+1 rows, default window for every token, then per word.
    let mut alpha = vec![vec![[0f32; MAX_LEN]; targets.len()]; num_steps + 1];
    let set = |alpha: &mut Vec<Vec<[f32; MAX_LEN]>>, win: Window, k: usize, toks: &[usize]| {
        let (s, e) = win.rows(num_steps + 1);
        for (row, a) in alpha.iter_mut().enumerate() {
            let v = if row >= s && row < e { 1.0 } else { 0.0 };
            for &t in toks {
                a[k][t] = v;
            }
        }
    };
    let all: Vec<usize> = (0..MAX_LEN).collect();
    for k in 0..targets.len() {
        set(&mut alpha, opts.cross_replace.default, k, &all);
    }
    for (word, win) in &opts.cross_replace.words {
        let mut found = false;
        for (k, t) in targets.iter().enumerate() {
            let p = align::word_positions(tok, t, &Word::Text(word.clone()));
            if !p.is_empty() {
                set(&mut alpha, *win, k, &p);
                found = true;
            }
        }
        if !found {
            return Err(invalid(format!(
                "--cross-replace names `{word}`, which is in no target prompt"
            )));
        }
    }

    let cross_map = match mode {
        EditMode::Replace => {
            let rows: Vec<f32> = targets
                .iter()
                .map(|t| align::replacement_mapper(tok, source, t))
                .collect::<Result<Vec<_>>>()?
                .into_iter()
                .flatten()
                .flatten()
                .collect();
            CrossMap::Replace(Tensor::from_vec(
                rows,
                (targets.len(), MAX_LEN, MAX_LEN),
                dev,
            )?)
        }
        EditMode::Refine => {
            let mut maps = Vec::new();
            let mut alphas = Vec::new();
            for t in targets {
                let (m, a) = align::refine_mapper(tok, source, t);
                maps.push(Tensor::from_vec(
                    m.iter().map(|x| *x as u32).collect::<Vec<_>>(),
                    MAX_LEN,
                    dev,
                )?);
                alphas.extend(a);
            }
            CrossMap::Refine {
                map: maps,
                alpha: Tensor::from_vec(alphas, (targets.len(), 1, 1, MAX_LEN), dev)?,
            }
        }
        EditMode::Auto => unreachable!("resolved above"),
    };
    let cross_map = if mode == EditMode::Replace && targets.iter().all(|t| t == source) {
        CrossMap::Identity
    } else {
        cross_map
    };

    let equalizer = if opts.reweight.is_empty() {
        None
    } else {
        for (w, v) in &opts.reweight {
            if !v.is_finite() {
                return Err(invalid(format!(
                    "--reweight `{w}={v}`: not a finite number"
                )));
            }
            if targets
                .iter()
                .all(|t| align::word_positions(tok, t, &Word::Text(w.clone())).is_empty())
            {
                return Err(invalid(format!(
                    "--reweight names `{w}`, which is in no target prompt"
                )));
            }
        }
        let mut rows = Vec::new();
        for t in targets {
            let present: Vec<(String, f64)> = opts
                .reweight
                .iter()
                .filter(|(w, _)| !align::word_positions(tok, t, &Word::Text(w.clone())).is_empty())
                .cloned()
                .collect();
            rows.push(align::equalizer(tok, t, &present)?);
        }
        Some(rows)
    };

    let blend = match &opts.blend {
        None => None,
        Some(bo) => {
            let mut words = vec![0f32; b * MAX_LEN];
            let mut sub = vec![0f32; b * MAX_LEN];
            let prompts: Vec<&str> = std::iter::once(source)
                .chain(targets.iter().map(|s| s.as_str()))
                .collect();
            for w in &bo.source_words {
                for p in align::require_word(tok, source, w)? {
                    words[p] = 1.0;
                }
            }
            for w in &bo.target_words {
                let mut found = false;
                for (k, t) in targets.iter().enumerate() {
                    for p in align::word_positions(tok, t, &Word::Text(w.clone())) {
                        words[(k + 1) * MAX_LEN + p] = 1.0;
                        found = true;
                    }
                }
                if !found {
                    return Err(invalid(format!(
                        "--blend names `{w}`, which is in no target prompt"
                    )));
                }
            }
            for w in &bo.subtract {
                let mut found = false;
                for (k, p) in prompts.iter().enumerate() {
                    for t in align::word_positions(tok, p, &Word::Text(w.clone())) {
                        sub[k * MAX_LEN + t] = 1.0;
                        found = true;
                    }
                }
                if !found {
                    return Err(invalid(format!(
                        "--blend-subtract names `{w}`, which is in no prompt"
                    )));
                }
            }
            for (name, th) in [
                ("--blend-threshold", bo.threshold),
                ("subtract threshold", bo.subtract_threshold),
            ] {
                if !(0.0..=1.0).contains(&th) {
                    return Err(invalid(format!("{name} must be in [0, 1], got {th}")));
                }
            }
            Some(LocalBlend {
                words: Tensor::from_vec(words, (b, MAX_LEN), dev)?,
                subtract: if bo.subtract.is_empty() {
                    None
                } else {
                    Some(Tensor::from_vec(sub, (b, MAX_LEN), dev)?)
                },
                threshold: (bo.threshold, bo.subtract_threshold),
                start_step: (bo.start * num_steps as f64) as usize,
            })
        }
    };
    let self_window = opts.self_replace.rows(num_steps);
    let self_max = opts
        .self_max_pixels
        .unwrap_or((latent_grid.0 / 2) * (latent_grid.1 / 2));
    let mut c = P2PController::new(
        b,
        alpha,
        cross_map,
        equalizer,
        self_window,
        self_max,
        blend,
        latent_grid,
        opts.attention_downscale,
        dev,
    )?;
    c.record_maps = opts.record_attention;
    Ok(c)
}

/// The steps SDEdit at `strength` runs of an inversion of `num_steps`: at least one.
pub fn sdedit_steps(strength: f64, num_steps: usize) -> Result<usize> {
    if !(strength > 0.0 && strength <= 1.0) {
        return Err(invalid(format!(
            "--sdedit must be in (0, 1], got {strength}"
        )));
    }
    let k = (strength * num_steps as f64) as usize;
    if k == 0 {
        return Err(invalid(format!(
            "--sdedit {strength} starts after the last of {num_steps} steps; at least {} is needed",
            1.0 / num_steps.max(1) as f64
        )));
    }
    Ok(k)
}

/// Checks an edit before any sampling: SDEdit's start, or the words and windows of
/// Prompt-to-Prompt against the prompts.
pub fn check_edit(
    sd: &StableDiffusion,
    source: &str,
    targets: &[String],
    opts: &EditOptions,
    num_steps: usize,
    latent_grid: (usize, usize),
) -> Result<()> {
    match opts.sdedit {
        Some(s) => sdedit_steps(s, num_steps).map(drop),
        None => build_controller(sd, source, targets, opts, num_steps, latent_grid).map(drop),
    }
}

/// Edits an inversion: one batch with the source prompt as row 0 and `targets` after it,
/// every row starting from z_T and using the inversion's per-step null embeddings.
/// Fails with [`crate::Error::InvalidInput`] when the options do not fit the prompts (a
/// word they name is in no prompt, a word swap between captions of different lengths, a
/// window outside [0, 1]) or a direct inversion is asked for another guidance scale; use
/// [`check_edit`] to find out before any sampling.
///
/// ```
/// use nulltext::{edit, image_io, invert_image, EditMode, EditOptions, InvertOptions, Method};
/// use nulltext::{NoProgress, StableDiffusion};
///
/// let sd = StableDiffusion::load("../../tests/fixtures/models/tiny-sd15", &Default::default())?;
/// let photo = "../../tests/fixtures/inputs/chelsea256.png".as_ref();
/// let img = image_io::load_image(photo, Default::default(), 256)?;
/// let opts = InvertOptions { method: Method::Direct, num_steps: 5, ..Default::default() };
/// let (inv, _) = invert_image(&sd, &img, "a close up photo of a cat", &opts, &mut NoProgress)?;
///
/// let targets = ["a close up photo of a dog".to_string()];
/// let res = edit(&sd, &inv, &targets, &EditOptions::default(), &mut NoProgress)?;
/// assert_eq!(res.mode, EditMode::Replace); // one word swapped
/// let images = image_io::decode_latents(&sd, &res.latents)?; // [reconstruction, dog]
/// assert_eq!(images.len(), 2);
/// # Ok::<(), nulltext::Error>(())
/// ```
pub fn edit(
    sd: &StableDiffusion,
    inv: &Inversion,
    targets: &[String],
    opts: &EditOptions,
    progress: &mut dyn Progress,
) -> Result<EditResult> {
    let ddim = Ddim::new(&inv.scheduler, inv.num_steps)?;
    let (_, _, h, w) = inv.latent_t.dims4()?;
    let guidance = edit_guidance(inv, opts.guidance)?;
    inv.check_offsets()?;
    let offsets = inv.offsets_on(&sd.device)?;
    let mut prompts = vec![inv.prompt.clone()];
    prompts.extend(targets.iter().cloned());
    let refs: Vec<&str> = prompts.iter().map(|s| s.as_str()).collect();
    let (cond, _) = sd.encode_prompts(&refs)?;
    let nulls = inv.null_embedding_list(&sd.device)?;
    let start = inv.latent_t.to_device(&sd.device)?;
    let mut step_latents = Vec::new();
    let keep = opts.keep_step_latents;
    let mut record = |_: usize, z: &Tensor| -> Result<()> {
        if keep {
            step_latents.push(z.to_device(&candle_core::Device::Cpu)?.unsqueeze(0)?);
        }
        Ok(())
    };

    if let Some(strength) = opts.sdedit {
        let k = sdedit_steps(strength, inv.num_steps)?;
        let z0 = inv.image_latent.as_ref().ok_or_else(|| {
            invalid("--sdedit needs the inversion's image latent, which this file lacks")
        })?;
        // The inverted latent at noise level k: DDIM inversion of z₀ with the source prompt.
        let source = cond.narrow(0, 1)?;
        let pivots = crate::inversion::ddim_inversion_steps(
            sd,
            &ddim,
            &z0.to_device(&sd.device)?,
            &source,
            k,
            progress,
        )?;
        let spec = SampleSpec {
            start: &pivots[k],
            cond: &cond,
            uncond: &nulls,
            guidance,
            first_step: inv.num_steps - k,
            source_offsets: offsets.as_ref(),
        };
        let latents = sample(sd, &ddim, &spec, &mut NoControl, progress, &mut record)?;
        return Ok(EditResult {
            latents,
            prompts,
            mode: opts.mode,
            attention_maps: None,
            step_latents: stack(step_latents)?,
            controller: None,
        });
    }

    let mut controller = build_controller(sd, &inv.prompt, targets, opts, inv.num_steps, (h, w))?;
    let mode = resolve_mode(opts.mode, &inv.prompt, targets)?;
    let spec = SampleSpec {
        start: &start,
        cond: &cond,
        uncond: &nulls,
        guidance,
        first_step: 0,
        source_offsets: offsets.as_ref(),
    };
    let latents = sample(sd, &ddim, &spec, &mut controller, progress, &mut record)?;
    let attention_maps = if opts.record_attention {
        match controller.store.average_maps()? {
            Some(m) => {
                let (rh, rw) = controller.store_grid;
                let b = m.dim(0)?;
                Some(m.reshape((b, rh, rw, MAX_LEN))?.to_dtype(DType::F32)?)
            }
            None => None,
        }
    } else {
        None
    };
    Ok(EditResult {
        latents,
        prompts,
        mode,
        attention_maps,
        step_latents: stack(step_latents)?,
        controller: Some(controller),
    })
}

/// The guidance scale an edit of `inv` samples with: `requested`, or the inversion's own.
pub fn edit_guidance(inv: &Inversion, requested: Option<f64>) -> Result<f64> {
    let Some(w) = requested else {
        return Ok(inv.guidance);
    };
    crate::limits::check_guidance("--guidance", w)?;
    if inv.latent_offsets.is_some() && w != inv.guidance {
        return Err(invalid(format!(
            "this direct inversion was made at guidance {}: its offsets bring the source back \
             onto the photo only at that scale. Edit at {} or invert again with --guidance {w}",
            inv.guidance, inv.guidance
        )));
    }
    Ok(w)
}

fn stack(v: Vec<Tensor>) -> Result<Option<Tensor>> {
    if v.is_empty() {
        Ok(None)
    } else {
        Ok(Some(Tensor::cat(&v, 0)?))
    }
}
