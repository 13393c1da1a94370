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
use super::matrix::{compatible, merge, substitute, Assignment};
use super::names::{InstanceName, StageRef, Variants};
use super::parse::{Override, RawInput, RawStage};
use crate::stage::InputSlot;

/// One `inputs` entry of an instance, its references substituted and parsed.
pub(super) struct InstanceInput<'r> {
    /// The entry as written.
    pub raw: &'r RawInput,
    /// Its references, with their places.
    pub refs: Vec<(StageRef, Range<usize>)>,
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
