//! Syntax-tree similarity of Python code: how much of an eval task's code appears, up to the
//! names and constants chosen, in a training record.
//!
//! **Definition.** Parse both texts with tree-sitter-python. Give every named node a
//! *normalized shape hash*: its node kind and the hashes of all its children in order
//! (anonymous children, i.e. keywords and operators, by their kind), where
//! - every identifier hashes alike (`identifier`), so renaming variables, functions and
//!   parameters changes nothing;
//! - every literal hashes by its category only (`string` for strings and f-strings,
//!   `number` for integers and floats, `constant` for `True`, `False`, `None`), without
//!   descending into it;
//! - comments are left out.
//!
//! A *subtree* is a named node together with everything below it; its size is its number of
//! named nodes; the file itself (the root `module`) is not one. The **AST match rate** of eval code `E` in record `R` is
//!
//! ```text
//!     |S(E) ∩ S(R)| / |S(E)|
//! ```
//!
//! where `S(x)` is the set of shape hashes of the subtrees of `x` with at least `min_nodes`
//! named nodes (default 4: leaves and the smallest expressions such as `x.y` or `f(x)` do not
//! count; HumanEval solutions are small, so a larger minimum leaves a handful of subtrees per
//! task and the rate moves in big steps). It is CodeBLEU's syntactic match (the share of the
//! reference's subtrees found in the candidate) over distinct, normalized subtrees. A verbatim or identifier-shuffled copy of the eval code anywhere in
//! the record scores 1; a copy with one statement changed loses that statement's subtrees and
//! the subtrees enclosing it; unrelated code scores near 0. Syntax errors become error nodes
//! (their subtrees rarely match anything): a record that is not code scores near 0 too.
//!
//! The set form (rather than a tree edit distance) makes the search over many records cheap:
//! an inverted index from shape hash to eval tasks, one pass over each record's subtrees.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::python::{Node, PythonParser};

/// Options of the AST match rate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct AstOptions {
    /// Smallest subtree (in named nodes) that counts.
    pub min_nodes: usize,
}

impl Default for AstOptions {
    fn default() -> Self {
        Self { min_nodes: 4 }
    }
}

/// The literal category a node kind hashes as, if it is a literal.
fn literal_class(kind: &str) -> Option<&'static str> {
    match kind {
        "string" | "concatenated_string" => Some("string"),
        "integer" | "float" => Some("number"),
        "true" | "false" | "none" => Some("constant"),
        _ => None,
    }
}

/// Shape hash and named-node count of `node`'s subtree; pushes the hashes of subtrees of at
/// least `min_nodes` named nodes into `out`.
fn shape(node: Node, min_nodes: usize, out: &mut Vec<u64>) -> (u64, usize) {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    let kind = node.kind();
    if let Some(class) = literal_class(kind) {
        class.hash(&mut hasher);
        return (hasher.finish(), 1);
    }
    kind.hash(&mut hasher);
    let mut size = 1;
    if kind != "identifier" {
        let mut cursor = node.walk();
        for child in node.children(&mut cursor) {
            if child.kind() == "comment" {
                continue;
            }
            if child.is_named() {
                let (h, s) = shape(child, min_nodes, out);
                h.hash(&mut hasher);
                size += s;
            } else {
                // Keywords and operators: `a + b` and `a - b` differ.
                child.kind().hash(&mut hasher);
            }
        }
    }
    let hash = hasher.finish();
    // The whole file (`module`) is no unit of code: a copy inside a larger file must match.
    if size >= min_nodes && !node.is_error() && kind != "module" {
        out.push(hash);
    }
    (hash, size)
}

/// The distinct shape hashes of `source`'s subtrees of at least `min_nodes` named nodes,
/// sorted. Empty when nothing parses into a subtree that large.
pub fn subtree_hashes(parser: &mut PythonParser, source: &str, min_nodes: usize) -> Vec<u64> {
    let Some(tree) = parser.parse(source) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // Deep nesting (a generated file of 10,000 nested brackets) must not overflow the stack:
    // such a tree is skipped as "not comparable" rather than walked.
    if depth_exceeds(tree.root_node(), MAX_DEPTH) {
        return Vec::new();
    }
    shape(tree.root_node(), min_nodes.max(1), &mut out);
    out.sort_unstable();
    out.dedup();
    out
}

/// Deepest syntax tree [`subtree_hashes`] walks (real code nests a few dozen levels).
const MAX_DEPTH: usize = 400;

fn depth_exceeds(root: Node, limit: usize) -> bool {
    let mut cursor = root.walk();
    let mut depth = 0usize;
    loop {
        if depth > limit {
            return true;
        }
        if cursor.goto_first_child() {
            depth += 1;
            continue;
        }
        loop {
            if cursor.goto_next_sibling() {
                break;
            }
            if !cursor.goto_parent() {
                return false;
            }
            depth -= 1;
        }
    }
}

/// The AST match rate of eval code `eval` in `record` (see the module docs), in `[0, 1]`;
/// 0 when the eval code has no subtree of `min_nodes`.
pub fn ast_match_rate(
    parser: &mut PythonParser,
    eval: &str,
    record: &str,
    options: &AstOptions,
) -> f64 {
    let e = subtree_hashes(parser, eval, options.min_nodes);
    if e.is_empty() {
        return 0.0;
    }
    let r = subtree_hashes(parser, record, options.min_nodes);
    let shared = e.iter().filter(|h| r.binary_search(h).is_ok()).count();
    shared as f64 / e.len() as f64
}

/// Eval tasks' subtree sets, indexed to score many records against all tasks at once.
pub struct AstIndex {
    /// Subtree count of each task (the denominator of its match rate).
    sizes: Vec<usize>,
    /// Shape hash -> tasks holding it.
    postings: HashMap<u64, Vec<u32>>,
    min_nodes: usize,
}

impl AstIndex {
    /// Indexes the code of each task (in order; task `i` of the scores is `codes[i]`).
    pub fn new(
        codes: &[&str],
        options: &AstOptions,
    ) -> Result<Self, crate::python::GrammarMismatch> {
        PythonParser::new()?;
        let sets: Vec<Vec<u64>> = codes
            .par_iter()
            .map_init(PythonParser::new, |parser, code| match parser {
                Ok(p) => subtree_hashes(p, code, options.min_nodes),
                Err(_) => Vec::new(),
            })
            .collect();
        let mut postings: HashMap<u64, Vec<u32>> = HashMap::new();
        for (task, set) in sets.iter().enumerate() {
            for &h in set {
                postings.entry(h).or_default().push(task as u32);
            }
        }
        Ok(Self {
            sizes: sets.iter().map(Vec::len).collect(),
            postings,
            min_nodes: options.min_nodes,
        })
    }

    /// Number of tasks indexed.
    pub fn tasks(&self) -> usize {
        self.sizes.len()
    }

    /// Tasks whose code has no subtree of `min_nodes` (they never match anything).
    pub fn empty_tasks(&self) -> usize {
        self.sizes.iter().filter(|&&s| s == 0).count()
    }

    /// The match rate of every task sharing at least one subtree with `record`, as `(task,
    /// rate)` in task order.
    pub fn match_rates(&self, parser: &mut PythonParser, record: &str) -> Vec<(usize, f64)> {
        let mut shared: HashMap<u32, usize> = HashMap::new();
        for h in subtree_hashes(parser, record, self.min_nodes) {
            if let Some(tasks) = self.postings.get(&h) {
                for &t in tasks {
                    *shared.entry(t).or_insert(0) += 1;
                }
            }
        }
        let mut rates: Vec<(usize, f64)> = shared
            .into_iter()
            .map(|(t, n)| (t as usize, n as f64 / self.sizes[t as usize] as f64))
            .collect();
        rates.sort_by_key(|&(t, _)| t);
        rates
    }

    /// [`Self::match_rates`] of every record, in parallel (one parser per thread).
    pub fn match_rates_all(&self, records: &[&str]) -> Vec<Vec<(usize, f64)>> {
        records
            .par_iter()
            .map_init(PythonParser::new, |parser, text| match parser {
                Ok(p) => self.match_rates(p, text),
                // `new` checked the grammar loads; a parser that fails here matches nothing.
                Err(_) => Vec::new(),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SOLUTION: &str = "def below_zero(operations):\n    balance = 0\n    for op in operations:\n        balance += op\n        if balance < 0:\n            return True\n    return False\n";

    fn rate(eval: &str, record: &str) -> f64 {
        let mut p = PythonParser::new().unwrap();
        ast_match_rate(&mut p, eval, record, &AstOptions::default())
    }

    #[test]
    fn copies_match_fully_even_with_other_names_and_constants() {
        assert_eq!(rate(SOLUTION, SOLUTION), 1.0);
        let renamed = SOLUTION
            .replace("below_zero", "f")
            .replace("operations", "xs")
            .replace("balance", "acc")
            .replace("op", "v")
            .replace("0", "7");
        let planted = format!("import os\n\n\nclass Thing:\n    pass\n\n\n{renamed}\n# trailing comment\nprint(f([1, -2]))\n");
        assert_eq!(rate(SOLUTION, &planted), 1.0);
    }

    #[test]
    fn changed_structure_and_unrelated_code_score_lower() {
        let changed = SOLUTION.replace("balance < 0", "balance > 0 and op");
        let partial = rate(SOLUTION, &changed);
        assert!(partial > 0.2 && partial < 0.5, "{partial}");
        let unrelated = "import json\n\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n\n\ndef main():\n    data = load('x.json')\n    print(sorted(data.items(), key=lambda kv: kv[1]))\n";
        assert!(
            rate(SOLUTION, unrelated) < 0.1,
            "{}",
            rate(SOLUTION, unrelated)
        );
        assert_eq!(rate(SOLUTION, "this is prose, not code at all"), 0.0);
        assert_eq!(
            rate("x.y", SOLUTION),
            0.0,
            "eval code without a large subtree"
        );
    }

    #[test]
    fn index_agrees_with_the_pairwise_rate() {
        let tasks = [
            SOLUTION,
            "def add(a, b):\n    \"\"\"Sum.\"\"\"\n    total = a + b\n    return total * 1\n",
        ];
        let index = AstIndex::new(&tasks, &AstOptions::default()).unwrap();
        assert_eq!(index.tasks(), 2);
        let record =
            format!("{SOLUTION}\n\ndef other():\n    return [i * i for i in range(10) if i % 2]\n");
        let rates = index.match_rates_all(&[record.as_str()]);
        let mut p = PythonParser::new().unwrap();
        for &(t, r) in &rates[0] {
            assert!(
                (r - ast_match_rate(&mut p, tasks[t], &record, &AstOptions::default())).abs()
                    < 1e-12
            );
        }
        assert_eq!(rates[0].first(), Some(&(0, 1.0)));
    }

    #[test]
    fn absurd_nesting_is_skipped_not_a_stack_overflow() {
        let deep = format!("x = {}1{}", "(".repeat(5000), ")".repeat(5000));
        let mut p = PythonParser::new().unwrap();
        assert!(subtree_hashes(&mut p, &deep, 8).is_empty());
    }
}
