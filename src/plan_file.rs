//! Reviewed plans: a dry-run writes the flips it found (`--plan-out`), and an apply given that
//! file (`--plan`) writes only those of them that still hold, on the database they came from.

use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::backfill::{Plan, PlannedFlip};
use crate::error::Failure;

pub const FORMAT: &str = "agent-type-backfill plan v1";

/// Which database a plan was made on. `system_identifier` is the cluster's identity from
/// `pg_control_system()`, when the user may read it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub system_identifier: Option<String>,
    pub host: String,
    pub port: u16,
    pub database: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanFlip {
    pub profile_id: Uuid,
    pub profile: String,
    pub index: usize,
    pub url: String,
    pub from: Value,
    pub to: String,
    /// When the snapshot behind the flip was probed; `None` for a legacy type without one.
    pub last_discovered: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanCounts {
    pub profiles_scanned: u64,
    pub profiles_changed: u64,
    pub flips: u64,
    pub malformed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlanFile {
    pub format: String,
    pub tool_version: String,
    pub created_at: DateTime<Utc>,
    pub run_id: String,
    pub target: Fingerprint,
    pub counts: PlanCounts,
    pub flips: Vec<PlanFlip>,
}

impl PlanFlip {
    fn of(planned: &PlannedFlip) -> PlanFlip {
        PlanFlip {
            profile_id: planned.profile_id,
            profile: planned.label.clone(),
            index: planned.flip.index,
            url: planned.flip.url.clone(),
            from: planned.flip.from.clone(),
            to: planned.flip.to.clone(),
            last_discovered: planned.probe.as_ref().map(|probe| probe.last_discovered),
        }
    }

    /// Whether a freshly planned flip is exactly this reviewed one.
    pub fn matches(&self, planned: &PlannedFlip) -> bool {
        self.profile_id == planned.profile_id
            && self.index == planned.flip.index
            && self.url == planned.flip.url
            && self.from == planned.flip.from
            && self.to == planned.flip.to
    }
}

impl PlanFile {
    pub fn new(
        plan: &Plan,
        target: Fingerprint,
        run_id: &str,
        tool_version: &str,
        created_at: DateTime<Utc>,
    ) -> PlanFile {
        PlanFile {
            format: FORMAT.to_owned(),
            tool_version: tool_version.to_owned(),
            created_at,
            run_id: run_id.to_owned(),
            target,
            counts: PlanCounts {
                profiles_scanned: plan.profiles_scanned,
                profiles_changed: plan.profiles_changed,
                flips: plan.flips.len() as u64,
                malformed: plan.malformed,
            },
            flips: plan.flips.iter().map(PlanFlip::of).collect(),
        }
    }

    /// Writes the plan next to its final name first, so a reader never sees half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).context("could not encode the plan")?;
        let partial = path.with_extension("partial");
        std::fs::write(&partial, text + "\n")
            .with_context(|| format!("could not write the plan to '{}'", partial.display()))?;
        std::fs::rename(&partial, path)
            .with_context(|| format!("could not move the plan into '{}'", path.display()))
    }

    pub fn read(path: &Path) -> Result<PlanFile> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            Failure::Usage(format!(
                "could not read the plan '{}': {error}",
                path.display()
            ))
        })?;
        let plan: PlanFile = serde_json::from_str(&text).map_err(|error| {
            Failure::Usage(format!(
                "'{}' is not a plan written by --plan-out: {error}",
                path.display()
            ))
        })?;
        if plan.format != FORMAT {
            return Err(Failure::Usage(format!(
                "'{}' has plan format '{}', this tool reads '{FORMAT}'",
                path.display(),
                plan.format
            ))
            .into());
        }
        Ok(plan)
    }

    /// Refuses a plan made on another database, or one older than `max_age`.
    pub fn check_applies_to(
        &self,
        here: &Fingerprint,
        now: DateTime<Utc>,
        max_age: Duration,
    ) -> Result<()> {
        let same_cluster = match (&self.target.system_identifier, &here.system_identifier) {
            (Some(planned), Some(current)) => planned == current,
            _ => true,
        };
        if !same_cluster
            || self.target.host != here.host
            || self.target.port != here.port
            || self.target.database != here.database
        {
            return Err(Failure::Usage(format!(
                "the plan was made on {} but this is {}: nothing was written; make a new plan \
                 with --dry-run --plan-out against this database",
                describe(&self.target),
                describe(here)
            ))
            .into());
        }
        let age = now - self.created_at;
        let limit = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        if age > limit {
            return Err(Failure::Usage(format!(
                "the plan is {} old, more than --plan-max-age {}: nothing was written; make a \
                 new plan with --dry-run --plan-out",
                crate::report::age(age),
                crate::report::age(limit)
            ))
            .into());
        }
        Ok(())
    }
}

fn describe(target: &Fingerprint) -> String {
    format!(
        "host={} port={} database={} system_identifier={}",
        target.host,
        target.port,
        target.database,
        target
            .system_identifier
            .as_deref()
            .unwrap_or("(unreadable)")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fingerprint(system: Option<&str>, database: &str) -> Fingerprint {
        Fingerprint {
            system_identifier: system.map(str::to_owned),
            host: "db".into(),
            port: 5432,
            database: database.into(),
        }
    }

    fn plan_made(at: DateTime<Utc>, target: Fingerprint) -> PlanFile {
        PlanFile::new(&Plan::default(), target, "atb-x", "0.1.0", at)
    }

    #[test]
    fn plans_apply_only_to_their_own_database_while_fresh() {
        let now = Utc::now();
        let day = Duration::from_secs(24 * 3600);
        let plan = plan_made(now, fingerprint(Some("7301"), "registry"));
        assert!(plan
            .check_applies_to(&fingerprint(Some("7301"), "registry"), now, day)
            .is_ok());
        for other in [
            fingerprint(Some("9999"), "registry"),
            fingerprint(Some("7301"), "registry_copy"),
        ] {
            let error = plan.check_applies_to(&other, now, day).unwrap_err();
            assert_eq!(crate::error::exit_code(&error), 2);
        }
        let stale = plan_made(
            now - chrono::Duration::hours(25),
            fingerprint(None, "registry"),
        );
        let error = stale
            .check_applies_to(&fingerprint(None, "registry"), now, day)
            .unwrap_err();
        assert!(error.to_string().contains("the plan is 25h old"), "{error}");
    }

    /// Without a system identifier, host, port and database each decide alone; a plan exactly
    /// `--plan-max-age` old still applies. Both were survivors of the mutation run.
    #[test]
    fn each_part_of_the_target_decides_and_the_age_limit_is_inclusive() {
        let now = Utc::now();
        let day = Duration::from_secs(24 * 3600);
        let plan = plan_made(now, fingerprint(None, "registry"));
        let other_host = Fingerprint {
            host: "db-replica".into(),
            ..fingerprint(None, "registry")
        };
        let other_port = Fingerprint {
            port: 5433,
            ..fingerprint(None, "registry")
        };
        for other in [other_host, other_port] {
            let error = plan.check_applies_to(&other, now, day).unwrap_err();
            assert_eq!(crate::error::exit_code(&error), 2, "{other:?}");
        }
        let at_limit = plan_made(
            now - chrono::Duration::hours(24),
            fingerprint(None, "registry"),
        );
        assert!(at_limit
            .check_applies_to(&fingerprint(None, "registry"), now, day)
            .is_ok());
    }
}
