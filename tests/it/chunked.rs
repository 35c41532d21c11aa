//! The plan in chunks (`--chunk-size`): each chunk of profiles in id order is read in a snapshot
//! of its own. With chunks small enough that a few thousand profiles span hundreds of them, the
//! plan is the unchunked rule's on every conformance vector and on a generated corpus; edits
//! made during the pass show up as the README says; a chunk the server cancels is retried, and
//! one it keeps cancelling ends the run with what to change.

use crate::common::{backfill, RunLog, TestDb, Tool};

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::time::Duration;

use agent_type_backfill::db;
use agent_type_backfill::domain::count;
use agent_type_backfill::resolver::{diff_flips, resolve_agents};
use agent_type_backfill::support::seed::{seed_bulk, BulkSpec};
use serde_json::Value;
use sqlx::{PgConnection, PgPool};
use uuid::Uuid;

const VECTORS: &str = "tests/data/conformance/resolve_agent_types.json";

/// (profile label, index, url, stored type as JSON text, new type): one flip, held or not.
type FlipKey = (String, u64, String, String, String);

/// The flips (held ones included) and the counts of a JSON run log.
#[derive(Debug, PartialEq)]
struct Planned {
    flips: BTreeSet<FlipKey>,
    counts: Counts,
}

/// The summary's counts of what the plan found.
#[derive(Debug, PartialEq)]
struct Counts {
    profiles_scanned: u64,
    profiles_changed: u64,
    flips: u64,
    held: u64,
    malformed: u64,
    junk_elements: u64,
    unrecognised_inferred_types: BTreeMap<String, u64>,
}

/// A stored type as comparable text: the server writes 1e+21 as 1000000000000000000000.
fn stored_type(value: &Value) -> String {
    match value.as_f64() {
        Some(number) if value.is_number() => format!("{number:e}"),
        _ => value.to_string(),
    }
}

fn planned(log: &RunLog) -> Planned {
    let held = log.held().into_iter().map(|held| &held.flip);
    let flips = log
        .flips()
        .into_iter()
        .chain(held)
        .map(|flip| {
            (
                flip.profile.clone(),
                flip.index,
                flip.url.clone(),
                stored_type(&flip.from),
                flip.to.clone(),
            )
        })
        .collect();
    let summary = log.summary();
    let counts = Counts {
        profiles_scanned: summary.profiles_scanned,
        profiles_changed: summary.profiles_changed,
        flips: summary.flips,
        held: summary.held,
        malformed: summary.malformed,
        junk_elements: summary.junk_elements,
        unrecognised_inferred_types: summary.unrecognised_inferred_types.clone(),
    };
    Planned { flips, counts }
}

/// A dry-run in-process with `--chunk-size chunk` and `--plan-jobs jobs`.
async fn dry_run(url: &str, chunk: usize, jobs: usize) -> Planned {
    let chunk = chunk.to_string();
    let jobs = jobs.to_string();
    let flags = [
        "--dry-run",
        "--max-flips",
        "1000000",
        "--chunk-size",
        &chunk,
        "--plan-jobs",
        &jobs,
    ];
    // Held flips end a dry-run with an error (exit 3) after the complete log.
    let (result, log) = backfill(url, &flags).run().await;
    assert!(result.is_ok() || !log.held().is_empty(), "{result:?}");
    planned(&log)
}

/// What the pure resolver finds over the whole table at once: the unchunked rule.
async fn resolver_flips(pool: &PgPool) -> BTreeSet<FlipKey> {
    let snapshots: HashMap<String, Option<String>> =
        sqlx::query_as("SELECT agent_url, inferred_type FROM agent_capabilities_snapshot")
            .fetch_all(pool)
            .await
            .unwrap()
            .into_iter()
            .collect();
    let profiles: Vec<(String, Option<Value>)> =
        sqlx::query_as("SELECT slug::text, agents FROM member_profiles")
            .fetch_all(pool)
            .await
            .unwrap();
    let mut flips = BTreeSet::new();
    for (slug, agents) in profiles {
        let Some(agents) = agents.filter(Value::is_array) else {
            continue;
        };
        let resolved = resolve_agents(&agents, &snapshots);
        for flip in diff_flips(&agents, &resolved) {
            flips.insert((
                slug.clone(),
                u64::try_from(flip.index).unwrap(),
                flip.url,
                stored_type(&flip.from),
                flip.to,
            ));
        }
    }
    flips
}

/// Whether each url a vector names has a snapshot, and which: vectors that agree on every url
/// they share can live in one database.
type World = HashMap<String, Option<Option<String>>>;

fn urls_of(case: &Value) -> World {
    let mut world: World = HashMap::new();
    if let Some(agents) = case["agents"].as_array() {
        for agent in agents {
            if let Some(url) = agent.get("url").and_then(Value::as_str) {
                world.insert(url.to_owned(), None);
            }
        }
    }
    for row in case["snapshots"].as_array().unwrap() {
        world.insert(
            row["agent_url"].as_str().unwrap().to_owned(),
            Some(row["inferred_type"].as_str().map(str::to_owned)),
        );
    }
    world
}

#[tokio::test]
async fn chunks_of_seven_plan_every_conformance_vector_as_the_unchunked_rule_does() {
    let text = std::fs::read_to_string(VECTORS).unwrap();
    let file: Value = serde_json::from_str(&text).unwrap();
    let cases = file["cases"].as_array().unwrap();
    // Pack the vectors into as few databases as keep every url's snapshot what its vector says.
    let mut worlds: Vec<(World, Vec<usize>)> = Vec::new();
    for (n, case) in cases.iter().enumerate() {
        let wanted = urls_of(case);
        let fits = |world: &World| {
            wanted
                .iter()
                .all(|(url, state)| world.get(url).is_none_or(|have| have == state))
        };
        match worlds.iter_mut().find(|(world, _)| fits(world)) {
            Some((world, members)) => {
                world.extend(wanted);
                members.push(n);
            }
            None => worlds.push((wanted, vec![n])),
        }
    }
    let mut checked = 0;
    for (world, members) in &worlds {
        let db = TestDb::new().await;
        let mut expected = BTreeSet::new();
        for &n in members {
            let case = &cases[n];
            let slug = format!("vector-{n}");
            sqlx::query(
                "WITH org AS (INSERT INTO organizations (workos_organization_id, name) \
                 VALUES ($1, $1) RETURNING workos_organization_id) \
                 INSERT INTO member_profiles (workos_organization_id, display_name, slug, agents) \
                 SELECT workos_organization_id, $1, $1, $2::text::jsonb FROM org",
            )
            .bind(&slug)
            .bind(case["agents"].to_string())
            .execute(&db.pool)
            .await
            .unwrap();
            for flip in case["flips"].as_array().unwrap() {
                expected.insert((
                    slug.clone(),
                    flip["index"].as_u64().unwrap(),
                    flip["url"].as_str().unwrap().to_owned(),
                    stored_type(&flip["from"]),
                    flip["to"].as_str().unwrap().to_owned(),
                ));
            }
        }
        let (urls, types): (Vec<&str>, Vec<Option<&str>>) = world
            .iter()
            .filter_map(|(url, state)| Some((url.as_str(), state.as_ref()?.as_deref())))
            .unzip();
        sqlx::query(
            "INSERT INTO agent_capabilities_snapshot (agent_url, protocol, inferred_type) \
             SELECT url, 'mcp', inferred FROM unnest($1::text[], $2::text[]) AS s(url, inferred)",
        )
        .bind(&urls)
        .bind(&types)
        .execute(&db.pool)
        .await
        .unwrap();

        let chunked = dry_run(&db.url, 7, 2).await;
        let whole = dry_run(&db.url, 1_000_000, 1).await;
        assert_eq!(chunked.flips, expected, "vectors {members:?}");
        assert_eq!(chunked, whole, "vectors {members:?}");
        assert_eq!(
            chunked.counts.profiles_scanned,
            count(members.len()),
            "vectors {members:?}"
        );
        checked += members.len();
    }
    assert_eq!(checked, 787, "the vector file changed size");
}

/// The named stale, junk and malformed profiles among generated ones with 3% stale agents.
async fn generated_corpus() -> TestDb {
    let db = TestDb::seeded(0).await;
    seed_bulk(
        &db.pool,
        BulkSpec {
            profiles: 3000,
            snapshot_per_mille: 600,
            unclassified_per_mille: 167,
            stale_per_mille: 30,
            seed: 19,
        },
    )
    .await
    .unwrap();
    db
}

#[tokio::test]
async fn any_chunk_size_plans_a_generated_corpus_as_the_unchunked_rule_does() {
    let db = generated_corpus().await;
    let expected = resolver_flips(&db.pool).await;
    assert!(
        expected.len() > 100,
        "the corpus has flips: {}",
        expected.len()
    );
    let whole = dry_run(&db.url, 1_000_000, 1).await;
    assert_eq!(whole.flips, expected);
    let profiles: i64 = sqlx::query_scalar("SELECT count(*) FROM member_profiles")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        whole.counts.profiles_scanned,
        u64::try_from(profiles).unwrap()
    );
    // 3 and 64 leave a short last chunk, 3011 divides nothing; the table's own size is one full
    // chunk followed by an empty one.
    let all = usize::try_from(profiles).unwrap();
    for (chunk, jobs) in [(3, 1), (3, 2), (64, 2), (3011, 1), (all, 1), (all, 2)] {
        assert_eq!(
            dry_run(&db.url, chunk, jobs).await,
            whole,
            "--chunk-size {chunk} --plan-jobs {jobs}"
        );
    }
}

/// Each chunk statement reads a bounded range of the primary key and looks the chunk's urls up by
/// key: no scan of either table (a sequential scan, or an index scan without a condition), so its
/// work follows the chunk size, not the table. The hash join it may use is between the chunk's
/// elements and the snapshot rows found for them.
#[tokio::test]
async fn a_chunk_reads_both_tables_through_their_primary_keys_only() {
    let db = generated_corpus().await;
    sqlx::query("ANALYZE").execute(&db.pool).await.unwrap();
    let plan: Vec<String> = sqlx::query_scalar(&format!("EXPLAIN {}", db::PLAN_CHUNK))
        .bind(&agent_type_backfill::resolver::VALID_AGENT_TYPES[..])
        .bind(agent_type_backfill::resolver::SELF_DECLARED_TYPE)
        .bind(agent_type_backfill::resolver::UNKNOWN_TYPE)
        .bind(Uuid::nil())
        .bind(100i64)
        .bind(Uuid::max())
        .fetch_all(&db.pool)
        .await
        .unwrap();
    let plan = plan.join("\n");
    assert!(
        plan.contains("Index Scan using member_profiles_pkey on member_profiles")
            && plan.contains("Index Cond: ((id >= ")
            && plan.contains("agent_capabilities_snapshot_pkey")
            && plan.contains("Index Cond: (agent_url = ANY ")
            && !plan.contains("Seq Scan"),
        "{plan}"
    );
}

/// A stale profile: one agent stored `buying` whose probe says `sales`.
async fn insert_stale(connection: &mut PgConnection, id: Uuid, slug: &str) {
    let url = format!("https://{slug}.example/mcp");
    sqlx::query(
        "WITH org AS (INSERT INTO organizations (workos_organization_id, name) \
         VALUES ($2, $2) RETURNING workos_organization_id), \
         snap AS (INSERT INTO agent_capabilities_snapshot (agent_url, protocol, inferred_type) \
         VALUES ($3, 'mcp', 'sales')) \
         INSERT INTO member_profiles (id, workos_organization_id, display_name, slug, agents) \
         SELECT $1, workos_organization_id, $2, $2, \
                jsonb_build_array(jsonb_build_object('url', $3::text, 'type', 'buying')) FROM org",
    )
    .bind(id)
    .bind(slug)
    .bind(&url)
    .execute(connection)
    .await
    .unwrap();
}

/// An id at `fraction` of the way through the key space (random ids spread evenly over it).
fn id_at(fraction: f64) -> Uuid {
    // A fraction of u128::MAX, to 53 bits: plenty to place a profile between random ids.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let high = (fraction * f64::from(u32::MAX)) as u128;
    Uuid::from_u128(high << 96 | 0x4000_8000_0000_0000_0000)
}

/// 2,000 consistent profiles and `stale` placed at the given fractions of the key space.
async fn consistent_with_stale(stale: &[(f64, &str)]) -> TestDb {
    let db = TestDb::new().await;
    seed_bulk(&db.pool, BulkSpec::consistent(2000, 23))
        .await
        .unwrap();
    let mut connection = db.pool.acquire().await.unwrap();
    for (fraction, slug) in stale {
        insert_stale(&mut connection, id_at(*fraction), slug).await;
    }
    db
}

/// Locks the crawler's log: a chunk that found a flip then waits, inside its snapshot, to read
/// the flip's evidence; chunks without flips never read the log.
async fn hold_the_log(db: &TestDb) -> sqlx::Transaction<'static, sqlx::Postgres> {
    db.hold_table("type_reclassification_log").await
}

/// The tool's session waiting on a lock, once there is one (polls for up to 30 s).
async fn waiting_tool_session(db: &TestDb) -> i32 {
    for _ in 0..1200 {
        let waiting: Option<i32> = sqlx::query_scalar(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() \
             AND application_name LIKE 'agent-type-backfill %' AND wait_event_type = 'Lock'",
        )
        .fetch_optional(&db.pool)
        .await
        .unwrap();
        if let Some(pid) = waiting {
            return pid;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the tool never waited on the lock");
}

/// A dry-run in chunks of 100 read one after another, that waits out the held crawler's log.
const ONE_JOB_WAITING: [&str; 7] = [
    "--dry-run",
    "--chunk-size",
    "100",
    "--plan-jobs",
    "1",
    "--lock-timeout",
    "60s",
];

#[tokio::test]
async fn a_profile_edited_during_the_pass_is_seen_before_or_after_the_edit_never_twice() {
    // One job reads the chunks in key order. `middle` is the first flip, so its chunk is where the
    // plan stops; `late` is ahead of it.
    let db = consistent_with_stale(&[(0.25, "middle"), (0.9, "late")]).await;
    let blocker = hold_the_log(&db).await;
    let run = tokio::spawn(backfill(&db.url, &ONE_JOB_WAITING).run());
    waiting_tool_session(&db).await;

    let (first, last): (Uuid, Uuid) =
        sqlx::query_as("SELECT min(id::text)::uuid, max(id::text)::uuid FROM member_profiles")
            .fetch_one(&db.pool)
            .await
            .unwrap();
    let mut editor = db.pool.acquire().await.unwrap();
    insert_stale(&mut editor, id_at(0.05), "behind").await;
    insert_stale(&mut editor, id_at(0.95), "ahead").await;
    for id in [id_at(0.25), id_at(0.9), first, last] {
        sqlx::query("DELETE FROM member_profiles WHERE id = $1")
            .bind(id)
            .execute(&mut *editor)
            .await
            .unwrap();
    }
    blocker.rollback().await.unwrap();
    let (result, log) = run.await.unwrap();
    result.unwrap();
    let plan = planned(&log);

    let profiles: BTreeSet<&str> = plan.flips.iter().map(|flip| flip.0.as_str()).collect();
    // `middle`'s chunk read it before its delete; `ahead` was there when its chunk came; `behind`
    // landed in a chunk already read, and `late` was gone before its chunk.
    assert_eq!(profiles, BTreeSet::from(["ahead", "middle"]));
    // 2,002 at the start: `first` was read before its delete, `last` and `late` were gone, and
    // `ahead` is new.
    assert_eq!(plan.counts.profiles_scanned, 2001);
    assert_eq!(plan.counts.profiles_changed, 2);
}

#[tokio::test]
async fn a_chunk_the_server_cancels_mid_pass_is_read_again_and_counted_once() {
    let db = consistent_with_stale(&[(0.5, "middle"), (0.75, "later")]).await;
    let undisturbed = dry_run(&db.url, 100, 1).await;
    assert_eq!(undisturbed.flips.len(), 2);

    let blocker = hold_the_log(&db).await;
    let mut run = Tool::new(&[&ONE_JOB_WAITING[..], &["--format", "json"]].concat())
        .database(&db.url)
        .spawn();
    let pid = waiting_tool_session(&db).await;
    let cancelled: bool = sqlx::query_scalar("SELECT pg_cancel_backend($1)")
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(cancelled);
    // The retry reads the chunk again in a new snapshot and waits on the log once more.
    waiting_tool_session(&db).await;
    assert!(run.running(), "the run ended instead of retrying");
    blocker.rollback().await.unwrap();
    let done = run.finish().await;

    done.exits(0);
    done.stderr_has("retrying in a new snapshot")
        .stderr_has("canceling statement due to user request");
    assert_eq!(planned(done.log()), undisturbed);
}

/// A dry-run in chunks of 500 that waits on locks for as long as `statement_timeout` lets it.
fn waiting_dry_run(db: &TestDb, statement_timeout: &str) -> Tool {
    Tool::new(&[
        "--dry-run",
        "--chunk-size",
        "500",
        "--lock-timeout",
        "60s",
        "--statement-timeout",
        statement_timeout,
    ])
    .database(&db.url)
}

#[tokio::test]
async fn a_chunk_past_the_statement_timeout_on_every_attempt_fails_the_run_saying_what_to_change() {
    let db = consistent_with_stale(&[(0.5, "middle")]).await;
    let _blocker = hold_the_log(&db).await;
    let done = waiting_dry_run(&db, "300ms")
        .status(1)
        .run_within(Duration::from_secs(120));
    let error = done.error_line();
    assert!(
        error.contains("nothing was written")
            && error.contains("failed 5 times")
            && error.contains("lower --chunk-size (now 500)")
            && error.contains("raise --statement-timeout")
            && error.contains("canceling statement due to statement timeout"),
        "{}",
        done.stderr
    );
    assert_eq!(done.stderr.matches("retrying in a new snapshot").count(), 4);
    assert!(!done.stdout.contains("\"summary\""), "{}", done.stdout);
}

#[tokio::test]
async fn a_chunk_statement_past_half_the_statement_timeout_is_warned_about_with_what_to_change() {
    let db = consistent_with_stale(&[(0.5, "middle")]).await;
    // The chunk statement is the first of the run to lock member_profiles: it waits here, so it
    // runs for at least as long as the lock is held, and finishes well inside the timeout.
    let blocker = db.hold_table("member_profiles").await;
    let run = waiting_dry_run(&db, "10s").spawn();
    waiting_tool_session(&db).await;
    tokio::time::sleep(Duration::from_secs(6)).await;
    blocker.rollback().await.unwrap();
    let done = run.finish().await;

    done.exits(0)
        .stderr_has("the slowest chunk statement took")
        .stderr_has("more than half of --statement-timeout 10000ms")
        .stderr_has("lower --chunk-size (now 500)");
    assert!(
        !done.stderr.contains("retrying"),
        "the chunk ran past the timeout instead of near it: {}",
        done.stderr
    );
}
