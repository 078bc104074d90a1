//! How admin commands print: aligned tables for people, JSON with `--json`.

use osstream_core::{Error, ErrorKind, Result};
use serde::Serialize;

/// Prints `value` as JSON, or `rows` as an aligned table under `headers`.
pub fn output<T: Serialize>(
    json: bool,
    value: &T,
    headers: &[&str],
    rows: Vec<Vec<String>>,
) -> Result<()> {
    if json {
        return print_json(value);
    }
    print!("{}", table(headers, &rows));
    Ok(())
}

/// `rows` as an aligned table under `headers`, one line each (for commands that compose
/// a screen before printing it).
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut text = String::new();
    let mut line = |cells: &[String]| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths[i]))
            .collect();
        text.push_str(padded.join("  ").trim_end());
        text.push('\n');
    };
    line(&headers.iter().map(|h| h.to_string()).collect::<Vec<_>>());
    for row in rows {
        line(row);
    }
    text
}

/// Prints `value` as pretty JSON on stdout.
pub fn print_json<T: Serialize>(value: &T) -> Result<()> {
    println!("{}", json_text(value, true)?);
    Ok(())
}

/// `value` as JSON: pretty, or on one line (a document per line, for streams).
pub fn json_text<T: Serialize>(value: &T, pretty: bool) -> Result<String> {
    let text = if pretty {
        serde_json::to_string_pretty(value)
    } else {
        serde_json::to_string(value)
    };
    text.map_err(|e| Error::new(ErrorKind::Unexpected, e.to_string()))
}

/// Prints what a command did: `value` (one object with stable snake_case keys, such as
/// `{"removed": "vdisk", "name": "x"}`) with `--json`, else `sentence`. Commands that
/// change something print this, so scripts get JSON from every command.
pub fn done<T: Serialize>(json: bool, value: &T, sentence: impl std::fmt::Display) -> Result<()> {
    if json {
        return print_json(value);
    }
    println!("{sentence}");
    Ok(())
}

pub fn opt(value: &Option<String>) -> String {
    value.clone().unwrap_or_else(|| "-".to_owned())
}

pub fn when(ms: Option<i64>) -> String {
    match ms {
        None => "-".to_owned(),
        Some(ms) => {
            let secs = ms / 1000;
            let (days, rest) = (secs / 86_400, secs % 86_400);
            // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
            let z = days + 719_468;
            let era = z.div_euclid(146_097);
            let doe = z - era * 146_097;
            let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
            let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
            let mp = (5 * doy + 2) / 153;
            let day = doy - (153 * mp + 2) / 5 + 1;
            let month = if mp < 10 { mp + 3 } else { mp - 9 };
            let year = yoe + era * 400 + i64::from(month <= 2);
            format!(
                "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}Z",
                rest / 3600,
                rest % 3600 / 60,
                rest % 60
            )
        }
    }
}
