//! The CLIP BPE tokenizer, as transformers' `CLIPTokenizer` runs it for Stable Diffusion.
//!
//! Normalization (NFC, runs of whitespace → one space, lower case), the CLIP
//! pre-tokenization regex, byte-level mapping, BPE with the `</w>` end-of-word suffix, and
//! 77 ids with start, end and padding. The vocabulary comes from the model's
//! `tokenizer/vocab.json` + `merges.txt`; the openai/clip-vit-large-patch14 files are
//! bundled as a fallback.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::error::{Error, Result};

pub const START_OF_TEXT: &str = "<|startoftext|>";
pub const END_OF_TEXT: &str = "<|endoftext|>";
/// Sequence length of Stable Diffusion's text encoders.
pub const MAX_LEN: usize = 77;

pub(crate) const BUNDLED_VOCAB: &str = include_str!("../assets/clip/vocab.json");
pub(crate) const BUNDLED_MERGES: &str = include_str!("../assets/clip/merges.txt");
/// CLIP uses the first 49152 − 256 − 2 merges of its merges file.
const NUM_MERGES: usize = 49152 - 256 - 2;

/// The ids of one prompt, padded to [`MAX_LEN`], and what truncation removed.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoding {
    /// Exactly `MAX_LEN` ids: start, the prompt's tokens, end, padding.
    pub ids: Vec<u32>,
    /// Number of ids before padding (start and end included).
    pub len: usize,
    /// The text of the tokens cut off to fit `MAX_LEN`, if any were.
    pub truncated: Option<String>,
}

/// One position of an encoded prompt (see [`ClipTokenizer::describe`]).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenInfo {
    pub position: usize,
    pub id: u32,
    /// The vocabulary entry (`</w>` marks a word's end).
    pub token: String,
    /// The prompt's word (index among the space-separated words, and the word) this token
    /// belongs to; `None` for the start and end tokens.
    pub word: Option<(usize, String)>,
}

/// Words whose BPE tokens are kept (a few MB at most).
const MAX_CACHED_WORDS: usize = 4096;

pub struct ClipTokenizer {
    encoder: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    ranks: HashMap<(String, String), usize>,
    pattern: Regex,
    byte_encoder: [char; 256],
    byte_decoder: HashMap<char, u8>,
    /// BPE results by word, at most [`MAX_CACHED_WORDS`].
    cache: Mutex<HashMap<String, Vec<u32>>>,
    bos: u32,
    eos: u32,
    pad: u32,
    /// The padding token's text where it is an ordinary token (`!` for SD 2.x and SDXL's
    /// second tokenizer): transformers then treats it as a special token, split out of
    /// the text before BPE, so a prompt's `!` becomes the padding id.
    pad_text: Option<String>,
}

/// GPT-2's reversible byte → printable-unicode map.
fn bytes_to_unicode() -> [char; 256] {
    let mut printable: Vec<u32> = (b'!' as u32..=b'~' as u32)
        .chain(0xA1..=0xAC)
        .chain(0xAE..=0xFF)
        .collect();
    let mut chars = printable.clone();
    let mut n = 0;
    for b in 0..256u32 {
        if !printable.contains(&b) {
            printable.push(b);
            chars.push(256 + n);
            n += 1;
        }
    }
    let mut table = [' '; 256];
    for (b, c) in printable.iter().zip(chars) {
        table[*b as usize] = char::from_u32(c).expect("valid char");
    }
    table
}

impl ClipTokenizer {
    /// The openai/clip-vit-large-patch14 vocabulary (SD 1.x), padding with `<|endoftext|>`.
    pub fn bundled() -> Self {
        Self::from_strs(BUNDLED_VOCAB, BUNDLED_MERGES, None).expect("bundled tokenizer")
    }

    /// The bundled vocabulary padding with `pad` (SD 2.x pads with `!`, id 0).
    pub fn bundled_with_pad(pad: &str) -> Self {
        Self::from_strs(BUNDLED_VOCAB, BUNDLED_MERGES, Some(pad)).expect("bundled tokenizer")
    }

    /// Reads `vocab.json`, `merges.txt` and, if present, the padding token from
    /// `special_tokens_map.json` / `tokenizer_config.json` of a tokenizer folder.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let read = |name: &str| {
            let p = dir.join(name);
            std::fs::read_to_string(&p).map_err(|e| Error::io(p, e))
        };
        let vocab = read("vocab.json")?;
        let merges = read("merges.txt")?;
        let pad = ["special_tokens_map.json", "tokenizer_config.json"]
            .iter()
            .find_map(|f| pad_token_of(&dir.join(f)));
        Self::from_strs(&vocab, &merges, pad.as_deref()).map_err(|e| match e {
            Error::Tokenizer(msg) => Error::Config {
                path: dir.to_path_buf(),
                msg,
            },
            e => e,
        })
    }

    pub fn from_strs(vocab: &str, merges: &str, pad_token: Option<&str>) -> Result<Self> {
        let encoder: HashMap<String, u32> = serde_json::from_str(vocab)
            .map_err(|e| Error::Tokenizer(format!("vocab.json: {e}")))?;
        let decoder = encoder.iter().map(|(k, v)| (*v, k.clone())).collect();
        let mut ranks = HashMap::new();
        for (i, line) in merges
            .lines()
            .skip(1)
            .filter(|l| !l.is_empty())
            .take(NUM_MERGES)
            .enumerate()
        {
            let (a, b) = line
                .split_once(' ')
                .ok_or_else(|| Error::Tokenizer(format!("merges.txt line {}: `{line}`", i + 2)))?;
            ranks.insert((a.to_string(), b.to_string()), i);
        }
        let id = |t: &str| {
            encoder
                .get(t)
                .copied()
                .ok_or_else(|| Error::Tokenizer(format!("vocab.json lacks `{t}`")))
        };
        let bos = id(START_OF_TEXT)?;
        let eos = id(END_OF_TEXT)?;
        let pad = match pad_token {
            Some(t) => id(t)?,
            None => eos,
        };
        let pad_text =
            pad_token.filter(|t| ![START_OF_TEXT, END_OF_TEXT].contains(t) && !t.is_empty());
        let byte_encoder = bytes_to_unicode();
        let byte_decoder = byte_encoder
            .iter()
            .enumerate()
            .map(|(b, c)| (*c, b as u8))
            .collect();
        let pattern = Regex::new(
            r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|\p{L}+|\p{N}|[^\s\p{L}\p{N}]+",
        )
        .expect("valid regex");
        Ok(Self {
            encoder,
            decoder,
            ranks,
            pattern,
            byte_encoder,
            byte_decoder,
            cache: Mutex::new(HashMap::new()),
            bos,
            eos,
            pad,
            pad_text: pad_text.map(String::from),
        })
    }

    pub fn bos(&self) -> u32 {
        self.bos
    }
    pub fn eos(&self) -> u32 {
        self.eos
    }
    pub fn pad(&self) -> u32 {
        self.pad
    }
    pub fn vocab_size(&self) -> usize {
        self.encoder.len()
    }

    /// The normalization of the `tokenizers` backend: NFC, whitespace runs → " ", lower case.
    pub fn normalize(text: &str) -> String {
        let nfc: String = text.nfc().collect();
        let mut out = String::with_capacity(nfc.len());
        let mut in_space = false;
        for c in nfc.chars() {
            if c.is_whitespace() {
                if !in_space {
                    out.push(' ');
                }
                in_space = true;
            } else {
                in_space = false;
                out.extend(c.to_lowercase());
            }
        }
        out
    }

    fn bpe(&self, word: &str) -> Vec<u32> {
        if let Some(ids) = self.cache.lock().unwrap().get(word) {
            return ids.clone();
        }
        let mut parts: Vec<String> = word
            .as_bytes()
            .iter()
            .map(|b| self.byte_encoder[*b as usize].to_string())
            .collect();
        if let Some(last) = parts.last_mut() {
            last.push_str("</w>");
        }
        while parts.len() > 1 {
            let best = parts
                .windows(2)
                .enumerate()
                .filter_map(|(i, w)| {
                    self.ranks
                        .get(&(w[0].clone(), w[1].clone()))
                        .map(|r| (*r, i))
                })
                .min();
            let Some((_, _)) = best else { break };
            let (a, b) = {
                let i = best.unwrap().1;
                (parts[i].clone(), parts[i + 1].clone())
            };
            // Merge every occurrence of the best pair, left to right.
            let mut merged = Vec::with_capacity(parts.len());
            let mut i = 0;
            while i < parts.len() {
                if i + 1 < parts.len() && parts[i] == a && parts[i + 1] == b {
                    merged.push(format!("{a}{b}"));
                    i += 2;
                } else {
                    merged.push(parts[i].clone());
                    i += 1;
                }
            }
            parts = merged;
        }
        let ids: Vec<u32> = parts
            .iter()
            .map(|p| self.encoder.get(p).copied().unwrap_or(self.eos))
            .collect();
        let mut cache = self.cache.lock().unwrap();
        // Bounded: a server tokenizes whatever words its clients send. Starting over when
        // full keeps the common words cached and costs one miss each.
        if cache.len() >= MAX_CACHED_WORDS {
            cache.clear();
        }
        cache.insert(word.to_string(), ids.clone());
        ids
    }

    /// Token ids of `text` without start/end tokens, padding or truncation.
    pub fn encode_content(&self, text: &str) -> Vec<u32> {
        let norm = Self::normalize(text);
        let mut ids = Vec::new();
        let Some(pad) = &self.pad_text else {
            self.encode_words(&norm, &mut ids);
            return ids;
        };
        for (i, part) in norm.split(pad.as_str()).enumerate() {
            if i > 0 {
                ids.push(self.pad);
            }
            self.encode_words(part, &mut ids);
        }
        ids
    }

    /// Appends the ids of normalized text without the padding token.
    fn encode_words(&self, norm: &str, ids: &mut Vec<u32>) {
        for m in self.pattern.find_iter(norm) {
            match m.as_str() {
                START_OF_TEXT => ids.push(self.bos),
                END_OF_TEXT => ids.push(self.eos),
                piece => ids.extend(self.bpe(piece)),
            }
        }
    }

    /// `[start, tokens…, end]`, unpadded and untruncated (transformers' `encode`).
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut ids = vec![self.bos];
        ids.extend(self.encode_content(text));
        ids.push(self.eos);
        ids
    }

    /// The 77 ids the text encoder sees. Prompts longer than 75 tokens are truncated (and a
    /// warning is logged naming what was cut), as transformers does with `truncation=True`.
    pub fn encode_padded(&self, text: &str) -> Encoding {
        let content = self.encode_content(text);
        let keep = MAX_LEN - 2;
        let truncated = (content.len() > keep).then(|| self.decode(&content[keep..]));
        let mut ids = vec![self.bos];
        ids.extend(content.iter().take(keep));
        ids.push(self.eos);
        let len = ids.len();
        ids.resize(MAX_LEN, self.pad);
        if let Some(cut) = &truncated {
            tracing::warn!("prompt is longer than {MAX_LEN} tokens; cut off: \"{cut}\"");
        }
        Encoding {
            ids,
            len,
            truncated,
        }
    }

    /// The vocabulary entry of an id (byte-level characters, with `</w>`).
    pub fn token(&self, id: u32) -> Option<&str> {
        self.decoder.get(&id).map(|s| s.as_str())
    }

    /// Decodes ids to text: bytes restored, `</w>` → space, trimmed (transformers'
    /// `decode` for this tokenizer). Invalid UTF-8 becomes U+FFFD.
    pub fn decode(&self, ids: &[u32]) -> String {
        let mut bytes = Vec::new();
        for id in ids {
            let Some(tok) = self.decoder.get(id) else {
                continue;
            };
            let tok = tok.replace("</w>", " ");
            for c in tok.chars() {
                match self.byte_decoder.get(&c) {
                    Some(b) => bytes.push(*b),
                    None => bytes.extend(c.to_string().as_bytes()),
                }
            }
        }
        String::from_utf8_lossy(&bytes).trim().to_string()
    }

    /// For each word of `text` split on single spaces (as Prompt-to-Prompt splits), the
    /// positions of its tokens in the encoded sequence (1-based: 0 is the start token).
    ///
    /// Walks the decoded tokens, accumulating their lengths until a word is covered: the
    /// reference implementation's `get_word_inds`.
    pub fn word_token_positions(&self, text: &str) -> Vec<Vec<usize>> {
        let words: Vec<&str> = text.split(' ').collect();
        let content = self.encode_content(text);
        let pieces: Vec<String> = content
            .iter()
            .map(|id| self.decode(&[*id]).trim_matches('#').to_string())
            .collect();
        let mut out = vec![Vec::new(); words.len()];
        let (mut cur_len, mut ptr) = (0usize, 0usize);
        for (i, piece) in pieces.iter().enumerate() {
            if ptr >= words.len() {
                break;
            }
            cur_len += piece.chars().count();
            out[ptr].push(i + 1);
            if cur_len >= words[ptr].chars().count() {
                ptr += 1;
                cur_len = 0;
            }
        }
        out
    }

    /// Every used position of `text`'s encoding (start, tokens, end) with its token's text
    /// and the word it belongs to: what `nulltext tokens` shows.
    pub fn describe(&self, text: &str) -> Vec<TokenInfo> {
        let enc = self.encode_padded(text);
        let words: Vec<&str> = text.split(' ').collect();
        let per_word = self.word_token_positions(text);
        (0..enc.len)
            .map(|position| {
                let id = enc.ids[position];
                let word = per_word
                    .iter()
                    .position(|p| p.contains(&position))
                    .map(|w| (w, words[w].to_string()));
                TokenInfo {
                    position,
                    id,
                    token: self.token(id).unwrap_or("?").to_string(),
                    word,
                }
            })
            .collect()
    }

    /// The text of each used position of `text`'s encoding, as attention maps are labelled:
    /// `<start>`, each token decoded, `<end>`.
    pub fn labels(&self, text: &str) -> Vec<(usize, String)> {
        let enc = self.encode_padded(text);
        (0..enc.len)
            .map(|i| match i {
                0 => (i, "<start>".to_string()),
                _ if i + 1 == enc.len => (i, "<end>".to_string()),
                _ => (i, self.decode(&[enc.ids[i]])),
            })
            .collect()
    }

    /// Token positions of every occurrence of `word` (an exact space-separated word).
    pub fn word_positions(&self, text: &str, word: &str) -> Vec<usize> {
        let words: Vec<&str> = text.split(' ').collect();
        let per_word = self.word_token_positions(text);
        words
            .iter()
            .zip(per_word)
            .filter(|(w, _)| **w == word)
            .flat_map(|(_, p)| p)
            .collect()
    }
}

fn pad_token_of(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    match v.get("pad_token")? {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(o) => o.get("content")?.as_str().map(String::from),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bundled_basics() {
        let t = ClipTokenizer::bundled();
        assert_eq!(
            t.encode("a photo of a cat"),
            vec![49406, 320, 1125, 539, 320, 2368, 49407]
        );
        assert_eq!(t.decode(&[320, 1125, 539, 320, 2368]), "a photo of a cat");
        let e = t.encode_padded("");
        assert_eq!(e.len, 2);
        assert_eq!(e.ids.len(), MAX_LEN);
        assert!(e.ids[1..].iter().all(|i| *i == 49407));
    }

    #[test]
    fn word_positions_follow_the_reference() {
        let t = ClipTokenizer::bundled();
        assert_eq!(
            t.word_positions("a close up photo of a cat", "cat"),
            vec![7]
        );
        assert_eq!(
            t.word_positions("a close up photo of a cat", "a"),
            vec![1, 6]
        );
        assert_eq!(
            t.word_positions("a close-up photo, of a CAT!", "photo,"),
            vec![5, 6]
        );
        assert_eq!(
            t.word_positions("a hippopotamus and a cat", "hippopotamus"),
            vec![2, 3, 4]
        );
        assert!(t.word_positions("a cat", "dog").is_empty());
    }

    /// Every new word a client sends is cached: the cache stays bounded, and a word
    /// tokenizes the same before and after it is dropped from it.
    #[test]
    fn cache_is_bounded() {
        let t = ClipTokenizer::bundled();
        // Distinct words of letters only (digits are split off as words of their own).
        let word = |mut i: usize| {
            let mut w = String::from("zq");
            while i > 0 {
                w.push((b'a' + (i % 26) as u8) as char);
                i /= 26;
            }
            w
        };
        let first = t.encode("zqxjkv");
        for i in 0..3 * MAX_CACHED_WORDS {
            t.encode(&word(i));
            assert!(t.cache.lock().unwrap().len() <= MAX_CACHED_WORDS);
        }
        assert_eq!(t.encode("zqxjkv"), first);
    }
}
