//! `nulltext`: invert real photos and edit them with text, using Stable Diffusion.

mod commands;
mod progress;
mod runtime;

use clap::Parser;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "nulltext",
    version,
    about = "Edit real photos with text: null-text inversion + Prompt-to-Prompt on Stable Diffusion",
    long_about = "Edit real photos with text.\n\n\
        `nulltext invert` finds the noise latent and per-step null-text embeddings from which \
        Stable Diffusion reproduces a photo (Null-text Inversion, Mokady et al. 2023); \
        `nulltext edit` then changes its caption and keeps everything else \
        (Prompt-to-Prompt). One inversion serves any number of edits."
)]
struct Cli {
    /// Compute device: auto, cpu, cuda, cuda:N, metal or metal:N.
    #[arg(long, global = true, default_value = "auto")]
    device: String,
    /// Weight precision: auto (f32 on CPU, f16 on GPUs), f32, f16 or bf16.
    #[arg(long, global = true, default_value = "auto")]
    dtype: String,
    /// No progress bars.
    #[arg(long, short, global = true)]
    quiet: bool,
    #[command(subcommand)]
    command: commands::Command,
}

fn main() {
    nulltext::runtime::configure_threads();
    let cli = Cli::parse();
    // The server idles between jobs: memory a job used goes back to the system there.
    if !matches!(cli.command, commands::Command::Serve(_)) {
        nulltext::runtime::configure_allocator();
    }
    let filter = if cli.quiet { "error" } else { "warn" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("NULLTEXT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(filter)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let execution = match nulltext::runtime::execution_from_env() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(2);
        }
    };
    let ctx = commands::Ctx {
        device: cli.device,
        dtype: cli.dtype,
        execution,
        quiet: cli.quiet,
        cancel: progress::install_ctrlc(),
        written: Default::default(),
    };
    if let Err(e) = commands::run(cli.command, &ctx) {
        if e.downcast_ref::<nulltext::Error>()
            .is_some_and(|e| matches!(e, nulltext::Error::Cancelled))
        {
            let written = ctx.written.borrow();
            if written.is_empty() {
                eprintln!("interrupted: nothing was written");
            } else {
                let names: Vec<String> = written.iter().map(|p| p.display().to_string()).collect();
                eprintln!("interrupted after writing {}", names.join(", "));
            }
            std::process::exit(130);
        }
        eprintln!("error: {e}");
        let mut src = e.source();
        let mut last = e.to_string();
        while let Some(s) = src {
            let msg = s.to_string();
            if !last.contains(&msg) {
                eprintln!("  caused by: {msg}");
            }
            last = msg;
            src = s.source();
        }
        std::process::exit(1);
    }
}

#[allow(dead_code)]
fn _assert_parser() {
    use clap::CommandFactory;
    Cli::command().debug_assert();
}

#[cfg(test)]
mod tests {
    #[test]
    fn cli_definition_is_valid() {
        super::_assert_parser();
    }
}
