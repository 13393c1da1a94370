//! Stage parameters described and checked from their JSON schema, which each kind derives
//! from its params type (`schemars::JsonSchema`): field docs become `pipeline kinds KIND`'s
//! text, and a manifest table that the kind's deserializer rejects is checked against the
//! schema so that every bad parameter is reported at once, in words ("must be an integer",
//! "one of: cpu, cuda"), each at its place.
//!
//! The kind's own deserializer stays the authority: the schema is consulted only to explain a
//! table it rejected (a custom deserializer may accept more than the schema says, e.g. a
//! matrix-substituted `"3"` for an integer).

use std::ops::Range;

use serde::Serialize;
use serde_json::Value;
use toml::de::{DeTable, DeValue};

/// One parameter of a kind, as `pipeline kinds KIND` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamDoc {
    /// Its name in the manifest.
    pub name: String,
    /// Its type in words: `integer`, `string or null`, `one of: cpu, cuda`, `array of string`.
    pub type_text: String,
    /// Its default as TOML would write it; `None` when required or without a default.
    pub default: Option<String>,
    /// Whether the manifest must give it.
    pub required: bool,
    /// Its documentation (the field's doc comment).
    pub doc: Option<String>,
}

/// One problem of a parameter table, at its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamProblem {
    /// What is wrong, naming the parameter.
    pub message: String,
    /// Where (a key or a value in the manifest); `None` for a missing parameter.
    pub span: Option<Range<usize>>,
    /// What to do.
    pub help: Option<String>,
}

/// The candidate closest to `word` when it looks like a typo of one ("did you mean").
pub fn did_you_mean<'c>(
    word: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Option<&'c str> {
    crate::manifest::error::did_you_mean(word, candidates)
}

/// The parameters described by `schema` (a kind's root schema), in declaration order.
pub fn param_docs(schema: &Value) -> Vec<ParamDoc> {
    let required = required_of(schema);
    properties(schema)
        .map(|(name, prop)| ParamDoc {
            name: name.clone(),
            type_text: type_text(prop, schema),
            default: prop.get("default").filter(|d| !d.is_null()).map(toml_text),
            required: required.contains(&name.as_str()),
            doc: prop
                .get("description")
                .or_else(|| resolve(prop, schema).get("description"))
                .and_then(Value::as_str)
                // Rustdoc links (`[`Name`]`) read as plain code to a manifest's author.
                .map(|d| d.replace("[`", "`").replace("`]", "`")),
        })
        .collect()
}

fn properties(schema: &Value) -> impl Iterator<Item = (&String, &Value)> {
    schema
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
}

fn required_of(schema: &Value) -> Vec<&str> {
    schema
        .get("required")
        .and_then(Value::as_array)
        .map(|r| r.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// Follows a `$ref` into the root's `$defs`.
fn resolve<'a>(schema: &'a Value, root: &'a Value) -> &'a Value {
    let Some(reference) = schema.get("$ref").and_then(Value::as_str) else {
        return schema;
    };
    let name = reference.rsplit('/').next().unwrap_or(reference);
    root.get("$defs")
        .and_then(|d| d.get(name))
        .unwrap_or(schema)
}

/// The string values an enum-like schema allows (`enum`, or `oneOf`/`anyOf` of `const`s).
fn allowed_values(schema: &Value, root: &Value) -> Option<Vec<String>> {
    let schema = resolve(schema, root);
    if let Some(values) = schema.get("enum").and_then(Value::as_array) {
        return Some(values.iter().map(plain_text).collect());
    }
    if let Some(c) = schema.get("const") {
        return Some(vec![plain_text(c)]);
    }
    let variants = schema
        .get("oneOf")
        .or_else(|| schema.get("anyOf"))
        .and_then(Value::as_array)?;
    let mut out = Vec::new();
    for v in variants {
        out.extend(allowed_values(v, root)?);
    }
    Some(out)
}

fn plain_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// A default as TOML writes it (JSON's syntax for strings, numbers, booleans and arrays is
/// TOML's; tables become inline tables).
fn toml_text(v: &Value) -> String {
    match v {
        Value::Object(map) => {
            let parts: Vec<String> = map
                .iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| format!("{k} = {}", toml_text(v)))
                .collect();
            format!("{{{}}}", parts.join(", "))
        }
        Value::Array(items) => {
            let parts: Vec<String> = items.iter().map(toml_text).collect();
            format!("[{}]", parts.join(", "))
        }
        other => other.to_string(),
    }
}

/// A schema's type in words.
pub fn type_text(schema: &Value, root: &Value) -> String {
    let resolved = resolve(schema, root);
    if let Some(values) = allowed_values(resolved, root) {
        return format!("one of: {}", values.join(", "));
    }
    if let Some(variants) = resolved
        .get("anyOf")
        .or_else(|| resolved.get("oneOf"))
        .and_then(Value::as_array)
    {
        // `Option<T>`: the null variant is what "optional" already says.
        let mut words: Vec<String> = variants
            .iter()
            .map(|v| type_text(v, root))
            .filter(|w| w != "null")
            .collect();
        words.dedup();
        return words.join(" or ");
    }
    match resolved.get("type") {
        Some(Value::String(t)) => single_type(t, resolved, root),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter(|t| *t != "null")
            .map(|t| single_type(t, resolved, root))
            .collect::<Vec<_>>()
            .join(" or "),
        _ => "any value".into(),
    }
}

fn single_type(t: &str, schema: &Value, root: &Value) -> String {
    match t {
        "array" => match schema.get("items") {
            Some(items) => format!("array of {}", type_text(items, root)),
            None => "array".into(),
        },
        "object" => match schema.get("title").and_then(Value::as_str) {
            Some(title) => format!("table ({title})"),
            None => "table".into(),
        },
        "integer" if schema.get("minimum").and_then(Value::as_f64) == Some(0.0) => {
            "integer >= 0".into()
        }
        other => other.to_string(),
    }
}

/// Every problem of `table` under `schema` that the schema can name: unknown parameters
/// (with the closest known name), missing required ones, values of the wrong type or outside
/// an enum, negative counts. Nested tables are checked against their own schemas.
pub fn problems(schema: &Value, table: &DeTable<'_>, reserved: &[&str]) -> Vec<ParamProblem> {
    let mut out = Vec::new();
    check_table(schema, schema, table, "", reserved, &mut out);
    out
}

fn check_table(
    schema: &Value,
    root: &Value,
    table: &DeTable<'_>,
    prefix: &str,
    reserved: &[&str],
    out: &mut Vec<ParamProblem>,
) {
    let schema = resolve(schema, root);
    let known: Vec<&str> = properties(schema).map(|(k, _)| k.as_str()).collect();
    let closed = schema.get("additionalProperties") == Some(&Value::Bool(false));
    for (key, value) in table.iter() {
        let name = key.get_ref().as_ref();
        if reserved.contains(&name) {
            continue;
        }
        match schema.get("properties").and_then(|p| p.get(name)) {
            Some(prop) => check_value(prop, root, value, &format!("{prefix}{name}"), out),
            None if closed => out.push(ParamProblem {
                message: format!("unknown parameter `{prefix}{name}`"),
                span: Some(key.span()),
                help: Some(
                    match crate::manifest::error::did_you_mean(name, known.iter().copied()) {
                        Some(close) => format!(
                            "did you mean `{close}`? the parameters here are: {}",
                            known.join(", ")
                        ),
                        None => format!("the parameters here are: {}", known.join(", ")),
                    },
                ),
            }),
            None => {}
        }
    }
    for name in required_of(schema) {
        if !table.iter().any(|(k, _)| k.get_ref().as_ref() == name) {
            out.push(ParamProblem {
                message: format!("missing parameter `{prefix}{name}`"),
                span: None,
                help: properties(schema)
                    .find(|(k, _)| k.as_str() == name)
                    .map(|(_, p)| format!("`{name}`: {}", type_text(p, root))),
            });
        }
    }
}

fn check_value(
    schema: &Value,
    root: &Value,
    value: &toml::Spanned<DeValue<'_>>,
    name: &str,
    out: &mut Vec<ParamProblem>,
) {
    let resolved = resolve(schema, root);
    let span = value.span();
    let v = value.get_ref();
    if let Some(allowed) = allowed_values(resolved, root) {
        let given = match v {
            DeValue::String(s) => Some(s.as_ref().to_string()),
            DeValue::Boolean(b) => Some(b.to_string()),
            DeValue::Integer(i) => Some(i.as_str().to_string()),
            _ => None,
        };
        if given.as_ref().is_none_or(|g| !allowed.contains(g)) {
            let shown = given.map_or_else(|| v.type_str().to_string(), |g| format!("`{g}`"));
            out.push(ParamProblem {
                message: format!(
                    "`{name}` must be one of: {}; got {shown}",
                    allowed.join(", ")
                ),
                span: Some(span),
                help: None,
            });
        }
        return;
    }
    let types = accepted_types(resolved, root);
    if types.is_empty() {
        return; // The schema does not say (any value); the deserializer decides.
    }
    let actual = match v {
        DeValue::String(_) => "string",
        DeValue::Integer(_) => "integer",
        DeValue::Float(_) => "number",
        DeValue::Boolean(_) => "boolean",
        DeValue::Array(_) => "array",
        DeValue::Table(_) => "object",
        DeValue::Datetime(_) => "datetime",
    };
    let fits = types.iter().any(|t| {
        *t == actual
            || (*t == "number" && actual == "integer")
            // A `${key}` substitution yields a string the kind may parse as a number.
            || (matches!(*t, "integer" | "number") && actual == "string" && v.as_str().is_some_and(|s| s.trim().parse::<f64>().is_ok()))
    });
    if !fits {
        out.push(ParamProblem {
            message: format!(
                "`{name}` must be {}, got {}",
                types_in_words(&types),
                article(actual)
            ),
            span: Some(span),
            help: None,
        });
        return;
    }
    match v {
        DeValue::Integer(i) => {
            let minimum = resolved.get("minimum").and_then(Value::as_f64);
            let parsed = i64::from_str_radix(&i.as_str().replace('_', ""), i.radix()).ok();
            if let (Some(min), Some(n)) = (minimum, parsed) {
                if (n as f64) < min {
                    out.push(ParamProblem {
                        message: format!("`{name}` must be at least {min}, got {n}"),
                        span: Some(span),
                        help: None,
                    });
                }
            }
        }
        DeValue::Array(items) => {
            if let Some(item_schema) = item_schema(resolved, root) {
                for (i, item) in items.iter().enumerate() {
                    check_value(item_schema, root, item, &format!("{name}[{i}]"), out);
                }
            }
        }
        DeValue::Table(t) if properties(resolved).next().is_some() => {
            check_table(resolved, root, t, &format!("{name}."), &[], out);
        }
        _ => {}
    }
}

/// The item schema of an array-typed schema (through an `Option`'s `anyOf`).
fn item_schema<'a>(schema: &'a Value, root: &'a Value) -> Option<&'a Value> {
    if let Some(items) = schema.get("items") {
        return Some(items);
    }
    schema
        .get("anyOf")
        .and_then(Value::as_array)?
        .iter()
        .map(|v| resolve(v, root))
        .find_map(|v| v.get("items"))
}

/// The JSON types a schema accepts (empty: any).
fn accepted_types(schema: &Value, root: &Value) -> Vec<&'static str> {
    const ALL: [&str; 7] = [
        "string", "integer", "number", "boolean", "array", "object", "null",
    ];
    let intern = |t: &str| ALL.iter().copied().find(|a| *a == t);
    let schema = resolve(schema, root);
    if let Some(variants) = schema
        .get("anyOf")
        .or_else(|| schema.get("oneOf"))
        .and_then(Value::as_array)
    {
        let mut out = Vec::new();
        for v in variants {
            let inner = accepted_types(v, root);
            if inner.is_empty() {
                return Vec::new();
            }
            out.extend(inner);
        }
        out.dedup();
        return out;
    }
    match schema.get("type") {
        Some(Value::String(t)) => intern(t).into_iter().collect(),
        Some(Value::Array(ts)) => ts
            .iter()
            .filter_map(Value::as_str)
            .filter_map(intern)
            .collect(),
        _ if schema.get("properties").is_some() => vec!["object"],
        _ => Vec::new(),
    }
}

fn article(t: &str) -> String {
    match t {
        "integer" | "array" | "object" => format!("an {}", if t == "object" { "table" } else { t }),
        "null" => "nothing".into(),
        other => format!("a {other}"),
    }
}

fn types_in_words(types: &[&str]) -> String {
    let words: Vec<String> = types
        .iter()
        .filter(|t| **t != "null")
        .map(|t| article(t))
        .collect();
    words.join(" or ")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schema() -> Value {
        serde_json::json!({
            "type": "object",
            "additionalProperties": false,
            "required": ["source"],
            "properties": {
                "source": {"type": "string", "description": "Where from."},
                "steps": {"type": "integer", "minimum": 0, "default": 10},
                "lr": {"type": "number"},
                "device": {"$ref": "#/$defs/Device", "default": "cpu"},
                "seed": {"type": ["integer", "null"]},
                "files": {"type": "array", "items": {"type": "string"}, "default": []},
            },
            "$defs": {"Device": {"type": "string", "enum": ["cpu", "cuda"]}}
        })
    }

    fn table(text: &str) -> toml::Spanned<DeTable<'_>> {
        DeTable::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn docs_say_type_default_and_doc() {
        let docs = param_docs(&schema());
        let by = |n: &str| {
            docs.iter()
                .find(|d| d.name == n)
                .cloned()
                .unwrap_or_else(|| panic!("{n}"))
        };
        assert_eq!(by("source").doc.as_deref(), Some("Where from."));
        assert!(by("source").required);
        assert_eq!(by("steps").type_text, "integer >= 0");
        assert_eq!(by("steps").default.as_deref(), Some("10"));
        assert_eq!(by("device").type_text, "one of: cpu, cuda");
        assert_eq!(by("device").default.as_deref(), Some("\"cpu\""));
        assert_eq!(by("seed").type_text, "integer");
        assert!(!by("seed").required);
        assert_eq!(by("files").type_text, "array of string");
    }

    #[test]
    fn every_problem_at_once_in_words() {
        let text = "stpes = 3\nlr = \"fast\"\ndevice = \"gpu\"\nfiles = [\"a\", 2]\nsteps = -1\nseed = \"7\"\n";
        let t = table(text);
        let found = problems(&schema(), t.get_ref(), &["kind"]);
        let messages: Vec<&str> = found.iter().map(|p| p.message.as_str()).collect();
        assert_eq!(
            messages,
            [
                "unknown parameter `stpes`",
                "`lr` must be a number, got a string",
                "`device` must be one of: cpu, cuda; got `gpu`",
                "`files[1]` must be a string, got an integer",
                "`steps` must be at least 0, got -1",
                "missing parameter `source`",
            ],
            "{found:#?}"
        );
        assert!(found[0]
            .help
            .as_deref()
            .unwrap_or("")
            .contains("did you mean `steps`"));
        let span = found[2].span.clone().unwrap_or_default();
        assert_eq!(&text[span], "\"gpu\"");
    }
}
