//! Cache keys and why they change.
//!
//! A key is blake3 over a stage's [`KeyParts`]: kind, kind version, canonical parameters, the
//! tree hashes of its inputs, the seed if the kind uses it, and extra parts the kind adds
//! through [`Fingerprint`] (external files, resolved revisions). Producer *names* are kept for
//! explanations but are not hashed, so renaming a stage or two identical stages share results.
//! [`explain`] compares the parts of the last run with the current ones, like cargo's
//! fingerprint messages: "parameter `steps` changed: 150 -> 100".

use std::collections::BTreeMap;
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
}

impl KeyParts {
    /// The cache key.
    pub fn key(&self) -> String {
        let inputs: BTreeMap<&String, Vec<(&str, &str)>> = self
            .inputs
            .iter()
            .map(|(slot, parts)| {
                (
                    slot,
                    parts
                        .iter()
                        .map(|p| (p.output.as_str(), p.tree.as_str()))
                        .collect(),
                )
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

fn diff_maps(
    what: &str,
    old: &BTreeMap<String, String>,
    new: &BTreeMap<String, String>,
    out: &mut Vec<String>,
) {
    for (k, v) in new {
        match old.get(k) {
            None => out.push(format!("{what} `{k}` added ({v})")),
            Some(o) if o != v => out.push(format!(
                "{what} `{k}` changed: {} -> {}",
                short(o),
                short(v)
            )),
            _ => {}
        }
    }
    for k in old.keys().filter(|k| !new.contains_key(*k)) {
        out.push(format!("{what} `{k}` removed"));
    }
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

/// Human-readable reasons why `new` differs from `old` (empty if the keys are equal).
pub fn explain(old: &KeyParts, new: &KeyParts) -> Vec<String> {
    let mut out = Vec::new();
    if old.kind != new.kind {
        out.push(format!("kind changed: {} -> {}", old.kind, new.kind));
    }
    if old.version != new.version {
        out.push(format!(
            "implementation of `{}` changed: version {} -> {}",
            new.kind, old.version, new.version
        ));
    }
    let (mut a, mut b) = (BTreeMap::new(), BTreeMap::new());
    flatten("", &old.params, &mut a);
    flatten("", &new.params, &mut b);
    diff_maps("parameter", &a, &b, &mut out);
    if old.seed != new.seed {
        out.push(format!("seed changed: {:?} -> {:?}", old.seed, new.seed));
    }
    for (slot, parts) in &new.inputs {
        match old.inputs.get(slot) {
            None => out.push(format!("input `{slot}` added")),
            Some(prev) if prev != parts => {
                let names: Vec<String> = parts
                    .iter()
                    .map(|p| format!("{}.{}", p.stage, p.output))
                    .collect();
                let prev_names: Vec<String> = prev
                    .iter()
                    .map(|p| format!("{}.{}", p.stage, p.output))
                    .collect();
                if names != prev_names {
                    out.push(format!(
                        "input `{slot}` now comes from {} (was {})",
                        names.join(", "),
                        prev_names.join(", ")
                    ));
                } else {
                    out.push(format!(
                        "input `{slot}` changed: {} produced different output",
                        names.join(", ")
                    ));
                }
            }
            _ => {}
        }
    }
    for slot in old.inputs.keys().filter(|s| !new.inputs.contains_key(*s)) {
        out.push(format!("input `{slot}` removed"));
    }
    diff_maps("dependency", &old.extras, &new.extras, &mut out);
    if out.is_empty() && old.key() != new.key() {
        out.push("key ingredients changed".to_string());
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
                }],
            )]
            .into(),
            extras: BTreeMap::new(),
        }
    }

    #[test]
    fn explains_parameter_and_input_changes() {
        let old = parts(150);
        let mut new = parts(100);
        new.inputs.get_mut("data").unwrap()[0].tree = "t2".into();
        let why = explain(&old, &new);
        assert_eq!(
            why,
            vec![
                "parameter `steps` changed: 150 -> 100".to_string(),
                "input `data` changed: a.out produced different output".to_string()
            ]
        );
        assert_ne!(old.key(), new.key());
    }

    #[test]
    fn key_is_pinned() {
        // Keys of existing caches must not move: this is the key of `parts(150)` as computed
        // before input labels existed. Change it only together with a stated reason.
        assert_eq!(parts(150).key(), "672ade906b735f092b0498c4c2ba9b0db98a423826af57bada494209c76cebf7");
    }

    #[test]
    fn producer_name_is_not_part_of_the_key() {
        let a = parts(1);
        let mut b = parts(1);
        b.inputs.get_mut("data").unwrap()[0].stage = "renamed".into();
        assert_eq!(a.key(), b.key());
    }
}
