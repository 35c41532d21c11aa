//! Printers of the run log: text for people, JSON lines for machines, Markdown for tickets. Each
//! renders the same [`Event`]s, so the three formats cannot say different things. Operators keep
//! this output as the record of a run, so its shape only changes on purpose.

use std::borrow::Cow;
use std::io::Write;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};

use crate::domain::{Format, Mode};
use crate::events::{rfc3339, Event, FlipEvent, Hold, SkipReason, Start, Summary};
use crate::plan::{Basis, Reviewed};

pub(crate) mod history;

/// Where a run sends its events.
pub trait Printer: Send {
    fn print(&mut self, event: &Event) -> Result<()>;
}

/// The printer for `format`, writing to `out`.
pub fn printer<'w>(format: Format, out: &'w mut (dyn Write + Send)) -> Box<dyn Printer + 'w> {
    match format {
        Format::Text => Box::new(TextPrinter::new(out)),
        Format::Json => Box::new(JsonPrinter { out }),
        Format::Markdown => Box::new(MarkdownPrinter::new(out)),
    }
}

/// Keeps the events in memory: for tests and for callers that inspect a run.
#[derive(Debug, Default)]
pub struct Recorder {
    pub events: Vec<Event>,
}

impl Printer for Recorder {
    fn print(&mut self, event: &Event) -> Result<()> {
        self.events.push(event.clone());
        Ok(())
    }
}

fn write_line(out: &mut (dyn Write + Send), text: &str) -> Result<()> {
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .context("could not write the run report to stdout")
}

/// One JSON object per line, keys in sorted order.
pub(crate) struct JsonPrinter<'w> {
    out: &'w mut (dyn Write + Send),
}

impl Printer for JsonPrinter<'_> {
    fn print(&mut self, event: &Event) -> Result<()> {
        // Through a `Value`, whose maps keep keys sorted: the line's shape never depends on the
        // order fields are declared in.
        let value = serde_json::to_value(event).context("could not encode a log event")?;
        write_line(self.out, &value.to_string())
    }
}

/// Stored values go into the text log escaped where they could forge or garble it: a newline in
/// a URL would start a fake flip line, an ESC sequence would reach the operator's terminal, and a
/// bidirectional override would reorder what is shown. JSON output is escaped by its encoder.
pub(crate) fn printable(text: &str) -> Cow<'_, str> {
    let risky = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(risky) {
        return Cow::Borrowed(text);
    }
    text.chars()
        .map(|c| {
            if risky(c) {
                c.escape_unicode().to_string()
            } else {
                c.to_string()
            }
        })
        .collect::<String>()
        .into()
}

/// A compact age: minutes under an hour, hours under two days, then days.
pub(crate) fn age(elapsed: chrono::Duration) -> String {
    let minutes = elapsed.num_minutes().max(0);
    if minutes < 60 {
        format!("{minutes}m")
    } else if minutes < 48 * 60 {
        format!("{}h", minutes / 60)
    } else {
        format!("{}d", minutes / (24 * 60))
    }
}

/// What the text and Markdown logs say of why a flip exists: `probed 3d ago, discovery error`,
/// `no snapshot`, `reverts RUN`, or what became of a reviewed flip.
pub(crate) fn basis_note(basis: &Basis, now: DateTime<Utc>) -> String {
    match basis {
        Basis::Probe(probe) => {
            let mut note = format!("probed {} ago", age(now - probe.last_discovered));
            if probe.discovery_error {
                note.push_str(", discovery error");
            }
            if probe.oauth_required {
                note.push_str(", needs OAuth");
            }
            note
        }
        Basis::NoSnapshot => "no snapshot".to_owned(),
        Basis::Reviewed(Reviewed::InPlan) => "in the reviewed plan".to_owned(),
        Basis::Reviewed(Reviewed::AlreadyCarried) => "already carries the reviewed type".to_owned(),
        Basis::Reviewed(Reviewed::WrittenBy(run_id)) => format!("written by run {run_id}"),
        Basis::Reverts(reversal) => {
            let run_id = &reversal.run_id;
            match &reversal.restored_by {
                Some(revert) => {
                    format!("reverts {run_id}; already restored by revert run {revert}")
                }
                None if reversal.legacy_unknown => {
                    format!("reverts {run_id}; {LEGACY_UNKNOWN_NOTE}")
                }
                None => format!("reverts {run_id}"),
            }
        }
    }
}

/// What the run log says of a flip restored from an audit row that cannot tell an absent key, a
/// JSON `null` and the string "unknown" apart.
const LEGACY_UNKNOWN_NOTE: &str =
    "old row: \"unknown\" may have been no type key or null; restores \"unknown\"";

/// A duration at a precision that shows the difference between two close ones: `1.5s`, `59s`,
/// `12m30s`, `25h0m`.
pub(crate) fn precise_age(elapsed: chrono::Duration) -> String {
    let millis = elapsed.num_milliseconds().max(0);
    let seconds = millis / 1000;
    if seconds < 10 {
        format!("{}.{}s", seconds, (millis % 1000) / 100)
    } else if seconds < 60 {
        format!("{seconds}s")
    } else if seconds < 3600 {
        format!("{}m{}s", seconds / 60, seconds % 60)
    } else {
        format!("{}h{}m", seconds / 3600, (seconds % 3600) / 60)
    }
}

fn duration_text(duration_ms: u64) -> String {
    format!("{}.{:02}s", duration_ms / 1000, (duration_ms % 1000) / 10)
}

/// What a flip's note says after the probe: the crawler's own record of the disagreement.
fn evidence_note(flip: &FlipEvent) -> Option<String> {
    let evidence = flip.crawler_disagreements.as_ref()?;
    // Said once, in the header and the summary: every flip would repeat it.
    if evidence.unavailable.is_some() {
        return None;
    }
    let mut parts = Vec::new();
    if let (count @ 1.., Some(first)) = (evidence.count.unwrap_or(0), evidence.first_at) {
        parts.push(format!(
            "crawler disagreed {count}x since {}",
            first.format("%Y-%m-%d")
        ));
    }
    if let Some(last) = &evidence.last_inferred {
        if *last != flip.at.flip.to {
            parts.push(format!("crawler last saw {last}"));
        }
    }
    (!parts.is_empty()).then(|| parts.join(", "))
}

fn flip_note(flip: &FlipEvent) -> String {
    match evidence_note(flip) {
        Some(evidence) => format!("{}; {evidence}", flip.probe_note),
        None => flip.probe_note.clone(),
    }
}

fn flip_text(flip: &FlipEvent) -> String {
    format!(
        "{}  {}  {} -> {}  ({})",
        printable(&flip.at.profile),
        printable(&flip.at.flip.url),
        printable(&flip.at.flip.stored_label()),
        flip.at.flip.to,
        printable(&flip_note(flip))
    )
}

fn hold_text(hold: &Hold) -> String {
    match &hold.inferred_type {
        Some(inferred) => format!("{}: '{}'", hold.reason.describe(), printable(inferred)),
        None => hold.reason.describe().to_owned(),
    }
}

/// The summary as label/value rows, shared by the text and Markdown printers.
fn summary_rows(summary: &Summary, reverting: bool) -> Vec<(String, String)> {
    let mode = summary.mode.unwrap_or(Mode::DryRun);
    let mut rows: Vec<(String, String)> = Vec::new();
    if summary.plan_complete {
        rows = plan_rows(summary, reverting);
    }
    rows.push(("mode".into(), mode.as_str().to_owned()));
    if mode == Mode::Apply && summary.plan_complete {
        rows.extend(write_rows(summary, reverting));
    } else if mode == Mode::Apply {
        rows.push(("written".into(), summary.written.to_string()));
    } else if reverting && summary.plan_complete {
        let conflicts = summary
            .skipped_by_reason
            .get(&SkipReason::ChangedSinceRun)
            .copied()
            .unwrap_or(0);
        rows.push((
            SkipReason::ChangedSinceRun.summary_label().into(),
            conflicts.to_string(),
        ));
    }
    if let Some(why) = &summary.crawler_log_unavailable {
        rows.push(("crawler log".into(), format!("unavailable: {why}")));
    }
    let outcome = summary
        .outcome
        .as_ref()
        .map_or("(unknown)", |outcome| outcome.message.as_str());
    rows.push(("outcome".into(), outcome.to_owned()));
    rows.push(("duration".into(), duration_text(summary.duration_ms)));
    rows
}

/// What the plan found.
fn plan_rows(summary: &Summary, reverting: bool) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = vec![
        (
            "profiles scanned".into(),
            summary.profiles_scanned.to_string(),
        ),
        (
            "profiles with type changes".into(),
            summary.profiles_changed.to_string(),
        ),
        ("flips found".into(), summary.flips.to_string()),
        ("flips to write".into(), summary.to_write.to_string()),
        ("held (never written)".into(), summary.held.to_string()),
        (
            "not allowed (never written)".into(),
            summary.not_allowed.to_string(),
        ),
        (
            "malformed rows skipped".into(),
            summary.malformed.to_string(),
        ),
        (
            "junk agent elements left alone".into(),
            summary.junk_elements.to_string(),
        ),
    ];
    if !reverting {
        let unrecognised = if summary.unrecognised_inferred_types.is_empty() {
            "(none)".to_owned()
        } else {
            summary
                .unrecognised_inferred_types
                .iter()
                .map(|(name, count)| format!("{} {count}", printable(name)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        rows.push(("unrecognised inferred types".into(), unrecognised));
    }
    rows
}

/// What an apply wrote and left.
fn write_rows(summary: &Summary, reverting: bool) -> Vec<(String, String)> {
    let mut rows: Vec<(String, String)> = Vec::new();
    {
        rows.push(("written".into(), summary.written.to_string()));
        let reasons: &[SkipReason] = if reverting {
            &[
                SkipReason::ChangedSinceRun,
                SkipReason::ProfileGone,
                SkipReason::NotWrittenTimeout,
            ]
        } else {
            &[
                SkipReason::ChangedSincePlan,
                SkipReason::AlreadyWritten,
                SkipReason::ProfileGone,
                SkipReason::NotWrittenTimeout,
                SkipReason::Unplanned,
            ]
        };
        for reason in reasons {
            let count = summary.skipped_by_reason.get(reason).copied().unwrap_or(0);
            rows.push((reason.summary_label().into(), count.to_string()));
        }
        rows.push((
            "audit run id".into(),
            summary
                .run_id
                .clone()
                .unwrap_or_else(|| "(none: nothing written)".to_owned()),
        ));
    }
    rows
}

fn rule_text(start: &Start) -> String {
    start.rule.short()
}

fn plural(count: usize, one: &str, many: &str) -> String {
    format!("{count} {}", if count == 1 { one } else { many })
}

/// The text log: a header, one line per flip, then a summary.
pub(crate) struct TextPrinter<'w> {
    out: &'w mut (dyn Write + Send),
    reverting: bool,
}

impl<'w> TextPrinter<'w> {
    pub fn new(out: &'w mut (dyn Write + Send)) -> Self {
        TextPrinter {
            out,
            reverting: false,
        }
    }

    fn line(&mut self, text: &str) -> Result<()> {
        write_line(self.out, text)
    }

    fn field(&mut self, name: &str, value: &str) -> Result<()> {
        self.line(&format!("{:<12} {value}", format!("{name}:")))
    }
}

impl Printer for TextPrinter<'_> {
    fn print(&mut self, event: &Event) -> Result<()> {
        match event {
            Event::Start(start) => {
                self.reverting = start.reverts.is_some();
                self.line(&format!("{} {}", start.tool, start.version))?;
                self.field("mode", start.mode.as_str())?;
                self.field("target", &start.target.to_string())?;
                self.field("started", &rfc3339(&start.started_at))?;
                self.field("run id", &start.run_id)?;
                self.field("rule", &rule_text(start))?;
                self.field("max flips", &start.max_flips.to_string())?;
                if let Some(reverted) = &start.reverts {
                    self.field("reverts", reverted)?;
                }
                if let Some(why) = &start.crawler_log_unavailable {
                    self.field("crawler log", &format!("unavailable: {}", printable(why)))?;
                }
                if start.leave_held {
                    self.field(
                        "leave held",
                        "yes: held flips are listed and left unwritten",
                    )?;
                }
                self.line("flips:")
            }
            Event::Flip(flip) => self.line(&format!("  {}", flip_text(flip))),
            Event::Held { flip, hold } => self.line(&format!(
                "  held  {}  [{}]",
                flip_text(flip),
                hold_text(hold)
            )),
            Event::NotAllowed(flip) => self.line(&format!("  not allowed  {}", flip_text(flip))),
            Event::Skipped { flip, reason } => self.line(&format!(
                "  skipped  {}  [{}]",
                flip_text(flip),
                reason.describe()
            )),
            Event::PlanWritten { path, flips } => {
                self.field("plan file", &format!("{} ({flips} flips)", printable(path)))
            }
            Event::Interrupted {
                signal,
                during,
                duration_ms,
            } => self.line(&format!(
                "{during} interrupted by {signal} after {}: nothing was written",
                duration_text(*duration_ms)
            )),
            Event::Summary(summary) => {
                if summary.flips == 0 && summary.plan_complete {
                    self.line("  (none)")?;
                }
                self.line("summary:")?;
                for (name, value) in summary_rows(summary, self.reverting) {
                    self.line(&format!("  {:<31} {value}", format!("{name}:")))?;
                }
                if !summary.transitions.is_empty() {
                    self.line("transitions:")?;
                    for (transition, count) in &summary.transitions {
                        self.line(&format!(
                            "  {} -> {}  {count}",
                            printable(&transition.from),
                            transition.to
                        ))?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// GitHub-flavoured Markdown: tables a reviewer can paste into a ticket.
pub(crate) struct MarkdownPrinter<'w> {
    out: &'w mut (dyn Write + Send),
    reverting: bool,
    /// The table being written, so a new kind of event opens its own.
    section: Option<&'static str>,
    flips_listed: bool,
}

/// A table cell: escaped so stored values cannot break the table or render as markup.
fn cell(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in printable(text).chars() {
        if matches!(
            c,
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '|' | '#' | '~' | '!'
        ) {
            escaped.push('\\');
        }
        escaped.push(c);
    }
    escaped
}

impl<'w> MarkdownPrinter<'w> {
    pub fn new(out: &'w mut (dyn Write + Send)) -> Self {
        MarkdownPrinter {
            out,
            reverting: false,
            section: None,
            flips_listed: false,
        }
    }

    fn line(&mut self, text: &str) -> Result<()> {
        write_line(self.out, text)
    }

    /// Opens a table under a heading unless it is the one being written.
    fn table(&mut self, section: &'static str, columns: &[&str]) -> Result<()> {
        if self.section == Some(section) {
            return Ok(());
        }
        self.section = Some(section);
        self.line("")?;
        self.line(&format!("### {section}"))?;
        self.line("")?;
        self.line(&format!("| {} |", columns.join(" | ")))?;
        self.line(&format!("|{}", " --- |".repeat(columns.len())))
    }

    fn row(&mut self, cells: &[String]) -> Result<()> {
        self.line(&format!("| {} |", cells.join(" | ")))
    }

    fn flip_row(&mut self, flip: &FlipEvent, last: Option<String>) -> Result<()> {
        let mut cells = vec![
            cell(&flip.at.profile),
            cell(&flip.at.flip.url),
            cell(&flip.at.flip.stored_label()),
            cell(&flip.at.flip.to),
            cell(&flip.probe_note),
            cell(&evidence_note(flip).unwrap_or_default()),
        ];
        cells.extend(last);
        self.row(&cells)
    }

    fn paragraph(&mut self, text: &str) -> Result<()> {
        self.section = None;
        self.line("")?;
        self.line(text)
    }
}

const FLIP_COLUMNS: [&str; 6] = ["profile", "url", "from", "to", "probe", "crawler"];

impl Printer for MarkdownPrinter<'_> {
    fn print(&mut self, event: &Event) -> Result<()> {
        match event {
            Event::Start(start) => {
                self.reverting = start.reverts.is_some();
                self.line(&format!("## {} run log", start.tool))?;
                self.line("")?;
                self.line("| | |")?;
                self.line("| --- | --- |")?;
                let mut fields = vec![
                    ("tool", format!("{} {}", start.tool, start.version)),
                    ("rule", rule_text(start)),
                    ("target", start.target.to_string()),
                    ("mode", start.mode.as_str().to_owned()),
                    ("run id", start.run_id.clone()),
                    ("started", rfc3339(&start.started_at)),
                    ("max flips", start.max_flips.to_string()),
                ];
                if let Some(reverted) = &start.reverts {
                    fields.push(("reverts", reverted.clone()));
                }
                if let Some(why) = &start.crawler_log_unavailable {
                    fields.push(("crawler log", format!("unavailable: {why}")));
                }
                if start.leave_held {
                    fields.push((
                        "leave held",
                        "yes: held flips are listed and left unwritten".to_owned(),
                    ));
                }
                for (name, value) in fields {
                    self.row(&[name.to_owned(), cell(&value)])?;
                }
                Ok(())
            }
            Event::Flip(flip) => {
                self.flips_listed = true;
                self.table("Flips", &FLIP_COLUMNS)?;
                self.flip_row(flip, None)
            }
            Event::Held { flip, hold } => {
                let mut columns = FLIP_COLUMNS.to_vec();
                columns.push("held because");
                self.table("Held (never written)", &columns)?;
                self.flip_row(flip, Some(cell(&hold_text(hold))))
            }
            Event::NotAllowed(flip) => {
                self.table("Not allowed by --allow-transition", &FLIP_COLUMNS)?;
                self.flip_row(flip, None)
            }
            Event::Skipped { flip, reason } => {
                let mut columns = FLIP_COLUMNS.to_vec();
                columns.push("not written because");
                self.table("Skipped", &columns)?;
                self.flip_row(flip, Some(cell(reason.describe())))
            }
            Event::PlanWritten { path, flips } => {
                self.paragraph(&format!("Plan file: {} ({flips} flips)", cell(path)))
            }
            Event::Interrupted {
                signal,
                during,
                duration_ms,
            } => self.paragraph(&format!(
                "**{during} interrupted by {signal} after {}: nothing was written**",
                duration_text(*duration_ms)
            )),
            Event::Summary(summary) => {
                if !self.flips_listed && summary.flips == 0 && summary.plan_complete {
                    self.paragraph("No flips.")?;
                }
                self.table("Summary", &["", ""])?;
                for (name, value) in summary_rows(summary, self.reverting) {
                    self.row(&[name, cell(&value)])?;
                }
                if !summary.transitions.is_empty() {
                    self.table("Transitions", &["from", "to", "flips"])?;
                    for (transition, count) in &summary.transitions {
                        self.row(&[
                            cell(&transition.from),
                            cell(&transition.to),
                            count.to_string(),
                        ])?;
                    }
                }
                Ok(())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_values_cannot_forge_or_garble_log_lines() {
        let forged = "https://x\n  forged  https://y  buying -> sales";
        assert_eq!(
            printable(forged),
            "https://x\\u{a}  forged  https://y  buying -> sales"
        );
        assert_eq!(printable("\u{1b}[2Jslug"), "\\u{1b}[2Jslug");
        assert_eq!(printable("evil\u{202e}lmth.exe"), "evil\\u{202e}lmth.exe");
        assert_eq!(printable("广告 x Acme é"), "广告 x Acme é");
    }

    #[test]
    fn markdown_cells_cannot_break_the_table_or_render_markup() {
        assert_eq!(cell("a|b"), "a\\|b");
        assert_eq!(cell("<img src=x>"), "\\<img src=x\\>");
        assert_eq!(cell("line\nbreak"), "line\\\\u{a}break");
        assert_eq!(cell("https://x.example/a_b"), "https://x.example/a\\_b");
    }

    #[test]
    fn ages_below_a_minute_keep_their_difference() {
        let ms = chrono::Duration::milliseconds;
        assert_eq!(precise_age(ms(1_040)), "1.0s");
        assert_eq!(precise_age(ms(1_960)), "1.9s");
        assert_eq!(precise_age(ms(42_000)), "42s");
        assert_eq!(precise_age(ms(754_000)), "12m34s");
        assert_eq!(precise_age(ms(25 * 3_600_000)), "25h0m");
    }

    /// Every reason a flip exists says itself, and a revert's line says "already restored" over
    /// the legacy caveat: the element no longer needs restoring, so how is moot.
    #[test]
    fn each_basis_says_why_its_flip_exists() {
        use crate::db::SnapshotRow;
        use crate::plan::{Restore, Reversal};
        let now = Utc::now();
        let probe = |discovery_error, oauth_required| {
            Basis::Probe(SnapshotRow {
                inferred_type: Some("sales".into()),
                last_discovered: now - chrono::Duration::days(3),
                discovery_error,
                oauth_required,
            })
        };
        let reverts = |legacy_unknown, restored_by: Option<&str>| {
            Basis::Reverts(Reversal {
                run_id: "atb-1".into(),
                restore: Restore::Json("null".into()),
                legacy_unknown,
                restored_by: restored_by.map(str::to_owned),
            })
        };
        let cases = [
            (probe(false, false), "probed 3d ago"),
            (
                probe(true, true),
                "probed 3d ago, discovery error, needs OAuth",
            ),
            (Basis::NoSnapshot, "no snapshot"),
            (Basis::Reviewed(Reviewed::InPlan), "in the reviewed plan"),
            (
                Basis::Reviewed(Reviewed::AlreadyCarried),
                "already carries the reviewed type",
            ),
            (
                Basis::Reviewed(Reviewed::WrittenBy("atb-2".into())),
                "written by run atb-2",
            ),
            (reverts(false, None), "reverts atb-1"),
            (
                reverts(true, None),
                "reverts atb-1; old row: \"unknown\" may have been no type key or null; \
                 restores \"unknown\"",
            ),
            (
                reverts(true, Some("atb-3")),
                "reverts atb-1; already restored by revert run atb-3",
            ),
        ];
        for (basis, note) in cases {
            assert_eq!(basis_note(&basis, now), note, "{basis:?}");
        }
    }
}
