//! Naming the variants a report compares, from what the engine says produced each input: the
//! producing manifest table (`grade-base`) and its matrix values (`data = "messy", seed = 1`).

/// What produced one input of the report: the producing stage's manifest table and the matrix
/// assignment of the instance (key -> value, in declaration order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Producer {
    /// The manifest table, e.g. `grade-base` or `grade`.
    pub base: String,
    /// The instance's matrix values, e.g. `[("data", "messy"), ("seed", "1")]`.
    pub labels: Vec<(String, String)>,
}

impl Producer {
    /// A producer without a matrix.
    pub fn plain(base: &str) -> Self {
        Self {
            base: base.to_string(),
            labels: Vec::new(),
        }
    }

    /// A producer with matrix values.
    pub fn with_labels(base: &str, labels: &[(&str, &str)]) -> Self {
        Self {
            base: base.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// The instance name the engine gives it (`grade@messy,1`), for messages.
    pub fn instance_name(&self) -> String {
        if self.labels.is_empty() {
            self.base.clone()
        } else {
            let values: Vec<&str> = self.labels.iter().map(|(_, v)| v.as_str()).collect();
            format!("{}@{}", self.base, values.join(","))
        }
    }

    /// The instance's value of matrix key `key` (empty when it has none).
    pub fn label(&self, key: &str) -> String {
        self.labels
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    }

    /// Whether every matrix value of `self` is one of `other`'s (and `self` has some): the
    /// training run `train@messy,1` produced the graded variant `grade@messy,1,humaneval`.
    pub fn is_ancestor_of(&self, other: &Producer) -> bool {
        !self.labels.is_empty() && self.labels.iter().all(|kv| other.labels.contains(kv))
    }
}

/// Names for the variants `producers` made, in order: what tells them apart. The leading
/// `-`-separated words that every table name shares are dropped (the `grade` of `grade-base`,
/// `grade-greedy` and `grade`), the rest is joined with the matrix values:
/// `grade-base` + `humaneval` -> `base,humaneval`, `grade` + `messy, 1` -> `messy,1`. A name
/// that would be empty, or the same as another's, is the instance name itself (numbered if
/// that, too, repeats).
pub fn variant_names(producers: &[Producer]) -> Vec<String> {
    let words: Vec<Vec<&str>> = producers
        .iter()
        .map(|p| p.base.split('-').collect())
        .collect();
    let shared = match words.split_first() {
        Some((first, rest)) => (0..first.len())
            .take_while(|&i| rest.iter().all(|w| w.get(i) == first.get(i)))
            .count(),
        None => 0,
    };
    let mut names: Vec<String> = producers
        .iter()
        .zip(&words)
        .map(|(p, w)| {
            let own = w[shared.min(w.len())..].join("-");
            std::iter::once(own.as_str())
                .chain(p.labels.iter().map(|(_, v)| v.as_str()))
                .filter(|part| !part.is_empty())
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    let own = names.clone();
    for (i, name) in names.iter_mut().enumerate() {
        if name.is_empty() || own.iter().filter(|n| *n == name).count() > 1 {
            *name = producers[i].instance_name();
        }
    }
    // Two inputs from the same instance (possible outside a manifest) stay apart too.
    for i in 1..names.len() {
        if names[..i].contains(&names[i]) {
            names[i] = format!("{} #{}", names[i], i + 1);
        }
    }
    names
}

/// Of `candidates` (training runs), the one that produced graded variant `graded`: the most
/// specific whose matrix values are all among the variant's.
pub fn ancestor_of<'c, T>(
    graded: &Producer,
    candidates: &'c [(Producer, T)],
) -> Option<&'c (Producer, T)> {
    candidates
        .iter()
        .filter(|(p, _)| p.is_ancestor_of(graded))
        .max_by_key(|(p, _)| p.labels.len())
}
