//! End-to-end runs of the built binary: stdout, stderr, exit code and table contents.

use crate::common;

use common::{wait_for_blocked_tool, Scratch, TestDb, Tool};

/// The test URL with a password that trust authentication ignores but the tool must never echo.
fn with_password(url: &str, password: &str) -> String {
    url.replacen("postgres@", &format!("postgres:{password}@"), 1)
}

#[test]
fn missing_database_url_is_a_usage_error_naming_it() {
    let done = Tool::new(&["--dry-run"]).status(2).run();
    done.stderr_has("DATABASE_URL");
    assert!(done.stdout.is_empty());
}

#[test]
fn mode_is_required_and_exclusive() {
    let neither = Tool::new(&[])
        .database("postgres://localhost/x")
        .status(2)
        .run();
    neither.stderr_has("--dry-run");
    let both = Tool::new(&["--dry-run", "--apply"])
        .database("postgres://localhost/x")
        .status(2)
        .run();
    both.stderr_has("cannot be used with");
}

#[test]
fn unparseable_url_is_a_usage_error_that_does_not_echo_it() {
    let url = "postgres://backfill:Sup3rSecret@db.internal:notaport/registry";
    let done = Tool::new(&["--dry-run"]).database(url).status(2).run();
    done.stderr_has("DATABASE_URL");
    assert!(!done.stderr.contains("Sup3rSecret"), "{}", done.stderr);
}

#[test]
fn unreachable_server_is_a_configuration_error_without_the_password() {
    let url = "postgres://backfill:Sup3rSecret@127.0.0.1:1/registry?connect_timeout=2";
    let done = Tool::new(&["--dry-run"]).database(url).status(2).run();
    done.stderr_has("could not connect to '127.0.0.1:1/registry'");
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
    let url = with_password(&db.url, "Sup3rSecret");
    let done = Tool::new(&["--dry-run"])
        .database(&url)
        .env("PGPASSWORD", "Sup3rSecret")
        .writes_nothing(&db)
        .status(0)
        .run();
    let stdout = &done.stdout;
    assert!(stdout.starts_with(&format!(
        "agent-type-backfill {}\n",
        agent_type_backfill::VERSION
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
        "flips found:                    2",
        "flips to write:                 2",
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
}

#[tokio::test]
async fn json_apply_then_threshold_abort_then_idempotent_rerun() {
    let db = TestDb::seeded(30).await;

    let aborted = Tool::new(&["--apply", "--max-flips", "1", "--format", "json"])
        .database(&db.url)
        .writes_nothing(&db)
        .status(3)
        .run();
    aborted.stderr_has("more than --max-flips 1: nothing was written");
    assert_eq!(aborted.log().flips().len(), 2);
    assert!(aborted.log().summary().aborted);

    let applied = Tool::new(&["--apply", "--format", "json"])
        .database(&db.url)
        .status(0)
        .run();
    let log = applied.log();
    assert_eq!(log.start().mode, "apply");
    assert_eq!(log.start().target.database, db.name);
    // Read as the typed log, the flip has every field of one (profile_id, index, url...).
    assert_eq!(log.flip_of("bidcliq").from, "buying");
    let summary = log.summary();
    assert_eq!(
        (summary.profiles_scanned, summary.profiles_changed),
        (41, 2)
    );
    assert_eq!((summary.flips, summary.malformed), (2, 5));
    assert_eq!(summary.mode.as_deref(), Some("apply"));
    assert_eq!(summary.run_id, Some(log.run_id()));
    assert!(!summary.aborted);
    let audited: i64 =
        sqlx::query_scalar("SELECT count(*) FROM type_reclassification_log WHERE run_id = $1")
            .bind(log.run_id())
            .fetch_one(&db.pool)
            .await
            .unwrap();
    assert_eq!(audited, 2);
    assert_eq!(db.agents_of("bidcliq").await[0]["type"], "sales");

    let rerun = Tool::new(&["--dry-run", "--format", "json"])
        .database(&db.url)
        .status(0)
        .run();
    assert_eq!(rerun.log().summary().flips, 0);
    assert_eq!(rerun.log().summary().run_id, None);
}

#[tokio::test]
async fn preflight_failure_exits_4() {
    let db = TestDb::new().await;
    sqlx::query("DROP TABLE agent_capabilities_snapshot")
        .execute(&db.pool)
        .await
        .unwrap();
    let done = Tool::new(&["--dry-run"]).database(&db.url).status(4).run();
    done.stderr_has("table 'agent_capabilities_snapshot' is missing");
    assert!(done.stdout.is_empty());
}

#[test]
fn rehearse_runs_the_whole_procedure_and_leaves_nothing_behind() {
    // Removed however the test ends: a failing assertion used to leave it behind.
    let scratch = common::Scratch::for_a_server();
    let done = Tool::new(&["rehearse", "--profiles", "50"])
        .env("TMPDIR", scratch.path())
        .status(0)
        .run();
    assert_eq!(done.stdout.matches("=== rehearsal ").count(), 3);
    assert!(done.stdout.contains(
        "rehearsal passed: the dry-run planned 2 flips, the apply wrote 2 with 2 audit rows"
    ));
    // It looks like a staging run: the RUNBOOK's least-privileged roles, and the crawler's
    // evidence beside each flip where the role may read it.
    assert!(
        done.stdout.contains("user=backfill_planner") && done.stdout.contains("user=backfill\n"),
        "{}",
        done.stdout
    );
    assert!(
        done.stdout
            .contains("buying -> sales  (probed 30h ago; crawler disagreed 5x since "),
        "{}",
        done.stdout
    );
    assert!(
        done.stdout
            .contains("crawler log: unavailable: no SELECT privilege on type_reclassification_log"),
        "{}",
        done.stdout
    );
    let leftovers = scratch.leftovers("");
    assert!(leftovers.is_empty(), "rehearse left {leftovers:?}");
}

/// A rehearsal that fails after its server started (here every transaction is read only, so
/// creating the registry fails) still stops the server and removes its directory.
#[test]
fn failed_rehearsal_leaves_nothing_behind() {
    use std::os::unix::fs::PermissionsExt;
    let scratch = common::Scratch::for_a_server();
    let real = agent_type_backfill::support::ephemeral::server_bin_dir().unwrap();
    let bin = scratch.join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(real.join("initdb"), bin.join("initdb")).unwrap();
    let postgres = bin.join("postgres");
    std::fs::write(
        &postgres,
        format!(
            "#!/bin/sh\nexec {:?} \"$@\" -c default_transaction_read_only=on\n",
            real.join("postgres")
        ),
    )
    .unwrap();
    std::fs::set_permissions(&postgres, PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::set_permissions(&bin, PermissionsExt::from_mode(0o755)).unwrap();

    let done = Tool::new(&["rehearse", "--profiles", "5"])
        .env("TMPDIR", scratch.path())
        .env("PG_BIN", bin.to_str().unwrap())
        .status(1)
        .run();
    done.stderr_has("error: could not create the rehearsal database");
    let leftovers = scratch.leftovers("bin");
    assert!(
        leftovers.is_empty(),
        "a failed rehearsal left {leftovers:?}"
    );
}

#[tokio::test]
async fn sigterm_during_apply_prints_the_summary_and_exits_143() {
    let db = TestDb::seeded(10).await;
    let mut holder = db.lock_profiles(&["bidcliq", "swivel"]).await;
    let run = Tool::new(&["--apply", "--lock-timeout", "30s"])
        .database(&db.url)
        .spawn();
    // The apply reached its write.
    wait_for_blocked_tool(&db).await;
    run.signal(libc::SIGTERM);
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    sqlx::query("COMMIT").execute(&mut holder).await.unwrap();

    let done = run.finish().await;
    let (stdout, stderr) = (&done.stdout, &done.stderr);
    assert_eq!(done.status.code(), Some(143), "{stdout}\n{stderr}");
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
    let blocker = db.hold_the_snapshot_table().await;
    let run = Tool::new(&[
        "--dry-run",
        "--lock-timeout",
        "60s",
        "--statement-timeout",
        "60s",
    ])
    .database(&db.url)
    .spawn();
    // The dry-run reached its server pass.
    wait_for_blocked_tool(&db).await;
    run.signal(libc::SIGINT);
    let done = run.finish().await;
    let (stdout, stderr) = (&done.stdout, &done.stderr);
    assert_eq!(done.status.code(), Some(130), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("plan interrupted by SIGINT after "),
        "{stdout}"
    );
    // Regression: it used to print an empty summary and tell a dry-run to "pick up the rest".
    // The log ends with how the run ended, and no counts of a plan that did not finish.
    for misleading in ["profiles scanned", "(none)", "rerun"] {
        assert!(!stdout.contains(misleading), "{misleading}: {stdout}");
    }
    assert!(
        stdout.contains(
            "\n  outcome:                        interrupted by SIGINT while planning: nothing was \
             written\n"
        ),
        "{stdout}"
    );
    assert!(
        stderr.contains("interrupted by SIGINT while planning: nothing was written"),
        "{stderr}"
    );
    assert!(!stderr.contains("rerun the same command"), "{stderr}");
    // Regression: the warning spoke of "the batch in flight" while nothing was being written.
    assert!(
        stderr.contains("cancelling the plan, nothing will be written"),
        "{stderr}"
    );
    assert!(!stderr.contains("batch in flight"), "{stderr}");

    // The lock is still held: only a cancel can have ended the tool's statement.
    let still_active = db.tool_statements_left().await;
    blocker.rollback().await.unwrap();
    assert_eq!(still_active, 0, "the planning statement outlived the tool");
}

#[tokio::test]
async fn expect_database_mismatch_exits_2_before_reading() {
    let db = TestDb::seeded(0).await;
    let done = Tool::new(&["--apply", "--expect-database", "registry_prod"])
        .database(&db.url)
        .status(2)
        .run();
    done.stderr_has(&format!(
        "connected to database '{}' but --expect-database is 'registry_prod'",
        db.name
    ));
    assert!(done.stdout.is_empty(), "nothing read, nothing reported");
    assert!(db.audit_rows().await.is_empty());

    Tool::new(&["--dry-run", "--expect-database", &db.name])
        .database(&db.url)
        .status(0)
        .run();
}

/// Regression: the planning pass is one statement over the whole table, so on a big registry it
/// is the statement `--statement-timeout` cuts; the operator must be told which flag to raise.
#[tokio::test]
async fn a_planning_pass_past_the_statement_timeout_names_the_flag_to_raise() {
    let db = TestDb::seeded(0).await;
    // The server pass waits on the held table until the statement timeout cancels it.
    let blocker = db.hold_the_snapshot_table().await;
    let url = db.url.clone();
    let done = tokio::task::spawn_blocking(move || {
        Tool::new(&[
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
    done.exits(1);
    assert!(
        done.stderr.contains(
            "error: planning stopped, nothing was written: counting the inferred types of the \
             snapshots failed 5 times; it ran past --statement-timeout '500ms': lower \
             --chunk-size (now 20000) or raise --statement-timeout"
        ),
        "{}",
        done.stderr
    );
    assert!(
        done.stdout.starts_with("agent-type-backfill"),
        "{}",
        done.stdout
    );
    // The kept log says how the run ended, even though the plan never finished.
    assert!(
        done.stdout.contains(
            "\n  outcome:                        failed: planning stopped, nothing was written: \
             counting the inferred types of the snapshots failed 5 times"
        ),
        "{}",
        done.stdout
    );
    assert!(!done.stdout.contains("profiles scanned"), "{}", done.stdout);
    // Regression: sqlx wraps the server's message in its own and the cause was printed twice.
    assert_eq!(
        done.error_line()
            .matches("canceling statement due to statement timeout")
            .count(),
        1,
        "{}",
        done.stderr
    );
}

#[tokio::test]
async fn transitions_not_allowed_are_listed_and_nothing_is_written() {
    let db = TestDb::seeded(5).await;
    let refused = Tool::new(&["--apply", "--allow-transition", "buyer:unknown"])
        .database(&db.url)
        .writes_nothing(&db)
        .status(3)
        .run();
    assert_eq!(
        refused.stdout.matches("\n  not allowed  ").count(),
        2,
        "{}",
        refused.stdout
    );
    refused.stderr_has("(buying:sales)");

    // The spelling every document uses, pasted through a real shell: no `>` to redirect.
    Tool::new(&["--apply", "--allow-transition", "buying:sales"])
        .database(&db.url)
        .status(0)
        .run();
    assert_eq!(db.audit_rows().await.len(), 2);
}

/// `--help` is part of the operator interface: a change to it must show up in review as a diff
/// of `tests/snapshots/`. Rewrite the snapshots with `UPDATE_SNAPSHOTS=1 cargo test --test it cli::help`.
#[test]
fn help_output_matches_the_reviewed_snapshots() {
    for (args, file) in [
        (&["--help"][..], "help.txt"),
        (&["rehearse", "--help"][..], "help-rehearse.txt"),
    ] {
        let done = Tool::new(args).status(0).run();
        let path = std::path::Path::new("tests/snapshots").join(file);
        if std::env::var_os("UPDATE_SNAPSHOTS").is_some() {
            std::fs::write(&path, &done.stdout).unwrap();
        }
        let reviewed = std::fs::read_to_string(&path).unwrap_or_default();
        assert!(
            reviewed == done.stdout,
            "{args:?} changed; review and run UPDATE_SNAPSHOTS=1 cargo test --test it cli::help:\n{}",
            done.stdout
        );
    }
}

#[test]
fn version_names_the_commit_and_completions_and_man_page_render() {
    let version = Tool::new(&["--version"]).status(0).run();
    assert!(version.stdout.starts_with(&format!(
        "agent-type-backfill {} (git ",
        env!("CARGO_PKG_VERSION")
    )));
    assert!(
        version.stdout.ends_with(
            "\nrule: adcp resolveAgentTypes at 4439b18 (brand, rights, measurement, governance, \
             creative, sales, buying, signals, unknown)\n"
        ),
        "{}",
        version.stdout
    );
    for shell in ["bash", "zsh", "fish"] {
        let done = Tool::new(&["completions", shell]).status(0).run();
        assert!(
            done.stdout.contains("max-flips"),
            "{shell} completions lack a flag"
        );
    }
    let man = Tool::new(&["man"]).status(0).run();
    assert!(man.stdout.contains(".TH agent-type-backfill 1"));
    assert!(man.stdout.contains("expect\\-database"), "{}", man.stdout);
}

/// Regression: Ctrl-C during an apply used to retry a lock-waiting batch for all its attempts.
/// After the signal no new attempt starts; the one in flight ends at `--lock-timeout`.
#[tokio::test]
async fn sigint_while_a_batch_waits_on_a_lock_starts_no_new_attempt() {
    let db = TestDb::seeded(10).await;
    let mut holder = db.lock_profiles(&["bidcliq"]).await;
    // The batch rolls back whole.
    let run = Tool::new(&["--apply", "--lock-timeout", "1s", "--write-attempts", "20"])
        .database(&db.url)
        .writes_nothing(&db)
        .spawn();
    // The apply reached its write.
    wait_for_blocked_tool(&db).await;
    let signalled = std::time::Instant::now();
    run.signal(libc::SIGINT);
    let done = run.finish().await;
    let waited = signalled.elapsed();
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    let (stdout, stderr) = (&done.stdout, &done.stderr);
    assert_eq!(done.status.code(), Some(130), "{stdout}\n{stderr}");
    // 20 attempts at 1 s each with backoff would take well over a minute.
    assert!(
        waited < std::time::Duration::from_secs(5),
        "took {waited:?}: {stderr}"
    );
    assert!(stdout.contains("interrupted by SIGINT"), "{stdout}");
}

/// Regression: `--plan-out` with `--apply` wrote every flip unreviewed (the operator meant
/// `--plan`). It is a usage error now: nothing read, nothing written, no file.
#[tokio::test]
async fn plan_out_with_apply_is_a_usage_error() {
    let db = TestDb::seeded(5).await;
    let scratch = Scratch::new();
    let path = scratch.join("plan.json");
    let done = Tool::new(&["--apply", "--plan-out", path.to_str().unwrap()])
        .database(&db.url)
        .writes_nothing(&db)
        .status(2)
        .run();
    done.stderr_has("--plan-out");
    assert!(done.stdout.is_empty(), "{}", done.stdout);
    assert!(!path.exists());
}

/// `agent-type-backfill man | head` used to exit 1 with "Broken pipe". A reader that has what it
/// wants ends the program quietly, as ripgrep does.
#[test]
fn a_closed_stdout_ends_the_program_quietly() {
    for args in [&["man"][..], &["completions", "bash"][..]] {
        let mut child = std::process::Command::new(common::BIN)
            .args(args)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        assert_eq!(
            output.status.code(),
            Some(0),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert!(
            output.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

/// The Markdown log says what the text log says, as tables a ticket renders.
#[tokio::test]
async fn markdown_log_has_the_header_flips_and_summary_as_tables() {
    let db = TestDb::seeded(5).await;
    let done = Tool::new(&["--dry-run", "--format", "markdown"])
        .database(&db.url)
        .status(0)
        .run();
    let md = &done.stdout;
    assert!(md.starts_with("## agent-type-backfill run log\n"), "{md}");
    assert!(md.contains("| rule | adcp resolveAgentTypes at 4439b18 (brand, rights, measurement, governance, creative, sales, buying, signals, unknown) |"), "{md}");
    assert!(md.contains("\n### Flips\n\n| profile | url | from | to | probe | crawler |\n| --- | --- | --- | --- | --- | --- |\n"), "{md}");
    assert!(
        md.contains("| bidcliq | https://bidcliq.example/mcp | buying | sales | probed 30h ago |"),
        "{md}"
    );
    assert!(md.contains("| flips found | 2 |"), "{md}");
    assert!(md.contains("\n### Transitions\n\n| from | to | flips |\n| --- | --- | --- |\n| buying | sales | 2 |\n"), "{md}");

    Tool::new(&["--apply", "--format", "json"])
        .database(&db.url)
        .status(0)
        .run();
    let history = Tool::new(&["history", "--format", "markdown"])
        .database(&db.url)
        .status(0)
        .run();
    assert!(
        history
            .stdout
            .contains("### Runs\n\n| run id | first change |"),
        "{}",
        history.stdout
    );
    let text = Tool::new(&["history"]).database(&db.url).run();
    assert!(text.stdout.ends_with("\n1 run\n"), "{}", text.stdout);
}

/// Flips, held and skipped lines are listed by profile, then element, whatever order the
/// database returns them in, so staging and prod logs diff cleanly; the summary counts each
/// transition.
#[tokio::test]
async fn flips_are_listed_by_profile_then_index_and_counted_per_transition() {
    use agent_type_backfill::support::seed::{self, NewProfile, NewSnapshot};
    use serde_json::json;
    let db = TestDb::new().await;
    // Ids in the opposite order of the slugs, so id order is not log order.
    let profiles: Vec<NewProfile> = ["zulu", "mike", "alpha"]
        .iter()
        .enumerate()
        .map(|(position, slug)| NewProfile {
            id: uuid::Uuid::from_u128(position as u128 + 1),
            slug: (*slug).to_owned(),
            display_name: (*slug).to_owned(),
            agents: Some(json!([
                {"url": format!("https://{slug}.example/b"), "type": "buying"},
                {"url": format!("https://{slug}.example/a"), "type": "buyer"},
            ])),
        })
        .collect();
    let snapshots: Vec<NewSnapshot> = ["zulu", "mike", "alpha"]
        .iter()
        .map(|slug| NewSnapshot::new(&format!("https://{slug}.example/b"), Some("sales")))
        .collect();
    seed::insert(&db.pool, &profiles, &snapshots).await.unwrap();
    let text = Tool::new(&["--dry-run"]).database(&db.url).status(0).run();
    let lines: Vec<&str> = text
        .stdout
        .lines()
        .filter(|line| line.contains(".example/"))
        .collect();
    let order: Vec<String> = lines
        .iter()
        .map(|line| {
            line.split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    assert_eq!(
        order,
        [
            "alpha https://alpha.example/b",
            "alpha https://alpha.example/a",
            "mike https://mike.example/b",
            "mike https://mike.example/a",
            "zulu https://zulu.example/b",
            "zulu https://zulu.example/a",
        ],
        "{}",
        text.stdout
    );
    assert!(
        text.stdout
            .contains("\ntransitions:\n  buyer -> unknown  3\n  buying -> sales  3\n"),
        "{}",
        text.stdout
    );
    let json = Tool::new(&["--dry-run", "--format", "json"])
        .database(&db.url)
        .run();
    let log = json.log();
    let flips: Vec<String> = log
        .flips()
        .into_iter()
        .map(|flip| format!("{}{}", flip.profile, flip.index))
        .collect();
    assert_eq!(
        flips,
        ["alpha0", "alpha1", "mike0", "mike1", "zulu0", "zulu1"]
    );
    assert_eq!(
        log.summary().transitions,
        [
            ("buyer->unknown".to_owned(), 3),
            ("buying->sales".to_owned(), 3)
        ]
        .into()
    );
    assert_eq!(log.summary().held, 0);
}

/// Regression: `--plan-max-age 1s` reported "the plan is 0m old, more than 0m". Durations in the
/// message show the difference.
#[tokio::test]
async fn a_plan_older_than_plan_max_age_says_both_ages_precisely() {
    let db = TestDb::seeded(5).await;
    let scratch = common::Scratch::new();
    let path = scratch.join("plan.json");
    let path = path.to_str().unwrap();
    Tool::new(&["--dry-run", "--plan-out", path])
        .database(&db.url)
        .status(0)
        .run();
    tokio::time::sleep(std::time::Duration::from_millis(2_100)).await;
    let stale = Tool::new(&["--apply", "--plan", path, "--plan-max-age", "1s"])
        .database(&db.url)
        .writes_nothing(&db)
        .status(2)
        .run();
    let error = stale.error_line();
    assert!(
        error.contains("old, more than --plan-max-age 1.0s"),
        "{error}"
    );
    assert!(!error.contains("the plan is 0m"), "{error}");
    let age: f64 = error
        .split("the plan is ")
        .nth(1)
        .and_then(|rest| rest.split("s old").next())
        .and_then(|age| age.parse().ok())
        .unwrap_or_else(|| panic!("no age in seconds: {error}"));
    assert!((2.0..10.0).contains(&age), "{error}");
}
