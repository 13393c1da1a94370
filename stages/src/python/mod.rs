//! Python source code read through tree-sitter-python (which follows Python 3.12 syntax and
//! recovers from errors): the one place that parses Python and answers questions about its
//! syntax tree. The heuristic scorer ([`crate::filter::heuristic`]) and the standard-library
//! corpus ([`stdlib_corpus`]) both use it.
//!
//! - [`PythonParser`] parses a source text into a [`Tree`]; nodes borrow from the tree, and
//!   the helpers here take the source text beside the node ([`node_text`]).
//! - [`has_syntax_error`]: whether a tree (or subtree) has syntax errors, either as CPython
//!   would see them ([`ErrorScope::OutsideStrings`]) or any error tree-sitter reports
//!   ([`ErrorScope::Anywhere`]).
//! - [`docstring`] and [`docstring_summary`]: the docstring of a module, class or function,
//!   and its first sentence.
//! - [`imported_modules`] and [`import_bindings`]: what an import statement imports and the
//!   names it binds; [`stdlib_modules::is_stdlib_module`] tells the standard library apart.
//! - [`functions`]: top-level functions and methods with their decorators, the names a
//!   module binds at top level, and whether a function stands on its own.
//! - [`dedented_text`]: a nested definition's text as if written at column 0.
//!
//! Node kinds and field names are tree-sitter-python's (`function_definition`, `body`, ...).

pub mod functions;
pub mod sanitize;
pub mod stdlib_corpus;
pub mod stdlib_modules;

pub use tree_sitter::{Node, Tree};

use tree_sitter::Parser;

/// The bundled tree-sitter-python grammar does not fit the tree-sitter runtime: a build
/// problem, not an input problem.
#[derive(Debug, Clone, thiserror::Error, miette::Diagnostic)]
#[error(
    "the tree-sitter-python grammar does not match the tree-sitter runtime ({0}); align the \
     tree-sitter and tree-sitter-python versions in Cargo.toml"
)]
#[diagnostic(code(pipeline::python::grammar))]
pub struct GrammarMismatch(String);

/// A Python parser. It keeps state between parses, so make one per thread.
pub struct PythonParser {
    parser: Parser,
}

impl PythonParser {
    /// A parser for tree-sitter-python's grammar.
    pub fn new() -> Result<Self, GrammarMismatch> {
        let mut parser = Parser::new();
        parser
            .set_language(&tree_sitter_python::LANGUAGE.into())
            .map_err(|e| GrammarMismatch(e.to_string()))?;
        Ok(Self { parser })
    }

    /// Parses `source`. Syntax errors do not fail the parse: they become error and missing
    /// nodes ([`has_syntax_error`]). `None` only if parsing was cancelled, which this parser
    /// never asks for.
    pub fn parse(&mut self, source: &str) -> Option<Tree> {
        self.parser.parse(source, None)
    }
}

/// The text of `node` in `source` (the text the tree was parsed from); empty if `source` is
/// another text that the node's range does not fit.
pub fn node_text<'s>(node: Node, source: &'s str) -> &'s str {
    source.get(node.byte_range()).unwrap_or("")
}

/// Which parse errors [`has_syntax_error`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorScope {
    /// Errors outside string literals: what CPython would reject. tree-sitter-python
    /// misreads some valid f-string format specs (`f"{x:=^30}"` is taken for a walrus),
    /// so errors inside strings are not trusted.
    OutsideStrings,
    /// Every error or missing node tree-sitter reports, inside strings too: the strict
    /// reading, for callers that would rather drop valid code than keep broken code.
    Anywhere,
}

/// Whether `node`'s subtree has an error or missing node within `scope`.
pub fn has_syntax_error(node: Node, scope: ErrorScope) -> bool {
    if !node.has_error() {
        return false;
    }
    if scope == ErrorScope::Anywhere {
        return true;
    }
    let mut stack = vec![node];
    while let Some(node) = stack.pop() {
        if node.is_error() || node.is_missing() {
            return true;
        }
        if is_string(node) || !node.has_error() {
            continue;
        }
        let mut cursor = node.walk();
        stack.extend(node.children(&mut cursor));
    }
    false
}

/// Whether `node` is a string literal: one string, or implicitly concatenated strings.
pub fn is_string(node: Node) -> bool {
    matches!(node.kind(), "string" | "concatenated_string")
}

/// The docstring of a `module`, `class_definition` or `function_definition` node: the string
/// literal (or implicitly concatenated literals, which CPython also takes as the docstring)
/// that is the first statement of its body, comments aside.
pub fn docstring(node: Node) -> Option<Node> {
    let body = match node.kind() {
        "module" => node,
        _ => node.child_by_field_name("body")?,
    };
    let mut cursor = body.walk();
    let first = body
        .named_children(&mut cursor)
        .find(|c| c.kind() != "comment")?;
    if first.kind() != "expression_statement" {
        return None;
    }
    let expr = first.named_child(0)?;
    is_string(expr).then_some(expr)
}

/// The summary of a docstring from the source text of its one string literal: the first
/// sentence, without prefix and quotes; `None` for an empty docstring or a text that is not
/// a quoted literal.
///
/// The first line alone is often a sentence cut in half ("Return true if 'target' is
/// out-of-date with respect to any file"), so the first paragraph is joined and cut after its
/// first sentence; a paragraph with no sentence end within 300 characters gives its first line.
pub fn docstring_summary(literal: &str) -> Option<String> {
    let body = literal.trim_start_matches(|c: char| c.is_ascii_alphabetic());
    let body = ["\"\"\"", "'''", "\"", "'"]
        .iter()
        .find_map(|q| body.strip_prefix(q).map(|b| b.strip_suffix(q).unwrap_or(b)))?;
    let paragraph: Vec<&str> = body
        .lines()
        .map(str::trim)
        .skip_while(|l| l.is_empty())
        .take_while(|l| !l.is_empty())
        .collect();
    let first = *paragraph.first()?;
    let joined = paragraph.join(" ");
    let mut end = None;
    for (i, _) in joined.match_indices(". ") {
        let word = joined[..i].rsplit(' ').next().unwrap_or("");
        // "e.g. x" and "i.e. y" do not end a sentence.
        if !matches!(word, "e.g" | "i.e" | "etc" | "vs") {
            end = Some(i + 1);
            break;
        }
    }
    let sentence = match end {
        Some(i) => &joined[..i],
        None if joined.ends_with('.') => joined.as_str(),
        None => first,
    };
    let sentence = if sentence.len() > 300 {
        first
    } else {
        sentence
    };
    Some(sentence.to_string())
}

/// The first component of a dotted module name (`os` for `os.path`), trimmed.
pub fn top_level_module(module: &str) -> &str {
    module.split('.').next().unwrap_or(module).trim()
}

/// The modules an `import_statement` or `import_from_statement` imports, as written:
/// `import a.b, c as d` gives `a.b` and `c`; `from ..pkg import x, y` gives `..pkg` once.
/// Other nodes give nothing.
pub fn imported_modules<'s>(statement: Node, source: &'s str) -> Vec<&'s str> {
    match statement.kind() {
        "import_statement" => {
            let mut cursor = statement.walk();
            statement
                .children_by_field_name("name", &mut cursor)
                .filter_map(|name| match name.kind() {
                    "aliased_import" => name.child_by_field_name("name"),
                    _ => Some(name),
                })
                .map(|module| node_text(module, source))
                .collect()
        }
        "import_from_statement" => statement
            .child_by_field_name("module_name")
            .map(|module| node_text(module, source))
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

/// A name an import statement binds in the importing scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImportBinding {
    /// The module it comes from, as written: `a.b` for `import a.b` and `import a.b as c`,
    /// `..pkg` for `from ..pkg import x`.
    pub module: String,
    /// The bound name: `a` for `import a.b`, `c` for `import a.b as c`, `x` for
    /// `from m import x`.
    pub bound: String,
}

/// The names an `import_statement` or `import_from_statement` binds, in order (empty
/// `bound` where the tree is broken). `from m import *` binds names the source does not
/// show, so it gives nothing.
pub fn import_bindings(statement: Node, source: &str) -> Vec<ImportBinding> {
    let from = match statement.kind() {
        "import_statement" => None,
        "import_from_statement" => Some(
            statement
                .child_by_field_name("module_name")
                .map_or(".", |m| node_text(m, source)),
        ),
        _ => return Vec::new(),
    };
    let field_text = |node: Node, field: &str| {
        node.child_by_field_name(field)
            .map_or("", |n| node_text(n, source))
    };
    let mut cursor = statement.walk();
    statement
        .children_by_field_name("name", &mut cursor)
        .map(|name| {
            let (target, bound) = match name.kind() {
                "aliased_import" => (field_text(name, "name"), field_text(name, "alias")),
                _ => {
                    let target = node_text(name, source);
                    // `import a.b` binds `a`; `from m import x` binds `x`.
                    let bound = match from {
                        Some(_) => target,
                        None => target.split('.').next().unwrap_or(""),
                    };
                    (target, bound)
                }
            };
            ImportBinding {
                module: from.unwrap_or(target).to_string(),
                bound: bound.to_string(),
            }
        })
        .collect()
}

/// The text of `node` from the start of its first line, with the first line's indentation
/// removed from every line that has it (continuation lines of multi-line strings may not),
/// ending in a newline: a method or nested function as if written at top level.
pub fn dedented_text(source: &str, node: Node) -> String {
    let start = node.start_byte();
    let line_start = source[..start].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let indent = start - line_start;
    let body = &source[line_start..node.end_byte()];
    let mut out = String::with_capacity(body.len() + 1);
    for line in body.split_inclusive('\n') {
        let ws = line.len() - line.trim_start_matches([' ', '\t']).len();
        out.push_str(&line[ws.min(indent)..]);
    }
    if !out.ends_with('\n') {
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(source: &str) -> Tree {
        PythonParser::new().unwrap().parse(source).unwrap()
    }

    #[test]
    fn syntax_errors_inside_strings_count_only_in_the_strict_scope() {
        let misread = "heading = 'x'\nprint(f\"{heading:=^30}\")\n";
        let tree = parse(misread);
        assert!(!has_syntax_error(
            tree.root_node(),
            ErrorScope::OutsideStrings
        ));
        assert!(has_syntax_error(tree.root_node(), ErrorScope::Anywhere));
        for broken in ["def f(:\n    pass\n", "x = = 1\n", "x = f'{y'\n"] {
            let tree = parse(broken);
            assert!(has_syntax_error(
                tree.root_node(),
                ErrorScope::OutsideStrings
            ));
            assert!(has_syntax_error(tree.root_node(), ErrorScope::Anywhere));
        }
        let fine = parse("def f(x):\n    return x\n");
        assert!(!has_syntax_error(fine.root_node(), ErrorScope::Anywhere));
    }

    #[test]
    fn docstrings_of_modules_classes_and_functions() {
        let source = "\"\"\"Module.\"\"\"\n\
            class C:\n    # a comment first\n    'Class.'\n\n\
            def f():\n    'a' 'b'\n    return 1\n\n\
            def g():\n    x = 'not a docstring'\n";
        let tree = parse(source);
        let root = tree.root_node();
        let text = |n: Option<Node>| n.map(|n| node_text(n, source));
        assert_eq!(text(docstring(root)), Some("\"\"\"Module.\"\"\""));
        let mut cursor = root.walk();
        let defs: Vec<Node> = root
            .named_children(&mut cursor)
            .filter(|n| n.kind() != "expression_statement")
            .collect();
        assert_eq!(text(docstring(defs[0])), Some("'Class.'"));
        let concatenated = docstring(defs[1]).unwrap();
        assert_eq!(concatenated.kind(), "concatenated_string");
        assert_eq!(docstring(defs[2]), None);
    }

    #[test]
    fn docstring_summaries_are_first_sentences() {
        assert_eq!(
            docstring_summary("r'''\n  Frobnicate the thing.\n  more'''").as_deref(),
            Some("Frobnicate the thing.")
        );
        assert_eq!(docstring_summary("\"Short.\"").as_deref(), Some("Short."));
        assert_eq!(
            docstring_summary(
                "\"\"\"Return true if the target is\n    older, e.g. stale. More.\n\n    Rest.\"\"\""
            )
            .as_deref(),
            Some("Return true if the target is older, e.g. stale.")
        );
        assert_eq!(
            docstring_summary("\"\"\"List files\n    in a dir\n\n    Rest.\"\"\"").as_deref(),
            Some("List files")
        );
        assert_eq!(docstring_summary("\"\"\"   \"\"\""), None);
    }

    #[test]
    fn imports_give_modules_and_bound_names() {
        let source = "import os.path, numpy as np\nfrom ..pkg.sub import a, b as c\n\
            from json import *\n";
        let tree = parse(source);
        let root = tree.root_node();
        let mut cursor = root.walk();
        let statements: Vec<Node> = root.named_children(&mut cursor).collect();
        assert_eq!(
            imported_modules(statements[0], source),
            ["os.path", "numpy"]
        );
        assert_eq!(imported_modules(statements[1], source), ["..pkg.sub"]);
        assert_eq!(imported_modules(statements[2], source), ["json"]);
        let bindings = |i: usize| -> Vec<(String, String)> {
            import_bindings(statements[i], source)
                .into_iter()
                .map(|b| (b.module, b.bound))
                .collect()
        };
        let pair = |m: &str, b: &str| (m.to_string(), b.to_string());
        assert_eq!(bindings(0), [pair("os.path", "os"), pair("numpy", "np")]);
        assert_eq!(
            bindings(1),
            [pair("..pkg.sub", "a"), pair("..pkg.sub", "c")]
        );
        assert!(bindings(2).is_empty());
        assert_eq!(top_level_module("os.path"), "os");
    }

    #[test]
    fn dedenting_keeps_relative_indentation() {
        let source = "class C:\n    @dec\n    def m(self):\n        return '''\nx'''\n";
        let tree = parse(source);
        let class = tree.root_node().named_child(0).unwrap();
        let method = class
            .child_by_field_name("body")
            .and_then(|b| b.named_child(0))
            .unwrap();
        assert_eq!(
            dedented_text(source, method),
            "@dec\ndef m(self):\n    return '''\nx'''\n"
        );
    }
}
