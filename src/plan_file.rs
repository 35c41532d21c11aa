//! Reviewed plans: a dry-run writes the flips it found (`--plan-out`), and an apply given that
//! file (`--plan`) writes only those of them that still hold, on the database they came from.

use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tracing::warn;
use uuid::Uuid;

use crate::db;
use crate::dispositions::{Census, Disposition, Dispositions};
use crate::domain::{CrawlerEvidence, HoldReason, ProfileFlip, SkipReason};
use crate::error::{Failure, Usage};
use crate::events::Rule;
use crate::plan::{Basis, PlannedFlip, Reviewed};
use crate::resolver::Flip;
use crate::VERSION;

pub(crate) const FORMAT: &str = "agent-type-backfill plan v1";

/// Which database a plan was made on. `system_identifier` is the cluster's identity from
/// `pg_control_system()`, when the user may read it; a streaming standby shares it with its
/// primary.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fingerprint {
    pub system_identifier: Option<String>,
    pub host: String,
    pub port: u16,
    pub database: String,
    /// Made on a hot standby: the plan applies on its primary, reached at another host and port.
    /// Plans written before this field existed were made on the server they name.
    #[serde(default)]
    pub standby: bool,
}

impl Fingerprint {
    /// The fingerprint of the database `session` is connected to. Only asked for when a plan
    /// file is involved: for a user without the privilege, the query leaves a "permission
    /// denied" line in the server log.
    pub(crate) async fn of(session: &db::Session) -> Result<Fingerprint> {
        Ok(Fingerprint {
            system_identifier: db::system_identifier(&session.pool).await,
            host: session.target.host.clone(),
            port: session.target.port,
            database: session.target.database.clone(),
            standby: db::in_recovery(&session.pool).await?,
        })
    }

    /// Whether a plan made at `self` may be applied at `here`: the same server and database, or,
    /// for a plan made on a standby, the same cluster (system identifier) and database name
    /// wherever it is reached.
    fn admits(&self, here: &Fingerprint) -> bool {
        let same_database = self.database == here.database;
        match (&self.system_identifier, &here.system_identifier) {
            (Some(planned), Some(current)) if planned != current => false,
            (Some(_), Some(_)) if self.standby => same_database,
            _ => same_database && self.host == here.host && self.port == here.port,
        }
    }
}

/// A flip as the plan file lists it: where it is, the probe behind it, and whether a guard holds
/// it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(from = "PlanFlipV1")]
pub struct PlanFlip {
    #[serde(flatten)]
    pub at: ProfileFlip,
    /// When the snapshot behind the flip was probed; `None` for a legacy type without one.
    pub last_discovered: Option<DateTime<Utc>>,
    /// Set when a guard holds the flip: an apply of this plan writes nothing while it does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub held: Option<HoldReason>,
    /// The crawler's logged disagreements for the url, as the dry-run read them; not read back.
    pub crawler_disagreements: Option<CrawlerEvidence>,
}

/// How a plan file's flip is read: v1 spells it flat. Reading goes through this rather than
/// `#[serde(flatten)]`, which buffers the entry first, and a buffered number (with serde_json's
/// `arbitrary_precision`, which keeps `from` exact) no longer reads as an `index`.
#[derive(Deserialize)]
struct PlanFlipV1 {
    profile_id: Uuid,
    profile: String,
    index: usize,
    url: String,
    from: Value,
    to: String,
    last_discovered: Option<DateTime<Utc>>,
    #[serde(default)]
    held: Option<HoldReason>,
}

impl From<PlanFlipV1> for PlanFlip {
    fn from(v1: PlanFlipV1) -> PlanFlip {
        let flip = Flip {
            index: v1.index,
            url: v1.url,
            from: v1.from,
            to: v1.to,
        };
        PlanFlip {
            at: ProfileFlip::new(v1.profile_id, v1.profile, flip),
            last_discovered: v1.last_discovered,
            held: v1.held,
            crawler_disagreements: None,
        }
    }
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
    /// The rule that decided the flips; informational.
    #[serde(default, skip_deserializing)]
    pub rule: Option<Rule>,
    pub target: Fingerprint,
    pub counts: PlanCounts,
    pub flips: Vec<PlanFlip>,
    /// `sha256:` and the hex SHA-256 of the file's canonical form without this key, written by
    /// `--plan-out` and checked by `--plan`; absent in plans written before it existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
}

/// How a digest names its algorithm.
pub(crate) const DIGEST_PREFIX: &str = "sha256:";

/// The digest of a plan's content: SHA-256 over its canonical form, the JSON value without its
/// `digest` key, printed compact with object keys sorted (serde_json's map is ordered). So
/// whitespace, indentation and key order may change; any value, flip or number text may not.
fn digest_of(content: &Value) -> String {
    use sha2::{Digest, Sha256};
    let mut content = content.clone();
    if let Some(object) = content.as_object_mut() {
        object.remove("digest");
    }
    let digest = Sha256::digest(content.to_string().as_bytes());
    let hex: String = digest.iter().map(|byte| format!("{byte:02x}")).collect();
    format!("{DIGEST_PREFIX}{hex}")
}

impl PlanFlip {
    fn of(planned: &PlannedFlip, held: Option<HoldReason>) -> PlanFlip {
        PlanFlip {
            at: planned.at.clone(),
            last_discovered: planned.probe().map(|probe| probe.last_discovered),
            held,
            crawler_disagreements: planned.evidence.clone(),
        }
    }
}

impl PlanFile {
    /// The plan as the reviewer reads it: the flips the plan found, each marked with the guard
    /// that holds it, counted as the run's summary counts them.
    pub(crate) fn new(
        dispositions: &Dispositions,
        census: &Census,
        target: Fingerprint,
        run_id: &str,
        created_at: DateTime<Utc>,
    ) -> PlanFile {
        let found = dispositions.found();
        PlanFile {
            format: FORMAT.to_owned(),
            tool_version: VERSION.to_owned(),
            created_at,
            run_id: run_id.to_owned(),
            rule: Some(Rule::ported()),
            target,
            counts: PlanCounts {
                profiles_scanned: census.profiles_scanned,
                profiles_changed: crate::plan::profiles_changed(
                    found.iter().map(|fate| &fate.planned),
                ),
                flips: crate::domain::count(found.len()),
                malformed: census.malformed,
            },
            flips: found
                .iter()
                .map(|fate| {
                    let held = fate.disposition.hold().map(|hold| hold.reason);
                    PlanFlip::of(&fate.planned, held)
                })
                .collect(),
            digest: None,
        }
    }

    /// Writes the plan, with the digest of its content, next to its final name first, so a
    /// reader never sees half a file.
    pub fn write(&self, path: &Path) -> Result<()> {
        let mut content = serde_json::to_value(self).context("could not encode the plan")?;
        let digest = digest_of(&content);
        if let Some(object) = content.as_object_mut() {
            object.insert("digest".to_owned(), Value::String(digest));
        }
        let text = serde_json::to_string_pretty(&content).context("could not encode the plan")?;
        let partial = path.with_extension("partial");
        std::fs::write(&partial, text + "\n")
            .with_context(|| format!("could not write the plan to '{}'", partial.display()))?;
        std::fs::rename(&partial, path)
            .with_context(|| format!("could not move the plan into '{}'", path.display()))
    }

    pub fn read(path: &Path) -> Result<PlanFile> {
        let text = std::fs::read_to_string(path).map_err(|error| {
            Failure::Usage(Usage::PlanUnreadable {
                path: path.to_owned(),
                cause: error.to_string(),
            })
        })?;
        let not_a_plan = |error: serde_json::Error| {
            Failure::Usage(Usage::NotAPlan {
                path: path.to_owned(),
                cause: error.to_string(),
            })
        };
        let content: Value = serde_json::from_str(&text).map_err(not_a_plan)?;
        check_digest(path, &content)?;
        let plan: PlanFile = serde_json::from_value(content).map_err(not_a_plan)?;
        if plan.format != FORMAT {
            return Err(Failure::Usage(Usage::PlanFormat {
                path: path.to_owned(),
                format: plan.format,
            })
            .into());
        }
        Ok(plan)
    }

    /// The guard that held `planned` when this plan was made, if one did.
    pub(crate) fn held_reason(&self, planned: &PlannedFlip) -> Option<HoldReason> {
        self.flips
            .iter()
            .find(|flip| flip.at.same_change(&planned.at))
            .and_then(|flip| flip.held)
    }

    /// Refuses a plan made on another database, or one older than `max_age`.
    pub(crate) fn check_applies_to(
        &self,
        here: &Fingerprint,
        now: DateTime<Utc>,
        max_age: Duration,
    ) -> Result<()> {
        if !self.target.admits(here) {
            return Err(Failure::Usage(Usage::PlanElsewhere {
                made_on: Box::new(self.target.clone()),
                here: Box::new(here.clone()),
            })
            .into());
        }
        let age = now - self.created_at;
        let limit = chrono::Duration::from_std(max_age).unwrap_or(chrono::Duration::MAX);
        if age > limit {
            return Err(Failure::Usage(Usage::PlanTooOld {
                age,
                max_age: limit,
            })
            .into());
        }
        Ok(())
    }
}

/// Refuses a plan whose content is not what `--plan-out` wrote. A plan without a digest was
/// written before plans carried one: it is read as it is, with a warning.
fn check_digest(path: &Path, content: &Value) -> Result<()> {
    let written = match content.get("digest") {
        None => {
            warn!(
                "the plan '{}' has no digest (written by a version before plans carried one): \
                 an edit to it cannot be detected; it is applied as read; make a new plan with \
                 --dry-run --plan-out to have it checked",
                path.display()
            );
            return Ok(());
        }
        Some(Value::String(written)) if written.starts_with(DIGEST_PREFIX) => written,
        Some(other) => {
            return Err(Failure::Usage(Usage::PlanDigestMalformed {
                path: path.to_owned(),
                digest: other.clone(),
            })
            .into())
        }
    };
    let actual = digest_of(content);
    if *written != actual {
        return Err(Failure::Usage(Usage::PlanChanged {
            path: path.to_owned(),
            actual,
            written: written.clone(),
        })
        .into());
    }
    Ok(())
}

/// The fresh flips against the reviewed plan: one the reviewed plan holds exactly is left to
/// `dispose` (the guards); a new flip nobody reviewed, and a reviewed flip that no longer holds,
/// depart, never written.
pub(crate) fn hold_to_review(
    fresh: Vec<PlannedFlip>,
    reviewed: &PlanFile,
    dispose: impl Fn(&PlannedFlip) -> Disposition,
) -> Dispositions {
    let by_element: HashMap<(Uuid, usize), usize> = reviewed
        .flips
        .iter()
        .enumerate()
        .map(|(position, flip)| (flip.at.element(), position))
        .collect();
    let mut matched = vec![false; reviewed.flips.len()];
    let mut dispositions = Dispositions::default();
    for planned in fresh {
        let reviewed_position = by_element
            .get(&planned.at.element())
            .copied()
            .filter(|position| reviewed.flips[*position].at.same_change(&planned.at));
        match reviewed_position {
            Some(position) => {
                matched[position] = true;
                let disposition = dispose(&planned);
                dispositions.push(planned, disposition);
            }
            None => dispositions.push(planned, Disposition::Departed(SkipReason::Unplanned)),
        }
    }
    for (flip, _) in reviewed
        .flips
        .iter()
        .zip(&matched)
        .filter(|(_, hit)| !**hit)
    {
        let planned = PlannedFlip::new(flip.at.clone(), Basis::Reviewed(Reviewed::InPlan));
        dispositions.push(planned, Disposition::Departed(SkipReason::ChangedSincePlan));
    }
    dispositions
}

/// The database a plan was made on, as a refusal names it.
impl std::fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host={} port={} database={} system_identifier={}{}",
            self.host,
            self.port,
            self.database,
            self.system_identifier.as_deref().unwrap_or("(unreadable)"),
            if self.standby { " (a standby)" } else { "" }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fingerprint(system: Option<&str>, database: &str) -> Fingerprint {
        Fingerprint {
            system_identifier: system.map(str::to_owned),
            host: "db".into(),
            port: 5432,
            database: database.into(),
            standby: false,
        }
    }

    fn plan_made(at: DateTime<Utc>, target: Fingerprint) -> PlanFile {
        let nothing = Dispositions::default();
        PlanFile::new(&nothing, &Census::default(), target, "atb-x", at)
    }

    /// Two reviewed flips in one profile are told apart by their element: each fresh flip finds
    /// its own, both are kept, and a change to one departs that one alone.
    #[test]
    fn reviewed_flips_of_one_profile_are_matched_element_by_element() {
        let planned = |index: usize, to: &str| {
            let flip = Flip {
                index,
                url: format!("https://acme.example/{index}"),
                from: json!("buying"),
                to: to.to_owned(),
            };
            PlannedFlip::new(
                ProfileFlip::new(Uuid::nil(), "acme", flip),
                Basis::NoSnapshot,
            )
        };
        let mut plan = Dispositions::default();
        plan.push(planned(0, "sales"), Disposition::ToWrite);
        plan.push(planned(3, "sales"), Disposition::ToWrite);
        let reviewed = PlanFile::new(
            &plan,
            &Census::default(),
            fingerprint(None, "registry"),
            "atb-x",
            Utc::now(),
        );
        let fates = |dispositions: &Dispositions| -> Vec<(usize, String, Disposition)> {
            dispositions
                .iter()
                .map(|fate| {
                    let flip = &fate.planned.at.flip;
                    (flip.index, flip.to.clone(), fate.disposition.clone())
                })
                .collect()
        };
        let to_write = |_: &PlannedFlip| Disposition::ToWrite;

        let dispositions = hold_to_review(
            vec![planned(0, "sales"), planned(3, "sales")],
            &reviewed,
            to_write,
        );
        assert_eq!(
            fates(&dispositions),
            [
                (0, "sales".to_owned(), Disposition::ToWrite),
                (3, "sales".to_owned(), Disposition::ToWrite)
            ]
        );

        let dispositions = hold_to_review(
            vec![planned(0, "sales"), planned(3, "creative")],
            &reviewed,
            to_write,
        );
        assert_eq!(
            fates(&dispositions),
            [
                (0, "sales".to_owned(), Disposition::ToWrite),
                (
                    3,
                    "creative".to_owned(),
                    Disposition::Departed(SkipReason::Unplanned)
                ),
                (
                    3,
                    "sales".to_owned(),
                    Disposition::Departed(SkipReason::ChangedSincePlan)
                )
            ]
        );
    }

    /// The digest covers the content, not its formatting; a plan without one (written before
    /// digests existed) still reads; a digest that is not one is refused.
    #[test]
    fn the_digest_ignores_formatting_and_a_plan_without_one_still_reads() {
        let dir = std::env::temp_dir().join(format!("atb-digest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plan.json");
        plan_made(Utc::now(), fingerprint(Some("7301"), "registry"))
            .write(&path)
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let written = PlanFile::read(&path).unwrap();
        assert!(written.digest.is_some());

        // Re-indented with tabs and the top-level keys in reverse order.
        let content: Value = serde_json::from_str(&text).unwrap();
        let object = content.as_object().unwrap();
        let reordered: Vec<String> = object
            .iter()
            .rev()
            .map(|(key, value)| format!("\t{}:\t{}", Value::String(key.clone()), value))
            .collect();
        std::fs::write(&path, format!("{{\n{}\n}}\n", reordered.join(",\n"))).unwrap();
        assert!(PlanFile::read(&path).is_ok());

        let mut without = content.clone();
        without.as_object_mut().unwrap().remove("digest");
        std::fs::write(&path, without.to_string()).unwrap();
        assert_eq!(PlanFile::read(&path).unwrap().digest, None);

        for digest in [json!("md5:abc"), json!(7)] {
            let mut odd = content.clone();
            odd["digest"] = digest.clone();
            std::fs::write(&path, odd.to_string()).unwrap();
            let error = PlanFile::read(&path).unwrap_err();
            assert_eq!(crate::error::exit_code(&error), 2, "{digest}");
        }
        let mut edited = content;
        edited["run_id"] = json!("atb-y");
        std::fs::write(&path, edited.to_string()).unwrap();
        let error = PlanFile::read(&path).unwrap_err();
        assert!(error
            .to_string()
            .contains("was changed after --plan-out wrote it"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A plan v1 file as `PlanFile::write` lays it out: keys sorted, a number type kept as
    /// written, `held` only where a guard holds, the crawler's evidence written and not read
    /// back.
    const PLAN_V1: &str = r#"{
  "counts": {
    "flips": 2,
    "malformed": 0,
    "profiles_changed": 2,
    "profiles_scanned": 9
  },
  "created_at": "2026-12-01T08:00:00Z",
  "digest": "DIGEST",
  "flips": [
    {
      "crawler_disagreements": null,
      "from": 1.50,
      "held": "unrecognised_inferred_type",
      "index": 2,
      "last_discovered": null,
      "profile": "acme",
      "profile_id": "00000000-0000-0000-0000-000000000001",
      "to": "sales",
      "url": "https://acme.example/mcp"
    },
    {
      "crawler_disagreements": null,
      "from": "buying",
      "index": 0,
      "last_discovered": "2026-11-30T07:00:00Z",
      "profile": "bidcliq",
      "profile_id": "00000000-0000-0000-0000-000000000002",
      "to": "sales",
      "url": "https://bidcliq.example/mcp"
    }
  ],
  "format": "agent-type-backfill plan v1",
  "rule": null,
  "run_id": "atb-v1",
  "target": {
    "database": "registry",
    "host": "db",
    "port": 5432,
    "standby": false,
    "system_identifier": "7301"
  },
  "tool_version": "0.1.0"
}
"#;

    /// Plan v1 reads and writes byte for byte: a flip's entry is its `ProfileFlip` flattened
    /// with the plan's own fields, and is read back through the flat v1 shape, so its number
    /// text and its index survive.
    #[test]
    fn a_plan_v1_file_reads_and_writes_byte_for_byte() {
        let dir = std::env::temp_dir().join(format!("atb-plan-v1-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("plan.json");
        // The digest leaves its own key out, so the placeholder does not change it.
        let content: Value = serde_json::from_str(PLAN_V1).unwrap();
        let v1 = PLAN_V1.replace("DIGEST", &digest_of(&content));
        std::fs::write(&path, &v1).unwrap();

        let plan = PlanFile::read(&path).unwrap();
        assert_eq!(plan.flips[0].at.flip.from.to_string(), "1.50");
        assert_eq!(plan.flips[0].at.element().1, 2);
        assert_eq!(
            plan.flips[0].held,
            Some(HoldReason::UnrecognisedInferredType)
        );
        assert_eq!(plan.flips[1].held, None);
        let again = dir.join("again.json");
        plan.write(&again).unwrap();
        assert_eq!(std::fs::read_to_string(&again).unwrap(), v1);
        std::fs::remove_dir_all(&dir).unwrap();
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
        assert!(
            error.to_string().contains("the plan is 25h0m old"),
            "{error}"
        );
        // Seconds apart must read as different durations, never "0m old, more than 0m".
        let second = Duration::from_secs(1);
        let error = plan_made(
            now - chrono::Duration::milliseconds(2_500),
            fingerprint(None, "registry"),
        )
        .check_applies_to(&fingerprint(None, "registry"), now, second)
        .unwrap_err();
        assert!(
            error
                .to_string()
                .contains("the plan is 2.5s old, more than --plan-max-age 1.0s"),
            "{error}"
        );
    }

    #[test]
    fn a_standby_plan_applies_on_its_primary_by_cluster_and_database_name() {
        let now = Utc::now();
        let day = Duration::from_secs(24 * 3600);
        let replica = Fingerprint {
            host: "replica".into(),
            port: 5433,
            standby: true,
            ..fingerprint(Some("7301"), "registry")
        };
        let plan = plan_made(now, replica.clone());
        assert!(plan
            .check_applies_to(&fingerprint(Some("7301"), "registry"), now, day)
            .is_ok());
        for other in [
            fingerprint(Some("9999"), "registry"),
            fingerprint(Some("7301"), "registry_copy"),
            fingerprint(None, "registry"),
        ] {
            let error = plan.check_applies_to(&other, now, day).unwrap_err();
            assert_eq!(crate::error::exit_code(&error), 2, "{other:?}");
        }
        // Without the flag, another host is another server even in the same cluster.
        let primary_plan = plan_made(
            now,
            Fingerprint {
                standby: false,
                ..replica
            },
        );
        assert!(primary_plan
            .check_applies_to(&fingerprint(Some("7301"), "registry"), now, day)
            .is_err());
    }

    /// Without a system identifier, host, port and database each decide alone; a plan exactly
    /// `--plan-max-age` old still applies: dropping any part of the match, or making the limit
    /// exclusive, fails here.
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
