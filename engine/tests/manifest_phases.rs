//! The manifest's phases through their results: matrix expansion and `${key}`, matrix
//! inheritance through single-artifact slots, fan-in slots, references, overrides (matrix
//! overrides included), instance names, and the errors each phase reports.

mod common;

use common::{inputs_of, invalid, load, names, valid};
use pipeline_engine::manifest::InstanceName;

#[test]
fn a_matrix_expands_into_named_instances_with_their_assignment() {
    let m = valid(
        r#"
[w]
kind = "emit"
matrix.data = ["clean", "messy"]
matrix.seed = [1, 2]
text = "${data}-${seed}"
"#,
    );
    assert_eq!(
        names(&m),
        ["w@clean,1", "w@clean,2", "w@messy,1", "w@messy,2"]
    );
    let w = m.stage("w@messy,2").expect("w@messy,2");
    assert_eq!(
        w.name,
        InstanceName::new(
            "w",
            vec![
                ("data".to_string(), "messy".to_string()),
                ("seed".to_string(), "2".to_string())
            ]
        )
    );
    assert_eq!(w.params.canonical["text"], "messy-2");
    assert_eq!(m.select("w").len(), 4);
    assert_eq!(m.select("w@clean,1").len(), 1);
    assert!(m.select("w@clean").is_empty());
    assert!(m.stage("w").is_none());
}

#[test]
fn key_substitution_reaches_nested_parameters_and_references() {
    let m = valid(
        r#"
[src]
kind = "emit"
matrix.data = ["a", "b"]
text = "${data}"

[pick]
kind = "upper"
matrix.data = ["a", "b"]
inputs = { src = "src@${data}" }
"#,
    );
    assert_eq!(inputs_of(&m, "pick@a", "src"), ["src@a.out"]);
    assert_eq!(inputs_of(&m, "pick@b", "src"), ["src@b.out"]);
    let errors = invalid(
        "[w]\nkind = \"emit\"\nmatrix.k = [\"a\"]\ntext = \"${nope}\"\n",
        &[],
    );
    assert_eq!(
        errors,
        [(
            "manifest::matrix",
            "`${nope}` is not a matrix key of stage `w`".to_string()
        )]
    );
}

#[test]
fn single_artifact_slots_inherit_the_producers_matrix() {
    let m = valid(
        r#"
[tokens]
kind = "emit"
matrix.data = ["textbook", "messy"]
text = "${data}"

[train]
kind = "upper"
matrix.seed = [1, 2]
inputs = { src = "tokens" }
seeded = true

[eval]
kind = "upper"
inputs = { src = "train" }
"#,
    );
    assert_eq!(
        names(&m)[2..],
        [
            "train@textbook,1",
            "train@messy,1",
            "train@textbook,2",
            "train@messy,2",
            "eval@textbook,1",
            "eval@messy,1",
            "eval@textbook,2",
            "eval@messy,2"
        ]
    );
    assert_eq!(inputs_of(&m, "train@messy,2", "src"), ["tokens@messy.out"]);
    assert_eq!(inputs_of(&m, "eval@messy,2", "src"), ["train@messy,2.out"]);
    assert!(m.stage("train@messy,2").is_some_and(|s| s.uses_seed));
}

#[test]
fn fan_in_slots_gather_variants_that_agree_on_shared_keys() {
    let m = valid(
        r#"
[w]
kind = "emit"
matrix.data = ["a", "b"]
matrix.seed = [1, 2]
text = "${data}${seed}"

[all]
kind = "join"
inputs = { parts = ["w"] }

[per-seed]
kind = "join"
matrix.seed = [1, 2]
inputs = { parts = ["w"] }

[pair]
kind = "join"
inputs = { parts = ["w@a,1", "w@b,2.out"] }
"#,
    );
    assert_eq!(inputs_of(&m, "all", "parts").len(), 4);
    assert_eq!(
        inputs_of(&m, "per-seed@2", "parts"),
        ["w@a,2.out", "w@b,2.out"]
    );
    assert_eq!(inputs_of(&m, "pair", "parts"), ["w@a,1.out", "w@b,2.out"]);
}

#[test]
fn references_name_outputs_and_are_type_checked() {
    let m = valid(
        "[w]\nkind = \"emit\"\ntext = \"x\"\n\n[j]\nkind = \"join\"\ninputs = { parts = [\"w.out\"] }\n",
    );
    assert_eq!(inputs_of(&m, "j", "parts"), ["w.out"]);
    let errors = invalid(
        "[w]\nkind = \"emit\"\ntext = \"x\"\n\n[j]\nkind = \"join\"\ninputs = { parts = [\"w.size\", \"w.nope\"] }\n",
        &[],
    );
    assert_eq!(
        errors,
        [
            (
                "manifest::artifact-type",
                "input `parts` of `j` expects text, but `w.size` is a `number` artifact"
                    .to_string()
            ),
            (
                "manifest::unknown-output",
                "stage `w` (kind `emit`) has no output `nope`".to_string()
            ),
        ]
    );
}

#[test]
fn an_unknown_variant_names_the_ones_that_exist() {
    let errors = load(
        "[w]\nkind = \"emit\"\nmatrix.k = [\"a\", \"b\"]\ntext = \"${k}\"\n\n[j]\nkind = \"join\"\ninputs = { parts = [\"w@c\"] }\n",
        &[],
    )
    .expect_err("w@c does not exist");
    assert_eq!(errors.len(), 1);
    assert_eq!(errors[0].message, "there is no stage instance `w@c`");
    assert_eq!(errors[0].help.as_deref(), Some("`w` expands to: w@a, w@b"));
}

#[test]
fn parameter_overrides_apply_to_a_table_or_one_instance() {
    let text = "[w]\nkind = \"emit\"\nmatrix.k = [\"a\", \"b\"]\ntext = \"${k}\"\n";
    let m = load(text, &["w.count=3", "w@b.text=override"]).expect("valid overrides");
    let param = |name: &str, key: &str| m.stage(name).expect(name).params.canonical[key].clone();
    assert_eq!(param("w@a", "count"), 3);
    assert_eq!(param("w@b", "count"), 3);
    assert_eq!(param("w@a", "text"), "a");
    assert_eq!(param("w@b", "text"), "override");
    let errors = load(text, &["w.count=\"many\""]).expect_err("mistyped override");
    assert_eq!(errors[0].code, "manifest::param");
    assert_eq!(
        errors[0].help.as_deref(),
        Some("the value came from --set w.count=\"many\"")
    );
    assert_eq!(
        invalid(text, &["x.count=1", "w.kind=\"join\""]),
        [
            (
                "manifest::override",
                "--set w.kind=\"join\": `kind` is not a parameter and cannot be overridden"
                    .to_string()
            ),
            (
                "manifest::override",
                "--set x.count=1: there is no stage `x`".to_string()
            ),
        ]
    );
}

#[test]
fn a_matrix_override_replaces_values_and_downstream_follows() {
    let text = r#"
[w]
kind = "emit"
matrix.k = ["a", "b"]
text = "${k}"

[u]
kind = "upper"
inputs = { src = "w" }
"#;
    let m = load(text, &["w.matrix.k=[\"b\", \"c\"]"]).expect("valid matrix override");
    assert_eq!(names(&m), ["w@b", "w@c", "u@b", "u@c"]);
    let errors = invalid(text, &["w@a.matrix.k=[\"a\"]", "u.matrix.k=[1]"]);
    assert_eq!(
        errors,
        [
            (
                "manifest::override",
                "--set w@a.matrix.k=[\"a\"]: a matrix belongs to a stage's base name".to_string()
            ),
            (
                "manifest::override",
                "--set u.matrix.k=[1]: stage `u` has no matrix key `k`".to_string()
            ),
        ]
    );
}

#[test]
fn cycles_and_missing_stages_are_reported_together() {
    let errors = invalid(
        r#"
[a]
kind = "join"
inputs = { parts = ["c"] }

[b]
kind = "join"
inputs = { parts = ["a", "wrods"] }

[c]
kind = "join"
inputs = { parts = ["b"] }

[words]
kind = "emit"
text = 3
"#,
        &[],
    );
    assert_eq!(
        errors,
        [
            (
                "manifest::missing-stage",
                "stage `b` refers to `wrods`, but there is no stage `wrods`".to_string()
            ),
            (
                "manifest::cycle",
                "stages form a cycle: `a` -> `b` -> `c`".to_string()
            ),
            (
                "manifest::param",
                "invalid parameters for stage `words` (kind `emit`): `text` must be a string, got an integer".to_string()
            ),
        ]
    );
}

#[test]
fn slots_arity_and_required_inputs_are_checked() {
    let errors = invalid(
        r#"
[w]
kind = "emit"
text = "x"

[v]
kind = "emit"
text = "y"

[u]
kind = "upper"
inputs = { src = ["w", "v"], sorce = "w" }

[j]
kind = "join"
"#,
        &[],
    );
    let codes: Vec<&str> = errors.iter().map(|(code, _)| *code).collect();
    assert_eq!(
        codes,
        [
            "manifest::input-arity",
            "manifest::unknown-input",
            "manifest::missing-input"
        ],
        "{errors:#?}"
    );
}

#[test]
fn an_empty_list_does_not_connect_a_required_input() {
    let errors = invalid(
        r#"
[j]
kind = "join"
inputs = { parts = [] }
"#,
        &[],
    );
    assert_eq!(errors.len(), 1, "{errors:#?}");
    assert_eq!(errors[0].0, "manifest::missing-input");
    assert!(errors[0].1.contains("lists no stage"), "{errors:#?}");
}

#[test]
fn an_experiment_name_is_one_path_component() {
    use pipeline_engine::manifest::{parse_manifest, ManifestOptions};
    for bad in ["..", ".", "a/b", "", "x y"] {
        let source = format!("[experiment]\nname = {bad:?}\n");
        let err = parse_manifest(
            std::path::Path::new("m.toml"),
            source,
            &common::registry(),
            &ManifestOptions::default(),
        )
        .unwrap_err();
        let errors = err.errors();
        assert_eq!(
            errors[0].code, "manifest::experiment",
            "{bad:?}: {errors:#?}"
        );
        assert!(
            errors[0].message.contains("invalid experiment name"),
            "{bad:?}"
        );
        assert!(
            errors[0].span.is_some(),
            "{bad:?}: the error points at the name"
        );
    }
    for good in ["demo", "phi15-quality", "run_2.1"] {
        let source = format!("[experiment]\nname = {good:?}\n");
        assert!(parse_manifest(
            std::path::Path::new("m.toml"),
            source,
            &common::registry(),
            &ManifestOptions::default(),
        )
        .is_ok());
    }
}

#[test]
fn errors_come_in_manifest_order_each_place_once() {
    let errors = invalid(
        r#"
[b]
kind = "emit"
txt = "x"

[a]
kind = "emit"
matrix.k = ["x", "y"]
text = "t"
count = "many"
"#,
        &[],
    );
    // `b`: an unknown parameter and the missing one it misspells; `a`: once, though its matrix
    // makes two instances.
    assert_eq!(errors.len(), 3, "{errors:#?}");
    assert!(errors[0].1.contains("stage `b`"), "{errors:#?}");
    assert!(errors[1].1.contains("stage `b`"), "{errors:#?}");
    assert!(errors[2].1.contains("stage `a`"), "{errors:#?}");
}
