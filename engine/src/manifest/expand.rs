//! Phase 2, expand: matrices into instances and `${key}` substitution.
//!
//! A table's own matrix gives its assignments (the cartesian product of its keys); a table
//! connected through a single-artifact slot to an expanded producer inherits the producer's
//! matrix, so `train` reading `tokens` expands to match `tokens@textbook`, `tokens@messy`.
//! `${key}` in references and parameters is replaced by the instance's value.

use std::ops::Range;

use toml::de::{DeTable, DeValue};
use toml::Spanned;

use super::error::ManifestError;
use super::names::{InstanceName, StageRef};
use super::parse::{Override, RawInput, RawStage};
use super::resolve::Variants;
use crate::stage::InputSlot;

/// A matrix assignment: (key, value) pairs, keys in the manifest's key order.
pub(super) type Assignment = Vec<(String, String)>;

/// One `inputs` entry of an instance, its references substituted and parsed.
pub(super) struct InstanceInput<'r> {
    /// The entry as written.
    pub raw: &'r RawInput,
    /// Its references, with their places.
    pub refs: Vec<(StageRef, Range<usize>)>,
}

/// The order of matrix keys across the manifest: order of first declaration.
pub(super) fn key_order(stages: &[RawStage<'_>]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for (key, _) in stages.iter().flat_map(|s| &s.matrix) {
        if !order.contains(key) {
            order.push(key.clone());
        }
    }
    order
}

/// Every assignment of `matrix` (its cartesian product), keys sorted by `key_order`.
pub(super) fn assignments(
    matrix: &[(String, Vec<String>)],
    key_order: &[String],
) -> Vec<Assignment> {
    let mut combos = vec![Vec::new()];
    for (key, values) in matrix {
        let mut next = Vec::new();
        for c in &combos {
            for v in values {
                let mut c2: Assignment = c.clone();
                c2.push((key.clone(), v.clone()));
                next.push(c2);
            }
        }
        combos = next;
    }
    for c in &mut combos {
        sort_keys(c, key_order);
    }
    combos
}

fn sort_keys(assignment: &mut Assignment, key_order: &[String]) {
    assignment.sort_by_key(|(k, _)| key_order.iter().position(|o| o == k));
}

/// Whether `a` and `b` agree on every key they share.
pub(super) fn compatible(a: &[(String, String)], b: &[(String, String)]) -> bool {
    a.iter()
        .all(|(k, v)| b.iter().all(|(k2, v2)| k != k2 || v == v2))
}

/// Whether every pair of `a` is in `b`.
pub(super) fn subset(a: &[(String, String)], b: &[(String, String)]) -> bool {
    a.iter().all(|kv| b.contains(kv))
}

/// The union of two compatible assignments.
fn merge(a: &[(String, String)], b: &[(String, String)], key_order: &[String]) -> Assignment {
    let mut out = a.to_vec();
    for kv in b {
        if !out.iter().any(|(k, _)| *k == kv.0) {
            out.push(kv.clone());
        }
    }
    sort_keys(&mut out, key_order);
    out
}

/// Replaces `${key}` with the assignment's value; `Err(key)` for a key it does not have.
pub(super) fn substitute(text: &str, combo: &[(String, String)]) -> Result<String, String> {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(start) = rest.find("${") {
        out.push_str(&rest[..start]);
        let after = &rest[start + 2..];
        let Some(end) = after.find('}') else {
            out.push_str(&rest[start..]);
            return Ok(out);
        };
        let key = &after[..end];
        match combo.iter().find(|(k, _)| k == key) {
            Some((_, v)) => out.push_str(v),
            None => return Err(key.to_string()),
        }
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Every resolution of `text` over a table's own matrix (to find what it may depend on).
pub(super) fn substitute_all(text: &str, matrix: &[(String, Vec<String>)]) -> Vec<String> {
    let mut out: Vec<String> = assignments(matrix, &[])
        .iter()
        .filter_map(|c| substitute(text, c).ok())
        .collect();
    out.dedup();
    if out.is_empty() {
        out.push(text.to_string());
    }
    out
}

/// The table's references with the values of its own assignment `own` substituted.
pub(super) fn substitute_refs<'r>(
    s: &'r RawStage<'_>,
    own: &[(String, String)],
    errors: &mut Vec<ManifestError>,
) -> Vec<InstanceInput<'r>> {
    let mut inputs = Vec::new();
    for input in &s.inputs {
        let mut refs = Vec::new();
        for (r, span) in &input.refs {
            match substitute(r, own) {
                Ok(r) => refs.push((StageRef::parse(&r), span.clone())),
                Err(key) => errors.push(
                    ManifestError::new(
                        "manifest::matrix",
                        format!(
                            "`${{{key}}}` in `{r}` is not a matrix key of stage `{}`",
                            s.name
                        ),
                    )
                    .at(span.clone(), "unknown matrix key")
                    .help("declare it with `matrix.KEY = [...]` in this stage"),
                ),
            }
        }
        inputs.push(InstanceInput { raw: input, refs });
    }
    inputs
}

/// The assignments of a table's instances: its own assignment `own`, extended by the matrix
/// of every expanded producer connected (by table name) to a single-artifact slot. Fan-in
/// (`many`) slots gather variants instead of multiplying them.
pub(super) fn inherit(
    own: Assignment,
    inputs: &[InstanceInput<'_>],
    slots: &[InputSlot],
    variants: &Variants,
    key_order: &[String],
) -> Vec<Assignment> {
    let mut combos = vec![own];
    for input in inputs {
        let many = slots
            .iter()
            .find(|sl| sl.name == input.raw.slot)
            .is_some_and(|sl| sl.many);
        if many {
            continue;
        }
        for (r, _) in &input.refs {
            if r.target.variant.is_some() {
                continue;
            }
            let Some(producers) = variants.of(&r.target.base) else {
                continue;
            };
            let mut next = Vec::new();
            for c in &combos {
                for producer in producers {
                    if compatible(c, &producer.matrix) {
                        let merged = merge(c, &producer.matrix, key_order);
                        if !next.contains(&merged) {
                            next.push(merged);
                        }
                    }
                }
            }
            combos = next;
        }
    }
    combos
}

/// The parameter table of instance `name`: `${key}` substituted and `--set` overrides applied.
/// Also returns the overrides that were applied (an invalid value may come from them).
pub(super) fn instance_table<'s, 'o>(
    s: &RawStage<'s>,
    name: &InstanceName,
    overrides: &'o [Override<'s>],
    errors: &mut Vec<ManifestError>,
) -> Option<(Spanned<DeTable<'s>>, Vec<&'o str>)> {
    let mut table = s.params.clone();
    let mut ok = true;
    substitute_table(table.get_mut(), &name.matrix, &mut |key, span| {
        ok = false;
        errors.push(
            ManifestError::new(
                "manifest::matrix",
                format!("`${{{key}}}` is not a matrix key of stage `{}`", s.name),
            )
            .at(span, "unknown matrix key")
            .help("declare it with `matrix.KEY = [...]` in this stage"),
        );
    });
    let mut applied = Vec::new();
    for o in overrides.iter().filter(|o| o.target.matches(name)) {
        let value = respan(o.value.clone(), s.span.clone());
        if set_path(table.get_mut(), &o.path, value, s.span.clone()) {
            applied.push(o.raw);
        } else {
            ok = false;
            errors.push(
                ManifestError::new(
                    "manifest::override",
                    format!("--set {}: `{}` is not a table", o.raw, o.path[0]),
                )
                .at(s.span.clone(), "this stage"),
            );
        }
    }
    ok.then_some((table, applied))
}

fn substitute_table(
    table: &mut DeTable<'_>,
    combo: &[(String, String)],
    on_error: &mut dyn FnMut(String, Range<usize>),
) {
    for (_, value) in table.iter_mut() {
        substitute_value(value, combo, on_error);
    }
}

fn substitute_value(
    value: &mut Spanned<DeValue<'_>>,
    combo: &[(String, String)],
    on_error: &mut dyn FnMut(String, Range<usize>),
) {
    let span = value.span();
    match value.get_mut() {
        DeValue::String(s) if s.contains("${") => match substitute(s, combo) {
            Ok(new) => *s = std::borrow::Cow::Owned(new),
            Err(key) => on_error(key, span),
        },
        DeValue::Array(items) => {
            for item in items.iter_mut() {
                substitute_value(item, combo, on_error);
            }
        }
        DeValue::Table(t) => substitute_table(t, combo, on_error),
        _ => {}
    }
}

/// Gives a value (and everything in it) the span `span`, so that errors about an overridden
/// value point at the stage rather than into the `--set` text.
fn respan<'i>(value: Spanned<DeValue<'i>>, span: Range<usize>) -> Spanned<DeValue<'i>> {
    let inner = match value.into_inner() {
        DeValue::Array(mut items) => {
            for item in items.iter_mut() {
                let taken = std::mem::replace(item, Spanned::new(0..0, DeValue::Boolean(false)));
                *item = respan(taken, span.clone());
            }
            DeValue::Array(items)
        }
        DeValue::Table(t) => {
            let mut out = DeTable::new();
            for (k, v) in t.into_iter() {
                out.insert(
                    Spanned::new(span.clone(), k.into_inner()),
                    respan(v, span.clone()),
                );
            }
            DeValue::Table(out)
        }
        other => other,
    };
    Spanned::new(span, inner)
}

/// Sets `path` in `table` to `value`, creating intermediate tables; false if a value on the
/// way is not a table.
fn set_path<'i>(
    table: &mut DeTable<'i>,
    path: &[String],
    value: Spanned<DeValue<'i>>,
    span: Range<usize>,
) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    if rest.is_empty() {
        table.insert(
            Spanned::new(span, std::borrow::Cow::Owned(first.clone())),
            value,
        );
        return true;
    }
    if table.get(first.as_str()).is_none() {
        table.insert(
            Spanned::new(span.clone(), std::borrow::Cow::Owned(first.clone())),
            Spanned::new(span.clone(), DeValue::Table(DeTable::new())),
        );
    }
    match table.get_mut(first.as_str()).map(|v| v.get_mut()) {
        Some(DeValue::Table(inner)) => set_path(inner, rest, value, span),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pairs(p: &[(&str, &str)]) -> Assignment {
        p.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn matrix(m: &[(&str, &[&str])]) -> Vec<(String, Vec<String>)> {
        m.iter()
            .map(|(k, vs)| (k.to_string(), vs.iter().map(|v| v.to_string()).collect()))
            .collect()
    }

    #[test]
    fn assignments_are_the_cartesian_product_in_key_order() {
        let m = matrix(&[("seed", &["1", "2"]), ("data", &["a", "b"])]);
        let order = vec!["data".to_string(), "seed".to_string()];
        let all = assignments(&m, &order);
        assert_eq!(all.len(), 4);
        assert_eq!(all[0], pairs(&[("data", "a"), ("seed", "1")]));
        assert_eq!(all[1], pairs(&[("data", "b"), ("seed", "1")]));
        assert_eq!(all[3], pairs(&[("data", "b"), ("seed", "2")]));
        assert_eq!(assignments(&[], &order), vec![Vec::new()]);
    }

    #[test]
    fn substitution_replaces_keys_and_names_unknown_ones() {
        let combo = pairs(&[("data", "messy"), ("seed", "1")]);
        assert_eq!(
            substitute("tokens@${data},${seed}", &combo).as_deref(),
            Ok("tokens@messy,1")
        );
        assert_eq!(substitute("${nope}", &combo), Err("nope".to_string()));
        assert_eq!(substitute("${data", &combo).as_deref(), Ok("${data"));
        assert_eq!(substitute("plain", &combo).as_deref(), Ok("plain"));
        let m = matrix(&[("data", &["a", "b"])]);
        assert_eq!(substitute_all("${data}", &m), ["a", "b"]);
        assert_eq!(substitute_all("${other}", &m), ["${other}"]);
    }

    #[test]
    fn assignments_merge_only_when_compatible() {
        let a = pairs(&[("data", "a")]);
        let b = pairs(&[("seed", "1")]);
        let order = vec!["data".to_string(), "seed".to_string()];
        assert!(compatible(&a, &b));
        assert_eq!(
            merge(&b, &a, &order),
            pairs(&[("data", "a"), ("seed", "1")])
        );
        assert!(!compatible(&a, &pairs(&[("data", "b")])));
        assert!(subset(&a, &merge(&a, &b, &order)));
        assert!(!subset(&merge(&a, &b, &order), &a));
    }
}
