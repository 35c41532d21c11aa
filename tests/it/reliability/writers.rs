//! Four concurrent writers during an apply: no lost update, every write audited.

use super::*;

// ------------------------------------------------------------------------------------------------
// Concurrent writers
// ------------------------------------------------------------------------------------------------

const WRITERS: usize = 4;
/// Pause between two edits of one writer. The plan is one snapshot taken at its start and takes
/// a fraction of a second, so the writers edit at the same pace throughout the run.
const EDIT_PAUSE: Duration = Duration::from_millis(3);

/// How each writer edits a profile, besides bumping its own counter key `"w<n>"` in one element.
/// Every edit re-serialises the whole array; the reshaping ones happen on every other edit.
const WRITER_STYLES: [&str; WRITERS] = [
    "counter bump only",
    "counter bump; every other edit the whole array rotated by one (re-ordered)",
    "counter bump; every other edit the whole array resolved as the server saves it",
    "counter bump; every other edit that element's type replaced by the server's resolution",
];

struct WriterInput {
    number: usize,
    url: String,
    /// Profiles with planned flips: edited four times out of five.
    hot: Arc<Vec<Uuid>>,
    all: Arc<Vec<Uuid>>,
    snapshots: Arc<HashMap<String, Option<String>>>,
    stop: Arc<AtomicBool>,
    committed: Arc<AtomicU64>,
}

#[derive(Default)]
struct WriterLog {
    edits: u64,
    /// The last value this writer committed to its counter, by profile and element url.
    counters: HashMap<(Uuid, String), u64>,
    /// Profiles where this writer changed a type or the order of elements.
    reshaped: HashSet<Uuid>,
    /// Reads that found the counter at another value than this writer last committed.
    lost_on_read: u64,
}

fn counter_key(writer: usize) -> String {
    format!("w{writer}")
}

/// The array without the writers' counter keys, to tell a reshaping edit from a counter bump.
fn without_counters(elements: &[Value]) -> Vec<Value> {
    elements
        .iter()
        .map(|element| {
            let mut element = element.clone();
            if let Some(object) = element.as_object_mut() {
                for writer in 0..WRITERS {
                    object.remove(&counter_key(writer));
                }
            }
            element
        })
        .collect()
}

/// Read-modify-write of `agents` in a transaction, the way the server saves a profile, until
/// told to stop.
async fn writer(input: WriterInput) -> WriterLog {
    let mut connection = PgConnection::connect(&input.url).await.unwrap();
    let mut rng = Rng::new(0x00D0_0D00 + input.number as u64);
    let key = counter_key(input.number);
    let mut log = WriterLog::default();
    while !input.stop.load(Ordering::Relaxed) {
        let id = if rng.below(5) < 4 {
            input.hot[rng.index_below(input.hot.len())]
        } else {
            input.all[rng.index_below(input.all.len())]
        };
        let mut transaction = connection.begin().await.unwrap();
        let text: Option<String> =
            sqlx::query_scalar("SELECT agents::text FROM member_profiles WHERE id = $1 FOR UPDATE")
                .bind(id)
                .fetch_one(&mut *transaction)
                .await
                .unwrap();
        let parsed = text.map(|text| serde_json::from_str::<Value>(&text).unwrap());
        let Some(Value::Array(mut elements)) = parsed else {
            transaction.rollback().await.unwrap();
            continue;
        };
        let agents: Vec<usize> = (0..elements.len())
            .filter(|&index| elements[index].get("url").is_some_and(Value::is_string))
            .collect();
        if agents.is_empty() {
            transaction.rollback().await.unwrap();
            continue;
        }
        let index = agents[rng.index_below(agents.len())];
        let url = elements[index]["url"].as_str().unwrap().to_owned();
        let stored = elements[index]
            .get(&key)
            .and_then(Value::as_u64)
            .unwrap_or(0);
        let last = log.counters.get(&(id, url.clone())).copied().unwrap_or(0);
        if stored != last {
            log.lost_on_read += 1;
        }
        elements[index][key.as_str()] = Value::from(stored + 1);
        let before = without_counters(&elements);
        let reshape = rng.below(2) == 0;
        match input.number {
            _ if !reshape => {}
            1 => elements.rotate_left(1),
            2 => {
                let Value::Array(resolved) =
                    resolve_agents(&Value::Array(elements), &*input.snapshots)
                else {
                    unreachable!("an array resolves to an array")
                };
                elements = resolved;
            }
            3 => {
                let one = Value::Array(vec![elements[index].clone()]);
                elements[index] = resolve_agents(&one, &*input.snapshots)[0].clone();
            }
            _ => {}
        }
        if without_counters(&elements) != before {
            log.reshaped.insert(id);
        }
        sqlx::query("UPDATE member_profiles SET agents = $1::jsonb WHERE id = $2")
            .bind(Value::Array(elements).to_string())
            .bind(id)
            .execute(&mut *transaction)
            .await
            .unwrap();
        transaction.commit().await.unwrap();
        log.counters.insert((id, url), stored + 1);
        log.edits += 1;
        input.committed.fetch_add(1, Ordering::Relaxed);
        // A busy registry, not a benchmark: leave the two cores to the tool and the server.
        tokio::time::sleep(EDIT_PAUSE).await;
    }
    connection.close().await.unwrap();
    log
}

/// The element of `agents` with this url.
fn element_with_url<'a>(agents: Option<&'a Value>, url: &str) -> Option<&'a Value> {
    agents?
        .as_array()?
        .iter()
        .find(|element| element.get("url").and_then(Value::as_str) == Some(url))
}

/// Every element without its type and the writers' counters, in a stable order: what neither
/// the tool nor the writers may change.
fn content(agents: Option<&Value>) -> Vec<String> {
    let Some(Value::Array(elements)) = agents else {
        return vec![agents.map_or("SQL NULL".to_owned(), Value::to_string)];
    };
    let mut rest: Vec<String> = without_counters(elements)
        .into_iter()
        .map(|mut element| {
            if let Some(object) = element.as_object_mut() {
                object.remove("type");
            }
            element.to_string()
        })
        .collect();
    rest.sort();
    rest
}

/// The seeded registry every concurrent-writer test copies, with what a dry-run found in it.
struct WritersTemplate {
    server: Server,
    name: String,
    seeded: AgentsById,
    /// Profiles with planned flips.
    hot: Vec<Uuid>,
    planned: Summary,
    snapshots: HashMap<String, Option<String>>,
    seed_ms: u128,
}

static WRITERS_TEMPLATE: tokio::sync::OnceCell<WritersTemplate> =
    tokio::sync::OnceCell::const_new();

/// Seeds 20,000 ordinary profiles once per test binary; the first test to ask pays for it.
async fn writers_template() -> &'static WritersTemplate {
    WRITERS_TEMPLATE
        .get_or_init(|| async {
            let clock = Instant::now();
            let (server, name, pool) = template_database().await;
            seed_registry(&pool, 20_000, 45).await;
            let seeded = load_agents(&pool).await;
            let (planned, log) =
                backfill(&server.url(&name), &["--dry-run", "--max-flips", NO_LIMIT])
                    .run()
                    .await;
            let planned = planned.unwrap();
            assert!(planned.profiles_scanned >= 20_000, "{planned:?}");
            assert!(planned.flips >= 1_000, "{planned:?}");
            let hot: BTreeSet<Uuid> = log.flips().iter().map(|flip| flip.profile_id).collect();
            let snapshots: HashMap<String, Option<String>> =
                sqlx::query_as("SELECT agent_url, inferred_type FROM agent_capabilities_snapshot")
                    .fetch_all(&pool)
                    .await
                    .unwrap()
                    .into_iter()
                    .collect();
            pool.close().await;
            drop(pool);
            WritersTemplate {
                server,
                name,
                seeded,
                hot: hot.into_iter().collect(),
                planned,
                snapshots,
                seed_ms: clock.elapsed().as_millis(),
            }
        })
        .await
}

/// An apply with `batch_size` over 20,000+ profiles and 1,000+ planned flips while four writers
/// edit the same profiles; then every writer's last commit, every audit row, every skipped flip
/// and a follow-up dry-run are checked.
async fn apply_under_concurrent_writers(batch_size: u32) {
    let clock = Instant::now();
    let template = writers_template().await;
    let name = format!("{}_batch{batch_size}", template.name);
    template.server.copy(&template.name, &name).await;
    let url = template.server.url(&name);
    let pool = template.server.pool(&name).await;
    let seeded = &template.seeded;
    let planned = &template.planned;

    let stop = Arc::new(AtomicBool::new(false));
    let committed = Arc::new(AtomicU64::new(0));
    let hot = Arc::new(template.hot.clone());
    let all = Arc::new(seeded.keys().copied().collect::<Vec<_>>());
    let snapshots = Arc::new(template.snapshots.clone());
    let writers: Vec<_> = (0..WRITERS)
        .map(|number| {
            tokio::spawn(writer(WriterInput {
                number,
                url: url.clone(),
                hot: hot.clone(),
                all: all.clone(),
                snapshots: snapshots.clone(),
                stop: stop.clone(),
                committed: committed.clone(),
            }))
        })
        .collect();
    let monitor = {
        let (pool, stop, committed) = (pool.clone(), stop.clone(), committed.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                if audit_count(&pool).await > 0 {
                    return Some(committed.load(Ordering::Relaxed));
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            None
        })
    };
    while committed.load(Ordering::Relaxed) < 2 * WRITERS as u64 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let before_run = committed.load(Ordering::Relaxed);
    let run_clock = Instant::now();
    let batch = batch_size.to_string();
    let flags = ["--apply", "--batch-size", &batch, "--max-flips", NO_LIMIT];
    let (result, log) = backfill(&url, &flags).run().await;
    let during_run = committed.load(Ordering::Relaxed) - before_run;
    let run_ms = run_clock.elapsed().as_millis();
    stop.store(true, Ordering::Relaxed);
    let mut logs = Vec::new();
    for writer in writers {
        logs.push(writer.await.unwrap());
    }
    let during_writes = monitor
        .await
        .unwrap()
        .map_or(0, |at_first_write| before_run + during_run - at_first_write);
    let summary = result.unwrap();
    let now = load_agents(&pool).await;
    let mut problems = Vec::new();

    // No writer's committed change is missing.
    let mut lost = 0;
    for (number, writer_log) in logs.iter().enumerate() {
        let key = counter_key(number);
        lost += writer_log.lost_on_read;
        for ((id, url), value) in &writer_log.counters {
            let found = element_with_url(now.get(id).and_then(Option::as_ref), url)
                .and_then(|element| element.get(&key))
                .and_then(Value::as_u64);
            if found != Some(*value) {
                lost += 1;
                problems.push(format!(
                    "lost update: writer {number} committed {key}={value} in {url} of {id}, \
                     the table holds {found:?}"
                ));
            }
        }
    }

    // Audit rows of the run and the run log agree exactly.
    let run_id = log.run_id();
    let audit: Vec<AuditRow> = load_audit(&pool)
        .await
        .into_iter()
        .filter(|row| row.run_id.as_deref() == Some(run_id.as_str()))
        .collect();
    problems.extend(unplanned_audit_rows(&log, &audit, &run_id));
    let flips: HashSet<FlipKey> = log.flips().into_iter().map(event_key).collect();
    let skipped = log.skipped();
    let skipped_planned: HashSet<FlipKey> = skipped
        .iter()
        .filter(|skipped| skipped.reason != "unplanned")
        .map(|skipped| event_key(skipped))
        .collect();
    let unplanned = skipped.len() - skipped_planned.len();
    let mut written: HashMap<FlipKey, usize> = HashMap::new();
    for row in &audit {
        *written.entry(audit_flip_key(row)).or_default() += 1;
        if row.from().map(type_label) != row.old_type {
            problems.push(format!("old_type is not the label of notes.from: {row:?}"));
        }
    }
    for (flip, count) in &written {
        if *count != 1 {
            problems.push(format!("{count} audit rows for one flip: {flip:?}"));
        }
        if skipped_planned.contains(flip) {
            problems.push(format!("flip both written and reported skipped: {flip:?}"));
        }
    }
    for flip in &flips {
        if !written.contains_key(flip) && !skipped_planned.contains(flip) {
            problems.push(format!(
                "planned flip neither written nor skipped: {flip:?}"
            ));
        }
    }
    for flip in &skipped_planned {
        if !flips.contains(flip) {
            problems.push(format!("skipped event for a flip never planned: {flip:?}"));
        }
    }
    if (summary.written, summary.skipped, summary.unplanned)
        != (
            audit.len() as u64,
            skipped_planned.len() as u64,
            unplanned as u64,
        )
    {
        problems.push(format!(
            "summary says written {} skipped {} unplanned {}; the audit has {} rows and the log \
             {} skipped and {unplanned} unplanned events",
            summary.written,
            summary.skipped,
            summary.unplanned,
            audit.len(),
            skipped_planned.len()
        ));
    }

    // Every written flip is still in the table: no writer overwrote it with a stale copy.
    for row in &audit {
        let id = Uuid::parse_str(row.member_id.as_deref().unwrap_or_default()).unwrap();
        let element = element_with_url(now.get(&id).and_then(Option::as_ref), &row.agent_url);
        if element.and_then(|element| element.get("type")) != Some(&Value::from(&*row.new_type)) {
            problems.push(format!("written flip gone from the table: {row:?}"));
        }
    }

    // Skips only where a writer re-ordered or re-typed the profile.
    let reshaped: HashSet<Uuid> = logs
        .iter()
        .flat_map(|log| log.reshaped.iter().copied())
        .collect();
    let skipped_at: HashSet<(Uuid, &str)> = skipped
        .iter()
        .map(|skipped| (skipped.profile_id, skipped.url.as_str()))
        .collect();
    for skipped in &skipped {
        if !reshaped.contains(&skipped.profile_id) {
            problems.push(format!(
                "skipped although no writer reshaped it: {skipped:?}"
            ));
        }
    }

    // Nothing but types and counters changed anywhere.
    for (id, before) in seeded {
        let after = now.get(id).and_then(Option::as_ref);
        if before.as_ref() != after && content(before.as_ref()) != content(after) {
            problems.push(format!("profile {id} changed beyond types and counters"));
        }
    }

    // A follow-up dry-run finds only flips the writers' edits left: ones this run reported as
    // skipped, in profiles a writer reshaped.
    let (follow_up, follow_log) = backfill(&url, &["--dry-run", "--max-flips", NO_LIMIT])
        .run()
        .await;
    let follow_up = follow_up.unwrap();
    for flip in follow_log.flips() {
        let at = (flip.profile_id, flip.url.as_str());
        if !skipped_at.contains(&at) || !reshaped.contains(&flip.profile_id) {
            problems.push(format!(
                "follow-up flip the writers did not cause: {flip:?}"
            ));
        }
    }

    let edits: u64 = logs.iter().map(|log| log.edits).sum();
    for (number, style) in WRITER_STYLES.iter().enumerate() {
        eprintln!(
            "[reliability]   writer w{number} ({style}): {} edits, {} profiles reshaped, \
             {} counters checked",
            logs[number].edits,
            logs[number].reshaped.len(),
            logs[number].counters.len()
        );
    }
    eprintln!(
        "[reliability] concurrent writers, --batch-size {batch_size}: {} profiles, {} planned \
         flips over {} profiles ({} in a dry-run without writers); apply {run_ms} ms: written {}, skipped {}, unplanned {}; \
         writers {WRITERS}, edits committed during the run {during_run} ({during_writes} of them \
         after the first write, {edits} in all, per writer {:?}), profiles reshaped {}, lost updates {lost}; follow-up dry-run flips {}; \
         {:.1}s (seeding the shared template took {} ms)",
        summary.profiles_scanned,
        summary.flips,
        hot.len(),
        planned.flips,
        summary.written,
        summary.skipped,
        summary.unplanned,
        logs.iter().map(|log| log.edits).collect::<Vec<_>>(),
        reshaped.len(),
        follow_up.flips,
        clock.elapsed().as_secs_f64(),
        template.seed_ms
    );
    assert_no_problems(&problems, &format!("--batch-size {batch_size}"));
    assert_eq!(lost, 0, "lost updates");
    assert!(
        logs.iter().all(|log| log.edits > 0) && during_run >= 100 && during_writes > 0,
        "the writers committed only {during_run} edits during the run, {during_writes} while \
         it wrote"
    );
    assert!(summary.written > 0, "{summary:?}");
    assert!(summary.flips >= 1_000, "{summary:?}");
    assert!(summary.profiles_scanned >= 20_000, "{summary:?}");
    pool.close().await;
    template.server.drop_database(&name).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_writers_lose_no_update_and_every_write_is_audited_batch_size_1() {
    apply_under_concurrent_writers(1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_writers_lose_no_update_and_every_write_is_audited_batch_size_50() {
    apply_under_concurrent_writers(50).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_concurrent_writers_lose_no_update_and_every_write_is_audited_batch_size_1000() {
    apply_under_concurrent_writers(1000).await;
}
