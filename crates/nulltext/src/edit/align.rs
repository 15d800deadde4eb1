//! Token bookkeeping of Prompt-to-Prompt (the reference's `seq_aligner.py` and
//! `get_word_inds`): which tokens a word owns, the word-swap mapping matrix and the
//! global alignment used to refine a prompt.

use nulltext_models::tokenizer::MAX_LEN;
use nulltext_models::ClipTokenizer;

use crate::error::{invalid, Result};

/// A word of a prompt: by its text (every occurrence) or by its index in `prompt.split(' ')`.
#[derive(Debug, Clone, PartialEq)]
pub enum Word {
    /// Every word of `prompt.split(' ')` equal to this text (case and punctuation count).
    Text(String),
    /// The word at this index of `prompt.split(' ')`.
    Index(usize),
}

/// Token positions (1-based, 0 is the start token) of `word` in `prompt`; empty if the
/// word does not occur. Tokens beyond the 77-token window are dropped.
pub fn word_positions(tok: &ClipTokenizer, prompt: &str, word: &Word) -> Vec<usize> {
    let per_word = tok.word_token_positions(prompt);
    let words: Vec<&str> = prompt.split(' ').collect();
    let mut out: Vec<usize> = match word {
        Word::Text(w) => words
            .iter()
            .zip(&per_word)
            .filter(|(x, _)| *x == w)
            .flat_map(|(_, p)| p.iter().copied())
            .collect(),
        Word::Index(i) => per_word.get(*i).cloned().unwrap_or_default(),
    };
    out.retain(|p| *p < MAX_LEN);
    out
}

/// Like [`word_positions`] for a word given as text, but an error naming the word and the
/// prompt when it does not occur.
pub fn require_word(tok: &ClipTokenizer, prompt: &str, word: &str) -> Result<Vec<usize>> {
    let p = word_positions(tok, prompt, &Word::Text(word.to_string()));
    if p.is_empty() {
        let words: Vec<&str> = prompt.split(' ').collect();
        return Err(invalid(format!(
            "the word `{word}` is not in the prompt \"{prompt}\" (its words: {})",
            words.join(", ")
        )));
    }
    Ok(p)
}

/// The 77×77 word-swap matrix M with `A_target ≈ A_source · M`, for prompts with the same
/// number of words. Words that differ map their source tokens onto their target tokens
/// (weight split evenly when the token counts differ); every other source token i maps to
/// its target position j.
///
/// Deliberate difference from the reference `get_replacement_mapper_`: after the last
/// swapped word the reference writes `mapper[j, j]`, which is wrong as soon as a swapped
/// word changes the token count (source and target positions are then offset). Here it is
/// `mapper[i, j]`, as before that word.
pub fn replacement_mapper(
    tok: &ClipTokenizer,
    source: &str,
    target: &str,
) -> Result<Vec<[f32; MAX_LEN]>> {
    let wx: Vec<&str> = source.split(' ').collect();
    let wy: Vec<&str> = target.split(' ').collect();
    if wx.len() != wy.len() {
        return Err(invalid(format!(
            "word swap (replace) needs prompts with the same number of words: \"{source}\" has {}, \"{target}\" has {} (use refine for added words)",
            wx.len(),
            wy.len()
        )));
    }
    let changed: Vec<usize> = (0..wx.len()).filter(|&i| wx[i] != wy[i]).collect();
    let src: Vec<Vec<usize>> = changed
        .iter()
        .map(|&i| word_positions(tok, source, &Word::Index(i)))
        .collect();
    let tgt: Vec<Vec<usize>> = changed
        .iter()
        .map(|&i| word_positions(tok, target, &Word::Index(i)))
        .collect();
    for (k, &w) in changed.iter().enumerate() {
        if src[k].is_empty() || tgt[k].is_empty() {
            return Err(invalid(format!(
                "the swapped word `{}` → `{}` falls outside the 77-token window",
                wx[w], wy[w]
            )));
        }
    }
    let mut m = vec![[0f32; MAX_LEN]; MAX_LEN];
    let (mut i, mut j, mut cur) = (0usize, 0usize, 0usize);
    while i < MAX_LEN && j < MAX_LEN {
        if cur < src.len() && src[cur][0] == i {
            let (s, t) = (&src[cur], &tgt[cur]);
            if s.len() == t.len() {
                for (a, b) in s.iter().zip(t) {
                    m[*a][*b] = 1.0;
                }
            } else {
                let ratio = 1.0 / t.len() as f32;
                for a in s {
                    for b in t {
                        m[*a][*b] = ratio;
                    }
                }
            }
            cur += 1;
            i += s.len();
            j += t.len();
        } else {
            m[i][j] = 1.0;
            i += 1;
            j += 1;
        }
    }
    Ok(m)
}

/// Global (Needleman–Wunsch) alignment of two token sequences, match +1, mismatch −1,
/// gap 0, ties broken left, then up, then diagonal as the reference does. Returns for each
/// token of `y` the aligned position in `x`, or `None` for an inserted token.
pub fn align(x: &[u32], y: &[u32]) -> Vec<Option<usize>> {
    let (n, m) = (x.len(), y.len());
    let mut score = vec![vec![0i64; m + 1]; n + 1];
    let mut trace = vec![vec![0u8; m + 1]; n + 1];
    for (j, t) in trace[0].iter_mut().enumerate().skip(1) {
        *t = 1;
        let _ = j;
    }
    for row in trace.iter_mut().skip(1) {
        row[0] = 2;
    }
    trace[0][0] = 4;
    for i in 1..=n {
        for j in 1..=m {
            let left = score[i][j - 1];
            let up = score[i - 1][j];
            let diag = score[i - 1][j - 1] + if x[i - 1] == y[j - 1] { 1 } else { -1 };
            let best = left.max(up).max(diag);
            score[i][j] = best;
            trace[i][j] = if best == left {
                1
            } else if best == up {
                2
            } else {
                3
            };
        }
    }
    let mut out = vec![None; m];
    let (mut i, mut j) = (n, m);
    while i > 0 || j > 0 {
        match trace[i][j] {
            3 => {
                i -= 1;
                j -= 1;
                out[j] = Some(i);
            }
            1 => {
                j -= 1;
                out[j] = None;
            }
            2 => i -= 1,
            _ => break,
        }
    }
    out
}

/// The refine mapping of the reference (`get_mapper`): for each of the 77 target
/// positions, the source position its attention comes from, and whether it has one
/// (α = 0 for new tokens). Positions past the target's tokens map to themselves.
pub fn refine_mapper(tok: &ClipTokenizer, source: &str, target: &str) -> (Vec<usize>, Vec<f32>) {
    let mut x = tok.encode(source);
    let mut y = tok.encode(target);
    x.truncate(MAX_LEN);
    y.truncate(MAX_LEN);
    let aligned = align(&x, &y);
    let mut mapper: Vec<usize> = (0..MAX_LEN).collect();
    let mut alphas = vec![1f32; MAX_LEN];
    for (j, a) in aligned.iter().enumerate() {
        match a {
            Some(i) => mapper[j] = *i,
            None => {
                // The reference stores −1 (the last token) with α = 0: any index will do.
                mapper[j] = MAX_LEN - 1;
                alphas[j] = 0.0;
            }
        }
    }
    (mapper, alphas)
}

/// Per-token attention scale: 1 everywhere but at the tokens of the given words.
pub fn equalizer(
    tok: &ClipTokenizer,
    prompt: &str,
    words: &[(String, f64)],
) -> Result<[f32; MAX_LEN]> {
    let mut eq = [1f32; MAX_LEN];
    for (w, v) in words {
        for p in require_word(tok, prompt, w)? {
            eq[p] = *v as f32;
        }
    }
    Ok(eq)
}
