//! Cache keys and why they change.
//!
//! A key is blake3 over a stage's [`KeyParts`]: kind, kind version, canonical parameters, the
//! tree hashes of its inputs, the seed if the kind uses it, and extra parts the kind adds
//! through [`Fingerprint`] (external files, resolved revisions). Producer *names* are kept for
//! explanations but are not hashed, so renaming a stage or two identical stages share results;
//! a kind whose output names its inputs' producers opts in to hashing their tables and matrix
//! labels ([`crate::Stage::uses_input_labels`]). [`explain`] compares the parts of the last run
//! with the current ones and returns typed [`Change`]s, which display like cargo's fingerprint
//! messages: "parameter `steps` changed: 150 -> 100".

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::hashing::{hash_bytes, StatCache};

/// One artifact feeding an input slot.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InputPart {
    /// Producing stage instance (not hashed).
    pub stage: String,
    /// Producing output.
    pub output: String,
    /// Tree hash of the artifact.
    pub tree: String,
    /// The producing instance's manifest table (hashed only if [`KeyParts::input_labels`]).
    #[serde(default)]
    pub base: String,
    /// The producing instance's matrix assignment (hashed only if [`KeyParts::input_labels`]).
    #[serde(default)]
    pub labels: Vec<(String, String)>,
}

impl InputPart {
    fn producer(&self) -> ProducerOutput {
        ProducerOutput {
            stage: self.stage.clone(),
            output: self.output.clone(),
        }
    }

    fn labelled(&self) -> Labelled {
        Labelled {
            base: self.base.clone(),
            labels: self.labels.clone(),
        }
    }
}

/// Everything a key is made of.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct KeyParts {
    /// Stage kind.
    pub kind: String,
    /// Kind implementation version.
    pub version: String,
    /// Canonical parameters.
    pub params: serde_json::Value,
    /// Experiment seed, for kinds that use it.
    pub seed: Option<u64>,
    /// Inputs per slot.
    pub inputs: BTreeMap<String, Vec<InputPart>>,
    /// Extra parts from [`Fingerprint`], by label.
    pub extras: BTreeMap<String, String>,
    /// Whether the inputs' producer tables and matrix labels are hashed (the kind declares
    /// [`crate::Stage::uses_input_labels`]); otherwise only their outputs and trees are.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub input_labels: bool,
}

impl KeyParts {
    /// The cache key.
    pub fn key(&self) -> String {
        // Without input labels this is exactly the key of every version before them: caches
        // stay valid (a test pins one key).
        let inputs: BTreeMap<&String, Vec<serde_json::Value>> = self
            .inputs
            .iter()
            .map(|(slot, parts)| {
                let hashed = parts.iter().map(|p| {
                    if self.input_labels {
                        serde_json::json!([p.output, p.tree, p.base, p.labels])
                    } else {
                        serde_json::json!([p.output, p.tree])
                    }
                });
                (slot, hashed.collect())
            })
            .collect();
        let hashed = serde_json::json!({
            "kind": self.kind,
            "version": self.version,
            "params": self.params,
            "seed": self.seed,
            "inputs": inputs,
            "extras": self.extras,
        });
        hash_bytes(hashed.to_string().as_bytes())
    }
}

/// Collects the parts of a key that only the stage kind knows about.
pub struct Fingerprint<'a> {
    base_dir: &'a Path,
    stat_cache: &'a mut StatCache,
    pub(crate) extras: BTreeMap<String, String>,
}

impl<'a> Fingerprint<'a> {
    pub(crate) fn new(base_dir: &'a Path, stat_cache: &'a mut StatCache) -> Self {
        Self {
            base_dir,
            stat_cache,
            extras: BTreeMap::new(),
        }
    }

    /// The directory relative paths in the manifest are resolved against.
    pub fn base_dir(&self) -> &Path {
        self.base_dir
    }

    /// Resolves a manifest path against the manifest's directory.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        self.base_dir.join(path)
    }

    /// Adds the content hash of an external file or directory (through the stat cache).
    pub fn file(&mut self, label: &str, path: &Path) -> miette::Result<()> {
        let full = self.resolve(path);
        let hash = self
            .stat_cache
            .hash_path(&full)
            .map_err(|e| miette::miette!(help = "check the path in the manifest (relative paths start at the manifest's directory)", "cannot read {}: {e}", full.display()))?;
        self.extras.insert(format!("file:{label}"), hash);
        Ok(())
    }

    /// Adds a named value (a resolved revision, a tool version, …).
    pub fn value(&mut self, label: &str, value: impl std::fmt::Display) {
        self.extras.insert(label.to_string(), value.to_string());
    }
}

/// A producing instance's output, as explanations name it: `stage.output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProducerOutput {
    /// Producing stage instance.
    pub stage: String,
    /// Its output.
    pub output: String,
}

impl fmt::Display for ProducerOutput {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.stage, self.output)
    }
}

/// A producing instance's table and matrix labels: `grade[data=messy,seed=1]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Labelled {
    /// The producer's manifest table.
    pub base: String,
    /// Its matrix assignment, in declaration order.
    pub labels: Vec<(String, String)>,
}

impl fmt::Display for Labelled {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)?;
        if !self.labels.is_empty() {
            let labels: Vec<String> = self
                .labels
                .iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            write!(f, "[{}]", labels.join(","))?;
        }
        Ok(())
    }
}

/// How one named value differs between two keys' parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ValueChange {
    /// It is new, with this value.
    Added(String),
    /// Its value changed.
    Changed {
        /// The value before.
        old: String,
        /// The value now.
        new: String,
    },
    /// It is gone.
    Removed,
}

/// One reason why a stage's key differs from its last run's: what [`explain`] finds.
///
/// Displays as the line `pipeline plan` prints, e.g. ``parameter `steps` changed: 150 -> 100``.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// The stage's kind changed.
    Kind {
        /// The kind before.
        old: String,
        /// The kind now.
        new: String,
    },
    /// The kind's implementation version changed.
    Version {
        /// The kind.
        kind: String,
        /// The version before.
        old: String,
        /// The version now.
        new: String,
    },
    /// A parameter (dotted path into the canonical parameters) changed.
    Parameter {
        /// Its path, e.g. `opt.lr`.
        name: String,
        /// How.
        change: ValueChange,
    },
    /// The experiment seed changed (or the kind started or stopped using it).
    Seed {
        /// The seed before.
        old: Option<u64>,
        /// The seed now.
        new: Option<u64>,
    },
    /// An input slot is newly connected.
    InputAdded {
        /// The slot.
        slot: String,
    },
    /// An input slot is no longer connected.
    InputRemoved {
        /// The slot.
        slot: String,
    },
    /// An input slot now reads other producers.
    InputProducers {
        /// The slot.
        slot: String,
        /// Its producers now.
        now: Vec<ProducerOutput>,
        /// Its producers before.
        was: Vec<ProducerOutput>,
    },
    /// An input slot's producers are labelled differently (a renamed table or matrix key), for
    /// a kind whose output uses the labels.
    InputLabels {
        /// The slot.
        slot: String,
        /// The labels now.
        now: Vec<Labelled>,
        /// The labels before.
        was: Vec<Labelled>,
    },
    /// The same producers produced different output.
    InputContent {
        /// The slot.
        slot: String,
        /// Its producers.
        producers: Vec<ProducerOutput>,
    },
    /// An extra part from [`Fingerprint`] (an external file, a resolved revision) changed.
    Dependency {
        /// Its label, e.g. `file:path`.
        label: String,
        /// How.
        change: ValueChange,
    },
    /// The keys differ, but no part does (a change in how keys are computed).
    Unexplained,
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(T::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn fmt_value_change(
    f: &mut fmt::Formatter<'_>,
    what: &str,
    name: &str,
    change: &ValueChange,
) -> fmt::Result {
    match change {
        ValueChange::Added(v) => write!(f, "{what} `{name}` added ({v})"),
        ValueChange::Changed { old, new } => {
            write!(
                f,
                "{what} `{name}` changed: {} -> {}",
                short(old),
                short(new)
            )
        }
        ValueChange::Removed => write!(f, "{what} `{name}` removed"),
    }
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Kind { old, new } => write!(f, "kind changed: {old} -> {new}"),
            Self::Version { kind, old, new } => write!(
                f,
                "implementation of `{kind}` changed: version {old} -> {new}"
            ),
            Self::Parameter { name, change } => fmt_value_change(f, "parameter", name, change),
            Self::Seed { old, new } => write!(f, "seed changed: {old:?} -> {new:?}"),
            Self::InputAdded { slot } => write!(f, "input `{slot}` added"),
            Self::InputRemoved { slot } => write!(f, "input `{slot}` removed"),
            Self::InputProducers { slot, now, was } => write!(
                f,
                "input `{slot}` now comes from {} (was {})",
                list(now),
                list(was)
            ),
            Self::InputLabels { slot, now, was } => write!(
                f,
                "input `{slot}` now labelled {} (was {})",
                list(now),
                list(was)
            ),
            Self::InputContent { slot, producers } => write!(
                f,
                "input `{slot}` changed: {} produced different output",
                list(producers)
            ),
            Self::Dependency { label, change } => fmt_value_change(f, "dependency", label, change),
            Self::Unexplained => f.write_str("key ingredients changed"),
        }
    }
}

fn flatten(prefix: &str, value: &serde_json::Value, out: &mut BTreeMap<String, String>) {
    match value {
        serde_json::Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                let key = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten(&key, v, out);
            }
        }
        other => {
            out.insert(prefix.to_string(), other.to_string());
        }
    }
}

/// What differs between two maps of named values, in key order (removals last).
fn diff_maps(
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
) -> Vec<(String, ValueChange)> {
    let mut out = Vec::new();
    for (k, v) in new {
        match old.get(k) {
            None => out.push((k.clone(), ValueChange::Added(v.clone()))),
            Some(o) if o != v => out.push((
                k.clone(),
                ValueChange::Changed {
                    old: o.clone(),
                    new: v.clone(),
                },
            )),
            _ => {}
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        out.push((k.clone(), ValueChange::Removed));
    }
    out
}

fn short(s: &str) -> String {
    let looks_hash = s.len() == 64 && s.chars().all(|c| c.is_ascii_hexdigit());
    if looks_hash {
        s[..12].to_string()
    } else if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s.to_string()
    }
}

/// How the artifacts of one connected slot differ: other producers, other labels (only where
/// they are hashed), or the same producers with other content.
fn input_changes(slot: &str, was: &[InputPart], now: &[InputPart], labelled: bool) -> Vec<Change> {
    let producers = |parts: &[InputPart]| parts.iter().map(InputPart::producer).collect::<Vec<_>>();
    let (was_from, now_from) = (producers(was), producers(now));
    if was_from != now_from {
        return vec![Change::InputProducers {
            slot: slot.to_string(),
            now: now_from,
            was: was_from,
        }];
    }
    let mut out = Vec::new();
    let labels = |parts: &[InputPart]| parts.iter().map(InputPart::labelled).collect::<Vec<_>>();
    if labelled && labels(was) != labels(now) {
        out.push(Change::InputLabels {
            slot: slot.to_string(),
            now: labels(now),
            was: labels(was),
        });
    }
    let trees = |parts: &[InputPart]| parts.iter().map(|p| p.tree.clone()).collect::<Vec<_>>();
    if trees(was) != trees(now) {
        out.push(Change::InputContent {
            slot: slot.to_string(),
            producers: now_from,
        });
    }
    out
}

/// Why `new` differs from `old` (empty if the keys are equal).
pub fn explain(old: &KeyParts, new: &KeyParts) -> Vec<Change> {
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(Change::Kind {
            old: old.kind.clone(),
            new: new.kind.clone(),
        });
    }
    if old.version != new.version {
        out.push(Change::Version {
            kind: new.kind.clone(),
            old: old.version.clone(),
            new: new.version.clone(),
        });
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &old.params, &mut a);
    flatten("", &new.params, &mut b);
    out.extend(
        diff_maps(&a, &b)
            .into_iter()
            .map(|(name, change)| Change::Parameter { name, change }),
    );
    if old.seed != new.seed {
        out.push(Change::Seed {
            old: old.seed,
            new: new.seed,
        });
    }
    for (slot, parts) in &new.inputs {
        match old.inputs.get(slot) {
            None => out.push(Change::InputAdded { slot: slot.clone() }),
            Some(prev) => out.extend(input_changes(slot, prev, parts, new.input_labels)),
        }
    }
    for slot in old.inputs.keys().filter(|s| !new.inputs.contains_key(*s)) {
        out.push(Change::InputRemoved { slot: slot.clone() });
    }
    out.extend(
        diff_maps(&old.extras, &new.extras)
            .into_iter()
            .map(|(label, change)| Change::Dependency { label, change }),
    );
    if out.is_empty() && old.key() != new.key() {
        out.push(Change::Unexplained);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(steps: u64) -> KeyParts {
        KeyParts {
            kind: "train".into(),
            version: "1".into(),
            params: serde_json::json!({"steps": steps, "opt": {"lr": 0.1}}),
            seed: Some(1),
            inputs: [(
                "data".to_string(),
                vec![InputPart {
                    stage: "a".into(),
                    output: "out".into(),
                    tree: "t1".into(),
                    base: "a".into(),
                    labels: Vec::new(),
                }],
            )]
            .into(),
            extras: BTreeMap::new(),
            input_labels: false,
        }
    }

    fn texts(changes: &[Change]) -> Vec<String> {
        changes.iter().map(Change::to_string).collect()
    }

    #[test]
    fn explains_parameter_and_input_changes() {
        let old = parts(150);
        let mut new = parts(100);
        new.inputs.get_mut("data").unwrap()[0].tree = "t2".into();
        let why = explain(&old, &new);
        assert_eq!(
            why[0],
            Change::Parameter {
                name: "steps".into(),
                change: ValueChange::Changed {
                    old: "150".into(),
                    new: "100".into()
                }
            }
        );
        assert_eq!(
            texts(&why),
            [
                "parameter `steps` changed: 150 -> 100",
                "input `data` changed: a.out produced different output"
            ]
        );
        assert_ne!(old.key(), new.key());
    }

    #[test]
    fn explains_every_kind_of_change_in_the_words_plan_prints() {
        let old = parts(1);
        let mut new = parts(1);
        new.version = "2".into();
        new.params = serde_json::json!({"steps": 1, "batch": 4});
        new.seed = None;
        new.inputs.get_mut("data").unwrap()[0].stage = "b@x".into();
        new.inputs.insert("more".into(), Vec::new());
        new.extras.insert("file:path".into(), "a".repeat(64));
        assert_eq!(
            texts(&explain(&old, &new)),
            [
                "implementation of `train` changed: version 1 -> 2",
                "parameter `batch` added (4)",
                "parameter `opt.lr` removed",
                "seed changed: Some(1) -> None",
                "input `data` now comes from b@x.out (was a.out)",
                "input `more` added",
                "dependency `file:path` added (aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa)",
            ]
        );
        let mut newer = new.clone();
        newer.extras.insert("file:path".into(), "b".repeat(64));
        assert_eq!(
            texts(&explain(&new, &newer)),
            ["dependency `file:path` changed: aaaaaaaaaaaa -> bbbbbbbbbbbb"]
        );
    }

    #[test]
    fn key_is_pinned() {
        // Keys of existing caches must not move: this is the key of `parts(150)` as computed
        // before input labels existed. Change it only together with a stated reason.
        assert_eq!(
            parts(150).key(),
            "672ade906b735f092b0498c4c2ba9b0db98a423826af57bada494209c76cebf7"
        );
    }

    #[test]
    fn producer_name_is_not_part_of_the_key() {
        let a = parts(1);
        let mut b = parts(1);
        let input = &mut b.inputs.get_mut("data").unwrap()[0];
        input.stage = "renamed@x".into();
        input.base = "renamed".into();
        input.labels = vec![("data".into(), "x".into())];
        assert_eq!(a.key(), b.key());
    }

    #[test]
    fn input_labels_are_part_of_the_key_of_kinds_that_use_them() {
        let mut a = parts(1);
        a.input_labels = true;
        assert_ne!(a.key(), parts(1).key(), "opting in changes the key");
        // Renaming the matrix key (the instance name stays `a@x`): same content, new labels.
        let labelled = |key: &str| {
            let mut p = a.clone();
            let input = &mut p.inputs.get_mut("data").unwrap()[0];
            input.stage = "a@x".into();
            input.labels = vec![(key.into(), "x".into())];
            p
        };
        let (old, new) = (labelled("data"), labelled("dataset"));
        assert_ne!(old.key(), new.key());
        assert_eq!(
            texts(&explain(&old, &new)),
            ["input `data` now labelled a[dataset=x] (was a[data=x])"]
        );
        // Without the opt-in the same rename is no change at all.
        let (mut old, mut new) = (old, new);
        old.input_labels = false;
        new.input_labels = false;
        assert_eq!(old.key(), new.key());
        assert!(explain(&old, &new).is_empty());
    }

    #[test]
    fn records_without_labels_still_read() {
        let json = serde_json::json!({
            "kind": "k", "version": "1", "params": {}, "seed": null, "extras": {},
            "inputs": {"data": [{"stage": "a", "output": "out", "tree": "t"}]},
        });
        let parts: KeyParts = serde_json::from_value(json).unwrap();
        assert!(!parts.input_labels);
        assert_eq!(parts.inputs["data"][0].base, "");
        let written = serde_json::to_value(&parts).unwrap();
        assert!(written.get("input_labels").is_none(), "{written}");
    }
}
