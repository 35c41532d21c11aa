//! End-to-end runs of the built binary: stdout, stderr, exit code and table contents.

mod common;

use assert_cmd::Command;
use common::{events, TestDb};

/// One invocation of the binary with a clean environment, in the style of just's test builder.
struct Run {
    command: Command,
}

struct Finished {
    code: i32,
    stdout: String,
    stderr: String,
}

impl Run {
    fn new(args: &[&str]) -> Run {
        let mut command = Command::cargo_bin("agent-type-backfill").unwrap();
        command
            .args(args)
            .env_remove("DATABASE_URL")
            .env_remove("PGPASSWORD")
            .env_remove("RUST_LOG");
        Run { command }
    }

    fn database(mut self, url: &str) -> Run {
        self.command.env("DATABASE_URL", url);
        self
    }

    fn env(mut self, key: &str, value: &str) -> Run {
        self.command.env(key, value);
        self
    }

    fn run(mut self) -> Finished {
        let output = self.command.output().unwrap();
        Finished {
            code: output.status.code().expect("exited, not signalled"),
            stdout: String::from_utf8(output.stdout).unwrap(),
            stderr: String::from_utf8(output.stderr).unwrap(),
        }
    }
}

/// The test URL with a password that trust authentication ignores but the tool must never echo.
fn with_password(url: &str, password: &str) -> String {
    url.replacen("postgres@", &format!("postgres:{password}@"), 1)
}

#[test]
fn missing_database_url_is_a_usage_error_naming_it() {
    let done = Run::new(&["--dry-run"]).run();
    assert_eq!(done.code, 2);
    assert!(done.stderr.contains("DATABASE_URL"), "{}", done.stderr);
    assert!(done.stdout.is_empty());
}

#[test]
fn mode_is_required_and_exclusive() {
    let neither = Run::new(&[]).database("postgres://localhost/x").run();
    assert_eq!(neither.code, 2);
    assert!(neither.stderr.contains("--dry-run"), "{}", neither.stderr);
    let both = Run::new(&["--dry-run", "--apply"])
        .database("postgres://localhost/x")
        .run();
    assert_eq!(both.code, 2);
    assert!(
        both.stderr.contains("cannot be used with"),
        "{}",
        both.stderr
    );
}

#[test]
fn unparseable_url_is_a_usage_error_that_does_not_echo_it() {
    let url = "postgres://backfill:Sup3rSecret@db.internal:notaport/registry";
    let done = Run::new(&["--dry-run"]).database(url).run();
    assert_eq!(done.code, 2, "{}", done.stderr);
    assert!(done.stderr.contains("DATABASE_URL"), "{}", done.stderr);
    assert!(!done.stderr.contains("Sup3rSecret"), "{}", done.stderr);
}

#[test]
fn unreachable_server_exits_1_without_the_password() {
    let url = "postgres://backfill:Sup3rSecret@127.0.0.1:1/registry?connect_timeout=2";
    let done = Run::new(&["--dry-run"]).database(url).run();
    assert_eq!(done.code, 1, "{}", done.stderr);
    assert!(
        done.stderr
            .contains("could not connect to '127.0.0.1:1/registry'"),
        "{}",
        done.stderr
    );
    assert!(!done.stderr.contains("Sup3rSecret"));
    assert_eq!(
        done.stderr.matches("error:").count(),
        1,
        "printed once: {}",
        done.stderr
    );
}

#[tokio::test]
async fn dry_run_text_log_has_header_flips_and_summary_and_no_password() {
    let db = TestDb::seeded(30).await;
    let before = db.dump().await;
    let url = with_password(&db.url, "Sup3rSecret");
    let done = Run::new(&["--dry-run"])
        .database(&url)
        .env("PGPASSWORD", "Sup3rSecret")
        .run();
    assert_eq!(done.code, 0, "{}", done.stderr);
    let stdout = &done.stdout;
    assert!(stdout.starts_with(&format!(
        "agent-type-backfill {}\n",
        agent_type_backfill::backfill::VERSION
    )));
    assert!(stdout.contains("mode:        dry-run\n"));
    assert!(
        stdout.contains(&format!("database={} user=postgres", db.name)),
        "{stdout}"
    );
    assert!(stdout.contains("run id:      atb-"));
    assert!(stdout
        .contains("\n  bidcliq  https://bidcliq.example/mcp  buying -> sales  (probed 30h ago)\n"));
    assert!(stdout.contains(
        "\n  swivel  https://ads.swivel.example/a2a  buying -> sales  (probed 30h ago)\n"
    ));
    for line in [
        "profiles scanned:               41",
        "profiles with type changes:     2",
        "agent rows flipped:             2",
        "malformed rows skipped:         5",
        "mode:                           dry-run",
        "outcome:                        completed",
    ] {
        assert!(stdout.contains(line), "missing {line:?} in\n{stdout}");
    }
    assert!(stdout.contains("duration:"));
    for stream in [&done.stdout, &done.stderr] {
        assert!(
            !stream.contains("Sup3rSecret"),
            "password leaked:\n{stream}"
        );
    }
    assert!(!done.stderr.contains("bidcliq"), "flips go to stdout only");
    assert_eq!(db.dump().await, before);
}

#[tokio::test]
async fn json_apply_then_threshold_abort_then_idempotent_rerun() {
    let db = TestDb::seeded(30).await;

    let before = db.dump().await;
    let aborted = Run::new(&["--apply", "--max-flips", "1", "--format", "json"])
        .database(&db.url)
        .run();
    assert_eq!(aborted.code, 3, "{}", aborted.stderr);
    assert!(
        aborted
            .stderr
            .contains("more than --max-flips 1: nothing was written"),
        "{}",
        aborted.stderr
    );
    let log = events(aborted.stdout.as_bytes());
    assert_eq!(log.iter().filter(|e| e["event"] == "flip").count(), 2);
    assert_eq!(log.last().unwrap()["aborted"], true);
    assert_eq!(db.dump().await, before, "a threshold abort writes nothing");

    let applied = Run::new(&["--apply", "--format", "json"])
        .database(&db.url)
        .run();
    assert_eq!(applied.code, 0, "{}", applied.stderr);
    let log = events(applied.stdout.as_bytes());
    assert_eq!(log[0]["event"], "start");
    assert_eq!(log[0]["mode"], "apply");
    assert_eq!(log[0]["target"]["database"], db.name.as_str());
    let flip = log.iter().find(|e| e["profile"] == "bidcliq").unwrap();
    for key in ["profile_id", "profile", "index", "url", "from", "to"] {
        assert!(flip.get(key).is_some(), "flip event lacks {key}: {flip}");
    }
    assert_eq!(flip["from"], "buying");
    let summary = log.last().unwrap();
    assert_eq!(summary["event"], "summary");
    assert_eq!(
        (
            summary["profiles_scanned"].as_u64(),
            summary["profiles_changed"].as_u64()
        ),
        (Some(41), Some(2))
    );
    assert_eq!(
        (summary["flips"].as_u64(), summary["malformed"].as_u64()),
        (Some(2), Some(5))
    );
    assert_eq!(summary["mode"], "apply");
    assert_eq!(summary["run_id"], log[0]["run_id"]);
    assert_eq!(summary["aborted"], false);
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM type_reclassification_log WHERE run_id = $1")
            .bind(summary["run_id"].as_str().unwrap())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audited, 2);
    assert_eq!(db.agents_of("bidcliq").await[0]["type"], "sales");

    let rerun = Run::new(&["--dry-run", "--format", "json"])
        .database(&db.url)
        .run();
    assert_eq!(rerun.code, 0);
    let summary = events(rerun.stdout.as_bytes()).pop().unwrap();
    assert_eq!(summary["flips"], 0);
    assert_eq!(summary["run_id"], serde_json::Value::Null);
}

#[tokio::test]
async fn preflight_failure_exits_4() {
    let db = TestDb::new().await;
    sqlx::query("DROP TABLE agent_capabilities_snapshot")
        .execute(&db.pool)
        .await
        .unwrap();
    let done = Run::new(&["--dry-run"]).database(&db.url).run();
    assert_eq!(done.code, 4, "{}", done.stderr);
    assert!(
        done.stderr
            .contains("table 'agent_capabilities_snapshot' is missing"),
        "{}",
        done.stderr
    );
    assert!(done.stdout.is_empty());
}

/// A temporary directory the tool is pointed at through `TMPDIR`; removed when the test ends,
/// whether it passes or fails, so a failing assertion leaves no `atb-rehearse-*` behind.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let path = std::env::temp_dir().join(format!("atb-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&path).unwrap();
        // The throwaway cluster belongs to the postgres user when this runs as root.
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o1777))
            .unwrap();
        Scratch(path)
    }

    fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }

    /// What the tool left in the directory, apart from `keep`.
    fn leftovers(&self, keep: &str) -> Vec<std::ffi::OsString> {
        std::fs::read_dir(&self.0)
            .unwrap()
            .map(|entry| entry.unwrap().file_name())
            .filter(|name| name != keep)
            .collect()
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn rehearse_runs_the_whole_procedure_and_leaves_nothing_behind() {
    let scratch = Scratch::new("rehearse");
    let done = Run::new(&["rehearse", "--profiles", "50"])
        .env("TMPDIR", scratch.path())
        .run();
    assert_eq!(done.code, 0, "{}\n{}", done.stdout, done.stderr);
    assert_eq!(done.stdout.matches("=== rehearsal ").count(), 3);
    assert!(done.stdout.contains(
        "rehearsal passed: the dry-run planned 2 flips, the apply wrote 2 with 2 audit rows"
    ));
    let leftovers = scratch.leftovers("");
    assert!(leftovers.is_empty(), "rehearse left {leftovers:?}");
}

/// A rehearsal that fails after its server started (here every transaction is read only, so
/// creating the registry fails) still stops the server and removes its directory.
#[test]
fn failed_rehearsal_leaves_nothing_behind() {
    let scratch = Scratch::new("rehearse-fails");
    let real = agent_type_backfill::ephemeral::server_bin_dir().unwrap();
    let bin = scratch.0.join("bin");
    std::fs::create_dir(&bin).unwrap();
    for tool in ["initdb", "pg_isready"] {
        std::os::unix::fs::symlink(real.join(tool), bin.join(tool)).unwrap();
    }
    let postgres = bin.join("postgres");
    std::fs::write(
        &postgres,
        format!(
            "#!/bin/sh\nexec {:?} \"$@\" -c default_transaction_read_only=on\n",
            real.join("postgres")
        ),
    )
    .unwrap();
    std::fs::set_permissions(
        &postgres,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();
    std::fs::set_permissions(&bin, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();

    let done = Run::new(&["rehearse", "--profiles", "5"])
        .env("TMPDIR", scratch.path())
        .env("PG_BIN", bin.to_str().unwrap())
        .run();
    assert_eq!(done.code, 1, "{}\n{}", done.stdout, done.stderr);
    assert!(
        done.stderr
            .contains("error: could not create the rehearsal database"),
        "{}",
        done.stderr
    );
    let leftovers = scratch.leftovers("bin");
    assert!(
        leftovers.is_empty(),
        "a failed rehearsal left {leftovers:?}"
    );
}

/// The binary started in the background against `url`, for tests that signal it mid-run.
fn spawn_tool(args: &[&str], url: &str) -> std::process::Child {
    std::process::Command::new(assert_cmd::cargo::cargo_bin("agent-type-backfill"))
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Sessions of the tool in `pg_stat_activity` that are running a statement.
const ACTIVE_TOOL_SESSIONS: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND application_name LIKE 'agent-type-backfill %' \
     AND state = 'active'";

/// Holds `agent_capabilities_snapshot` until the transaction ends. The census reads only
/// member_profiles, so this stops the plan at its server pass and nowhere else.
async fn hold_the_snapshot_table(db: &TestDb) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut blocker = db.pool.begin().await.unwrap();
    sqlx::query("LOCK TABLE agent_capabilities_snapshot IN ACCESS EXCLUSIVE MODE")
        .execute(&mut *blocker)
        .await
        .unwrap();
    blocker
}

/// Polls for up to 10 s until one of the tool's sessions waits on a lock.
async fn tool_waits_on_a_lock(db: &TestDb) -> bool {
    for _ in 0..400 {
        let waiting: i64 = sqlx::query_scalar(&format!(
            "{ACTIVE_TOOL_SESSIONS} AND wait_event_type = 'Lock'"
        ))
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if waiting > 0 {
            return true;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test]
async fn sigterm_during_apply_prints_the_summary_and_exits_143() {
    use sqlx::Connection;
    let db = TestDb::seeded(10).await;
    let mut holder = sqlx::PgConnection::connect(&db.url).await.unwrap();
    sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
    sqlx::query("SELECT 1 FROM member_profiles WHERE slug IN ('bidcliq', 'swivel') FOR UPDATE")
        .execute(&mut holder)
        .await
        .unwrap();
    let child = spawn_tool(&["--apply", "--lock-timeout", "30s"], &db.url);
    assert!(
        tool_waits_on_a_lock(&db).await,
        "the apply never reached its write"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();

    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(143), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("written:                        2"),
        "{stdout}"
    );
    assert!(stdout.contains("interrupted by SIGTERM"), "{stdout}");
    assert!(stderr.contains("rerun the same command"), "{stderr}");
    assert_eq!(
        db.audit_rows().await.len(),
        2,
        "the batch in flight committed whole"
    );
}

/// Regression: an interrupted dry-run must not leave its planning statement running on the
/// server. A backend blocked on a lock (or busy in a long scan) does not notice that its client
/// has gone, so without a cancel it would hold on until its timeout.
#[tokio::test]
async fn sigint_during_the_planning_pass_cancels_it_on_the_server() {
    let db = TestDb::seeded(10).await;
    let blocker = hold_the_snapshot_table(&db).await;
    let child = spawn_tool(
        &[
            "--dry-run",
            "--lock-timeout",
            "60s",
            "--statement-timeout",
            "60s",
        ],
        &db.url,
    );
    assert!(
        tool_waits_on_a_lock(&db).await,
        "the dry-run never reached its server pass"
    );
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    let output = child.wait_with_output().unwrap();
    let stdout = String::from_utf8(output.stdout).unwrap();
    let stderr = String::from_utf8(output.stderr).unwrap();
    assert_eq!(output.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(stdout.contains("interrupted by SIGINT"), "{stdout}");

    // The lock is still held: only a cancel can have ended the tool's statement.
    let mut still_active: i64 = -1;
    for _ in 0..100 {
        still_active = sqlx::query_scalar(ACTIVE_TOOL_SESSIONS)
            .fetch_one(&db.pool)
            .await
            .unwrap();
        if still_active == 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    blocker.rollback().await.unwrap();
    assert_eq!(still_active, 0, "the planning statement outlived the tool");
}

#[tokio::test]
async fn expect_database_mismatch_exits_2_before_reading() {
    let db = TestDb::seeded(0).await;
    let done = Run::new(&["--apply", "--expect-database", "registry_prod"])
        .database(&db.url)
        .run();
    assert_eq!(done.code, 2, "{}", done.stderr);
    assert!(
        done.stderr.contains(&format!(
            "connected to database '{}' but --expect-database is 'registry_prod'",
            db.name
        )),
        "{}",
        done.stderr
    );
    assert!(done.stdout.is_empty(), "nothing read, nothing reported");
    assert!(db.audit_rows().await.is_empty());

    let matching = Run::new(&["--dry-run", "--expect-database", &db.name])
        .database(&db.url)
        .run();
    assert_eq!(matching.code, 0, "{}", matching.stderr);
}

/// Regression: the planning pass is one statement over the whole table, so on a big registry it
/// is the statement `--statement-timeout` cuts; the operator must be told which flag to raise.
#[tokio::test]
async fn a_planning_pass_past_the_statement_timeout_names_the_flag_to_raise() {
    let db = TestDb::seeded(0).await;
    // The server pass waits on the held table until the statement timeout cancels it.
    let blocker = hold_the_snapshot_table(&db).await;
    let url = db.url.clone();
    let done = tokio::task::spawn_blocking(move || {
        Run::new(&[
            "--dry-run",
            "--statement-timeout",
            "500ms",
            "--lock-timeout",
            "30s",
        ])
        .database(&url)
        .run()
    })
    .await
    .unwrap();
    blocker.rollback().await.unwrap();
    assert_eq!(done.code, 1, "{}", done.stderr);
    assert!(
        done.stderr.contains(
            "error: the planning pass reads every agent in one statement and ran past \
             --statement-timeout '500ms': raise it"
        ),
        "{}",
        done.stderr
    );
    assert!(
        done.stdout.starts_with("agent-type-backfill"),
        "{}",
        done.stdout
    );
    assert!(!done.stdout.contains("summary:"), "{}", done.stdout);
}

#[tokio::test]
async fn transitions_not_allowed_are_listed_and_nothing_is_written() {
    let db = TestDb::seeded(5).await;
    let before = db.dump().await;
    let refused = Run::new(&["--apply", "--allow-transition", "buyer->unknown"])
        .database(&db.url)
        .run();
    assert_eq!(refused.code, 3, "{}", refused.stderr);
    assert_eq!(
        refused.stdout.matches("\n  not allowed  ").count(),
        2,
        "{}",
        refused.stdout
    );
    assert!(
        refused.stderr.contains("(buying->sales)"),
        "{}",
        refused.stderr
    );
    assert_eq!(db.dump().await, before);

    let allowed = Run::new(&["--apply", "--allow-transition", "buying->sales"])
        .database(&db.url)
        .run();
    assert_eq!(allowed.code, 0, "{}", allowed.stderr);
    assert_eq!(db.audit_rows().await.len(), 2);
}

/// `--help` is part of the operator interface: a change to it must show up in review as a diff
/// of `tests/snapshots/`. Rewrite the snapshots with `UPDATE_SNAPSHOTS=1 cargo test --test cli`.
#[test]
fn help_output_matches_the_reviewed_snapshots() {
    for (args, file) in [
        (&["--help"][..], "help.txt"),
        (&["rehearse", "--help"][..], "help-rehearse.txt"),
    ] {
        let done = Run::new(args).run();
        assert_eq!(done.code, 0, "{}", done.stderr);
        let path = std::path::Path::new("tests/snapshots").join(file);
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, &done.stdout).unwrap();
        }
        let reviewed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            reviewed == done.stdout,
            "{args:?} changed; review and run UPDATE_SNAPSHOTS=1 cargo test --test cli:\n{}",
            done.stdout
        );
    }
}

#[test]
fn version_names_the_commit_and_completions_and_man_page_render() {
    let version = Run::new(&["--version"]).run();
    assert_eq!(version.code, 0);
    assert!(version.stdout.starts_with(&format!(
        "agent-type-backfill {} (git ",
        env!("CARGO_PKG_VERSION")
    )));
    for shell in ["bash", "zsh", "fish"] {
        let done = Run::new(&["completions", shell]).run();
        assert_eq!(done.code, 0, "{}", done.stderr);
        assert!(
            done.stdout.contains("max-flips"),
            "{shell} completions lack a flag"
        );
    }
    let man = Run::new(&["man"]).run();
    assert_eq!(man.code, 0);
    assert!(man.stdout.contains(".TH agent-type-backfill 1"));
    assert!(man.stdout.contains("expect\\-database"), "{}", man.stdout);
}
