//! Phase 4, type-check: input slots and their arity, artifact types of connections, required
//! inputs, and the kind's typed parameters.

use std::collections::BTreeMap;
use std::ops::Range;

use toml::de::DeTable;
use toml::Spanned;

use super::error::{did_you_mean, ManifestError};
use super::names::InstanceName;
use super::parse::{RawInput, RawStage};
use super::InputRef;
use crate::stage::{InputSlot, OutputSlot, ParamError, ParsedParams};

/// The slot an `inputs` entry names.
pub(super) fn slot(
    s: &RawStage<'_>,
    input: &RawInput,
    errors: &mut Vec<ManifestError>,
) -> Option<&'static InputSlot> {
    let slots = s.kind.inputs();
    let found = slots.iter().find(|sl| sl.name == input.slot);
    if found.is_none() {
        let names: Vec<_> = slots.iter().map(|sl| sl.name).collect();
        let err = ManifestError::new(
            "manifest::unknown-input",
            format!("kind `{}` has no input `{}`", s.kind.kind(), input.slot),
        )
        .at(input.slot_span.clone(), "unknown input");
        errors.push(match did_you_mean(&input.slot, names.iter().copied()) {
            Some(m) => err.help(format!("did you mean `{m}`?")),
            None if names.is_empty() => err.help(format!("`{}` takes no inputs", s.kind.kind())),
            None => err.help(format!(
                "inputs of `{}`: {}",
                s.kind.kind(),
                names.join(", ")
            )),
        });
    }
    found
}

/// Whether `count` references fit the slot (only fan-in slots take several).
pub(super) fn arity(
    s: &RawStage<'_>,
    slot: &InputSlot,
    input: &RawInput,
    count: usize,
    errors: &mut Vec<ManifestError>,
) -> bool {
    if slot.many || count <= 1 {
        return true;
    }
    errors.push(
        ManifestError::new(
            "manifest::input-arity",
            format!(
                "input `{}` of kind `{}` takes one artifact, but {count} are listed",
                slot.name,
                s.kind.kind(),
            ),
        )
        .at(input.slot_span.clone(), "one artifact expected"),
    );
    false
}

/// Whether output `out` of `producer` is an artifact type the slot accepts.
pub(super) fn artifact_type(
    s: &RawStage<'_>,
    slot: &InputSlot,
    producer: &InstanceName,
    out: &OutputSlot,
    span: &Range<usize>,
    errors: &mut Vec<ManifestError>,
) -> bool {
    if slot.accepts.contains(&out.artifact) {
        return true;
    }
    errors.push(
        ManifestError::new(
            "manifest::artifact-type",
            format!(
                "input `{}` of `{}` expects {}, but `{producer}.{}` is a `{}` artifact",
                slot.name,
                s.name,
                slot.accepts.join(" or "),
                out.name,
                out.artifact
            ),
        )
        .at(span.clone(), format!("a `{}` artifact", out.artifact))
        .help(format!(
            "connect a stage whose output is {}",
            slot.accepts.join(" or ")
        )),
    );
    false
}

/// Whether every required slot of the kind is connected.
pub(super) fn required_inputs(
    s: &RawStage<'_>,
    connected: &BTreeMap<String, Vec<InputRef>>,
    errors: &mut Vec<ManifestError>,
) -> bool {
    let mut ok = true;
    for slot in s.kind.inputs().iter().filter(|sl| sl.required) {
        if let Some(raw) = s.inputs.iter().find(|i| i.slot == slot.name) {
            // `grades = []` connects nothing: the stage would fail only at run time, after
            // everything before it ran.
            if raw.refs.is_empty() {
                ok = false;
                errors.push(
                    ManifestError::new(
                        "manifest::missing-input",
                        format!(
                            "input `{}` of stage `{}` lists no stage, but kind `{}` needs one",
                            slot.name,
                            s.name,
                            s.kind.kind()
                        ),
                    )
                    .at(raw.slot_span.clone(), "empty list")
                    .help(format!(
                        "list at least one stage: `{} = [\"<stage>\"]` (accepts: {})",
                        slot.name,
                        slot.accepts.join(", ")
                    )),
                );
            }
            continue;
        }
        if connected.contains_key(slot.name) {
            continue;
        }
        ok = false;
        errors.push(
            ManifestError::new(
                "manifest::missing-input",
                format!(
                    "stage `{}` (kind `{}`) needs input `{}`: {}",
                    s.name,
                    s.kind.kind(),
                    slot.name,
                    slot.doc
                ),
            )
            .at(s.span.clone(), "missing input")
            .help(format!(
                "add `inputs = {{ {} = \"<stage>\" }}` (accepts: {})",
                slot.name,
                slot.accepts.join(", ")
            )),
        );
    }
    ok
}

/// The kind's typed parameters from an instance's table; `applied` are the `--set` overrides
/// that went into it (an invalid value without a place of its own came from them).
pub(super) fn params(
    s: &RawStage<'_>,
    table: Spanned<DeTable<'_>>,
    applied: &[&str],
    errors: &mut Vec<ManifestError>,
) -> Option<ParsedParams> {
    let invalid = |message: &str| {
        ManifestError::new(
            "manifest::param",
            format!(
                "invalid parameters for stage `{}` (kind `{}`): {message}",
                s.name,
                s.kind.kind()
            ),
        )
    };
    let overrides_help = || {
        let sets: Vec<String> = applied.iter().map(|a| format!("--set {a}")).collect();
        format!("the value came from {}", sets.join(", "))
    };
    let kinds_help = || {
        format!(
            "see the parameters of `{0}` with `pipeline kinds {0}`",
            s.kind.kind()
        )
    };
    match s.kind.parse(table) {
        Ok(p) => Some(p),
        Err(ParamError::Deserialize { message, span }) => {
            let from_override = span.as_ref().is_none_or(|sp| *sp == s.span) && !applied.is_empty();
            let err = invalid(message.trim()).at(span.unwrap_or_else(|| s.span.clone()), "here");
            errors.push(err.help(if from_override {
                overrides_help()
            } else {
                kinds_help()
            }));
            None
        }
        Err(ParamError::Problems(problems)) => {
            for p in problems {
                // An overridden value has no place of its own in the file: it is given the
                // stage's span.
                let placed = p.span.filter(|sp| !sp.is_empty());
                let from_override =
                    !applied.is_empty() && placed.as_ref().is_none_or(|sp| *sp == s.span);
                let err = invalid(&p.message);
                let err = match placed {
                    Some(span) => err.at(span, "here"),
                    None => err.at(s.span.clone(), "in this stage"),
                };
                let help = match (from_override, p.help) {
                    (true, _) => overrides_help(),
                    (false, Some(help)) => help,
                    (false, None) => kinds_help(),
                };
                errors.push(err.help(help));
            }
            None
        }
        Err(ParamError::Invalid(message)) => {
            errors.push(invalid(&message).at(s.span.clone(), "this stage"));
            None
        }
    }
}
