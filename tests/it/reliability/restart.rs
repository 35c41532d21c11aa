//! A server restart in the middle of an apply.

use super::*;

// ------------------------------------------------------------------------------------------------
// Server restart
// ------------------------------------------------------------------------------------------------

/// `EphemeralPostgres::restart` blocks (fast shutdown, start, wait until ready).
async fn restart(server: EphemeralPostgres) -> (EphemeralPostgres, Duration) {
    tokio::task::spawn_blocking(move || {
        let clock = Instant::now();
        let mut server = server;
        server.restart().unwrap();
        (server, clock.elapsed())
    })
    .await
    .unwrap()
}

const RESTART_FLAGS: [&str; 9] = [
    "--apply",
    "--format",
    "json",
    "--batch-size",
    "5",
    "--max-flips",
    NO_LIMIT,
    "--lock-timeout",
    "60s",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_apply_exits_1_with_a_clear_error_and_a_rerun_converges() {
    let clock = Instant::now();
    let mut postgres = tokio::task::spawn_blocking(EphemeralPostgres::start)
        .await
        .unwrap()
        .unwrap();
    let server = Server::of(&postgres);
    server.admin("CREATE DATABASE registry").await;
    let pool = server.pool("registry").await;
    MIGRATOR.run(&pool).await.unwrap();
    let fixture = fault_fixture(server.clone(), "registry", pool, 1_000, 100).await;

    // Mid-batch: restart while the tool's batch transaction is open (it waits on a row lock,
    // earlier batches committed), so its session dies under it: exit 1. While writing: restart
    // after a third of the audit rows, wherever the tool is (a restart between two batches may
    // be bridged by the pool reconnecting: exit 0 is accepted there, with the same checks).
    let mut outcomes = Vec::new();
    for (scenario, database) in [("mid-batch", "mid_batch"), ("while writing", "writing")] {
        server.copy("registry", database).await;
        let url = server.url(database);
        let pool = server.pool(database).await;
        let middle = fixture.flipped[fixture.flipped.len() / 2].0;
        // Mid-batch: the tool waits on the middle profile's row. While writing: the last one is
        // held only so the run cannot end before the restart; the restart ends the holder too.
        let held = match scenario {
            "mid-batch" => middle,
            _ => fixture.flipped[fixture.flipped.len() - 1].0,
        };
        let holder = hold_row_lock(&url, held).await;
        let mut run = Tool::new(&RESTART_FLAGS)
            .database(&url)
            .spawn_into(&fixture.scratch, database);
        let reached = match scenario {
            "mid-batch" => {
                wait_blocked(&pool, &mut run, "SELECT id, slug::text, agents::text").await
            }
            _ => wait_audit_rows(&pool, &mut run, i64::try_from(fixture.flips / 3).unwrap()).await,
        };
        assert!(reached, "{scenario}: the run ended before the restart");
        let rows_at_restart = audit_count(&pool).await;
        pool.close().await;
        let took;
        (postgres, took) = restart(postgres).await;
        drop(holder);
        let done = run.finish().await;
        let error = (done.status.code() != Some(0)).then(|| done.error_line());
        eprintln!(
            "[reliability] restart {scenario}: {rows_at_restart} audit rows at the restart \
             ({took:?} down), tool {}: {}",
            done.describe(),
            error.as_deref().unwrap_or("no error")
        );
        if scenario == "mid-batch" {
            assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
        }
        if let Some(error) = &error {
            assert_eq!(done.status.code(), Some(1), "{}", done.stderr);
            assert!(error.starts_with("error: could not "), "{error}");
        }
        let left = fixture
            .assert_recovers(database, &done, &format!("restart {scenario}"))
            .await;
        outcomes.push((scenario, rows_at_restart, left, done.describe()));
    }
    eprintln!(
        "[reliability] server restart: {} profiles, {} planned flips, --batch-size 5; \
         outcomes (scenario, audit rows at restart, rows left, exit) {outcomes:?}; \
         each re-run converged to the uninterrupted run; {:.1}s",
        fixture.seeded.len(),
        fixture.flips,
        clock.elapsed().as_secs_f64()
    );
    drop(fixture);
    tokio::task::spawn_blocking(move || postgres.stop())
        .await
        .unwrap()
        .unwrap();
}
