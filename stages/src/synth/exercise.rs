//! Exercises from a model's answer, and their verification by execution.
//!
//! An answer is read as Python (the fenced blocks joined, or the whole text when it has no
//! fence) and split by syntax tree into:
//! - the **program**: imports, classes, functions and module-level statements before the
//!   exercise's function (what the solution needs);
//! - the **tests**: `assert` statements and other statements after the function, the bodies of
//!   `if __name__ == "__main__":` blocks, and functions named `test*` (called in turn);
//! - the **exercise function** (`entry_point`): the first function with a non-empty docstring
//!   that the tests call.
//!
//! [`verify`] then runs the program and the tests in the grading sandbox
//! ([`crate::grade::Sandbox`]), and runs them again with the function's body replaced by `pass`
//! (the *stub*): an exercise is kept only if the solution passes and the stub fails, so that its
//! tests test something.

use serde::{Deserialize, Serialize};
use tree_sitter::Node;

use crate::grade::{Execution, Sandbox, Status};
use crate::python::functions::unwrap_decorated;
use crate::python::sanitize::fenced_blocks;
use crate::python::{docstring, has_syntax_error, node_text, ErrorScope, PythonParser};

/// An exercise read from an answer, not yet verified.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Exercise {
    /// The exercise's function.
    pub entry_point: String,
    /// The exercise as posed: the imports and the function's signature and docstring.
    pub prompt: String,
    /// The solution: every definition the answer makes, tests left out.
    pub program: String,
    /// The program with the exercise function's body replaced by `pass`.
    pub stub: String,
    /// The tests as the sandbox runs them: test functions, then `def check(candidate):` with
    /// the test statements (and calls of the test functions) as its body.
    pub test: String,
    /// `assert` statements in the tests.
    pub asserts: usize,
}

/// Why an answer yields no exercise.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rejection {
    /// The answer has no code.
    NoCode,
    /// The code does not parse.
    SyntaxError,
    /// No function has a docstring.
    NoDocumentedFunction,
    /// No `assert` calls a documented function.
    NoTests,
    /// The solution fails its own tests (or crashes).
    SolutionFails,
    /// The solution did not finish within the sandbox's time limit.
    TimedOut,
    /// The tests pass with an empty function body: they test nothing.
    VacuousTests,
}

impl Rejection {
    /// Every reason, in report order.
    pub const ALL: [Rejection; 7] = [
        Rejection::NoCode,
        Rejection::SyntaxError,
        Rejection::NoDocumentedFunction,
        Rejection::NoTests,
        Rejection::SolutionFails,
        Rejection::TimedOut,
        Rejection::VacuousTests,
    ];

    /// Its name in statistics (`solution_fails`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Rejection::NoCode => "no_code",
            Rejection::SyntaxError => "syntax_error",
            Rejection::NoDocumentedFunction => "no_documented_function",
            Rejection::NoTests => "no_tests",
            Rejection::SolutionFails => "solution_fails",
            Rejection::TimedOut => "timed_out",
            Rejection::VacuousTests => "vacuous_tests",
        }
    }
}

/// The code of an answer: its non-empty fenced blocks joined by blank lines; when it has none
/// (no fence, or stray fences that pair up around nothing, as small models write), the whole
/// text without its fence lines.
pub fn answer_code(answer: &str) -> String {
    let blocks: Vec<&str> = fenced_blocks(answer)
        .into_iter()
        .filter(|b| !b.trim().is_empty())
        .collect();
    if blocks.is_empty() {
        answer
            .lines()
            .filter(|l| !l.trim_start().starts_with("```"))
            .collect::<Vec<_>>()
            .join("\n")
    } else {
        blocks.join("\n\n")
    }
}

/// Reads the exercise in `answer` (see the module docs).
pub fn parse_exercise(answer: &str) -> Result<Exercise, Rejection> {
    let code = answer_code(answer);
    if code.trim().is_empty() {
        return Err(Rejection::NoCode);
    }
    let mut parser = PythonParser::new().map_err(|_| Rejection::SyntaxError)?;
    let tree = parser.parse(&code).ok_or(Rejection::SyntaxError)?;
    let root = tree.root_node();
    if has_syntax_error(root, ErrorScope::OutsideStrings) {
        return Err(Rejection::SyntaxError);
    }

    // Top-level statements sorted into program material and test material.
    let mut cursor = root.walk();
    let statements: Vec<Node> = root
        .named_children(&mut cursor)
        .filter(|n| n.kind() != "comment")
        .collect();
    let mut functions: Vec<(Node, Node, String)> = Vec::new(); // (outer, definition, name)
    let mut test_functions: Vec<(Node, String)> = Vec::new();
    for &statement in &statements {
        let (outer, inner) = unwrap_decorated(statement);
        if inner.kind() == "function_definition" {
            let name = inner
                .child_by_field_name("name")
                .map(|n| node_text(n, &code).to_string())
                .unwrap_or_default();
            if name.starts_with("test") {
                test_functions.push((outer, name));
            } else {
                functions.push((outer, inner, name));
            }
        }
    }
    let documented: Vec<&(Node, Node, String)> = functions
        .iter()
        .filter(|(_, def, _)| {
            docstring(*def).is_some_and(|d| {
                let text = node_text(d, &code);
                text.trim_matches(|c: char| c == '"' || c == '\'' || c.is_whitespace())
                    .len()
                    > 1
            })
        })
        .collect();
    if documented.is_empty() {
        return Err(Rejection::NoDocumentedFunction);
    }

    // Test statements: after the first documented function, everything that is not a
    // definition or an import; and the bodies of `if __name__ == "__main__":` blocks.
    let first_documented = documented[0].0.start_byte();
    let mut test_statements: Vec<String> = Vec::new();
    let mut program_parts: Vec<Node> = Vec::new();
    for &statement in &statements {
        let (_, inner) = unwrap_decorated(statement);
        let is_definition = matches!(inner.kind(), "function_definition" | "class_definition");
        let is_import = matches!(
            statement.kind(),
            "import_statement" | "import_from_statement" | "future_import_statement"
        );
        if inner.kind() == "function_definition" {
            let name = inner
                .child_by_field_name("name")
                .map(|n| node_text(n, &code))
                .unwrap_or_default();
            if name.starts_with("test") {
                continue;
            }
        }
        if is_definition || is_import {
            program_parts.push(statement);
        } else if let Some(body) = main_block_body(statement, &code) {
            let mut c = body.walk();
            for s in body
                .named_children(&mut c)
                .filter(|n| n.kind() != "comment")
            {
                test_statements.push(crate::python::dedented_text(&code, s));
            }
        } else if statement.start_byte() > first_documented {
            test_statements.push(crate::python::dedented_text(&code, statement));
        } else {
            program_parts.push(statement);
        }
    }
    for (_, name) in &test_functions {
        test_statements.push(format!("{name}()\n"));
    }
    let test_functions_text: String = test_functions
        .iter()
        .map(|(outer, _)| format!("{}\n", node_text(*outer, &code)))
        .collect();
    let all_tests = format!("{test_functions_text}{}", test_statements.concat());
    let asserts = count_asserts(&all_tests);
    if asserts == 0 {
        return Err(Rejection::NoTests);
    }

    // The exercise is the first documented function the tests call.
    let (outer, definition, entry_point) = documented
        .iter()
        .find(|(_, _, name)| calls(&all_tests, name))
        .copied()
        .ok_or(Rejection::NoTests)?;

    let program: String = program_parts
        .iter()
        .map(|n| format!("{}\n", node_text(*n, &code)))
        .collect::<Vec<_>>()
        .join("\n");
    let doc = docstring(*definition).ok_or(Rejection::NoDocumentedFunction)?;
    let header = &code[outer.start_byte()..doc.end_byte()];
    let indent = " ".repeat(doc.start_position().column);
    let stub_function = format!("{header}\n{indent}pass");
    let stub: String = program_parts
        .iter()
        .map(|n| {
            if n.id() == outer.id() {
                format!("{stub_function}\n")
            } else {
                format!("{}\n", node_text(*n, &code))
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    let imports: String = program_parts
        .iter()
        .filter(|n| {
            matches!(
                n.kind(),
                "import_statement" | "import_from_statement" | "future_import_statement"
            )
        })
        .map(|n| format!("{}\n", node_text(*n, &code)))
        .collect();
    let prompt = if imports.is_empty() {
        format!("{header}\n")
    } else {
        format!("{imports}\n\n{header}\n")
    };
    let check_body: String = test_statements
        .iter()
        .map(|s| indent_code(s, "    "))
        .collect();
    let test = format!("{test_functions_text}\n\ndef check(candidate):\n{check_body}");
    Ok(Exercise {
        entry_point: entry_point.clone(),
        prompt,
        program,
        stub,
        test,
        asserts,
    })
}

/// The body of an `if __name__ == "__main__":` block.
fn main_block_body<'t>(statement: Node<'t>, code: &str) -> Option<Node<'t>> {
    if statement.kind() != "if_statement" {
        return None;
    }
    let condition = node_text(statement.child_by_field_name("condition")?, code);
    let compact: String = condition.chars().filter(|c| !c.is_whitespace()).collect();
    let is_main = matches!(
        compact.as_str(),
        "__name__=='__main__'" | "__name__==\"__main__\"" | "'__main__'==__name__"
    );
    is_main
        .then(|| statement.child_by_field_name("consequence"))
        .flatten()
}

/// `assert` statements in `code`.
fn count_asserts(code: &str) -> usize {
    let Ok(mut parser) = PythonParser::new() else {
        return 0;
    };
    let Some(tree) = parser.parse(code) else {
        return 0;
    };
    let mut stack = vec![tree.root_node()];
    let mut n = 0;
    while let Some(node) = stack.pop() {
        if node.kind() == "assert_statement" {
            n += 1;
        }
        let mut c = node.walk();
        stack.extend(node.named_children(&mut c));
    }
    n
}

/// Whether `code` calls `name` (as `name(`, not as part of a longer identifier).
fn calls(code: &str, name: &str) -> bool {
    let pattern = format!("{name}(");
    code.match_indices(&pattern).any(|(i, _)| {
        code[..i]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_' || c == '.'))
    })
}

/// `code` with `indent` before every line, except continuation lines of multi-line strings
/// (indenting them would change the strings).
fn indent_code(code: &str, indent: &str) -> String {
    let mut inside_string_rows = std::collections::HashSet::new();
    if let Ok(mut parser) = PythonParser::new() {
        if let Some(tree) = parser.parse(code) {
            let mut stack = vec![tree.root_node()];
            while let Some(node) = stack.pop() {
                if crate::python::is_string(node) {
                    let (start, end) = (node.start_position().row, node.end_position().row);
                    inside_string_rows.extend(start + 1..=end);
                    continue;
                }
                let mut c = node.walk();
                stack.extend(node.named_children(&mut c));
            }
        }
    }
    let mut out = String::with_capacity(code.len() + 64);
    for (row, line) in code.split_inclusive('\n').enumerate() {
        if !inside_string_rows.contains(&row) && !line.trim().is_empty() {
            out.push_str(indent);
        }
        out.push_str(line);
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// The verdict on one exercise.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    /// `None` when the exercise is kept.
    pub rejection: Option<Rejection>,
    /// What the sandbox said about the solution (`passed`, `timed out`, or the failure's last
    /// traceback line such as `AssertionError`).
    pub solution: String,
    /// What it said about the stub, when the stub was run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stub: Option<String>,
}

/// Runs `exercise`'s solution and then its stub against its tests in `sandbox`: kept when the
/// solution passes and the stub does not.
pub fn verify(exercise: &Exercise, sandbox: &Sandbox) -> Verdict {
    let solution = sandbox.run(&exercise.program, &exercise.test, &exercise.entry_point);
    match solution.status {
        Status::Passed => {}
        Status::TimedOut => {
            return Verdict {
                rejection: Some(Rejection::TimedOut),
                solution: said(&solution),
                stub: None,
            }
        }
        Status::Failed | Status::Error => {
            return Verdict {
                rejection: Some(Rejection::SolutionFails),
                solution: said(&solution),
                stub: None,
            }
        }
    }
    let stub = sandbox.run(&exercise.stub, &exercise.test, &exercise.entry_point);
    Verdict {
        rejection: (stub.status == Status::Passed).then_some(Rejection::VacuousTests),
        solution: said(&solution),
        stub: Some(said(&stub)),
    }
}

/// The sandbox's verdict in a few words: the error's last traceback line when there is one.
fn said(execution: &Execution) -> String {
    match &execution.error {
        Some(error) if execution.status != Status::Passed => {
            format!(
                "{}: {error}",
                execution.result.split(':').next().unwrap_or("failed")
            )
        }
        _ => execution.result.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "Here is an exercise.\n\n```python\nimport math\n\n\
        def area(r):\n    \"\"\"Return the area of a circle of radius r.\"\"\"\n    \
        return math.pi * r * r\n\n\
        assert area(0) == 0\nassert abs(area(1) - math.pi) < 1e-9\n```\n";

    #[test]
    fn splits_an_answer_into_program_prompt_stub_and_tests() {
        let ex = parse_exercise(GOOD).unwrap();
        assert_eq!(ex.entry_point, "area");
        assert_eq!(ex.asserts, 2);
        assert!(ex.program.contains("import math") && ex.program.contains("return math.pi"));
        assert!(!ex.program.contains("assert"));
        assert!(ex.prompt.starts_with("import math\n"));
        assert!(
            ex.prompt.trim_end().ends_with("radius r.\"\"\""),
            "{}",
            ex.prompt
        );
        assert!(ex.stub.contains("    pass") && !ex.stub.contains("return math.pi"));
        assert!(ex
            .test
            .contains("def check(candidate):\n    assert area(0) == 0\n"));
    }

    #[test]
    fn test_functions_and_main_blocks_are_tests() {
        let answer = "def double(x):\n    '''Twice x.'''\n    return 2 * x\n\n\
            def test_double():\n    assert double(2) == 4\n\n\
            if __name__ == '__main__':\n    assert double(0) == 0\n    print('ok')\n";
        let ex = parse_exercise(answer).unwrap();
        assert_eq!(ex.entry_point, "double");
        assert_eq!(ex.asserts, 2);
        assert!(ex.test.contains("def test_double():"));
        assert!(ex.test.contains("    test_double()\n"));
        assert!(ex.test.contains("    assert double(0) == 0\n"));
        assert!(!ex.program.contains("__main__"));
    }

    #[test]
    fn answers_without_an_exercise_say_why() {
        assert_eq!(parse_exercise("  \n"), Err(Rejection::NoCode));
        assert_eq!(
            parse_exercise("```python\ndef f(:\n```"),
            Err(Rejection::SyntaxError)
        );
        assert_eq!(
            parse_exercise("def f(x):\n    return x\nassert f(1) == 1\n"),
            Err(Rejection::NoDocumentedFunction)
        );
        assert_eq!(
            parse_exercise("def f(x):\n    \"\"\"Identity.\"\"\"\n    return x\nprint(f(1))\n"),
            Err(Rejection::NoTests)
        );
        // Asserts that call no documented function test nothing of the exercise.
        assert_eq!(
            parse_exercise("def f(x):\n    \"\"\"Identity.\"\"\"\n    return x\nassert 1 == 1\n"),
            Err(Rejection::NoTests)
        );
    }

    #[test]
    fn multi_line_strings_keep_their_text_when_indented() {
        let code = "s = '''a\nb'''\nassert s\n";
        assert_eq!(indent_code(code, "  "), "  s = '''a\nb'''\n  assert s\n");
    }

    #[test]
    fn stray_fences_do_not_hide_the_code() {
        // A closing fence with no opening one: the code is the text before it.
        let answer =
            "def f(x):\n    \"\"\"Twice.\"\"\"\n    return 2 * x\n\nassert f(1) == 2\n```\n";
        assert_eq!(parse_exercise(answer).unwrap().entry_point, "f");
        // An empty fenced pair before the code.
        let answer = "```\n```\ndef g(x):\n    '''Id.'''\n    return x\nassert g(3) == 3\n";
        assert_eq!(parse_exercise(answer).unwrap().entry_point, "g");
    }

    #[test]
    fn calls_match_whole_names() {
        assert!(calls("assert f(1)", "f"));
        assert!(!calls("assert gf(1)", "f"));
        assert!(!calls("assert x.f(1)", "f"));
    }
}
