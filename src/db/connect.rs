//! Connecting the way libpq and poolers expect, and the transactions every statement runs in.

use std::collections::HashMap;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context, Result};
use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions, PgSslMode};
use sqlx::{ConnectOptions, Connection, PgConnection, Row};

use super::deadline::{Deadlines, Transaction};
use super::{network, pgpass};
pub use crate::domain::Target;
use crate::error::{Failure, Usage};

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
    deadlines: Deadlines,
}

impl Pool {
    /// A transaction in the server's default mode (read-write unless the role or server says
    /// otherwise), with the tool's settings in force.
    pub async fn begin(&self) -> Result<Transaction> {
        let mut transaction = Transaction::begin(&self.pool, self.deadlines, Some(BEGIN))
            .await
            .context("could not open a transaction")?;
        apply_settings(&mut transaction, &self.settings).await?;
        Ok(transaction)
    }

    /// Closes the pool's connections; on a silent link it gives up after the connect limit
    /// rather than waiting for a goodbye nobody will read.
    pub async fn close(&self) {
        if tokio::time::timeout(self.deadlines.acquire(), self.pool.close())
            .await
            .is_err()
        {
            tracing::warn!("the server did not answer while the connections were closed");
        }
    }
}

/// A read-only, repeatable-read transaction: what one planning chunk reads, in one snapshot of
/// the registry, with the server refusing any write inside it.
pub async fn begin_read_only(pool: &Pool) -> Result<Transaction> {
    // The mode is part of BEGIN itself: it must come before any other statement of the
    // transaction, the settings' included.
    let mut transaction = Transaction::begin(&pool.pool, pool.deadlines, Some(BEGIN_READ_ONLY))
        .await
        .context("could not open the planning transaction")?;
    apply_settings(&mut transaction, &pool.settings).await?;
    Ok(transaction)
}

// Every BEGIN carries the idle timeout in the same simple-query message, so that no transaction
// of the tool exists on the server without it: a link that froze after a BEGIN, or between the
// Parse and the Execute of the settings statement (a Parse in REPEATABLE READ takes the
// snapshot), otherwise left a session holding a snapshot until the server's TCP keepalive.
// `apply_settings` then sets (and reads back) every setting, this one included. The literal is
// `IDLE_IN_TRANSACTION_TIMEOUT` in milliseconds (a unit test holds them together).
pub(crate) const BEGIN: &str = "BEGIN; SET LOCAL idle_in_transaction_session_timeout = 5000";
pub(crate) const BEGIN_READ_ONLY: &str = "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY; \
     SET LOCAL idle_in_transaction_session_timeout = 5000";

/// How long the server keeps a transaction of the tool whose client has gone silent. Between
/// two statements of any of its transactions the tool only resolves rows in memory
/// (milliseconds), so a few seconds of silence means the tool or its link is gone: the server
/// then ends the session, a write batch rolls back whole and its row locks go, and a planning
/// snapshot stops holding back vacuum. Set in every transaction, not only the ones that lock
/// rows, for that second reason.
pub const IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(5);

/// Sets the tool's settings for the rest of the transaction, then reads them back: the statement
/// that sets them may be answered by a pooler or a server that does not keep them.
async fn apply_settings(connection: &mut Transaction, settings: &SessionSettings) -> Result<()> {
    let lock_timeout = settings.lock_timeout.as_millis().to_string();
    let statement_timeout = settings.statement_timeout.as_millis().to_string();
    let idle_timeout = IDLE_IN_TRANSACTION_TIMEOUT.as_millis().to_string();
    // `true`: each setting lasts until the end of this transaction only (SET LOCAL), so a
    // transaction-mode pooler hands the server session on with the server's own values.
    super::unnamed(
        "SELECT set_config('lock_timeout', $1, true), set_config('statement_timeout', $2, true), \
                set_config('jit', 'off', true), \
                set_config('idle_in_transaction_session_timeout', $3, true)",
    )
    .bind(&lock_timeout)
    .bind(&statement_timeout)
    .bind(&idle_timeout)
    .execute(&mut *connection)
    .await
    .context(
        "could not set lock_timeout, statement_timeout, jit and \
         idle_in_transaction_session_timeout for the transaction",
    )?;
    let found: HashMap<String, String> = super::unnamed_as(
        "SELECT name::text, setting FROM pg_catalog.pg_settings \
         WHERE name IN ('lock_timeout', 'statement_timeout', 'jit', \
                        'idle_in_transaction_session_timeout', 'application_name')",
    )
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
        ("idle_in_transaction_session_timeout", idle_timeout.as_str()),
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
#[derive(Clone)]
pub struct SessionSettings {
    pub application_name: String,
    pub lock_timeout: Duration,
    pub statement_timeout: Duration,
}

/// Parses the URL without ever echoing it: sqlx errors can quote their input.
pub(crate) fn parse_url(url: &str) -> Result<PgConnectOptions> {
    let for_sqlx = network::without_link_parameters(&libpq_form(url)?);
    let options = PgConnectOptions::from_str(&for_sqlx).map_err(|error| {
        let reason = redact(&redact(&error.to_string(), &for_sqlx), url);
        Failure::Usage(Usage::UrlUnparsable { reason })
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

/// The URL as sqlx can read it, checked the way libpq checks it. libpq takes only the
/// `postgres://` and `postgresql://` schemes (sqlx would take any, so a typo such as
/// `postgress://` went unnoticed), and a URL whose host is empty but that names a user
/// (`postgres://backfill@/registry?host=/var/run/postgresql`), which sqlx refuses as "empty
/// host": libpq then connects to the default socket or to the `host=` of the query, and so does
/// the tool, by naming `localhost` (sqlx's own default) in the authority.
fn libpq_form(url: &str) -> Result<String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err(Failure::Usage(Usage::UrlWithoutScheme).into());
    };
    if scheme != "postgres" && scheme != "postgresql" {
        return Err(Failure::Usage(Usage::UrlScheme {
            scheme: scheme.to_owned(),
        })
        .into());
    }
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    match authority.rsplit_once('@') {
        Some((userinfo, "")) => Ok(format!("{scheme}://{userinfo}@localhost{tail}")),
        _ => Ok(url.to_owned()),
    }
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
    let link = network::LinkSettings::from_url(url)?;
    let deadlines = Deadlines::new(link.connect_timeout, settings.statement_timeout);
    // After a signal: the batch in flight or the cancel (a pooled connection and a round
    // trip), then closing the pool, each within its deadline; twice that before the backstop
    // exits.
    crate::interrupt::bound_after_signal((deadlines.acquire() + deadlines.reply) * 2);
    let options = parse_url(url)?
        .application_name(&settings.application_name)
        // PgBouncer refuses a startup packet carrying extra_float_digits (or `options`, where the
        // timeouts used to go); the tool decodes floats in binary, so it needs neither.
        .extra_float_digits(None)
        // Statements are sent unnamed (see `db::unnamed`): a named one would outlive
        // its transaction on a server session that a transaction pooler gives to someone else.
        .statement_cache_capacity(0)
        // The planning pass is one long statement by design; say so at info, not as a warning.
        .log_slow_statements(log::LevelFilter::Info, Duration::from_secs(1));
    let address = address(&options);
    let described = format!("{address}/{}", options.get_database().unwrap_or(""));
    // One direct connection first: a pool would retry a refused connection until its acquire
    // timeout, and the operator should hear at once that the target is wrong.
    let connecting = PgConnection::connect_with(&options);
    let connected = match deadlines.connect {
        Some(limit) => match tokio::time::timeout(limit, connecting).await {
            Ok(connected) => connected,
            Err(_) => {
                return Err(anyhow::anyhow!(
                    "the server stopped answering: no connection within {limit:?} \
                     (connect_timeout); nothing was read or written"
                )
                .context(format!(
                    "could not connect to '{described}': check the network, the VPN and the \
                     pooler, or raise connect_timeout in the URL"
                )))
            }
        },
        None => connecting.await,
    };
    let first =
        match connected {
            Ok(connection) => connection,
            Err(error) => {
                let hint = match error.as_database_error().and_then(|error| error.code()) {
                    Some(code) if code.starts_with("28") => password_hint(url, &options),
                    _ => String::new(),
                };
                // A host, port, password, database or TLS setting that does not connect is the
                // operator's configuration: exit 2, so a script tells a typo from a crash.
                return Err(anyhow::anyhow!(redact(&error.to_string(), url)).context(
                    Failure::Usage(Usage::Unreachable {
                        target: described,
                        hint,
                    }),
                ));
            }
        };
    link.apply_to_sockets(options.get_port());
    let mut transaction = Transaction::begin_direct(first, deadlines)
        .await
        .map_err(|error| {
            let statement_pooling = format!("{error:#}").contains("statement pooling mode");
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
    let row = super::unnamed("SELECT current_database()::text, current_user::text")
        .fetch_one(&mut transaction)
        .await
        .context("could not ask the server who we are")?;
    // Closes the first connection too.
    transaction
        .rollback()
        .await
        .context("could not close the first transaction")?;
    let port = options.get_port();
    let pool = PgPoolOptions::new()
        .max_connections(3)
        // Bounds the connect, the liveness check of an idle connection and the wait for a free
        // one: the pool's own waits, as the transactions bound every statement.
        .acquire_timeout(deadlines.acquire())
        .after_connect(move |_, _| {
            Box::pin(async move {
                link.apply_to_sockets(port);
                Ok(())
            })
        })
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
            settings: std::sync::Arc::new(settings.clone()),
            deadlines,
        },
        target,
    })
}

/// Where a connection goes: a host name or address, or the directory of a Unix socket (shown as
/// libpq shows it, not as the `localhost` sqlx keeps beside it).
pub(super) struct Address {
    pub(super) host: String,
    pub(super) port: u16,
    pub(super) socket: bool,
}

pub(super) fn address(options: &PgConnectOptions) -> Address {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_removes_the_url_and_its_password_wherever_they_appear() {
        let url = "postgres://backfill:Sup3r%2FSecret@db:5432/registry";
        let message = format!("failed on {url}; password Sup3r%2FSecret was rejected");
        let clean = redact(&message, url);
        assert!(!clean.contains("Sup3r"), "{clean}");
        assert!(clean.contains("<database url>"));
        assert_eq!(redact("nothing to hide", ""), "nothing to hide");
        assert_eq!(url_password("postgres://u@db/x"), None);
        assert!(parse_url("postgress://u@db/x").is_err());
        assert!(parse_url("mysql://u@db/x").is_err());
        let socket = parse_url("postgres://backfill@/staging?host=/var/run/postgresql").unwrap();
        assert_eq!(socket.get_username(), "backfill");
        assert_eq!(socket.get_database(), Some("staging"));
        assert_eq!(
            socket.get_socket().map(|path| path.display().to_string()),
            Some("/var/run/postgresql".to_owned())
        );
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

#[cfg(test)]
mod begin_tests {
    use super::*;

    #[test]
    fn every_begin_sets_the_idle_timeout_the_settings_read_back() {
        let millis = format!(
            "idle_in_transaction_session_timeout = {}",
            IDLE_IN_TRANSACTION_TIMEOUT.as_millis()
        );
        for begin in [BEGIN, BEGIN_READ_ONLY] {
            assert!(begin.ends_with(&millis), "{begin}");
        }
    }
}
