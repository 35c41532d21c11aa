//! Lock and statement timeouts: retried or reported, never half applied.

use super::*;

// ------------------------------------------------------------------------------------------------
// Lock and statement timeouts
// ------------------------------------------------------------------------------------------------

/// Flags for a timeout case: `--batch-size 10` and no flip limit, then `extra`.
fn timeout_flags<'a>(extra: &[&'a str]) -> Vec<&'a str> {
    apply_flags("10", extra)
}

impl FaultFixture {
    /// The profiles the tool writes in the same batch of `batch_size` as `profile`, and their
    /// planned flips.
    fn batch_of(&self, profile: Uuid, batch_size: usize) -> (BTreeSet<String>, usize) {
        let batch = self
            .flipped
            .chunks(batch_size)
            .find(|batch| batch.iter().any(|(id, _)| *id == profile))
            .unwrap();
        (
            batch.iter().map(|(id, _)| id.to_string()).collect(),
            batch.iter().map(|(_, flips)| flips).sum(),
        )
    }

    async fn fresh_copy(&self, name: &str) -> (String, String, PgPool) {
        let database = format!("{}_{name}", self.template);
        self.server.copy(&self.template, &database).await;
        let url = self.server.url(&database);
        let pool = self.server.pool(&database).await;
        (database, url, pool)
    }

    async fn run(&self, url: &str, flags: &[&str], tag: &str) -> Finished {
        Tool::new(flags)
            .database(url)
            .spawn_into(&self.scratch, tag)
            .finish()
            .await
    }
}

/// The profiles and count of `not_written_timeout` events in a run log.
fn timed_out(done: &Finished) -> (BTreeSet<String>, usize) {
    let skipped: Vec<&log::Skipped> = done
        .log()
        .skipped()
        .into_iter()
        .filter(|skipped| skipped.reason == "not_written_timeout")
        .collect();
    (
        skipped
            .iter()
            .map(|skipped| skipped.profile_id.to_string())
            .collect(),
        skipped.len(),
    )
}

fn assert_reported_not_written(done: &Finished, flips: usize, context: &str) {
    assert_eq!(done.status.code(), Some(1), "{context}: {}", done.stderr);
    let error = done.error_line();
    assert!(
        error.contains(&format!(
            "{flips} planned flips were not written because their batches kept hitting lock or \
             statement timeouts"
        )),
        "{context}: {error}"
    );
    // Regression: the error said "everything else was written" while the summary said nothing
    // was. They must agree.
    let summary = done.log().summary();
    let written = summary.written;
    let agrees = if written == 0 {
        error.contains("; nothing was written: rerun")
    } else {
        error.contains(&format!(
            "; the other {written} were written under run id '"
        ))
    };
    assert!(agrees, "{context}: summary wrote {written}: {error}");
    assert_eq!(
        summary.skipped_by_reason.get("not_written_timeout"),
        Some(&u64::try_from(flips).unwrap()),
        "{context}: {summary:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeouts_are_retried_or_reported_and_never_half_applied() {
    let clock = Instant::now();
    let (server, template, pool) = template_database().await;
    let fixture = fault_fixture(server, &template, pool, 500, 200).await;
    let locked = fixture.flipped[fixture.flipped.len() / 2].0;
    let (batch_profiles, batch_flips) = fixture.batch_of(locked, 10);
    let flags = timeout_flags(&["--lock-timeout", "100ms", "--write-attempts", "2"]);

    // A profile locked for the whole run: its batch times out twice, is rolled back whole and
    // reported; every other batch is written.
    let (database, url, pool) = fixture.fresh_copy("row_lock").await;
    let holder = hold_row_lock(&url, locked).await;
    let done = fixture.run(&url, &flags, "row-lock").await;
    assert_reported_not_written(&done, batch_flips, "row lock held");
    assert_eq!(timed_out(&done), (batch_profiles.clone(), batch_flips));
    assert_eq!(
        usize::try_from(audit_count(&pool).await).unwrap(),
        fixture.flips - batch_flips,
        "every other batch is written"
    );
    holder.close().await.unwrap();
    pool.close().await;
    fixture
        .assert_recovers(&database, &done, "row lock held")
        .await;
    eprintln!(
        "[reliability] lock timeout, row held all run: {}, {batch_flips} flips of {} profiles \
         reported not_written_timeout, {} written; re-run converged",
        done.describe(),
        batch_profiles.len(),
        fixture.flips - batch_flips
    );

    // The audit table locked: every INSERT times out, the first write of its transaction, so the
    // UPDATE never runs; nothing may stay behind.
    let (database, url, pool) = fixture.fresh_copy("audit_lock").await;
    let holder = hold_audit_table(&url).await;
    let flags_one_batch = [
        "--apply",
        "--format",
        "json",
        "--batch-size",
        "1000",
        "--max-flips",
        NO_LIMIT,
        "--lock-timeout",
        "100ms",
        "--write-attempts",
        "2",
    ];
    let done = fixture.run(&url, &flags_one_batch, "audit-lock").await;
    assert_reported_not_written(&done, fixture.flips, "audit table locked");
    assert_eq!(timed_out(&done).1, fixture.flips);
    holder.close().await.unwrap();
    assert!(
        load_agents(&pool).await == fixture.seeded,
        "the rolled-back batch left no profile change"
    );
    assert_eq!(audit_count(&pool).await, 0);
    pool.close().await;
    fixture
        .assert_recovers(&database, &done, "audit table locked")
        .await;
    eprintln!(
        "[reliability] lock timeout on the audit INSERT after the UPDATE: {}, all {} flips \
         reported not_written_timeout, nothing written; re-run converged",
        done.describe(),
        fixture.flips
    );

    // A lock released within the retry budget: retried, everything written.
    let (database, url, pool) = fixture.fresh_copy("released").await;
    let holder = hold_row_lock(&url, locked).await;
    let flags = timeout_flags(&["--lock-timeout", "100ms", "--write-attempts", "5"]);
    let mut run = Tool::new(&flags)
        .database(&url)
        .spawn_into(&fixture.scratch, "released");
    assert!(wait_blocked(&pool, &mut run, "SELECT id, slug::text, agents::text").await);
    tokio::time::sleep(Duration::from_millis(250)).await;
    holder.close().await.unwrap();
    let done = run.finish().await;
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert_eq!(done.log().summary().written, count(fixture.flips));
    assert!(done.stderr.contains("retrying"), "{}", done.stderr);
    pool.close().await;
    fixture
        .assert_recovers(&database, &done, "lock released")
        .await;
    eprintln!(
        "[reliability] lock timeout, row released 250 ms after the tool blocked: retried, {}, all {} flips \
         written; {:.1}s",
        done.describe(),
        fixture.flips,
        clock.elapsed().as_secs_f64()
    );
}

/// A trigger that makes the `UPDATE` of `profile` sleep 1 s, the first `times` times.
async fn slow_updates(pool: &PgPool, profile: Uuid, times: u32) {
    sqlx::raw_sql(&format!(
        "CREATE SEQUENCE slow_updates; \
         CREATE FUNCTION slow_update() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN \
             IF NEW.id = '{profile}' AND nextval('slow_updates') <= {times} THEN \
                 PERFORM pg_sleep(1); \
             END IF; \
             RETURN NEW; \
         END $$; \
         CREATE TRIGGER slow_update BEFORE UPDATE ON member_profiles \
             FOR EACH ROW EXECUTE FUNCTION slow_update();"
    ))
    .execute(pool)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statement_timeouts_are_retried_or_reported_and_never_half_applied() {
    let clock = Instant::now();
    let (server, template, pool) = template_database().await;
    let fixture = fault_fixture(server, &template, pool, 500, 200).await;
    let slow = fixture.flipped[fixture.flipped.len() / 2].0;
    let (batch_profiles, batch_flips) = fixture.batch_of(slow, 10);

    // Slow once: the batch's UPDATE is cancelled, the batch rolled back and retried.
    let (database, url, pool) = fixture.fresh_copy("slow_once").await;
    slow_updates(&pool, slow, 1).await;
    let flags = timeout_flags(&["--statement-timeout", "300ms"]);
    let done = fixture.run(&url, &flags, "slow-once").await;
    assert_eq!(done.status.code(), Some(0), "{}", done.stderr);
    assert_eq!(done.log().summary().written, count(fixture.flips));
    assert!(done.stderr.contains("retrying"), "{}", done.stderr);
    pool.close().await;
    fixture.assert_recovers(&database, &done, "slow once").await;
    eprintln!(
        "[reliability] statement timeout once: retried, {}, all {} flips written",
        done.describe(),
        fixture.flips
    );

    // Slow every time: reported after the last attempt, the rest written.
    let (database, url, pool) = fixture.fresh_copy("slow_always").await;
    slow_updates(&pool, slow, 1_000).await;
    let flags = timeout_flags(&["--statement-timeout", "300ms", "--write-attempts", "2"]);
    let done = fixture.run(&url, &flags, "slow-always").await;
    assert_reported_not_written(&done, batch_flips, "slow always");
    assert_eq!(timed_out(&done), (batch_profiles, batch_flips));
    assert_eq!(
        usize::try_from(audit_count(&pool).await).unwrap(),
        fixture.flips - batch_flips
    );
    sqlx::query("DROP TRIGGER slow_update ON member_profiles")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    fixture
        .assert_recovers(&database, &done, "slow always")
        .await;
    eprintln!(
        "[reliability] statement timeout every time: {}, {batch_flips} flips reported \
         not_written_timeout, {} written; re-run converged",
        done.describe(),
        fixture.flips - batch_flips
    );

    // A 1 ms statement timeout on everything: whatever fails, nothing is half-applied.
    let mut outcomes = Vec::new();
    for attempt in 0..3 {
        let (database, url, pool) = fixture.fresh_copy(&format!("one_ms_{attempt}")).await;
        let flags = timeout_flags(&["--statement-timeout", "1ms", "--write-attempts", "2"]);
        let done = fixture
            .run(&url, &flags, &format!("one-ms-{attempt}"))
            .await;
        let written = audit_count(&pool).await;
        pool.close().await;
        let error = match done.status.code() {
            Some(0) => None,
            Some(1) => Some(done.error_line()),
            _ => panic!(
                "--statement-timeout 1ms: {} {}",
                done.describe(),
                done.stderr
            ),
        };
        fixture
            .assert_recovers(&database, &done, "--statement-timeout 1ms")
            .await;
        outcomes.push((done.describe(), written, error));
    }
    eprintln!(
        "[reliability] --statement-timeout 1ms, 3 runs (exit, audit rows, error): {outcomes:?}; \
         each re-run converged; {:.1}s",
        clock.elapsed().as_secs_f64()
    );
}
