use anyhow::Result;
use clap::Args;

use super::context::Ctx;

#[derive(Args)]
pub struct TokensArgs {
    /// Model whose tokenizer to use (default: the bundled CLIP vocabulary).
    #[arg(long, short = 'm', env = "NULLTEXT_MODEL")]
    model: Option<String>,
    #[arg(long, short)]
    prompt: String,
    /// Machine-readable output: {"ids": [...77], "tokens": [...], "words": [...]}.
    #[arg(long)]
    json: bool,
}

pub fn run(a: TokensArgs, ctx: &Ctx) -> Result<()> {
    let tok = match &a.model {
        Some(m) => {
            let path = nulltext::models::model::resolve_model_path(m)?;
            let dir = path.join("tokenizer");
            if dir.join("vocab.json").is_file() {
                nulltext::models::ClipTokenizer::from_dir(&dir)?
            } else {
                nulltext::models::ClipTokenizer::bundled()
            }
        }
        None => nulltext::models::ClipTokenizer::bundled(),
    };
    let enc = tok.encode_padded(&a.prompt);
    let rows = tok.describe(&a.prompt);
    if a.json {
        let v = serde_json::json!({
            "ids": enc.ids,
            "tokens": rows.iter().map(|r| r.token.clone()).collect::<Vec<_>>(),
            "words": rows.iter().map(|r| r.word.as_ref().map(|w| w.1.clone())).collect::<Vec<_>>(),
            "truncated": enc.truncated,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    println!("{:>4}  {:>6}  {:<24} word", "pos", "id", "token");
    for r in rows {
        let word = match &r.word {
            Some((w, text)) => format!("{text} ({w})"),
            None if r.position == 0 => "(start)".into(),
            None => "(end)".into(),
        };
        println!("{:>4}  {:>6}  {:<24} {word}", r.position, r.id, r.token);
    }
    println!(
        "{} of 77 positions used; the rest is padding ({})",
        enc.len,
        tok.pad()
    );
    if let Some(cut) = enc.truncated {
        ctx.say(format!(
            "warning: the prompt is longer than 77 tokens; cut off: \"{cut}\""
        ));
    }
    Ok(())
}
