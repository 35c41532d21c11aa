//! The `history` listing, apart from the run log: every backfill run, or the audit rows of one,
//! in text, JSON lines or Markdown. A listing has no header, flips or summary, so it shares the
//! run log's escaping and none of its printers' state.

use std::io::Write;

use anyhow::{Context, Result};
use serde::Serialize;

use super::{cell, plural, printable, write_line};
use crate::domain::{rfc3339, Format};
use crate::events::{HistoryRow, HistoryRun};

/// What `history` lists.
#[derive(Debug, Clone)]
pub(crate) enum Listing {
    /// Every backfill run in the audit table, newest first.
    Runs(Vec<HistoryRun>),
    /// The audit rows of one run, in the order they were written.
    Rows {
        run_id: String,
        rows: Vec<HistoryRow>,
    },
}

/// One JSON line of a listing: the same `event` tag as the run log's lines.
#[derive(Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
enum Line<'a> {
    Run(&'a HistoryRun),
    Row(&'a HistoryRow),
}

/// Prints `listing` in `format`.
pub(crate) fn print(format: Format, out: &mut (dyn Write + Send), listing: &Listing) -> Result<()> {
    match format {
        Format::Text => text(out, listing),
        Format::Json => json(out, listing),
        Format::Markdown => markdown(out, listing),
    }
}

fn json(out: &mut (dyn Write + Send), listing: &Listing) -> Result<()> {
    let lines: Vec<Line<'_>> = match listing {
        Listing::Runs(runs) => runs.iter().map(Line::Run).collect(),
        Listing::Rows { rows, .. } => rows.iter().map(Line::Row).collect(),
    };
    for line in lines {
        // Through a `Value`, as the run log's lines: keys sorted, whatever the declaration order.
        let value = serde_json::to_value(line).context("could not encode a history line")?;
        write_line(out, &value.to_string())?;
    }
    Ok(())
}

fn text(out: &mut (dyn Write + Send), listing: &Listing) -> Result<()> {
    match listing {
        Listing::Runs(runs) => {
            write_line(
                out,
                &format!(
                    "{:<31}  {:<20}  {:<20}  {:>6}  {:>8}  reverts",
                    "run id", "first change", "last change", "flips", "profiles"
                ),
            )?;
            for run in runs {
                let [id, first, last, flips, profiles, reverts] = run_columns(run);
                write_line(
                    out,
                    &format!(
                        "{id:<31}  {first:<20}  {last:<20}  {flips:>6}  {profiles:>8}  {reverts}"
                    ),
                )?;
            }
            write_line(out, &plural(runs.len(), "run", "runs"))
        }
        Listing::Rows { run_id, rows } => {
            for row in rows {
                let [at, label, url, index, change] = row_columns(row);
                write_line(
                    out,
                    &format!(
                        "{at}  {}  {}  {index}  {}",
                        printable(&label),
                        printable(&url),
                        printable(&change)
                    ),
                )?;
            }
            write_line(
                out,
                &format!("{} in run {run_id}", plural(rows.len(), "row", "rows")),
            )
        }
    }
}

fn markdown(out: &mut (dyn Write + Send), listing: &Listing) -> Result<()> {
    let (section, columns, cells): (&str, &[&str], Vec<Vec<String>>) = match listing {
        Listing::Runs(runs) => (
            "Runs",
            &[
                "run id",
                "first change",
                "last change",
                "flips",
                "profiles",
                "reverts",
            ],
            runs.iter()
                .map(|run| run_columns(run).iter().map(|text| cell(text)).collect())
                .collect(),
        ),
        Listing::Rows { rows, .. } => (
            "Audit rows",
            &["changed at", "profile", "url", "index", "change"],
            rows.iter()
                .map(|row| row_columns(row).iter().map(|text| cell(text)).collect())
                .collect(),
        ),
    };
    // No runs, no table: an empty listing prints nothing in Markdown.
    if cells.is_empty() {
        return Ok(());
    }
    write_line(out, "")?;
    write_line(out, &format!("### {section}"))?;
    write_line(out, "")?;
    write_line(out, &format!("| {} |", columns.join(" | ")))?;
    write_line(out, &format!("|{}", " --- |".repeat(columns.len())))?;
    for row in cells {
        write_line(out, &format!("| {} |", row.join(" | ")))?;
    }
    Ok(())
}

fn run_columns(run: &HistoryRun) -> [String; 6] {
    [
        run.run_id.clone(),
        rfc3339(&run.first_change),
        rfc3339(&run.last_change),
        run.flips.to_string(),
        run.profiles.to_string(),
        run.reverts.clone().unwrap_or_else(|| "-".to_owned()),
    ]
}

fn row_columns(row: &HistoryRow) -> [String; 5] {
    [
        rfc3339(&row.changed_at),
        row.profile.clone(),
        row.agent_url.clone(),
        row.index.map_or("?".to_owned(), |index| index.to_string()),
        format!(
            "{} -> {}",
            row.old_type.as_deref().unwrap_or("(none)"),
            row.new_type
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn printed(format: Format, listing: &Listing) -> String {
        let mut out = Vec::new();
        print(format, &mut out, listing).unwrap();
        String::from_utf8(out).unwrap()
    }

    /// An empty registry still answers in text (a header and "0 runs"), and says nothing in JSON
    /// or Markdown, where an empty table would be a table of nothing.
    #[test]
    fn an_empty_listing_is_a_header_and_a_count_in_text_only() {
        let empty = Listing::Runs(Vec::new());
        assert_eq!(
            printed(Format::Text, &empty),
            "run id                           first change          last change            flips  \
             profiles  reverts\n0 runs\n"
        );
        assert_eq!(printed(Format::Json, &empty), "");
        assert_eq!(printed(Format::Markdown, &empty), "");
    }

    /// A stored slug or url cannot forge a line or break a table of the listing, as in the log.
    #[test]
    fn a_listed_row_is_escaped_as_the_run_log_escapes() {
        let at = chrono::DateTime::parse_from_rfc3339("2026-12-04T10:00:00Z")
            .unwrap()
            .to_utc();
        let rows = Listing::Rows {
            run_id: "atb-x".to_owned(),
            rows: vec![HistoryRow {
                id: 1,
                run_id: Some("atb-x".to_owned()),
                changed_at: at,
                member_id: None,
                agent_url: "https://x.example/a|b\nforged".to_owned(),
                old_type: None,
                new_type: "sales".to_owned(),
                notes: None,
                profile: "p_1".to_owned(),
                index: None,
            }],
        };
        assert_eq!(
            printed(Format::Text, &rows),
            "2026-12-04T10:00:00Z  p_1  https://x.example/a|b\\u{a}forged  ?  (none) -> sales\n\
             1 row in run atb-x\n"
        );
        assert!(
            printed(Format::Markdown, &rows).ends_with(
                "| 2026-12-04T10:00:00Z | p\\_1 | https://x.example/a\\|b\\\\u{a}forged | ? | \
                 (none) -\\> sales |\n"
            ),
            "{}",
            printed(Format::Markdown, &rows)
        );
    }
}
