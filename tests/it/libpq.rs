//! libpq conventions: the password file read as libpq reads it (escapes, wildcards, first match,
//! permissions, PGPASSFILE), against a role the server really asks a password of; and a Unix
//! socket target shown as its socket directory.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use crate::common::deployment::{registry_on, tool};
use crate::common::Scratch;
use agent_type_backfill::support::ephemeral::EphemeralPostgres;

/// A password with both characters a password file must escape.
const PASSWORD: &str = r"se:cr\et";
const ESCAPED: &str = r"se\:cr\\et";

/// A throwaway server whose `pg_hba.conf` demands a SCRAM password of `atb_pw` over TCP and the
/// socket, with a seeded `registry` that role may read.
async fn server_with_password_role() -> EphemeralPostgres {
    let server = EphemeralPostgres::start().unwrap();
    let hba = server.root().join("data/pg_hba.conf");
    let rules = std::fs::read_to_string(&hba).unwrap();
    std::fs::write(
        &hba,
        format!(
            "local all atb_pw scram-sha-256\nhost all atb_pw 127.0.0.1/32 scram-sha-256\n{rules}"
        ),
    )
    .unwrap();
    let pool = registry_on(&server, 5).await;
    for statement in [
        "SELECT pg_reload_conf()".to_owned(),
        format!("CREATE ROLE atb_pw LOGIN PASSWORD '{PASSWORD}'"),
        "GRANT SELECT ON member_profiles, agent_capabilities_snapshot TO atb_pw".to_owned(),
    ] {
        sqlx::query(&statement).execute(&pool).await.unwrap();
    }
    pool.close().await;
    server
}

fn write_private(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test]
async fn the_password_file_is_read_as_libpq_reads_it() {
    let server = server_with_password_role().await;
    let port = server.port();
    let url = format!("postgres://atb_pw@127.0.0.1:{port}/registry?sslmode=disable");
    let scratch = Scratch::new();
    let dir = &scratch.0;
    let file = dir.join("pgpass");
    let file_arg = file.to_str().unwrap();

    // Comments and lines for others first; the escaped line is the first that matches.
    let good = format!(
        "# registry\n127.0.0.1:{port}:registry:someone_else:nope\n\
         127.0.0.1:{port}:registry:atb_pw:{ESCAPED}\n*:*:*:atb_pw:wrong\n"
    );
    write_private(&file, &good, 0o600);
    let done = tool(&url, &["--dry-run"], &[("PGPASSFILE", file_arg)]);
    assert_eq!(done.code(), 0, "escaped password: {}", done.stderr);

    // Wildcards match any host, port and database; the first matching line wins.
    write_private(
        &file,
        &format!("*:*:*:atb_pw:{ESCAPED}\n127.0.0.1:{port}:registry:atb_pw:wrong\n"),
        0o600,
    );
    let done = tool(&url, &["--dry-run"], &[("PGPASSFILE", file_arg)]);
    assert_eq!(done.code(), 0, "wildcard line: {}", done.stderr);
    write_private(
        &file,
        &format!("*:*:*:atb_pw:wrong\n127.0.0.1:{port}:registry:atb_pw:{ESCAPED}\n"),
        0o600,
    );
    let done = tool(&url, &["--dry-run"], &[("PGPASSFILE", file_arg)]);
    assert_eq!(done.code(), 2, "the first match wins: {}", done.stderr);
    done.stderr_has("password authentication failed")
        .stderr_has(&format!("the password came from the line of '{file_arg}'"));
    assert!(!done.stderr.contains(PASSWORD), "{}", done.stderr);

    // A file the group or others may read (or write) is ignored, with libpq's one warning.
    for mode in [0o640, 0o620, 0o610, 0o604, 0o602, 0o644, 0o660] {
        write_private(&file, &good, mode);
        let done = tool(&url, &["--dry-run"], &[("PGPASSFILE", file_arg)]);
        assert_eq!(done.code(), 2, "mode {mode:o}: {}", done.stderr);
        assert_eq!(
            done.stderr.matches("has group or world access").count(),
            1,
            "mode {mode:o}: one warning: {}",
            done.stderr
        );
        assert!(
            done.stderr.contains("no line of"),
            "mode {mode:o}: the hint says no password was found: {}",
            done.stderr
        );
    }
    // Owner-only modes narrower than 0600 are private too.
    write_private(&file, &good, 0o400);
    let done = tool(&url, &["--dry-run"], &[("PGPASSFILE", file_arg)]);
    assert_eq!(done.code(), 0, "mode 400: {}", done.stderr);
    assert!(!done.stderr.contains("group or world"), "{}", done.stderr);

    // ~/.pgpass when PGPASSFILE is unset; PGPASSWORD, when set, wins over the file.
    let home = dir.join("home");
    std::fs::create_dir_all(&home).unwrap();
    write_private(&home.join(".pgpass"), &good, 0o600);
    let home_arg = home.to_str().unwrap();
    let done = tool(&url, &["--dry-run"], &[("HOME", home_arg)]);
    assert_eq!(done.code(), 0, "~/.pgpass: {}", done.stderr);
    let done = tool(
        &url,
        &["--dry-run"],
        &[("HOME", home_arg), ("PGPASSWORD", "wrong")],
    );
    assert_eq!(done.code(), 2, "PGPASSWORD first: {}", done.stderr);
    // libpq reads PGPASSFILE alone when it is set, never ~/.pgpass as well.
    let done = tool(
        &url,
        &["--dry-run"],
        &[("HOME", home_arg), ("PGPASSFILE", "/nonexistent/pgpass")],
    );
    assert_eq!(done.code(), 2, "no fallback to ~/.pgpass: {}", done.stderr);

    // Over the socket, a line names the socket directory as its host.
    let socket = server.root().to_str().unwrap().to_owned();
    write_private(
        &file,
        &format!(
            "{}:{port}:registry:atb_pw:{ESCAPED}\n",
            socket.replace(':', r"\:")
        ),
        0o600,
    );
    let socket_url = format!("postgres:///registry?host={socket}&port={port}&user=atb_pw");
    let done = tool(&socket_url, &["--dry-run"], &[("PGPASSFILE", file_arg)]);
    assert_eq!(done.code(), 0, "socket line: {}", done.stderr);
}

#[tokio::test]
async fn a_socket_target_is_shown_as_its_socket_directory() {
    let server = EphemeralPostgres::start().unwrap();
    registry_on(&server, 5).await.close().await;
    let socket = server.root().to_str().unwrap().to_owned();
    let port = server.port();
    let url = format!("postgres:///registry?host={socket}&port={port}&user=postgres");
    let scratch = Scratch::new();
    let dir = &scratch.0;
    let plan = dir.join("plan.json");

    let text = tool(&url, &["--dry-run"], &[]);
    text.exits(0);
    assert!(
        text.stdout.contains(&format!(
            "target:      host={socket} port={port} database=registry user=postgres"
        )),
        "{}",
        text.stdout
    );
    let json = tool(
        &url,
        &[
            "--dry-run",
            "--format",
            "json",
            "--plan-out",
            plan.to_str().unwrap(),
        ],
        &[],
    );
    json.exits(0);
    assert_eq!(json.log().start().target.host, socket);
    let written: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&plan).unwrap()).unwrap();
    assert_eq!(written["target"]["host"], socket.as_str());
    // The plan applies over the same socket.
    let apply = tool(&url, &["--apply", "--plan", plan.to_str().unwrap()], &[]);
    apply.exits(0);

    let missing = dir.join("no-server-here");
    let missing_url = format!(
        "postgres:///registry?host={}&port={port}&user=postgres",
        missing.display()
    );
    let done = tool(&missing_url, &["--dry-run"], &[]);
    done.exits(2);
    done.stderr_has(&format!(
        "could not connect to '{}/.s.PGSQL.{port}/registry'",
        missing.display()
    ));
    assert!(!done.stderr.contains("localhost"), "{}", done.stderr);
}
