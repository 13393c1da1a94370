//! The batched generation loop: left-padded prefill, KV-cached decoding, per-row sampling,
//! EOS and stop-sequence handling, and dropping finished rows from the batch.

use std::ops::ControlFlow;
use std::time::Instant;

use candle_core::{DType, Device, Tensor, D};
use rayon::prelude::*;

use super::sampler::{derive_seed, Sampler, SamplerError, SamplingParams};
use super::stop::find_stop;
use crate::causal_lm::{CausalLm, KvCache};

/// Settings shared by every prompt of one [`generate_batch`] call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerateConfig {
    /// Most tokens generated per sample (EOS not counted).
    pub max_new_tokens: usize,
    /// How each next token is chosen.
    pub sampling: SamplingParams,
    /// Completions per prompt (pass@k needs n >= k). Sample `j` of a prompt with seed `s` uses
    /// seed [`derive_seed`]`(s, j)`.
    pub num_samples: usize,
    /// Tokens that end a sample; they are not part of its tokens or text.
    pub eos_token_ids: Vec<u32>,
    /// Token used for left padding. Padding is masked out, so any in-vocabulary id works.
    pub pad_token_id: u32,
    /// Most sequences (prompt x sample rows) decoded together; bounds memory.
    pub max_batch_rows: usize,
    /// Prompt tokens fed to the model per prefill step. The model returns logits for every
    /// position, so this bounds that `[rows, chunk, vocab]` tensor.
    pub prefill_chunk: usize,
    /// `false` re-runs the whole sequence every step without a cache: slow, but a reference
    /// for checking a model's cache handling.
    pub use_kv_cache: bool,
    /// The dtype the KV cache stores keys and values in; `None` keeps the model's compute
    /// dtype (exact). `Some(F16)` halves the cache's memory, rounding each key and value to 11
    /// significant bits (see [`KvCache`]).
    pub kv_cache_dtype: Option<DType>,
}

impl Default for GenerateConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 256,
            sampling: SamplingParams::greedy(),
            num_samples: 1,
            eos_token_ids: Vec::new(),
            pad_token_id: 0,
            max_batch_rows: 16,
            prefill_chunk: 128,
            use_kv_cache: true,
            kv_cache_dtype: None,
        }
    }
}

/// One prompt to complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GenerateRequest {
    /// The prompt, already tokenized (with any BOS the model expects).
    pub prompt_ids: Vec<u32>,
    /// Stop sequences, matched on the decoded completion; the text is cut just before the
    /// earliest one. See [`super::stop::HUMANEVAL_STOP_SEQUENCES`].
    pub stop: Vec<String>,
    /// Base seed of this prompt's samples. Derive it from something stable (e.g. a hash of the
    /// task id) so results do not depend on batch order or composition.
    pub seed: u64,
}

/// Why a sample ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    /// A stop sequence appeared in the decoded text.
    Stop,
    /// The model produced an end-of-sequence token.
    Eos,
    /// `max_new_tokens` were generated.
    Length,
}

impl FinishReason {
    /// Its name as samples files write it (`stop`, `eos`, `length`).
    pub fn name(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Eos => "eos",
            Self::Length => "length",
        }
    }
}

/// One generated sample.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Completion {
    /// Decoded completion (prompt excluded), cut just before the earliest stop sequence.
    pub text: String,
    /// Every generated token, including those that spell the stop sequence (EOS excluded).
    pub token_ids: Vec<u32>,
    /// Why generation of this sample ended.
    pub finish_reason: FinishReason,
    /// The seed this sample's sampler was created with.
    pub seed: u64,
    /// Seconds from the start of this sample's batch (prefill included) until it finished.
    pub elapsed_secs: f64,
}

impl Completion {
    /// Generated tokens per second of this sample (0 if it took no measurable time).
    pub fn tokens_per_second(&self) -> f64 {
        if self.elapsed_secs > 0.0 {
            self.token_ids.len() as f64 / self.elapsed_secs
        } else {
            0.0
        }
    }
}

/// Throughput of one [`generate_batch`] call.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateStats {
    /// Prompt tokens fed through prefill (each distinct prompt counted once per batch).
    pub prompt_tokens: usize,
    /// Tokens generated over all samples (EOS tokens included, as they cost a step).
    pub generated_tokens: usize,
    /// Seconds spent in prefill.
    pub prefill_secs: f64,
    /// Seconds spent decoding after prefill.
    pub decode_secs: f64,
}

impl GenerateStats {
    /// Adds the counts and times of another run (a later chunk of the same generation).
    pub fn add(&mut self, other: &GenerateStats) {
        self.prompt_tokens += other.prompt_tokens;
        self.generated_tokens += other.generated_tokens;
        self.prefill_secs += other.prefill_secs;
        self.decode_secs += other.decode_secs;
    }

    /// Generated tokens per second of decoding (0 when nothing was decoded).
    pub fn decode_tokens_per_second(&self) -> f64 {
        if self.decode_secs > 0.0 {
            self.generated_tokens as f64 / self.decode_secs
        } else {
            0.0
        }
    }
}

/// Everything [`generate_batch`] produced.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct GenerateOutput {
    /// `completions[i][j]` is sample `j` of request `i`, in request order.
    pub completions: Vec<Vec<Completion>>,
    /// Timing over the whole call.
    pub stats: GenerateStats,
}

/// Why generation failed.
#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    /// A tensor operation in the model or the loop failed.
    #[error("tensor operation failed during generation: {0}")]
    Tensor(#[from] candle_core::Error),
    /// Sampling parameters are invalid, or the logits were unusable.
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    /// A prompt has no tokens, so there is nothing to predict from.
    #[error("request {0} has an empty prompt; every prompt needs at least one token (e.g. BOS)")]
    EmptyPrompt(usize),
    /// A prompt token is outside the model's vocabulary (wrong tokenizer for this model?).
    #[error(
        "request {request} has token id {token}, but the model's vocabulary has {vocab} entries; \
         was the prompt tokenized with this model's tokenizer?"
    )]
    TokenOutOfVocab {
        /// Index of the request.
        request: usize,
        /// The offending token id.
        token: u32,
        /// The model's vocabulary size.
        vocab: usize,
    },
    /// A request has an empty stop string, which would match immediately.
    #[error("request {0} has an empty stop sequence; remove it")]
    EmptyStopSequence(usize),
    /// A numeric setting is out of range.
    #[error("invalid generation setting: {0}")]
    InvalidConfig(String),
    /// The per-step observer of [`generate_batch_streaming`] asked to stop (its reader went
    /// away).
    #[error("generation was stopped by its caller")]
    Stopped,
    /// The model returned logits of an unexpected shape.
    #[error("model returned last-position logits of shape {got:?}, expected [{rows}, {vocab}]")]
    BadLogitsShape {
        /// Shape returned.
        got: Vec<usize>,
        /// Expected batch rows.
        rows: usize,
        /// Expected vocabulary size.
        vocab: usize,
    },
}

/// A token just appended to a sample, as [`generate_batch_streaming`] reports each step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NewToken {
    /// Index of the request.
    pub request: usize,
    /// Index of the sample of that request.
    pub sample: usize,
    /// The token (never an end-of-sequence token, which ends a sample without joining it).
    pub token: u32,
}

/// One sequence being decoded: sample `sample` of request `request`.
struct Row {
    request: usize,
    sample: usize,
    seed: u64,
    sampler: Sampler,
    tokens: Vec<u32>,
    prompt_len: usize,
    finished: Option<Completion>,
}

/// Generates `config.num_samples` completions for every request.
///
/// Prompts are left-padded into batches of at most `config.max_batch_rows` sequences (longest
/// first, to waste little on padding); each distinct prompt is prefilled once and its cache is
/// copied to its samples. Every sample has its own sampler seeded with
/// `derive_seed(request.seed, sample_index)`, so outputs do not depend on batch composition.
/// `decode` turns a completion's token ids into text (the tokenizer lives elsewhere); it is
/// called on the generated tokens only, after every step of a row that has stop sequences.
/// Finished rows are dropped from the batch (and the cache) before the next step.
pub fn generate_batch<M, F>(
    model: &M,
    requests: &[GenerateRequest],
    config: &GenerateConfig,
    decode: F,
) -> Result<GenerateOutput, GenerateError>
where
    M: CausalLm + ?Sized,
    F: Fn(&[u32]) -> String,
{
    generate_batch_with_progress(model, requests, config, decode, |_, _, _| {})
}

/// [`generate_batch`], calling `on_done(request_index, sample_index, &completion)` for every
/// sample as soon as the batch it was decoded in is finished (for progress reporting, or to
/// save completions incrementally).
pub fn generate_batch_with_progress<M, F, P>(
    model: &M,
    requests: &[GenerateRequest],
    config: &GenerateConfig,
    decode: F,
    on_done: P,
) -> Result<GenerateOutput, GenerateError>
where
    M: CausalLm + ?Sized,
    F: Fn(&[u32]) -> String,
    P: FnMut(usize, usize, &Completion),
{
    generate_batch_streaming(model, requests, config, decode, on_done, |_| {
        ControlFlow::Continue(())
    })
}

/// [`generate_batch_with_progress`], also calling `on_step` after every decoding step with the
/// token each still-running sample gained in it (in batch order; a sample that ended on an
/// end-of-sequence token gains none), for streaming text as it is generated. The tokens a
/// sample gains are exactly its final [`Completion::token_ids`], in order. Returning
/// [`ControlFlow::Break`] stops the whole generation with [`GenerateError::Stopped`] (the
/// reader went away).
pub fn generate_batch_streaming<M, F, P, S>(
    model: &M,
    requests: &[GenerateRequest],
    config: &GenerateConfig,
    decode: F,
    mut on_done: P,
    mut on_step: S,
) -> Result<GenerateOutput, GenerateError>
where
    M: CausalLm + ?Sized,
    F: Fn(&[u32]) -> String,
    P: FnMut(usize, usize, &Completion),
    S: FnMut(&[NewToken]) -> ControlFlow<()>,
{
    validate(model, requests, config)?;
    let mut stats = GenerateStats::default();
    let mut rows: Vec<Row> = Vec::with_capacity(requests.len() * config.num_samples);
    for (r, req) in requests.iter().enumerate() {
        for s in 0..config.num_samples {
            let seed = derive_seed(req.seed, s as u64);
            rows.push(Row {
                request: r,
                sample: s,
                seed,
                sampler: Sampler::new(config.sampling, seed)?,
                tokens: Vec::new(),
                prompt_len: req.prompt_ids.len(),
                finished: None,
            });
        }
    }
    // Longest prompts first (stable, so samples of one prompt stay adjacent) to cut padding.
    rows.sort_by_key(|r| std::cmp::Reverse(r.prompt_len));

    for chunk in rows.chunks_mut(config.max_batch_rows) {
        run_chunk(
            model,
            requests,
            config,
            &decode,
            chunk,
            &mut stats,
            &mut on_step,
        )?;
        for row in chunk.iter() {
            if let Some(c) = &row.finished {
                on_done(row.request, row.sample, c);
            }
        }
    }

    let mut completions: Vec<Vec<Option<Completion>>> = requests
        .iter()
        .map(|_| vec![None; config.num_samples])
        .collect();
    for row in rows {
        completions[row.request][row.sample] = row.finished;
    }
    let completions = completions
        .into_iter()
        .map(|samples| samples.into_iter().flatten().collect::<Vec<_>>())
        .collect::<Vec<_>>();
    Ok(GenerateOutput { completions, stats })
}

fn validate<M: CausalLm + ?Sized>(
    model: &M,
    requests: &[GenerateRequest],
    config: &GenerateConfig,
) -> Result<(), GenerateError> {
    config.sampling.validate()?;
    if config.num_samples == 0 {
        return Err(GenerateError::InvalidConfig(
            "num_samples must be at least 1".into(),
        ));
    }
    if config.max_batch_rows == 0 {
        return Err(GenerateError::InvalidConfig(
            "max_batch_rows must be at least 1".into(),
        ));
    }
    if config.prefill_chunk == 0 {
        return Err(GenerateError::InvalidConfig(
            "prefill_chunk must be at least 1".into(),
        ));
    }
    let vocab = model.vocab_size();
    if config.pad_token_id as usize >= vocab {
        return Err(GenerateError::InvalidConfig(format!(
            "pad_token_id {} is outside the model's vocabulary of {vocab}",
            config.pad_token_id
        )));
    }
    for (i, req) in requests.iter().enumerate() {
        if req.prompt_ids.is_empty() {
            return Err(GenerateError::EmptyPrompt(i));
        }
        if let Some(&token) = req.prompt_ids.iter().find(|&&t| t as usize >= vocab) {
            return Err(GenerateError::TokenOutOfVocab {
                request: i,
                token,
                vocab,
            });
        }
        if req.stop.iter().any(|s| s.is_empty()) {
            return Err(GenerateError::EmptyStopSequence(i));
        }
    }
    Ok(())
}

/// Left-padded `ids`, `positions` (0.. per row, 0 on padding) and key mask (1 = real token),
/// each `[rows, max_len]`.
fn left_pad(
    seqs: &[&[u32]],
    pad: u32,
    device: &Device,
) -> Result<(Tensor, Tensor, Tensor), GenerateError> {
    let len = seqs.iter().map(|s| s.len()).max().unwrap_or(0);
    let mut ids = Vec::with_capacity(seqs.len() * len);
    let mut pos = Vec::with_capacity(seqs.len() * len);
    let mut mask = Vec::with_capacity(seqs.len() * len);
    for s in seqs {
        let padding = len - s.len();
        ids.extend(std::iter::repeat_n(pad, padding));
        ids.extend_from_slice(s);
        pos.extend(std::iter::repeat_n(0u32, padding));
        pos.extend(0..s.len() as u32);
        mask.extend(std::iter::repeat_n(0u8, padding));
        mask.extend(std::iter::repeat_n(1u8, s.len()));
    }
    let shape = (seqs.len(), len);
    Ok((
        Tensor::from_vec(ids, shape, device)?,
        Tensor::from_vec(pos, shape, device)?,
        Tensor::from_vec(mask, shape, device)?,
    ))
}

/// Runs `ids` through the model in chunks of `chunk` positions, filling `cache`, and returns
/// the logits of the last position, `[rows, vocab]`.
fn prefill<M: CausalLm + ?Sized>(
    model: &M,
    ids: &Tensor,
    pos: &Tensor,
    mask: &Tensor,
    chunk: usize,
    cache: &mut KvCache,
) -> Result<Tensor, GenerateError> {
    let (rows, len) = ids.dims2()?;
    let past = cache.seq_len();
    let mut last = None;
    let mut start = 0;
    while start < len {
        let n = chunk.min(len - start);
        let key_mask = mask.narrow(1, 0, past + start + n)?;
        // Only the last position's logits are ever used (those of the final chunk).
        let logits = model.forward_cached_last(
            &ids.narrow(1, start, n)?,
            &pos.narrow(1, start, n)?,
            &key_mask,
            cache,
        )?;
        if logits.dims() != [rows, model.vocab_size()] {
            return Err(GenerateError::BadLogitsShape {
                got: logits.dims().to_vec(),
                rows,
                vocab: model.vocab_size(),
            });
        }
        last = Some(logits);
        start += n;
    }
    last.ok_or_else(|| GenerateError::InvalidConfig("nothing to prefill".into()))
}

/// The next token of every active row, from its logits row `[active, vocab]`.
fn pick_tokens(
    logits: &Tensor,
    rows: &mut [Row],
    active: &[usize],
    greedy: bool,
) -> Result<Vec<u32>, GenerateError> {
    if greedy {
        // Only the argmax ids cross to the host, not the whole `[rows, vocab]` block. A NaN row
        // is still caught: the NaN check needs the row, so fall back to the host path then.
        let ids = logits.argmax(D::Minus1)?.to_vec1::<u32>()?;
        let nan_rows = logits.ne(logits)?.max(D::Minus1)?.to_vec1::<u8>()?;
        if nan_rows.iter().all(|&n| n == 0) {
            return Ok(ids);
        }
    }
    let host = logits.to_dtype(DType::F32)?.to_vec2::<f32>()?;
    // `active` is increasing, so one pass picks out the active rows' samplers; rows sample in
    // parallel since sorting a large vocabulary for top-p costs milliseconds per row.
    let mut active_rows: Vec<&mut Row> = Vec::with_capacity(active.len());
    let mut wanted = active.iter().peekable();
    for (i, row) in rows.iter_mut().enumerate() {
        if wanted.peek() == Some(&&i) {
            active_rows.push(row);
            wanted.next();
        }
    }
    active_rows
        .into_par_iter()
        .zip(host.par_iter())
        .map(|(row, row_logits)| row.sampler.sample(row_logits).map_err(GenerateError::from))
        .collect()
}

fn run_chunk<M, F, S>(
    model: &M,
    requests: &[GenerateRequest],
    config: &GenerateConfig,
    decode: &F,
    rows: &mut [Row],
    stats: &mut GenerateStats,
    on_step: &mut S,
) -> Result<(), GenerateError>
where
    M: CausalLm + ?Sized,
    F: Fn(&[u32]) -> String,
    S: FnMut(&[NewToken]) -> ControlFlow<()>,
{
    let device = model.device();
    let started = Instant::now();
    let greedy = config.sampling.is_greedy();

    // Distinct prompts of this chunk, prefilled once each.
    let mut distinct: Vec<usize> = Vec::new();
    let mut row_to_distinct: Vec<u32> = Vec::with_capacity(rows.len());
    for row in rows.iter() {
        let d = match distinct.iter().position(|&r| r == row.request) {
            Some(d) => d,
            None => {
                distinct.push(row.request);
                distinct.len() - 1
            }
        };
        row_to_distinct.push(d as u32);
    }
    let prompts: Vec<&[u32]> = distinct
        .iter()
        .map(|&r| &requests[r].prompt_ids[..])
        .collect();
    let (ids, pos, mask) = left_pad(&prompts, config.pad_token_id, device)?;
    stats.prompt_tokens += prompts.iter().map(|p| p.len()).sum::<usize>();

    let mut active: Vec<usize> = (0..rows.len()).collect();
    if config.max_new_tokens == 0 {
        for row in rows.iter_mut() {
            finish(row, String::new(), FinishReason::Length, started);
        }
        return Ok(());
    }

    let mut cache = model.new_cache();
    if let Some(dtype) = config.kv_cache_dtype {
        cache.store_as(dtype)?;
    }
    // The longest this batch can get: its (left-padded) prompts plus every new token.
    cache.reserve(ids.dim(1)? + config.max_new_tokens);
    let mut logits = prefill(model, &ids, &pos, &mask, config.prefill_chunk, &mut cache)?;
    let expand = Tensor::from_vec(row_to_distinct.clone(), rows.len(), device)?;
    let identity = row_to_distinct
        .iter()
        .enumerate()
        .all(|(i, &d)| i as u32 == d);
    let mut key_mask = mask;
    if !identity {
        cache.select_rows(&expand)?;
        logits = logits.index_select(&expand, 0)?;
        key_mask = key_mask.index_select(&expand, 0)?;
    }
    let prefill_done = Instant::now();
    stats.prefill_secs += (prefill_done - started).as_secs_f64();

    for _step in 0..config.max_new_tokens {
        let next = pick_tokens(&logits, rows, &active, greedy)?;
        stats.generated_tokens += next.len();
        let mut still: Vec<usize> = Vec::with_capacity(active.len());
        let mut kept_batch_rows: Vec<u32> = Vec::with_capacity(active.len());
        let mut gained: Vec<NewToken> = Vec::with_capacity(active.len());
        for (b, (&r, &tok)) in active.iter().zip(next.iter()).enumerate() {
            let row = &mut rows[r];
            if config.eos_token_ids.contains(&tok) {
                let text = decode(&row.tokens);
                finish(row, text, FinishReason::Eos, started);
                continue;
            }
            row.tokens.push(tok);
            gained.push(NewToken {
                request: row.request,
                sample: row.sample,
                token: tok,
            });
            let stops = &requests[row.request].stop;
            if !stops.is_empty() {
                let text = decode(&row.tokens);
                if let Some(cut) = find_stop(&text, stops) {
                    finish(row, text[..cut].to_string(), FinishReason::Stop, started);
                    continue;
                }
            }
            if row.tokens.len() >= config.max_new_tokens {
                let text = decode(&row.tokens);
                finish(row, text, FinishReason::Length, started);
                continue;
            }
            still.push(r);
            kept_batch_rows.push(b as u32);
        }
        if !gained.is_empty() && on_step(&gained).is_break() {
            return Err(GenerateError::Stopped);
        }
        if still.is_empty() {
            break;
        }
        if still.len() != active.len() {
            let keep = Tensor::from_vec(kept_batch_rows, still.len(), device)?;
            if config.use_kv_cache {
                cache.select_rows(&keep)?;
            }
            key_mask = key_mask.index_select(&keep, 0)?;
        }
        active = still;

        let n = active.len();
        key_mask = Tensor::cat(&[&key_mask, &Tensor::ones((n, 1), DType::U8, device)?], 1)?;
        if config.use_kv_cache {
            let last: Vec<u32> = active
                .iter()
                .map(|&r| *rows[r].tokens.last().unwrap_or(&0))
                .collect();
            let step_pos: Vec<u32> = active
                .iter()
                .map(|&r| (rows[r].prompt_len + rows[r].tokens.len() - 1) as u32)
                .collect();
            let out = model.forward_cached_last(
                &Tensor::from_vec(last, (n, 1), device)?,
                &Tensor::from_vec(step_pos, (n, 1), device)?,
                &key_mask,
                &mut cache,
            )?;
            if out.dims() != [n, model.vocab_size()] {
                return Err(GenerateError::BadLogitsShape {
                    got: out.dims().to_vec(),
                    rows: n,
                    vocab: model.vocab_size(),
                });
            }
            logits = out;
        } else {
            // Reference path: the whole (left-padded) sequence again, with a fresh cache.
            let seqs: Vec<Vec<u32>> = active
                .iter()
                .map(|&r| {
                    let mut s = requests[rows[r].request].prompt_ids.clone();
                    s.extend_from_slice(&rows[r].tokens);
                    s
                })
                .collect();
            let views: Vec<&[u32]> = seqs.iter().map(|s| &s[..]).collect();
            let (ids, pos, mask) = left_pad(&views, config.pad_token_id, device)?;
            let mut fresh = model.new_cache();
            logits = prefill(model, &ids, &pos, &mask, usize::MAX, &mut fresh)?;
        }
    }
    stats.decode_secs += prefill_done.elapsed().as_secs_f64();
    Ok(())
}

fn finish(row: &mut Row, text: String, reason: FinishReason, started: Instant) {
    row.finished = Some(Completion {
        text,
        token_ids: std::mem::take(&mut row.tokens),
        finish_reason: reason,
        seed: row.seed,
        elapsed_secs: started.elapsed().as_secs_f64(),
    });
}
