//! Functions of a Python module: the top-level functions and methods (with their decorators),
//! the names the module binds at top level, and whether a function stands on its own.
//!
//! Self-contained is approximated syntactically, with no scope analysis: no identifier in the
//! function (attribute names and keyword-argument names excepted) may name something the
//! module binds at top level (functions, classes, assignments, loop and `with` targets, names
//! imported from non-stdlib or relative modules), unless that binding is an import from the
//! standard library; a top-level function may name itself (recursion). Local variables that
//! shadow module-level names count as uses too: conservative, never wrong in the permissive
//! direction.

use std::collections::BTreeSet;

use super::stdlib_modules::is_stdlib_module;
use super::{import_bindings, node_text, Node};

/// A function or method definition found in a module.
#[derive(Debug, Clone, Copy)]
pub struct FunctionDef<'t> {
    /// The `function_definition` node.
    pub definition: Node<'t>,
    /// The definition with its decorators: the `decorated_definition` around it, or the
    /// definition itself when undecorated.
    pub outer: Node<'t>,
    /// The enclosing `class_definition`, for methods.
    pub class: Option<Node<'t>>,
}

impl<'t> FunctionDef<'t> {
    /// The function's name (`None` only in a broken tree).
    pub fn name<'s>(&self, source: &'s str) -> Option<&'s str> {
        self.definition
            .child_by_field_name("name")
            .map(|n| node_text(n, source))
    }

    /// The enclosing class's name, for methods (empty in a broken tree).
    pub fn class_name<'s>(&self, source: &'s str) -> Option<&'s str> {
        self.class.map(|c| {
            c.child_by_field_name("name")
                .map_or("", |n| node_text(n, source))
        })
    }

    /// Lines the definition spans, decorators included.
    pub fn lines(&self) -> usize {
        self.outer.end_position().row - self.outer.start_position().row + 1
    }

    /// Every identifier in the definition, decorators included, except the function's own
    /// name, attribute names (`obj.attr`) and keyword-argument names (`f(key=...)`): the names
    /// it uses or binds locally (no scope analysis tells the two apart).
    pub fn identifiers(&self) -> Vec<Node<'t>> {
        let own_name = self.definition.child_by_field_name("name").map(|n| n.id());
        let mut out = Vec::new();
        let mut stack = vec![self.outer];
        while let Some(n) = stack.pop() {
            if n.kind() == "identifier" {
                if Some(n.id()) != own_name {
                    out.push(n);
                }
                continue;
            }
            let mut cursor = n.walk();
            for (i, child) in n.children(&mut cursor).enumerate() {
                let field = n.field_name_for_child(i as u32);
                let not_a_reference = matches!(
                    (n.kind(), field),
                    ("attribute", Some("attribute")) | ("keyword_argument", Some("name"))
                );
                if !not_a_reference {
                    stack.push(child);
                }
            }
        }
        out
    }

    /// Whether no identifier in the definition names a file-local module-level binding (see
    /// the module docs); a top-level function may name itself.
    pub fn is_self_contained(&self, source: &str, module: &ModuleBindings) -> bool {
        let recursion = match self.class {
            None => self.name(source),
            Some(_) => None,
        };
        self.identifiers().into_iter().all(|n| {
            let name = node_text(n, source);
            Some(name) == recursion || !module.is_file_local(name)
        })
    }
}

/// Top-level functions and the methods of top-level classes, in source order.
pub fn functions_and_methods(root: Node) -> Vec<FunctionDef> {
    let mut out = Vec::new();
    let mut cursor = root.walk();
    for child in root.named_children(&mut cursor) {
        let (outer, inner) = unwrap_decorated(child);
        match inner.kind() {
            "function_definition" => out.push(FunctionDef {
                definition: inner,
                outer,
                class: None,
            }),
            "class_definition" => {
                let Some(body) = inner.child_by_field_name("body") else {
                    continue;
                };
                let mut members = body.walk();
                for member in body.named_children(&mut members) {
                    let (outer, definition) = unwrap_decorated(member);
                    if definition.kind() == "function_definition" {
                        out.push(FunctionDef {
                            definition,
                            outer,
                            class: Some(inner),
                        });
                    }
                }
            }
            _ => {}
        }
    }
    out
}

/// `(outer, definition)` of a possibly decorated definition: for a `decorated_definition`,
/// itself and the definition it decorates; for anything else, the node twice.
pub fn unwrap_decorated(node: Node) -> (Node, Node) {
    if node.kind() == "decorated_definition" {
        if let Some(definition) = node.child_by_field_name("definition") {
            return (node, definition);
        }
    }
    (node, node)
}

/// Names a module binds at top level, split by whether the binding is a stdlib import.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ModuleBindings {
    /// Functions, classes, assignment, loop and `with` targets, non-stdlib and relative
    /// imports: names whose use ties code to this file.
    pub file_local: BTreeSet<String>,
    /// Names bound only by imports from the standard library.
    pub stdlib_imports: BTreeSet<String>,
}

impl ModuleBindings {
    /// Collects the module-level bindings under `root`, descending into module-level
    /// compound statements (`if`, `try`, `with`, `for`, `while`) but not into function or
    /// class bodies.
    pub fn of_module(root: Node, source: &str) -> Self {
        let mut b = Self::default();
        let mut stack = vec![root];
        while let Some(node) = stack.pop() {
            let mut cursor = node.walk();
            for child in node.named_children(&mut cursor) {
                let (_, inner) = unwrap_decorated(child);
                match inner.kind() {
                    "function_definition" | "class_definition" => {
                        if let Some(n) = inner.child_by_field_name("name") {
                            b.file_local.insert(node_text(n, source).to_string());
                        }
                    }
                    "import_statement" | "import_from_statement" => b.add_imports(inner, source),
                    "expression_statement" => {
                        let mut c2 = inner.walk();
                        for e in inner.named_children(&mut c2) {
                            if matches!(e.kind(), "assignment" | "augmented_assignment") {
                                assignment_targets(e, source, &mut b.file_local);
                            }
                        }
                    }
                    // Module-level loops and `with ... as x` bind names too: every identifier
                    // in their headers counts as bound (an over-approximation that keeps the
                    // check conservative).
                    "for_statement" | "with_statement" => {
                        if let Some(left) = inner.child_by_field_name("left") {
                            identifiers(left, source, &mut b.file_local);
                        }
                        let mut c2 = inner.walk();
                        for part in inner.named_children(&mut c2) {
                            if part.kind() == "with_clause" {
                                identifiers(part, source, &mut b.file_local);
                            }
                        }
                        stack.push(inner);
                    }
                    "if_statement" | "try_statement" | "while_statement" | "block"
                    | "else_clause" | "elif_clause" | "except_clause" | "finally_clause" => {
                        stack.push(inner)
                    }
                    _ => {}
                }
            }
        }
        // A name rebound by both a stdlib import and something else is file-local.
        let file_local = &b.file_local;
        b.stdlib_imports.retain(|n| !file_local.contains(n));
        b
    }

    /// Whether using `name` ties code to its file.
    pub fn is_file_local(&self, name: &str) -> bool {
        self.file_local.contains(name)
    }

    /// Records the names an import binds: stdlib imports as such, anything else as
    /// file-local. (`from m import *` binds names the source does not show; the stdlib's own
    /// star imports are all of stdlib modules.)
    fn add_imports(&mut self, statement: Node, source: &str) {
        for import in import_bindings(statement, source) {
            if import.bound.is_empty() {
                continue;
            }
            if !import.module.starts_with('.') && is_stdlib_module(&import.module) {
                self.stdlib_imports.insert(import.bound);
            } else {
                self.file_local.insert(import.bound);
            }
        }
    }
}

/// The names an assignment binds: plain names and name patterns (`a.b = ...` and
/// `a[i] = ...` bind nothing), through chained assignments (`a = b = 1`).
fn assignment_targets(node: Node, source: &str, out: &mut BTreeSet<String>) {
    if let Some(left) = node.child_by_field_name("left") {
        if matches!(
            left.kind(),
            "identifier" | "pattern_list" | "tuple_pattern" | "list_pattern"
        ) {
            identifiers(left, source, out);
        }
    }
    if let Some(right) = node.child_by_field_name("right") {
        if right.kind() == "assignment" {
            assignment_targets(right, source, out);
        }
    }
}

/// Every `identifier` under `node` (inclusive).
fn identifiers(node: Node, source: &str, out: &mut BTreeSet<String>) {
    let mut stack = vec![node];
    while let Some(n) = stack.pop() {
        if n.kind() == "identifier" {
            out.insert(node_text(n, source).to_string());
            continue;
        }
        let mut cursor = n.walk();
        stack.extend(n.named_children(&mut cursor));
    }
}

#[cfg(test)]
mod tests {
    use super::super::PythonParser;
    use super::*;

    const MODULE: &str = "import os\nimport numpy as np\nfrom json import dumps\n\
        from .sibling import helper\nSCALE = LIMIT = 3\nfor i in range(3):\n    pass\n\
        try:\n    import zlib\nexcept ImportError:\n    zlib = None\n\n\
        def rec(n):\n    \"\"\"Recurse.\"\"\"\n    return rec(n - 1) + os.sep.count(dumps(n))\n\n\
        def scaled(x):\n    return x * SCALE\n\n\
        @decorate(key=SCALE)\ndef decorated():\n    pass\n\n\
        class Shape:\n    def area(self, w):\n        return self.SCALE * max(w, key=1)\n\n\
        \x20   @staticmethod\n    def rec():\n        return rec()\n";

    #[test]
    fn module_bindings_split_stdlib_imports_from_file_local_names() {
        let tree = PythonParser::new().unwrap().parse(MODULE).unwrap();
        let b = ModuleBindings::of_module(tree.root_node(), MODULE);
        let names = |s: &BTreeSet<String>| s.iter().cloned().collect::<Vec<_>>();
        assert_eq!(names(&b.stdlib_imports), ["dumps", "os"]);
        assert_eq!(
            names(&b.file_local),
            [
                "LIMIT",
                "SCALE",
                "Shape",
                "decorated",
                "helper",
                "i",
                "np",
                "rec",
                "scaled",
                "zlib"
            ]
        );
    }

    #[test]
    fn functions_methods_and_self_containment() {
        let tree = PythonParser::new().unwrap().parse(MODULE).unwrap();
        let root = tree.root_node();
        let b = ModuleBindings::of_module(root, MODULE);
        let found: Vec<(Option<&str>, Option<&str>, usize, bool)> = functions_and_methods(root)
            .iter()
            .map(|f| {
                (
                    f.class_name(MODULE),
                    f.name(MODULE),
                    f.lines(),
                    f.is_self_contained(MODULE, &b),
                )
            })
            .collect();
        assert_eq!(
            found,
            [
                (None, Some("rec"), 3, true),
                (None, Some("scaled"), 2, false),
                // The decorator names a module constant.
                (None, Some("decorated"), 3, false),
                // Attribute and keyword names are not references.
                (Some("Shape"), Some("area"), 2, true),
                // A method may not call the module function it shares a name with.
                (Some("Shape"), Some("rec"), 3, false),
            ]
        );
    }
}
