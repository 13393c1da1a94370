//! Prompt templates: how a [`Record`] becomes training text, split into a prompt part and
//! a response part so that the loss mask can cover the response only.
//!
//! Named templates:
//! - `instruction` (CodeAlpaca): prompt `"### Instruction:\n{instruction}\n\n### Response:\n"`,
//!   response `"{output}"`. When the record has a non-empty `input`, it is inserted as its
//!   own section between instruction and response, as the Alpaca / CodeAlpaca training
//!   code does: `"### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"`.
//!   (Alpaca's one-sentence preamble is left out, matching the format phi-1-style
//!   replications use.)
//! - `code_snippet` (raw code): prompt `"### Code Snippet:\n"`, response `"{content}"`.
//! - `custom`: `prompt` and `response` strings with `{field}` placeholders (`{{` and `}}`
//!   for literal braces).

use serde::{Deserialize, Serialize};

use crate::records::Record;

fn default_name() -> String {
    "instruction".into()
}

/// A template choice as written in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TemplateSpec {
    /// `instruction`, `code_snippet` or `custom`.
    #[serde(default = "default_name")]
    pub name: String,
    /// For `custom`: the prompt part (not trained on when the loss is response-only).
    #[serde(default)]
    pub prompt: Option<String>,
    /// For `custom`: the response part.
    #[serde(default)]
    pub response: Option<String>,
}

impl Default for TemplateSpec {
    fn default() -> Self {
        Self {
            name: default_name(),
            prompt: None,
            response: None,
        }
    }
}

impl TemplateSpec {
    /// A short name of the template for people, e.g. in a report's column header: the
    /// template's name, and for `custom` also its prompt and response patterns (two custom
    /// templates are two different framings).
    pub fn label(&self) -> String {
        match (self.name.as_str(), &self.prompt, &self.response) {
            ("custom", prompt, response) => format!(
                "custom {:?} + {:?}",
                prompt.as_deref().unwrap_or_default(),
                response.as_deref().unwrap_or_default()
            ),
            (name, _, _) => name.to_string(),
        }
    }
}

/// A record rendered by a template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// The prompt part.
    pub prompt: String,
    /// The response part, which follows the prompt directly.
    pub response: String,
}

impl Rendered {
    /// Prompt and response concatenated.
    pub fn text(&self) -> String {
        format!("{}{}", self.prompt, self.response)
    }
}

/// Template errors.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
pub enum TemplateError {
    /// Unknown template name.
    #[error("unknown template `{0}`; the templates are `instruction`, `code_snippet` and `custom` (with `prompt` and `response`)")]
    #[diagnostic(
        code(pipeline::template::unknown),
        help("use `instruction`, `code_snippet`, or `custom` with `prompt` and `response`")
    )]
    Unknown(String),
    /// A custom template is incomplete or unparsable.
    #[error("invalid custom template: {0}")]
    #[diagnostic(
        code(pipeline::template::invalid),
        help("a custom template needs `prompt` and `response`; placeholders are `{{field}}`, literal braces are `{{{{` and `}}}}`")
    )]
    Invalid(String),
    /// A record lacks a field the template uses.
    #[error(transparent)]
    #[diagnostic(transparent)]
    MissingField(#[from] crate::records::MissingFieldError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Lit(String),
    Field(String),
}

/// A parsed template string.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern(Vec<Piece>);

impl Pattern {
    fn parse(s: &str) -> Result<Self, TemplateError> {
        let mut pieces = Vec::new();
        let mut lit = String::new();
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '{' if chars.peek() == Some(&'{') => {
                    chars.next();
                    lit.push('{');
                }
                '}' if chars.peek() == Some(&'}') => {
                    chars.next();
                    lit.push('}');
                }
                '{' => {
                    let mut name = String::new();
                    loop {
                        match chars.next() {
                            Some('}') => break,
                            Some(c) => name.push(c),
                            None => {
                                return Err(TemplateError::Invalid(format!(
                                    "unclosed `{{` in {s:?}"
                                )))
                            }
                        }
                    }
                    if name.is_empty() || name.contains('{') {
                        return Err(TemplateError::Invalid(format!(
                            "bad placeholder `{{{name}}}` in {s:?}"
                        )));
                    }
                    if !lit.is_empty() {
                        pieces.push(Piece::Lit(std::mem::take(&mut lit)));
                    }
                    pieces.push(Piece::Field(name));
                }
                '}' => {
                    return Err(TemplateError::Invalid(format!(
                        "unmatched `}}` in {s:?} (write `}}}}` for a literal brace)"
                    )))
                }
                c => lit.push(c),
            }
        }
        if !lit.is_empty() {
            pieces.push(Piece::Lit(lit));
        }
        Ok(Self(pieces))
    }

    fn render(&self, r: &Record) -> Result<String, TemplateError> {
        let mut out = String::new();
        for p in &self.0 {
            match p {
                Piece::Lit(s) => out.push_str(s),
                Piece::Field(f) => out.push_str(r.require(f)?),
            }
        }
        Ok(out)
    }
}

/// A ready-to-use template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Template {
    /// CodeAlpaca-style instruction / optional input / response.
    Instruction,
    /// Raw code under a `### Code Snippet:` header.
    CodeSnippet,
    /// User-defined prompt and response patterns.
    Custom {
        /// Prompt pattern.
        prompt: CustomPattern,
        /// Response pattern.
        response: CustomPattern,
    },
}

/// A parsed custom pattern (opaque).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CustomPattern(Pattern);

impl Template {
    /// Builds the template named by `spec`.
    pub fn from_spec(spec: &TemplateSpec) -> Result<Self, TemplateError> {
        match (spec.name.as_str(), &spec.prompt, &spec.response) {
            ("instruction", None, None) => Ok(Self::Instruction),
            ("code_snippet", None, None) => Ok(Self::CodeSnippet),
            ("instruction" | "code_snippet", _, _) => Err(TemplateError::Invalid(format!(
                "`{}` is a named template; `prompt`/`response` are only for name = \"custom\"",
                spec.name
            ))),
            ("custom", Some(p), Some(r)) => Ok(Self::Custom {
                prompt: CustomPattern(Pattern::parse(p)?),
                response: CustomPattern(Pattern::parse(r)?),
            }),
            ("custom", _, _) => Err(TemplateError::Invalid(
                "`custom` needs both `prompt` and `response`".into(),
            )),
            (other, _, _) => Err(TemplateError::Unknown(other.to_string())),
        }
    }

    /// Renders a record.
    pub fn render(&self, r: &Record) -> Result<Rendered, TemplateError> {
        match self {
            Self::Instruction => {
                let instruction = r.require("instruction")?;
                let output = r.require("output")?;
                let prompt = match r.get("input").filter(|i| !i.trim().is_empty()) {
                    Some(input) => format!(
                        "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
                    ),
                    None => format!("### Instruction:\n{instruction}\n\n### Response:\n"),
                };
                Ok(Rendered {
                    prompt,
                    response: output.to_string(),
                })
            }
            Self::CodeSnippet => Ok(Rendered {
                prompt: "### Code Snippet:\n".into(),
                response: r.require("content")?.to_string(),
            }),
            Self::Custom { prompt, response } => Ok(Rendered {
                prompt: prompt.0.render(r)?,
                response: response.0.render(r)?,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Provenance;

    fn rec(pairs: &[(&str, &str)]) -> Record {
        Record::new(pairs.iter().copied().collect(), Provenance::default())
    }

    #[test]
    fn instruction_with_and_without_input() {
        let t = Template::from_spec(&TemplateSpec::default()).unwrap();
        let r = t
            .render(&rec(&[
                ("instruction", "Add."),
                ("input", ""),
                ("output", "a+b"),
            ]))
            .unwrap();
        assert_eq!(r.text(), "### Instruction:\nAdd.\n\n### Response:\na+b");
        assert_eq!(r.response, "a+b");
        let r = t
            .render(&rec(&[
                ("instruction", "Add."),
                ("input", "1, 2"),
                ("output", "3"),
            ]))
            .unwrap();
        assert_eq!(
            r.text(),
            "### Instruction:\nAdd.\n\n### Input:\n1, 2\n\n### Response:\n3"
        );
        // No `input` field at all is the same as an empty one.
        let r = t
            .render(&rec(&[("instruction", "I"), ("output", "O")]))
            .unwrap();
        assert_eq!(r.prompt, "### Instruction:\nI\n\n### Response:\n");
        let e = t.render(&rec(&[("instruction", "I")])).unwrap_err();
        assert!(e.to_string().contains("`output`"));
    }

    #[test]
    fn code_snippet_and_custom() {
        let spec = TemplateSpec {
            name: "code_snippet".into(),
            ..Default::default()
        };
        let r = Template::from_spec(&spec)
            .unwrap()
            .render(&rec(&[("content", "x = 1\n")]))
            .unwrap();
        assert_eq!(r.text(), "### Code Snippet:\nx = 1\n");
        let spec = TemplateSpec {
            name: "custom".into(),
            prompt: Some("Q: {q} {{literal}}\nA:".into()),
            response: Some(" {a}".into()),
        };
        let r = Template::from_spec(&spec)
            .unwrap()
            .render(&rec(&[("q", "why"), ("a", "because")]))
            .unwrap();
        assert_eq!(r.prompt, "Q: why {literal}\nA:");
        assert_eq!(r.response, " because");
    }

    #[test]
    fn labels_name_the_template() {
        let named = TemplateSpec {
            name: "code_snippet".into(),
            ..Default::default()
        };
        assert_eq!(named.label(), "code_snippet");
        assert_eq!(TemplateSpec::default().label(), "instruction");
        let custom = TemplateSpec {
            name: "custom".into(),
            prompt: Some("Q: {prompt}\n".into()),
            response: Some("{solution}".into()),
        };
        assert_eq!(custom.label(), "custom \"Q: {prompt}\\n\" + \"{solution}\"");
    }

    #[test]
    fn bad_specs() {
        for (name, p, r) in [
            ("nope", None, None),
            ("custom", Some("x"), None),
            ("custom", Some("{unclosed"), Some("y")),
            ("custom", Some("a}b"), Some("y")),
            ("custom", Some("{}"), Some("y")),
            ("instruction", Some("x"), Some("y")),
        ] {
            let spec = TemplateSpec {
                name: name.into(),
                prompt: p.map(String::from),
                response: r.map(String::from),
            };
            assert!(Template::from_spec(&spec).is_err(), "{name} {p:?}");
        }
    }
}
