//! What the API server does to a custom resource before storing it, from the
//! CRD's `openAPIV3Schema`: drop unknown fields and nulls the schema does not
//! allow (pruning), fill in defaults, check the structural constraints (type,
//! required, enum, pattern, bounds, lengths, item counts), then evaluate the
//! CEL rules (`x-kubernetes-validations`) with kube's evaluator.
//!
//! Not done: `format` checks, `uniqueItems`, list-type uniqueness, CEL
//! transition rules (`oldSelf`) beyond what the evaluator does with the old
//! object, and the cost limits of CEL rules.

use serde_json::{Map, Value};

/// One field error, worded like the API server's.
pub type FieldError = String;

/// Prunes, defaults and validates `object` in place; the errors, if any.
pub fn admit(schema: &Value, object: &mut Value, old: Option<&Value>) -> Vec<FieldError> {
    if let Value::Object(map) = object {
        let props = schema.get("properties").and_then(Value::as_object);
        for (key, value) in map.iter_mut() {
            if matches!(key.as_str(), "apiVersion" | "kind" | "metadata") {
                continue;
            }
            if let Some(sub) = props.and_then(|p| p.get(key)) {
                prune(sub, value);
            }
        }
        map.retain(|key, value| {
            matches!(key.as_str(), "apiVersion" | "kind" | "metadata")
                || (props.is_some_and(|p| p.contains_key(key)) && !value.is_null())
        });
    }
    *object = kube::core::cel::apply_defaults(schema, object);
    let mut errors = Vec::new();
    if let (Value::Object(map), Some(props)) = (
        &*object,
        schema.get("properties").and_then(Value::as_object),
    ) {
        for (key, sub) in props {
            if key == "metadata" {
                continue;
            }
            match map.get(key) {
                Some(value) => check(sub, value, key, &mut errors),
                None if required(schema, key) => errors.push(format!("{key}: Required value")),
                None => {}
            }
        }
    }
    if errors.is_empty()
        && let Err(failures) = kube::core::cel::Validator::new().validate(schema, object, old)
    {
        errors.extend(failures.iter().map(|e| e.to_string()));
    }
    errors
}

fn required(schema: &Value, key: &str) -> bool {
    schema
        .get("required")
        .and_then(Value::as_array)
        .is_some_and(|r| r.iter().any(|k| k == key))
}

fn flag(schema: &Value, name: &str) -> bool {
    schema.get(name).and_then(Value::as_bool) == Some(true)
}

/// Drops the fields the schema does not know, and nulls it does not allow.
fn prune(schema: &Value, value: &mut Value) {
    if flag(schema, "x-kubernetes-preserve-unknown-fields") {
        return;
    }
    match value {
        Value::Object(map) => {
            if let Some(props) = schema.get("properties").and_then(Value::as_object) {
                map.retain(|key, v| {
                    props
                        .get(key)
                        .is_some_and(|sub| !v.is_null() || flag(sub, "nullable"))
                });
                for (key, v) in map.iter_mut() {
                    prune(&props[key], v);
                }
            } else if let Some(additional) = schema.get("additionalProperties") {
                if additional.is_object() {
                    map.retain(|_, v| !v.is_null() || flag(additional, "nullable"));
                    for v in map.values_mut() {
                        prune(additional, v);
                    }
                }
            } else if schema.get("type").and_then(Value::as_str) == Some("object") {
                map.clear();
            }
        }
        Value::Array(items) => {
            if let Some(item) = schema.get("items") {
                for v in items {
                    prune(item, v);
                }
            }
        }
        _ => {}
    }
}

fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("{s:?}"),
        other => other.to_string(),
    }
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The structural checks of one value at `path`.
fn check(schema: &Value, value: &Value, path: &str, errors: &mut Vec<FieldError>) {
    if value.is_null() {
        return; // pruned unless nullable
    }
    let invalid = |errors: &mut Vec<FieldError>, detail: String| {
        errors.push(format!(
            "{path}: Invalid value: {}: {detail}",
            describe(value)
        ));
    };
    if flag(schema, "x-kubernetes-int-or-string") {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            invalid(
                errors,
                format!("{path} in body must be of type int-or-string"),
            );
        }
        return;
    }
    if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let actual = type_name(value);
        let fits = actual == expected || (expected == "number" && actual == "integer");
        if !fits {
            errors.push(format!(
                "{path}: Invalid value: \"{actual}\": {path} in body must be of type {expected}: \"{actual}\""
            ));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list: Vec<String> = allowed.iter().map(describe).collect();
        errors.push(format!(
            "{path}: Unsupported value: {}: supported values: {}",
            describe(value),
            list.join(", ")
        ));
    }
    let bound = |name: &str| schema.get(name).and_then(Value::as_f64);
    match value {
        Value::Number(n) => {
            let n = n.as_f64().unwrap_or_default();
            if let Some(min) = bound("minimum")
                && n < min
            {
                invalid(
                    errors,
                    format!("{path} in body should be greater than or equal to {min}"),
                );
            }
            if let Some(max) = bound("maximum")
                && n > max
            {
                invalid(
                    errors,
                    format!("{path} in body should be less than or equal to {max}"),
                );
            }
        }
        Value::String(s) => {
            let len = s.chars().count() as f64;
            if let Some(min) = bound("minLength")
                && len < min
            {
                invalid(
                    errors,
                    format!("{path} in body should be at least {min} chars long"),
                );
            }
            if let Some(max) = bound("maxLength")
                && len > max
            {
                errors.push(format!(
                    "{path}: Too long: may not be more than {max} bytes"
                ));
            }
            if let Some(pattern) = schema.get("pattern").and_then(Value::as_str) {
                match regex::Regex::new(pattern) {
                    Ok(re) if !re.is_match(s) => {
                        invalid(errors, format!("{path} in body should match '{pattern}'"));
                    }
                    Ok(_) => {}
                    Err(e) => errors.push(format!("{path}: the schema's pattern is invalid: {e}")),
                }
            }
        }
        Value::Array(items) => {
            let len = items.len() as f64;
            if let Some(min) = bound("minItems")
                && len < min
            {
                invalid(
                    errors,
                    format!("{path} in body should have at least {min} items"),
                );
            }
            if let Some(max) = bound("maxItems")
                && len > max
            {
                errors.push(format!(
                    "{path}: Too many: {len}: must have at most {max} items"
                ));
            }
            if let Some(item) = schema.get("items") {
                for (i, v) in items.iter().enumerate() {
                    check(item, v, &format!("{path}[{i}]"), errors);
                }
            }
        }
        Value::Object(map) => check_object(schema, map, path, errors),
        _ => {}
    }
}

fn check_object(
    schema: &Value,
    map: &Map<String, Value>,
    path: &str,
    errors: &mut Vec<FieldError>,
) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (key, sub) in props {
            match map.get(key) {
                Some(v) => check(sub, v, &format!("{path}.{key}"), errors),
                None if required(schema, key) => {
                    errors.push(format!("{path}.{key}: Required value"));
                }
                None => {}
            }
        }
    } else if let Some(additional) = schema.get("additionalProperties").filter(|a| a.is_object()) {
        for (key, v) in map {
            check(additional, v, &format!("{path}.{key}"), errors);
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn schema() -> Value {
        json!({
            "type": "object",
            "properties": {
                "spec": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "name": {"type": "string", "pattern": "^[a-z]+$", "maxLength": 5},
                        "count": {"type": "integer", "minimum": 1.0, "maximum": 3.0, "default": 2},
                        "mode": {"type": "string", "enum": ["A", "B"]},
                        "tags": {"type": "array", "maxItems": 2.0, "items": {"type": "string"}},
                        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                        "opt": {"type": "string", "nullable": true},
                    },
                    "x-kubernetes-validations": [
                        {"rule": "self.name != 'bad'", "message": "bad is not a name"}
                    ],
                },
            },
        })
    }

    #[test]
    fn unknown_fields_are_pruned_and_defaults_filled() {
        let mut object = json!({
            "apiVersion": "x/v1", "kind": "X", "metadata": {"name": "a"},
            "spec": {"name": "ok", "extra": 1, "mode": null, "opt": null, "labels": {"a": "b"}},
            "junk": true,
        });
        assert_eq!(admit(&schema(), &mut object, None), Vec::<String>::new());
        assert_eq!(
            object["spec"],
            json!({"name": "ok", "count": 2, "opt": null, "labels": {"a": "b"}})
        );
        assert!(object.get("junk").is_none());
    }

    #[test]
    fn structural_errors_name_the_field() {
        let mut object = json!({"spec": {"name": "TOOLONG", "count": 9, "mode": "C",
            "tags": ["a", "b", "c"], "labels": {"a": 1}}});
        let errors = admit(&schema(), &mut object, None);
        let all = errors.join("\n");
        for expected in [
            "spec.name: Too long",
            "spec.name: Invalid value: \"TOOLONG\": spec.name in body should match",
            "spec.count: Invalid value: 9: spec.count in body should be less than or equal to 3",
            "spec.mode: Unsupported value: \"C\"",
            "spec.tags: Too many",
            "spec.labels.a: Invalid value: \"integer\": spec.labels.a in body must be of type string",
        ] {
            assert!(all.contains(expected), "{expected:?} not in:\n{all}");
        }
        let mut object = json!({"spec": {}});
        assert_eq!(
            admit(&schema(), &mut object, None),
            ["spec.name: Required value"]
        );
    }

    #[test]
    fn cel_rules_run_after_the_structural_checks() {
        let mut object = json!({"spec": {"name": "bad"}});
        let errors = admit(&schema(), &mut object, None);
        assert!(
            errors.iter().any(|e| e.contains("bad is not a name")),
            "{errors:?}"
        );
    }
}
