//! The `tokenize` kind: records -> template -> token ids + loss mask -> binary shards.
//!
//! Inputs: `records` and a `model` artifact, from which it takes `tokenizer.json` (with a
//! `tokenizer_config.json` beside it if present) and `model.json`'s `eos_token_ids`. The
//! EOS appended to every example is, in order of precedence: the `eos_token` parameter,
//! the first of `model.json`'s `eos_token_ids`, the tokenizer's own.
//!
//! Parameters are [`TokenizeOptions`]: `template = { name = "instruction" | "code_snippet" |
//! "custom", prompt, response }`, `max_length`, `loss_on = "response" | "all"`, `pack`,
//! `add_bos`, `add_eos`, `shard_max_tokens`, `eos_token`, `bos_token`, `held_out` (records
//! set aside, by content hash, into the `held_out` output for a held-out loss).
//!
//! Artifact layout (`tokens`): the shard directory [`crate::tokenize::TokenShards::open`]
//! reads (`index.json` + shard files) plus `stats.json`
//! ([`TokenizeStats`](crate::tokenize::TokenizeStats)). Stage metadata: records, examples,
//! tokens, loss tokens, truncation rate.

use miette::miette;
use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::artifact::TOKENIZER_JSON;

use crate::artifacts::{ModelArtifact, RecordsArtifact, TokensArtifact};
use crate::tokenize::{split_held_out, tokenize_records, TextTokenizer, TokenizeOptions};

/// The `tokenize` stage kind.
pub struct Tokenize;

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "records",
        accepts: &[RecordsArtifact::TYPE],
        required: true,
        many: false,
        doc: "the records to tokenize",
    },
    InputSlot {
        name: "model",
        accepts: &[ModelArtifact::TYPE],
        required: true,
        many: false,
        doc: "the model whose tokenizer.json and model.json (EOS) to use",
    },
];

const OUTPUTS: &[OutputSlot] = &[
    OutputSlot {
        name: "tokens",
        artifact: TokensArtifact::TYPE,
        doc: "token shards (index.json + shards) and stats.json",
    },
    OutputSlot {
        name: "held_out",
        artifact: TokensArtifact::TYPE,
        doc: "the `held_out` records, tokenized the same way, for a held-out loss (empty when \
              `held_out = 0`)",
    },
];

impl Stage for Tokenize {
    type Params = TokenizeOptions;
    const KIND: &'static str = "tokenize";
    // 2: `stats.json` ends in a newline (one JSON writer for every kind).
    // 3: the `held_out` output.
    const VERSION: &'static str = "3";
    const SUMMARY: &'static str = "render records with a template and tokenize them into shards";

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &TokenizeOptions) -> Result<(), String> {
        if p.max_length < 2 {
            return Err(format!(
                "max_length must be at least 2, got {}",
                p.max_length
            ));
        }
        if p.shard_max_tokens == 0 {
            return Err("shard_max_tokens must be positive".into());
        }
        crate::templates::Template::from_spec(&p.template).map_err(|e| e.to_string())?;
        Ok(())
    }

    fn run(p: &TokenizeOptions, ctx: &mut StageContext) -> miette::Result<()> {
        let model = ctx.input("model")?.to_path_buf();
        let tokenizer_path = model.join(TOKENIZER_JSON);
        if !tokenizer_path.is_file() {
            return Err(miette!(
                help = "the `model` artifact must hold tokenizer.json; re-run the model stage",
                "{} is missing",
                tokenizer_path.display()
            ));
        }
        let meta = ModelArtifact::info(&model)?;
        let mut tok = TextTokenizer::load(
            &tokenizer_path,
            p.eos_token.as_deref(),
            p.bos_token.as_deref(),
        )?;
        if p.eos_token.is_none() {
            if let Some(&eos) = meta.eos_token_ids.first() {
                if eos as usize >= tok.vocab_size() {
                    return Err(miette!(
                        "model.json names EOS id {eos}, outside the tokenizer's vocabulary of {}",
                        tok.vocab_size()
                    ));
                }
                tok.eos_id = Some(eos);
            }
        }
        let records = RecordsArtifact::read(ctx.input("records")?)?;
        if records.is_empty() {
            return Err(miette!(
                help = "check the upstream stage's filters and limits",
                "the `records` input holds no records to tokenize"
            ));
        }
        let (train, held_out) = split_held_out(&records, p.held_out)?;
        ctx.check_cancelled()?;
        ctx.progress().start(records.len() as u64, "records");
        let out = ctx.output_dir("tokens")?.to_path_buf();
        let stats = tokenize_records(&train, &tok, p, &out)?;
        let held_out_dir = ctx.output_dir("held_out")?.to_path_buf();
        let held_out_stats = tokenize_records(&held_out, &tok, p, &held_out_dir)?;
        TokensArtifact::write_stats(&held_out_dir, &held_out_stats)?;
        ctx.progress().set_position(records.len() as u64);
        ctx.set_metadata("held_out_examples", held_out_stats.examples);
        ctx.set_metadata("records", stats.records);
        ctx.set_metadata("examples", stats.examples);
        ctx.set_metadata("tokens", stats.tokens);
        ctx.set_metadata("loss_tokens", stats.loss_tokens);
        ctx.set_metadata("truncated", stats.truncated);
        ctx.set_metadata("truncation_rate", stats.truncation_rate);
        if let Some(eos) = tok.eos_id {
            ctx.set_metadata("eos_id", eos);
        }
        Ok(TokensArtifact::write_stats(&out, &stats)?)
    }
}
