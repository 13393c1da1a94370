//! Matrix assignments, which every phase after parsing works with: the cartesian product of
//! a table's matrix, whether two assignments agree, and `${key}` substitution.

use super::parse::RawStage;

/// A matrix assignment: (key, value) pairs, keys in the manifest's key order.
///
/// A table-valued entry (`matrix.data = [{name = "textbook", records = "codealpaca"}]`) is the
/// pair `(data, textbook)` followed by one derived pair per field, `(data.records,
/// codealpaca)`: derived pairs travel with their value through inheritance and serve `${key.field}`
/// substitution, and are left out of instance names (see [`is_derived`]).
pub(super) type Assignment = Vec<(String, String)>;

/// The fields of table-valued matrix values: `(key, value name, [(field, text)])`.
pub(super) type MatrixFields = Vec<(String, String, Vec<(String, String)>)>;

/// Whether an assignment key is a table value's field (`data.records`) rather than a key.
pub fn is_derived(key: &str) -> bool {
    key.contains('.')
}

/// The order of matrix keys across the manifest: order of first declaration, each key's
/// fields right after it.
pub(super) fn key_order(stages: &[RawStage<'_>]) -> Vec<String> {
    let mut order: Vec<String> = Vec::new();
    for s in stages {
        for (key, _) in &s.matrix {
            if !order.contains(key) {
                order.push(key.clone());
            }
            for (k, _, fields) in &s.matrix_fields {
                for (field, _) in fields.iter().filter(|_| k == key) {
                    let derived = format!("{key}.{field}");
                    if !order.contains(&derived) {
                        order.push(derived);
                    }
                }
            }
        }
    }
    order
}

/// `assignment` with the derived pairs of its table-valued entries appended.
fn with_fields(mut assignment: Assignment, fields: &MatrixFields) -> Assignment {
    let mut derived = Vec::new();
    for (key, value) in &assignment {
        for (k, v, fs) in fields {
            if k == key && v == value {
                derived.extend(fs.iter().map(|(f, t)| (format!("{key}.{f}"), t.clone())));
            }
        }
    }
    assignment.extend(derived);
    assignment
}

/// Where two tables give one matrix value different fields (`(key, value, first table,
/// other table)`): a value must mean the same everywhere, or inheritance would silently pair
/// the wrong instances.
pub(super) fn conflicting_fields(stages: &[RawStage<'_>]) -> Vec<(String, String, String, String)> {
    /// (key, value, its fields, the table that declared it first)
    type Declared<'a> = (&'a str, &'a str, &'a [(String, String)], &'a str);
    let mut seen: Vec<Declared<'_>> = Vec::new();
    let mut out = Vec::new();
    for s in stages {
        for (key, value, fields) in &s.matrix_fields {
            match seen.iter().find(|(k, v, _, _)| k == key && v == value) {
                Some((_, _, f, first)) if *f != fields.as_slice() => out.push((
                    key.clone(),
                    value.clone(),
                    first.to_string(),
                    s.name.clone(),
                )),
                Some(_) => {}
                None => seen.push((key, value, fields, &s.name)),
            }
        }
    }
    out
}

/// Every assignment of `matrix` (its cartesian product) with the fields of its table values,
/// keys sorted by `key_order`.
pub(super) fn assignments(
    matrix: &[(String, Vec<String>)],
    fields: &MatrixFields,
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
    combos
        .into_iter()
        .map(|c| {
            let mut c = with_fields(c, fields);
            sort_keys(&mut c, key_order);
            c
        })
        .collect()
}

pub(super) fn sort_keys(assignment: &mut Assignment, key_order: &[String]) {
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
pub(super) fn merge(
    a: &[(String, String)],
    b: &[(String, String)],
    key_order: &[String],
) -> Assignment {
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
pub(super) fn substitute_all(
    text: &str,
    matrix: &[(String, Vec<String>)],
    fields: &MatrixFields,
) -> Vec<String> {
    let mut out: Vec<String> = assignments(matrix, fields, &[])
        .iter()
        .filter_map(|c| substitute(text, c).ok())
        .collect();
    out.dedup();
    if out.is_empty() {
        out.push(text.to_string());
    }
    out
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
        let all = assignments(&m, &Vec::new(), &order);
        assert_eq!(all.len(), 4);
        assert_eq!(all[0], pairs(&[("data", "a"), ("seed", "1")]));
        assert_eq!(all[1], pairs(&[("data", "b"), ("seed", "1")]));
        assert_eq!(all[3], pairs(&[("data", "b"), ("seed", "2")]));
        assert_eq!(assignments(&[], &Vec::new(), &order), vec![Vec::new()]);
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
        assert_eq!(substitute_all("${data}", &m, &Vec::new()), ["a", "b"]);
        assert_eq!(substitute_all("${other}", &m, &Vec::new()), ["${other}"]);
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
