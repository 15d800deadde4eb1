//! The evaluation's charts, described for [`nulltext_plot`]: the paper's Figure 4 and
//! quality per compute from inversion traces. A new chart is one more function here that
//! fills in a [`Chart`].

use std::path::Path;

use nulltext::atomic::write_bytes_atomic;
use nulltext::error::Result;
use nulltext_plot::{Chart, Format, Series, PALETTE};

use crate::trace::Trace;

/// Writes `chart` as PNG or SVG, by `path`'s extension, atomically.
pub fn save(chart: &Chart, path: &Path) -> Result<()> {
    let bytes = chart.render(Format::from_path(path)?)?;
    write_bytes_atomic(path, &bytes)
}

/// A method's place in the legend and its colour, the same in every figure.
pub fn method_style(method: &str) -> (usize, [u8; 3]) {
    let (order, color) = match method {
        "null-text" => (0, PALETTE[2]),
        "null-text-global" => (1, PALETTE[0]),
        "negative-prompt" => (2, PALETTE[1]),
        "ddim" => (3, PALETTE[3]),
        "direct" => (4, PALETTE[4]),
        _ => (5, PALETTE[5]),
    };
    (order, color)
}

/// The setting of a figure's traces for its title, " (model, size, steps, w)", from the
/// first trace; empty without traces.
fn setting(traces: &[Trace]) -> String {
    traces.first().map_or(String::new(), |t| {
        let name = Path::new(&t.model)
            .file_name()
            .map_or(t.model.clone(), |n| n.to_string_lossy().into_owned());
        format!(
            " ({name}, {} px, {} steps, w = {})",
            t.size, t.steps, t.guidance
        )
    })
}

/// What the PSNR of a Figure 4 is measured against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Against {
    /// The input image (the paper's choice), with the VAE round trip as the upper bound.
    #[default]
    Input,
    /// The VAE round trip of the input: how much of what the VAE can represent is recovered
    /// (for models whose VAE does not reproduce photos, such as random test models).
    Vae,
}

/// Figure 4 from traces: x = null-text iterations (all steps), y = reconstruction PSNR, one
/// line per method; methods without optimization (and, against the input, the VAE round
/// trip: the upper bound) as dashed reference lines.
pub fn figure4(traces: &[Trace], against: Against) -> Chart {
    let title = format!("Reconstruction vs. optimization{}", setting(traces));
    let y_label = match against {
        Against::Input => "PSNR vs input (dB)",
        Against::Vae => "PSNR vs VAE round trip (dB)",
    };
    let mut chart = Chart::new(title, "null-text iterations (all steps)", y_label);
    let mut traces: Vec<&Trace> = traces.iter().collect();
    traces.sort_by_key(|t| method_style(&t.method).0);
    for t in &traces {
        let psnr = |p: &crate::trace::TracePoint| match against {
            Against::Input => p.psnr,
            Against::Vae => p.psnr_vs_vae,
        };
        let color = method_style(&t.method).1;
        // An exact reconstruction (infinite PSNR against the VAE round trip) has no place
        // on the axis.
        let finite: Vec<_> = t.points.iter().filter(|p| psnr(p).is_finite()).collect();
        let series = match finite.as_slice() {
            [] => continue,
            [p] if p.budget == 0 => Series::reference(&t.method, psnr(p)),
            points => Series::line(
                &t.method,
                points
                    .iter()
                    .map(|p| (p.iterations as f64, psnr(p)))
                    .collect(),
            )
            .markers(),
        };
        chart = chart.series(series.color(color));
    }
    if let (Some(t), Against::Input) = (traces.first(), against) {
        chart = chart.series(
            Series::reference("VAE round trip (upper bound)", t.vae_psnr).color(PALETTE[7]),
        );
    }
    chart
}

/// The compute a quality-per-compute chart puts on its x axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// UNet evaluations of one latent, forward or backward.
    UnetPasses,
    /// Wall-clock seconds of the inversion.
    Seconds,
}

/// The quality a quality-per-compute chart puts on its y axis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// The reconstruction's PSNR.
    Reconstruction(Against),
    /// The PSNR of an edit made from the inversion, outside the region it may change
    /// (traces made with `invert --trace-edit`).
    EditBackground,
}

/// Quality per compute from traces: one line per method through its budgets (methods that
/// optimize nothing are one point), x = what the inversion cost (log scale), y = how well
/// it reconstructs, or how well an edit made from it keeps what it should not change.
pub fn quality_per_compute(traces: &[Trace], x: Compute, y: Quality) -> Chart {
    let (title, y_label) = match y {
        Quality::Reconstruction(Against::Input) => ("Reconstruction", "PSNR vs input (dB)"),
        Quality::Reconstruction(Against::Vae) => ("Reconstruction", "PSNR vs VAE round trip (dB)"),
        Quality::EditBackground => ("Edit", "edit's PSNR outside the edited region (dB)"),
    };
    let x_label = match x {
        Compute::UnetPasses => "UNet passes of the inversion (forward or backward)",
        Compute::Seconds => "seconds of the inversion",
    };
    let mut chart = Chart::new(
        format!("{title} per compute{}", setting(traces)),
        x_label,
        y_label,
    )
    .log_x();
    let vae_psnr = traces.first().map(|t| t.vae_psnr);
    let mut traces: Vec<&Trace> = traces.iter().collect();
    traces.sort_by_key(|t| method_style(&t.method).0);
    for t in traces {
        let mut points: Vec<(f64, f64)> = t
            .points
            .iter()
            .filter_map(|p| {
                let cost = match x {
                    Compute::UnetPasses => p.unet_passes as f64,
                    Compute::Seconds => p.seconds,
                };
                let quality = match y {
                    Quality::Reconstruction(Against::Input) => Some(p.psnr),
                    Quality::Reconstruction(Against::Vae) => Some(p.psnr_vs_vae),
                    Quality::EditBackground => p.edit_background_psnr,
                };
                quality.filter(|q| q.is_finite()).map(|q| (cost, q))
            })
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        if !points.is_empty() {
            let series = Series::line(&t.method, points).markers();
            chart = chart.series(series.color(method_style(&t.method).1));
        }
    }
    if let (Some(vae), Quality::Reconstruction(Against::Input)) = (vae_psnr, y) {
        chart =
            chart.series(Series::reference("VAE round trip (upper bound)", vae).color(PALETTE[7]));
    }
    chart
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trace::TracePoint;

    fn trace(method: &str, points: &[(usize, usize, f64)]) -> Trace {
        Trace {
            method: method.into(),
            prompt: "a cat".into(),
            model: "models/tiny".into(),
            size: 64,
            steps: 50,
            guidance: 7.5,
            early_stop: 1e-5,
            vae_psnr: 30.0,
            points: points
                .iter()
                .map(|&(budget, iterations, psnr)| TracePoint {
                    budget,
                    iterations,
                    psnr,
                    ssim: 0.9,
                    psnr_vs_vae: psnr + 1.0,
                    latent_mse: 0.0,
                    final_losses: vec![],
                    seconds: iterations as f64 / 10.0 + 1.0,
                    unet_passes: 50 + 2 * iterations,
                    edit_background_psnr: (iterations > 0).then_some(psnr - 2.0),
                })
                .collect(),
            edit_target: Some("a dog".into()),
        }
    }

    #[test]
    fn figure4_has_a_line_per_method_and_references() {
        let traces = [
            trace("ddim", &[(0, 0, 18.0)]),
            trace("null-text", &[(1, 50, 20.0), (2, 100, 21.0)]),
        ];
        let c = figure4(&traces, Against::Input);
        let labels: Vec<_> = c
            .series
            .iter()
            .map(|s| (s.label.as_str(), s.reference))
            .collect();
        assert_eq!(
            labels,
            [
                ("null-text", false),
                ("ddim", true),
                ("VAE round trip (upper bound)", true)
            ]
        );
        assert_eq!(c.series[0].points, [(50.0, 20.0), (100.0, 21.0)]);
        assert!(c.title.contains("tiny, 64 px, 50 steps, w = 7.5"));
        let c = figure4(&traces, Against::Vae);
        assert_eq!(c.series.len(), 2);
        assert_eq!(c.series[1].points[0].1, 19.0);
    }

    #[test]
    fn quality_per_compute_puts_every_method_at_its_cost() {
        let traces = [
            trace("null-text", &[(2, 100, 21.0), (1, 50, 20.0)]),
            trace("ddim", &[(0, 0, 18.0)]),
        ];
        let c = quality_per_compute(
            &traces,
            Compute::UnetPasses,
            Quality::Reconstruction(Against::Input),
        );
        assert_eq!(c.series[0].label, "null-text");
        // sorted by cost, whatever the budgets' order
        assert_eq!(c.series[0].points, [(150.0, 20.0), (250.0, 21.0)]);
        // a method without optimization is one point at its own cost, not a reference line
        assert_eq!(c.series[1].points, [(50.0, 18.0)]);
        assert!(!c.series[1].reference && c.series[1].markers);
        assert!(c.series[2].reference, "the VAE's bound");
        let c = quality_per_compute(&traces, Compute::Seconds, Quality::EditBackground);
        assert_eq!(c.series[0].points, [(6.0, 18.0), (11.0, 19.0)]);
        // the DDIM trace has no edit: no series rather than a made-up point
        assert_eq!(c.series.len(), 1);
        assert!(c.render(nulltext_plot::Format::Svg).is_ok());
    }
}
