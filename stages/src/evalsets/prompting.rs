//! How a problem is put to a model ([`PromptStyle`]), shared by every kind that asks a model a
//! problem: `generate` samples answers to exactly what `likelihood` scores solutions against.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::EvalProblem;
use crate::artifacts::ModelArtifact;

/// How a problem is put to the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PromptStyle {
    /// The problem's prompt as it is (code completion: a base model continues a signature).
    #[default]
    Completion,
    /// An instruction asking for the solution, through the model's own chat template, with the
    /// answer opened as a fenced Python block (EvalPlus' and bigcode's instruct prompts): for
    /// instruction-tuned models.
    Instruct,
}

impl PromptStyle {
    /// The name the manifest uses.
    pub fn name(self) -> &'static str {
        match self {
            PromptStyle::Completion => "completion",
            PromptStyle::Instruct => "instruct",
        }
    }
}

/// Problems as a model is asked them.
#[derive(Debug, Clone)]
pub struct Posed {
    /// The style they were put in.
    pub style: PromptStyle,
    /// Each problem with `prompt` replaced by exactly the text the model is given.
    pub asked: Vec<EvalProblem>,
    /// Per problem, the code the model's answer continues: the prompt's signature in
    /// completion style, the opened fence in instruct style.
    pub answer_prefixes: Vec<String>,
}

impl Posed {
    /// The reference answer to problem `i` as the model would write it after its prompt: the
    /// reference completion in completion style, the whole reference program in instruct style
    /// (the model writes the signature too). `None` when the problem has no reference solution.
    pub fn reference_answer(&self, i: usize) -> Option<String> {
        let problem = self.asked.get(i)?;
        let solution = problem.canonical_solution.as_ref()?;
        Some(match self.style {
            PromptStyle::Completion => solution.clone(),
            PromptStyle::Instruct => format!("{}{solution}", problem.code_prefix),
        })
    }
}

/// Puts `problems` to the model in `model_dir` in `style` (instruct reads the model's chat
/// template from its artifact).
pub fn pose(
    problems: &[EvalProblem],
    style: PromptStyle,
    model_dir: &Path,
) -> miette::Result<Posed> {
    let template = match style {
        PromptStyle::Completion => {
            return Ok(Posed {
                style,
                asked: problems.to_vec(),
                answer_prefixes: problems.iter().map(|p| p.code_prefix.clone()).collect(),
            });
        }
        PromptStyle::Instruct => ModelArtifact::chat_template(model_dir)?.ok_or_else(|| {
            miette::miette!(
                help = "use prompt_style = \"completion\", or a model whose tokenizer_config.json \
                        (or GGUF metadata) has a chat_template",
                "prompt_style = \"instruct\" needs the model's chat template, and {} has none",
                model_dir.display()
            )
        })?,
    };
    let mut asked = Vec::with_capacity(problems.len());
    let mut answer_prefixes = Vec::with_capacity(problems.len());
    for problem in problems {
        let (prompt, answer) = template.code_prompt(&problem.prompt)?;
        asked.push(EvalProblem {
            prompt,
            ..problem.clone()
        });
        answer_prefixes.push(answer.to_string());
    }
    Ok(Posed {
        style,
        asked,
        answer_prefixes,
    })
}
