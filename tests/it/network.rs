//! A silent network: a fault proxy freezes the link (bytes stop, sockets stay open) at each
//! moment of a run. The tool exits by itself within the bound README documents, says the server
//! stopped answering and what was written; what it wrote is whole (audit rows match the
//! profiles); the server lets go of the tool's session within the idle-in-transaction bound; and
//! with the link back a rerun converges. Directly, and with the proxy between PgBouncer in
//! transaction mode and the server.

use std::time::{Duration, Instant};

use crate::common::deployment::{host_port, PgBouncer, PoolMode};
use crate::common::proxy::{Fault, Proxy};
use crate::common::{TestDb, Tool};
use agent_type_backfill::db::IDLE_IN_TRANSACTION_TIMEOUT;
use agent_type_backfill::support::seed::{seed_bulk, BulkSpec};

/// --statement-timeout for these runs; the reply limit is this plus max(1 s, this) = 2 s.
const STATEMENT_TIMEOUT: &str = "1s";
const REPLY: Duration = Duration::from_secs(2);
/// connect_timeout=2 in the URL.
const CONNECT: Duration = Duration::from_secs(2);
/// Scheduling slack for a machine five test suites share.
const SLACK: Duration = Duration::from_secs(8);

/// README's bound for a run whose link goes silent during a statement: the reply limit `R`,
/// then closing the pool (at most its acquire limit, `2C`).
fn statement_bound() -> Duration {
    REPLY + CONNECT * 2 + SLACK
}

async fn registry() -> (TestDb, usize) {
    let db = TestDb::new().await;
    seed_bulk(
        &db.pool,
        BulkSpec {
            profiles: 80,
            snapshot_per_mille: 1000,
            unclassified_per_mille: 0,
            stale_per_mille: 250,
            seed: 22,
        },
    )
    .await
    .unwrap();
    let flips = flips_left(&db.url).await;
    assert!(
        flips > 12,
        "the seed has flips for several batches: {flips}"
    );
    (db, flips)
}

fn through(url: &str) -> String {
    let separator = if url.contains('?') { '&' } else { '?' };
    format!("{url}{separator}connect_timeout=2")
}

async fn flips_left(url: &str) -> usize {
    let dry = Tool::new(&["--dry-run", "--format", "json", "--max-flips", "1000"])
        .database(url)
        .spawn()
        .finish()
        .await;
    dry.exits(0);
    dry.log().flips().len()
}

fn apply(url: &str) -> Tool {
    Tool::new(&[
        "--apply",
        "--format",
        "json",
        "--max-flips",
        "1000",
        "--batch-size",
        "3",
        "--statement-timeout",
        STATEMENT_TIMEOUT,
        "--lock-timeout",
        "500ms",
    ])
    .database(url)
}

fn dry_run(url: &str) -> Tool {
    Tool::new(&[
        "--dry-run",
        "--format",
        "json",
        "--max-flips",
        "1000",
        "--batch-size",
        "3",
        "--statement-timeout",
        STATEMENT_TIMEOUT,
    ])
    .database(url)
}

/// Waits, up to the idle-in-transaction bound, until no session of the tool holds anything on
/// the server: a running statement, a snapshot (which holds back vacuum), a transaction id or a
/// lock other than its own virtual transaction id (a row lock a member's save would wait on);
/// returns how many still do.
async fn tool_sessions_holding_anything(db: &TestDb) -> i64 {
    db.tool_sessions_left(
        "a.state = 'active' OR a.backend_xmin IS NOT NULL OR a.backend_xid IS NOT NULL \
         OR EXISTS (SELECT 1 FROM pg_locks l WHERE l.pid = a.pid AND l.locktype <> 'virtualxid')",
        IDLE_IN_TRANSACTION_TIMEOUT + SLACK,
    )
    .await
}

/// Audit rows of the tool's runs, and flips the rule still finds: together, every flip of the
/// seed, each either written with its audit row or still to write.
async fn audit_count(db: &TestDb) -> usize {
    db.audit_rows().await.len()
}

struct Silenced {
    code: i32,
    stderr: String,
    after_fault: Duration,
}

/// Runs `tool` through `proxy`, which is armed already; how long the tool took after the fault.
async fn run_silenced(tool: Tool, proxy: &Proxy) -> Silenced {
    let run = tool.spawn();
    let started = run.started;
    let done = run.finish().await;
    let faulted = proxy
        .faulted_at()
        .unwrap_or_else(|| panic!("the fault never fired:\n{}", done.stderr));
    let ended = started + done.elapsed;
    eprintln!(
        "[network] {} {:?} after the fault; {}",
        done.describe(),
        ended.saturating_duration_since(faulted),
        done.error_line()
    );
    Silenced {
        code: done.code(),
        stderr: done.stderr,
        after_fault: ended.saturating_duration_since(faulted),
    }
}

fn assert_silent_error(run: &Silenced, written: &str) {
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr.contains("the server stopped answering"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains(written), "{}", run.stderr);
    assert!(
        run.after_fault < statement_bound(),
        "took {:?} after the link froze (bound {:?}):\n{}",
        run.after_fault,
        statement_bound(),
        run.stderr
    );
}

#[tokio::test]
async fn a_link_frozen_before_connect_ends_the_run_at_connect_timeout() {
    let (db, _) = registry().await;
    let proxy = Proxy::to(&db.url).await;
    proxy.set(Fault::Freeze);
    let run = run_silenced(dry_run(&through(&proxy.url_for(&db.url))), &proxy).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("the server stopped answering: no connection within 2s (connect_timeout)"),
        "{}",
        run.stderr
    );
    assert!(run.after_fault < CONNECT + SLACK, "{:?}", run.after_fault);
}

#[tokio::test]
async fn a_link_frozen_during_the_planning_statement_ends_the_dry_run() {
    let (db, flips) = registry().await;
    let proxy = Proxy::to(&db.url).await;
    proxy.after("v.verdict = 'may flip'", 0, Fault::Freeze);
    let run = run_silenced(dry_run(&through(&proxy.url_for(&db.url))), &proxy).await;
    assert_silent_error(&run, "nothing was written");
    assert_eq!(tool_sessions_holding_anything(&db).await, 0);
    drop(proxy);
    assert_eq!(flips_left(&db.url).await, flips);
}

#[tokio::test]
async fn a_link_frozen_during_the_candidate_reads_ends_the_dry_run() {
    let (db, _) = registry().await;
    let proxy = Proxy::to(&db.url).await;
    // The second page of candidates: the first went through.
    proxy.after("WHERE id = ANY($1) ORDER BY id\0", 1, Fault::Freeze);
    let run = run_silenced(dry_run(&through(&proxy.url_for(&db.url))), &proxy).await;
    assert_silent_error(&run, "nothing was written");
    assert_eq!(tool_sessions_holding_anything(&db).await, 0);
}

/// The link freezes right after the planning transaction's BEGIN reached the server, or after
/// the Parse of its settings statement did and before its Execute (a Parse in REPEATABLE READ
/// takes the transaction's snapshot). Under load, a freeze on the other plan job's connection
/// lands in either place by chance. The BEGIN carries the idle timeout in the same message, so
/// the server ends that session too: no session of the tool is left in a transaction.
#[tokio::test]
async fn a_link_frozen_after_begin_or_inside_the_settings_leaves_no_session_in_a_transaction() {
    // The first settings statement is the preflight's, in a read-write transaction.
    for (moment, says) in [
        (
            "BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY",
            "nothing was written",
        ),
        (
            "set_config('lock_timeout'",
            "the transaction in flight was not committed",
        ),
    ] {
        let (db, _) = registry().await;
        let proxy = Proxy::to(&db.url).await;
        proxy.after(moment, 0, Fault::Freeze);
        let run = run_silenced(dry_run(&through(&proxy.url_for(&db.url))), &proxy).await;
        assert_silent_error(&run, says);
        assert_eq!(tool_sessions_holding_anything(&db).await, 0, "{moment}");
        let left = db
            .tool_sessions_left(
                "a.state LIKE 'idle in transaction%'",
                IDLE_IN_TRANSACTION_TIMEOUT + SLACK,
            )
            .await;
        assert_eq!(left, 0, "{moment}: a session left in its transaction");
    }
}

/// Two batches committed, the third's locking read answered by the server and lost on the way:
/// the tool gives up on it, the server rolls it back at idle_in_transaction_session_timeout and
/// lets go of its locks, and a rerun writes the rest.
#[tokio::test]
async fn a_link_frozen_inside_a_write_batch_rolls_it_back_and_a_rerun_converges() {
    let (db, flips) = registry().await;
    let proxy = Proxy::to(&db.url).await;
    proxy.after("FOR UPDATE", 2, Fault::Freeze);
    let run = run_silenced(apply(&through(&proxy.url_for(&db.url))), &proxy).await;
    assert_silent_error(&run, "was not committed");
    assert_eq_written(&run.stderr, &db).await;
    assert_eq!(tool_sessions_holding_anything(&db).await, 0, "locks let go");
    let written = audit_count(&db).await;
    assert!(written > 0, "two batches committed before the freeze");
    assert_eq!(
        written + flips_left(&db.url).await,
        flips,
        "each flip whole"
    );

    proxy.set(Fault::Forward);
    let rerun = apply(&proxy.url_for(&db.url)).spawn().finish().await;
    rerun.exits(0);
    assert_eq!(flips_left(&db.url).await, 0);
    assert_eq!(audit_count(&db).await, flips);
}

/// COMMIT reaches the server and its answer does not come back: the tool cannot know whether
/// the batch committed and says so; whatever the server did, it did whole.
#[tokio::test]
async fn a_link_frozen_at_commit_says_the_batch_may_be_committed_and_a_rerun_converges() {
    let (db, flips) = registry().await;
    let proxy = Proxy::to(&db.url).await;
    proxy.after("COMMIT", 1, Fault::Freeze);
    let run = run_silenced(apply(&through(&proxy.url_for(&db.url))), &proxy).await;
    assert_silent_error(&run, "may or may not have been committed");
    assert_eq!(tool_sessions_holding_anything(&db).await, 0);
    assert_eq!(audit_count(&db).await + flips_left(&db.url).await, flips);
    drop(proxy);
    let rerun = apply(&db.url).spawn().finish().await;
    rerun.exits(0);
    assert_eq!(audit_count(&db).await, flips);
}

/// The error says exactly what the audit table holds: "N of M written under run id".
async fn assert_eq_written(stderr: &str, db: &TestDb) {
    let written = audit_count(db).await;
    let says = if written == 0 {
        stderr.contains("; nothing was written")
    } else {
        stderr.contains(&format!(" {written} of "))
            && stderr.contains("written under run id")
            && stderr.contains("every batch committed whole or not at all")
    };
    assert!(says, "{written} audit rows: {stderr}");
}

/// A reset link fails at once, with what was written; no wait for a deadline.
#[tokio::test]
async fn a_link_reset_inside_a_write_batch_fails_at_once_and_a_rerun_converges() {
    let (db, flips) = registry().await;
    let proxy = Proxy::to(&db.url).await;
    proxy.after("FOR UPDATE", 1, Fault::Reset);
    let run = run_silenced(apply(&through(&proxy.url_for(&db.url))), &proxy).await;
    assert_eq!(run.code, 1, "{}", run.stderr);
    assert_eq_written(&run.stderr, &db).await;
    assert!(run.after_fault < REPLY + SLACK, "{:?}", run.after_fault);
    assert_eq!(audit_count(&db).await + flips_left(&db.url).await, flips);
    drop(proxy);
    let rerun = apply(&db.url).spawn().finish().await;
    rerun.exits(0);
    assert_eq!(audit_count(&db).await, flips);
}

/// A slow link is not a silent one: every reply comes, later, and the run completes.
#[tokio::test]
async fn a_slow_link_still_completes_the_run() {
    let (db, flips) = registry().await;
    let proxy = Proxy::to(&db.url).await;
    proxy.after("FOR UPDATE", 0, Fault::Slow(Duration::from_millis(20)));
    let done = apply(&through(&proxy.url_for(&db.url)))
        .spawn()
        .finish()
        .await;
    done.exits(0);
    assert_eq!(audit_count(&db).await, flips);
}

/// SIGTERM while the link is frozen: the run does not wait for a second signal.
#[tokio::test]
async fn a_signal_on_a_frozen_link_still_ends_the_run_by_itself() {
    for (pattern, tool) in [
        ("v.verdict = 'may flip'", dry_run as fn(&str) -> Tool),
        ("FOR UPDATE", apply as fn(&str) -> Tool),
    ] {
        let (db, flips) = registry().await;
        let proxy = Proxy::to(&db.url).await;
        proxy.after(pattern, 0, Fault::Freeze);
        let run = tool(&through(&proxy.url_for(&db.url))).spawn();
        let faulted = proxy.faulted().await;
        run.signal(libc::SIGTERM);
        let signalled = Instant::now();
        let done = run.finish().await;
        let code = done.code();
        eprintln!(
            "[network] SIGTERM on a link frozen at {pattern:?}: {} {:?} after the signal",
            done.describe(),
            signalled.elapsed()
        );
        // README's bound. Planning: the cancel (a connection through the frozen link: its
        // acquire limit 2C, then its round trip R), then closing the pool (2C). Writing: the
        // batch in flight (R), then the same close.
        let bound = CONNECT * 4 + REPLY + SLACK;
        assert!(
            signalled.elapsed() < bound,
            "{pattern}: {:?} after the signal ({:?} after the freeze):\n{}",
            signalled.elapsed(),
            faulted.elapsed(),
            done.stderr
        );
        assert!(
            [1, 143].contains(&code),
            "{pattern}: exit {code}:\n{}",
            done.stderr
        );
        assert_eq!(tool_sessions_holding_anything(&db).await, 0, "{pattern}");
        assert_eq!(audit_count(&db).await + flips_left(&db.url).await, flips);
    }
}

/// Keepalives are on the tool's sockets (the kernel's keepalive timer runs on an idle one), and
/// off with keepalives=0, as libpq reads it.
#[tokio::test]
async fn the_tool_sets_tcp_keepalives_unless_the_url_turns_them_off() {
    for (parameters, expected) in [("", true), ("&keepalives=0", false)] {
        let (db, _) = registry().await;
        let proxy = Proxy::to(&db.url).await;
        proxy.after("FOR UPDATE", 0, Fault::Freeze);
        let url = format!("{}{parameters}", through(&proxy.url_for(&db.url)));
        let run = apply(&url).spawn();
        proxy.faulted().await;
        // The tool's sockets to the proxy, from the kernel's table: timer 2 is keepalive, 1 the
        // retransmit or loss-probe timer that runs until the proxy's kernel acknowledges the
        // last bytes sent. Once no socket has bytes in flight, each is idle: timed by keepalive
        // or by nothing.
        let until = Instant::now() + Duration::from_secs(5);
        let timers = loop {
            let timers = timers_of_connections_to(proxy.port);
            if !timers.contains(&1) || Instant::now() > until {
                break timers;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        drop(run.finish().await);
        assert!(!timers.is_empty(), "no connection of the tool to the proxy");
        let keepalive = if expected {
            vec![2; timers.len()]
        } else {
            vec![0; timers.len()]
        };
        assert_eq!(timers, keepalive, "{parameters:?}");
    }
}

/// The `tr` column of /proc/net/tcp for established sockets whose remote port is `port`.
fn timers_of_connections_to(port: u16) -> Vec<u32> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let remote_port = u16::from_str_radix(fields[2].rsplit(':').next()?, 16).ok()?;
            let established = fields[3] == "01";
            let timer = u32::from_str_radix(fields[5].split(':').next()?, 16).ok()?;
            (remote_port == port && established).then_some(timer)
        })
        .collect()
}

/// PgBouncer in transaction mode with the link between it and the server frozen: the tool's own
/// deadline ends the run (PgBouncer waits on the server for as long as it is configured to), the
/// server lets go, and with the link back a rerun through the pooler converges.
#[tokio::test]
async fn a_frozen_link_behind_pgbouncer_in_transaction_mode_ends_the_run_and_a_rerun_converges() {
    let (db, flips) = registry().await;
    let proxy = Proxy::to(&db.url).await;
    let bouncer = PgBouncer::start(
        "127.0.0.1",
        proxy.port,
        PoolMode::Transaction,
        &["postgres"],
    );
    let url = crate::common::deployment::via(&db.url, "127.0.0.1", bouncer.port);
    proxy.after("FOR UPDATE", 2, Fault::Freeze);
    let run = run_silenced(apply(&through(&url)), &proxy).await;
    assert_silent_error(&run, "was not committed");
    assert_eq!(tool_sessions_holding_anything(&db).await, 0, "locks let go");
    assert_eq!(audit_count(&db).await + flips_left(&db.url).await, flips);

    proxy.set(Fault::Forward);
    let rerun = apply(&url).spawn().finish().await;
    rerun.exits(0);
    assert_eq!(audit_count(&db).await, flips);
}

/// The tool's settings stay in their transaction. Through PgBouncer in transaction
/// mode, every server session the tool used carries the server's defaults once the run is done.
#[tokio::test]
async fn the_tools_settings_do_not_outlive_its_transactions_through_pgbouncer() {
    let (db, _) = registry().await;
    let (host, port) = host_port(&db.url);
    let bouncer = PgBouncer::start(&host, port, PoolMode::Transaction, &["postgres"]);
    let url = crate::common::deployment::via(&db.url, "127.0.0.1", bouncer.port);
    let done = apply(&url).spawn().finish().await;
    done.exits(0);
    // As many clients at once as the pool has server sessions: each holds a transaction, so
    // between them they see every server session, the tool's included.
    let mut clients = Vec::new();
    let mut seen = Vec::new();
    for _ in 0..10 {
        use sqlx::ConnectOptions;
        use std::str::FromStr;
        // PgBouncer refuses the extra_float_digits sqlx sends by default.
        let options = sqlx::postgres::PgConnectOptions::from_str(&url)
            .unwrap()
            .extra_float_digits(None);
        let mut client = options.connect().await.unwrap();
        sqlx::query("BEGIN")
            .persistent(false)
            .execute(&mut client)
            .await
            .unwrap();
        let settings: (String, String, String, i32) = sqlx::query_as(
            "SELECT current_setting('lock_timeout'), current_setting('statement_timeout'), \
                    current_setting('idle_in_transaction_session_timeout'), pg_backend_pid()",
        )
        .persistent(false)
        .fetch_one(&mut client)
        .await
        .unwrap();
        seen.push(settings);
        clients.push(client);
    }
    for (lock, statement, idle, pid) in &seen {
        assert_eq!(
            (lock.as_str(), statement.as_str(), idle.as_str()),
            ("0", "0", "0"),
            "server session {pid} kept the tool's settings: {seen:?}"
        );
    }
}

/// The settings' read-back compares the values. A pooler that rewrites the tool's SET (here the
/// proxy turns `jit` back on) stops the run with exit 1 naming the setting, before any write.
#[tokio::test]
async fn a_setting_the_server_does_not_keep_stops_the_run_naming_it() {
    let (db, flips) = registry().await;
    let proxy = Proxy::to(&db.url).await;
    proxy.rewrite("'jit', 'off', true", "'jit', 'on' , true");
    let done = apply(&proxy.url_for(&db.url)).spawn().finish().await;
    done.exits(1);
    done.stderr_has("jit is 'on', expected 'off'");
    // What it printed before it stopped is a run log still.
    done.log().events();
    assert_eq!(audit_count(&db).await, 0);
    assert_eq!(flips_left(&db.url).await, flips);
}
