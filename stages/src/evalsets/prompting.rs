//! How a problem is put to a model ([`PromptStyle`]), shared by every kind that asks a model a
//! problem: `generate` samples answers to exactly what `likelihood` scores solutions against.
//!
//! Besides the benchmark's own prompt styles, a problem can be framed the way a fine-tune's
//! training data was ([`frame_in_template`]): the problem becomes a record
//! ([`problem_record`]) that a training template ([`crate::templates`]) renders, so a variant
//! can be scored in its own training format.

use std::path::Path;

use serde::{Deserialize, Serialize};

use super::EvalProblem;
use crate::artifacts::ModelArtifact;
use crate::records::{Provenance, Record};
use crate::templates::Template;

/// How a problem is put to the model.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema,
)]
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

/// The fields a training template sees for `problem` with the reference solution `solution`
/// (the completion that continues the problem's code, as [`PromptStyle::Completion`] scores it):
///
/// | field | value |
/// |---|---|
/// | `instruction`, `prompt` | the problem's prompt without leading or trailing blank space (HumanEval: the signature and docstring) |
/// | `output`, `content` | the whole reference program: the problem's code (`code_prefix`) without its leading blank lines, then `solution` |
/// | `code_prefix` | the problem's code as it is |
/// | `solution` | `solution` |
/// | `task_id`, `entry_point` | as the problem has them |
///
/// There is no `input` field, so the `instruction` template takes its form without an input
/// section. The record's provenance names the task, for error messages.
pub fn problem_record(problem: &EvalProblem, solution: &str) -> Record {
    let program = format!("{}{solution}", problem.code_prefix.trim_start());
    Record::new(
        [
            ("instruction", problem.prompt.trim().to_string()),
            ("prompt", problem.prompt.trim().to_string()),
            ("output", program.clone()),
            ("content", program),
            ("code_prefix", problem.code_prefix.clone()),
            ("solution", solution.to_string()),
            ("task_id", problem.task_id.clone()),
            ("entry_point", problem.entry_point.clone()),
        ]
        .into_iter()
        .collect(),
        Provenance {
            source: format!("eval task {}", problem.task_id),
            line: None,
            row: None,
        },
    )
}

/// A problem framed through a training template: the text before the scored solution, and the
/// solution. `context + solution` is exactly the template's rendering (prompt part, then
/// response part) of [`problem_record`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateFramed {
    /// The template's prompt part and the part of its response before the solution.
    pub context: String,
    /// The reference solution: the end of the template's response part.
    pub solution: String,
}

/// Frames `problem` through `template` with its reference completion as the end of the
/// template's response part; `None` when the problem has no reference solution.
///
/// The solution scored is the same text under every template and under
/// [`PromptStyle::Completion`] (the problem's `canonical_solution`), so scores under different
/// framings count the same bytes; only what comes before it differs. With the named templates:
///
/// - `instruction`: `"### Instruction:\n{prompt}\n\n### Response:\n{code}"` + solution, where
///   `{prompt}` is the problem's prompt and `{code}` the problem's code (for HumanEval both are
///   the signature and docstring): the response is the whole program, as a CodeAlpaca answer
///   is, and its opening lines are context.
/// - `code_snippet`: `"### Code Snippet:\n{code}"` + solution: the whole program is the
///   snippet, as a raw source file is.
///
/// A `custom` template may use any field of [`problem_record`], but its response part must
/// end with the solution (`{solution}`, `{output}` or `{content}` last); otherwise this is an
/// error, since there would be no solution to score.
pub fn frame_in_template(
    template: &Template,
    problem: &EvalProblem,
) -> miette::Result<Option<TemplateFramed>> {
    let Some(solution) = problem.canonical_solution.as_deref() else {
        return Ok(None);
    };
    let rendered = template.render(&problem_record(problem, solution))?;
    let Some(before) = rendered.response.strip_suffix(solution) else {
        return Err(miette::miette!(
            help = "end the template's `response` with `{solution}` (or `{output}` / \
                    `{content}`, the whole program), so that the reference solution is what \
                    the template's response ends with",
            "task {}: the template's response part does not end with the reference solution, \
             so there is nothing to score",
            problem.task_id
        ));
    };
    Ok(Some(TemplateFramed {
        context: format!("{}{before}", rendered.prompt),
        solution: solution.to_string(),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::evalsets::EvalKind;
    use crate::templates::TemplateSpec;

    fn humaneval_like() -> EvalProblem {
        EvalProblem {
            task_id: "HumanEval/0".into(),
            prompt: "\ndef f(x):\n    \"\"\"Add one.\"\"\"".into(),
            code_prefix: "\ndef f(x):\n    \"\"\"Add one.\"\"\"".into(),
            test: String::new(),
            entry_point: "f".into(),
            kind: EvalKind::HumanEval,
            stop: Vec::new(),
            canonical_solution: Some("\n    return x + 1\n".into()),
        }
    }

    fn template(name: &str) -> Template {
        Template::from_spec(&TemplateSpec {
            name: name.into(),
            ..Default::default()
        })
        .unwrap()
    }

    #[test]
    fn named_templates_frame_the_whole_program_and_score_the_solution() {
        let p = humaneval_like();
        let framed = frame_in_template(&template("instruction"), &p)
            .unwrap()
            .unwrap();
        assert_eq!(
            framed.context,
            "### Instruction:\ndef f(x):\n    \"\"\"Add one.\"\"\"\n\n### Response:\n\
             def f(x):\n    \"\"\"Add one.\"\"\""
        );
        assert_eq!(framed.solution, "\n    return x + 1\n");
        let framed = frame_in_template(&template("code_snippet"), &p)
            .unwrap()
            .unwrap();
        assert_eq!(
            framed.context,
            "### Code Snippet:\ndef f(x):\n    \"\"\"Add one.\"\"\""
        );
        assert_eq!(framed.solution, "\n    return x + 1\n");
        // The text is the template's rendering of the problem's record, as training renders it.
        let rendered = template("code_snippet")
            .render(&problem_record(&p, "\n    return x + 1\n"))
            .unwrap();
        assert_eq!(
            rendered.text(),
            format!("{}{}", framed.context, framed.solution)
        );
    }

    #[test]
    fn custom_templates_must_end_with_the_solution() {
        let p = humaneval_like();
        let custom = |prompt: &str, response: &str| {
            Template::from_spec(&TemplateSpec {
                name: "custom".into(),
                prompt: Some(prompt.into()),
                response: Some(response.into()),
            })
            .unwrap()
        };
        // `{code_prefix}` then `{solution}` is the completion framing.
        let framed = frame_in_template(&custom("{code_prefix}", "{solution}"), &p)
            .unwrap()
            .unwrap();
        assert_eq!(framed.context, p.code_prefix);
        let err = frame_in_template(&custom("{prompt}", "{solution}\n# end"), &p).unwrap_err();
        assert!(err.to_string().contains("HumanEval/0"), "{err}");
        let err = frame_in_template(&custom("{input}", "{solution}"), &p).unwrap_err();
        assert!(format!("{err:?}").contains("input"), "{err:?}");
        let none = EvalProblem {
            canonical_solution: None,
            ..p
        };
        assert_eq!(
            frame_in_template(&template("instruction"), &none).unwrap(),
            None
        );
    }
}
