//! A directed acyclic graph over numbered nodes: ordering, cycles, upstream closures. The
//! manifest orders its tables with it, [`crate::graph::StageGraph`] its stage instances.

use petgraph::graph::{DiGraph, NodeIndex};

/// A directed graph over the nodes `0..n` (edges producer -> consumer) that orders them and
/// finds cycles: the one place both manifest tables and stage instances are ordered.
pub struct Dag {
    graph: DiGraph<usize, ()>,
    nodes: Vec<NodeIndex>,
}

impl Dag {
    /// A graph of `n` nodes and no edges.
    pub fn new(n: usize) -> Self {
        let mut graph = DiGraph::new();
        let nodes = (0..n).map(|i| graph.add_node(i)).collect();
        Self { graph, nodes }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether the graph has no nodes.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Adds the edge `from -> to` (`to` depends on `from`); adding it twice changes nothing.
    pub fn add_edge(&mut self, from: usize, to: usize) {
        self.graph.update_edge(self.nodes[from], self.nodes[to], ());
    }

    /// Every edge as `(from, to)`, sorted.
    pub fn edges(&self) -> Vec<(usize, usize)> {
        let mut edges: Vec<(usize, usize)> = self
            .graph
            .edge_indices()
            .filter_map(|e| self.graph.edge_endpoints(e))
            .map(|(a, b)| (self.graph[a], self.graph[b]))
            .collect();
        edges.sort_unstable();
        edges
    }

    /// Nodes in a dependency order, the lowest-numbered ready node first (so manifest order
    /// among independent stages). Nodes on or behind a cycle are left out.
    pub fn order(&self) -> Vec<usize> {
        let n = self.nodes.len();
        let mut order = Vec::with_capacity(n);
        let mut indegree: Vec<usize> = self
            .nodes
            .iter()
            .map(|&node| {
                self.graph
                    .neighbors_directed(node, petgraph::Incoming)
                    .count()
            })
            .collect();
        let mut done = vec![false; n];
        while let Some(next) = (0..n).find(|&i| !done[i] && indegree[i] == 0) {
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

    /// Every cycle (a strongly connected set of nodes, or a node depending on itself), each
    /// as its nodes in ascending order.
    pub fn cycles(&self) -> Vec<Vec<usize>> {
        petgraph::algo::tarjan_scc(&self.graph)
            .into_iter()
            .filter(|scc| scc.len() > 1 || self.graph.contains_edge(scc[0], scc[0]))
            .map(|scc| {
                let mut members: Vec<usize> = scc.iter().map(|n| self.graph[*n]).collect();
                members.sort_unstable();
                members
            })
            .collect()
    }

    /// The direct producers of node `i`.
    pub fn producers(&self, i: usize) -> Vec<usize> {
        self.graph
            .neighbors_directed(self.nodes[i], petgraph::Incoming)
            .map(|n| self.graph[n])
            .collect()
    }

    /// `roots` and everything upstream of them, as a membership mask.
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

#[cfg(test)]
mod tests {
    use super::*;

    fn dag(n: usize, edges: &[(usize, usize)]) -> Dag {
        let mut dag = Dag::new(n);
        for &(from, to) in edges {
            dag.add_edge(from, to);
        }
        dag
    }

    #[test]
    fn order_puts_producers_first_and_keeps_index_order_otherwise() {
        // 3 -> 0 -> 2, 1 alone.
        let g = dag(4, &[(3, 0), (0, 2)]);
        assert_eq!(g.order(), [1, 3, 0, 2]);
        assert_eq!(dag(3, &[]).order(), [0, 1, 2]);
        assert!(g.cycles().is_empty());
        assert_eq!(g.edges(), [(0, 2), (3, 0)]);
    }

    #[test]
    fn cycles_are_found_with_their_members_and_left_out_of_the_order() {
        // 0 -> 1 -> 2 -> 0, 3 -> 3, 4 after the cycle, 5 alone.
        let g = dag(6, &[(0, 1), (1, 2), (2, 0), (3, 3), (2, 4)]);
        let mut cycles = g.cycles();
        cycles.sort();
        assert_eq!(cycles, [vec![0, 1, 2], vec![3]]);
        assert_eq!(g.order(), [5]);
    }

    #[test]
    fn upstream_closure_follows_producers_only() {
        // 0 -> 1 -> 3, 2 -> 3, 3 -> 4.
        let g = dag(5, &[(0, 1), (1, 3), (2, 3), (3, 4)]);
        assert_eq!(g.upstream_closure(&[1]), [true, true, false, false, false]);
        assert_eq!(g.upstream_closure(&[3]), [true, true, true, true, false]);
        let mut producers = g.producers(3);
        producers.sort_unstable();
        assert_eq!(producers, [1, 2]);
        let mut twice = Dag::new(2);
        twice.add_edge(0, 1);
        twice.add_edge(0, 1);
        assert_eq!(twice.edges().len(), 1);
    }
}
