//! Chat prompts: a model's own chat template (Jinja, from its `tokenizer_config.json` or GGUF
//! metadata) rendered with a real Jinja engine, and the instruction prompts evaluation asks
//! instruction-tuned models with.

use minijinja::{context, Environment};
use serde::Serialize;

/// A model's chat template with the token texts it refers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChatTemplate {
    /// The Jinja template.
    pub template: String,
    /// The BOS token's text.
    pub bos_token: String,
    /// The EOS token's text.
    pub eos_token: String,
}

impl ChatTemplate {
    /// The instruct prompt for a code-completion problem `prompt`: [`code_instruction`] as the
    /// user's message through the template, with the answer opened; and that opened answer,
    /// which the generated code continues.
    pub fn code_prompt(&self, prompt: &str) -> Result<(String, &'static str), ChatTemplateError> {
        let (instruction, answer) = code_instruction(prompt);
        let chat = render_chat(
            &self.template,
            &[Message::user(instruction)],
            true,
            &self.bos_token,
            &self.eos_token,
        )?;
        Ok((format!("{chat}{answer}"), answer))
    }
}

/// One chat message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    /// `system`, `user` or `assistant`.
    pub role: String,
    /// The text.
    pub content: String,
}

impl Message {
    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self {
            role: "user".into(),
            content: content.into(),
        }
    }
}

/// A chat template that cannot be rendered.
#[derive(Debug, thiserror::Error, miette::Diagnostic)]
#[error("cannot render the model's chat template: {0}")]
#[diagnostic(help(
    "the template comes from the model artifact's tokenizer_config.json (`chat_template`); use \
     prompt_style = \"completion\" for a model without a usable one"
))]
pub struct ChatTemplateError(String);

/// Renders `messages` through `template` (Hugging Face's conventions: `messages`,
/// `add_generation_prompt`, `bos_token`, `eos_token`).
pub fn render_chat(
    template: &str,
    messages: &[Message],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String, ChatTemplateError> {
    let mut env = Environment::new();
    // Hugging Face renders with trim_blocks and lstrip_blocks.
    env.set_trim_blocks(true);
    env.set_lstrip_blocks(true);
    env.add_template("chat", template)
        .map_err(|e| ChatTemplateError(e.to_string()))?;
    let chat = env
        .get_template("chat")
        .map_err(|e| ChatTemplateError(e.to_string()))?;
    chat.render(context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })
    .map_err(|e| ChatTemplateError(e.to_string()))
}

/// The instruction EvalPlus and bigcode's instruct HumanEval give an instruction-tuned model for
/// a code-completion problem `prompt` (signature and docstring), and the start of the answer
/// that the generation continues from: a fenced Python block, which the closing-fence stop
/// sequence ends.
pub fn code_instruction(prompt: &str) -> (String, &'static str) {
    (
        format!(
            "Please provide a self-contained Python script that solves the following problem \
             in a markdown code block:\n```\n{}\n```\n",
            prompt.trim()
        ),
        "Below is a Python script with a self-contained function that solves the problem and \
         passes corresponding tests:\n```python\n",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// SmolLM2-Instruct's template, as its GGUF file carries it.
    const CHATML: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    #[test]
    fn renders_chatml_with_the_default_system_prompt_and_the_generation_prompt() {
        let out = render_chat(CHATML, &[Message::user("Hi")], true, "", "").unwrap();
        assert_eq!(
            out,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
             Face<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        );
        let no_prompt = render_chat(CHATML, &[Message::user("Hi")], false, "", "").unwrap();
        assert!(!no_prompt.ends_with("assistant\n"));
    }

    #[test]
    fn a_broken_template_is_an_error_that_says_what_to_do() {
        let err = render_chat("{% for x in %}", &[], true, "", "").unwrap_err();
        assert!(err.to_string().contains("chat template"), "{err}");
    }

    #[test]
    fn the_code_instruction_fences_the_stripped_prompt() {
        let (instruction, answer) = code_instruction("def f(x):\n    \"\"\"Doc.\"\"\"\n");
        assert!(instruction.ends_with("```\ndef f(x):\n    \"\"\"Doc.\"\"\"\n```\n"));
        assert!(answer.ends_with("```python\n"));
    }
}
