//! The run log on stdout: a header, one line per flip, then a summary; or the same as JSON lines.
//! Operators keep this output as the record of a run, so its shape only changes on purpose.

use std::io::Write;

use anyhow::{Context, Result};
use chrono::{DateTime, SecondsFormat, Utc};
use serde::Serialize;
use serde_json::{json, Value};
use uuid::Uuid;

use crate::cli::{Format, Mode};
use crate::db::{SnapshotRow, Target};
use crate::resolver::type_label;

pub struct Header<'a> {
    pub version: &'a str,
    pub mode: Mode,
    pub target: &'a Target,
    pub started_at: DateTime<Utc>,
    pub run_id: &'a str,
    pub max_flips: usize,
    /// For `revert`: the run being undone.
    pub reverts: Option<&'a str>,
}

/// One flip as the log shows it.
pub struct FlipLine<'a> {
    pub profile_id: Uuid,
    pub profile: &'a str,
    pub index: usize,
    pub url: &'a str,
    pub from: &'a Value,
    pub to: &'a str,
    /// The snapshot behind the flip, so a reviewer can judge how fresh and clean the probe was.
    pub probe: Option<&'a SnapshotRow>,
    /// Said instead of the probe description when set.
    pub note: Option<&'a str>,
    pub now: DateTime<Utc>,
}

impl FlipLine<'_> {
    /// `probed 3d ago`, with the snapshot's warning signs; `no snapshot` for a legacy type.
    fn probe_note(&self) -> String {
        if let Some(note) = self.note {
            return note.to_owned();
        }
        let Some(probe) = self.probe else {
            return "no snapshot".to_owned();
        };
        let mut note = format!("probed {} ago", age(self.now - probe.last_discovered));
        if probe.discovery_error {
            note.push_str(", discovery error");
        }
        if probe.oauth_required {
            note.push_str(", needs OAuth");
        }
        note
    }

    fn text(&self) -> String {
        format!(
            "{}  {}  {} -> {}  ({})",
            printable(self.profile),
            printable(self.url),
            printable(&type_label(self.from)),
            self.to,
            self.probe_note()
        )
    }

    fn event(&self, kind: &str) -> Value {
        json!({
            "event": kind,
            "profile_id": self.profile_id,
            "profile": self.profile,
            "index": self.index,
            "url": self.url,
            "from": self.from,
            "to": self.to,
            "probed_at": self.probe.map(|probe| probe.last_discovered.to_rfc3339_opts(SecondsFormat::Secs, true)),
            "discovery_error": self.probe.is_some_and(|probe| probe.discovery_error),
            "oauth_required": self.probe.is_some_and(|probe| probe.oauth_required),
        })
    }
}

/// Stored values go into the text log escaped where they could forge or garble it: a newline in
/// a URL would start a fake flip line, an ESC sequence would reach the operator's terminal, and a
/// bidirectional override would reorder what is shown. JSON output is escaped by its encoder.
pub fn printable(text: &str) -> std::borrow::Cow<'_, str> {
    let risky = |c: char| {
        c.is_control()
            || matches!(c, '\u{200b}'..='\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}')
    };
    if !text.chars().any(risky) {
        return std::borrow::Cow::Borrowed(text);
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
pub fn age(elapsed: chrono::Duration) -> String {
    let minutes = elapsed.num_minutes().max(0);
    if minutes < 60 {
        format!("{minutes}m")
    } else if minutes < 48 * 60 {
        format!("{}h", minutes / 60)
    } else {
        format!("{}d", minutes / (24 * 60))
    }
}

/// Why a planned flip was not written, or a found flip was not planned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// The profile or its snapshot changed between plan and write; the flip no longer holds.
    ChangedSincePlan,
    /// The profile was deleted between plan and write.
    ProfileGone,
    /// Found while writing but absent from the plan; left for the next run.
    Unplanned,
    /// The batch kept hitting lock or statement timeouts and was rolled back.
    NotWrittenTimeout,
    /// `revert`: the element no longer carries the type the reverted run wrote.
    ChangedSinceRun,
}

impl SkipReason {
    fn describe(self) -> &'static str {
        match self {
            SkipReason::ChangedSincePlan => "changed since plan, not written",
            SkipReason::ProfileGone => "profile deleted since plan, not written",
            SkipReason::Unplanned => "new since plan, not written; the next run will find it",
            SkipReason::NotWrittenTimeout => "lock or statement timeout, not written; rerun",
            SkipReason::ChangedSinceRun => "changed since that run, conflict left alone",
        }
    }
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub profiles_scanned: u64,
    pub profiles_changed: u64,
    /// Flips in the plan: what the threshold is checked against.
    pub flips: u64,
    /// Profiles whose `agents` is not an array (NULL included): never written.
    pub malformed: u64,
    /// Array elements the rule cannot touch (not objects, or no string `url`).
    pub junk_elements: u64,
    pub written: u64,
    pub skipped: u64,
    pub unplanned: u64,
    pub aborted: bool,
    /// The signal that stopped the run between batches, if any.
    pub interrupted_by: Option<&'static str>,
    pub duration_ms: u64,
}

pub struct Reporter<'w> {
    format: Format,
    out: &'w mut (dyn Write + Send),
}

impl<'w> Reporter<'w> {
    pub fn new(format: Format, out: &'w mut (dyn Write + Send)) -> Self {
        Reporter { format, out }
    }

    fn line(&mut self, text: &str) -> Result<()> {
        writeln!(self.out, "{text}")
            .and_then(|()| self.out.flush())
            .context("could not write the run report to stdout")
    }

    fn event(&mut self, event: Value) -> Result<()> {
        self.line(&event.to_string())
    }

    pub fn header(&mut self, header: &Header) -> Result<()> {
        let started = header.started_at.to_rfc3339_opts(SecondsFormat::Secs, true);
        match self.format {
            Format::Json => self.event(json!({
                "event": "start",
                "tool": "agent-type-backfill",
                "version": header.version,
                "mode": header.mode.as_str(),
                "target": header.target,
                "started_at": started,
                "run_id": header.run_id,
                "max_flips": header.max_flips,
                "reverts": header.reverts,
            })),
            Format::Text => {
                self.line(&format!("agent-type-backfill {}", header.version))?;
                self.line(&format!("mode:        {}", header.mode.as_str()))?;
                self.line(&format!("target:      {}", header.target))?;
                self.line(&format!("started:     {started}"))?;
                self.line(&format!("run id:      {}", header.run_id))?;
                self.line(&format!("max flips:   {}", header.max_flips))?;
                if let Some(reverted) = header.reverts {
                    self.line(&format!("reverts:     {reverted}"))?;
                }
                self.line("flips:")
            }
        }
    }

    pub fn flip(&mut self, flip: &FlipLine) -> Result<()> {
        match self.format {
            Format::Json => self.event(flip.event("flip")),
            Format::Text => self.line(&format!("  {}", flip.text())),
        }
    }

    pub fn skipped(&mut self, flip: &FlipLine, reason: SkipReason) -> Result<()> {
        match self.format {
            Format::Json => {
                let mut event = flip.event("skipped");
                event["reason"] = json!(reason);
                self.event(event)
            }
            Format::Text => self.line(&format!(
                "  skipped  {}  [{}]",
                flip.text(),
                reason.describe()
            )),
        }
    }

    pub fn plan_written(&mut self, path: &std::path::Path, flips: usize) -> Result<()> {
        match self.format {
            Format::Json => self.event(json!({
                "event": "plan_written",
                "path": path.display().to_string(),
                "flips": flips,
            })),
            Format::Text => self.line(&format!("plan file:   {} ({flips} flips)", path.display())),
        }
    }

    /// A planned flip whose transition `--allow-transition` does not list.
    pub fn not_allowed(&mut self, flip: &FlipLine) -> Result<()> {
        match self.format {
            Format::Json => self.event(flip.event("not_allowed")),
            Format::Text => self.line(&format!("  not allowed  {}", flip.text())),
        }
    }

    pub fn summary(&mut self, mode: Mode, run_id: &str, summary: &Summary) -> Result<()> {
        let audit_run_id = (mode == Mode::Apply && summary.written > 0).then_some(run_id);
        match self.format {
            Format::Json => {
                let mut event =
                    serde_json::to_value(summary).context("could not encode summary")?;
                let fields = event.as_object_mut().expect("summary is an object");
                fields.insert("event".into(), json!("summary"));
                fields.insert("mode".into(), json!(mode.as_str()));
                fields.insert("run_id".into(), json!(audit_run_id));
                self.event(event)
            }
            Format::Text => {
                if summary.flips == 0 {
                    self.line("  (none)")?;
                }
                self.line("summary:")?;
                let rows: Vec<(&str, String)> = vec![
                    ("profiles scanned", summary.profiles_scanned.to_string()),
                    (
                        "profiles with type changes",
                        summary.profiles_changed.to_string(),
                    ),
                    ("agent rows flipped", summary.flips.to_string()),
                    ("malformed rows skipped", summary.malformed.to_string()),
                    (
                        "junk agent elements left alone",
                        summary.junk_elements.to_string(),
                    ),
                    ("mode", mode.as_str().to_owned()),
                ];
                for (name, value) in rows {
                    self.line(&format!("  {:<31} {value}", format!("{name}:")))?;
                }
                if mode == Mode::Apply {
                    let apply_rows = [
                        ("written", summary.written.to_string()),
                        ("skipped (changed since plan)", summary.skipped.to_string()),
                        (
                            "new since plan (not written)",
                            summary.unplanned.to_string(),
                        ),
                        (
                            "audit run id",
                            audit_run_id.unwrap_or("(none: nothing written)").to_owned(),
                        ),
                    ];
                    for (name, value) in apply_rows {
                        self.line(&format!("  {:<31} {value}", format!("{name}:")))?;
                    }
                }
                let outcome = match (summary.aborted, summary.interrupted_by) {
                    (true, _) => {
                        "refused by --max-flips or --allow-transition, nothing written".to_owned()
                    }
                    (false, Some(signal)) => {
                        format!("interrupted by {signal}; rerun to pick up the rest")
                    }
                    (false, None) => "completed".to_owned(),
                };
                self.line(&format!("  {:<31} {outcome}", "outcome:"))?;
                self.line(&format!(
                    "  {:<31} {:.2}s",
                    "duration:",
                    summary.duration_ms as f64 / 1000.0
                ))
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
}
