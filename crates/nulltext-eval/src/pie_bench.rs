//! PIE-Bench (Ju et al., ICLR 2024: 700 photos, 10 edit types) as batch items, read and
//! edited as cure-lab/PnPInversion reads and edits it: `mapping_file.json` and
//! `annotation_images/`, the run-length masks decoded as `evaluate.py`'s `mask_decode`, the
//! `[` `]` markers stripped from the captions, and `run_editing_p2p.py`'s Prompt-to-Prompt
//! settings (refine controller, cross 0.4, self 0.6, local blend on `blended_word` and a
//! reweight of 2 on its target word).
//!
//! An entry that cannot be run (its image missing, its mask malformed, its edit type
//! unknown) becomes an item with a `problem`: the batch records it as failed and goes on.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use image::GrayImage;
use nulltext::atomic::write_bytes_atomic;
use nulltext::edit::EditSpec;
use nulltext::error::{invalid, Error, Result};
use nulltext::image_io::Crop;
use serde::Deserialize;

use crate::batch::{EditEntry, Item, ItemSpec, Manifest};
use crate::metrics::{compare, Mask, SsimWindow};

pub const MAPPING_FILE: &str = "mapping_file.json";
pub const IMAGES_DIR: &str = "annotation_images";
/// The side of every PIE-Bench mask (`mask_decode`'s `image_shape=[512, 512]`).
pub const MASK_SIDE: usize = 512;
/// The folder of a batch's `--out-dir` that holds the decoded masks and the manifest.
pub const IMPORT_DIR: &str = "pie-bench";

/// The edit types by `editing_type_id` (the README's table).
pub const EDIT_TYPES: [&str; 10] = [
    "random",
    "change object",
    "add object",
    "delete object",
    "change content",
    "change pose",
    "change color",
    "change material",
    "change background",
    "change style",
];

/// `run_editing_p2p.py`'s settings.
pub const CROSS_REPLACE: &str = "0.4";
pub const SELF_REPLACE: &str = "0.6";
pub const REWEIGHT: f64 = 2.0;
pub const GUIDANCE: f64 = 7.5;
pub const STEPS: usize = 50;
pub const SIZE: u32 = 512;

/// The name of edit type `id` ("0"–"9"), if known.
pub fn edit_type_name(id: &str) -> Option<&'static str> {
    let k: usize = id.parse().ok()?;
    (id == k.to_string()).then_some(())?;
    EDIT_TYPES.get(k).copied()
}

/// One entry of `mapping_file.json`.
#[derive(Debug, Clone, Deserialize)]
pub struct Entry {
    pub image_path: String,
    pub original_prompt: String,
    pub editing_prompt: String,
    #[serde(default)]
    pub editing_instruction: String,
    pub editing_type_id: String,
    #[serde(default)]
    pub blended_word: String,
    /// Run-length pairs (start, length) over the 512 × 512 pixels, row-major.
    pub mask: serde_json::Value,
}

/// A caption without PIE-Bench's `[` `]` markers of the words that differ.
pub fn strip_markers(caption: &str) -> String {
    caption.replace(['[', ']'], "")
}

/// Decodes a run-length mask as `mask_decode` does: 1 on each run (cut at the image's end),
/// and 1 on the outermost rows and columns ("to avoid annotation errors in boundary").
/// Row-major `side × side`, 1 = the region the edit may change. Malformed input (an odd
/// count, a value that is not a non-negative integer) is an error where Python would
/// raise or, for negative starts, silently wrap around.
///
/// ```
/// // 4 × 4: the run (5, 2) and the border.
/// let m = nulltext_eval::pie_bench::decode_mask(&serde_json::json!([5, 2]), 4).unwrap();
/// assert_eq!(m, [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
/// ```
pub fn decode_mask(encoded: &serde_json::Value, side: usize) -> Result<Vec<u8>> {
    let values = encoded
        .as_array()
        .ok_or_else(|| invalid("mask: expected a list of run-length pairs"))?;
    if values.len() % 2 != 0 {
        return Err(invalid(format!(
            "mask: {} numbers, expected (start, length) pairs",
            values.len()
        )));
    }
    let length = side * side;
    let mut mask = vec![0u8; length];
    for (k, pair) in values.chunks(2).enumerate() {
        let num = |v: &serde_json::Value| {
            v.as_u64().ok_or_else(|| {
                invalid(format!(
                    "mask: run {k}: `{v}` is not a non-negative integer"
                ))
            })
        };
        let (start, len) = (num(&pair[0])?, num(&pair[1])?);
        // splice_len = min(len, length − start): nothing for a start past the end.
        let end = start.saturating_add(len).min(length as u64);
        for m in mask.iter_mut().take(end as usize).skip(start as usize) {
            *m = 1;
        }
    }
    for i in 0..side {
        mask[i] = 1;
        mask[(side - 1) * side + i] = 1;
        mask[i * side] = 1;
        mask[i * side + side - 1] = 1;
    }
    Ok(mask)
}

/// The edit of an entry as `run_editing_p2p.py` runs it: the refine controller
/// (`is_replace_controller` is left False), cross 0.4, self 0.6, and with `blended_word`
/// ("SOURCE TARGET") a local blend on those words and a reweight of 2 on the target word.
pub fn edit_spec(entry: &Entry) -> Result<EditSpec> {
    let words: Vec<&str> = entry.blended_word.split(' ').collect();
    let blend = if entry.blended_word.is_empty() {
        None
    } else if words.len() >= 2 && !words[0].is_empty() && !words[1].is_empty() {
        Some((words[0], words[1]))
    } else {
        return Err(invalid(format!(
            "blended_word `{}`: expected two words, \"SOURCE TARGET\"",
            entry.blended_word
        )));
    };
    Ok(EditSpec {
        target: strip_markers(&entry.editing_prompt),
        mode: Some("refine".into()),
        cross_replace: Some(CROSS_REPLACE.into()),
        self_replace: Some(SELF_REPLACE.into()),
        blend: blend.map(|(s, t)| format!("{s}:{t}")),
        reweight: blend.map(|(_, t)| format!("{t}={REWEIGHT}")),
        ..Default::default()
    })
}

/// Reads `DIR/mapping_file.json`: the entries by key, each parsed on its own (a malformed
/// entry is that entry's error).
pub fn read_mapping(dir: &Path) -> Result<BTreeMap<String, Result<Entry>>> {
    let path = dir.join(MAPPING_FILE);
    let text = std::fs::read_to_string(&path).map_err(|e| Error::Io {
        path: path.clone(),
        source: e,
    })?;
    let raw: BTreeMap<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| invalid(format!("{}: {e}", path.display())))?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let e = serde_json::from_value::<Entry>(v).map_err(|e| invalid(e.to_string()));
            (k, e)
        })
        .collect())
}

fn valid_key(k: &str) -> bool {
    !k.is_empty()
        && k.len() <= 128
        && !k.starts_with('.')
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Which edit types to take: `None` for all.
pub fn parse_edit_types(s: &str) -> Result<Vec<String>> {
    s.split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(|t| match edit_type_name(t) {
            Some(_) => Ok(t.to_string()),
            None => Err(invalid(format!(
                "edit type `{t}`: PIE-Bench's are 0–9 ({})",
                EDIT_TYPES
                    .iter()
                    .enumerate()
                    .map(|(i, n)| format!("{i} {n}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))),
        })
        .collect()
}

/// The PIE-Bench in `dir` as batch items: every entry (of `edit_types`, if given; entries
/// whose type is unknown are always kept, as failures), in key order. Each mask is decoded
/// to `out/pie-bench/masks/KEY.png` (white = the edited region) and the runnable items are
/// written to `out/pie-bench/manifest.jsonl`, a manifest `nulltext batch` reads as well.
pub fn import(dir: &Path, out: &Path, edit_types: Option<&[String]>) -> Result<Manifest> {
    let mapping = read_mapping(dir)?;
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |e| Error::Io { path, source: e }
    };
    // Absolute paths: the manifest and the results name the same files from anywhere.
    let dir = &dir.canonicalize().map_err(io(dir))?;
    let mask_dir = out.join(IMPORT_DIR).join("masks");
    std::fs::create_dir_all(&mask_dir).map_err(io(&mask_dir))?;
    let mask_dir = mask_dir.canonicalize().map_err(io(&mask_dir))?;
    let import_dir = mask_dir.parent().unwrap_or(&mask_dir).to_path_buf();
    let mut items = Vec::new();
    let mut lines = vec![format!(
        "# PIE-Bench {} imported by nulltext: run_editing_p2p.py's settings; masks: white = edited region",
        dir.display()
    )];
    for (n, (key, entry)) in mapping.into_iter().enumerate() {
        let type_id = entry.as_ref().ok().map(|e| e.editing_type_id.clone());
        let known = type_id.as_deref().and_then(edit_type_name).is_some();
        if let (Some(types), Some(t), true) = (edit_types, &type_id, known) {
            if !types.contains(t) {
                continue;
            }
        }
        let id = if valid_key(&key) {
            key.clone()
        } else {
            format!("entry-{n:04}")
        };
        let mut spec = ItemSpec {
            id: Some(id.clone()),
            image: PathBuf::new(),
            prompt: String::new(),
            edits: Vec::new(),
            mask: None,
            crop: None,
            category: type_id.clone(),
        };
        let problem = (|| -> Result<()> {
            if !valid_key(&key) {
                return Err(invalid(format!(
                    "key `{key}`: expected letters, digits, `.`, `_` or `-`"
                )));
            }
            let entry = entry.as_ref().map_err(|e| invalid(e.to_string()))?;
            if !known {
                return Err(invalid(format!(
                    "editing_type_id `{}`: PIE-Bench's are 0–9",
                    entry.editing_type_id
                )));
            }
            spec.image = dir.join(IMAGES_DIR).join(&entry.image_path);
            spec.prompt = strip_markers(&entry.original_prompt);
            if !spec.image.is_file() {
                return Err(invalid(format!("{}: no such image", spec.image.display())));
            }
            spec.edits = vec![EditEntry::Spec(edit_spec(entry)?)];
            let mask = decode_mask(&entry.mask, MASK_SIDE)?;
            let path = mask_dir.join(format!("{id}.png"));
            write_mask_png(&mask, MASK_SIDE, &path)?;
            spec.mask = Some(path);
            Ok(())
        })()
        .err()
        .map(|e| e.to_string());
        match &problem {
            None => {
                lines.push(serde_json::to_string(&spec).map_err(|e| invalid(e.to_string()))?);
            }
            Some(p) => lines.push(format!("# {key}: {p}")),
        }
        items.push(Item {
            index: items.len(),
            id,
            image: spec.image.clone(),
            mask: spec.mask.clone(),
            crop: Crop::default(),
            spec,
            problem,
        });
    }
    if items.is_empty() {
        return Err(invalid(format!(
            "{}: no entries{}",
            dir.join(MAPPING_FILE).display(),
            if edit_types.is_some() {
                " of those edit types"
            } else {
                ""
            }
        )));
    }
    let manifest_path = import_dir.join("manifest.jsonl");
    write_bytes_atomic(&manifest_path, (lines.join("\n") + "\n").as_bytes())?;
    Ok(Manifest {
        path: manifest_path,
        items,
    })
}

/// Writes a 0/1 mask as a grayscale PNG (0 / 255).
pub fn write_mask_png(mask: &[u8], side: usize, path: &Path) -> Result<()> {
    let img = GrayImage::from_fn(side as u32, side as u32, |x, y| {
        image::Luma([mask[y as usize * side + x as usize] * 255])
    });
    let mut bytes = Vec::new();
    img.write_to(
        &mut std::io::Cursor::new(&mut bytes),
        image::ImageFormat::Png,
    )
    .map_err(|e| Error::Image {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })?;
    write_bytes_atomic(path, &bytes)
}

/// The networks of the metrics that need one; each is optional.
#[derive(Default)]
pub struct Networks<'a> {
    pub lpips: Option<&'a crate::lpips::Lpips>,
    pub clip: Option<&'a nulltext_models::clip_score::ClipScorer>,
    pub structure: Option<&'a crate::structure::StructureDistance>,
}

/// `evaluate.py`'s metrics of one edit, under its names; `None` where it writes "nan" (an
/// empty part) or the metric's network was not given.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct Scores {
    pub structure_distance: Option<f64>,
    pub psnr_unedit_part: Option<f64>,
    pub lpips_unedit_part: Option<f64>,
    pub mse_unedit_part: Option<f64>,
    pub ssim_unedit_part: Option<f64>,
    pub clip_similarity_source_image: Option<f64>,
    pub clip_similarity_target_image: Option<f64>,
    pub clip_similarity_target_image_edit_part: Option<f64>,
}

/// Measures `edited` against `source` as `evaluate.py` does: `region` is the decoded mask
/// (1 = edited); the unedited part's metrics multiply both images by its complement and
/// compare them whole; SSIM with `ssim` ([`SsimWindow::Gaussian`] for the published
/// numbers).
pub fn score(
    nets: &Networks,
    source: &image::RgbImage,
    edited: &image::RgbImage,
    region: &Mask,
    captions: (&str, &str),
    ssim: SsimWindow,
) -> Result<Scores> {
    let background = region.complement();
    let has = |m: &Mask| m.weights().iter().any(|&w| w != 0.0);
    let mut s = Scores::default();
    if has(&background) {
        let m = compare(source, edited, Some(&background), ssim)?;
        (s.psnr_unedit_part, s.mse_unedit_part, s.ssim_unedit_part) =
            (Some(m.psnr), Some(m.mse), Some(m.ssim));
        if let Some(l) = nets.lpips {
            s.lpips_unedit_part = Some(l.distance(source, edited, Some(&background))?);
        }
    }
    if let Some(d) = nets.structure {
        s.structure_distance = Some(d.distance(source, edited, None)?);
    }
    if let Some(c) = nets.clip {
        use crate::clip_score::clip_score;
        s.clip_similarity_source_image = Some(clip_score(c, source, captions.0, None)?);
        s.clip_similarity_target_image = Some(clip_score(c, edited, captions.1, None)?);
        if has(region) {
            s.clip_similarity_target_image_edit_part =
                Some(clip_score(c, edited, captions.1, Some(region))?);
        }
    }
    Ok(s)
}

/// An image as `evaluate.py` measures it: one wider or taller than `side` is cut to its last
/// `side` × `side` square (PnPInversion saves caption, source, reconstruction and edit side
/// by side).
pub fn last_square(img: image::RgbImage, side: u32) -> image::RgbImage {
    let (w, h) = img.dimensions();
    if (w == side && h == side) || w < side || h < side {
        return img;
    }
    image::imageops::crop_imm(&img, w - side, h - side, side, side).to_image()
}

/// One entry measured by [`evaluate_outputs`].
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub key: String,
    pub category: Option<String>,
    /// The scores, or why the entry could not be measured.
    pub scores: std::result::Result<Scores, String>,
}

/// `evaluate.py` over another tool's edited images: `outputs` laid out like
/// `annotation_images/` (`output/METHOD/annotation_images` of PnPInversion's scripts), each
/// measured against the benchmark's photo with its decoded mask and captions. Entries of
/// `edit_types` (all if `None`) in key order; `progress` is told each key.
pub fn evaluate_outputs(
    dir: &Path,
    outputs: &Path,
    nets: &Networks,
    ssim: SsimWindow,
    edit_types: Option<&[String]>,
    mut progress: impl FnMut(&str),
) -> Result<Vec<Evaluated>> {
    let mut out = Vec::new();
    for (key, entry) in read_mapping(dir)? {
        let category = entry.as_ref().ok().map(|e| e.editing_type_id.clone());
        if let (Some(types), Some(t)) = (edit_types, &category) {
            if !types.contains(t) {
                continue;
            }
        }
        progress(&key);
        let scores = (|| -> Result<Scores> {
            let entry = entry.map_err(|e| invalid(e.to_string()))?;
            let src = nulltext::image_io::read_rgb(&dir.join(IMAGES_DIR).join(&entry.image_path))?;
            let tgt = nulltext::image_io::read_rgb(&outputs.join(&entry.image_path))?;
            let tgt = last_square(tgt, MASK_SIDE as u32);
            let mask = decode_mask(&entry.mask, MASK_SIDE)?;
            let side = MASK_SIDE as u32;
            let gray = GrayImage::from_fn(side, side, |x, y| {
                image::Luma([mask[(y * side + x) as usize] * 255])
            });
            let region = Mask::from_gray(&gray, false);
            let captions = (
                strip_markers(&entry.original_prompt),
                strip_markers(&entry.editing_prompt),
            );
            score(nets, &src, &tgt, &region, (&captions.0, &captions.1), ssim)
        })()
        .map_err(|e| e.to_string());
        out.push(Evaluated {
            key,
            category,
            scores,
        });
    }
    Ok(out)
}

/// `evaluate.py`'s result file for one method: `file_id` and a `NAME|metric` column per
/// metric, "nan" where it writes "nan" (and where a metric was not measured).
pub fn evaluate_py_csv(name: &str, entries: &[Evaluated]) -> String {
    const NAMES: [&str; 8] = [
        "structure_distance",
        "psnr_unedit_part",
        "lpips_unedit_part",
        "mse_unedit_part",
        "ssim_unedit_part",
        "clip_similarity_source_image",
        "clip_similarity_target_image",
        "clip_similarity_target_image_edit_part",
    ];
    let mut out = String::from("file_id");
    for n in NAMES {
        out += &format!(",{name}|{n}");
    }
    out.push('\n');
    for e in entries {
        out += &e.key;
        let v = match &e.scores {
            Ok(s) => vec![
                s.structure_distance,
                s.psnr_unedit_part,
                s.lpips_unedit_part,
                s.mse_unedit_part,
                s.ssim_unedit_part,
                s.clip_similarity_source_image,
                s.clip_similarity_target_image,
                s.clip_similarity_target_image_edit_part,
            ],
            Err(_) => vec![None; NAMES.len()],
        };
        for x in v {
            out += &x.map_or(",nan".to_string(), |x| format!(",{x}"));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn masks_decode_as_mask_decode() {
        // A 4×4 image: run (5, 2) → pixels 5, 6; run (14, 9) is cut at 16; (20, 3) is past
        // the end. The border is set either way.
        let m = decode_mask(&json!([5, 2, 14, 9, 20, 3]), 4).unwrap();
        assert_eq!(m, vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1]);
        let inner = decode_mask(&json!([]), 4).unwrap();
        assert_eq!(inner.iter().filter(|&&v| v == 0).count(), 4);
        for bad in [
            json!([1, 2, 3]),
            json!([-1, 2]),
            json!([1.5, 2]),
            json!({"a": 1}),
        ] {
            assert!(decode_mask(&bad, 4).is_err(), "{bad}");
        }
    }

    #[test]
    fn entries_become_run_editing_p2p_edits() {
        let e: Entry = serde_json::from_value(json!({
            "image_path": "0_random_140/000000000000.jpg",
            "original_prompt": "a slanted mountain bicycle on the road",
            "editing_prompt": "a slanted [rusty] mountain bicycle on the road",
            "editing_instruction": "Make the frame of the bike rusty",
            "editing_type_id": "0",
            "blended_word": "bicycle bicycle",
            "mask": [],
        }))
        .unwrap();
        let s = edit_spec(&e).unwrap();
        assert_eq!(s.target, "a slanted rusty mountain bicycle on the road");
        assert_eq!(s.mode.as_deref(), Some("refine"));
        assert_eq!(s.blend.as_deref(), Some("bicycle:bicycle"));
        assert_eq!(s.reweight.as_deref(), Some("bicycle=2"));
        let o = s.options().unwrap();
        assert_eq!(o.reweight, vec![("bicycle".to_string(), 2.0)]);
        let plain = Entry {
            blended_word: String::new(),
            ..e.clone()
        };
        let s = edit_spec(&plain).unwrap();
        assert!(s.blend.is_none() && s.reweight.is_none());
        let bad = Entry {
            blended_word: "bicycle".into(),
            ..e
        };
        assert!(edit_spec(&bad).is_err());
        assert_eq!(edit_type_name("9"), Some("change style"));
        assert_eq!(edit_type_name("10"), None);
        assert_eq!(edit_type_name("01"), None);
        assert!(parse_edit_types("0, 9").is_ok());
        assert!(parse_edit_types("0,12").is_err());
    }
}
