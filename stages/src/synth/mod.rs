//! Synthetic training data, phi-1's way: prompts made diverse by drawing a topic, an audience
//! and a style for each one ([`assign`]), sent to a text generator ([`Generator`]: our own model,
//! [`local`], or any OpenAI-compatible server, [`openai`]), with every answer saved as it
//! arrives ([`ResponseLog`]) so an interrupted run resumes without asking twice. Exercises are
//! then kept only if their solution passes their own tests and an empty body does not
//! ([`exercise`]).
//!
//! The `synthesize` kind ([`crate::kinds::synthesize`]) drives this; nothing here knows about
//! stages or the cache.

pub mod exercise;
pub mod local;
pub mod openai;

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};

use crate::chat::Message;

/// What a synthesis stage writes.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Passages that teach a concept with explanation and code (phi-1's synthetic textbooks).
    #[default]
    Textbook,
    /// A function with a docstring, its solution and unit tests, kept only when verified by
    /// execution (phi-1's CodeExercises).
    Exercises,
}

impl Mode {
    /// The name the manifest uses.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Textbook => "textbook",
            Mode::Exercises => "exercises",
        }
    }

    /// The prompt asked when the manifest gives none (`{topic}`, `{audience}` and `{style}` are
    /// filled in per prompt).
    pub fn default_prompt(self) -> &'static str {
        match self {
            Mode::Textbook => {
                "Write a section of a Python textbook on {topic} for {audience}, in a {style} \
                 style. Explain the idea in clear prose, then show short, correct Python code \
                 in ```python blocks, and say what each example does."
            }
            Mode::Exercises => {
                "Write a Python exercise on {topic} for {audience}, in a {style} style. Reply \
                 with one ```python block that holds a function whose docstring states the task \
                 precisely, its complete solution, and after the function at least three \
                 `assert` statements that test it."
            }
        }
    }
}

/// The placeholders a synthesis prompt may use.
pub const PLACEHOLDERS: &[&str] = &["topic", "audience", "style"];

/// One prompt's draw: which topic, audience and style it asks about.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// Position in the stage's prompt list (0-based); also the prompt's stable id.
    pub index: usize,
    /// The topic.
    pub topic: String,
    /// The audience.
    pub audience: String,
    /// The style.
    pub style: String,
}

impl Assignment {
    /// The prompt's id in checkpoints and records: `p<index>`.
    pub fn id(&self) -> String {
        format!("p{:05}", self.index)
    }

    /// `template` with this draw's values in its placeholders.
    pub fn render(&self, template: &str) -> String {
        template
            .replace("{topic}", &self.topic)
            .replace("{audience}", &self.audience)
            .replace("{style}", &self.style)
    }
}

/// `count` draws from the product of `topics`, `audiences` and `styles`, seeded by `seed`.
///
/// The product is shuffled and taken in order, then shuffled again for the next pass, so the
/// combinations are covered as evenly as `count` allows (every combination once before any
/// twice) while the order stays random. The same lists, count and seed always give the same
/// draws. An empty list yields no draws.
pub fn assign(
    topics: &[String],
    audiences: &[String],
    styles: &[String],
    count: usize,
    seed: u64,
) -> Vec<Assignment> {
    let mut product = Vec::with_capacity(topics.len() * audiences.len() * styles.len());
    for t in topics {
        for a in audiences {
            for s in styles {
                product.push((t, a, s));
            }
        }
    }
    if product.is_empty() {
        return Vec::new();
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut out = Vec::with_capacity(count);
    while out.len() < count {
        product.shuffle(&mut rng);
        for (t, a, s) in &product {
            if out.len() == count {
                break;
            }
            out.push(Assignment {
                index: out.len(),
                topic: (*t).clone(),
                audience: (*a).clone(),
                style: (*s).clone(),
            });
        }
    }
    out
}

/// Checks a prompt template: every `{name}` must be one of [`PLACEHOLDERS`].
pub fn check_template(template: &str) -> Result<(), String> {
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        let after = &rest[open + 1..];
        let Some(close) = after.find('}') else { break };
        let name = &after[..close];
        let looks_like_placeholder =
            !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if looks_like_placeholder && !PLACEHOLDERS.contains(&name) {
            return Err(format!(
                "the prompt names `{{{name}}}`, which is not a placeholder; use {}",
                PLACEHOLDERS
                    .iter()
                    .map(|p| format!("{{{p}}}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Sampling settings shared by every generator.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Sampling {
    /// Most tokens per answer.
    pub max_new_tokens: usize,
    /// Softmax temperature; 0 is greedy.
    pub temperature: f32,
    /// Nucleus mass, if any.
    pub top_p: Option<f32>,
}

/// One chat to complete.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatRequest {
    /// Stable id (the [`Assignment::id`]); answers are saved and resumed under it.
    pub id: String,
    /// The conversation; the answer is the assistant's next message.
    pub messages: Vec<Message>,
    /// Seed of this answer's sampling (derived from the experiment seed and the id).
    pub seed: u64,
}

/// One answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatResponse {
    /// The assistant's text.
    pub text: String,
    /// Why it ended (`stop`, `eos`, `length`, or what the server said).
    pub finish_reason: String,
    /// Tokens generated, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_tokens: Option<u64>,
}

/// Called with each answer as it arrives: the request's index and the answer. An error stops
/// the generator.
pub type OnResponse<'a> = dyn Fn(usize, ChatResponse) -> miette::Result<()> + Sync + 'a;

/// Something that answers chats: our own model, or a server.
pub trait Generator: Sync {
    /// What it is, for the stage's summary (`local SmolLM2 ...`, `openai http://... model X`).
    fn describe(&self) -> serde_json::Value;

    /// Answers every request, calling `on_response` for each as soon as it is known (in any
    /// order), and checking `cancelled` between units of work. Returns when all are answered,
    /// or with the first error.
    fn generate(
        &self,
        requests: &[ChatRequest],
        on_response: &OnResponse<'_>,
        cancelled: &(dyn Fn() -> bool + Sync),
    ) -> miette::Result<()>;
}

/// Answers saved so far, in the stage's checkpoint directory: one JSON line per answer,
/// appended and flushed as each arrives, so an interrupted run resumes without asking again.
pub struct ResponseLog {
    path: PathBuf,
    file: Mutex<File>,
    saved: HashMap<String, ChatResponse>,
}

#[derive(Serialize, Deserialize)]
struct LogLine {
    id: String,
    #[serde(flatten)]
    response: ChatResponse,
}

impl ResponseLog {
    const FILE: &'static str = "responses.partial.jsonl";

    /// Opens the log in `checkpoint_dir`, keeping every whole line earlier attempts wrote (a
    /// line torn by a kill, and anything after it, is dropped and the file rewritten without
    /// it, so new answers never follow a half line).
    pub fn open(checkpoint_dir: &Path) -> miette::Result<Self> {
        let path = checkpoint_dir.join(Self::FILE);
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let mut saved = HashMap::new();
        let mut kept = String::new();
        for line in text.split_inclusive('\n') {
            if !line.ends_with('\n') {
                break;
            }
            match serde_json::from_str::<LogLine>(line) {
                Ok(l) => {
                    kept.push_str(line);
                    saved.insert(l.id, l.response);
                }
                Err(_) => break,
            }
        }
        if kept.len() != text.len() {
            pipeline_engine::atomic::write_atomic(&path, kept.as_bytes(), false).map_err(|e| {
                miette::miette!("cannot rewrite the answer log {}: {e}", path.display())
            })?;
        }
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| miette::miette!("cannot open the answer log {}: {e}", path.display()))?;
        Ok(Self {
            path,
            file: Mutex::new(file),
            saved,
        })
    }

    /// The answer saved under `id`, if any.
    pub fn get(&self, id: &str) -> Option<&ChatResponse> {
        self.saved.get(id)
    }

    /// How many answers earlier attempts saved.
    pub fn len(&self) -> usize {
        self.saved.len()
    }

    /// Whether no answer is saved.
    pub fn is_empty(&self) -> bool {
        self.saved.is_empty()
    }

    /// Saves `response` under `id` (one line, flushed).
    pub fn append(&self, id: &str, response: &ChatResponse) -> miette::Result<()> {
        let line = serde_json::to_string(&LogLine {
            id: id.to_string(),
            response: response.clone(),
        })
        .map_err(|e| miette::miette!("cannot encode an answer: {e}"))?;
        let mut file = self
            .file
            .lock()
            .map_err(|_| miette::miette!("the answer log's lock is poisoned"))?;
        file.write_all(format!("{line}\n").as_bytes())
            .and_then(|()| file.flush())
            .map_err(|e| miette::miette!("cannot save an answer to {}: {e}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn draws_cover_every_combination_before_repeating_and_depend_only_on_the_seed() {
        let (t, a, s) = (
            strings(&["t1", "t2", "t3"]),
            strings(&["a1", "a2"]),
            strings(&["s"]),
        );
        let draws = assign(&t, &a, &s, 8, 7);
        assert_eq!(draws.len(), 8);
        let first: std::collections::HashSet<_> = draws[..6]
            .iter()
            .map(|d| (d.topic.clone(), d.audience.clone()))
            .collect();
        assert_eq!(first.len(), 6, "the first pass covers the product");
        assert_eq!(draws, assign(&t, &a, &s, 8, 7));
        assert_ne!(draws, assign(&t, &a, &s, 8, 8));
        assert!(draws.iter().enumerate().all(|(i, d)| d.index == i));
        assert!(assign(&[], &a, &s, 3, 1).is_empty());
    }

    #[test]
    fn templates_name_only_known_placeholders() {
        assert!(check_template(Mode::Textbook.default_prompt()).is_ok());
        assert!(check_template(Mode::Exercises.default_prompt()).is_ok());
        assert!(check_template("a dict {'a': 1} is fine, {topic} too").is_ok());
        let err = check_template("about {subject}").unwrap_err();
        assert!(
            err.contains("{subject}") && err.contains("{topic}"),
            "{err}"
        );
        let d = Assignment {
            index: 3,
            topic: "recursion".into(),
            audience: "a child".into(),
            style: "playful".into(),
        };
        assert_eq!(
            d.render("{topic}/{audience}/{style}"),
            "recursion/a child/playful"
        );
        assert_eq!(d.id(), "p00003");
    }

    #[test]
    fn the_log_keeps_whole_lines_and_drops_a_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let log = ResponseLog::open(dir.path()).unwrap();
        let r = |t: &str| ChatResponse {
            text: t.into(),
            finish_reason: "stop".into(),
            completion_tokens: Some(2),
        };
        log.append("p00000", &r("one")).unwrap();
        log.append("p00001", &r("two\nlines")).unwrap();
        drop(log);
        let path = dir.path().join(ResponseLog::FILE);
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str("{\"id\":\"p00002\",\"te");
        std::fs::write(&path, &text).unwrap();
        let log = ResponseLog::open(dir.path()).unwrap();
        assert_eq!(log.len(), 2);
        assert_eq!(log.get("p00001").unwrap().text, "two\nlines");
        log.append("p00002", &r("three")).unwrap();
        drop(log);
        let log = ResponseLog::open(dir.path()).unwrap();
        assert_eq!(log.len(), 3, "a new answer after a torn line is kept");
    }
}
