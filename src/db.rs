//! Every statement the tool sends lives here. Bind parameters only; arrays instead of one round
//! trip per row.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::error::Failure;
use crate::resolver::{
    AgentsColumn, Probe, SnapshotLookup, SELF_DECLARED_TYPE, UNKNOWN_TYPE, VALID_AGENT_TYPES,
};

/// Where the tool is connected, as printed in the run log header. Never holds the password.
#[derive(Debug, Clone, Serialize)]
pub struct Target {
    pub host: String,
    pub port: u16,
    pub database: String,
    pub user: String,
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "host={} port={} database={} user={}",
            self.host, self.port, self.database, self.user
        )
    }
}

pub struct Session {
    pub pool: Pool,
    pub target: Target,
}

/// The tool's connections. Every transaction opened through it starts by setting the tool's
/// session settings with `SET LOCAL` and reading them back: a transaction-pooling PgBouncer hands
/// each transaction a different server session, and it rejects (or, told to ignore them, drops)
/// the startup `options` a direct connection would carry them in. There is deliberately no way to
/// borrow the bare `PgPool`: a statement sent outside such a transaction would run without the
/// timeouts.
#[derive(Clone)]
pub struct Pool {
    pool: PgPool,
    settings: std::sync::Arc<SessionSettings>,
}

impl Pool {
    /// A transaction in the server's default mode (read-write unless the role or server says
    /// otherwise), with the tool's settings in force.
    pub async fn begin(&self) -> Result<Transaction<'static, Postgres>> {
        let mut transaction = self
            .pool
            .begin()
            .await
            .context("could not open a transaction")?;
        apply_settings(&mut transaction, &self.settings).await?;
        Ok(transaction)
    }

    pub async fn close(&self) {
        self.pool.close().await
    }
}

/// Sets the tool's settings for the rest of the transaction, then reads them back: the statement
/// that sets them may be answered by a pooler or a server that does not keep them.
async fn apply_settings(connection: &mut PgConnection, settings: &SessionSettings) -> Result<()> {
    let lock_timeout = settings.lock_timeout.as_millis().to_string();
    let statement_timeout = settings.statement_timeout.as_millis().to_string();
    sqlx::query(
        "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true), \
                set_config('jit', 'off', true)",
    )
    .persistent(false)
    .bind(&lock_timeout)
    .bind(&statement_timeout)
    .execute(&mut *connection)
    .await
    .context("could not set lock_timeout, statement_timeout and jit for the transaction")?;
    let found: HashMap<String, String> = sqlx::query_as(
        "SELECT name::text, setting FROM pg_settings \
         WHERE name IN ('lock_timeout', 'statement_timeout', 'jit', 'application_name')",
    )
    .persistent(false)
    .fetch_all(&mut *connection)
    .await
    .context("could not read back the transaction's settings")?
    .into_iter()
    .collect();
    let setting = |name: &str| found.get(name).map_or("(none)", String::as_str);
    let mut wrong = Vec::new();
    for (name, wanted) in [
        ("lock_timeout", lock_timeout.as_str()),
        ("statement_timeout", statement_timeout.as_str()),
        ("jit", "off"),
    ] {
        match found.get(name) {
            Some(actual) if actual == wanted => {}
            // Servers older than PostgreSQL 11 have no JIT to stop.
            None if name == "jit" => {}
            _ => wrong.push(format!(
                "{name} is '{}', expected '{wanted}'",
                setting(name)
            )),
        }
    }
    anyhow::ensure!(
        wrong.is_empty(),
        "the server did not keep the tool's settings ({}): is a pooler or proxy rewriting SET \
         statements? Connect to PostgreSQL or to a PgBouncer in session or transaction mode",
        wrong.join(", ")
    );
    if setting("application_name") != settings.application_name {
        // A pooler may own application_name; the timeouts above are what bound the run.
        tracing::debug!(
            found = setting("application_name"),
            "application_name was not passed through to the server session"
        );
    }
    Ok(())
}

/// Session settings every connection carries so a DBA can see and bound what the tool does.
pub struct SessionSettings {
    pub application_name: String,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
}

/// Parses the URL without ever echoing it: sqlx errors can quote their input.
pub fn parse_url(url: &str) -> Result<PgConnectOptions> {
    let options = PgConnectOptions::from_str(url).map_err(|error| {
        let reason = redact(&error.to_string(), url);
        Failure::Usage(format!(
            "the database URL could not be parsed ({reason}): check DATABASE_URL or --database-url"
        ))
    })?;
    // sqlx reads the password file too, but keeps its escapes and falls back from PGPASSFILE to
    // ~/.pgpass; libpq does neither, and operators' files are written for libpq. sqlx sends an
    // empty password when it has none, so an empty one here means "none".
    let options = if explicit_password(url) {
        options
    } else {
        let password = pgpass::password_for(&options).unwrap_or_default();
        options.password(&password)
    };
    // libpq treats `require` with a root certificate as `verify-ca`; sqlx would silently skip
    // the verification the operator asked for by naming the certificate.
    if matches!(options.get_ssl_mode(), PgSslMode::Require) && names_root_certificate(url) {
        return Ok(options.ssl_mode(PgSslMode::VerifyCa));
    }
    Ok(options)
}

fn names_root_certificate(url: &str) -> bool {
    let in_url = url
        .split_once('?')
        .map(|(_, query)| query.split('&'))
        .into_iter()
        .flatten()
        .any(|pair| pair.starts_with("sslrootcert=") || pair.starts_with("ssl-root-cert="));
    in_url || std::env::var_os("PGSSLROOTCERT").is_some_and(|path| !path.is_empty())
}

/// Removes the URL's password (and the URL itself) from a message that may quote them.
pub fn redact(message: &str, url: &str) -> String {
    let mut clean = message.to_owned();
    if !url.is_empty() {
        clean = clean.replace(url, "<database url>");
    }
    if let Some(password) = url_password(url) {
        if !password.is_empty() {
            clean = clean.replace(&password, "***");
        }
    }
    if let Ok(password) = std::env::var("PGPASSWORD") {
        if !password.is_empty() {
            clean = clean.replace(&password, "***");
        }
    }
    clean
}

fn url_password(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let userinfo = authority.rsplit_once('@')?.0;
    Some(userinfo.split_once(':')?.1.to_owned())
}

pub async fn connect(url: &str, settings: &SessionSettings) -> Result<Session> {
    let options = parse_url(url)?
        .application_name(&settings.application_name)
        // PgBouncer refuses a startup packet carrying extra_float_digits (or `options`, where the
        // timeouts used to go); the tool decodes floats in binary, so it needs neither.
        .extra_float_digits(None)
        // Statements are sent unnamed (`persistent(false)` on each): a named one would outlive
        // its transaction on a server session that a transaction pooler gives to someone else.
        .statement_cache_capacity(0)
        // The planning pass is one long statement by design; say so at info, not as a warning.
        .log_slow_statements(log::LevelFilter::Info, Duration::from_secs(1));
    let address = address(&options);
    let described = format!("{address}/{}", options.get_database().unwrap_or(""));
    // One direct connection first: a pool would retry a refused connection until its acquire
    // timeout, and the operator should hear at once that the target is wrong.
    let mut first = match PgConnection::connect_with(&options).await {
        Ok(connection) => connection,
        Err(error) => {
            let hint = match error.as_database_error().and_then(|error| error.code()) {
                Some(code) if code.starts_with("28") => password_hint(url, &options),
                _ => String::new(),
            };
            return Err(
                anyhow::anyhow!(redact(&error.to_string(), url)).context(format!(
                    "could not connect to '{described}': check DATABASE_URL, the network and the \
                 credentials{hint}"
                )),
            );
        }
    };
    let mut transaction = first
        .begin()
        .await
        .map_err(|error| {
            let statement_pooling = error.to_string().contains("statement pooling mode");
            let error = anyhow::Error::new(error);
            if statement_pooling {
                error.context(
                    "a pooler in statement mode cannot keep a transaction on one server session: \
                     point DATABASE_URL at a PgBouncer pool in session or transaction mode",
                )
            } else {
                error
            }
        })
        .context("could not open the first transaction")?;
    apply_settings(&mut transaction, settings).await?;
    let row = sqlx::query("SELECT current_database()::text, current_user::text")
        .persistent(false)
        .fetch_one(&mut *transaction)
        .await
        .context("could not ask the server who we are")?;
    transaction
        .rollback()
        .await
        .context("could not close the first transaction")?;
    first
        .close()
        .await
        .context("could not close the first connection")?;
    let pool = PgPoolOptions::new()
        .max_connections(3)
        .acquire_timeout(Duration::from_secs(30))
        .connect_lazy_with(options.clone());
    let target = Target {
        host: address.host,
        port: options.get_port(),
        database: row.get(0),
        user: row.get(1),
    };
    Ok(Session {
        pool: Pool {
            pool,
            settings: std::sync::Arc::new(SessionSettings {
                application_name: settings.application_name.clone(),
                lock_timeout: settings.lock_timeout,
                statement_timeout: settings.statement_timeout,
            }),
        },
        target,
    })
}

/// Where a connection goes: a host name or address, or the directory of a Unix socket (shown as
/// libpq shows it, not as the `localhost` sqlx keeps beside it).
struct Address {
    host: String,
    port: u16,
    socket: bool,
}

fn address(options: &PgConnectOptions) -> Address {
    match options.get_socket() {
        Some(directory) => Address {
            host: directory.display().to_string(),
            port: options.get_port(),
            socket: true,
        },
        None => Address {
            host: options.get_host().to_owned(),
            port: options.get_port(),
            socket: options.get_host().starts_with('/'),
        },
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.socket {
            write!(
                f,
                "{}/.s.PGSQL.{}",
                self.host.trim_end_matches('/'),
                self.port
            )
        } else {
            write!(f, "{}:{}", self.host, self.port)
        }
    }
}

/// Says where the password came from when the server refused the login: the URL, PGPASSWORD, or
/// which line the password file would need.
fn password_hint(url: &str, options: &PgConnectOptions) -> String {
    if explicit_password(url) {
        return " (the password came from the URL or PGPASSWORD)".to_owned();
    }
    let Some(path) = pgpass::file() else {
        return " (no password in the URL or PGPASSWORD, and no password file)".to_owned();
    };
    let line = format!(
        "host '{}' port {} database '{}' user '{}'",
        pgpass::host_key(options),
        options.get_port(),
        pgpass::database_key(options),
        options.get_username()
    );
    if pgpass::password_for(options).is_some() {
        format!(
            " (the password came from the line of '{}' for {line})",
            path.display()
        )
    } else {
        format!(
            " (no password in the URL or PGPASSWORD, and no line of '{}' for {line})",
            path.display()
        )
    }
}

/// Whether the operator gave a password (URL or PGPASSWORD); only then is the password file
/// left unread, as libpq does. An empty one counts as none.
fn explicit_password(url: &str) -> bool {
    let in_query = url
        .split_once('?')
        .map(|(_, query)| query.split('&'))
        .into_iter()
        .flatten()
        .any(|pair| {
            pair.strip_prefix("password=")
                .is_some_and(|value| !value.is_empty())
        });
    in_query
        || url_password(url).is_some_and(|password| !password.is_empty())
        || std::env::var("PGPASSWORD").is_ok_and(|password| !password.is_empty())
}

/// The password file, read as libpq reads it (`passwordFromFile` in libpq's fe-connect.c): the
/// first line whose host, port, database and user fields each equal the connection's or are `*`
/// wins; `\` escapes the next character in every field, the password included; a file with any
/// group or world permission is ignored with a warning.
mod pgpass {
    use std::path::PathBuf;

    use sqlx::postgres::PgConnectOptions;

    /// libpq's compiled-in socket directory on Debian; a connection through it matches
    /// `localhost` lines.
    const DEFAULT_SOCKET_DIRECTORY: &str = "/var/run/postgresql";

    /// `PGPASSFILE`, or `~/.pgpass`. libpq never falls back from one to the other.
    pub fn file() -> Option<PathBuf> {
        match std::env::var_os("PGPASSFILE") {
            Some(path) if !path.is_empty() => Some(PathBuf::from(path)),
            _ => home().map(|home| home.join(".pgpass")),
        }
    }

    fn home() -> Option<PathBuf> {
        if let Some(home) = std::env::var_os("HOME").filter(|home| !home.is_empty()) {
            return Some(PathBuf::from(home));
        }
        // No HOME: the account's home directory, as libpq falls back to.
        let entry = unsafe { libc::getpwuid(libc::geteuid()) };
        if entry.is_null() {
            return None;
        }
        let directory = unsafe { std::ffi::CStr::from_ptr((*entry).pw_dir) };
        Some(PathBuf::from(directory.to_string_lossy().into_owned()))
    }

    /// The host a line must name: a socket in the default directory (or no host) is `localhost`.
    pub fn host_key(options: &PgConnectOptions) -> String {
        let host = super::address(options).host;
        if host.is_empty() || host.trim_end_matches('/') == DEFAULT_SOCKET_DIRECTORY {
            "localhost".to_owned()
        } else {
            host
        }
    }

    /// The database a line must name: without one in the URL, the server uses the user's name.
    pub fn database_key(options: &PgConnectOptions) -> String {
        options
            .get_database()
            .unwrap_or(options.get_username())
            .to_owned()
    }

    pub fn password_for(options: &PgConnectOptions) -> Option<String> {
        let path = file()?;
        let text = read_private(&path)?;
        find(
            &text,
            &host_key(options),
            &options.get_port().to_string(),
            &database_key(options),
            options.get_username(),
        )
    }

    fn read_private(path: &std::path::Path) -> Option<String> {
        use std::os::unix::fs::PermissionsExt;
        let metadata = std::fs::metadata(path).ok()?;
        if !metadata.is_file() {
            tracing::warn!("password file '{}' is not a plain file", path.display());
            return None;
        }
        if metadata.permissions().mode() & 0o077 != 0 {
            tracing::warn!(
                "password file '{}' has group or world access; permissions should be u=rw \
                 (0600) or less: ignoring it",
                path.display()
            );
            return None;
        }
        match std::fs::read(path) {
            Ok(bytes) => Some(String::from_utf8_lossy(&bytes).into_owned()),
            Err(error) => {
                tracing::warn!("could not read password file '{}': {error}", path.display());
                None
            }
        }
    }

    pub(super) fn find(
        text: &str,
        host: &str,
        port: &str,
        database: &str,
        user: &str,
    ) -> Option<String> {
        text.lines()
            .map(|line| line.strip_suffix('\r').unwrap_or(line))
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .find_map(|line| {
                let rest = field_matches(line, host)?;
                let rest = field_matches(rest, port)?;
                let rest = field_matches(rest, database)?;
                let rest = field_matches(rest, user)?;
                Some(unescape_password(rest))
            })
    }

    /// libpq's `pwdfMatchesString`: the field up to the next unescaped `:` equals `token` once
    /// unescaped, or is exactly `*`. Returns what follows the `:`.
    fn field_matches<'a>(line: &'a str, token: &str) -> Option<&'a str> {
        if let Some(rest) = line.strip_prefix("*:") {
            return Some(rest);
        }
        let mut wanted = token.chars();
        let mut chars = line.char_indices();
        while let Some((_, c)) = chars.next() {
            let (c, escaped) = if c == '\\' {
                match chars.next() {
                    Some((_, next)) => (next, true),
                    None => return None,
                }
            } else {
                (c, false)
            };
            if c == ':' && !escaped {
                return match wanted.next() {
                    None => Some(&line[line.len() - chars.as_str().len()..]),
                    Some(_) => None,
                };
            }
            if wanted.next() != Some(c) {
                return None;
            }
        }
        None
    }

    /// The password runs to the first unescaped `:` or the end of the line.
    fn unescape_password(field: &str) -> String {
        let mut password = String::new();
        let mut chars = field.chars();
        while let Some(c) = chars.next() {
            match c {
                ':' => break,
                '\\' => match chars.next() {
                    Some(next) => password.push(next),
                    None => password.push('\\'),
                },
                other => password.push(other),
            }
        }
        password
    }
}

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
pub enum Needs {
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
pub async fn preflight(pool: &Pool, needs: Needs) -> Result<()> {
    let mut transaction = pool.begin().await?;
    let mut problems = Vec::new();
    let mut tables: Vec<TableSpec> = REQUIRED_COLUMNS.to_vec();
    if needs.reads_audit() || needs.writes() {
        tables.push(("type_reclassification_log", AUDIT_COLUMNS));
    }
    for (table, columns) in tables {
        let rows = sqlx::query(
            "SELECT a.attname::text, format_type(a.atttypid, NULL) \
             FROM pg_attribute a \
             WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 AND NOT a.attisdropped",
        )
        .persistent(false)
        .bind(table)
        .fetch_all(&mut *transaction)
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
        return Err(Failure::Preflight(format!(
            "preflight failed, nothing was read or written: {}; point DATABASE_URL at the \
             registry database",
            problems.join("; ")
        ))
        .into());
    }

    if needs.writes() {
        let (standby, read_only): (bool, bool) = sqlx::query_as(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'",
        )
        .persistent(false)
        .fetch_one(&mut *transaction)
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

    let role: String = sqlx::query_scalar("SELECT quote_ident(current_user)")
        .persistent(false)
        .fetch_one(&mut *transaction)
        .await
        .context("could not ask the server for the current user")?;
    for grant in grants(needs) {
        let tables = vec![grant.table; grant.columns.len()];
        let missing: Vec<String> = sqlx::query_scalar(
            "SELECT c.column_name FROM unnest($1::text[], $2::text[]) AS c(table_name, column_name) \
             WHERE NOT has_column_privilege(c.table_name, c.column_name, $3)",
        )
        .persistent(false)
        .bind(&tables)
        .bind(grant.columns)
        .bind(grant.privilege)
        .fetch_all(&mut *transaction)
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
        let sequence: Option<(String, bool)> = sqlx::query_as(
            "SELECT s, has_sequence_privilege(s, 'USAGE') OR has_sequence_privilege(s, 'UPDATE') \
             FROM pg_get_serial_sequence('type_reclassification_log', 'id') AS s \
             WHERE s IS NOT NULL",
        )
        .persistent(false)
        .fetch_optional(&mut *transaction)
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
        Err(Failure::Preflight(format!(
            "preflight failed, nothing was read or written: {}",
            problems.join("; ")
        ))
        .into())
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
    sqlx::query_scalar("SELECT system_identifier::text FROM pg_control_system()")
        .persistent(false)
        .fetch_one(&mut *transaction)
        .await
        .ok()
}

/// Whether the server is a standby replaying its primary's changes.
pub async fn in_recovery(pool: &Pool) -> Result<bool> {
    let mut transaction = pool.begin().await?;
    sqlx::query_scalar("SELECT pg_is_in_recovery()")
        .persistent(false)
        .fetch_one(&mut *transaction)
        .await
        .context("could not ask whether the server is a standby")
}

/// One profile as the planner reads it.
#[derive(Debug, Clone)]
pub struct ProfileRow {
    pub id: Uuid,
    pub slug: String,
    /// The `agents` column as JSON text; `None` for SQL NULL.
    pub agents: Option<String>,
}

impl ProfileRow {
    /// How the run log names a profile: its slug, or its id when there is no slug.
    pub fn label(&self) -> String {
        label(&self.slug, self.id)
    }
}

pub fn label(slug: &str, id: Uuid) -> String {
    if slug.trim().is_empty() {
        id.to_string()
    } else {
        slug.to_owned()
    }
}

/// What the crawler stored for one URL, with what a reviewer needs to judge it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SnapshotRow {
    pub inferred_type: Option<String>,
    pub last_discovered: DateTime<Utc>,
    pub discovery_error: bool,
    pub oauth_required: bool,
}

#[derive(Debug, Default)]
pub struct Snapshots(HashMap<String, SnapshotRow>);

impl Snapshots {
    pub fn get(&self, url: &str) -> Option<&SnapshotRow> {
        self.0.get(url)
    }
}

impl SnapshotLookup for Snapshots {
    fn probe(&self, url: &str) -> Probe<'_> {
        match self.0.get(url) {
            None => Probe::NotProbed,
            Some(row) => Probe::Probed(row.inferred_type.as_deref()),
        }
    }
}

/// A read-only, repeatable-read transaction: the whole plan sees one snapshot of the registry
/// and the server refuses any write inside it.
pub async fn begin_read_only(pool: &Pool) -> Result<Transaction<'static, Postgres>> {
    let mut transaction = pool
        .pool
        .begin()
        .await
        .context("could not open the planning transaction")?;
    // Must come before any other statement of the transaction, the settings' included.
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        .persistent(false)
        .execute(&mut *transaction)
        .await
        .context("could not make the planning transaction read only")?;
    apply_settings(&mut transaction, &pool.settings).await?;
    Ok(transaction)
}

/// The server process behind `connection`, so a statement running on it can be cancelled from
/// another connection.
pub async fn backend_pid(connection: &mut PgConnection) -> Result<i32> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .persistent(false)
        .fetch_one(connection)
        .await
        .context("could not ask the server for the planning session's process id")
}

/// Cancels whatever statement backend `pid` is running. A backend blocked on a lock, or busy in a
/// scan that returns few rows, does not notice that its client has gone away. Through a pooler
/// this runs on another server session of the same server, which may signal a backend of the
/// same user.
pub async fn cancel_backend(pool: &Pool, pid: i32) -> Result<bool> {
    let mut transaction = pool.begin().await?;
    sqlx::query_scalar("SELECT pg_cancel_backend($1)")
        .persistent(false)
        .bind(pid)
        .fetch_one(&mut *transaction)
        .await
        .with_context(|| format!("could not cancel the statement of server process {pid}"))
}

/// How many profiles the planning snapshot holds, and how many of them have an `agents` column
/// that is SQL NULL or not a JSON array (the server leaves those untouched).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Census {
    pub profiles: u64,
    pub malformed: u64,
}

pub async fn census(connection: &mut PgConnection) -> Result<Census> {
    let (profiles, malformed): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE jsonb_typeof(agents) IS DISTINCT FROM 'array') \
         FROM member_profiles",
    )
    .persistent(false)
    .fetch_one(connection)
    .await
    .context("could not count member_profiles")?;
    Ok(Census {
        profiles: u64::try_from(profiles).context("the server counted fewer than no profiles")?,
        malformed: u64::try_from(malformed).context("the server counted fewer than no profiles")?,
    })
}

/// What one pass of the server over every agent found: the profiles that may hold a flip, in id
/// order without repeats, and how many elements the rule cannot touch (not an object, or no
/// string `url`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FlipCandidates {
    pub profile_ids: Vec<Uuid>,
    pub untouchable_elements: u64,
}

/// The resolve rule of `resolver::resolve_type`, written in SQL and applied to every agent in one
/// statement, so the snapshots are joined once (a hash join) instead of looked up page by page.
/// It only narrows the profiles the tool reads: each candidate is then read again and decided by
/// the Rust resolver. tests/it/prefilter.rs runs every conformance vector through this statement and
/// checks that it names exactly the profiles with flips.
///
/// The filter is one equality on `verdict` on purpose: the planner estimates it as selective and
/// picks a parallel plan, where a `<>` test reads as "almost every row" and keeps it serial.
///
/// $1: the valid types; $2: the type kept when the probe could not classify; $3: "unknown".
pub const FLIP_CANDIDATES: &str = r#"
SELECT id, verdict = 'untouchable' FROM (
    SELECT p.id,
           CASE
               -- Only an object has a `url` key, so this also rules out every other element.
               WHEN jsonb_typeof(e.element -> 'url') IS DISTINCT FROM 'string' THEN 'untouchable'
               -- Never probed: only a string type outside the valid set changes.
               WHEN s.agent_url IS NULL THEN
                   CASE
                       WHEN NOT (e.element ->> 'type') = ANY ($1::text[])
                            AND jsonb_typeof(e.element -> 'type') = 'string' THEN 'may flip'
                   END
               -- The common case, first: the stored type already is the probe's valid type (no
               -- number, boolean, object or array reads as a valid type name).
               WHEN (e.element ->> 'type') = s.inferred_type
                    AND s.inferred_type = ANY ($1::text[]) THEN NULL
               -- Probed and classified otherwise: the probe's type wins; an absent or null type
               -- reads as "unknown".
               WHEN s.inferred_type = ANY ($1::text[]) THEN
                   CASE
                       WHEN s.inferred_type = $3::text
                            AND coalesce(e.element -> 'type', 'null') = 'null' THEN NULL
                       ELSE 'may flip'
                   END
               -- Probed, not classified: a self-declared type survives, anything else becomes
               -- "unknown".
               WHEN coalesce(e.element -> 'type', 'null')
                    IN ('null', to_jsonb($2::text), to_jsonb($3::text)) THEN NULL
               ELSE 'may flip'
           END AS verdict
    FROM member_profiles p
    CROSS JOIN LATERAL jsonb_array_elements(
        CASE WHEN jsonb_typeof(p.agents) = 'array' THEN p.agents ELSE '[]'::jsonb END
    ) AS e(element)
    LEFT JOIN agent_capabilities_snapshot s ON s.agent_url = e.element ->> 'url'
) elements
WHERE verdict IN ('untouchable', 'may flip')
"#;

/// Streams [`FLIP_CANDIDATES`]; only candidate ids are kept, so memory follows the flips, not
/// the table.
pub async fn flip_candidates(connection: &mut PgConnection) -> Result<FlipCandidates> {
    use futures_util::TryStreamExt;
    let mut rows = sqlx::query_as::<_, (Uuid, bool)>(FLIP_CANDIDATES)
        .persistent(false)
        .bind(&VALID_AGENT_TYPES[..])
        .bind(SELF_DECLARED_TYPE)
        .bind(UNKNOWN_TYPE)
        .fetch(connection);
    let mut found = FlipCandidates::default();
    while let Some((id, untouchable)) = rows
        .try_next()
        .await
        .context("could not scan the agents of member_profiles")?
    {
        if untouchable {
            found.untouchable_elements += 1;
        } else {
            found.profile_ids.push(id);
        }
    }
    found.profile_ids.sort_unstable();
    found.profile_ids.dedup();
    Ok(found)
}

fn profile_row(row: &sqlx::postgres::PgRow) -> ProfileRow {
    ProfileRow {
        id: row.get(0),
        slug: row.get::<Option<String>, _>(1).unwrap_or_default(),
        agents: row.get(2),
    }
}

/// The snapshot rows the rule will ask for when resolving `columns`, in one round trip.
pub async fn snapshots_for(
    connection: &mut PgConnection,
    columns: &[AgentsColumn],
) -> Result<Snapshots> {
    let mut urls: Vec<&str> = columns.iter().flat_map(AgentsColumn::urls).collect();
    urls.sort_unstable();
    urls.dedup();
    if urls.is_empty() {
        return Ok(Snapshots::default());
    }
    let rows = sqlx::query(
        "SELECT agent_url, inferred_type, last_discovered, discovery_error IS NOT NULL, \
                coalesce(oauth_required, false) \
         FROM agent_capabilities_snapshot WHERE agent_url = ANY($1)",
    )
    .persistent(false)
    .bind(urls)
    .fetch_all(connection)
    .await
    .context("could not read agent_capabilities_snapshot")?;
    Ok(Snapshots(
        rows.iter()
            .map(|row| {
                (
                    row.get::<String, _>(0),
                    SnapshotRow {
                        inferred_type: row.get(1),
                        last_discovered: row.get(2),
                        discovery_error: row.get(3),
                        oauth_required: row.get(4),
                    },
                )
            })
            .collect(),
    ))
}

/// Locks the given profiles for the rest of the transaction and returns their current rows.
pub async fn lock_profiles(connection: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<ProfileRow>> {
    let rows = sqlx::query(
        "SELECT id, slug::text, agents::text FROM member_profiles WHERE id = ANY($1) \
         ORDER BY id FOR UPDATE",
    )
    .persistent(false)
    .bind(ids)
    .fetch_all(connection)
    .await
    .context("could not lock the batch's profiles")?;
    Ok(rows.iter().map(profile_row).collect())
}

/// Current rows of the given profiles, without locking them (planning a revert).
pub async fn profiles_by_id(
    connection: &mut PgConnection,
    ids: &[Uuid],
) -> Result<Vec<ProfileRow>> {
    let rows = sqlx::query(
        "SELECT id, slug::text, agents::text FROM member_profiles WHERE id = ANY($1) ORDER BY id",
    )
    .persistent(false)
    .bind(ids)
    .fetch_all(connection)
    .await
    .context("could not read the profiles of the run")?;
    Ok(rows.iter().map(profile_row).collect())
}

/// One backfill run as `history` lists it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct RunRecord {
    pub run_id: String,
    pub first_change: DateTime<Utc>,
    pub last_change: DateTime<Utc>,
    pub flips: i64,
    pub profiles: i64,
    /// The run this one reverted, when it was a revert.
    pub reverts: Option<String>,
}

pub async fn backfill_runs(pool: &Pool) -> Result<Vec<RunRecord>> {
    let mut transaction = pool.begin().await?;
    sqlx::query_as::<_, RunRecord>(
        "SELECT run_id, min(changed_at) AS first_change, max(changed_at) AS last_change, \
                count(*) AS flips, count(DISTINCT member_id) AS profiles, \
                max(notes ->> 'reverts') AS reverts \
         FROM type_reclassification_log \
         WHERE source = 'backfill_script' AND run_id IS NOT NULL \
         GROUP BY run_id ORDER BY min(changed_at) DESC, run_id DESC",
    )
    .persistent(false)
    .fetch_all(&mut *transaction)
    .await
    .context("could not read type_reclassification_log")
}

/// One audit row of a backfill run.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct AuditEntry {
    pub id: i64,
    pub run_id: Option<String>,
    pub changed_at: DateTime<Utc>,
    pub member_id: Option<String>,
    pub agent_url: String,
    pub old_type: Option<String>,
    pub new_type: String,
    pub notes: Option<serde_json::Value>,
    /// `notes.from` as JSON text, read apart so a revert restores it exactly however deep it
    /// nests.
    #[serde(skip)]
    pub from_json: Option<String>,
}

impl AuditEntry {
    /// How the log names the row's profile: the slug kept in the notes, else the member id.
    pub fn label(&self) -> String {
        self.notes
            .as_ref()
            .and_then(|notes| notes.get("profile"))
            .and_then(serde_json::Value::as_str)
            .map(str::to_owned)
            .or_else(|| self.member_id.clone())
            .unwrap_or_default()
    }

    /// The element the row changed, as its notes record it.
    pub fn index(&self) -> Option<u64> {
        self.notes
            .as_ref()
            .and_then(|notes| notes.get("index"))
            .and_then(serde_json::Value::as_u64)
    }
}

pub async fn run_entries(pool: &Pool, run_id: &str) -> Result<Vec<AuditEntry>> {
    let mut transaction = pool.begin().await?;
    let mut entries = sqlx::query_as::<_, AuditEntry>(
        "SELECT id, run_id, changed_at, member_id, agent_url, old_type, new_type, \
                notes - 'from' AS notes, (notes -> 'from')::text AS from_json \
         FROM type_reclassification_log \
         WHERE source = 'backfill_script' AND run_id = $1 ORDER BY id",
    )
    .persistent(false)
    .bind(run_id)
    .fetch_all(&mut *transaction)
    .await
    .with_context(|| format!("could not read the audit rows of run '{run_id}'"))?;
    // `from` travels as text: a stored type nested deeper than a JSON decoder allows must still
    // come back exactly for a revert. The notes show it as the resolver would.
    for entry in &mut entries {
        if let (Some(notes), Some(from)) = (entry.notes.as_mut(), entry.from_json.as_deref()) {
            if let Some(notes) = notes.as_object_mut() {
                let shown = crate::resolver::bounded_type(from).with_context(|| {
                    format!("audit row {} holds a malformed notes.from", entry.id)
                })?;
                notes.insert("from".to_owned(), shown);
            }
        }
    }
    Ok(entries)
}

/// The crawler's logged disagreements about one url: what it probed, and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CrawlerRow {
    pub new_type: String,
    pub changed_at: DateTime<Utc>,
}

/// What the crawler's own log says about a flip: how many of its rows for the url agree with the
/// flip's new type, when the first and last of those were logged, and what its latest row saw.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CrawlerEvidence {
    pub count: Option<u64>,
    #[serde(serialize_with = "optional_rfc3339")]
    pub first_at: Option<DateTime<Utc>>,
    #[serde(serialize_with = "optional_rfc3339")]
    pub last_at: Option<DateTime<Utc>>,
    pub last_inferred: Option<String>,
    /// Why the log could not be read; the other fields are then null.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
}

impl CrawlerEvidence {
    pub fn unavailable(why: &str) -> CrawlerEvidence {
        CrawlerEvidence {
            count: None,
            first_at: None,
            last_at: None,
            last_inferred: None,
            unavailable: Some(why.to_owned()),
        }
    }

    /// `rows` in the order they were logged.
    pub fn for_flip(rows: &[CrawlerRow], to: &str) -> CrawlerEvidence {
        let agreeing: Vec<&CrawlerRow> = rows.iter().filter(|row| row.new_type == to).collect();
        CrawlerEvidence {
            count: Some(u64::try_from(agreeing.len()).unwrap_or(u64::MAX)),
            first_at: agreeing.first().map(|row| row.changed_at),
            last_at: agreeing.last().map(|row| row.changed_at),
            last_inferred: rows.last().map(|row| row.new_type.clone()),
            unavailable: None,
        }
    }

    /// Agreeing rows; none when the log could not be read.
    pub fn agreeing(&self) -> u64 {
        self.count.unwrap_or(0)
    }
}

fn optional_rfc3339<S: serde::Serializer>(
    at: &Option<DateTime<Utc>>,
    serializer: S,
) -> std::result::Result<S::Ok, S::Error> {
    match at {
        Some(at) => {
            serializer.serialize_str(&at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
        }
        None => serializer.serialize_none(),
    }
}

/// Whether this user may read `type_reclassification_log`: `None` when it may, else why not.
pub async fn audit_log_unreadable(pool: &Pool) -> Result<Option<String>> {
    let mut transaction = pool.begin().await?;
    let readable: Option<bool> = sqlx::query_scalar(
        "SELECT CASE WHEN to_regclass('type_reclassification_log') IS NULL THEN NULL \
                ELSE has_table_privilege('type_reclassification_log', 'SELECT') END",
    )
    .persistent(false)
    .fetch_one(&mut *transaction)
    .await
    .context("could not check SELECT on 'type_reclassification_log'")?;
    Ok(match readable {
        Some(true) => None,
        Some(false) => Some("no SELECT privilege on type_reclassification_log".to_owned()),
        None => Some("table type_reclassification_log is missing".to_owned()),
    })
}

/// The crawler's `crawler_promote` rows for `urls`, per url in the order they were logged.
pub async fn crawler_disagreements(
    connection: &mut PgConnection,
    urls: &[&str],
) -> Result<HashMap<String, Vec<CrawlerRow>>> {
    let rows: Vec<(String, String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT agent_url, new_type, changed_at FROM type_reclassification_log \
         WHERE source = 'crawler_promote' AND agent_url = ANY($1) \
         ORDER BY agent_url, changed_at, id",
    )
    .persistent(false)
    .bind(urls)
    .fetch_all(connection)
    .await
    .context("could not read the crawler's rows in type_reclassification_log")?;
    let mut by_url: HashMap<String, Vec<CrawlerRow>> = HashMap::new();
    for (url, new_type, changed_at) in rows {
        by_url.entry(url).or_default().push(CrawlerRow {
            new_type,
            changed_at,
        });
    }
    Ok(by_url)
}

/// Non-empty `inferred_type` values the rule does not know, with how many snapshots carry each:
/// a sign that the server, and its crawler, are newer than this port.
pub async fn unrecognised_inferred_types(
    connection: &mut PgConnection,
) -> Result<std::collections::BTreeMap<String, u64>> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT inferred_type, count(*) FROM agent_capabilities_snapshot \
         WHERE inferred_type <> '' AND NOT inferred_type = ANY($1::text[]) \
         GROUP BY inferred_type ORDER BY inferred_type",
    )
    .persistent(false)
    .bind(&VALID_AGENT_TYPES[..])
    .fetch_all(connection)
    .await
    .context("could not count the inferred types of agent_capabilities_snapshot")?;
    Ok(rows
        .into_iter()
        .map(|(name, count)| (name, u64::try_from(count).unwrap_or(0)))
        .collect())
}

/// One confirmed flip to write, with what its audit row records.
#[derive(Debug, Clone)]
pub struct FlipWrite {
    pub profile_id: Uuid,
    pub profile_label: String,
    pub index: usize,
    pub url: String,
    /// The stored type as the audit log's `old_type` column holds it; `None` to take the stored
    /// value's JSON text from the row itself (a type too deep for the resolver to keep whole).
    pub old_type: Option<String>,
    /// The JSON text written to the element's `type` key.
    pub new_value: String,
    /// The audit log's `new_type` column.
    pub new_type: String,
}

/// Writes the flips and their audit rows inside the caller's transaction.
///
/// The audit rows go first and take `notes.from` (and, where asked, `old_type`) from the locked
/// row itself, so the record of what was there is exact whatever it holds. Then only the `type`
/// key of each flipped element changes (`jsonb_set`), so every other key, element and number is
/// kept exactly as stored. A profile with several flips gets one `jsonb_set` per round, because a
/// single `UPDATE ... FROM` applies at most one source row per target row.
pub async fn write_flips(
    connection: &mut PgConnection,
    flips: &[FlipWrite],
    run_id: &str,
    tool_version: &str,
    notes_extra: &serde_json::Value,
) -> Result<()> {
    let urls: Vec<&str> = flips.iter().map(|flip| flip.url.as_str()).collect();
    let members: Vec<Uuid> = flips.iter().map(|flip| flip.profile_id).collect();
    let indexes: Vec<i32> = flips
        .iter()
        .map(|flip| i32::try_from(flip.index).unwrap_or(i32::MAX))
        .collect();
    let old_types: Vec<Option<&str>> = flips.iter().map(|flip| flip.old_type.as_deref()).collect();
    let new_types: Vec<&str> = flips.iter().map(|flip| flip.new_type.as_str()).collect();
    let notes: Vec<serde_json::Value> = flips
        .iter()
        .map(|flip| {
            let mut notes = serde_json::json!({
                "profile": flip.profile_label,
                "index": flip.index,
                "tool": "agent-type-backfill",
                "tool_version": tool_version,
            });
            if let (Some(notes), Some(extra)) = (notes.as_object_mut(), notes_extra.as_object()) {
                notes.extend(extra.clone());
            }
            notes
        })
        .collect();
    // An absent or null stored type is recorded as "unknown", as the flip rule reads it.
    let inserted = sqlx::query(
        "INSERT INTO type_reclassification_log \
             (agent_url, member_id, old_type, new_type, source, run_id, notes) \
         SELECT a.url, a.member::text, \
                coalesce(a.old_type, p.agents -> a.idx -> 'type' #>> '{}', 'unknown'), \
                a.new_type, 'backfill_script', $7, \
                a.notes || jsonb_build_object('from', \
                    coalesce(nullif(p.agents -> a.idx -> 'type', 'null'::jsonb), '\"unknown\"'::jsonb)) \
         FROM unnest($1::text[], $2::uuid[], $3::int[], $4::text[], $5::text[], $6::jsonb[]) \
              WITH ORDINALITY AS a(url, member, idx, old_type, new_type, notes, position) \
         JOIN member_profiles p ON p.id = a.member \
         ORDER BY a.position",
    )
    .persistent(false)
    .bind(&urls)
    .bind(&members)
    .bind(&indexes)
    .bind(&old_types)
    .bind(&new_types)
    .bind(&notes)
    .bind(run_id)
    .execute(&mut *connection)
    .await
    .context("could not insert audit rows into type_reclassification_log")?;
    anyhow::ensure!(
        inserted.rows_affected() == flips.len() as u64,
        "wrote {} audit rows for {} flips: stopping before commit",
        inserted.rows_affected(),
        flips.len()
    );

    let mut rounds: Vec<Vec<&FlipWrite>> = Vec::new();
    let mut seen: HashMap<Uuid, usize> = HashMap::new();
    for flip in flips {
        let round = seen.entry(flip.profile_id).or_insert(0);
        if rounds.len() <= *round {
            rounds.push(Vec::new());
        }
        rounds[*round].push(flip);
        *round += 1;
    }
    for round in rounds {
        let ids: Vec<Uuid> = round.iter().map(|flip| flip.profile_id).collect();
        let paths: Vec<String> = round.iter().map(|flip| flip.index.to_string()).collect();
        let values: Vec<&str> = round.iter().map(|flip| flip.new_value.as_str()).collect();
        let updated = sqlx::query(
            "UPDATE member_profiles AS p \
             SET agents = jsonb_set(p.agents, ARRAY[f.idx, 'type'], f.new_value::jsonb, true) \
             FROM unnest($1::uuid[], $2::text[], $3::text[]) AS f(id, idx, new_value) \
             WHERE p.id = f.id",
        )
        .persistent(false)
        .bind(&ids)
        .bind(&paths)
        .bind(&values)
        .execute(&mut *connection)
        .await
        .context("could not update member_profiles")?;
        anyhow::ensure!(
            updated.rows_affected() == round.len() as u64,
            "updated {} profiles where {} were locked for writing: stopping before commit",
            updated.rows_affected(),
            round.len()
        );
    }
    Ok(())
}

/// Whether an error is a lock or statement timeout, a deadlock or a serialization failure: the
/// batch rolled back whole and may simply be tried again.
pub fn is_retryable(error: &anyhow::Error) -> bool {
    sqlstates(error).any(|code| matches!(code.as_str(), "55P03" | "57014" | "40001" | "40P01"))
}

/// Whether the server cancelled a statement for running past `statement_timeout` (57014 is also
/// what a cancel request gives, and the tool never sends one).
pub fn is_statement_timeout(error: &anyhow::Error) -> bool {
    sqlstates(error).any(|code| code == "57014")
}

fn sqlstates(error: &anyhow::Error) -> impl Iterator<Item = String> + '_ {
    error.chain().filter_map(|cause| {
        let error = cause.downcast_ref::<sqlx::Error>()?.as_database_error()?;
        Some(error.code()?.into_owned())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lines as libpq's `passwordFromFile` reads them: escapes in every field, `*` only as a
    /// whole field, comments, CRLF, the first match, and the password ending at an unescaped `:`.
    #[test]
    fn password_file_lines_match_and_unescape_as_in_libpq() {
        let find = |text: &str| pgpass::find(text, "db", "5432", "registry", "backfill");
        assert_eq!(
            find("db:5432:registry:backfill:se\\:cr\\\\et\n").as_deref(),
            Some("se:cr\\et")
        );
        assert_eq!(find("*:*:*:*:any").as_deref(), Some("any"));
        assert_eq!(
            find("# db:5432:registry:backfill:no\n*:5432:*:backfill:yes\r\n").as_deref(),
            Some("yes")
        );
        assert_eq!(
            find("*:*:*:backfill:first\ndb:5432:registry:backfill:second").as_deref(),
            Some("first")
        );
        assert_eq!(
            find("d*:5432:registry:backfill:x"),
            None,
            "no partial wildcards"
        );
        assert_eq!(find("db:5432:registry:backfil:x"), None);
        assert_eq!(find("db:5432:registry:backfill2:x"), None);
        assert_eq!(find("db:5432:registry:backfill"), None, "no password field");
        assert_eq!(find("db:5432:registry:backfill:a:b").as_deref(), Some("a"));
        assert_eq!(find("db:5432:registry:backfill:*").as_deref(), Some("*"));
        assert_eq!(
            find("db:5432:registry:backfill:trailing\\").as_deref(),
            Some("trailing\\")
        );
        assert_eq!(
            pgpass::find(
                "\\/run\\:pg:5432:registry:backfill:s",
                "/run:pg",
                "5432",
                "registry",
                "backfill"
            )
            .as_deref(),
            Some("s"),
            "an escaped socket directory"
        );
    }

    #[test]
    fn redact_removes_the_url_and_its_password_wherever_they_appear() {
        let url = "postgres://backfill:Sup3r%2FSecret@db:5432/registry";
        let message = format!("failed on {url}; password Sup3r%2FSecret was rejected");
        let clean = redact(&message, url);
        assert!(!clean.contains("Sup3r"), "{clean}");
        assert!(clean.contains("<database url>"));
        assert_eq!(redact("nothing to hide", ""), "nothing to hide");
        assert_eq!(url_password("postgres://u@db/x"), None);
        assert!(names_root_certificate(
            "postgres://db/x?sslmode=require&sslrootcert=/ca.pem"
        ));
        assert!(!names_root_certificate("postgres://db/x?sslmode=require"));
        assert_eq!(
            url_password("postgres://u:p@ss@db/x").as_deref(),
            Some("p@ss")
        );
    }
}
