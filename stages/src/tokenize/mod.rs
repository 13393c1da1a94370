//! The tokenize stage: records -> template -> token ids + loss mask -> binary shards.
//!
//! Entry points: [`TextTokenizer::load`], then [`tokenize_records`] with
//! [`TokenizeOptions`]; the trainer reads the result with [`TokenShards`].

// Errors may wrap a records parse error carrying a source line for miette; they are
// built only on the cold error path, so their size does not matter.
#![allow(clippy::result_large_err)]

mod shards;
mod tokenizer;

use std::path::{Path, PathBuf};

use miette::Diagnostic;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

pub use shards::{Example, ShardIndex, ShardInfo, TokenShards, INDEX_FORMAT};
pub use tokenizer::{Span, TextTokenizer, EOS_CANDIDATES};

use crate::records::Record;
use crate::templates::{Template, TemplateError, TemplateSpec};

/// Which tokens are loss targets.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum LossOn {
    /// Only the response part (and EOS).
    #[default]
    Response,
    /// Every token except BOS.
    All,
}

/// Options for [`tokenize_records`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct TokenizeOptions {
    /// The template that turns records into text.
    pub template: TemplateSpec,
    /// Longest example / packed sequence, in tokens; longer examples are truncated.
    pub max_length: usize,
    /// Which tokens are loss targets.
    pub loss_on: LossOn,
    /// Prepend BOS (when the tokenizer has one).
    pub add_bos: bool,
    /// Append EOS so the model learns to stop.
    pub add_eos: bool,
    /// Concatenate consecutive short examples into sequences of up to `max_length`
    /// (greedy, in record order). Examples are separated only by their EOS; there is no
    /// block-diagonal attention mask, as in most packed fine-tuning setups.
    pub pack: bool,
    /// Start a new shard once a shard would exceed this many tokens.
    pub shard_max_tokens: u64,
    /// EOS token (by text) overriding the tokenizer's own; needed for a tokenizer.json
    /// without one of `<|endoftext|>`, `</s>`, `<eos>`, `<|end_of_text|>`
    /// ([`EOS_CANDIDATES`]).
    pub eos_token: Option<String>,
    /// BOS token (by text) overriding the tokenizer's own.
    pub bos_token: Option<String>,
    /// Records set aside for a held-out loss (the `held_out` output), chosen by content hash
    /// so the choice depends on the records, not their order; 0 holds none out.
    pub held_out: usize,
}

impl Default for TokenizeOptions {
    fn default() -> Self {
        Self {
            template: TemplateSpec::default(),
            max_length: 1024,
            loss_on: LossOn::Response,
            add_bos: false,
            add_eos: true,
            pack: false,
            shard_max_tokens: 16 << 20,
            eos_token: None,
            bos_token: None,
            held_out: 0,
        }
    }
}

/// What a tokenize run did.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TokenizeStats {
    /// Records in.
    pub records: u64,
    /// Sequences written (fewer than records when packing).
    pub examples: u64,
    /// Tokens written.
    pub tokens: u64,
    /// Tokens that are loss targets (mask 1).
    pub loss_tokens: u64,
    /// Tokens masked out of the loss (mask 0: prompt, BOS).
    pub masked_tokens: u64,
    /// Records cut to `max_length`.
    pub truncated: u64,
    /// `truncated / records`.
    pub truncation_rate: f64,
    /// Records whose response had no tokens left after truncation (kept, but they
    /// contribute no loss under `loss_on = "response"`).
    pub no_loss_records: u64,
    /// Longest record in tokens, before truncation.
    pub max_record_tokens: u64,
    /// Mean record length in tokens, before truncation.
    pub mean_record_tokens: f64,
    /// Shard files written.
    pub shards: u64,
}

/// Errors from tokenization.
#[derive(Debug, thiserror::Error, Diagnostic)]
pub enum TokenizeError {
    /// A file could not be read or written.
    #[error("cannot access {path}")]
    #[diagnostic(
        code(pipeline::tokenize::io),
        help("check the path and its permissions")
    )]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// The tokenizer could not be loaded or used.
    #[error("tokenizer {path}: {message}")]
    #[diagnostic(
        code(pipeline::tokenize::tokenizer),
        help("pass a Hugging Face tokenizer.json or a GGUF file with byte-level BPE metadata")
    )]
    Tokenizer {
        /// The tokenizer file.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// The template is invalid or a record does not fit it.
    #[error("{location}: template error")]
    #[diagnostic(code(pipeline::tokenize::template))]
    Template {
        /// The record (or `template` for a bad spec).
        location: String,
        /// The template error.
        #[source]
        #[diagnostic_source]
        source: TemplateError,
    },
    /// The options are inconsistent.
    #[error("invalid tokenize options: {0}")]
    #[diagnostic(code(pipeline::tokenize::options))]
    Options(String),
    /// The input records could not be read.
    #[error(transparent)]
    #[diagnostic(transparent)]
    Records(#[from] crate::records::RecordsError),
    /// A shard directory is malformed.
    #[error("token shards {path}: {message}")]
    #[diagnostic(
        code(pipeline::tokenize::shard),
        help("the shards are corrupt or from another version; re-run the tokenize stage")
    )]
    Shard {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

/// One record tokenized: ids, mask, and whether it was truncated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenizedExample {
    /// Token ids.
    pub ids: Vec<u32>,
    /// 1 where the token is a loss target.
    pub mask: Vec<u8>,
    /// Length before truncation.
    pub full_len: usize,
}

/// Tokenizes one rendered prompt/response pair.
///
/// The text is encoded in one piece (not prompt and response separately) so the ids are
/// exactly what the model sees at inference; a token is a response token when it ends
/// past the prompt, so a token straddling the boundary counts as response.
pub fn tokenize_example(
    tok: &TextTokenizer,
    prompt: &str,
    response: &str,
    opts: &TokenizeOptions,
) -> Result<TokenizedExample, TokenizeError> {
    let text = format!("{prompt}{response}");
    let (body, offsets) = tok.encode_with_offsets(&text)?;
    let mut ids = Vec::with_capacity(body.len() + 2);
    let mut mask = Vec::with_capacity(body.len() + 2);
    if opts.add_bos {
        if let Some(b) = tok.bos_id {
            ids.push(b);
            mask.push(0);
        }
    }
    for (id, (_, end)) in body.iter().zip(offsets) {
        ids.push(*id);
        mask.push(match opts.loss_on {
            LossOn::All => 1,
            LossOn::Response => u8::from(end > prompt.len()),
        });
    }
    if opts.add_eos {
        let eos = tok.eos_id.ok_or_else(|| TokenizeError::Tokenizer {
            path: tok.source.clone(),
            message: "add_eos is set but the tokenizer has no EOS token; set eos_token".into(),
        })?;
        ids.push(eos);
        mask.push(1);
    }
    let full_len = ids.len();
    ids.truncate(opts.max_length);
    mask.truncate(opts.max_length);
    Ok(TokenizedExample {
        ids,
        mask,
        full_len,
    })
}

/// The whole stage on files: reads `records_jsonl`, loads the tokenizer at `tokenizer`
/// (`.gguf` or `tokenizer.json`, with `opts.eos_token` / `opts.bos_token` overrides), and
/// writes shards to `out_dir`.
pub fn tokenize_file(
    records_jsonl: &Path,
    tokenizer: &Path,
    opts: &TokenizeOptions,
    out_dir: &Path,
) -> Result<TokenizeStats, TokenizeError> {
    let records = crate::records::read_records(records_jsonl)?;
    let tok = TextTokenizer::load(
        tokenizer,
        opts.eos_token.as_deref(),
        opts.bos_token.as_deref(),
    )?;
    tokenize_records(&records, &tok, opts, out_dir)
}

/// Renders every record with `opts.template` and tokenizes it ([`tokenize_example`]), in
/// parallel over records (rayon's pool), results in input order. This is the CPU-heavy part
/// of [`tokenize_records`], public so benchmarks time exactly what the stage runs.
pub fn tokenize_all(
    records: &[Record],
    tok: &TextTokenizer,
    opts: &TokenizeOptions,
) -> Result<Vec<TokenizedExample>, TokenizeError> {
    let template =
        Template::from_spec(&opts.template).map_err(|source| TokenizeError::Template {
            location: "template".into(),
            source,
        })?;
    records
        .par_iter()
        .map(|r| {
            let rendered = template
                .render(r)
                .map_err(|source| TokenizeError::Template {
                    location: r.provenance.to_string(),
                    source,
                })?;
            tokenize_example(tok, &rendered.prompt, &rendered.response, opts)
        })
        .collect()
}

/// Tokenizes `records` with `opts.template`, writes shards and `index.json` to `out_dir`,
/// and returns the stats (also stored in the index).
pub fn tokenize_records(
    records: &[Record],
    tok: &TextTokenizer,
    opts: &TokenizeOptions,
    out_dir: &Path,
) -> Result<TokenizeStats, TokenizeError> {
    if opts.max_length < 2 {
        return Err(TokenizeError::Options(format!(
            "max_length must be at least 2, got {}",
            opts.max_length
        )));
    }
    let examples = tokenize_all(records, tok, opts)?;

    let mut stats = TokenizeStats {
        records: records.len() as u64,
        ..Default::default()
    };
    let mut total_full = 0u64;
    let mut writer = shards::ShardWriter::new(out_dir, opts.shard_max_tokens)?;
    let mut pack_ids: Vec<u32> = Vec::new();
    let mut pack_mask: Vec<u8> = Vec::new();
    for ex in &examples {
        total_full += ex.full_len as u64;
        stats.max_record_tokens = stats.max_record_tokens.max(ex.full_len as u64);
        stats.truncated += u64::from(ex.full_len > ex.ids.len());
        let loss = ex.mask.iter().map(|m| u64::from(*m)).sum::<u64>();
        stats.no_loss_records += u64::from(loss == 0);
        stats.loss_tokens += loss;
        stats.tokens += ex.ids.len() as u64;
        if opts.pack {
            if !pack_ids.is_empty() && pack_ids.len() + ex.ids.len() > opts.max_length {
                writer.push(&pack_ids, &pack_mask)?;
                stats.examples += 1;
                pack_ids.clear();
                pack_mask.clear();
            }
            pack_ids.extend_from_slice(&ex.ids);
            pack_mask.extend_from_slice(&ex.mask);
        } else {
            writer.push(&ex.ids, &ex.mask)?;
            stats.examples += 1;
        }
    }
    if !pack_ids.is_empty() {
        writer.push(&pack_ids, &pack_mask)?;
        stats.examples += 1;
    }
    let shard_infos = writer.finish()?;
    stats.masked_tokens = stats.tokens - stats.loss_tokens;
    // An empty held-out set (`held_out = 0`) is a valid, empty artifact: rates of nothing are 0.
    let per_record = |x: f64| {
        if stats.records == 0 {
            0.0
        } else {
            x / stats.records as f64
        }
    };
    stats.truncation_rate = per_record(stats.truncated as f64);
    stats.mean_record_tokens = per_record(total_full as f64);
    stats.shards = shard_infos.len() as u64;
    let index = ShardIndex {
        format: INDEX_FORMAT.into(),
        version: 1,
        vocab_size: tok.vocab_size() as u64,
        eos_id: tok.eos_id.filter(|_| opts.add_eos),
        bos_id: tok.bos_id.filter(|_| opts.add_bos),
        max_length: opts.max_length as u64,
        shards: shard_infos,
        stats: stats.clone(),
    };
    let path = out_dir.join("index.json");
    crate::json::write_json(&path, &index).map_err(|e| TokenizeError::Io {
        path: path.clone(),
        source: std::io::Error::other(e),
    })?;
    Ok(stats)
}

/// Splits `records` into (training, held-out): the `held_out` records with the smallest
/// BLAKE3 hash of their fields, so the choice depends on what the records hold, not on their
/// order or on a seed; both parts keep the input order. Errors when nothing would be left to
/// train on.
pub fn split_held_out(
    records: &[Record],
    held_out: usize,
) -> Result<(Vec<Record>, Vec<Record>), TokenizeError> {
    if held_out >= records.len() {
        return Err(TokenizeError::Options(format!(
            "held_out = {held_out} leaves nothing to train on: there are {} records",
            records.len()
        )));
    }
    let mut by_hash: Vec<(blake3::Hash, usize)> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            // Serialising a map of JSON values cannot fail.
            let text = serde_json::to_vec(&r.fields).unwrap_or_default();
            (blake3::hash(&text), i)
        })
        .collect();
    by_hash.sort_by(|a, b| a.0.as_bytes().cmp(b.0.as_bytes()).then(a.1.cmp(&b.1)));
    let mut is_held = vec![false; records.len()];
    for &(_, i) in by_hash.iter().take(held_out) {
        is_held[i] = true;
    }
    let (held, train): (Vec<_>, Vec<_>) = records
        .iter()
        .cloned()
        .zip(is_held)
        .partition(|(_, held)| *held);
    Ok((
        train.into_iter().map(|(r, _)| r).collect(),
        held.into_iter().map(|(r, _)| r).collect(),
    ))
}
