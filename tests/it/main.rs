//! The integration and end-to-end tests: one crate, one build, one throwaway PostgreSQL shared by
//! every test that does not need a server of its own (each test still gets its own database).
//!
//! - conformance, prefilter, resolver_properties, malformed_corpus: the rule against the 787
//!   vectors, in Rust and in the server's SQL, and under hostile input;
//! - backfill, plans, audit, revert_roundtrip: the library's runs against a real PostgreSQL;
//! - cli, tls: the built binary, end to end;
//! - reliability: concurrent writers, killed processes and sessions, restarts and timeouts;
//! - pooler, standby, privileges, libpq: production deployment shapes (PgBouncer in both pool
//!   modes, a streaming standby, least-privilege roles, the password file and socket targets),
//!   with their own PgBouncer, standby or server from `common::deployment`;
//! - network: a silent, slow or reset link at each moment of a run, through a fault proxy;
//! - server_versions: what could change between PostgreSQL versions (scripts/pg-matrix).

mod audit;
mod backfill;
mod chunked;
mod cli;
mod common;
mod conformance;
mod docs;
mod guarantees;
mod guards;
mod left_behind;
mod libpq;
mod log_order;
mod malformed_corpus;
mod network;
mod outcome;
mod plans;
mod pooler;
mod prefilter;
mod prefilter_generated;
mod privileges;
mod reliability;
mod resolver_properties;
mod revert_roundtrip;
mod secrets;
mod server_versions;
mod standby;
mod tls;
mod write_preserves;
