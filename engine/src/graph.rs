//! The stage graph of an expanded manifest: ordering and rendering.

use petgraph::graph::{DiGraph, NodeIndex};
use serde::Serialize;

use crate::manifest::Manifest;

/// Stage instances as a DAG (edges producer -> consumer).
pub struct StageGraph {
    /// Node weights are indices into `Manifest::stages`.
    pub graph: DiGraph<usize, ()>,
    nodes: Vec<NodeIndex>,
}

impl StageGraph {
    /// Builds the graph (the manifest loader has already rejected cycles).
    pub fn new(manifest: &Manifest) -> Self {
        let mut graph = DiGraph::new();
        let nodes: Vec<_> = (0..manifest.stages.len())
            .map(|i| graph.add_node(i))
            .collect();
        for (i, s) in manifest.stages.iter().enumerate() {
            for refs in s.inputs.values() {
                for r in refs {
                    if let Some(j) = manifest.stages.iter().position(|p| p.name == r.stage) {
                        graph.update_edge(nodes[j], nodes[i], ());
                    }
                }
            }
        }
        Self { graph, nodes }
    }

    /// Stage indices in a dependency order (manifest order among independent stages).
    pub fn order(&self) -> Vec<usize> {
        let mut order = Vec::with_capacity(self.nodes.len());
        let mut indegree: Vec<usize> = self
            .nodes
            .iter()
            .map(|n| {
                self.graph
                    .neighbors_directed(*n, petgraph::Incoming)
                    .count()
            })
            .collect();
        let mut done = vec![false; self.nodes.len()];
        while order.len() < self.nodes.len() {
            let Some(next) = (0..self.nodes.len()).find(|&i| !done[i] && indegree[i] == 0) else {
                break;
            };
            done[next] = true;
            order.push(next);
            for m in self
                .graph
                .neighbors_directed(self.nodes[next], petgraph::Outgoing)
            {
                indegree[self.graph[m]] -= 1;
            }
        }
        order
    }

    /// Indices of the direct producers of stage `i`.
    pub fn producers(&self, i: usize) -> Vec<usize> {
        self.graph
            .neighbors_directed(self.nodes[i], petgraph::Incoming)
            .map(|n| self.graph[n])
            .collect()
    }

    /// Indices of `roots` and everything upstream of them.
    pub fn upstream_closure(&self, roots: &[usize]) -> Vec<bool> {
        let mut keep = vec![false; self.nodes.len()];
        let mut stack: Vec<usize> = roots.to_vec();
        while let Some(i) = stack.pop() {
            if !std::mem::replace(&mut keep[i], true) {
                stack.extend(self.producers(i));
            }
        }
        keep
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
    let mut edges: Vec<(usize, usize)> = g
        .graph
        .edge_indices()
        .filter_map(|e| g.graph.edge_endpoints(e))
        .map(|(a, b)| (g.graph[a], g.graph[b]))
        .collect();
    edges.sort_unstable();
    let name = |i: usize| manifest.stages[i].name.as_str();
    match format {
        DagFormat::Json => {
            let nodes: Vec<JsonNode> = manifest
                .stages
                .iter()
                .map(|s| JsonNode {
                    name: &s.name,
                    kind: s.kind,
                    base: &s.base,
                    matrix: s
                        .matrix
                        .iter()
                        .map(|(k, v)| (k.as_str(), v.as_str()))
                        .collect(),
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
