//! Matrix assignments, which every phase after parsing works with: the cartesian product of
//! a table's matrix, whether two assignments agree, and `${key}` substitution.

use super::parse::RawStage;

/// A matrix assignment: (key, value) pairs, keys in the manifest's key order.
pub(super) type Assignment = Vec<(String, String)>;

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
