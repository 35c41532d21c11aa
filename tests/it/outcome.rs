//! Every ending a run survives is said the same way by the exit code, the last lines of the log
//! (text, JSON, Markdown) and stderr, and a closed stdout is never taken for success.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use crate::common::{wait_for_blocked_tool, TestDb, Tool, BIN};

/// `count` profiles, each with one `buying` agent whose snapshot infers `sales`: one flip each.
async fn add_buying_profiles(db: &TestDb, count: i32) {
    for statement in [
        "INSERT INTO organizations (workos_organization_id, name) \
         SELECT 'org_f' || g, 'Org ' || g FROM generate_series(1, $1) g",
        "INSERT INTO member_profiles (workos_organization_id, display_name, slug, agents) \
         SELECT 'org_f' || g, 'F' || g, 'flip-' || lpad(g::text, 6, '0'), \
                jsonb_build_array(jsonb_build_object('url', 'https://f' || g || '.example/mcp', \
                    'type', 'buying', 'visibility', 'public', 'name', 'F')) \
         FROM generate_series(1, $1) g",
        "INSERT INTO agent_capabilities_snapshot (agent_url, protocol, inferred_type) \
         SELECT 'https://f' || g || '.example/mcp', 'mcp', 'sales' FROM generate_series(1, $1) g",
    ] {
        sqlx::query(statement)
            .bind(count)
            .execute(&db.pool)
            .await
            .unwrap();
    }
}

/// One profile whose snapshot infers a type the rule does not know: a held flip.
async fn add_held_flip(db: &TestDb) {
    for statement in [
        "INSERT INTO organizations (workos_organization_id, name) VALUES ('org_held', 'Held')",
        "INSERT INTO member_profiles (workos_organization_id, display_name, slug, agents) \
         VALUES ('org_held', 'Held', 'held-agent', \
                 '[{\"url\": \"https://held.example/mcp\", \"type\": \"sales\"}]')",
        "INSERT INTO agent_capabilities_snapshot (agent_url, protocol, inferred_type) \
         VALUES ('https://held.example/mcp', 'mcp', 'orchestration')",
    ] {
        sqlx::query(statement).execute(&db.pool).await.unwrap();
    }
}

/// Runs the binary with its stdout read by a reader that takes `lines` lines and goes away, as
/// `| head -n LINES` does. Returns the exit code and stderr.
fn run_into_head(url: &str, args: &[&str], lines: usize) -> (i32, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .env("DATABASE_URL", url)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut reader = BufReader::new(stdout);
    for _ in 0..lines {
        let mut line = String::new();
        if reader.read_line(&mut line).unwrap() == 0 {
            break;
        }
    }
    drop(reader);
    let output = child.wait_with_output().unwrap();
    (
        output.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// Regression: `--apply ... | head -n 40` exited 0 with nothing written and nothing said.
#[tokio::test]
async fn an_apply_whose_stdout_closes_stops_as_on_sigint_and_says_so() {
    let db = TestDb::seeded(0).await;
    add_buying_profiles(&db, 3000).await;
    let before = db.dump().await;
    let url = db.url.clone();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        run_into_head(
            &url,
            &["--apply", "--max-flips", "100000", "--batch-size", "10"],
            40,
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 141, "{stderr}");
    // Closed while the flips were listed: no write batch started.
    assert_eq!(db.dump().await, before, "{stderr}");
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|line| line.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains("stdout was closed") && errors[0].contains("nothing was written"),
        "{stderr}"
    );
}

/// Regression: `--dry-run | head -1` on a plan with a held flip exited 0.
#[tokio::test]
async fn a_dry_runs_exit_code_is_its_verdict_whoever_reads_its_output() {
    let db = TestDb::seeded(0).await;
    add_buying_profiles(&db, 3000).await;
    let url = db.url.clone();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        run_into_head(&url, &["--dry-run", "--max-flips", "100000"], 1)
    })
    .await
    .unwrap();
    assert_eq!(code, 0, "a completed plan read by head: {stderr}");

    add_held_flip(&db).await;
    let url = db.url.clone();
    let (code, stderr) = tokio::task::spawn_blocking(move || {
        run_into_head(&url, &["--dry-run", "--max-flips", "100000"], 1)
    })
    .await
    .unwrap();
    assert_eq!(code, 3, "a held flip refuses the plan: {stderr}");
    assert!(stderr.contains("1 flip held"), "{stderr}");
}

/// Regression: a dry-run past `--statement-timeout` ended its log at `flips:` (text) and at the
/// `start` event (JSON).
#[tokio::test]
async fn a_timed_out_plan_still_ends_the_log_with_its_outcome_in_every_format() {
    let db = TestDb::seeded(5).await;
    for format in ["text", "json", "markdown"] {
        let blocker = db.hold_the_snapshot_table().await;
        let url = db.url.clone();
        let done = tokio::task::spawn_blocking(move || {
            Tool::new(&[
                "--dry-run",
                "--statement-timeout",
                "300ms",
                "--lock-timeout",
                "30s",
                "--format",
                format,
            ])
            .database(&url)
            .run()
        })
        .await
        .unwrap();
        blocker.rollback().await.unwrap();
        assert_eq!(done.code(), 1, "{format}: {}", done.stderr);
        let last = done.stdout.lines().rev().find(|line| !line.is_empty());
        let last = last.unwrap_or_default();
        match format {
            "json" => {
                let log = done.log();
                assert_eq!(
                    (log.outcome().kind.as_str(), log.outcome().exit_code),
                    ("failed", 1)
                );
                assert!(!log.summary().plan_complete);
            }
            "markdown" => assert!(last.starts_with("| duration |"), "{}", done.stdout),
            _ => assert!(last.starts_with("  duration:"), "{}", done.stdout),
        }
        assert!(
            done.stdout.contains("statement timeout"),
            "{format}: the outcome names the cause: {}",
            done.stdout
        );
    }
}

/// Regression: a second Ctrl-C exited 130 at once, with no summary and nothing on stderr.
#[tokio::test]
async fn a_second_signal_abandons_the_batch_in_flight_and_still_reports() {
    let db = TestDb::seeded(10).await;
    let first: String = sqlx::query_scalar(
        "SELECT slug::text FROM member_profiles WHERE slug IN ('bidcliq', 'swivel') \
         ORDER BY id DESC LIMIT 1",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    // The second batch (in id order) waits on a member's save in progress.
    let holder = db.lock_profiles(&[&first]).await;
    let mut run = Tool::new(&[
        "--apply",
        "--batch-size",
        "1",
        "--lock-timeout",
        "60s",
        "--format",
        "json",
    ])
    .database(&db.url)
    .spawn();
    wait_for_blocked_tool(&db).await;
    run.signal(libc::SIGINT);
    // Two signals sent at once may arrive as one: the second follows the first's warning.
    assert!(run.stderr_shows("stopping after the batch in flight").await);
    run.signal(libc::SIGINT);
    let done = run.finish().await;
    drop(holder);
    done.exits(130);
    let log = done.log();
    assert_eq!(log.outcome().kind, "interrupted");
    assert_eq!(log.summary().written, 1, "{log:?}");
    let message = &log.outcome().message;
    assert!(
        message.contains("twice; the batch in flight was rolled back; 1 of 2 written"),
        "{message}"
    );
    done.stderr_has("the batch in flight was rolled back");
    assert_eq!(
        db.audit_rows().await.len(),
        1,
        "what the summary says committed"
    );
}

/// Regression: after SIGINT, a batch that timed out on a lock logged "retrying attempt=1" and
/// then did not retry. It says it is not retried, and the run ends interrupted.
#[tokio::test]
async fn a_batch_that_times_out_after_a_signal_is_not_retried_and_says_so() {
    let db = TestDb::seeded(10).await;
    let holder = db.lock_profiles(&["bidcliq", "swivel"]).await;
    let mut run = Tool::new(&["--apply", "--lock-timeout", "2s", "--write-attempts", "3"])
        .database(&db.url)
        .spawn();
    wait_for_blocked_tool(&db).await;
    run.signal(libc::SIGINT);
    assert!(run.stderr_shows("stopping after the batch in flight").await);
    let done = run.finish().await;
    drop(holder);
    done.exits(130);
    done.stderr_has("not retried: stopping");
    assert!(!done.stderr.contains("; retrying"), "{}", done.stderr);
    assert_eq!(db.audit_rows().await.len(), 0);
    assert!(
        done.stdout
            .contains("interrupted by SIGINT; nothing was written; rerun the same command"),
        "{}",
        done.stdout
    );
}

/// The outcome names every limit that tripped, with its numbers, and the summary keeps flips to
/// write, held flips and flips not allowed apart.
#[tokio::test]
async fn a_refusal_names_each_limit_with_its_numbers() {
    let db = TestDb::seeded(10).await;
    add_held_flip(&db).await;
    let done = Tool::new(&[
        "--dry-run",
        "--max-flips",
        "1",
        "--allow-transition",
        "buying:unknown",
        "--format",
        "json",
    ])
    .database(&db.url)
    .status(3)
    .run();
    let summary = done.log().summary();
    assert_eq!(
        done.log().outcome().refused_by,
        ["held", "not_allowed", "max_flips"]
    );
    assert_eq!((summary.flips, summary.to_write, summary.held), (3, 2, 1));
    // Held flips are not checked against --allow-transition: they are never written anyway.
    assert_eq!(summary.not_allowed, 2);
    let message = &done.log().outcome().message;
    assert!(
        message.contains("2 flips to write, more than --max-flips 1")
            && message.contains("1 flip held")
            && message.contains("(buying:sales)"),
        "{message}"
    );
    let text = Tool::new(&["--dry-run", "--max-flips", "1"])
        .database(&db.url)
        .run();
    for line in [
        "  flips found:                    3\n",
        "  flips to write:                 2\n",
        "  held (never written):           1\n",
    ] {
        assert!(text.stdout.contains(line), "{line:?}\n{}", text.stdout);
    }
}

/// Configuration mistakes are exit 2 with one line on stderr, before anything is read.
#[test]
fn configuration_mistakes_exit_2_with_one_line_that_says_what_is_allowed() {
    let url = "postgres://postgres@127.0.0.1:1/registry";
    for (args, says) in [
        (&["--dry-run", "--max-flips", "-1"][..], "0 or more"),
        (&["--dry-run", "--lock-timeout", "-1s"][..], "negative"),
        (&["--dry-run", "--lock-timeout", "5"][..], "no unit"),
        (&["--dry-run", "--max-probe-age", "1M"][..], "length varies"),
        (
            &["--dry-run", "--lock-timeout", "99999999999h"][..],
            "longer than PostgreSQL allows",
        ),
        (
            &["--apply", "--allow-transition", "buying:sale"][..],
            "TO must be one of brand, rights",
        ),
        (
            &["--dry-run", "--plan", "plan.json"][..],
            "cannot be used with",
        ),
        // Connection refused: the target is the operator's configuration.
        (
            &["--dry-run"][..],
            "could not connect to '127.0.0.1:1/registry'",
        ),
    ] {
        let done = Tool::new(args).database(url).run();
        assert_eq!(done.code(), 2, "{args:?}: {}", done.stderr);
        assert!(done.stderr.contains(says), "{args:?}: {}", done.stderr);
        assert!(done.stdout.is_empty(), "{args:?}: {}", done.stdout);
        let errors = done
            .stderr
            .lines()
            .filter(|line| line.starts_with("error"))
            .count();
        assert_eq!(errors, 1, "{args:?}: {}", done.stderr);
    }
}

/// Regression: a misspelt scheme was accepted.
#[test]
fn a_url_that_is_not_postgresql_is_refused_before_connecting() {
    let done = Tool::new(&["--dry-run"])
        .database("postgress://backfill@db.example/registry")
        .status(2)
        .run();
    done.stderr_has("starts with 'postgress://'");
}

/// A wrong password and a database that does not exist are configuration too.
#[tokio::test]
async fn a_wrong_database_or_password_is_a_configuration_error() {
    let db = TestDb::new().await;
    let no_such_database = db.url.replace(&db.name, "no_such_database");
    let done = Tool::new(&["--dry-run"])
        .database(&no_such_database)
        .status(2)
        .run();
    done.stderr_has("no_such_database");
}

/// `--help` prints the code's exit-code table, and README and RUNBOOK agree with it.
#[test]
fn help_readme_and_runbook_list_the_codes_exit_codes() {
    use agent_type_backfill::outcome::EXIT_CODES;
    let help = Tool::new(&["--help"]).run().stdout;
    let readme = std::fs::read_to_string("README.md").unwrap();
    let runbook = std::fs::read_to_string("RUNBOOK.md").unwrap();
    for (code, meaning) in EXIT_CODES {
        assert!(
            help.contains(&format!("{code:>3}  {meaning}")),
            "--help lacks {code}:\n{help}"
        );
        let row = format!("| {code} | {meaning} |");
        assert!(readme.contains(&row), "README.md lacks the row {row:?}");
        assert!(runbook.contains(&row), "RUNBOOK.md lacks the row {row:?}");
    }
}

/// Regression: the man page's `.TH` line carried the two-line `--version`, and a stray `rule:`
/// line rendered above NAME.
#[test]
fn the_man_page_title_is_one_line() {
    let man = Tool::new(&["man"]).status(0).run();
    let title = man
        .stdout
        .lines()
        .find(|line| line.starts_with(".TH"))
        .unwrap();
    assert!(title.contains(env!("CARGO_PKG_VERSION")), "{title}");
    let before_name = man.stdout.split(".SH NAME").next().unwrap();
    assert!(!before_name.contains("rule:"), "{before_name}");
}

/// Regression: rerunning the same `--plan` after it was applied listed every flip the first
/// apply wrote as "changed since plan, not written"; they are already written, by a run the log
/// names.
#[tokio::test]
async fn a_reviewed_plan_applied_again_says_its_flips_are_already_written_and_by_which_run() {
    let db = TestDb::seeded(10).await;
    let scratch = crate::common::Scratch::new();
    let plan = scratch.join("plan.json");
    let plan = plan.to_str().unwrap();
    Tool::new(&["--dry-run", "--plan-out", plan])
        .database(&db.url)
        .status(0)
        .run();
    let first = Tool::new(&["--apply", "--plan", plan, "--format", "json"])
        .database(&db.url)
        .status(0)
        .run();
    let run_id = first.run_id().unwrap();

    let again = Tool::new(&["--apply", "--plan", plan, "--format", "json"])
        .database(&db.url)
        .status(0)
        .run();
    let log = again.log();
    let reasons: Vec<&str> = log
        .skipped()
        .iter()
        .map(|skipped| skipped.reason.as_str())
        .collect();
    assert_eq!(reasons, ["already_written", "already_written"], "{log:?}");
    let summary = log.summary();
    assert_eq!(summary.skipped_by_reason["already_written"], 2);
    assert_eq!(summary.written, 0);
    let text = Tool::new(&["--apply", "--plan", plan])
        .database(&db.url)
        .run();
    assert!(
        text.stdout.contains(&format!(
            "buying -> sales  (written by run {run_id})  [already written, not written again]"
        )),
        "{}",
        text.stdout
    );
    assert_eq!(db.audit_rows().await.len(), 2, "nothing was written twice");
}

/// Regression: reverting a run a second time listed every element as a conflict without saying
/// that an earlier revert had already restored it.
#[tokio::test]
async fn a_second_revert_names_the_revert_that_already_restored_each_element() {
    let db = TestDb::seeded(10).await;
    let applied = Tool::new(&["--apply", "--format", "json"])
        .database(&db.url)
        .status(0)
        .run();
    let run_id = applied.run_id().unwrap();
    let reverted = Tool::new(&["revert", &run_id, "--apply", "--format", "json"])
        .database(&db.url)
        .status(0)
        .run();
    let revert_id = reverted.run_id().unwrap();

    let again = Tool::new(&["revert", &run_id, "--dry-run"])
        .database(&db.url)
        .status(0)
        .run();
    let conflicts: Vec<&str> = again
        .stdout
        .lines()
        .filter(|line| line.starts_with("  skipped "))
        .collect();
    assert_eq!(conflicts.len(), 2, "{}", again.stdout);
    for line in conflicts {
        assert!(
            line.contains(&format!("already restored by revert run {revert_id}")),
            "{line}"
        );
    }
}
