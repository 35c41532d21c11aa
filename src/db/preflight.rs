//! What the target must have before anything is read or written: tables, columns, exactly
//! the privileges a command uses, and a server that accepts writes.

use std::collections::HashMap;

use anyhow::{Context, Result};
use sqlx::Row;

use super::Pool;
use crate::error::{Failure, Preflight};

/// A column the tool reads or writes, with the type it relies on (`None`: any type).
type ColumnSpec = (&'static str, Option<&'static str>);
type TableSpec = (&'static str, &'static [ColumnSpec]);

const REQUIRED_COLUMNS: &[TableSpec] = &[
    (
        "member_profiles",
        &[
            ("id", Some("uuid")),
            ("slug", None),
            ("agents", Some("jsonb")),
            ("updated_at", None),
        ],
    ),
    (
        "agent_capabilities_snapshot",
        &[
            ("agent_url", Some("text")),
            ("inferred_type", Some("text")),
            ("last_discovered", None),
            ("discovery_error", None),
            ("oauth_required", None),
        ],
    ),
];

const AUDIT_COLUMNS: &[ColumnSpec] = &[
    ("agent_url", Some("text")),
    ("member_id", Some("text")),
    ("old_type", Some("text")),
    ("new_type", Some("text")),
    ("source", Some("text")),
    ("run_id", Some("text")),
    ("changed_at", None),
    ("notes", Some("jsonb")),
    ("id", None),
];

/// What a command uses, and so what its preflight checks: each needs exactly the privileges of
/// the statements it sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Needs {
    /// `--dry-run`: reads profiles and snapshots.
    DryRun,
    /// `history`, `revert --dry-run`: also reads the audit table.
    ReadAudit,
    /// `--apply`: reads profiles and snapshots, updates `agents`, inserts audit rows.
    Apply,
    /// `revert --apply`: reads the audit table too.
    RevertApply,
}

impl Needs {
    fn reads_audit(self) -> bool {
        matches!(self, Needs::ReadAudit | Needs::RevertApply)
    }

    fn writes(self) -> bool {
        matches!(self, Needs::Apply | Needs::RevertApply)
    }
}

/// The columns each statement of the tool reads, writes or inserts, by table.
const READ_PROFILES: &[&str] = &["id", "slug", "agents"];
const READ_SNAPSHOTS: &[&str] = &[
    "agent_url",
    "inferred_type",
    "last_discovered",
    "discovery_error",
    "oauth_required",
];
const READ_AUDIT: &[&str] = &[
    "id",
    "changed_at",
    "member_id",
    "agent_url",
    "old_type",
    "new_type",
    "source",
    "run_id",
    "notes",
];
const INSERT_AUDIT: &[&str] = &[
    "agent_url",
    "member_id",
    "old_type",
    "new_type",
    "source",
    "run_id",
    "notes",
];

/// One privilege the command needs, and the GRANT an administrator runs to give it.
struct Grant {
    privilege: &'static str,
    table: &'static str,
    columns: &'static [&'static str],
    /// Whether the GRANT names the columns (`UPDATE (agents)`) or the whole table.
    column_level: bool,
}

impl Grant {
    fn statement(&self, role: &str) -> String {
        if self.column_level {
            format!(
                "GRANT {} ({}) ON {} TO {role}",
                self.privilege,
                self.columns.join(", "),
                self.table
            )
        } else {
            format!("GRANT {} ON {} TO {role}", self.privilege, self.table)
        }
    }
}

fn grants(needs: Needs) -> Vec<Grant> {
    let grant = |privilege, table, columns, column_level| Grant {
        privilege,
        table,
        columns,
        column_level,
    };
    let mut grants = vec![
        grant("SELECT", "member_profiles", READ_PROFILES, false),
        grant(
            "SELECT",
            "agent_capabilities_snapshot",
            READ_SNAPSHOTS,
            false,
        ),
    ];
    if needs.reads_audit() {
        grants.push(grant(
            "SELECT",
            "type_reclassification_log",
            READ_AUDIT,
            false,
        ));
    }
    if needs.writes() {
        // `SELECT ... FOR UPDATE` needs UPDATE on any one column; the write sets `agents` only.
        grants.push(grant("UPDATE", "member_profiles", &["agents"], true));
        grants.push(grant(
            "INSERT",
            "type_reclassification_log",
            INSERT_AUDIT,
            false,
        ));
    }
    grants
}

/// Checks tables, columns, privileges and, for a command that writes, that the server accepts
/// writes, before anything is read or written. Every problem names its cause and its fix.
pub(crate) async fn preflight(pool: &Pool, needs: Needs) -> Result<()> {
    let mut transaction = pool.begin().await?;
    let mut problems = Vec::new();
    let mut tables: Vec<TableSpec> = REQUIRED_COLUMNS.to_vec();
    if needs.reads_audit() || needs.writes() {
        tables.push(("type_reclassification_log", AUDIT_COLUMNS));
    }
    for (table, columns) in tables {
        let rows = super::unnamed(
            "SELECT a.attname::text, format_type(a.atttypid, NULL) \
             FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .bind(table)
        .fetch_all(&mut transaction)
        .await
        .with_context(|| format!("could not inspect table '{table}'"))?;
        if rows.is_empty() {
            problems.push(format!("table '{table}' is missing"));
            continue;
        }
        let found: HashMap<String, String> = rows
            .iter()
            .map(|row| (row.get::<String, _>(0), row.get::<String, _>(1)))
            .collect();
        for (column, wanted) in columns {
            match (found.get(*column), wanted) {
                (None, _) => problems.push(format!("column '{table}.{column}' is missing")),
                (Some(actual), Some(wanted)) if actual != wanted && !compatible(actual, wanted) => {
                    problems.push(format!(
                        "column '{table}.{column}' is {actual}, expected {wanted}"
                    ))
                }
                _ => {}
            }
        }
    }
    if !problems.is_empty() {
        return Err(Failure::Preflight(Preflight::Schema { problems }).into());
    }

    if needs.writes() {
        let (standby, read_only): (bool, bool) = super::unnamed_as(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'",
        )
        .fetch_one(&mut transaction)
        .await
        .context("could not ask whether the server accepts writes")?;
        if standby {
            problems.push(
                "this server is a read-only standby (pg_is_in_recovery() is true): apply on the \
                 primary; a plan made here with --dry-run --plan-out applies there with --plan"
                    .to_owned(),
            );
        } else if read_only {
            problems.push(
                "this session is read-only (default_transaction_read_only is on for this user, \
                 this database or the server): connect as a user that may write, or run ALTER \
                 ROLE ... SET default_transaction_read_only = off"
                    .to_owned(),
            );
        }
    }

    let role: String = super::unnamed_scalar("SELECT quote_ident(current_user)")
        .fetch_one(&mut transaction)
        .await
        .context("could not ask the server for the current user")?;
    for grant in grants(needs) {
        let tables = vec![grant.table; grant.columns.len()];
        let missing: Vec<String> = super::unnamed_scalar(
            "SELECT c.column_name FROM unnest($1::text[], $2::text[]) AS c(table_name, column_name) \
             WHERE NOT has_column_privilege(c.table_name, c.column_name, $3)",
        )
        .bind(&tables)
        .bind(grant.columns)
        .bind(grant.privilege)
        .fetch_all(&mut transaction)
        .await
        .with_context(|| format!("could not check {} on '{}'", grant.privilege, grant.table))?;
        if !missing.is_empty() {
            problems.push(format!(
                "user {role} lacks {} on '{}' ({} {}): run {}",
                grant.privilege,
                grant.table,
                if missing.len() == 1 {
                    "column"
                } else {
                    "columns"
                },
                missing.join(", "),
                grant.statement(&role)
            ));
        }
    }
    if needs.writes() {
        // A serial or identity `id` draws from a sequence on every insert.
        let sequence: Option<(String, bool)> = super::unnamed_as(
            "SELECT s, has_sequence_privilege(s, 'USAGE') OR has_sequence_privilege(s, 'UPDATE') \
             FROM pg_get_serial_sequence('type_reclassification_log', 'id') AS s \
             WHERE s IS NOT NULL",
        )
        .fetch_optional(&mut transaction)
        .await
        .context("could not check the sequence of type_reclassification_log.id")?;
        if let Some((sequence, false)) = sequence {
            problems.push(format!(
                "user {role} lacks USAGE on sequence '{sequence}' (type_reclassification_log.id \
                 draws from it): run GRANT USAGE ON SEQUENCE {sequence} TO {role}"
            ));
        }
    }
    transaction
        .rollback()
        .await
        .context("could not close the preflight transaction")?;
    if problems.is_empty() {
        Ok(())
    } else {
        Err(Failure::Preflight(Preflight::Access { problems }).into())
    }
}

fn compatible(actual: &str, wanted: &str) -> bool {
    // The server is free to widen text-like columns.
    wanted == "text" && (actual.starts_with("character varying") || actual == "character")
}

/// The cluster's identity, when this user may read `pg_control_system()`. A standby shares it
/// with its primary.
pub async fn system_identifier(pool: &Pool) -> Option<String> {
    let mut transaction = pool.begin().await.ok()?;
    super::unnamed_scalar("SELECT system_identifier::text FROM pg_control_system()")
        .fetch_one(&mut transaction)
        .await
        .ok()
}

/// Whether the server is a standby replaying its primary's changes.
pub(crate) async fn in_recovery(pool: &Pool) -> Result<bool> {
    let mut transaction = pool.begin().await?;
    super::unnamed_scalar("SELECT pg_is_in_recovery()")
        .fetch_one(&mut transaction)
        .await
        .context("could not ask whether the server is a standby")
}
