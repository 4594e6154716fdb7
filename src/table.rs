//! Tables for the CLI: instances, disks and images as aligned columns.

use serde_json::Value;

/// Prints rows under a header, each column as wide as its widest cell. Columns whose header
/// starts with `>` are right-aligned (the `>` is not printed).
pub fn print(header: &[&str], rows: &[Vec<String>]) {
    crate::endpoint::out(&render(header, rows));
}

fn render(header: &[&str], rows: &[Vec<String>]) -> String {
    let right: Vec<bool> = header.iter().map(|h| h.starts_with('>')).collect();
    let header: Vec<String> = header
        .iter()
        .map(|h| h.trim_start_matches('>').to_string())
        .collect();
    let mut width: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in width.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let pad = width[i].saturating_sub(cell.chars().count());
            if right[i] {
                line.push_str(&" ".repeat(pad));
                line.push_str(cell);
            } else {
                line.push_str(cell);
                if i + 1 < row.len() {
                    line.push_str(&" ".repeat(pad));
                }
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// A byte count with a binary unit: `512MiB`, `1.5GiB`, `4096B`; `-` when absent.
pub fn size(v: &Value) -> String {
    let Some(n) = v.as_u64() else {
        return "-".into();
    };
    const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let mut unit = 0;
    let mut x = n as f64;
    while x >= 1024.0 && unit + 1 < UNITS.len() {
        x /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n}B")
    } else if x.fract() == 0.0 {
        format!("{x:.0}{}", UNITS[unit])
    } else {
        format!("{x:.1}{}", UNITS[unit])
    }
}

/// A string field, or `-`.
fn text(v: &Value) -> String {
    match v {
        Value::String(s) if !s.is_empty() => s.clone(),
        Value::Null => "-".into(),
        Value::String(_) => "-".into(),
        other => other.to_string(),
    }
}

/// `attached_to`: an instance, a list of them, or nothing.
fn attached(v: &Value) -> String {
    match v {
        Value::Array(a) if !a.is_empty() => a.iter().map(text).collect::<Vec<_>>().join(","),
        Value::Array(_) => "-".into(),
        Value::Object(o) => text(o.get("name").or(o.get("id")).unwrap_or(&Value::Null)),
        other => text(other),
    }
}

/// Instances: name, state, vCPUs, memory, id.
pub fn instances(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                text(&i["name"]),
                text(&i["state"]),
                text(&i["vcpus"]),
                size(&i["memory"]),
                text(&i["id"]),
            ]
        })
        .collect();
    print(&["NAME", "STATE", ">VCPUS", ">MEMORY", "ID"], &rows);
}

/// One instance in detail, a field per line: what `kiln instance show` prints.
pub fn instance_detail(i: &client::wire::Instance) {
    let v = serde_json::to_value(i).unwrap_or_default();
    let disks: Vec<String> = i
        .disks
        .iter()
        .map(|d| {
            format!(
                "{}{}",
                d.disk,
                if d.read_only { " (read-only)" } else { "" }
            )
        })
        .collect();
    let nics: Vec<String> = i
        .network_interfaces
        .iter()
        .map(|n| {
            let mac = serde_json::to_value(n.mac).unwrap_or_default();
            format!("{} on {} ({})", n.name, n.host_tap, text(&mac))
        })
        .collect();
    let rows: Vec<(&str, String)> = vec![
        ("name", i.name.clone()),
        ("id", i.id.to_string()),
        ("state", text(&v["state"])),
        ("state_reason", text(&v["state_reason"])),
        ("description", text(&v["description"])),
        ("vcpus", i.vcpus.to_string()),
        ("memory", size(&v["memory"])),
        ("kernel", i.boot.kernel.clone()),
        ("initrd", text(&v["boot"]["initrd"])),
        ("cmdline", text(&v["boot"]["cmdline"])),
        ("disks", list(disks)),
        ("nics", list(nics)),
        ("auto_start", i.auto_start.to_string()),
        ("started_at", text(&v["started_at"])),
        ("created_at", i.created_at.clone()),
        ("updated_at", i.updated_at.clone()),
        ("generation", i.generation.to_string()),
    ];
    let mut out = String::new();
    for (k, val) in rows {
        out.push_str(&format!("{:<13} {val}\n", format!("{k}:")));
    }
    crate::endpoint::out(&out);
}

fn list(items: Vec<String>) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// Operations: id, kind, state, resource, when it was last updated, and the error or detail.
pub fn operations(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|o| {
            let note = if o["error"].is_string() {
                &o["error"]
            } else {
                &o["detail"]
            };
            vec![
                text(&o["id"]),
                text(&o["kind"]),
                text(&o["state"]),
                text(&o["resource"]),
                text(&o["updated_at"]),
                text(note),
            ]
        })
        .collect();
    print(
        &["ID", "KIND", "STATE", "RESOURCE", "UPDATED", "NOTE"],
        &rows,
    );
}

/// Disks: name, size, format, what it is attached to, space used on the host, id.
pub fn disks(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            vec![
                text(&d["name"]),
                size(&d["size"]),
                text(&d["format"]),
                attached(&d["attached_to"]),
                size(&d["actual_size"]),
                text(&d["id"]),
            ]
        })
        .collect();
    print(
        &["NAME", ">SIZE", "FORMAT", "ATTACHED-TO", ">ACTUAL", "ID"],
        &rows,
    );
}

/// Images: name, kind, size, path, id.
pub fn images(list: &[Value]) {
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|i| {
            vec![
                text(&i["name"]),
                text(&i["kind"]),
                size(&i["size"]),
                text(&i["path"]),
                text(&i["id"]),
            ]
        })
        .collect();
    print(&["NAME", "KIND", ">SIZE", "PATH", "ID"], &rows);
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn sizes_have_binary_units() {
        assert_eq!(size(&json!(512)), "512B");
        assert_eq!(size(&json!(64u64 << 20)), "64MiB");
        assert_eq!(size(&json!(3u64 << 29)), "1.5GiB");
        assert_eq!(size(&Value::Null), "-");
    }

    #[test]
    fn columns_align() {
        let t = render(
            &["NAME", ">SIZE", "ID"],
            &[
                vec!["a".into(), "8MiB".into(), "x".into()],
                vec!["long-name".into(), "1GiB".into(), "y".into()],
            ],
        );
        assert_eq!(
            t,
            "NAME       SIZE  ID\na          8MiB  x\nlong-name  1GiB  y\n"
        );
    }

    #[test]
    fn attached_to_shapes() {
        assert_eq!(attached(&json!(null)), "-");
        assert_eq!(attached(&json!("web-1")), "web-1");
        assert_eq!(attached(&json!(["a", "b"])), "a,b");
        assert_eq!(attached(&json!({"id": "1", "name": "web"})), "web");
    }
}
