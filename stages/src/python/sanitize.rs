//! Turning a model's answer into the program that is graded, as EvalPlus's `sanitize` does:
//! take the code out of a Markdown fence if the answer has one, then keep, by syntax tree, the
//! entry-point function and what it needs (imports, the functions, classes and module-level
//! assignments it names, transitively) and drop everything else (test code, prints, `if
//! __name__ == "__main__"` blocks, prose the model wrote between definitions).

use std::collections::BTreeSet;

use tree_sitter::Node;

use super::functions::unwrap_decorated;
use super::{import_bindings, node_text, PythonParser};

/// The bodies of a Markdown text's fenced code blocks, in order (the info string after the
/// opening fence is not part of a body). An unclosed last fence runs to the end of the text.
pub fn fenced_blocks(text: &str) -> Vec<&str> {
    let mut blocks: Vec<&str> = Vec::new();
    let mut rest = text;
    while let Some(open) = rest.find("```") {
        let after = &rest[open + 3..];
        // The info string (`python`) runs to the end of the fence's line.
        let body_start = after.find('\n').map_or(after.len(), |i| i + 1);
        let body = &after[body_start..];
        match body.find("```") {
            Some(close) => {
                blocks.push(&body[..close]);
                rest = &body[close + 3..];
            }
            None => {
                blocks.push(body);
                break;
            }
        }
    }
    blocks
}

/// The code of a Markdown answer: the fenced block that defines `def entry_point(`, else the
/// longest fenced block, else (no fence) the whole text. An unclosed last fence runs to the end.
pub fn fenced_code<'a>(text: &'a str, entry_point: &str) -> &'a str {
    let blocks = fenced_blocks(text);
    if blocks.is_empty() {
        return text;
    }
    let wanted = format!("def {entry_point}(");
    blocks
        .iter()
        .find(|b| b.contains(&wanted))
        .or_else(|| blocks.iter().max_by_key(|b| b.len()))
        .copied()
        .unwrap_or(text)
}

/// One top-level statement that can be kept.
struct Definition<'t> {
    /// The statement (a decorated definition as a whole).
    node: Node<'t>,
    /// The names it binds at module level.
    binds: Vec<String>,
    /// Whether it is an import (always kept: it costs nothing and a helper may need it).
    import: bool,
}

/// The program graded for an answer whose code is `code` (the prompt and the completion, or an
/// instruction answer): the fenced code if there is a fence, then the top-level imports, the
/// entry point and every definition it reaches by name, in their original order. Definitions
/// that `test` names are kept too (HumanEval/38's test calls the prompt's `encode_cyclic`,
/// which `decode_cyclic` does not). When the code does not parse into anything that defines
/// `entry_point`, it is returned as it is (the grader then reports why it fails).
pub fn sanitize(code: &str, entry_point: &str, test: &str) -> String {
    let code = fenced_code(code, entry_point);
    let Ok(mut parser) = PythonParser::new() else {
        return code.to_string();
    };
    let Some(tree) = parser.parse(code) else {
        return code.to_string();
    };
    let root = tree.root_node();
    let mut definitions = Vec::new();
    let mut cursor = root.walk();
    for statement in root.children(&mut cursor) {
        if let Some(d) = definition(statement, code) {
            definitions.push(d);
        }
    }
    let Some(entry) = definitions
        .iter()
        .position(|d| !d.import && d.binds.iter().any(|b| b == entry_point))
    else {
        return code.to_string();
    };
    // Definitions reached from the entry point by name, transitively.
    let named_by_test = parser
        .parse(test)
        .map(|t| identifiers(t.root_node(), test))
        .unwrap_or_default();
    let mut keep: BTreeSet<usize> = BTreeSet::from([entry]);
    for (j, d) in definitions.iter().enumerate() {
        if !d.import && d.binds.iter().any(|b| named_by_test.contains(b)) {
            keep.insert(j);
        }
    }
    let mut queue: Vec<usize> = keep.iter().copied().collect();
    while let Some(i) = queue.pop() {
        let used = identifiers(definitions[i].node, code);
        for (j, d) in definitions.iter().enumerate() {
            if !d.import && !keep.contains(&j) && d.binds.iter().any(|b| used.contains(b)) {
                keep.insert(j);
                queue.push(j);
            }
        }
    }
    let mut out = String::new();
    for (i, d) in definitions.iter().enumerate() {
        if d.import || keep.contains(&i) {
            out.push_str(node_text(d.node, code));
            out.push('\n');
            if !d.import {
                out.push('\n');
            }
        }
    }
    out
}

/// The statement as a keepable definition, if it is one.
fn definition<'t>(statement: Node<'t>, code: &str) -> Option<Definition<'t>> {
    let name_of = |node: Node| {
        node.child_by_field_name("name")
            .map(|n| node_text(n, code).to_string())
    };
    match statement.kind() {
        "import_statement" | "import_from_statement" | "future_import_statement" => {
            Some(Definition {
                node: statement,
                binds: import_bindings(statement, code)
                    .into_iter()
                    .map(|b| b.bound)
                    .collect(),
                import: true,
            })
        }
        "function_definition" | "class_definition" | "decorated_definition" => {
            let (_, inner) = unwrap_decorated(statement);
            Some(Definition {
                node: statement,
                binds: name_of(inner).into_iter().collect(),
                import: false,
            })
        }
        // `LIMIT = 10`, `a, b = ...`: module-level constants a function may name.
        "expression_statement" => {
            let assignment = statement.named_child(0)?;
            if assignment.kind() != "assignment" {
                return None;
            }
            let left = assignment.child_by_field_name("left")?;
            let mut binds = Vec::new();
            collect_identifiers(left, code, &mut binds);
            Some(Definition {
                node: statement,
                binds,
                import: false,
            })
        }
        _ => None,
    }
}

/// Every identifier inside `node`.
fn identifiers(node: Node, code: &str) -> BTreeSet<String> {
    let mut out = Vec::new();
    collect_identifiers(node, code, &mut out);
    out.into_iter().collect()
}

fn collect_identifiers(node: Node, code: &str, out: &mut Vec<String>) {
    if node.kind() == "identifier" {
        out.push(node_text(node, code).to_string());
        return;
    }
    let mut cursor = node.walk();
    for child in node.children(&mut cursor) {
        collect_identifiers(child, code, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fenced_answers_give_the_block_that_defines_the_entry_point() {
        let answer = "Here is a helper:\n```python\nx = 1\n```\nAnd the function:\n```python\ndef f(a):\n    return a\n```\nDone.";
        assert_eq!(fenced_code(answer, "f"), "def f(a):\n    return a\n");
        // Without one that defines it, the longest; an unclosed fence runs to the end.
        assert_eq!(
            fenced_code("```\nshort\n```\n```py\nlonger one\n", "g"),
            "longer one\n"
        );
        assert_eq!(
            fenced_code("def f():\n    pass\n", "f"),
            "def f():\n    pass\n"
        );
    }

    #[test]
    fn keeps_the_entry_point_what_it_needs_and_the_imports() {
        let code = "import math\nfrom typing import List\n\nLIMIT = 3\nUNUSED = 4\n\n\
                    def helper(x):\n    return math.sqrt(x) + LIMIT\n\n\
                    def unrelated():\n    pass\n\n\
                    def solve(xs: List[int]) -> float:\n    return sum(helper(x) for x in xs)\n\n\
                    print(solve([1]))\nassert solve([]) == 0\n\
                    if __name__ == \"__main__\":\n    solve([2])\n";
        let out = sanitize(code, "solve", "assert candidate([]) == 0");
        assert!(out.contains("import math\n") && out.contains("from typing import List\n"));
        assert!(out.contains("LIMIT = 3") && out.contains("def helper(x):"));
        assert!(out.contains("def solve(xs: List[int]) -> float:"));
        for gone in ["UNUSED", "unrelated", "print(", "assert", "__main__"] {
            assert!(!out.contains(gone), "{gone} should be dropped:\n{out}");
        }
        // Original order is kept.
        assert!(out.find("def helper").unwrap() < out.find("def solve").unwrap());
    }

    #[test]
    fn decorated_and_class_helpers_are_kept_and_unknown_entry_points_change_nothing() {
        let code = "class Box:\n    pass\n\n@staticmethod\ndef make():\n    return Box()\n\ndef f():\n    return make()\n";
        let out = sanitize(code, "f", "");
        assert!(out.contains("class Box:") && out.contains("@staticmethod\ndef make():"));
        assert_eq!(sanitize(code, "missing", ""), code);
        assert_eq!(sanitize("def f(:\n", "g", ""), "def f(:\n");
        // What the test names stays, and what it reaches.
        let pair =
            "def enc(s):\n    return s[::-1]\n\ndef dec(s):\n    return s[::-1]\n\nprint(1)\n";
        let out = sanitize(pair, "dec", "assert candidate(enc('ab')) == 'ab'");
        assert!(
            out.contains("def enc(s):") && !out.contains("print"),
            "{out}"
        );
    }

    #[test]
    fn a_markdown_answer_becomes_the_function() {
        let answer = "Sure! Here's the code:\n\n```python\ndef add(a, b):\n    return a + b\n\nprint(add(1, 2))\n```\n\nThis adds two numbers.";
        assert_eq!(
            sanitize(answer, "add", "assert candidate(1, 2) == 3"),
            "def add(a, b):\n    return a + b\n\n"
        );
    }
}
