//! Phase 3, resolve: input references to producer tables (the table order, cycles) and to
//! producer instances and their outputs.

use std::collections::{BTreeSet, HashMap};
use std::ops::Range;

use super::error::{did_you_mean, ManifestError};
use super::matrix::{compatible, subset, substitute_all};
use super::names::{InstanceName, StageRef, Variants};
use super::parse::RawStage;
use crate::dag::Dag;
use crate::stage::{DynStage, OutputSlot};

/// Orders tables so that producers come before their consumers (manifest order otherwise).
/// Reports references to tables that do not exist and dependency cycles; `None` if there are
/// any. A reference containing `${key}` depends on every table it can resolve to.
pub(super) fn table_order(
    stages: &[RawStage<'_>],
    broken: &BTreeSet<String>,
    errors: &mut Vec<ManifestError>,
) -> Option<Vec<usize>> {
    let by_name: HashMap<&str, usize> = stages
        .iter()
        .enumerate()
        .map(|(i, s)| (s.name.as_str(), i))
        .collect();
    let mut dag = Dag::new(stages.len());
    let mut ok = true;
    for (consumer, s) in stages.iter().enumerate() {
        for (reference, span) in s.inputs.iter().flat_map(|input| &input.refs) {
            for resolved in substitute_all(reference, &s.matrix, &s.matrix_fields) {
                let base = StageRef::parse(&resolved).target.base;
                match by_name.get(base.as_str()) {
                    Some(&producer) => dag.add_edge(producer, consumer),
                    None if broken.contains(&base) => ok = false,
                    None => {
                        ok = false;
                        let mut err = ManifestError::new(
                            "manifest::missing-stage",
                            format!(
                                "stage `{}` refers to `{resolved}`, but there is no stage `{base}`",
                                s.name
                            ),
                        )
                        .at(span.clone(), "unknown stage");
                        err = match did_you_mean(&base, stages.iter().map(|r| r.name.as_str())) {
                            Some(m) => err.help(format!("did you mean `{m}`?")),
                            None => {
                                err.help("define the stage as its own [table], or fix the name")
                            }
                        };
                        errors.push(err);
                    }
                }
            }
        }
    }
    for cycle in dag.cycles() {
        ok = false;
        let list = cycle
            .iter()
            .map(|&i| format!("`{}`", stages[i].name))
            .collect::<Vec<_>>()
            .join(" -> ");
        let mut err = ManifestError::new("manifest::cycle", format!("stages form a cycle: {list}"))
            .at(stages[cycle[0]].span.clone(), "on the cycle")
            .help("a stage cannot depend on its own output; remove one of these inputs");
        for &i in &cycle[1..] {
            err = err.also(stages[i].span.clone(), "on the cycle");
        }
        errors.push(err);
    }
    ok.then(|| dag.order())
}

/// The producer instances reference `r` connects to an instance with assignment `combo`:
/// the named variant, or every variant of the table that matches (for a fan-in slot, those
/// that agree on shared keys; otherwise those whose assignment is part of `combo`).
pub(super) fn producers(
    r: &StageRef,
    span: &Range<usize>,
    many: bool,
    combo: &[(String, String)],
    variants: &Variants,
    errors: &mut Vec<ManifestError>,
) -> Option<Vec<InstanceName>> {
    let made = variants.of(&r.target.base);
    if r.target.variant.is_some() {
        let Some(named) = made.and_then(|v| v.iter().find(|n| r.target.matches(n))) else {
            let names: Vec<String> = made
                .unwrap_or_default()
                .iter()
                .map(InstanceName::to_string)
                .collect();
            let mut err = ManifestError::new(
                "manifest::missing-stage",
                format!("there is no stage instance `{}`", r.target),
            )
            .at(span.clone(), "unknown variant");
            if !names.is_empty() {
                err = err.help(format!(
                    "`{}` expands to: {}",
                    r.target.base,
                    names.join(", ")
                ));
            }
            errors.push(err);
            return None;
        };
        return Some(vec![named.clone()]);
    }
    // A table that is not there failed earlier and has been reported.
    let matching: Vec<InstanceName> = made?
        .iter()
        .filter(|n| {
            if many {
                compatible(combo, &n.matrix)
            } else {
                subset(&n.matrix, combo)
            }
        })
        .cloned()
        .collect();
    (!matching.is_empty()).then_some(matching)
}

/// The output of `producer` (of kind `kind`) that a reference names: `output`, or the kind's
/// first output.
pub(super) fn output(
    kind: &dyn DynStage,
    producer: &InstanceName,
    output: Option<&str>,
    span: &Range<usize>,
    errors: &mut Vec<ManifestError>,
) -> Option<&'static OutputSlot> {
    let outputs = kind.outputs();
    let Some(name) = output else {
        return outputs.first();
    };
    let found = outputs.iter().find(|o| o.name == name);
    if found.is_none() {
        let names: Vec<_> = outputs.iter().map(|o| o.name).collect();
        errors.push(
            ManifestError::new(
                "manifest::unknown-output",
                format!(
                    "stage `{}` (kind `{}`) has no output `{name}`",
                    producer.base,
                    kind.kind()
                ),
            )
            .at(span.clone(), "unknown output")
            .help(format!(
                "outputs of `{}`: {}",
                kind.kind(),
                names.join(", ")
            )),
        );
    }
    found
}
