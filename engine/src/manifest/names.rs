//! Names of stage instances and references to them, parsed once into types.
//!
//! A manifest table `train` with `matrix.data = ["textbook", "messy"]` expands into the
//! instances `train@textbook` and `train@messy`: an [`InstanceName`] is the table plus the
//! matrix assignment, and its text form is derived from it, never parsed back. What users write
//! (`--only train`, `--set train@messy.lr=...`, `inputs = { tokens = "tokens@messy.out" }`)
//! is parsed once into a [`Selector`] or a [`StageRef`].

use std::collections::HashMap;
use std::fmt;

use serde::{Serialize, Serializer};

/// The name of one stage instance: its manifest table and its matrix assignment.
///
/// Displays as `base` without a matrix, else `base@v1,v2` (values in declaration order).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct InstanceName {
    /// The manifest table it came from, e.g. `train`.
    pub base: String,
    /// Matrix assignment (key, value), in declaration order; empty without a matrix.
    pub matrix: Vec<(String, String)>,
}

impl InstanceName {
    /// The instance of table `base` with matrix assignment `matrix`.
    pub fn new(base: impl Into<String>, matrix: Vec<(String, String)>) -> Self {
        Self {
            base: base.into(),
            matrix,
        }
    }

    /// The single instance of a table without a matrix.
    pub fn plain(base: impl Into<String>) -> Self {
        Self::new(base, Vec::new())
    }

    /// The matrix values, in declaration order (what the text form shows after `@`); a table
    /// value's fields (`data.records`) are not among them.
    pub fn values(&self) -> impl Iterator<Item = &str> + '_ {
        self.labels().map(|(_, v)| v)
    }

    /// The (key, value) pairs that name this instance: its assignment without table fields.
    pub fn labels(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.matrix
            .iter()
            .filter(|(k, _)| !super::matrix::is_derived(k))
            .map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Whether `text` (a base name or a full instance name, as given to `--only`, `--force`
    /// or `--set`) selects this instance.
    pub fn selected_by(&self, text: &str) -> bool {
        Selector::parse(text).matches(self)
    }

    /// The name with `@` and `,` replaced by `_`, for file names.
    pub fn file_stem(&self) -> String {
        std::iter::once(self.base.as_str())
            .chain(self.values())
            .collect::<Vec<_>>()
            .join("_")
    }
}

impl fmt::Display for InstanceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)?;
        for (i, value) in self.values().enumerate() {
            f.write_str(if i == 0 { "@" } else { "," })?;
            f.write_str(value)?;
        }
        Ok(())
    }
}

impl PartialEq<str> for InstanceName {
    fn eq(&self, text: &str) -> bool {
        let Some(rest) = text.strip_prefix(self.base.as_str()) else {
            return false;
        };
        if self.values().next().is_none() {
            return rest.is_empty();
        }
        rest.strip_prefix('@')
            .is_some_and(|variant| variant.split(',').eq(self.values()))
    }
}

impl PartialEq<&str> for InstanceName {
    fn eq(&self, text: &&str) -> bool {
        *self == **text
    }
}

impl Serialize for InstanceName {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

/// A table or one of its instances, as a user writes it: `train` (every instance of the table)
/// or `train@messy` (one instance).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selector {
    /// The manifest table.
    pub base: String,
    /// The matrix values after `@`, if given.
    pub variant: Option<Vec<String>>,
}

impl Selector {
    /// Parses `base` or `base@v1,v2`.
    pub fn parse(text: &str) -> Self {
        match text.split_once('@') {
            None => Self {
                base: text.to_string(),
                variant: None,
            },
            Some((base, variant)) => Self {
                base: base.to_string(),
                variant: Some(variant.split(',').map(str::to_string).collect()),
            },
        }
    }

    /// Whether `name` is selected: same table, and the same values if a variant is given.
    pub fn matches(&self, name: &InstanceName) -> bool {
        self.base == name.base
            && self
                .variant
                .as_ref()
                .is_none_or(|values| values.iter().map(String::as_str).eq(name.values()))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)?;
        if let Some(values) = &self.variant {
            write!(f, "@{}", values.join(","))?;
        }
        Ok(())
    }
}

/// A reference in a stage's `inputs`: `stage`, `stage.output`, `stage@variant` or
/// `stage@variant.output`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageRef {
    /// The producing table or instance.
    pub target: Selector,
    /// The output, if named (else the producer's first output).
    pub output: Option<String>,
}

impl StageRef {
    /// Parses a reference (after `${key}` substitution).
    pub fn parse(text: &str) -> Self {
        let (target, output) = match text.split_once('.') {
            Some((target, output)) => (target, Some(output.to_string())),
            None => (text, None),
        };
        Self {
            target: Selector::parse(target),
            output,
        }
    }
}

impl fmt::Display for StageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.target)?;
        if let Some(output) = &self.output {
            write!(f, ".{output}")?;
        }
        Ok(())
    }
}

/// Whether `name` can be a stage name or a matrix value (both become part of instance names,
/// where `@`, `,` and `.` have a meaning).
pub(crate) fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn assign(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn instance_names_display_values_in_declaration_order() {
        assert_eq!(InstanceName::plain("train").to_string(), "train");
        let name = InstanceName::new("grade", assign(&[("data", "messy"), ("seed", "1")]));
        assert_eq!(name.to_string(), "grade@messy,1");
        assert_eq!(name.file_stem(), "grade_messy_1");
        assert!(name == "grade@messy,1");
        assert!(name != "grade@messy");
        assert!(name != "grade");
        assert!(InstanceName::plain("grade") == "grade");
        assert!(InstanceName::plain("grade") != "grades");
    }

    #[test]
    fn selectors_pick_a_table_or_one_instance() {
        let messy = InstanceName::new("train", assign(&[("data", "messy")]));
        let clean = InstanceName::new("train", assign(&[("data", "clean")]));
        assert!(messy.selected_by("train") && clean.selected_by("train"));
        assert!(messy.selected_by("train@messy") && !clean.selected_by("train@messy"));
        assert!(!messy.selected_by("tra"));
        assert!(!messy.selected_by("train@messy,1"));
        assert!(InstanceName::plain("a").selected_by("a"));
        assert!(!InstanceName::plain("a").selected_by("a@"));
    }

    #[test]
    fn references_parse_once_and_display_as_written() {
        for text in [
            "w",
            "w.out",
            "w@a",
            "w@a,b.out",
            "w@",
            "a.b.c",
            "@x",
            "w@a@b",
        ] {
            assert_eq!(StageRef::parse(text).to_string(), text);
        }
        let r = StageRef::parse("tokens@messy,1.out");
        assert_eq!(r.target.base, "tokens");
        assert_eq!(
            r.target.variant,
            Some(vec!["messy".to_string(), "1".to_string()])
        );
        assert_eq!(r.output.as_deref(), Some("out"));
        assert_eq!(StageRef::parse("tokens").target.variant, None);
    }
}

/// The instances made so far of each table (expansion runs producers first).
#[derive(Default)]
pub(super) struct Variants(HashMap<String, Vec<InstanceName>>);

impl Variants {
    /// The instances of table `base`, if it has been expanded.
    pub fn of(&self, base: &str) -> Option<&[InstanceName]> {
        self.0.get(base).map(Vec::as_slice)
    }

    /// Records the instances of table `base`.
    pub fn insert(&mut self, base: &str, names: Vec<InstanceName>) {
        self.0.insert(base.to_string(), names);
    }
}
