//! `osstream client import FILE`: clients from a CSV or TOML file, created or updated to
//! match it. This module reads the file into [`ClientEntry`]s, with the line of each and
//! every problem the file has; the catalog checks the entries against itself and applies
//! them in one transaction ([`SqlCatalog::plan_client_import`]).

use std::path::Path;

use osstream_catalog::{ClientEntry, ImportAction, LineProblem, SqlCatalog};
use osstream_core::{Error, ErrorKind, Result};
use serde::Serialize;

use crate::args::ClientImport;
use crate::output::done;

/// The columns (CSV) and keys (TOML) an import file may have.
const FIELDS: [&str; 5] = ["mac", "name", "hostname", "group", "vdisks"];

/// How an import file is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImportFormat {
    Csv,
    Toml,
}

impl ImportFormat {
    /// `--format`, else the file's extension.
    fn of(file: &Path, format: Option<&str>) -> Result<Self> {
        let named = format.map(str::to_owned).or_else(|| {
            file.extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase())
        });
        match named.as_deref() {
            Some("csv") => Ok(ImportFormat::Csv),
            Some("toml") => Ok(ImportFormat::Toml),
            _ => Err(Error::new(
                ErrorKind::InvalidInput,
                format!(
                    "cannot tell whether {} is CSV or TOML: name it .csv or .toml, or pass --format csv|toml",
                    file.display()
                ),
            )),
        }
    }
}

/// The entries of an import file, and the problems found reading it.
#[derive(Debug, Default)]
pub struct Parsed {
    pub entries: Vec<ClientEntry>,
    pub problems: Vec<LineProblem>,
}

/// An optional text field as the file gives it: empty clears the field.
fn given(text: &str) -> Option<String> {
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

/// One CSV record: its fields and the line it starts on.
#[derive(Debug, PartialEq)]
struct Record {
    line: usize,
    fields: Vec<String>,
}

/// Splits CSV text into records (RFC 4180: fields in double quotes may hold commas,
/// line breaks and `""` for a quote; unquoted fields are trimmed). Blank lines are
/// skipped. An unclosed quote ends the reading with a problem, as nothing after it can
/// be told apart.
fn csv_records(text: &str) -> (Vec<Record>, Option<LineProblem>) {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut records = Vec::new();
    let mut chars = text.chars().peekable();
    let mut line = 1;
    while chars.peek().is_some() {
        let start = line;
        let mut fields = Vec::new();
        let mut field = String::new();
        let mut quoted = false;
        loop {
            match chars.next() {
                None => break,
                Some('"') if field.trim().is_empty() && !quoted => {
                    // A quoted field: read to its closing quote.
                    let opened = line;
                    field.clear();
                    quoted = true;
                    loop {
                        match chars.next() {
                            None => {
                                return (
                                    records,
                                    Some(LineProblem::new(
                                        opened,
                                        "a quote opened here is never closed (write a quote inside a quoted field as \"\")",
                                    )),
                                );
                            }
                            Some('"') if chars.peek() == Some(&'"') => {
                                chars.next();
                                field.push('"');
                            }
                            Some('"') => break,
                            Some('\n') => {
                                line += 1;
                                field.push('\n');
                            }
                            Some(c) => field.push(c),
                        }
                    }
                }
                Some(',') => {
                    fields.push(finish(&mut field, quoted));
                    quoted = false;
                }
                Some('\n') => {
                    line += 1;
                    break;
                }
                // Text after a closing quote, before the comma: only spaces are allowed
                // (and the \r of a \r\n line end).
                Some(c) if quoted && !c.is_whitespace() => {
                    return (
                        records,
                        Some(LineProblem::new(
                            line,
                            format!(
                                "{c:?} after a closing quote: a quoted field ends at its quote (write a quote inside it as \"\")"
                            ),
                        )),
                    );
                }
                Some(_) if quoted => {}
                Some(c) => field.push(c),
            }
        }
        fields.push(finish(&mut field, quoted));
        let blank = fields.len() == 1 && fields[0].is_empty() && !quoted;
        if !blank {
            records.push(Record {
                line: start,
                fields,
            });
        }
    }
    (records, None)
}

/// A field's text: unquoted ones are trimmed (and lose a \r line end).
fn finish(field: &mut String, quoted: bool) -> String {
    let text = std::mem::take(field);
    if quoted { text } else { text.trim().to_owned() }
}

/// Reads CSV: a header row naming the columns (`mac` and any of `name`, `hostname`,
/// `group`, `vdisks`, in any order), then one client per row; `vdisks` is `;`-separated.
pub fn parse_csv(text: &str) -> Parsed {
    let mut parsed = Parsed::default();
    let (records, unreadable) = csv_records(text);
    parsed.problems.extend(unreadable);
    let mut records = records.into_iter();
    let Some(header) = records.next() else {
        if parsed.problems.is_empty() {
            parsed.problems.push(LineProblem::new(
                1,
                "the file is empty: it needs a header row such as mac,name,hostname,group,vdisks",
            ));
        }
        return parsed;
    };
    // Each column's field, by position; None for a column that is not understood.
    let mut columns: Vec<Option<&str>> = Vec::new();
    for name in &header.fields {
        let name = name.trim().to_ascii_lowercase();
        match FIELDS.iter().find(|f| **f == name) {
            Some(field) if columns.contains(&Some(*field)) => {
                parsed.problems.push(LineProblem::new(
                    header.line,
                    format!("column {field:?} appears twice in the header"),
                ));
                columns.push(None);
            }
            Some(field) => columns.push(Some(*field)),
            None => {
                parsed.problems.push(LineProblem::new(
                    header.line,
                    format!(
                        "unknown column {name:?}: the columns are {} (the first row must name them)",
                        FIELDS.join(", ")
                    ),
                ));
                columns.push(None);
            }
        }
    }
    if !columns.contains(&Some("mac")) {
        parsed.problems.push(LineProblem::new(
            header.line,
            format!(
                "the header has no mac column: the first row names the columns, such as {}",
                FIELDS.join(",")
            ),
        ));
        return parsed;
    }
    for record in records {
        if record.fields.len() != columns.len() {
            parsed.problems.push(LineProblem::new(
                record.line,
                format!(
                    "{} field(s), but the header has {} column(s): give every column a field, empty for none",
                    record.fields.len(),
                    columns.len()
                ),
            ));
            continue;
        }
        let mut entry = ClientEntry {
            line: record.line,
            ..ClientEntry::default()
        };
        for (column, text) in columns.iter().zip(&record.fields) {
            match column {
                Some("mac") => entry.mac = text.trim().to_owned(),
                Some("name") => entry.name = Some(given(text)),
                Some("hostname") => entry.hostname = Some(given(text)),
                Some("group") => entry.group = Some(given(text)),
                Some("vdisks") => {
                    entry.vdisks = Some(text.split(';').filter_map(given).collect());
                }
                _ => {}
            }
        }
        parsed.entries.push(entry);
    }
    parsed
}

/// Line numbers of byte offsets.
struct Lines(Vec<usize>);

impl Lines {
    fn of(text: &str) -> Self {
        Lines(
            std::iter::once(0)
                .chain(text.match_indices('\n').map(|(i, _)| i + 1))
                .collect(),
        )
    }

    fn line(&self, offset: usize) -> usize {
        self.0.partition_point(|start| *start <= offset)
    }
}

type SpannedTable = std::collections::BTreeMap<toml::Spanned<String>, toml::Spanned<toml::Value>>;

/// Reads TOML: one `[[client]]` table per client, with `mac` and any of `name`,
/// `hostname`, `group` (strings) and `vdisks` (an array of strings).
pub fn parse_toml(text: &str) -> Parsed {
    #[derive(serde::Deserialize)]
    struct File {
        #[serde(default)]
        client: Vec<toml::Spanned<SpannedTable>>,
    }
    let lines = Lines::of(text);
    let mut parsed = Parsed::default();
    let unreadable = |err: toml::de::Error| {
        let line = err.span().map_or(1, |span| lines.line(span.start));
        LineProblem::new(line, err.message().trim().to_owned())
    };
    // Unknown top-level keys first (a `[[clients]]` typo would otherwise import nothing).
    match toml::from_str::<SpannedTable>(text) {
        Err(err) => {
            parsed.problems.push(unreadable(err));
            return parsed;
        }
        Ok(top) => {
            for key in top.keys().filter(|k| k.get_ref() != "client") {
                parsed.problems.push(LineProblem::new(
                    lines.line(key.span().start),
                    format!(
                        "unknown key {:?}: write each client as a [[client]] table",
                        key.get_ref()
                    ),
                ));
            }
        }
    }
    let file: File = match toml::from_str(text) {
        Ok(file) => file,
        Err(err) => {
            parsed.problems.push(unreadable(err));
            return parsed;
        }
    };
    if file.client.is_empty() && parsed.problems.is_empty() {
        parsed.problems.push(LineProblem::new(
            1,
            "no [[client]] table: write one per client, with mac = \"aa:bb:cc:dd:ee:ff\"",
        ));
    }
    for table in &file.client {
        let line = lines.line(table.span().start);
        let mut entry = ClientEntry {
            line,
            ..ClientEntry::default()
        };
        let mut has_mac = false;
        for (key, value) in table.get_ref() {
            let at = lines.line(value.span().start);
            let text = || match value.get_ref() {
                toml::Value::String(text) => Ok(text.clone()),
                other => Err(LineProblem::new(
                    at,
                    format!(
                        "{} must be a string, not {}",
                        key.get_ref(),
                        other.type_str()
                    ),
                )),
            };
            let outcome = match key.get_ref().as_str() {
                "mac" => text().map(|mac| {
                    has_mac = true;
                    entry.mac = mac;
                }),
                "name" => text().map(|v| entry.name = Some(given(&v))),
                "hostname" => text().map(|v| entry.hostname = Some(given(&v))),
                "group" => text().map(|v| entry.group = Some(given(&v))),
                "vdisks" => match value.get_ref() {
                    toml::Value::Array(items) => items
                        .iter()
                        .map(|item| match item {
                            toml::Value::String(name) => Ok(name.trim().to_owned()),
                            other => Err(LineProblem::new(
                                at,
                                format!(
                                    "vdisks must list vdisk names as strings, not {}",
                                    other.type_str()
                                ),
                            )),
                        })
                        .collect::<std::result::Result<Vec<_>, _>>()
                        .map(|names| {
                            entry.vdisks =
                                Some(names.into_iter().filter(|n| !n.is_empty()).collect());
                        }),
                    other => Err(LineProblem::new(
                        at,
                        format!(
                            "vdisks must be an array such as [\"win11\", \"debian\"], not {}",
                            other.type_str()
                        ),
                    )),
                },
                unknown => Err(LineProblem::new(
                    lines.line(key.span().start),
                    format!(
                        "unknown key {unknown:?} in [[client]]: the keys are {}",
                        FIELDS.join(", ")
                    ),
                )),
            };
            if let Err(problem) = outcome {
                parsed.problems.push(problem);
            }
        }
        if has_mac {
            parsed.entries.push(entry);
        } else {
            parsed.problems.push(LineProblem::new(
                line,
                "this [[client]] has no mac = \"aa:bb:cc:dd:ee:ff\"",
            ));
        }
    }
    parsed
}

/// `osstream client import`.
pub async fn run(catalog: &SqlCatalog, import: &ClientImport, json: bool) -> Result<()> {
    let file = &import.file;
    let from_stdin = file.as_os_str() == "-";
    if from_stdin && import.format.is_none() {
        return Err(Error::new(
            ErrorKind::InvalidInput,
            "reading clients from stdin needs --format csv|toml",
        ));
    }
    let format = ImportFormat::of(file, import.format.as_deref())?;
    let text = if from_stdin {
        let mut text = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut text)
            .map_err(|e| Error::from_io(e, "cannot read the clients from stdin"))?;
        text
    } else {
        std::fs::read_to_string(file)
            .map_err(|e| Error::from_io(e, format!("cannot read {}", file.display())))?
    };
    let mut parsed = match format {
        ImportFormat::Csv => parse_csv(&text),
        ImportFormat::Toml => parse_toml(&text),
    };
    let plan = catalog
        .plan_client_import(&parsed.entries, import.exact)
        .await?;
    parsed.problems.extend(plan.problems.iter().cloned());
    if !parsed.problems.is_empty() {
        parsed.problems.sort();
        let list: Vec<String> = parsed
            .problems
            .iter()
            .map(|p| format!("  line {}: {}", p.line, p.message))
            .collect();
        return Err(Error::new(
            ErrorKind::InvalidInput,
            format!(
                "{}: {} problem(s); nothing was imported:\n{}",
                file.display(),
                parsed.problems.len(),
                list.join("\n")
            ),
        ));
    }
    let count = |action| plan.outcomes.iter().filter(|o| o.result == action).count();
    let (created, updated, unchanged) = (
        count(ImportAction::Created),
        count(ImportAction::Updated),
        count(ImportAction::Unchanged),
    );
    if created + updated > 0 {
        catalog.apply_client_import(&plan).await?;
    }

    #[derive(Serialize)]
    struct Imported<'a> {
        file: String,
        exact: bool,
        created: usize,
        updated: usize,
        unchanged: usize,
        clients: &'a [osstream_catalog::ClientImportOutcome],
    }
    let mut sentence = format!("created {created}, updated {updated}, unchanged {unchanged}");
    // The updates are the part to read: what the file changed in clients already known.
    for outcome in plan
        .outcomes
        .iter()
        .filter(|o| o.result == ImportAction::Updated)
    {
        let mut what = Vec::new();
        if !outcome.changed.is_empty() {
            what.push(format!("changed {}", outcome.changed.join(", ")));
        }
        if !outcome.assigned.is_empty() {
            what.push(format!("assigned {}", outcome.assigned.join(", ")));
        }
        if !outcome.unassigned.is_empty() {
            what.push(format!("unassigned {}", outcome.unassigned.join(", ")));
        }
        sentence.push_str(&format!(
            "\n  updated {} (line {}): {}",
            outcome.mac,
            outcome.line,
            what.join("; ")
        ));
    }
    done(
        json,
        &Imported {
            file: file.display().to_string(),
            exact: import.exact,
            created,
            updated,
            unchanged,
            clients: &plan.outcomes,
        },
        sentence,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(line: usize, mac: &str) -> ClientEntry {
        ClientEntry {
            line,
            mac: mac.into(),
            ..ClientEntry::default()
        }
    }

    fn lines_of(problems: &[LineProblem]) -> Vec<usize> {
        problems.iter().map(|p| p.line).collect()
    }

    #[test]
    fn csv_rows_become_entries_with_their_lines() {
        let parsed = parse_csv(
            "mac,name,hostname,group,vdisks\n\
             aa:bb:cc:00:00:01,pc1,lab-pc1,lab,win11;debian\n\
             \n\
             AA-BB-CC-00-00-02 , , lab-pc2 ,,\n",
        );
        assert_eq!(parsed.problems, []);
        assert_eq!(
            parsed.entries,
            [
                ClientEntry {
                    line: 2,
                    mac: "aa:bb:cc:00:00:01".into(),
                    name: Some(Some("pc1".into())),
                    hostname: Some(Some("lab-pc1".into())),
                    group: Some(Some("lab".into())),
                    vdisks: Some(vec!["win11".into(), "debian".into()]),
                },
                ClientEntry {
                    line: 4,
                    mac: "AA-BB-CC-00-00-02".into(),
                    name: Some(None),
                    hostname: Some(Some("lab-pc2".into())),
                    group: Some(None),
                    vdisks: Some(vec![]),
                },
            ]
        );
    }

    #[test]
    fn csv_columns_may_come_in_any_order_and_be_left_out() {
        let parsed = parse_csv("\u{feff}Vdisks,MAC\r\n\"win11; debian\",aabbcc000001\r\n");
        assert_eq!(parsed.problems, []);
        assert_eq!(
            parsed.entries,
            [ClientEntry {
                vdisks: Some(vec!["win11".into(), "debian".into()]),
                ..entry(2, "aabbcc000001")
            }]
        );
    }

    #[test]
    fn csv_quoted_fields_hold_commas_quotes_and_line_breaks() {
        let records = csv_records("a,\"b, \"\"c\"\"\",\"two\nlines\"\nnext, \"x\" \n\"\"\n").0;
        assert_eq!(
            records,
            [
                Record {
                    line: 1,
                    fields: vec!["a".into(), "b, \"c\"".into(), "two\nlines".into()],
                },
                Record {
                    line: 3,
                    fields: vec!["next".into(), "x".into()],
                },
                // A quoted empty field is a record, not a blank line.
                Record {
                    line: 4,
                    fields: vec!["".into()],
                },
            ]
        );
        let (records, problem) = csv_records("a,b\n\"open,\nc,d\n");
        assert_eq!(records.len(), 1);
        let problem = problem.unwrap();
        assert_eq!(problem.line, 2);
        assert!(problem.message.contains("never closed"), "{problem:?}");
        let problem = csv_records("\"a\"b,c\n").1.unwrap();
        assert!(
            problem.message.contains("after a closing quote"),
            "{problem:?}"
        );
    }

    #[test]
    fn csv_header_and_row_problems_are_all_reported() {
        let parsed = parse_csv(
            "mac,name,ip,name\n\
             aa:bb:cc:00:00:01,pc1,10.0.0.1,pc1\n\
             aa:bb:cc:00:00:02,pc2\n\
             aa:bb:cc:00:00:03,pc3,x,y\n",
        );
        assert_eq!(lines_of(&parsed.problems), [1, 1, 3]);
        assert!(parsed.problems[0].message.contains("unknown column \"ip\""));
        assert!(
            parsed.problems[1]
                .message
                .contains("\"name\" appears twice")
        );
        assert!(parsed.problems[2].message.contains("2 field(s)"));
        // Rows that read are kept, so the catalog's checks report their problems too.
        assert_eq!(parsed.entries.len(), 2);
        let parsed = parse_csv("name,group\npc1,lab\n");
        assert!(parsed.problems[0].message.contains("no mac column"));
        assert!(
            parse_csv("").problems[0]
                .message
                .contains("the file is empty")
        );
    }

    #[test]
    fn toml_tables_become_entries_with_their_lines() {
        let parsed = parse_toml(
            "# lab\n\
             [[client]]\n\
             mac = \"aa:bb:cc:00:00:01\"\n\
             name = \"pc1\"\n\
             group = \"\"\n\
             vdisks = [\"win11\", \"debian\"]\n\
             \n\
             [[client]]\n\
             mac = \"aa:bb:cc:00:00:02\"\n",
        );
        assert_eq!(parsed.problems, []);
        assert_eq!(
            parsed.entries,
            [
                ClientEntry {
                    name: Some(Some("pc1".into())),
                    group: Some(None),
                    vdisks: Some(vec!["win11".into(), "debian".into()]),
                    ..entry(2, "aa:bb:cc:00:00:01")
                },
                entry(8, "aa:bb:cc:00:00:02"),
            ]
        );
    }

    #[test]
    fn toml_problems_name_their_lines() {
        let parsed = parse_toml(
            "[[client]]\n\
             mac = \"aa:bb:cc:00:00:01\"\n\
             ip = \"10.0.0.1\"\n\
             [[client]]\n\
             name = 7\n\
             vdisks = \"win11\"\n\
             [[clients]]\n\
             mac = \"aa:bb:cc:00:00:03\"\n",
        );
        let mut problems = parsed.problems.clone();
        problems.sort();
        assert_eq!(lines_of(&problems), [3, 4, 5, 6, 7], "{problems:#?}");
        assert!(problems[0].message.contains("unknown key \"ip\""));
        assert!(problems[1].message.contains("has no mac"));
        assert!(problems[2].message.contains("name must be a string"));
        assert!(problems[3].message.contains("vdisks must be an array"));
        assert!(problems[4].message.contains("unknown key \"clients\""));
        let broken = parse_toml("[[client]]\nmac = \"aa\nname = \"x\"\n");
        assert_eq!(lines_of(&broken.problems), [2], "{:?}", broken.problems);
    }

    #[test]
    fn the_format_comes_from_the_flag_or_the_extension() {
        let of = |file: &str, flag| ImportFormat::of(Path::new(file), flag);
        assert_eq!(of("lab.CSV", None).unwrap(), ImportFormat::Csv);
        assert_eq!(of("lab.toml", None).unwrap(), ImportFormat::Toml);
        assert_eq!(of("lab.txt", Some("csv")).unwrap(), ImportFormat::Csv);
        assert!(
            of("lab.txt", None)
                .unwrap_err()
                .to_string()
                .contains("--format csv|toml")
        );
    }
}
