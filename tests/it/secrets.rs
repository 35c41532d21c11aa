//! The password in the database URL never reaches any output: stdout in both formats, stderr,
//! the plan file or the audit rows, for every command that takes a URL, on success and on error.
//! Every output is searched for the secret itself, in every format: a full URL in the JSON
//! `start` event once passed checks that read the text log only and searched the plan file for
//! the word "password".

use crate::common;

use common::{Finished, Scratch, TestDb, Tool};

/// Percent-encoded in the URL; the tool decodes it before sending it, so both spellings are
/// searched for. Trust authentication ignores it, which is why every command still connects.
const SECRET_IN_URL: &str = "Qz7%40Vault-9x";
const SECRET: &str = "Qz7@Vault-9x";

/// Runs the binary with `DATABASE_URL=url` (or none) and debug logging, so a diagnostic that
/// quotes the URL shows up too.
fn tool(argv: &[&str], url: Option<&str>) -> Finished {
    let mut tool = Tool::new(argv).env("RUST_LOG", "agent_type_backfill=debug,sqlx=debug");
    if let Some(url) = url {
        tool = tool.database(url);
    }
    tool.run()
}

fn assert_no_secret(what: &str, text: &str) {
    for secret in [SECRET, SECRET_IN_URL] {
        assert!(
            !text.contains(secret),
            "{what} holds the password {secret:?}:\n{text}"
        );
    }
}

/// Runs one command, checks its exit code, and searches both streams for the secret.
fn checked(argv: &[&str], url: Option<&str>, code: i32) -> Finished {
    let done = tool(argv, url);
    let what = argv.join(" ");
    assert_eq!(
        done.code(),
        code,
        "{what}\n{}\n{}",
        done.stdout,
        done.stderr
    );
    assert_no_secret(&format!("stdout of `{what}`"), &done.stdout);
    assert_no_secret(&format!("stderr of `{what}`"), &done.stderr);
    done
}

fn with_secret(url: &str) -> String {
    url.replacen("postgres@", &format!("postgres:{SECRET_IN_URL}@"), 1)
}

#[tokio::test]
async fn the_password_never_appears_in_any_output_of_any_command() {
    let db = TestDb::seeded(10).await;
    let url = with_secret(&db.url);
    assert!(
        url.contains(SECRET_IN_URL),
        "the test URL carries the secret"
    );
    let scratch = Scratch::new();
    let plan = &scratch.arg("plan.json");

    for format in ["text", "json"] {
        let dry = checked(&["--dry-run", "--format", format], Some(&url), 0);
        assert!(dry.stdout.contains("bidcliq"), "{}", dry.stdout);
        // The URL given as a flag instead of the environment.
        checked(
            &["--dry-run", "--format", format, "--database-url", &url],
            None,
            0,
        );
        checked(
            &["--dry-run", "--format", format, "--plan-out", plan],
            Some(&url),
            0,
        );
        assert_no_secret("the plan file", &std::fs::read_to_string(plan).unwrap());
        // Threshold abort and --expect-database mismatch: the error paths after connecting.
        checked(
            &["--apply", "--format", format, "--max-flips", "1"],
            Some(&url),
            3,
        );
        checked(
            &[
                "--dry-run",
                "--format",
                format,
                "--expect-database",
                "elsewhere",
            ],
            Some(&url),
            2,
        );
        checked(&["history", "--format", format], Some(&url), 0);
        checked(
            &["history", "atb-no-such-run", "--format", format],
            Some(&url),
            2,
        );
        checked(
            &["revert", "atb-no-such-run", "--dry-run", "--format", format],
            Some(&url),
            2,
        );
    }

    let apply = checked(
        &["--apply", "--plan", plan, "--format", "json"],
        Some(&url),
        0,
    );
    let run_id = (apply.log().summary().run_id.clone()).expect("the apply wrote under a run id");
    for format in ["text", "json"] {
        checked(&["history", &run_id, "--format", format], Some(&url), 0);
        checked(
            &["revert", &run_id, "--dry-run", "--format", format],
            Some(&url),
            0,
        );
    }
    checked(
        &["revert", &run_id, "--apply", "--format", "text"],
        Some(&url),
        0,
    );
    checked(&["--apply", "--format", "text"], Some(&url), 0);

    let audit = db.audit_rows().await;
    assert_eq!(
        audit.len(),
        6,
        "apply, revert and re-apply each wrote 2 rows"
    );
    assert_no_secret("the tables", db.dump().await.rows());
}

#[test]
fn the_password_never_appears_when_the_connection_fails() {
    // Nothing listens on port 1; a host name that does not resolve fails earlier still.
    let unreachable = [
        format!("postgres://backfill:{SECRET_IN_URL}@127.0.0.1:1/registry?connect_timeout=2"),
        format!(
            "postgres://backfill:{SECRET_IN_URL}@no-such-host.invalid/registry?connect_timeout=2"
        ),
    ];
    for url in &unreachable {
        for argv in [
            &["--dry-run", "--format", "json"][..],
            &["--apply", "--format", "text"],
            &["history", "--format", "json"],
            &["revert", "atb-x", "--apply", "--format", "json"],
        ] {
            let done = checked(argv, Some(url), 2);
            done.stderr_has("could not connect");
        }
    }
    // An unparseable URL (bad port) is a usage error that must not echo it either.
    let unparseable = format!("postgres://backfill:{SECRET_IN_URL}@db:notaport/registry");
    for argv in [
        &["--dry-run", "--format", "json"][..],
        &["history"],
        &["revert", "atb-x", "--dry-run"],
    ] {
        checked(argv, Some(&unparseable), 2);
    }
    // A bad flag next to the URL given as a flag: clap's message must not quote the URL.
    let done = tool(
        &[
            "--dry-run",
            "--max-flips",
            "many",
            "--database-url",
            &unreachable[0],
        ],
        None,
    );
    done.exits(2);
    assert_no_secret("a usage error", &done.stderr);
}
