//! Every statement the tool sends lives here, one file per concern. Bind parameters only;
//! arrays instead of one round trip per row; every statement inside a transaction that carries
//! the tool's settings (see [`Pool`]).

mod audit_log;
mod connect;
mod deadline;
mod network;
mod pgpass;
mod preflight;
mod registry;
mod replicas;

pub(crate) use audit_log::*;
pub use connect::*;
pub use deadline::{Deadlines, Transaction};
pub use preflight::*;
pub use registry::*;
pub(crate) use replicas::*;

use sqlx::postgres::{PgArguments, PgRow};
use sqlx::query::{Query, QueryAs, QueryScalar};
use sqlx::{FromRow, Postgres};

// Every statement is sent unnamed: a named (prepared) one would outlive its transaction on a
// server session that a transaction pooler hands to another client.
fn unnamed(sql: &str) -> Query<'_, Postgres, PgArguments> {
    sqlx::query(sql).persistent(false)
}

fn unnamed_as<'q, O>(sql: &'q str) -> QueryAs<'q, Postgres, O, PgArguments>
where
    O: for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_as(sql).persistent(false)
}

fn unnamed_scalar<'q, O>(sql: &'q str) -> QueryScalar<'q, Postgres, O, PgArguments>
where
    (O,): for<'r> FromRow<'r, PgRow>,
{
    sqlx::query_scalar(sql).persistent(false)
}

/// Whether an error is a lock or statement timeout, a deadlock or a serialization failure: the
/// batch rolled back whole and may simply be tried again.
pub(crate) fn is_retryable(error: &anyhow::Error) -> bool {
    sqlstates(error).any(|code| matches!(code.as_str(), "55P03" | "57014" | "40001" | "40P01"))
}

/// Whether the server cancelled a statement for running past `statement_timeout` (57014 is also
/// what a cancel request gives, and the tool never sends one).
pub(crate) fn is_statement_timeout(error: &anyhow::Error) -> bool {
    sqlstates(error).any(|code| code == "57014")
}

/// Whether a standby cancelled a statement because replaying the primary's changes needed what
/// the statement's snapshot or locks held (40001; 40P01 when it deadlocked with replay).
pub(crate) fn is_recovery_conflict(error: &anyhow::Error) -> bool {
    sqlstates(error).any(|code| matches!(code.as_str(), "40001" | "40P01"))
}

fn sqlstates(error: &anyhow::Error) -> impl Iterator<Item = String> + '_ {
    error.chain().filter_map(|cause| {
        let error = cause.downcast_ref::<sqlx::Error>()?.as_database_error()?;
        Some(error.code()?.into_owned())
    })
}
