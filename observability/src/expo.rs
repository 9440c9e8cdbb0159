//! The Prometheus text exposition format (0.0.4): parsing into families, adding a label to
//! every sample, and merging the output of several endpoints into one valid exposition (each
//! family's `# HELP`/`# TYPE` once, its samples together).

use std::collections::HashMap;

#[derive(Debug, thiserror::Error)]
pub enum ExpoError {
    #[error("line {line}: {reason}")]
    Parse { line: usize, reason: String },
    #[error("label name {0:?} is not valid")]
    BadLabelName(String),
}

/// One metric family as text: its HELP and TYPE (when given) and its sample lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Family {
    pub name: String,
    pub help: Option<String>,
    pub kind: Option<String>,
    pub samples: Vec<String>,
}

fn is_name_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == ':'
}

/// The metric name a sample line starts with, and its byte length.
fn sample_name(line: &str) -> Option<&str> {
    let mut chars = line.char_indices();
    match chars.next() {
        Some((_, c)) if is_name_start(c) => {}
        _ => return None,
    }
    let end = chars.find(|(_, c)| !is_name_char(*c)).map(|(i, _)| i).unwrap_or(line.len());
    Some(&line[..end])
}

/// Escapes a label value for the text format.
pub fn escape_label_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '"' => out.push_str("\\\""),
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out
}

/// Adds `name="value"` as the first label of a sample line.
pub fn inject_label(line: &str, name: &str, value: &str) -> Result<String, ExpoError> {
    let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    if !valid {
        return Err(ExpoError::BadLabelName(name.to_string()));
    }
    let bad = |reason: &str| ExpoError::Parse {
        line: 0,
        reason: format!("{reason}: {line:?}"),
    };
    let metric = sample_name(line).ok_or_else(|| bad("sample without a metric name"))?;
    let rest = &line[metric.len()..];
    let label = format!("{name}=\"{}\"", escape_label_value(value));
    if let Some(labels) = rest.strip_prefix('{') {
        if labels.trim_start().starts_with('}') {
            Ok(format!("{metric}{{{label}{labels}"))
        } else {
            Ok(format!("{metric}{{{label},{labels}"))
        }
    } else if rest.starts_with(' ') || rest.starts_with('\t') {
        Ok(format!("{metric}{{{label}}}{rest}"))
    } else {
        Err(bad("sample without a value"))
    }
}

/// Whether sample `name` belongs to family `family` of type `kind`.
fn belongs(name: &str, family: &str, kind: Option<&str>) -> bool {
    if name == family {
        return true;
    }
    let Some(suffix) = name.strip_prefix(family) else {
        return false;
    };
    match kind {
        Some("histogram") => matches!(suffix, "_bucket" | "_sum" | "_count"),
        Some("summary") => matches!(suffix, "_sum" | "_count"),
        _ => false,
    }
}

/// Parses an exposition into families, in order. With `label`, every sample gets it added.
pub fn parse(text: &str, label: Option<(&str, &str)>) -> Result<Vec<Family>, ExpoError> {
    let mut families: Vec<Family> = Vec::new();
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut current: Option<usize> = None;
    let family_at = |families: &mut Vec<Family>, index: &mut HashMap<String, usize>, name: &str| -> usize {
        *index.entry(name.to_string()).or_insert_with(|| {
            families.push(Family {
                name: name.to_string(),
                help: None,
                kind: None,
                samples: Vec::new(),
            });
            families.len() - 1
        })
    };
    for (i, raw) in text.lines().enumerate() {
        let lineno = i + 1;
        let line = raw.trim_end();
        if line.trim().is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let comment = comment.trim_start();
            let (keyword, rest) = comment.split_once(' ').unwrap_or((comment, ""));
            if keyword != "HELP" && keyword != "TYPE" {
                continue; // an ordinary comment
            }
            let rest = rest.trim_start();
            let (name, value) = rest.split_once(' ').unwrap_or((rest, ""));
            if sample_name(name) != Some(name) {
                return Err(ExpoError::Parse {
                    line: lineno,
                    reason: format!("bad metric name in {keyword}: {name:?}"),
                });
            }
            let at = family_at(&mut families, &mut index, name);
            let f = &mut families[at];
            if keyword == "HELP" {
                f.help = Some(value.to_string());
            } else {
                let kind = value.trim();
                if !matches!(kind, "counter" | "gauge" | "histogram" | "summary" | "untyped") {
                    return Err(ExpoError::Parse {
                        line: lineno,
                        reason: format!("unknown type {kind:?}"),
                    });
                }
                f.kind = Some(kind.to_string());
            }
            current = Some(at);
            continue;
        }
        let name = sample_name(line).ok_or_else(|| ExpoError::Parse {
            line: lineno,
            reason: format!("not a sample: {line:?}"),
        })?;
        let at = match current {
            Some(c) if belongs(name, &families[c].name, families[c].kind.as_deref()) => c,
            _ => family_at(&mut families, &mut index, name),
        };
        current = Some(at);
        let sample = match label {
            Some((k, v)) => inject_label(line, k, v).map_err(|e| match e {
                ExpoError::Parse { reason, .. } => ExpoError::Parse { line: lineno, reason },
                other => other,
            })?,
            None => {
                if !line[name.len()..].starts_with([' ', '\t', '{']) {
                    return Err(ExpoError::Parse {
                        line: lineno,
                        reason: format!("sample without a value: {line:?}"),
                    });
                }
                line.to_string()
            }
        };
        families[at].samples.push(sample);
    }
    Ok(families)
}

/// Merges expositions family by family.
#[derive(Debug, Default)]
pub struct Merger {
    families: Vec<Family>,
    index: HashMap<String, usize>,
}

impl Merger {
    pub fn new() -> Merger {
        Merger::default()
    }

    /// Adds parsed families. A family whose TYPE differs from the one already merged is dropped
    /// (mixing types would make the whole output invalid); returns how many were dropped.
    pub fn add(&mut self, families: Vec<Family>) -> usize {
        let mut dropped = 0;
        for f in families {
            match self.index.get(&f.name) {
                Some(&at) => {
                    let have = &mut self.families[at];
                    if have.kind.is_some() && f.kind.is_some() && have.kind != f.kind {
                        dropped += 1;
                        continue;
                    }
                    if have.help.is_none() {
                        have.help = f.help;
                    }
                    if have.kind.is_none() {
                        have.kind = f.kind;
                    }
                    have.samples.extend(f.samples);
                }
                None => {
                    self.index.insert(f.name.clone(), self.families.len());
                    self.families.push(f);
                }
            }
        }
        dropped
    }

    /// Parses `text` (adding `label` to every sample) and merges it; all or nothing.
    pub fn add_text(&mut self, text: &str, label: Option<(&str, &str)>) -> Result<usize, ExpoError> {
        let families = parse(text, label)?;
        Ok(self.add(families))
    }

    /// The merged exposition. Families without samples are left out.
    pub fn render(&self) -> String {
        let mut out = String::new();
        for f in self.families.iter().filter(|f| !f.samples.is_empty()) {
            if let Some(h) = &f.help {
                out.push_str(&format!("# HELP {} {}\n", f.name, h));
            }
            if let Some(k) = &f.kind {
                out.push_str(&format!("# TYPE {} {}\n", f.name, k));
            }
            for s in &f.samples {
                out.push_str(s);
                out.push('\n');
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "# HELP joey_x_total Things.\n# TYPE joey_x_total counter\njoey_x_total 3\n\
# HELP joey_h Latency.\n# TYPE joey_h histogram\njoey_h_bucket{le=\"0.1\"} 1\njoey_h_bucket{le=\"+Inf\"} 2\n\
joey_h_sum 0.3\njoey_h_count 2\n# HELP joey_g A gauge.\n# TYPE joey_g gauge\njoey_g{mode=\"a b\"} 1.5\n";

    #[test]
    fn injects_label_first() {
        assert_eq!(inject_label("m 1", "sandbox_id", "x").unwrap(), "m{sandbox_id=\"x\"} 1");
        assert_eq!(
            inject_label("m{a=\"b\"} 1 1700", "sandbox_id", "x").unwrap(),
            "m{sandbox_id=\"x\",a=\"b\"} 1 1700"
        );
        assert_eq!(inject_label("m{} 1", "s", "x").unwrap(), "m{s=\"x\"} 1");
        assert_eq!(
            inject_label("m 1", "s", "a\"b\\c\nd").unwrap(),
            "m{s=\"a\\\"b\\\\c\\nd\"} 1"
        );
        assert!(inject_label("1m 1", "s", "x").is_err());
        assert!(inject_label("m", "s", "x").is_err());
        assert!(inject_label("m 1", "bad-name", "x").is_err());
    }

    #[test]
    fn parses_families_with_histogram_suffixes() {
        let f = parse(A, None).unwrap();
        let names: Vec<_> = f.iter().map(|f| f.name.as_str()).collect();
        assert_eq!(names, ["joey_x_total", "joey_h", "joey_g"]);
        assert_eq!(f[1].samples.len(), 4);
        assert_eq!(f[1].kind.as_deref(), Some("histogram"));
        assert_eq!(f[2].help.as_deref(), Some("A gauge."));
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse("HTTP/1.1 200 OK\n", None).is_err());
        assert!(parse("# TYPE m wobbly\n", None).is_err());
        assert!(parse("m\n", None).is_err());
    }

    #[test]
    fn merges_two_sources_grouped_by_family() {
        let mut m = Merger::new();
        m.add_text(A, Some(("sandbox_id", "one"))).unwrap();
        m.add_text(A, Some(("sandbox_id", "two"))).unwrap();
        let out = m.render();
        assert_eq!(out.matches("# TYPE joey_h histogram").count(), 1);
        assert_eq!(out.matches("# HELP joey_x_total").count(), 1);
        let x: Vec<_> = out.lines().filter(|l| l.starts_with("joey_x_total")).collect();
        assert_eq!(x, ["joey_x_total{sandbox_id=\"one\"} 3", "joey_x_total{sandbox_id=\"two\"} 3"]);
        // The samples of one family are contiguous.
        let lines: Vec<_> = out.lines().collect();
        let first = lines.iter().position(|l| l.starts_with("joey_h_")).unwrap();
        assert!(lines[first..first + 8].iter().all(|l| l.starts_with("joey_h_")));
        assert!(out.contains("joey_g{sandbox_id=\"two\",mode=\"a b\"} 1.5"));
        // Re-parsing the merged output gives the same families.
        assert_eq!(parse(&out, None).unwrap().len(), 3);
    }

    #[test]
    fn conflicting_type_is_dropped() {
        let mut m = Merger::new();
        m.add_text("# TYPE m gauge\nm 1\n", None).unwrap();
        let dropped = m.add_text("# TYPE m counter\nm 2\n", None).unwrap();
        assert_eq!(dropped, 1);
        assert_eq!(m.render(), "# TYPE m gauge\nm 1\n");
    }
}
