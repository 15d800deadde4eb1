use anyhow::Result;
use clap::Args;

use super::context::{Ctx, ModelArg};

#[derive(Args)]
pub struct ServeCommand {
    #[command(flatten)]
    model: ModelArg,
    #[command(flatten)]
    serve: nulltext_serve::ServeArgs,
}

pub fn run(a: ServeCommand, ctx: &Ctx) -> Result<()> {
    let sd = ctx.load(&a.model)?;
    nulltext_serve::run(sd, a.serve, ctx.cancel.clone())
}
