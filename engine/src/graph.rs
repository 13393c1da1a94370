//! The stage graph of an expanded manifest: ordering and rendering.

use std::collections::HashMap;

use serde::Serialize;

use crate::dag::Dag;
use crate::manifest::Manifest;

/// Stage instances as a DAG: node `i` is `Manifest::stages[i]`.
pub struct StageGraph {
    dag: Dag,
}

impl StageGraph {
    /// Builds the graph (the manifest loader has already rejected cycles).
    pub fn new(manifest: &Manifest) -> Self {
        let index: HashMap<_, usize> = manifest
            .stages
            .iter()
            .enumerate()
            .map(|(i, s)| (&s.name, i))
            .collect();
        let mut dag = Dag::new(manifest.stages.len());
        for (consumer, s) in manifest.stages.iter().enumerate() {
            for r in s.inputs.values().flatten() {
                if let Some(&producer) = index.get(&r.stage) {
                    dag.add_edge(producer, consumer);
                }
            }
        }
        Self { dag }
    }

    /// Stage indices in a dependency order (manifest order among independent stages).
    pub fn order(&self) -> Vec<usize> {
        self.dag.order()
    }

    /// Indices of the direct producers of stage `i`.
    pub fn producers(&self, i: usize) -> Vec<usize> {
        self.dag.producers(i)
    }

    /// Indices of `roots` and everything upstream of them.
    pub fn upstream_closure(&self, roots: &[usize]) -> Vec<bool> {
        self.dag.upstream_closure(roots)
    }

    /// Every edge `(producer, consumer)`, sorted.
    pub fn edges(&self) -> Vec<(usize, usize)> {
        self.dag.edges()
    }
}

/// Output formats of `pipeline dag`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DagFormat {
    /// Indented text.
    Text,
    /// Graphviz.
    Dot,
    /// Mermaid flowchart.
    Mermaid,
    /// `{"nodes": [...], "edges": [[from, to], ...]}`.
    Json,
}

#[derive(Serialize)]
struct JsonNode<'a> {
    name: &'a str,
    kind: &'a str,
    base: &'a str,
    matrix: std::collections::BTreeMap<&'a str, &'a str>,
}

/// Renders the expanded graph.
pub fn render(manifest: &Manifest, format: DagFormat) -> String {
    let g = StageGraph::new(manifest);
    let edges = g.edges();
    let names: Vec<String> = manifest.stages.iter().map(|s| s.name.to_string()).collect();
    let name = |i: usize| names[i].as_str();
    match format {
        DagFormat::Json => {
            let nodes: Vec<JsonNode> = manifest
                .stages
                .iter()
                .enumerate()
                .map(|(i, s)| JsonNode {
                    name: name(i),
                    kind: s.kind,
                    base: &s.name.base,
                    matrix: s.name.labels().collect(),
                })
                .collect();
            let edges: Vec<[&str; 2]> = edges.iter().map(|&(a, b)| [name(a), name(b)]).collect();
            serde_json::json!({ "nodes": nodes, "edges": edges }).to_string()
        }
        DagFormat::Dot => {
            let mut out = format!(
                "digraph \"{}\" {{\n  rankdir=LR;\n",
                manifest.experiment.name.replace('"', "'")
            );
            for s in &manifest.stages {
                out.push_str(&format!(
                    "  \"{}\" [label=\"{}\\n({})\"];\n",
                    s.name, s.name, s.kind
                ));
            }
            for (a, b) in &edges {
                out.push_str(&format!("  \"{}\" -> \"{}\";\n", name(*a), name(*b)));
            }
            out.push_str("}\n");
            out
        }
        DagFormat::Mermaid => {
            let id = |i: usize| format!("s{i}");
            let mut out = String::from("flowchart LR\n");
            for (i, s) in manifest.stages.iter().enumerate() {
                out.push_str(&format!(
                    "  {}[\"{}<br/><small>{}</small>\"]\n",
                    id(i),
                    s.name,
                    s.kind
                ));
            }
            for (a, b) in &edges {
                out.push_str(&format!("  {} --> {}\n", id(*a), id(*b)));
            }
            out
        }
        DagFormat::Text => {
            let mut out = String::new();
            for i in g.order() {
                let s = &manifest.stages[i];
                out.push_str(&format!("{} ({})", s.name, s.kind));
                let inputs: Vec<String> = s
                    .inputs
                    .iter()
                    .flat_map(|(slot, refs)| {
                        refs.iter()
                            .map(move |r| format!("{slot} <- {}.{}", r.stage, r.output))
                    })
                    .collect();
                if !inputs.is_empty() {
                    out.push_str(&format!("\n    {}", inputs.join("\n    ")));
                }
                out.push('\n');
            }
            out
        }
    }
}
