//! The PIE-Bench table over one or several batch runs (one per method: ddim,
//! negative-prompt, null-text, direct…): per run, and per edit type on request, the mean
//! over the edits of each of `evaluate.py`'s metrics. A value `evaluate.py` writes as "nan"
//! (the unedited part is empty) is left out of that metric's mean, as pandas' `mean` skips
//! NaN; the table says over how many edits each mean is.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use nulltext::atomic::write_bytes_atomic;
use nulltext::error::{Error, Result};

use crate::batch::{EditOutcome, ItemResult, ERROR_FILE, RESULT_FILE};
use crate::pie_bench::{edit_type_name, Evaluated, Scores};

/// A metric of the table: its name, its column header in the paper's units, the factor
/// to those units, and where an edit's value is.
pub struct Metric {
    pub name: &'static str,
    pub header: &'static str,
    pub scale: f64,
    pub value: fn(&EditOutcome) -> Option<f64>,
}

/// PIE-Bench's columns, in its table's order.
pub const METRICS: [Metric; 7] = [
    Metric {
        name: "structure_distance",
        header: "Structure distance ×10³",
        scale: 1e3,
        value: |e| e.structure_distance,
    },
    Metric {
        name: "psnr",
        header: "PSNR",
        scale: 1.0,
        value: |e| e.background.map(|m| m.psnr).filter(|v| v.is_finite()),
    },
    Metric {
        name: "lpips",
        header: "LPIPS ×10³",
        scale: 1e3,
        value: |e| e.background_lpips,
    },
    Metric {
        name: "mse",
        header: "MSE ×10⁴",
        scale: 1e4,
        value: |e| e.background.map(|m| m.mse),
    },
    Metric {
        name: "ssim",
        header: "SSIM ×10²",
        scale: 1e2,
        value: |e| e.background.map(|m| m.ssim),
    },
    Metric {
        name: "clip_whole",
        header: "CLIP whole",
        scale: 1.0,
        value: |e| e.clip_score,
    },
    Metric {
        name: "clip_edited",
        header: "CLIP edited",
        scale: 1.0,
        value: |e| e.clip_score_edited,
    },
];

/// One row of the table.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Row {
    /// The run's folder name.
    pub run: String,
    /// The inversion method its results were made with.
    pub method: String,
    /// The edit type (with `by_edit_type`), e.g. "1 change object".
    pub edit_type: Option<String>,
    /// Items finished and failed.
    pub items: usize,
    pub failed: usize,
    /// Per metric of [`METRICS`]: the mean in the metric's own units and over how many
    /// edits (`None`: no edit has it).
    pub means: Vec<(Option<f64>, usize)>,
}

fn read_results(run: &Path) -> Result<(Vec<ItemResult>, Vec<serde_json::Value>)> {
    let items = run.join("items");
    let entries = std::fs::read_dir(&items).map_err(|e| Error::Io {
        path: items.clone(),
        source: e,
    })?;
    let mut dirs: Vec<PathBuf> = entries.flatten().map(|e| e.path()).collect();
    dirs.sort();
    let (mut results, mut failures) = (Vec::new(), Vec::new());
    for d in dirs {
        let read = |name: &str| std::fs::read_to_string(d.join(name)).ok();
        if let Some(text) = read(RESULT_FILE) {
            let r: ItemResult = serde_json::from_str(&text).map_err(|e| {
                nulltext::error::invalid(format!("{}: {e}", d.join(RESULT_FILE).display()))
            })?;
            results.push(r);
        } else if let Some(text) = read(ERROR_FILE) {
            failures.push(serde_json::from_str(&text).unwrap_or_default());
        }
    }
    Ok((results, failures))
}

fn type_label(id: Option<&str>) -> String {
    match id {
        Some(t) => match edit_type_name(t) {
            Some(name) => format!("{t} {name}"),
            None => t.to_string(),
        },
        None => "-".into(),
    }
}

/// The table over `runs` (batch `--out-dir`s); with `by_edit_type`, one row per run and
/// edit type instead of one per run.
pub fn collect(runs: &[PathBuf], by_edit_type: bool) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    for run in runs {
        let (results, failures) = read_results(run)?;
        let name = run
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| run.display().to_string());
        let mut methods: BTreeMap<&str, usize> = BTreeMap::new();
        for r in &results {
            *methods.entry(r.method.as_str()).or_default() += 1;
        }
        let method = methods
            .iter()
            .max_by_key(|(_, n)| **n)
            .map(|(m, _)| m.to_string())
            .unwrap_or_default();
        // Groups: the whole run, or each edit type.
        let mut groups: BTreeMap<Option<String>, (Vec<&ItemResult>, usize)> = BTreeMap::new();
        for r in &results {
            let key = by_edit_type.then(|| r.category.clone()).flatten();
            groups.entry(key).or_default().0.push(r);
        }
        for f in &failures {
            let key = by_edit_type
                .then(|| f["category"].as_str().map(String::from))
                .flatten();
            groups.entry(key).or_default().1 += 1;
        }
        if groups.is_empty() {
            groups.insert(None, (Vec::new(), 0));
        }
        for (key, (items, failed)) in groups {
            let values: Vec<Vec<Option<f64>>> = items
                .iter()
                .flat_map(|r| &r.edits)
                .map(|e| METRICS.iter().map(|m| (m.value)(e)).collect())
                .collect();
            let means = means(&values);
            rows.push(Row {
                run: name.clone(),
                method: method.clone(),
                edit_type: by_edit_type.then(|| type_label(key.as_deref())),
                items: items.len(),
                failed,
                means,
            });
        }
    }
    Ok(rows)
}

/// Per metric of [`METRICS`], the mean of `values` (one row per edit) without the
/// missing and NaN ones, and how many there were.
fn means(values: &[Vec<Option<f64>>]) -> Vec<(Option<f64>, usize)> {
    (0..METRICS.len())
        .map(|k| {
            let v: Vec<f64> = values
                .iter()
                .filter_map(|row| row[k])
                .filter(|v| !v.is_nan())
                .collect();
            let mean = (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
            (mean, v.len())
        })
        .collect()
}

/// The values of [`METRICS`] in `evaluate.py`'s scores of an edit.
fn score_values(s: &Scores) -> Vec<Option<f64>> {
    vec![
        s.structure_distance,
        s.psnr_unedit_part.filter(|v| v.is_finite()),
        s.lpips_unedit_part,
        s.mse_unedit_part,
        s.ssim_unedit_part,
        s.clip_similarity_target_image,
        s.clip_similarity_target_image_edit_part,
    ]
}

/// The table of entries measured by [`crate::pie_bench::evaluate_outputs`] (another tool's
/// edited images): one row named `run`, or one per edit type.
pub fn rows_from_scores(run: &str, entries: &[Evaluated], by_edit_type: bool) -> Vec<Row> {
    // Per group: each measured edit's values, and the count of failures.
    type Group = (Vec<Vec<Option<f64>>>, usize);
    let mut groups: BTreeMap<Option<String>, Group> = BTreeMap::new();
    for e in entries {
        let g = groups
            .entry(by_edit_type.then(|| e.category.clone()).flatten())
            .or_default();
        match &e.scores {
            Ok(s) => g.0.push(score_values(s)),
            Err(_) => g.1 += 1,
        }
    }
    groups
        .into_iter()
        .map(|(key, (values, failed))| Row {
            run: run.to_string(),
            method: String::new(),
            edit_type: by_edit_type.then(|| type_label(key.as_deref())),
            items: values.len(),
            failed,
            means: means(&values),
        })
        .collect()
}

fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// The table as CSV, in the metrics' own units (full precision), with each mean's count.
pub fn to_csv(rows: &[Row]) -> String {
    let mut out = String::from("run,method,edit_type,items,failed");
    for m in &METRICS {
        out += &format!(",{0},{0}_n", m.name);
    }
    out.push('\n');
    for r in rows {
        out += &format!(
            "{},{},{},{},{}",
            csv_field(&r.run),
            csv_field(&r.method),
            csv_field(r.edit_type.as_deref().unwrap_or("")),
            r.items,
            r.failed
        );
        for (mean, n) in &r.means {
            out += &format!(
                ",{},{n}",
                mean.map(|v| format!("{v:.9}")).unwrap_or_default()
            );
        }
        out.push('\n');
    }
    out
}

/// The table as Markdown, in the paper's units (structure distance ×10³, LPIPS ×10³,
/// MSE ×10⁴, SSIM ×10²); "–" where a metric was not measured.
pub fn to_markdown(rows: &[Row]) -> String {
    let by_type = rows.iter().any(|r| r.edit_type.is_some());
    let mut head = vec!["run", "method"];
    if by_type {
        head.push("edit type");
    }
    head.extend(["items", "failed"]);
    head.extend(METRICS.iter().map(|m| m.header));
    let mut out = format!("| {} |\n|{}\n", head.join(" | "), "---|".repeat(head.len()));
    for r in rows {
        let mut cells = vec![r.run.clone(), r.method.clone()];
        if by_type {
            cells.push(r.edit_type.clone().unwrap_or_default());
        }
        cells.extend([r.items.to_string(), r.failed.to_string()]);
        for (m, (mean, _)) in METRICS.iter().zip(&r.means) {
            cells.push(mean.map_or("–".into(), |v| format!("{:.2}", v * m.scale)));
        }
        out += &format!("| {} |\n", cells.join(" | "));
    }
    out
}

/// Writes `PREFIX.csv` and `PREFIX.md`.
pub fn write(rows: &[Row], prefix: &Path) -> Result<(PathBuf, PathBuf)> {
    let with = |ext: &str| {
        let mut p = prefix.as_os_str().to_owned();
        p.push(ext);
        PathBuf::from(p)
    };
    let (csv, md) = (with(".csv"), with(".md"));
    write_bytes_atomic(&csv, to_csv(rows).as_bytes())?;
    write_bytes_atomic(&md, to_markdown(rows).as_bytes())?;
    Ok((csv, md))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::ImageMetrics;

    fn result(id: &str, category: &str, background: Option<f64>) -> ItemResult {
        let m = |v: f64| ImageMetrics {
            psnr: v,
            ssim: v / 100.0,
            mse: 1.0 / v,
        };
        ItemResult {
            id: id.into(),
            prompt: "a cat".into(),
            category: Some(category.into()),
            settings: serde_json::Value::Null,
            method: "ddim".into(),
            iterations: 0,
            seconds_inversion: 0.0,
            vae: m(30.0),
            reconstruction: m(30.0),
            reconstruction_vs_vae: m(30.0),
            reconstruction_lpips: None,
            clip_score_source: None,
            edits: vec![EditOutcome {
                target: "a dog".into(),
                mode: "refine".into(),
                image: "edit-01.png".into(),
                whole: m(20.0),
                background: background.map(m),
                lpips: None,
                background_lpips: background.map(|_| 0.1),
                clip_score: Some(25.0),
                clip_score_edited: Some(20.0),
                structure_distance: None,
                seconds: 1.0,
            }],
        }
    }

    #[test]
    fn means_skip_nan_rows_and_group_by_edit_type() {
        let dir = std::env::temp_dir().join(format!("nulltext-report-{}", std::process::id()));
        let run = dir.join("null-text");
        for (r, name) in [
            (result("a", "0", Some(20.0)), "a"),
            (result("b", "0", Some(40.0)), "b"),
            (result("c", "9", None), "c"),
        ] {
            let d = run.join("items").join(name);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(RESULT_FILE), serde_json::to_string(&r).unwrap()).unwrap();
        }
        let d = run.join("items/d");
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(ERROR_FILE),
            r#"{"id": "d", "category": "9", "error": "x"}"#,
        )
        .unwrap();

        let rows = collect(std::slice::from_ref(&run), false).unwrap();
        assert_eq!(rows.len(), 1);
        let r = &rows[0];
        assert_eq!((r.run.as_str(), r.items, r.failed), ("null-text", 3, 1));
        // PSNR: the style edit has no unedited part and is left out: (20 + 40) / 2.
        assert_eq!(r.means[1], (Some(30.0), 2));
        assert_eq!(r.means[5], (Some(25.0), 3));
        assert_eq!(r.means[0], (None, 0));
        let md = to_markdown(&rows);
        assert!(
            md.contains("| null-text | ddim | 3 | 1 | – | 30.00 | 100.00 |"),
            "{md}"
        );
        assert!(to_csv(&rows).contains(",30.000000000,2,"));

        let by_type = collect(std::slice::from_ref(&run), true).unwrap();
        let labels: Vec<_> = by_type
            .iter()
            .map(|r| r.edit_type.clone().unwrap())
            .collect();
        assert_eq!(labels, ["0 random", "9 change style"]);
        assert_eq!((by_type[1].items, by_type[1].failed), (1, 1));
        assert_eq!(by_type[1].means[1], (None, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }
}
