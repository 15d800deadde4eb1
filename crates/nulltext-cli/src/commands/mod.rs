//! One module per subcommand; each parses its arguments and calls the library.

mod batch;
mod bench;
mod context;
mod demo;
mod edit;
mod eval;
mod generate;
mod info;
mod invert;
mod plot;
mod random_model;
mod reconstruct;
mod report;
mod serve;
mod tokens;
mod train;

use anyhow::Result;
use clap::Subcommand;

pub use context::Ctx;

#[derive(Subcommand)]
pub enum Command {
    /// Invert the bundled photo with the bundled tiny model and edit it (run from the
    /// repository root).
    Demo(demo::DemoArgs),
    /// Invert a photo: find z_T and per-step null-text embeddings that reproduce it.
    Invert(invert::InvertArgs),
    /// Edit an inverted photo by changing its caption (Prompt-to-Prompt).
    Edit(edit::EditArgs),
    /// Invert, edit and evaluate every item of a JSON-lines manifest (resumable, shardable).
    Batch(batch::BatchArgs),
    /// PSNR, SSIM and MSE of images against a reference, whole or under a mask.
    Eval(eval::EvalArgs),
    /// Draw reconstruction quality against optimization iterations (the paper's Figure 4)
    /// from traces written by `invert --trace`.
    Plot(plot::PlotArgs),
    /// Sample an inversion back without edits.
    Reconstruct(reconstruct::ReconstructArgs),
    /// The PIE-Bench table (CSV and Markdown) over batch runs, one row per method.
    Report(report::ReportArgs),
    /// A local web app and HTTP API: invert and edit photos as jobs.
    Serve(serve::ServeCommand),
    /// Plain text-to-image: the smoke test of a model.
    Generate(generate::GenerateArgs),
    /// Show how a prompt is tokenized and which word each token belongs to.
    Tokens(tokens::TokensArgs),
    /// Show what was detected about a model.
    Info(info::InfoArgs),
    /// Write a Stable Diffusion model with random weights (for benchmarks and tests).
    RandomModel(random_model::RandomModelArgs),
    /// Time every stage (UNet, null-text iteration, VAE, text encoder, edit step).
    Bench(bench::BenchArgs),
    /// Train the small shapes model from scratch (VAE, then UNet and text encoder) on
    /// generated scenes; resumable.
    Train(train::TrainArgs),
}

pub fn run(cmd: Command, ctx: &Ctx) -> Result<()> {
    match cmd {
        Command::Demo(a) => demo::run(a, ctx),
        Command::Invert(a) => invert::run(a, ctx),
        Command::Edit(a) => edit::run(a, ctx),
        Command::Batch(a) => batch::run(a, ctx),
        Command::Eval(a) => eval::run(a, ctx),
        Command::Plot(a) => plot::run(a, ctx),
        Command::Reconstruct(a) => reconstruct::run(a, ctx),
        Command::Report(a) => report::run(a, ctx),
        Command::Serve(a) => serve::run(a, ctx),
        Command::Generate(a) => generate::run(a, ctx),
        Command::Tokens(a) => tokens::run(a, ctx),
        Command::Info(a) => info::run(a, ctx),
        Command::RandomModel(a) => random_model::run(a, ctx),
        Command::Bench(a) => bench::run(a, ctx),
        Command::Train(a) => train::run(a, ctx),
    }
}
