//! The API reference a user reads (`docs/API.md` in the repository), rendered as Markdown from
//! the OpenAPI document the server serves: one source for both, so that they cannot disagree.
//! `tests/api_reference.rs` renders the served document and compares it with the file.

use std::fmt::Write;

use serde_json::Value;

/// Request headers every operation takes, described once at the top instead of per operation.
const SHARED_HEADERS: [&str; 2] = ["api-version", "x-request-id"];

/// The reference of `doc` (an OpenAPI 3 document, as served at `/v1/openapi.json`).
pub fn markdown(doc: &Value) -> String {
    let mut md = String::new();
    let info = &doc["info"];
    let _ = writeln!(
        md,
        "# {} {}\n",
        text(&info["title"]),
        text(&info["version"])
    );
    md.push_str(
        "<!-- Generated from the OpenAPI document that `kiln serve` serves at \
         `/v1/openapi.json`; `tests/api_reference.rs` checks that the two agree. Regenerate \
         with `KILN_BLESS=1 cargo test --release --test api_reference`. -->\n\n",
    );
    let _ = writeln!(md, "{}\n", text(&info["description"]));
    md.push_str(
        "Every operation takes the optional request headers `api-version` (the `MAJOR.MINOR` \
         the client was written for) and `x-request-id` (echoed in the response and in \
         errors). Sizes are bytes, or strings with a binary unit (`\"512MiB\"`). The machine-\
         readable document is served at `GET /v1/openapi.json`.\n\n",
    );
    errors(&mut md, doc);
    let tags: Vec<(String, String)> = doc["tags"]
        .as_array()
        .map(|t| {
            t.iter()
                .map(|t| (text(&t["name"]), text(&t["description"])))
                .collect()
        })
        .unwrap_or_default();
    md.push_str("## Endpoints\n\n");
    for (tag, description) in &tags {
        let _ = writeln!(md, "### {tag}\n\n{description}.\n");
        for (path, method, op) in operations(doc) {
            if op["tags"].as_array().and_then(|t| t.first()) == Some(&Value::from(tag.as_str())) {
                operation(&mut md, &path, &method, op);
            }
        }
    }
    schemas(&mut md, doc);
    md
}

/// The error codes and their statuses.
fn errors(md: &mut String, doc: &Value) {
    let codes = &doc["components"]["schemas"]["ErrorCode"];
    let Some(list) = codes["enum"].as_array() else {
        return;
    };
    md.push_str("## Errors\n\n");
    md.push_str(
        "Every error has one shape, `{\"error\": {\"code\", \"message\", \"request_id\"}}`. \
         The codes:\n\n",
    );
    let names: Vec<String> = list.iter().map(|c| format!("`{}`", text(c))).collect();
    let _ = writeln!(md, "{}\n", names.join(", "));
    if let Some(d) = codes["description"].as_str() {
        let _ = writeln!(md, "{d}\n");
    }
}

/// Every operation, in the document's path order: (path, METHOD, operation).
fn operations(doc: &Value) -> Vec<(String, String, &Value)> {
    let mut out = Vec::new();
    if let Some(paths) = doc["paths"].as_object() {
        for (path, item) in paths {
            for method in ["get", "post", "put", "patch", "delete"] {
                if let Some(op) = item.get(method) {
                    out.push((path.clone(), method.to_uppercase(), op));
                }
            }
        }
    }
    out
}

fn operation(md: &mut String, path: &str, method: &str, op: &Value) {
    let _ = writeln!(md, "#### `{method} {path}`\n");
    let summary = text(&op["summary"]);
    if !summary.is_empty() {
        let _ = writeln!(md, "{summary}\n");
    }
    let description = text(&op["description"]);
    if !description.is_empty() {
        let _ = writeln!(md, "{description}\n");
    }
    let params: Vec<&Value> = op["parameters"]
        .as_array()
        .map(|p| {
            p.iter()
                .filter(|p| !SHARED_HEADERS.contains(&p["name"].as_str().unwrap_or("")))
                .collect()
        })
        .unwrap_or_default();
    if !params.is_empty() {
        md.push_str("| parameter | in | type | description |\n|---|---|---|---|\n");
        for p in params {
            let required = if p["required"] == true {
                " (required)"
            } else {
                ""
            };
            let _ = writeln!(
                md,
                "| `{}`{required} | {} | {} | {} |",
                text(&p["name"]),
                text(&p["in"]),
                type_of(&p["schema"]),
                cell(&text(&p["description"]))
            );
        }
        md.push('\n');
    }
    if let Some(content) = op["requestBody"]["content"].as_object() {
        for (media, c) in content {
            let _ = writeln!(md, "Request body (`{media}`): {}\n", type_of(&c["schema"]));
            if let Some(example) = c.get("example") {
                let _ = writeln!(
                    md,
                    "```json\n{}\n```\n",
                    serde_json::to_string_pretty(example).unwrap_or_default()
                );
            }
        }
    }
    if let Some(responses) = op["responses"].as_object() {
        md.push_str("| status | description |\n|---|---|\n");
        for (status, r) in responses {
            let body = r["content"]
                .as_object()
                .and_then(|c| c.values().next())
                .map(|c| format!(" → {}", type_of(&c["schema"])))
                .unwrap_or_default();
            let _ = writeln!(
                md,
                "| {status} | {}{body} |",
                cell(&text(&r["description"]))
            );
        }
        md.push('\n');
    }
}

/// The schemas of the bodies, with their fields.
fn schemas(md: &mut String, doc: &Value) {
    let Some(schemas) = doc["components"]["schemas"].as_object() else {
        return;
    };
    md.push_str("## Schemas\n\n");
    for (name, s) in schemas {
        let _ = writeln!(md, "### {name}\n");
        let description = text(&s["description"]);
        if !description.is_empty() {
            let _ = writeln!(md, "{description}\n");
        }
        if let Some(values) = s["enum"].as_array() {
            let v: Vec<String> = values.iter().map(|v| format!("`{}`", text(v))).collect();
            let _ = writeln!(md, "One of {}.\n", v.join(", "));
        }
        if let Some(props) = s["properties"].as_object() {
            let required: Vec<&str> = s["required"]
                .as_array()
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            md.push_str("| field | type | description |\n|---|---|---|\n");
            for (field, p) in props {
                let req = if required.contains(&field.as_str()) {
                    " (required)"
                } else {
                    ""
                };
                let _ = writeln!(
                    md,
                    "| `{field}`{req} | {} | {} |",
                    type_of(p),
                    cell(&text(&p["description"]))
                );
            }
            md.push('\n');
        }
        if let Some(one_of) = s["oneOf"].as_array() {
            let v: Vec<String> = one_of.iter().map(type_of).collect();
            let _ = writeln!(md, "One of: {}.\n", v.join(", "));
        }
    }
}

/// A schema's type in a few words: `string`, `integer`, `[Instance]`, `Instance`.
fn type_of(s: &Value) -> String {
    if let Some(r) = s["$ref"].as_str() {
        let name = r.rsplit('/').next().unwrap_or(r);
        return format!("[{name}](#{})", name.to_lowercase());
    }
    if let Some(all) = s["allOf"].as_array().or(s["oneOf"].as_array()) {
        let parts: Vec<String> = all
            .iter()
            .map(type_of)
            .filter(|t| t != "null" && !t.is_empty())
            .collect();
        return parts.join(" or ");
    }
    match &s["type"] {
        Value::String(t) if t == "array" => format!("array of {}", type_of(&s["items"])),
        Value::String(t) => t.clone(),
        Value::Array(types) => types
            .iter()
            .map(text)
            .filter(|t| t != "null")
            .collect::<Vec<_>>()
            .join(" or "),
        _ => String::new(),
    }
}

fn text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Text fit for a table cell: one line, no bare `|`.
fn cell(s: &str) -> String {
    s.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .replace('|', "\\|")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_operation_and_schema_is_in_the_reference() {
        let doc: Value = serde_json::from_str(crate::openapi::openapi_json()).unwrap();
        let md = markdown(&doc);
        for (path, method, _) in operations(&doc) {
            assert!(
                md.contains(&format!("`{method} {path}`")),
                "{method} {path}"
            );
        }
        for name in doc["components"]["schemas"].as_object().unwrap().keys() {
            assert!(md.contains(&format!("### {name}\n")), "{name}");
        }
    }
}
