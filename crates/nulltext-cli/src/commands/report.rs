use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use nulltext_eval::report;

use super::context::Ctx;

#[derive(Args)]
pub struct ReportArgs {
    /// Batch output folders (--out-dir), one per method, e.g. runs/ddim runs/null-text.
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// Writes OUT.csv and OUT.md (default: print the Markdown table only).
    #[arg(long)]
    out: Option<PathBuf>,
    /// One row per run and PIE-Bench edit type.
    #[arg(long)]
    by_edit_type: bool,
}

pub fn run(a: ReportArgs, ctx: &Ctx) -> Result<()> {
    let rows = report::collect(&a.runs, a.by_edit_type)?;
    print!("{}", report::to_markdown(&rows));
    if let Some(prefix) = &a.out {
        let (csv, md) = report::write(&rows, prefix)?;
        ctx.say(format!("wrote {} and {}", csv.display(), md.display()));
    }
    Ok(())
}
