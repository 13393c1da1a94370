//! `synthesize`: synthetic textbooks or exercises, phi-1's way ([`crate::synth`]).
//!
//! Each of `count` prompts draws a topic, an audience and a style from the declared lists
//! (seeded by the experiment seed, covering the combinations evenly), and asks a generator:
//! `local` (the connected `model`, + `adapter`, through its chat template) or `openai` (any
//! OpenAI-compatible server, the `openai` table). Every answer is saved in the checkpoint
//! directory as it arrives, so an interrupted run resumes without asking again.
//!
//! - `mode = "textbook"`: each answer of at least `min_chars` characters is a record.
//! - `mode = "exercises"`: each answer is read as an exercise (a documented function, its
//!   solution and `assert` tests, [`crate::synth::exercise`]) and run in the grading sandbox:
//!   kept only if the solution passes its tests and the function with an empty body fails them.
//!
//! Output `records`: one record per kept answer with `topic`, `audience`, `style`, `prompt_id`
//! and `content` (textbooks: the passage; exercises: the solution program), and for exercises
//! `instruction` (signature and docstring), `output` (the solution), `tests` and `entry_point`,
//! so both the `instruction` and the `code_snippet` templates train on them. `stats.json` gives
//! the yield per topic and why the rest were dropped, with examples.

use std::collections::BTreeMap;
use std::sync::Mutex;

use pipeline_engine::{InputSlot, OutputSlot, Stage, StageContext};
use pipeline_models::device::DeviceChoice;
use pipeline_models::generate::seed_for_key;
use pipeline_models::train::ComputeDtype;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::artifacts::{AdapterArtifact, FilesArtifact, ModelArtifact, RecordsArtifact};
use crate::chat::Message;
use crate::grade::{Sandbox, SandboxOptions};
use crate::records::{Fields, Provenance, Record};
use crate::synth::exercise::{parse_exercise, verify, Rejection};
use crate::synth::local::LocalGenerator;
use crate::synth::openai::{OpenAiGenerator, OpenAiParams};
use crate::synth::{
    assign, check_template, Assignment, ChatRequest, ChatResponse, Generator, Mode, ResponseLog,
    Sampling,
};

/// Which generator answers the prompts.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum GeneratorChoice {
    /// Our own generation over the `model` input (+ `adapter`).
    #[default]
    Local,
    /// An OpenAI-compatible server (the `openai` table).
    Openai,
}

/// Parameters of [`Synthesize`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct SynthesizeParams {
    /// `textbook` or `exercises`.
    pub mode: Mode,
    /// Topics to draw from (the `topics` input's records add theirs).
    pub topics: Vec<String>,
    /// Audiences to draw from.
    pub audiences: Vec<String>,
    /// Styles to draw from.
    pub styles: Vec<String>,
    /// The field of the `topics` input's records that holds a topic.
    pub topics_field: String,
    /// Prompts to ask.
    pub count: usize,
    /// The user message, with `{topic}`, `{audience}` and `{style}` placeholders (default: the
    /// mode's own prompt).
    pub prompt: Option<String>,
    /// A system message sent before it, if any.
    pub system: Option<String>,
    /// `local` or `openai`.
    pub generator: GeneratorChoice,
    /// The server, for `generator = "openai"`.
    pub openai: Option<OpenAiParams>,
    /// Most tokens per answer.
    pub max_new_tokens: usize,
    /// Sampling temperature (0 = greedy: every draw of one combination would then get the same
    /// answer).
    pub temperature: f32,
    /// Nucleus sampling mass.
    pub top_p: Option<f32>,
    /// `local`: prompts decoded together.
    pub batch_size: usize,
    /// `local`: `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// `local`: `f32`, `bf16` or `f16`.
    pub dtype: ComputeDtype,
    /// `textbook`: answers shorter than this (characters, trimmed) are dropped.
    pub min_chars: usize,
    /// `exercises`: the sandbox the solutions run in (the `grade` kind's options).
    pub sandbox: SandboxOptions,
}

impl Default for SynthesizeParams {
    fn default() -> Self {
        Self {
            mode: Mode::Textbook,
            topics: Vec::new(),
            audiences: vec!["a beginner programmer".into()],
            styles: vec!["clear".into()],
            topics_field: "topic".into(),
            count: 16,
            prompt: None,
            system: None,
            generator: GeneratorChoice::Local,
            openai: None,
            max_new_tokens: 512,
            temperature: 0.8,
            top_p: Some(0.95),
            batch_size: 8,
            device: DeviceChoice::Cpu,
            dtype: ComputeDtype::F32,
            min_chars: 200,
            sandbox: SandboxOptions::default(),
        }
    }
}

impl SynthesizeParams {
    fn sampling(&self) -> Sampling {
        Sampling {
            max_new_tokens: self.max_new_tokens,
            temperature: self.temperature,
            top_p: self.top_p,
        }
    }

    fn prompt_template(&self) -> &str {
        self.prompt
            .as_deref()
            .unwrap_or_else(|| self.mode.default_prompt())
    }
}

/// The `synthesize` stage kind.
pub struct Synthesize;

const INPUTS: &[InputSlot] = &[
    InputSlot {
        name: "model",
        accepts: &[ModelArtifact::TYPE],
        required: false,
        many: false,
        doc: "the model that writes (generator = \"local\"; it needs a chat template)",
    },
    InputSlot {
        name: "adapter",
        accepts: &[AdapterArtifact::TYPE, FilesArtifact::TYPE],
        required: false,
        many: false,
        doc: "a PEFT LoRA adapter over the model (generator = \"local\")",
    },
    InputSlot {
        name: "topics",
        accepts: &[RecordsArtifact::TYPE],
        required: false,
        many: false,
        doc: "records whose `topics_field` adds topics to the `topics` list",
    },
];

const OUTPUTS: &[OutputSlot] = &[OutputSlot {
    name: "records",
    artifact: RecordsArtifact::TYPE,
    doc: "records.jsonl (kept answers with topic, audience, style) + stats.json (yield per topic, drop reasons)",
}];

/// Examples kept per drop reason in `stats.json`.
const EXAMPLES_PER_REASON: usize = 3;

/// What `stats.json` says.
#[derive(Debug, Default, Serialize)]
struct SynthStats {
    mode: &'static str,
    generator: serde_json::Value,
    prompts: usize,
    answers: usize,
    kept: usize,
    /// Answers saved by an earlier, interrupted attempt.
    resumed: usize,
    dropped: BTreeMap<&'static str, usize>,
    finish_reasons: BTreeMap<String, usize>,
    completion_tokens: u64,
    /// Per topic: prompts asked and records kept.
    topics: BTreeMap<String, TopicYield>,
    audiences: BTreeMap<String, TopicYield>,
    styles: BTreeMap<String, TopicYield>,
    /// A few dropped answers per reason: prompt id, what the sandbox said, the start of the
    /// answer.
    examples: BTreeMap<&'static str, Vec<DropExample>>,
}

#[derive(Debug, Default, Serialize)]
struct TopicYield {
    prompts: usize,
    kept: usize,
}

#[derive(Debug, Serialize)]
struct DropExample {
    prompt_id: String,
    detail: String,
    answer: String,
}

impl Stage for Synthesize {
    type Params = SynthesizeParams;
    const KIND: &'static str = "synthesize";
    // 2: chats tokenized without added special tokens (the template has them); stray Markdown
    //    fences no longer hide an exercise's code.
    // 3: the local generator multiplies quantized weights through the packed CPU kernels (the
    //    last bits of the logits change).
    // 4: on the CPU, the fused attention over the KV cache and the kernels' two accumulators
    //    (the last bits of the logits change again).
    const VERSION: &'static str = "4";
    const SUMMARY: &'static str =
        "synthetic textbooks or exercises from randomized topics, audiences and styles (exercises verified by execution)";

    // How fast a server is asked does not change its answers (each request carries its seed).
    const NOT_IN_KEY: &'static [&'static str] =
        &["openai.concurrency", "openai.retries", "openai.timeout_s"];

    fn inputs() -> &'static [InputSlot] {
        INPUTS
    }

    fn outputs() -> &'static [OutputSlot] {
        OUTPUTS
    }

    fn validate(p: &SynthesizeParams) -> Result<(), String> {
        if p.count == 0 || p.max_new_tokens == 0 || p.batch_size == 0 {
            return Err("`count`, `max_new_tokens` and `batch_size` must be at least 1".into());
        }
        if p.audiences.is_empty() || p.styles.is_empty() {
            return Err("`audiences` and `styles` need at least one entry each".into());
        }
        pipeline_models::generate::SamplingParams {
            temperature: p.temperature,
            top_k: None,
            top_p: p.top_p,
        }
        .validate()
        .map_err(|e| e.to_string())?;
        check_template(p.prompt_template())?;
        match (p.generator, &p.openai) {
            (GeneratorChoice::Openai, None) => {
                return Err(
                    "generator = \"openai\" needs an `openai` table with base_url and model".into(),
                )
            }
            (GeneratorChoice::Openai, Some(o)) => o.validate()?,
            (GeneratorChoice::Local, Some(_)) => {
                return Err("the `openai` table is only used with generator = \"openai\"".into())
            }
            (GeneratorChoice::Local, None) => {}
        }
        Ok(())
    }

    fn needs_gpu(p: &SynthesizeParams) -> bool {
        p.generator == GeneratorChoice::Local && p.device == DeviceChoice::Cuda
    }

    fn uses_seed(_: &SynthesizeParams) -> bool {
        true
    }

    fn runs_on_coordinator(p: &SynthesizeParams) -> bool {
        // A server is reached over the network, which compute nodes often lack; the work is the
        // server's.
        p.generator == GeneratorChoice::Openai
    }

    fn headline_metrics() -> &'static [&'static str] {
        &["kept", "yield"]
    }

    fn run(p: &SynthesizeParams, ctx: &mut StageContext) -> miette::Result<()> {
        let mut topics = p.topics.clone();
        if let Some(dir) = ctx.optional_input("topics") {
            for record in RecordsArtifact::read(dir)? {
                let topic = record.require(&p.topics_field).map_err(|e| {
                    miette::miette!(
                        help = "set `topics_field` to the field that holds the topic",
                        "topics input: {e}"
                    )
                })?;
                if !topic.trim().is_empty() && !topics.iter().any(|t| t == topic.trim()) {
                    topics.push(topic.trim().to_string());
                }
            }
        }
        if topics.is_empty() {
            return Err(miette::miette!(
                help = "list `topics` in the stage, or connect a `topics` input of records",
                "`{}` has no topics to write about",
                ctx.stage_name()
            ));
        }
        let seed = ctx.seed();
        let draws = assign(&topics, &p.audiences, &p.styles, p.count, seed);
        let template = p.prompt_template();
        let requests: Vec<ChatRequest> = draws
            .iter()
            .map(|d| {
                let mut messages = Vec::new();
                if let Some(system) = &p.system {
                    messages.push(Message {
                        role: "system".into(),
                        content: d.render(system),
                    });
                }
                messages.push(Message::user(d.render(template)));
                ChatRequest {
                    id: d.id(),
                    messages,
                    seed: seed_for_key(seed, &d.id()),
                }
            })
            .collect();

        let log = ResponseLog::open(ctx.checkpoint_dir())?;
        let resumed = requests.iter().filter(|r| log.get(&r.id).is_some()).count();
        let todo: Vec<ChatRequest> = requests
            .iter()
            .filter(|r| log.get(&r.id).is_none())
            .cloned()
            .collect();
        let generator: Box<dyn Generator> = match p.generator {
            GeneratorChoice::Openai => {
                let Some(openai) = p.openai.clone() else {
                    return Err(miette::miette!(
                        "generator = \"openai\" needs an `openai` table"
                    ));
                };
                Box::new(OpenAiGenerator::new(openai, p.sampling())?)
            }
            GeneratorChoice::Local => {
                let model = ctx.optional_input("model").ok_or_else(|| {
                    miette::miette!(
                        help = "connect `model` (a model, quantize or lora-train base), or use generator = \"openai\"",
                        "generator = \"local\" needs the `model` input"
                    )
                })?;
                if todo.is_empty() {
                    // Every answer is saved: no need to load the model.
                    Box::new(Described(serde_json::json!({"generator": "local"})))
                } else {
                    ctx.progress().set_message("loading model");
                    Box::new(LocalGenerator::load(
                        model,
                        ctx.optional_input("adapter"),
                        p.device,
                        p.dtype.dtype(),
                        p.sampling(),
                        p.batch_size,
                    )?)
                }
            }
        };

        ctx.progress().start(requests.len() as u64, "answers");
        ctx.progress().set_position(resumed as u64);
        ctx.progress().set_message("asking");
        let progress = ctx.progress();
        let cancelled = || ctx.is_cancelled();
        let on_response = |i: usize, response: ChatResponse| -> miette::Result<()> {
            let request = &todo[i];
            log.append(&request.id, &response)?;
            progress.inc(1);
            Ok(())
        };
        generator.generate(&todo, &on_response, &cancelled)?;
        ctx.check_cancelled()?;
        // Reopened so answers of this attempt and of earlier ones are read alike.
        let log = ResponseLog::open(ctx.checkpoint_dir())?;
        let answers: Vec<(&Assignment, ChatResponse)> = draws
            .iter()
            .map(|d| {
                log.get(&d.id())
                    .cloned()
                    .map(|r| (d, r))
                    .ok_or_else(|| miette::miette!("no answer was saved for prompt {}", d.id()))
            })
            .collect::<miette::Result<_>>()?;

        let mut stats = SynthStats {
            mode: p.mode.name(),
            generator: generator.describe(),
            prompts: draws.len(),
            answers: answers.len(),
            resumed,
            ..SynthStats::default()
        };
        for (_, r) in &answers {
            *stats
                .finish_reasons
                .entry(r.finish_reason.clone())
                .or_default() += 1;
            stats.completion_tokens += r.completion_tokens.unwrap_or(0);
        }
        ctx.progress().set_message("checking");
        let outcomes: Vec<Result<Fields, (&'static str, String)>> = match p.mode {
            Mode::Textbook => answers
                .iter()
                .map(|(_, r)| textbook_fields(r, p.min_chars))
                .collect(),
            Mode::Exercises => {
                let sandbox = Sandbox::new(p.sandbox.clone())?;
                let checked = Mutex::new(0u64);
                ctx.progress().start(answers.len() as u64, "exercises run");
                let progress = ctx.progress();
                answers
                    .par_iter()
                    .map(|(_, r)| {
                        let outcome = exercise_fields(r, &sandbox);
                        if let Ok(mut n) = checked.lock() {
                            *n += 1;
                            progress.set_position(*n);
                        }
                        outcome
                    })
                    .collect()
            }
        };

        let mut records = Vec::new();
        for ((draw, response), outcome) in answers.iter().zip(outcomes) {
            for (map, key) in [
                (&mut stats.topics, &draw.topic),
                (&mut stats.audiences, &draw.audience),
                (&mut stats.styles, &draw.style),
            ] {
                map.entry(key.clone()).or_default().prompts += 1;
            }
            match outcome {
                Ok(mut fields) => {
                    for (map, key) in [
                        (&mut stats.topics, &draw.topic),
                        (&mut stats.audiences, &draw.audience),
                        (&mut stats.styles, &draw.style),
                    ] {
                        map.entry(key.clone()).or_default().kept += 1;
                    }
                    fields.insert("topic", draw.topic.clone());
                    fields.insert("audience", draw.audience.clone());
                    fields.insert("style", draw.style.clone());
                    fields.insert("prompt_id", draw.id());
                    records.push(Record::new(
                        fields,
                        Provenance {
                            source: format!("synthesize {}", ctx.stage_name()),
                            line: None,
                            row: Some(draw.index as u64),
                        },
                    ));
                }
                Err((reason, detail)) => {
                    *stats.dropped.entry(reason).or_default() += 1;
                    let examples = stats.examples.entry(reason).or_default();
                    if examples.len() < EXAMPLES_PER_REASON {
                        examples.push(DropExample {
                            prompt_id: draw.id(),
                            detail,
                            answer: response.text.chars().take(600).collect(),
                        });
                    }
                }
            }
        }
        stats.kept = records.len();
        RecordsArtifact::write(ctx.output_dir("records")?, &records, &stats)?;
        let yield_share = records.len() as f64 / draws.len().max(1) as f64;
        ctx.set_metadata("prompts", draws.len() as u64);
        ctx.set_metadata("kept", records.len() as u64);
        ctx.set_metadata("yield", yield_share);
        ctx.set_metadata("completion_tokens", stats.completion_tokens);
        if resumed > 0 {
            ctx.set_metadata("resumed_answers", resumed as u64);
        }
        for (reason, n) in &stats.dropped {
            ctx.set_metadata(&format!("dropped_{reason}"), *n as u64);
        }
        Ok(())
    }
}

/// A generator with nothing left to do (every answer was saved by earlier attempts).
struct Described(serde_json::Value);

impl Generator for Described {
    fn describe(&self) -> serde_json::Value {
        self.0.clone()
    }

    fn generate(
        &self,
        requests: &[ChatRequest],
        _: &crate::synth::OnResponse<'_>,
        _: &(dyn Fn() -> bool + Sync),
    ) -> miette::Result<()> {
        if requests.is_empty() {
            Ok(())
        } else {
            Err(miette::miette!(
                "internal: no generator was loaded for unanswered prompts"
            ))
        }
    }
}

/// A textbook answer's fields, or why it is dropped.
fn textbook_fields(
    response: &ChatResponse,
    min_chars: usize,
) -> Result<Fields, (&'static str, String)> {
    let text = response.text.trim();
    if text.chars().count() < min_chars {
        return Err((
            "too_short",
            format!(
                "{} characters, fewer than min_chars = {min_chars}",
                text.chars().count()
            ),
        ));
    }
    let mut fields = Fields::new();
    fields.insert("content", text.to_string());
    fields.insert(
        "has_code",
        (text.contains("```") || text.contains("def ") || text.contains(">>> ")).to_string(),
    );
    Ok(fields)
}

/// An exercise answer's fields after verification, or why it is dropped.
fn exercise_fields(
    response: &ChatResponse,
    sandbox: &Sandbox,
) -> Result<Fields, (&'static str, String)> {
    let exercise = parse_exercise(&response.text).map_err(|r| (r.name(), String::new()))?;
    let verdict = verify(&exercise, sandbox);
    if let Some(reason) = verdict.rejection {
        let detail = match reason {
            Rejection::VacuousTests => format!("empty body: {}", verdict.stub.unwrap_or_default()),
            _ => verdict.solution,
        };
        return Err((reason.name(), detail));
    }
    let mut fields = Fields::new();
    fields.insert("instruction", exercise.prompt.trim_end().to_string());
    fields.insert("output", exercise.program.clone());
    fields.insert("content", exercise.program.clone());
    fields.insert("tests", exercise.test.clone());
    fields.insert("entry_point", exercise.entry_point.clone());
    Ok(fields)
}
