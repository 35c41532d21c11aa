//! Test and rehearsal support, not part of a run against a real registry: a throwaway PostgreSQL
//! built from installed server binaries, deterministic registry contents, and the migrations that
//! recreate the registry's tables. The `rehearse` command, the tests and the benchmark use them.

pub mod ephemeral;
pub mod seed;

/// `migrations/`: the registry's four tables, for throwaway databases only (the tool never
/// migrates its target).
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
