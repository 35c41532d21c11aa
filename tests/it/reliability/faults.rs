//! SIGKILL of the binary and termination of its sessions at 20 moments each: the flip/audit
//! invariant holds and a rerun converges to one uninterrupted run.

use super::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    Kill,
    Terminate,
}

#[derive(Debug, Clone, Copy)]
enum Moment {
    /// Milliseconds after the process started: connecting, preflight or planning.
    /// (For the timed moments the test holds the last flipped profile's row until the fault.)
    AfterMs(u64),
    /// Once the audit table holds this many rows: between or inside write batches.
    AfterAuditRows(i64),
    /// While the tool waits for the row lock the test holds on this flipped profile (by position).
    WaitingForRowLock(usize),
    /// In the batch of this flipped profile (by position), while the tool's `UPDATE` of the
    /// profiles waits on a table lock the test holds, its `INSERT` of their audit rows already
    /// done in the open transaction (the audit rows go first: they read the stored type from the
    /// locked row). The test holds the profile's row until it holds the table.
    BetweenAuditAndUpdate(usize),
}

/// `share` (between 0 and 1) of `count`, rounded down: where in a run a fault lands.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_sign_loss,
    clippy::cast_precision_loss
)]
fn share_of(count: usize, share: f64) -> usize {
    assert!((0.0..=1.0).contains(&share), "share {share}");
    // Counts here are far below 2^52, so the float holds them exactly.
    (count as f64 * share) as usize
}

impl FaultFixture {
    /// Twenty moments spread over the run; the terminations use other fractions than the kills.
    fn moments(&self, fault: Fault) -> Vec<Moment> {
        let rows = |share: f64| i64::try_from(share_of(self.flips, share)).unwrap();
        let nth = |share: f64| share_of(self.flipped.len() - 1, share);
        let ms = |share: f64| {
            u64::try_from(share_of(usize::try_from(self.plan_ms).unwrap(), share)).unwrap()
        };
        let (times, row_shares, lock_shares, between_shares): (&[f64], &[f64], &[f64], &[f64]) =
            match fault {
                Fault::Kill => (
                    &[0.0, 0.3, 0.7],
                    &[0.02, 0.12, 0.24, 0.36, 0.48, 0.6, 0.7, 0.8],
                    &[0.1, 0.4, 0.7, 0.97],
                    &[0.0, 0.25, 0.5, 0.75, 0.9],
                ),
                Fault::Terminate => (
                    &[0.1, 0.5, 0.85],
                    &[0.05, 0.1, 0.2, 0.3, 0.42, 0.54, 0.65, 0.75],
                    &[0.0, 0.3, 0.55, 0.85],
                    &[0.1, 0.35, 0.6, 0.8, 0.93],
                ),
            };
        let mut moments: Vec<Moment> = times.iter().map(|s| Moment::AfterMs(ms(*s))).collect();
        moments.extend(
            row_shares
                .iter()
                .map(|s| Moment::AfterAuditRows(rows(*s).max(1))),
        );
        moments.extend(
            lock_shares
                .iter()
                .map(|s| Moment::WaitingForRowLock(nth(*s))),
        );
        moments.extend(
            between_shares
                .iter()
                .map(|s| Moment::BetweenAuditAndUpdate(nth(*s))),
        );
        moments
    }

    /// Checks a copy after a faulted run: the invariant, that the faulted run wrote only what it
    /// planned, that a re-run exits 0, and that the result equals the uninterrupted reference.
    /// Returns the audit rows the faulted run left.
    pub(super) async fn assert_recovers(
        &self,
        database: &str,
        faulted: &Finished,
        context: &str,
    ) -> usize {
        let pool = self.server.pool(database).await;
        let state = load_state(&pool).await;
        assert_no_problems(
            &atomicity_violations(&self.seeded, &state.agents, &state.audit),
            &format!("{context}: after the fault"),
        );
        let left = match faulted.run_id() {
            Some(run_id) => {
                assert_no_problems(
                    &unplanned_audit_rows(faulted.log(), &state.audit, &run_id),
                    context,
                );
                assert!(
                    state
                        .audit
                        .iter()
                        .all(|row| row.run_id.as_deref() == Some(&run_id)),
                    "{context}: audit rows of another run"
                );
                state.audit.len()
            }
            None => {
                assert!(
                    state.audit.is_empty(),
                    "{context}: audit rows without a run log"
                );
                0
            }
        };

        let rerun = Tool::new(&rerun_flags())
            .database(&self.server.url(database))
            .spawn_into(&self.scratch, &format!("{database}-rerun"))
            .finish()
            .await;
        assert_eq!(
            rerun.status.code(),
            Some(0),
            "{context}: the re-run must finish the job: {}",
            rerun.stderr
        );
        let state = load_state(&pool).await;
        if let Some(run_id) = rerun.run_id() {
            assert_no_problems(
                &unplanned_audit_rows(rerun.log(), &state.audit, &run_id),
                &format!("{context}: re-run"),
            );
        }
        let differing = self
            .reference_agents
            .iter()
            .filter(|(id, agents)| state.agents.get(id) != Some(agents))
            .count();
        assert_eq!(
            differing, 0,
            "{context}: profiles differ from the uninterrupted run"
        );
        assert_eq!(
            state.agents.len(),
            self.reference_agents.len(),
            "{context}: profile count"
        );
        assert_eq!(
            audit_multiset(&state.audit),
            self.reference_audit,
            "{context}: the audit log differs from the uninterrupted run's"
        );
        pool.close().await;
        left
    }

    fn trial_database(&self, number: usize, fault: Fault) -> String {
        let tag = match fault {
            Fault::Kill => "kill",
            Fault::Terminate => "term",
        };
        format!("{}_{tag}{number}", self.template)
    }

    /// Creates the copy for a trial while the previous trial runs.
    fn copy_in_background(&self, number: usize, fault: Fault) -> tokio::task::JoinHandle<()> {
        let server = self.server.clone();
        let template = self.template.clone();
        let database = self.trial_database(number, fault);
        tokio::spawn(async move { server.copy(&template, &database).await })
    }

    /// One apply on a fresh copy (made by [`FaultFixture::copy_in_background`]), faulted at
    /// `moment`, then checked and re-run.
    async fn trial(&self, number: usize, fault: Fault, moment: Moment) -> TrialOutcome {
        let database = self.trial_database(number, fault);
        let context = format!("{fault:?} #{number} at {moment:?}");
        let url = self.server.url(&database);
        let pool = self.server.pool(&database).await;
        // A timed moment must find the run still going: the last flipped profile stays locked
        // until the fault, so the run cannot finish before it.
        let last = self.flipped.len() - 1;
        let mut holder = match moment {
            Moment::WaitingForRowLock(nth) | Moment::BetweenAuditAndUpdate(nth) => {
                Some(hold_row_lock(&url, self.flipped[nth].0).await)
            }
            Moment::AfterMs(_) | Moment::AfterAuditRows(_) => {
                Some(hold_row_lock(&url, self.flipped[last].0).await)
            }
        };
        let mut run = Tool::new(&fault_flags())
            .database(&url)
            .spawn_into(&self.scratch, &database);
        let reached = match moment {
            Moment::AfterMs(ms) => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                run.running()
            }
            Moment::AfterAuditRows(rows) => wait_audit_rows(&pool, &mut run, rows).await,
            Moment::WaitingForRowLock(_) => {
                wait_blocked(&pool, &mut run, "SELECT id, slug::text, agents::text").await
            }
            Moment::BetweenAuditAndUpdate(_) => {
                let row_locked =
                    wait_blocked(&pool, &mut run, "SELECT id, slug::text, agents::text").await;
                assert!(row_locked, "{context}: the tool never reached the held row");
                let table = hold_table_from_writers(&url, "member_profiles").await;
                let _ = holder.replace(table).unwrap().close().await;
                let blocked = wait_blocked(&pool, &mut run, "UPDATE member_profiles").await;
                assert!(
                    blocked && tool_has_written_audit_rows(&pool).await,
                    "{context}: the tool should wait with its audit INSERT done"
                );
                blocked
            }
        };
        assert!(reached, "{context}: the run ended before the moment");
        let rows_at_fault = audit_count(&pool).await;
        let sessions = match fault {
            Fault::Kill => {
                run.kill();
                0
            }
            Fault::Terminate => loop {
                let terminated = terminate_tool_sessions(&pool).await;
                if terminated > 0 || !run.running() {
                    break terminated;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            },
        };
        if let Some(holder) = holder.take() {
            let _ = holder.close().await;
        }
        let done = run.finish().await;
        match fault {
            Fault::Kill => assert_eq!(
                done.status.signal(),
                Some(libc::SIGKILL),
                "{context}: killed while running, got {}",
                done.describe()
            ),
            Fault::Terminate => {
                assert!(
                    sessions > 0,
                    "{context}: no session of the tool to terminate"
                );
                match done.status.code() {
                    Some(0) => {}
                    Some(1) => {
                        let error = done.error_line();
                        assert!(error.contains("could not"), "{context}: {error}");
                    }
                    _ => panic!("{context}: {} {}", done.describe(), done.stderr),
                }
            }
        }
        pool.close().await;
        let left = self.assert_recovers(&database, &done, &context).await;
        self.server.drop_database(&database).await;
        TrialOutcome {
            moment,
            rows_at_fault,
            left,
            exit: done.describe(),
            error: (done.status.code() == Some(1)).then(|| done.error_line()),
        }
    }
}

#[derive(Debug)]
struct TrialOutcome {
    moment: Moment,
    rows_at_fault: i64,
    left: usize,
    exit: String,
    error: Option<String>,
}

async fn fault_series(fault: Fault) {
    let clock = Instant::now();
    let (server, template, pool) = template_database().await;
    let fixture = fault_fixture(server, &template, pool, 1_000, 200).await;
    let moments = fixture.moments(fault);
    assert_eq!(moments.len(), 20);
    let mut outcomes = Vec::new();
    let mut copy = fixture.copy_in_background(0, fault);
    for (number, moment) in moments.iter().enumerate() {
        copy.await.unwrap();
        if number + 1 < moments.len() {
            copy = fixture.copy_in_background(number + 1, fault);
        } else {
            copy = tokio::spawn(async {});
        }
        outcomes.push(fixture.trial(number, fault, *moment).await);
    }
    copy.await.unwrap();
    let name = match fault {
        Fault::Kill => "SIGKILL",
        Fault::Terminate => "pg_terminate_backend",
    };
    eprintln!(
        "[reliability] {name}: {} profiles, {} planned flips over {} profiles, --batch-size 10; \
         uninterrupted run {} ms (first audit row at {} ms)",
        fixture.seeded.len(),
        fixture.flips,
        fixture.flipped.len(),
        fixture.run_ms,
        fixture.plan_ms
    );
    for outcome in &outcomes {
        eprintln!(
            "[reliability]   {name} at {:?}: {} audit rows at the fault, {} left, {}{}",
            outcome.moment,
            outcome.rows_at_fault,
            outcome.left,
            outcome.exit,
            outcome
                .error
                .as_deref()
                .map(|error| format!(" ({error})"))
                .unwrap_or_default()
        );
    }
    let exits: BTreeMap<&str, usize> = outcomes.iter().fold(BTreeMap::new(), |mut by, outcome| {
        *by.entry(outcome.exit.as_str()).or_default() += 1;
        by
    });
    eprintln!(
        "[reliability] {name}: {} faults survived (invariant held, re-run exit 0, same table and \
         audit log as one uninterrupted run); exits {exits:?}; {:.1}s",
        outcomes.len(),
        clock.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_20_moments_of_an_apply_never_splits_a_flip_from_its_audit_row_and_a_rerun_converges(
) {
    fault_series(Fault::Kill).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn terminated_session_at_20_moments_never_splits_a_flip_from_its_audit_row_and_a_rerun_converges(
) {
    fault_series(Fault::Terminate).await;
}
